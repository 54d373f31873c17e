/*
 * map_rate: DMA map/unmap benchmarks, through the daemon or directly on a
 * legacy VFIO container.
 *
 * A target is either
 *   daemon:NODE    bind the device node NODE (/dev/vfio/devices/devN) to a
 *                  new /dev/ioasid file, allocate an IOASID, attach; then
 *                  IOASID_MAP_DMA / IOASID_UNMAP_DMA on it;
 *   direct:GROUP   a new container (/dev/vfio/vfio) holding the group file
 *                  GROUP (/dev/vfio/N), type1v2; then VFIO_IOMMU_MAP_DMA /
 *                  VFIO_IOMMU_UNMAP_DMA on it, issued by this process.
 * Memory is always a memfd mapped MAP_SHARED and populated beforehand.
 *
 * Usage:
 *   map_rate pairs TARGET SIZE SECONDS REPS
 *       map + unmap one SIZE-byte mapping in a loop, REPS times for about
 *       SECONDS seconds (at least one pair). Prints
 *         result pairs SIZE median=PAIRS/S min= max= reps=
 *   map_rate versus DAEMON_TARGET DIRECT_TARGET NULL_NODE SIZE SECONDS
 *       one SIZE-byte memfd mapping, mapped + unmapped through the daemon,
 *       then directly, then one null ioctl (SCRATCH_NOP) on NULL_NODE (the
 *       CUSE library's scratchpad: a bare round trip), over and over for
 *       about SECONDS seconds (the order rotates each time). The same pages
 *       go through both paths, and a change of load on the host hits the
 *       three alike. Prints the median time of each:
 *         result versus SIZE daemon_us=D direct_us=X round_trip_us=R n=N
 *   map_rate scale TARGET LEVELS PAIRS [DAEMON_PID]
 *       LEVELS is a comma list of mapping counts (ascending, e.g.
 *       0,10000,100000). For each level: fill the IOASID/container with
 *       4 KiB mappings up to that count (timed), then time PAIRS extra
 *       map+unmap pairs of one more 4 KiB mapping, and read VmRSS of
 *       DAEMON_PID. At the end one unmap removes all of them (timed).
 *         level N fill_per_s=F pair_per_s=P rss_kib=R
 *         teardown N seconds=S
 *   map_rate clients TARGET NCLIENTS SECONDS
 *       NCLIENTS forked processes share the target (the ioasid file or the
 *       container) and each maps + unmaps its own 4 KiB page at its own
 *       IOVA for SECONDS seconds, all starting together. Prints
 *         client I pairs=N
 *         result clients N total_per_s=T min=MIN max=MAX
 * Every call is checked; exit status 1 with a message on the first error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/ioasid.h>
#include <linux/vfio.h>

#include "bench_ioctl.h"

#define PAGE 4096ULL
/* Where the measured mappings go (clear of the x86 MSI window). */
#define IOVA_PAIRS 0x40000000ULL
#define IOVA_SCALE 0x100000000ULL
#define IOVA_CLIENTS 0x200000000ULL

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
	int err = errno;
	va_list ap;

	fprintf(stderr, "map_rate: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, ": %s\n", strerror(err));
	exit(1);
}

static double now(void)
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

static void open_target(struct target *t, const char *spec)
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

static void map(const struct target *t, void *vaddr, __u64 iova, __u64 size)
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

static void unmap(const struct target *t, __u64 iova, __u64 size)
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

/* A populated MAP_SHARED memfd mapping of `size` bytes. */
static void *shared_memory(__u64 size)
{
	int fd = memfd_create("map_rate", MFD_CLOEXEC);
	void *p;

	if (fd < 0 || ftruncate(fd, size))
		die("memfd of %llu bytes", (unsigned long long)size);
	p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_POPULATE, fd, 0);
	if (p == MAP_FAILED)
		die("mmap memfd of %llu bytes", (unsigned long long)size);
	close(fd);
	return p;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static int run_pairs(const struct target *t, __u64 size, double seconds,
		     int reps)
{
	double rates[64];
	char *mem = shared_memory(size);
	int r;

	if (reps < 1 || reps > 64)
		return 2;
	/* Warm up once. */
	map(t, mem, IOVA_PAIRS, size);
	unmap(t, IOVA_PAIRS, size);
	for (r = 0; r < reps; r++) {
		double t0 = now(), el;
		long n = 0;

		do {
			map(t, mem, IOVA_PAIRS, size);
			unmap(t, IOVA_PAIRS, size);
			n++;
			el = now() - t0;
		} while (el < seconds);
		rates[r] = n / el;
		printf("rep pairs %llu %d %ld %.4f %.2f\n",
		       (unsigned long long)size, r, n, el, rates[r]);
	}
	qsort(rates, reps, sizeof(rates[0]), cmp_double);
	printf("result pairs %llu median=%.2f min=%.2f max=%.2f reps=%d\n",
	       (unsigned long long)size,
	       reps % 2 ? rates[reps / 2]
			: (rates[reps / 2 - 1] + rates[reps / 2]) / 2,
	       rates[0], rates[reps - 1], reps);
	return 0;
}

static double median(double *v, long n)
{
	qsort(v, n, sizeof(v[0]), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int run_versus(const struct target *daemon, const struct target *direct,
		      const char *null_node, __u64 size, double seconds)
{
	char *mem = shared_memory(size);
	long n = 0, cap = 1024, i;
	double *us[3], t0;
	int nul = open(null_node, O_RDWR | O_CLOEXEC);

	if (nul < 0)
		die("open %s", null_node);
	for (i = 0; i < 3; i++) {
		us[i] = malloc(cap * sizeof(double));
		if (!us[i])
			die("malloc");
	}
	/* Warm up each path once. */
	map(daemon, mem, IOVA_PAIRS, size);
	unmap(daemon, IOVA_PAIRS, size);
	map(direct, mem, IOVA_PAIRS, size);
	unmap(direct, IOVA_PAIRS, size);
	t0 = now();
	do {
		if (n == cap) {
			cap *= 2;
			for (i = 0; i < 3; i++) {
				us[i] = realloc(us[i], cap * sizeof(double));
				if (!us[i])
					die("realloc");
			}
		}
		for (i = 0; i < 3; i++) {
			int which = (n + i) % 3;
			double a = now();

			if (which == 2) {
				if (ioctl(nul, SCRATCH_NOP, 0) != 0)
					die("SCRATCH_NOP on %s", null_node);
			} else {
				const struct target *t = which ? direct : daemon;

				map(t, mem, IOVA_PAIRS, size);
				unmap(t, IOVA_PAIRS, size);
			}
			us[which][n] = (now() - a) * 1e6;
		}
		n++;
	} while (now() - t0 < seconds);
	printf("result versus %llu daemon_us=%.2f direct_us=%.2f round_trip_us=%.2f n=%ld\n",
	       (unsigned long long)size, median(us[0], n), median(us[1], n),
	       median(us[2], n), n);
	for (i = 0; i < 3; i++)
		free(us[i]);
	close(nul);
	return 0;
}

static long rss_kib(long pid)
{
	char path[64], line[256];
	long kib = -1;
	FILE *f;

	if (pid <= 0)
		return -1;
	snprintf(path, sizeof(path), "/proc/%ld/status", pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

#define SCALE_PAGES 256

static int run_scale(const struct target *t, char *levels, long pairs,
		     long pid)
{
	char *mem = shared_memory(SCALE_PAGES * PAGE);
	char *extra = shared_memory(PAGE);
	long have = 0, i;
	char *tok;

	for (tok = strtok(levels, ","); tok; tok = strtok(NULL, ",")) {
		long want = atol(tok);
		double t0 = now(), fill, pair;

		for (i = have; i < want; i++)
			map(t, mem + (i % SCALE_PAGES) * PAGE,
			    IOVA_SCALE + i * PAGE, PAGE);
		fill = now() - t0;
		t0 = now();
		for (i = 0; i < pairs; i++) {
			map(t, extra, IOVA_PAIRS, PAGE);
			unmap(t, IOVA_PAIRS, PAGE);
		}
		pair = now() - t0;
		printf("level %ld fill_per_s=%.1f pair_per_s=%.1f rss_kib=%ld\n",
		       want, want > have ? (want - have) / fill : 0.0,
		       pairs / pair, rss_kib(pid));
		fflush(stdout);
		have = want;
	}
	{
		double t0 = now();

		unmap(t, IOVA_SCALE, have * PAGE);
		printf("teardown %ld seconds=%.3f rss_kib=%ld\n", have,
		       now() - t0, rss_kib(pid));
	}
	return 0;
}

static int run_clients(const struct target *t, int n, double seconds)
{
	long *counts = mmap(NULL, n * sizeof(long), PROT_READ | PROT_WRITE,
			    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	int go[2], i, status, bad = 0;
	long lo = -1, hi = 0, sum = 0;

	if (counts == MAP_FAILED || pipe(go))
		die("clients set-up");
	for (i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (pid == 0) {
			char *mem = shared_memory(PAGE);
			__u64 iova = IOVA_CLIENTS + (__u64)i * 0x200000;
			double t0;
			char c;
			long k = 0;

			close(go[1]);
			if (read(go[0], &c, 1) != 0)
				_exit(3);
			t0 = now();
			do {
				map(t, mem, iova, PAGE);
				unmap(t, iova, PAGE);
				k++;
			} while (now() - t0 < seconds);
			counts[i] = k;
			_exit(0);
		}
	}
	close(go[0]);
	/* Let every child reach its read, then start them together. */
	usleep(300000);
	close(go[1]);
	for (i = 0; i < n; i++) {
		if (wait(&status) < 0 || !WIFEXITED(status) ||
		    WEXITSTATUS(status))
			bad++;
	}
	if (bad) {
		errno = EIO;
		die("%d client(s) failed", bad);
	}
	for (i = 0; i < n; i++) {
		printf("client %d pairs=%ld\n", i, counts[i]);
		sum += counts[i];
		if (lo < 0 || counts[i] < lo)
			lo = counts[i];
		if (counts[i] > hi)
			hi = counts[i];
	}
	printf("result clients %d total_per_s=%.1f min=%ld max=%ld\n", n,
	       sum / seconds, lo, hi);
	return 0;
}

int main(int argc, char **argv)
{
	struct rlimit unlimited = { RLIM_INFINITY, RLIM_INFINITY };
	struct target t;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 3) {
		fprintf(stderr, "usage: see the comment at the top of map_rate.c\n");
		return 2;
	}
	/* Root may raise its own limit: the benchmark measures mapping, not
	 * the accounting refusing it. */
	setrlimit(RLIMIT_MEMLOCK, &unlimited);
	open_target(&t, argv[2]);
	if (!strcmp(argv[1], "versus") && argc == 7) {
		struct target direct;

		open_target(&direct, argv[3]);
		if (!t.daemon || direct.daemon) {
			errno = EINVAL;
			die("versus takes a daemon: target, then a direct: target");
		}
		return run_versus(&t, &direct, argv[4], strtoull(argv[5], NULL, 0),
				  atof(argv[6]));
	}
	if (!strcmp(argv[1], "pairs") && argc == 6)
		return run_pairs(&t, strtoull(argv[3], NULL, 0), atof(argv[4]),
				 atoi(argv[5]));
	if (!strcmp(argv[1], "scale") && (argc == 5 || argc == 6))
		return run_scale(&t, argv[3], atol(argv[4]),
				 argc == 6 ? atol(argv[5]) : -1);
	if (!strcmp(argv[1], "clients") && argc == 5)
		return run_clients(&t, atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "map_rate: bad arguments\n");
	return 2;
}
