/*
 * flow_5_1: the RFC's flow 5.1 ("a device assigned to user space, one I/O
 * address space") written as an ordinary VFIO application would write it,
 * then proved with QEMU's edu device: a DMA from memory to the device and
 * back, through the IOMMU, and the device's completion interrupt (MSI)
 * delivered to an eventfd.
 *
 * Usage: flow_5_1 [/dev/vfio/devices/devN]   (default dev1)
 * Prints each step in plain words. Exit status 0: every step worked;
 * 1: a step failed (the output says which); 2: usage.
 *
 * Only the header <linux/ioasid.h> (the ABI) and <linux/vfio.h> (region,
 * interrupt and device-info structs, unchanged from legacy VFIO) are used.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <linux/vfio.h>
#include <linux/ioasid.h>

/* The edu device (QEMU hw/misc/edu.c), BAR0 registers. */
#define EDU_ID			0x00
#define EDU_ID_VALUE		0x010000edu
#define EDU_IRQ_STATUS		0x24
#define EDU_IRQ_ACK		0x64
#define EDU_DMA_SRC		0x80
#define EDU_DMA_DST		0x88
#define EDU_DMA_COUNT		0x90
#define EDU_DMA_CMD		0x98
#define EDU_DMA_START		0x1
#define EDU_DMA_TO_RAM		0x2	/* direction: device buffer -> memory */
#define EDU_DMA_IRQ		0x4	/* raise the DMA interrupt when done */
#define EDU_IRQ_DMA		0x100	/* the DMA bit of the interrupt status */
#define EDU_BUFFER		0x40000	/* the device's own 4 KiB buffer */

#define PAGE			4096
/* IOVAs below 256 MiB (the edu's 28-bit DMA mask). */
#define IOVA_BASE		0x100000
/* Shorter than the edu buffer: QEMU 7.2 aborts on exactly 4096 bytes. */
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

static void say(const char *fmt, ...)
{
	va_list ap;

	printf("    ");
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
	printf("\nflow_5_1: FAIL\n");
	exit(1);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A device region as vfio reports it: where it sits in the device file. */
struct region {
	uint64_t offset;
	uint64_t size;
};

static struct region region_info(int dev, unsigned int index)
{
	struct vfio_region_info info = { .argsz = sizeof(info), .index = index };
	struct region r;

	errno = 0;
	if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &info))
		fail("VFIO_DEVICE_GET_REGION_INFO(%u)", index);
	r.offset = info.offset;
	r.size = info.size;
	return r;
}

static uint32_t rd32(int dev, const struct region *r, uint64_t off)
{
	uint32_t v;

	errno = 0;
	if (pread(dev, &v, 4, r->offset + off) != 4)
		fail("reading 4 bytes at %#llx of a region", (unsigned long long)off);
	return v;
}

static void wr32(int dev, const struct region *r, uint64_t off, uint32_t v)
{
	errno = 0;
	if (pwrite(dev, &v, 4, r->offset + off) != 4)
		fail("writing 4 bytes at %#llx of a region", (unsigned long long)off);
}

/* One edu transfer; waits (bounded) until the device clears the start bit. */
static void edu_dma(int dev, const struct region *bar0, uint32_t src,
		    uint32_t dst, uint32_t cmd)
{
	uint64_t deadline;

	wr32(dev, bar0, EDU_DMA_SRC, src);
	wr32(dev, bar0, EDU_DMA_DST, dst);
	wr32(dev, bar0, EDU_DMA_COUNT, LENGTH);
	wr32(dev, bar0, EDU_DMA_CMD, EDU_DMA_START | cmd);
	deadline = now_ms() + WAIT_MS;
	while (rd32(dev, bar0, EDU_DMA_CMD) & EDU_DMA_START) {
		if (now_ms() > deadline) {
			errno = 0;
			fail("the device did not finish the transfer within %d ms",
			     WAIT_MS);
		}
		usleep(10000);
	}
}

/* Route the device's MSI vector 0 to `efd` (-1: tear the routing down). */
static int set_msi(int dev, int efd)
{
	char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *set = (struct vfio_irq_set *)buf;
	int32_t fd32 = efd;

	memset(buf, 0, sizeof(buf));
	set->argsz = sizeof(buf);
	set->index = VFIO_PCI_MSI_IRQ_INDEX;
	set->start = 0;
	if (efd >= 0) {
		set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
		set->count = 1;
		memcpy(set->data, &fd32, sizeof(fd32));
	} else {
		set->argsz = sizeof(*set);
		set->flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
		set->count = 0;
	}
	return ioctl(dev, VFIO_DEVICE_SET_IRQS, set);
}

int main(int argc, char **argv)
{
	const char *node = argc > 1 ? argv[1] : "/dev/vfio/devices/dev1";
	struct vfio_attach_ioasid attach = { .argsz = sizeof(attach) };
	struct ioasid_dma_map map = { .argsz = sizeof(map) };
	struct ioasid_dma_unmap unmap = { .argsz = sizeof(unmap) };
	struct vfio_device_info dinfo = { .argsz = sizeof(dinfo) };
	struct vfio_irq_info irq = { .argsz = sizeof(irq) };
	struct region bar0, config;
	unsigned char pattern[LENGTH];
	unsigned char *mem;
	uint16_t command;
	uint64_t count;
	struct pollfd pfd;
	int device, ioasid_fd, gpa, memfd, efd, ret;
	uint32_t status;
	size_t i;

	if (argc > 2 || (argc == 2 && argv[1][0] != '/')) {
		fprintf(stderr, "usage: flow_5_1 [/dev/vfio/devices/devN]\n");
		return 2;
	}
	printf("RFC flow 5.1 on %s\n", node);
	setvbuf(stdout, NULL, _IOLBF, 0);

	/* The flow, in the order the RFC writes it. */
	errno = 0;
	device = open(node, O_RDWR | O_CLOEXEC);
	if (device < 0)
		fail("open %s", node);
	step("opened the device node %s (fd %d)", node, device);

	ioasid_fd = open("/dev/ioasid", O_RDWR | O_CLOEXEC);
	if (ioasid_fd < 0)
		fail("open /dev/ioasid");
	step("opened /dev/ioasid (fd %d): this file will hold our I/O address spaces",
	     ioasid_fd);

	if (ioctl(device, VFIO_BIND_IOASID_FD, ioasid_fd))
		fail("VFIO_BIND_IOASID_FD");
	step("VFIO_BIND_IOASID_FD: the device now belongs to that ioasid file");

	gpa = ioctl(ioasid_fd, IOASID_ALLOC);
	if (gpa <= 0)
		fail("IOASID_ALLOC returned %d", gpa);
	step("IOASID_ALLOC: got I/O address space %d (empty so far)", gpa);

	attach.ioasid = gpa;
	if (ioctl(device, VFIO_ATTACH_IOASID, &attach))
		fail("VFIO_ATTACH_IOASID");
	step("VFIO_ATTACH_IOASID: the device's DMA is now translated by IOASID %d", gpa);

	/*
	 * The memory to map. The daemon serving /dev/ioasid is another
	 * process: it can only reach our pages if they are shared with it,
	 * i.e. MAP_SHARED and backed by a file (here a memfd). Private or
	 * ordinary anonymous memory (malloc) would be refused with EFAULT.
	 */
	memfd = memfd_create("flow_5_1", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, 2 * PAGE))
		fail("memfd_create/ftruncate");
	mem = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		fail("mmap");
	map.flags = IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE;
	map.ioasid = gpa;
	map.vaddr = (uintptr_t)mem;
	map.iova = IOVA_BASE;
	map.size = 2 * PAGE;
	if (ioctl(ioasid_fd, IOASID_MAP_DMA, &map))
		fail("IOASID_MAP_DMA");
	step("IOASID_MAP_DMA: two pages of shared memory (memfd, MAP_SHARED) at I/O "
	     "addresses %#x (page A) and %#x (page B)", IOVA_BASE, IOVA_BASE + PAGE);

	/* From here on, ordinary VFIO device access on the same file. */
	if (ioctl(device, VFIO_DEVICE_GET_INFO, &dinfo))
		fail("VFIO_DEVICE_GET_INFO");
	if (!(dinfo.flags & VFIO_DEVICE_FLAGS_PCI))
		fail("not a PCI device (flags %#x)", dinfo.flags);
	config = region_info(device, VFIO_PCI_CONFIG_REGION_INDEX);
	bar0 = region_info(device, VFIO_PCI_BAR0_REGION_INDEX);
	step("VFIO_DEVICE_GET_INFO/GET_REGION_INFO: a PCI device with %u regions; "
	     "config space at offset %#llx, BAR0 (%llu KiB) at offset %#llx",
	     dinfo.num_regions, (unsigned long long)config.offset,
	     (unsigned long long)bar0.size / 1024, (unsigned long long)bar0.offset);

	errno = 0;
	if (pread(device, &command, 2, config.offset + 4) != 2)
		fail("reading the PCI command register");
	command |= 0x6; /* memory space, bus master */
	if (pwrite(device, &command, 2, config.offset + 4) != 2)
		fail("writing the PCI command register");
	if (pread(device, &command, 2, config.offset + 4) != 2 || !(command & 0x4))
		fail("bus mastering did not stick (command %#x)", command);
	status = rd32(device, &bar0, EDU_ID);
	if (status != EDU_ID_VALUE)
		fail("BAR0 register 0 reads %#x, not the edu id %#x", status,
		     EDU_ID_VALUE);
	step("enabled bus mastering (PCI command %#06x); BAR0 says %#010x: an edu device",
	     command, status);

	/* The interrupt: MSI vector 0 -> an eventfd of ours. */
	irq.index = VFIO_PCI_MSI_IRQ_INDEX;
	if (ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, &irq))
		fail("VFIO_DEVICE_GET_IRQ_INFO(MSI)");
	if (irq.count < 1)
		fail("the device has no MSI vector");
	efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (efd < 0)
		fail("eventfd");
	if (set_msi(device, efd))
		fail("VFIO_DEVICE_SET_IRQS (MSI -> eventfd)");
	step("VFIO_DEVICE_SET_IRQS: the device's MSI now signals eventfd %d", efd);

	/* The proof: memory -> device -> memory, through the IOMMU. */
	srand((unsigned int)getpid());
	for (i = 0; i < LENGTH; i++)
		pattern[i] = (unsigned char)rand();
	memcpy(mem, pattern, LENGTH);
	memset(mem + PAGE, 0, PAGE);
	say("page A: %d random bytes starting %02x %02x %02x %02x; page B: zeros",
	    LENGTH, pattern[0], pattern[1], pattern[2], pattern[3]);
	edu_dma(device, &bar0, IOVA_BASE, EDU_BUFFER, 0);
	step("the device read %d bytes at I/O address %#x (page A) into its buffer",
	     LENGTH, IOVA_BASE);
	edu_dma(device, &bar0, EDU_BUFFER, IOVA_BASE + PAGE,
		EDU_DMA_TO_RAM | EDU_DMA_IRQ);
	step("the device wrote its buffer to I/O address %#x (page B), "
	     "asked to interrupt when done", IOVA_BASE + PAGE);

	if (memcmp(mem + PAGE, pattern, LENGTH) != 0) {
		for (i = 0; i < LENGTH && mem[PAGE + i] == pattern[i]; i++)
			;
		errno = 0;
		fail("page B differs from page A at byte %zu (%02x, want %02x)",
		     i, mem[PAGE + i], pattern[i]);
	}
	if (memcmp(mem, pattern, LENGTH) != 0) {
		errno = 0;
		fail("page A changed");
	}
	step("page B now holds exactly page A's %d bytes (%02x %02x %02x %02x ...): "
	     "they crossed the IOMMU twice", LENGTH, mem[PAGE], mem[PAGE + 1],
	     mem[PAGE + 2], mem[PAGE + 3]);

	pfd.fd = efd;
	pfd.events = POLLIN;
	ret = poll(&pfd, 1, WAIT_MS);
	if (ret < 0)
		fail("poll on the eventfd");
	if (ret == 0) {
		errno = 0;
		fail("no interrupt on the eventfd within %d ms", WAIT_MS);
	}
	if (read(efd, &count, sizeof(count)) != sizeof(count))
		fail("reading the eventfd");
	status = rd32(device, &bar0, EDU_IRQ_STATUS);
	if (!(status & EDU_IRQ_DMA)) {
		errno = 0;
		fail("interrupt arrived but the edu status %#x lacks the DMA bit", status);
	}
	wr32(device, &bar0, EDU_IRQ_ACK, status);
	step("the MSI arrived: eventfd counted %llu, edu interrupt status %#x "
	     "(DMA done), acknowledged", (unsigned long long)count, status);

	/* Tear down in reverse order. */
	if (set_msi(device, -1))
		fail("VFIO_DEVICE_SET_IRQS (MSI off)");
	close(efd);
	unmap.ioasid = gpa;
	unmap.iova = IOVA_BASE;
	unmap.size = 2 * PAGE;
	if (ioctl(ioasid_fd, IOASID_UNMAP_DMA, &unmap))
		fail("IOASID_UNMAP_DMA");
	if (unmap.size != 2 * PAGE) {
		errno = 0;
		fail("IOASID_UNMAP_DMA unmapped %llu bytes, not %d",
		     (unsigned long long)unmap.size, 2 * PAGE);
	}
	if (ioctl(device, VFIO_DETACH_IOASID, &attach))
		fail("VFIO_DETACH_IOASID");
	if (ioctl(ioasid_fd, IOASID_FREE, gpa))
		fail("IOASID_FREE");
	if (ioctl(device, VFIO_UNBIND_IOASID_FD, ioasid_fd))
		fail("VFIO_UNBIND_IOASID_FD");
	step("cleaned up: MSI off, unmapped %llu bytes, detached, freed IOASID %d, unbound",
	     (unsigned long long)unmap.size, gpa);
	munmap(mem, 2 * PAGE);
	close(memfd);
	close(ioasid_fd);
	close(device);
	printf("flow_5_1: PASS\n");
	return 0;
}
