/* The adapter of tests/c/private_dma.c for the daemon itself: /dev/ioasid
 * ($IOASID_NODE) and one edu device node ($PRIVATE_DEVICE, default
 * /dev/vfio/devices/dev1), bound to the ioasid file and RID-attached to one
 * IOASID. Maps are IOASID_MAP_DMA (private memory is pinned by this very
 * thread, stopped by the daemon on its way out of the ioctl); the DMA copy
 * is driven through the device node's BAR0. The daemon cannot hold a map
 * (kill tests run against the example daemon): -ENOTSUP. */
#ifndef PRIVATE_MAP_IOASID_H
#define PRIVATE_MAP_IOASID_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>

#include <linux/vfio.h>
#include <linux/ioasid.h>

#include "edu.h"

static struct edu target_edu;
static int target_ioasid;

/* The ioasid file, with the device bound and attached to a new IOASID. */
static inline int target_open(void)
{
	const char *ioasid_node = getenv("IOASID_NODE");
	const char *device = getenv("PRIVATE_DEVICE");
	struct vfio_attach_ioasid attach = { .argsz = sizeof(attach) };
	int fd;

	edu_program = "private_dma";
	fd = open(ioasid_node ? ioasid_node : "/dev/ioasid", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -1;
	edu_open(&target_edu, device ? device : "/dev/vfio/devices/dev1");
	if (ioctl(target_edu.fd, VFIO_BIND_IOASID_FD, fd))
		edu_fail("VFIO_BIND_IOASID_FD");
	target_ioasid = ioctl(fd, IOASID_ALLOC);
	if (target_ioasid <= 0)
		edu_fail("IOASID_ALLOC");
	attach.ioasid = target_ioasid;
	if (ioctl(target_edu.fd, VFIO_ATTACH_IOASID, &attach))
		edu_fail("VFIO_ATTACH_IOASID");
	edu_enable(&target_edu);
	return fd;
}

/* 0, or -errno as the map answered. */
static inline int target_map(int fd, uint64_t iova, void *va, uint64_t size)
{
	struct ioasid_dma_map m = {
		.argsz = sizeof(m),
		.flags = IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE,
		.ioasid = (uint32_t)target_ioasid,
		.vaddr = (uintptr_t)va,
		.iova = iova,
		.size = size,
	};
	return ioctl(fd, IOASID_MAP_DMA, &m) < 0 ? -errno : 0;
}

static struct ioasid_dma_map target_raw_map;
static inline void *target_map_arg(uint64_t iova, void *va, uint64_t size, unsigned long *cmd)
{
	target_raw_map = (struct ioasid_dma_map){
		.argsz = sizeof(target_raw_map),
		.flags = IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE,
		.ioasid = (uint32_t)target_ioasid,
		.vaddr = (uintptr_t)va,
		.iova = iova,
		.size = size,
	};
	*cmd = IOASID_MAP_DMA;
	return &target_raw_map;
}

static inline int target_map_held(int fd, uint64_t iova, void *va, uint64_t size)
{
	(void)fd, (void)iova, (void)va, (void)size;
	return -ENOTSUP;
}

static inline int target_unmap(int fd, uint64_t iova, uint64_t size)
{
	struct ioasid_dma_unmap u = {
		.argsz = sizeof(u),
		.ioasid = (uint32_t)target_ioasid,
		.iova = iova,
		.size = size,
	};
	return ioctl(fd, IOASID_UNMAP_DMA, &u) < 0 ? -errno : 0;
}

/* The device copies EDU_LENGTH bytes from IOVA src to IOVA dst. */
static inline int target_dma(int fd, uint64_t src, uint64_t dst, uint32_t len)
{
	(void)fd;
	if (len != EDU_LENGTH)
		return -EINVAL;
	edu_dma(&target_edu, (uint32_t)src, EDU_BUFFER, 0);
	edu_dma(&target_edu, EDU_BUFFER, (uint32_t)dst, EDU_DMA_TO_RAM);
	return 0;
}

#endif
