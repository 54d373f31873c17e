/* How a private-memory test client asks for a DMA map and proves it: the
 * adapter for the example daemon of issue 14 (vfio-legacy/examples/
 * inject_dma.rs, node /dev/inject-dma or $INJECT_NODE). To point the same
 * checks (tests/c/private_dma.c) at /dev/ioasid or an iommufd node, write
 * these functions for that node: open, map (also as a raw request), unmap, a
 * DMA copy from one IOVA to another through an edu device, and a map
 * variant that the daemon holds (kill tests; may answer -ENOTSUP
 * elsewhere). tests/c/private_map_ioasid.h is the one for /dev/ioasid. */
#ifndef PRIVATE_MAP_H
#define PRIVATE_MAP_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>

struct inj_map {
	uint64_t iova, vaddr, size;
	uint32_t flags, pad;
};
struct inj_unmap {
	uint64_t iova, size;
};
struct inj_dma {
	uint64_t src, dst;
	uint32_t len, pad;
};
#define INJ_MAP _IOW('J', 1, struct inj_map)
#define INJ_UNMAP _IOW('J', 2, struct inj_unmap)
#define INJ_DMA _IOW('J', 3, struct inj_dma)
#define INJ_HOLD 1u

static inline int target_open(void)
{
	const char *node = getenv("INJECT_NODE");
	return open(node ? node : "/dev/inject-dma", O_RDWR | O_CLOEXEC);
}

/* 0, or -errno as the kernel (VFIO_IOMMU_MAP_DMA in the client) answered. */
static inline int target_map_flags(int fd, uint64_t iova, void *va, uint64_t size,
				   uint32_t flags)
{
	struct inj_map m = { .iova = iova, .vaddr = (uintptr_t)va, .size = size, .flags = flags };
	return ioctl(fd, INJ_MAP, &m) < 0 ? -errno : 0;
}

static inline int target_map(int fd, uint64_t iova, void *va, uint64_t size)
{
	return target_map_flags(fd, iova, va, size, 0);
}

static inline int target_map_held(int fd, uint64_t iova, void *va, uint64_t size)
{
	return target_map_flags(fd, iova, va, size, INJ_HOLD);
}

static inline int target_unmap(int fd, uint64_t iova, uint64_t size)
{
	struct inj_unmap u = { .iova = iova, .size = size };
	return ioctl(fd, INJ_UNMAP, &u) < 0 ? -errno : 0;
}

/* The argument and number of a raw map ioctl (for a caller that issues it
 * itself), in static storage. */
static struct inj_map target_raw_map;
static inline void *target_map_arg(uint64_t iova, void *va, uint64_t size, unsigned long *cmd)
{
	target_raw_map = (struct inj_map){ .iova = iova, .vaddr = (uintptr_t)va, .size = size };
	*cmd = INJ_MAP;
	return &target_raw_map;
}

/* The device copies len bytes from IOVA src to IOVA dst. */
static inline int target_dma(int fd, uint64_t src, uint64_t dst, uint32_t len)
{
	struct inj_dma d = { .src = src, .dst = dst, .len = len };
	return ioctl(fd, INJ_DMA, &d) < 0 ? -errno : 0;
}

#endif
