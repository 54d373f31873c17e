/*
 * ioasid_basic: a plain C client of /dev/ioasid, built against the ABI
 * header <linux/ioasid.h> only, with no device involved.
 *
 * Checks a subset of the ABI as a C program sees it: extensions, ALLOC
 * numbering, FREE, GET_INFO of an IOASID with no device, ENODEV before any
 * attach, the extensible-struct rules (argsz, tail, flags, reserved), a bad
 * pointer, an unknown ioctl, the daemon-private command, and that IOASIDs
 * are per open file.
 *
 * Usage: ioasid_basic [/dev/ioasid]
 * Prints one line per check ("ok: ..." or "FAIL: ..."); exits 0 when every
 * check passed, 1 otherwise, 2 if the node cannot be opened.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <linux/ioasid.h>

static int failures;

/* Record one check: `cond` true is a pass. */
static void check(int cond, const char *what)
{
	printf("%s: %s\n", cond ? "ok" : "FAIL", what);
	if (!cond)
		failures++;
}

/* An ioctl expected to fail with `want`; returns whether it did. */
static int fails_with(int fd, unsigned long req, void *arg, int want)
{
	int ret = ioctl(fd, req, arg);

	if (ret != -1) {
		printf("       expected %s, got return value %d\n",
		       strerror(want), ret);
		return 0;
	}
	if (errno != want) {
		printf("       expected %s, got %s\n", strerror(want),
		       strerror(errno));
		return 0;
	}
	return 1;
}

int main(int argc, char **argv)
{
	const char *path = argc > 1 ? argv[1] : "/dev/ioasid";
	int fd = open(path, O_RDWR | O_CLOEXEC);
	int other;
	int a, b;

	if (fd < 0) {
		fprintf(stderr, "ioasid_basic: open %s: %s\n", path,
			strerror(errno));
		return 2;
	}
	printf("opened %s\n", path);

	/* Extensions: DMA mapping and memory registration are provided; the
	 * two that legacy VFIO can never do are not; an unknown id is 0. */
	check(ioctl(fd, IOASID_CHECK_EXTENSION, IOASID_EXT_TYPE1V2_DMA) == 1,
	      "IOASID_EXT_TYPE1V2_DMA is 1");
	check(ioctl(fd, IOASID_CHECK_EXTENSION, IOASID_EXT_REGISTER_MEMORY) == 1,
	      "IOASID_EXT_REGISTER_MEMORY is 1");
	check(ioctl(fd, IOASID_CHECK_EXTENSION, IOASID_EXT_NESTING_HARDWARE) == 0,
	      "IOASID_EXT_NESTING_HARDWARE is 0");
	check(ioctl(fd, IOASID_CHECK_EXTENSION, IOASID_EXT_PASID_DMA_ROUTING) == 0,
	      "IOASID_EXT_PASID_DMA_ROUTING is 0");
	check(ioctl(fd, IOASID_CHECK_EXTENSION, 12345) == 0,
	      "an unknown extension id is 0");

	/* ALLOC with two arguments, the way the RFC writes it. */
	a = ioctl(fd, IOASID_ALLOC);
	b = ioctl(fd, IOASID_ALLOC);
	printf("       IOASID_ALLOC returned %d, then %d\n", a, b);
	check(a == 1 && b == 2, "the first two IOASIDs of a new file are 1 and 2");

	{
		struct ioasid_info info;

		memset(&info, 0, sizeof(info));
		info.argsz = sizeof(info);
		info.flags = 0xffffffff; /* output only: ignored on input */
		info.ioasid = a;
		check(ioctl(fd, IOASID_GET_INFO, &info) == 0 && info.flags == 0 &&
			      info.pgsize_bitmap == 0 && info.cap_offset == 0 &&
			      info.argsz == sizeof(info),
		      "GET_INFO of an IOASID with no device: empty");
	}

	{
		struct ioasid_dma_map map;
		struct ioasid_dma_unmap unmap;

		memset(&map, 0, sizeof(map));
		map.argsz = sizeof(map);
		map.flags = IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE;
		map.ioasid = a;
		map.vaddr = (uintptr_t)&map & ~(uint64_t)4095;
		map.iova = 0;
		map.size = 4096;
		check(fails_with(fd, IOASID_MAP_DMA, &map, ENODEV),
		      "MAP_DMA before any attach: ENODEV");

		memset(&unmap, 0, sizeof(unmap));
		unmap.argsz = sizeof(unmap);
		unmap.ioasid = a;
		unmap.size = 4096;
		check(fails_with(fd, IOASID_UNMAP_DMA, &unmap, ENODEV),
		      "UNMAP_DMA before any attach: ENODEV");

		map.ioasid = 99;
		check(fails_with(fd, IOASID_MAP_DMA, &map, ENOENT),
		      "MAP_DMA on an IOASID never allocated: ENOENT");
		map.ioasid = a;

		/* Extensible-struct rules. */
		map.argsz = sizeof(map) - 1;
		check(fails_with(fd, IOASID_MAP_DMA, &map, EINVAL),
		      "MAP_DMA with argsz one below the struct: EINVAL");
		map.argsz = sizeof(map);
		map.flags = 1u << 7;
		check(fails_with(fd, IOASID_MAP_DMA, &map, EINVAL),
		      "MAP_DMA with an unknown flag: EINVAL");
		map.flags = IOASID_DMA_MAP_FLAG_READ;
		map.__reserved = 1;
		check(fails_with(fd, IOASID_MAP_DMA, &map, EINVAL),
		      "MAP_DMA with __reserved not zero: EINVAL");
		map.__reserved = 0;
	}

	{
		/* A struct followed by bytes the header does not know. */
		struct {
			struct ioasid_dma_unmap u;
			uint64_t tail;
		} big;

		memset(&big, 0, sizeof(big));
		big.u.argsz = sizeof(big);
		big.u.ioasid = a;
		big.u.size = 4096;
		check(fails_with(fd, IOASID_UNMAP_DMA, &big, ENODEV),
		      "UNMAP_DMA with a zero tail passes the struct checks (ENODEV)");
		big.tail = 1;
		check(fails_with(fd, IOASID_UNMAP_DMA, &big, E2BIG),
		      "UNMAP_DMA with a non-zero tail: E2BIG");
	}

	check(fails_with(fd, IOASID_GET_INFO, (void *)8, EFAULT),
	      "GET_INFO with a pointer to nothing: EFAULT");
	check(fails_with(fd, _IO(IOASID_TYPE, IOASID_BASE + 40), NULL, ENOTTY),
	      "an unknown ioctl number: ENOTTY");
	check(fails_with(fd, IOASID_DAEMON_IDENTIFY, NULL, EPERM),
	      "IOASID_DAEMON_IDENTIFY from a client: EPERM");

	/* IOASIDs belong to the open file. */
	other = open(path, O_RDWR | O_CLOEXEC);
	check(other >= 0, "a second open of the node");
	if (other >= 0) {
		check(fails_with(other, (unsigned long)IOASID_FREE, (void *)(long)a,
				 ENOENT),
		      "the second file cannot free the first file's IOASID 1");
		check(ioctl(other, IOASID_ALLOC) == 1,
		      "the second file's own first IOASID is 1");
		close(other);
	}

	check(ioctl(fd, IOASID_FREE, b) == 0, "FREE of IOASID 2");
	check(fails_with(fd, (unsigned long)IOASID_FREE, (void *)(long)b, ENOENT),
	      "FREE of IOASID 2 again: ENOENT");
	check(ioctl(fd, IOASID_FREE, a) == 0, "FREE of IOASID 1");
	close(fd);

	if (failures) {
		printf("ioasid_basic: %d check(s) FAILED\n", failures);
		return 1;
	}
	printf("ioasid_basic: PASS\n");
	return 0;
}
