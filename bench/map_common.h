/*
 * What the map benchmarks (map_rate.c, map_scale.c) share: the two kinds
 * of target, checked map and unmap calls, client buffers, medians and the
 * memory figures of a process.
 *
 * A target is either
 *   daemon:NODE    bind the device node NODE (/dev/vfio/devices/devN) to a
 *                  new /dev/ioasid file, allocate an IOASID, attach; then
 *                  IOASID_MAP_DMA / IOASID_UNMAP_DMA on it;
 *   direct:GROUP   a new container (/dev/vfio/vfio) holding the group file
 *                  GROUP (/dev/vfio/N), type1v2; then VFIO_IOMMU_MAP_DMA /
 *                  VFIO_IOMMU_UNMAP_DMA on it, issued by this process.
 * Client memory is a memfd mapped MAP_SHARED (the daemon aliases it and
 * pins it itself), or anonymous MAP_PRIVATE memory (private_memory: the
 * daemon has this process's own thread pin it, issue 14).
 */
#ifndef MAP_COMMON_H
#define MAP_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <linux/ioasid.h>
#include <linux/vfio.h>

#define PAGE 4096ULL
/* Where the measured mappings go (clear of the x86 MSI window). */
#define IOVA_PAIRS 0x40000000ULL
#define IOVA_SCALE 0x100000000ULL
#define IOVA_CLIENTS 0x200000000ULL

/* Print the message and strerror(errno), exit 1. */
static inline void die(const char *fmt, ...)
	__attribute__((format(printf, 1, 2), noreturn));
static inline void die(const char *fmt, ...)
{
	int err = errno;
	va_list ap;

	fprintf(stderr, "%s: ", program_invocation_short_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, ": %s\n", strerror(err));
	exit(1);
}

static inline double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct target {
	int daemon;	/* 1: through /dev/ioasid, 0: legacy container */
	int fd;		/* ioasid file or container */
	int dev;	/* device node (daemon) or group file (direct) */
	__u32 ioasid;
};

static inline void open_target(struct target *t, const char *spec)
{
	if (!strncmp(spec, "daemon:", 7)) {
		struct vfio_attach_ioasid at = { .argsz = sizeof(at) };
		int id;

		t->daemon = 1;
		t->dev = open(spec + 7, O_RDWR | O_CLOEXEC);
		if (t->dev < 0)
			die("open %s", spec + 7);
		t->fd = open("/dev/ioasid", O_RDWR | O_CLOEXEC);
		if (t->fd < 0)
			die("open /dev/ioasid");
		if (ioctl(t->dev, VFIO_BIND_IOASID_FD, t->fd))
			die("VFIO_BIND_IOASID_FD");
		id = ioctl(t->fd, IOASID_ALLOC);
		if (id <= 0)
			die("IOASID_ALLOC");
		t->ioasid = id;
		at.ioasid = id;
		if (ioctl(t->dev, VFIO_ATTACH_IOASID, &at))
			die("VFIO_ATTACH_IOASID");
	} else if (!strncmp(spec, "direct:", 7)) {
		struct vfio_group_status st = { .argsz = sizeof(st) };

		t->daemon = 0;
		t->fd = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
		if (t->fd < 0)
			die("open /dev/vfio/vfio");
		t->dev = open(spec + 7, O_RDWR | O_CLOEXEC);
		if (t->dev < 0)
			die("open %s", spec + 7);
		if (ioctl(t->dev, VFIO_GROUP_GET_STATUS, &st) ||
		    !(st.flags & VFIO_GROUP_FLAGS_VIABLE))
			die("group %s not viable", spec + 7);
		if (ioctl(t->dev, VFIO_GROUP_SET_CONTAINER, &t->fd))
			die("VFIO_GROUP_SET_CONTAINER");
		if (ioctl(t->fd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
			die("VFIO_SET_IOMMU");
	} else {
		errno = EINVAL;
		die("target %s is neither daemon:NODE nor direct:GROUP", spec);
	}
}

static inline void map(const struct target *t, void *vaddr, __u64 iova,
		       __u64 size)
{
	int ret;

	if (t->daemon) {
		struct ioasid_dma_map m = {
			.argsz = sizeof(m),
			.flags = IOASID_DMA_MAP_FLAG_READ |
				 IOASID_DMA_MAP_FLAG_WRITE,
			.ioasid = t->ioasid,
			.vaddr = (uintptr_t)vaddr,
			.iova = iova,
			.size = size,
		};
		ret = ioctl(t->fd, IOASID_MAP_DMA, &m);
	} else {
		struct vfio_iommu_type1_dma_map m = {
			.argsz = sizeof(m),
			.flags = VFIO_DMA_MAP_FLAG_READ |
				 VFIO_DMA_MAP_FLAG_WRITE,
			.vaddr = (uintptr_t)vaddr,
			.iova = iova,
			.size = size,
		};
		ret = ioctl(t->fd, VFIO_IOMMU_MAP_DMA, &m);
	}
	if (ret)
		die("map iova %#llx size %#llx", (unsigned long long)iova,
		    (unsigned long long)size);
}

static inline void unmap(const struct target *t, __u64 iova, __u64 size)
{
	__u64 done;
	int ret;

	if (t->daemon) {
		struct ioasid_dma_unmap u = { .argsz = sizeof(u),
					      .ioasid = t->ioasid,
					      .iova = iova,
					      .size = size };
		ret = ioctl(t->fd, IOASID_UNMAP_DMA, &u);
		done = u.size;
	} else {
		struct vfio_iommu_type1_dma_unmap u = { .argsz = sizeof(u),
							.iova = iova,
							.size = size };
		ret = ioctl(t->fd, VFIO_IOMMU_UNMAP_DMA, &u);
		done = u.size;
	}
	if (ret)
		die("unmap iova %#llx size %#llx", (unsigned long long)iova,
		    (unsigned long long)size);
	if (done != size) {
		errno = EIO;
		die("unmap iova %#llx: %llu bytes unmapped, expected %llu",
		    (unsigned long long)iova, (unsigned long long)done,
		    (unsigned long long)size);
	}
}

/* IOASID_REGISTER_MEMORY of [p, p + size) on a daemon target. */
static inline void register_memory(const struct target *t, void *p,
				   __u64 size)
{
	struct ioasid_register_memory r = { .argsz = sizeof(r),
					    .vaddr = (uintptr_t)p,
					    .size = size };

	if (!t->daemon) {
		errno = EINVAL;
		die("only a daemon target registers memory");
	}
	if (ioctl(t->fd, IOASID_REGISTER_MEMORY, &r))
		die("IOASID_REGISTER_MEMORY of %llu bytes",
		    (unsigned long long)size);
}

/* Client memory: a memfd of `size` bytes mapped MAP_SHARED. */
struct buf {
	char *p;
	int fd;
	__u64 size;
};

/* A new memfd mapping, its pages populated beforehand (populate) or left
 * for the first pin to allocate (as a VMM's guest RAM before the guest
 * runs). A new memfd is a new inode: the daemon has never seen it. */
static inline void buf_new(struct buf *b, __u64 size, int populate)
{
	b->fd = memfd_create("map_rate", MFD_CLOEXEC);
	if (b->fd < 0 || ftruncate(b->fd, size))
		die("memfd of %llu bytes", (unsigned long long)size);
	b->p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		    MAP_SHARED | (populate ? MAP_POPULATE : 0), b->fd, 0);
	if (b->p == MAP_FAILED)
		die("mmap memfd of %llu bytes", (unsigned long long)size);
	b->size = size;
}

/* Unmap it and free its pages. The daemon keeps a released alias idle
 * (up to 64 of them) with the memfd open; emptying the file frees the
 * pages whoever still maps it, so memory does not pile up. */
static inline void buf_free(struct buf *b)
{
	if (munmap(b->p, b->size) || ftruncate(b->fd, 0) || close(b->fd))
		die("freeing a memfd buffer");
}

/* A populated MAP_SHARED memfd mapping of `size` bytes, kept for good. */
static inline void *shared_memory(__u64 size)
{
	struct buf b;

	buf_new(&b, size, 1);
	close(b.fd);
	return b.p;
}

/* A populated anonymous MAP_PRIVATE mapping of `size` bytes, kept for
 * good: memory only this process's own thread can have pinned. */
static inline void *private_memory(__u64 size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	if (p == MAP_FAILED)
		die("anonymous mmap of %llu bytes", (unsigned long long)size);
	return p;
}

static inline int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* The median of v[0..n) (sorts v); 0 for none. */
static inline double median(double *v, long n)
{
	if (n <= 0)
		return 0;
	qsort(v, n, sizeof(v[0]), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* A growable list of samples. */
struct samples {
	double *v;
	long n, cap;
};

static inline void push(struct samples *s, double x)
{
	if (s->n == s->cap) {
		s->cap = s->cap ? 2 * s->cap : 1024;
		s->v = realloc(s->v, s->cap * sizeof(double));
		if (!s->v)
			die("realloc");
	}
	s->v[s->n++] = x;
}

/* A "Name:   N kB" field of /proc/PID/status (or of /proc/meminfo when
 * pid is 0); -1 if absent or pid < 0. */
static inline long kib_field(long pid, const char *name)
{
	char path[64], line[256];
	size_t len = strlen(name);
	long kib = -1;
	FILE *f;

	if (pid < 0)
		return -1;
	if (pid)
		snprintf(path, sizeof(path), "/proc/%ld/status", pid);
	else
		snprintf(path, sizeof(path), "/proc/meminfo");
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, name, len) && line[len] == ':') {
			kib = atol(line + len + 1);
			break;
		}
	fclose(f);
	return kib;
}

#endif
