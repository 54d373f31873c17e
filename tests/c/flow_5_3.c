/*
 * flow_5_3: the RFC's flow 5.3 (software nesting: an I/O address space
 * whose mappings are addresses of another one) written against the ABI
 * header as a VMM would, then proved with two edu devices:
 *
 *   gpa   = IOASID_ALLOC, both devices attached, guest memory mapped at 0
 *   giova = IOASID_CREATE_NESTING(gpa), dev2 attached to it as well
 *   IOASID_MAP_DMA on giova: IOVA 0x2000 -> GPA 0x1000 ("vaddr" is a GPA)
 *
 * dev2's DMA at 0x2000 must land in guest page 0x1000, dev1's (still on
 * gpa) in guest page 0x2000, and once gpa unmaps GPA 0x1000, dev2's DMA
 * there must be blocked.
 *
 * Usage: flow_5_3 DEV1 DEV2   (two /dev/vfio/devices/devN nodes of devices
 * in different IOMMU groups). Exit status 0: every step worked; 1: a step
 * failed (the output says which); 2: usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <linux/vfio.h>
#include <linux/ioasid.h>

/* QEMU's edu device: BAR0 registers used here. */
#define EDU_ID			0x00
#define EDU_ID_VALUE		0x010000edu
#define EDU_DMA_SRC		0x80
#define EDU_DMA_DST		0x88
#define EDU_DMA_COUNT		0x90
#define EDU_DMA_CMD		0x98
#define EDU_DMA_START		0x1
#define EDU_DMA_TO_RAM		0x2
#define EDU_BUFFER		0x40000

#define PAGE			4096
#define GUEST_SIZE		(16 * PAGE)	/* the "guest memory" */
#define GIOVA			0x2000		/* child IOVA -> GPA 0x1000 */
#define GIOVA_SRC		0x3000		/* child IOVA -> GPA 0x5000 */
#define LENGTH			3000
#define WAIT_MS			10000

static int step_no;

static void step(const char *fmt, ...)
{
	va_list ap;

	printf("%2d. ", ++step_no);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static void __attribute__((noreturn)) fail(const char *fmt, ...)
{
	va_list ap;
	int err = errno;

	printf("FAILED: ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	if (err)
		printf(" (%s)", strerror(err));
	printf("\nflow_5_3: FAIL\n");
	exit(1);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* An edu device opened through its device node. */
struct edu {
	const char *name;
	int fd;
	uint64_t bar0;		/* offset of BAR0 in the device file */
	uint64_t config;	/* offset of the config space */
};

static uint64_t region_offset(int fd, unsigned int index)
{
	struct vfio_region_info info = { .argsz = sizeof(info), .index = index };

	errno = 0;
	if (ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, &info))
		fail("VFIO_DEVICE_GET_REGION_INFO(%u)", index);
	return info.offset;
}

static uint32_t rd32(const struct edu *d, uint64_t reg)
{
	uint32_t v;

	errno = 0;
	if (pread(d->fd, &v, 4, d->bar0 + reg) != 4)
		fail("%s: reading BAR0 %#llx", d->name, (unsigned long long)reg);
	return v;
}

static void wr32(const struct edu *d, uint64_t reg, uint32_t v)
{
	errno = 0;
	if (pwrite(d->fd, &v, 4, d->bar0 + reg) != 4)
		fail("%s: writing BAR0 %#llx", d->name, (unsigned long long)reg);
}

static void edu_setup(struct edu *d)
{
	uint16_t command;

	d->config = region_offset(d->fd, VFIO_PCI_CONFIG_REGION_INDEX);
	d->bar0 = region_offset(d->fd, VFIO_PCI_BAR0_REGION_INDEX);
	errno = 0;
	if (pread(d->fd, &command, 2, d->config + 4) != 2)
		fail("%s: reading the PCI command register", d->name);
	command |= 0x6; /* memory space, bus master */
	if (pwrite(d->fd, &command, 2, d->config + 4) != 2)
		fail("%s: writing the PCI command register", d->name);
	if (rd32(d, EDU_ID) != EDU_ID_VALUE)
		fail("%s is not an edu device", d->name);
}

/* One transfer of LENGTH bytes; waits (bounded) for its end. */
static void edu_dma(const struct edu *d, uint32_t src, uint32_t dst, uint32_t cmd)
{
	uint64_t deadline = now_ms() + WAIT_MS;

	wr32(d, EDU_DMA_SRC, src);
	wr32(d, EDU_DMA_DST, dst);
	wr32(d, EDU_DMA_COUNT, LENGTH);
	wr32(d, EDU_DMA_CMD, EDU_DMA_START | cmd);
	while (rd32(d, EDU_DMA_CMD) & EDU_DMA_START) {
		if (now_ms() > deadline) {
			errno = 0;
			fail("%s: the transfer did not finish", d->name);
		}
		usleep(10000);
	}
}

static void map(int ioasid_fd, int ioasid, uint64_t iova, uint64_t vaddr,
		uint64_t size, const char *what)
{
	struct ioasid_dma_map m = {
		.argsz = sizeof(m),
		.flags = IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE,
		.ioasid = (uint32_t)ioasid,
		.vaddr = vaddr,
		.iova = iova,
		.size = size,
	};

	if (ioctl(ioasid_fd, IOASID_MAP_DMA, &m))
		fail("IOASID_MAP_DMA (%s)", what);
}

static uint64_t unmap(int ioasid_fd, int ioasid, uint64_t iova, uint64_t size,
		      uint32_t flags)
{
	struct ioasid_dma_unmap u = {
		.argsz = sizeof(u),
		.flags = flags,
		.ioasid = (uint32_t)ioasid,
		.iova = iova,
		.size = size,
	};

	if (ioctl(ioasid_fd, IOASID_UNMAP_DMA, &u))
		fail("IOASID_UNMAP_DMA on %d", ioasid);
	return u.size;
}

static void attach(const struct edu *d, int ioasid, int detach)
{
	struct vfio_attach_ioasid a = {
		.argsz = sizeof(a),
		.ioasid = (uint32_t)ioasid,
	};

	if (ioctl(d->fd, detach ? VFIO_DETACH_IOASID : VFIO_ATTACH_IOASID, &a))
		fail("%s %s IOASID %d", detach ? "VFIO_DETACH_IOASID" : "VFIO_ATTACH_IOASID",
		     d->name, ioasid);
}

/*
 * Fill guest pages `a` and `b` with 0x55, make `d` write its buffer (which
 * holds `pattern`) to `iova`, and say which page received it: 'a', 'b',
 * '-' for neither; fails if a page holds anything else.
 */
static char write_lands(const struct edu *d, unsigned char *mem, uint32_t iova,
			const unsigned char *pattern, size_t a, size_t b)
{
	static unsigned char untouched[LENGTH];
	char got = '-';
	size_t pages[2] = { a, b };
	int i;

	memset(untouched, 0x55, LENGTH);
	memset(mem + a, 0x55, PAGE);
	memset(mem + b, 0x55, PAGE);
	edu_dma(d, EDU_BUFFER, iova, EDU_DMA_TO_RAM);
	for (i = 0; i < 2; i++) {
		if (!memcmp(mem + pages[i], pattern, LENGTH)) {
			if (got != '-') {
				errno = 0;
				fail("both pages received the bytes");
			}
			got = i ? 'b' : 'a';
		} else if (memcmp(mem + pages[i], untouched, LENGTH)) {
			errno = 0;
			fail("guest page %#zx holds unexpected bytes", pages[i]);
		}
	}
	return got;
}

static void random_bytes(unsigned char *p, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		p[i] = (unsigned char)rand();
}

int main(int argc, char **argv)
{
	struct edu dev1 = { .name = "dev1" }, dev2 = { .name = "dev2" };
	unsigned char pattern[LENGTH], pattern1[LENGTH];
	unsigned char *mem;
	int ioasid_fd, gpa, giova, memfd;
	uint64_t n;
	char got;

	if (argc != 3 || argv[1][0] != '/' || argv[2][0] != '/') {
		fprintf(stderr, "usage: flow_5_3 /dev/vfio/devices/devN /dev/vfio/devices/devM\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("RFC flow 5.3 with dev1 = %s, dev2 = %s\n", argv[1], argv[2]);
	srand((unsigned int)getpid());

	errno = 0;
	dev1.fd = open(argv[1], O_RDWR | O_CLOEXEC);
	dev2.fd = open(argv[2], O_RDWR | O_CLOEXEC);
	if (dev1.fd < 0 || dev2.fd < 0)
		fail("open the device nodes");
	ioasid_fd = open("/dev/ioasid", O_RDWR | O_CLOEXEC);
	if (ioasid_fd < 0)
		fail("open /dev/ioasid");
	if (ioctl(dev1.fd, VFIO_BIND_IOASID_FD, ioasid_fd) ||
	    ioctl(dev2.fd, VFIO_BIND_IOASID_FD, ioasid_fd))
		fail("VFIO_BIND_IOASID_FD");
	step("opened both device nodes and /dev/ioasid; bound both devices to it");

	gpa = ioctl(ioasid_fd, IOASID_ALLOC);
	if (gpa <= 0)
		fail("IOASID_ALLOC returned %d", gpa);
	attach(&dev1, gpa, 0);
	attach(&dev2, gpa, 0);
	step("IOASID_ALLOC: gpa = %d; both devices attached to it", gpa);

	/* Guest memory: shared, so that the daemon can map it. */
	memfd = memfd_create("flow_5_3", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, GUEST_SIZE))
		fail("memfd_create/ftruncate");
	mem = mmap(NULL, GUEST_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		fail("mmap");
	/* GPA 0x1000 is mapped on its own, so it can be unmapped alone. */
	map(ioasid_fd, gpa, 0, (uintptr_t)mem, PAGE, "GPA 0");
	map(ioasid_fd, gpa, PAGE, (uintptr_t)mem + PAGE, PAGE, "GPA 0x1000");
	map(ioasid_fd, gpa, 2 * PAGE, (uintptr_t)mem + 2 * PAGE, GUEST_SIZE - 2 * PAGE,
	    "GPA 0x2000..");
	step("IOASID_MAP_DMA: %d KiB of guest memory at GPA 0 of gpa", GUEST_SIZE / 1024);

	giova = ioctl(ioasid_fd, IOASID_CREATE_NESTING, gpa);
	if (giova <= 0)
		fail("IOASID_CREATE_NESTING returned %d", giova);
	attach(&dev2, giova, 0);
	map(ioasid_fd, giova, GIOVA, 0x1000, PAGE, "GIOVA 0x2000 -> GPA 0x1000");
	map(ioasid_fd, giova, GIOVA_SRC, 0x5000, PAGE, "GIOVA 0x3000 -> GPA 0x5000");
	step("IOASID_CREATE_NESTING: giova = %d, child of gpa; dev2 attached to it; "
	     "GIOVA %#x -> GPA 0x1000, GIOVA %#x -> GPA 0x5000", giova, GIOVA, GIOVA_SRC);

	edu_setup(&dev1);
	edu_setup(&dev2);

	random_bytes(pattern, LENGTH);
	memcpy(mem + 0x5000, pattern, LENGTH);
	edu_dma(&dev2, GIOVA_SRC, EDU_BUFFER, 0);
	got = write_lands(&dev2, mem, GIOVA, pattern, 0x1000, 0x2000);
	if (got != 'a') {
		errno = 0;
		fail("dev2's DMA at GIOVA %#x reached %s, not GPA 0x1000", GIOVA,
		     got == 'b' ? "GPA 0x2000" : "neither page");
	}
	step("dev2's DMA at GIOVA 0x2000 reached GPA 0x1000 (read at GIOVA 0x3000 = GPA "
	     "0x5000, written through the child)");

	random_bytes(pattern1, LENGTH);
	memcpy(mem + 0x8000, pattern1, LENGTH);
	edu_dma(&dev1, 0x8000, EDU_BUFFER, 0);
	got = write_lands(&dev1, mem, GIOVA, pattern1, 0x1000, 0x2000);
	if (got != 'b') {
		errno = 0;
		fail("dev1's DMA at 0x2000 reached %s, not GPA 0x2000",
		     got == 'a' ? "GPA 0x1000" : "neither page");
	}
	step("dev1's DMA at 0x2000 reached GPA 0x2000: dev1 is on gpa only");

	n = unmap(ioasid_fd, gpa, 0x1000, PAGE, 0);
	if (n != PAGE) {
		errno = 0;
		fail("gpa unmapped %llu bytes, not one page", (unsigned long long)n);
	}
	got = write_lands(&dev2, mem, GIOVA, pattern, 0x1000, 0x2000);
	if (got != '-') {
		errno = 0;
		fail("dev2's DMA at GIOVA %#x still reached guest page %s", GIOVA,
		     got == 'a' ? "0x1000" : "0x2000");
	}
	step("after the parent's unmap, dev2's DMA is blocked: GPA 0x1000 left gpa");

	/* Tear down in the RFC's order: the child first. */
	unmap(ioasid_fd, giova, 0, 0, IOASID_DMA_UNMAP_FLAG_ALL);
	attach(&dev2, giova, 1);
	if (ioctl(ioasid_fd, IOASID_FREE, giova))
		fail("IOASID_FREE giova");
	attach(&dev2, gpa, 1);
	attach(&dev1, gpa, 1);
	unmap(ioasid_fd, gpa, 0, 0, IOASID_DMA_UNMAP_FLAG_ALL);
	if (ioctl(ioasid_fd, IOASID_FREE, gpa))
		fail("IOASID_FREE gpa");
	if (ioctl(dev1.fd, VFIO_UNBIND_IOASID_FD, ioasid_fd) ||
	    ioctl(dev2.fd, VFIO_UNBIND_IOASID_FD, ioasid_fd))
		fail("VFIO_UNBIND_IOASID_FD");
	step("cleaned up: detached and freed giova, then gpa; unbound both devices");
	munmap(mem, GUEST_SIZE);
	close(memfd);
	close(ioasid_fd);
	close(dev1.fd);
	close(dev2.fd);
	printf("flow_5_3: PASS\n");
	return 0;
}
