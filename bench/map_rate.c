/*
 * map_rate: DMA map/unmap pairs, through the daemon or directly on a legacy
 * VFIO container (the targets: see map_common.h).
 *
 * Usage:
 *   map_rate pairs TARGET SIZE SECONDS REPS
 *       map + unmap one SIZE-byte mapping in a loop, REPS times for about
 *       SECONDS seconds (at least one pair). Prints
 *         result pairs SIZE median=PAIRS/S min= max= reps=
 *   map_rate loop MODE DAEMON_TARGET DIRECT_TARGET NULL_NODE SIZE SECONDS MIN_N
 *       one loop of four arms, in an order that rotates each time round:
 *       a SIZE-byte map + unmap through the daemon, the same directly, one
 *       null ioctl (SCRATCH_NOP) on NULL_NODE (the CUSE library's
 *       scratchpad: a bare round trip), and the floor of a daemon pair
 *       (SCRATCH_PEEK: a round trip plus one process_vm_readv of a 32-byte
 *       struct, what a map must cost at least; then SCRATCH_TRANSFORM: the
 *       same plus a process_vm_writev, what an unmap, which writes back the
 *       size unmapped, must cost at least). Each arm is timed on its own;
 *       the loop runs for about SECONDS seconds and at least MIN_N times.
 *       MODE says which memory the two map arms use:
 *         warm        one populated buffer, the same pages each time (the
 *                     daemon's alias of it stays cached between pairs);
 *         cold        every pair of each path on a new mapping of one
 *                     memfd at a file offset never used before (the
 *                     next page each time), populated by the client: the
 *                     daemon has never seen that (inode, offset, length),
 *                     so it must alias it anew and no idle alias can
 *                     match; set up and unmapped outside the timed calls
 *                     (the file's pages are allocated once, so a cold
 *                     pair costs what it would on a fresh memfd without
 *                     the allocation);
 *         lazy        a new memfd for every pair, not populated: the pin
 *                     allocates the pages (a VMM mapping guest RAM before
 *                     the guest runs, QEMU's prealloc=off), freed after;
 *         registered  one populated buffer, registered once with
 *                     IOASID_REGISTER_MEMORY on the daemon's file; the
 *                     maps lie inside the registration;
 *         private     one populated anonymous MAP_PRIVATE buffer, the
 *                     same pages each time: the daemon has this
 *                     process's own thread issue the map (issue 14; the
 *                     container was brought in by the warm-up pair), the
 *                     direct path maps it as any VFIO user does.
 *       Prints the median time of each, in microseconds:
 *         result loop MODE SIZE daemon_map_us= daemon_unmap_us= daemon_us=
 *           direct_map_us= direct_unmap_us= direct_us= round_trip_us=
 *           peek_us= transform_us= floor_us= n=
 *       (daemon_us, direct_us and floor_us: the median of the pairs).
 *   map_rate versus DAEMON_TARGET DIRECT_TARGET NULL_NODE SIZE SECONDS
 *       the warm loop without the floor arm (bench/compare.py measures
 *       builds whose scratchpad has no SCRATCH_PEEK):
 *         result versus SIZE daemon_us=D direct_us=X round_trip_us=R n=N
 *   map_rate clients TARGET NCLIENTS SECONDS
 *       NCLIENTS forked processes share the target (the ioasid file or the
 *       container) and each maps + unmaps its own 4 KiB page at its own
 *       IOVA for SECONDS seconds, all starting together. Prints
 *         client I pairs=N
 *         result clients N total_per_s=T min=MIN max=MAX
 * Every call is checked; exit status 1 with a message on the first error.
 */
#define _GNU_SOURCE
#include <sys/resource.h>
#include <sys/wait.h>

#include "map_common.h"
#include "bench_ioctl.h"

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

enum mode { WARM, COLD, LAZY, REGISTERED, PRIVATE, VERSUS };

static const char *const mode_names[] = { "warm", "cold", "lazy",
					  "registered", "private", "versus" };

/* The timings of one path's map, unmap and pair. */
struct path_times {
	struct samples map, unmap, pair;
};

/* cold: the memfd whose new mappings the pairs use, and the next unused
 * page offset in it. */
#define COLD_OFFSETS 65536
static struct buf cold_file;
static __u64 cold_next;

/* A new mapping of the cold memfd at an offset never used before. */
static char *cold_mapping(__u64 size)
{
	char *p;

	if (!cold_file.size)
		buf_new(&cold_file, size + COLD_OFFSETS * PAGE, 0);
	if (cold_next == COLD_OFFSETS) {
		errno = ENOSPC;
		die("more than %d cold mappings in one loop", COLD_OFFSETS);
	}
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
		 cold_file.fd, cold_next++ * PAGE);
	if (p == MAP_FAILED)
		die("mmap of the cold memfd");
	return p;
}

/* One map + unmap of `size` bytes on `t`: on `mem`, or on new memory
 * (cold, lazy) set up and released outside the timed calls. */
static void timed_pair(const struct target *t, enum mode mode, char *mem,
		       __u64 size, struct path_times *pt)
{
	double a, m, u;
	struct buf b = { 0 };

	if (mode == COLD)
		mem = cold_mapping(size);
	if (mode == LAZY) {
		buf_new(&b, size, 0);
		mem = b.p;
	}
	a = now();
	map(t, mem, IOVA_PAIRS, size);
	m = now();
	unmap(t, IOVA_PAIRS, size);
	u = now();
	if (mode == COLD && munmap(mem, size))
		die("munmap");
	if (mode == LAZY)
		buf_free(&b);
	if (pt) {
		push(&pt->map, (m - a) * 1e6);
		push(&pt->unmap, (u - m) * 1e6);
		push(&pt->pair, (u - a) * 1e6);
	}
}

/* The floor of a daemon pair: SCRATCH_PEEK, then SCRATCH_TRANSFORM, each
 * answer checked. */
static void timed_floor(int nul, long n, struct path_times *floor)
{
	struct scratch_xform x = { .argsz = sizeof(x), .value = n };
	double a, b, c;
	int ret;

	a = now();
	ret = ioctl(nul, SCRATCH_PEEK, &x);
	b = now();
	if (ret != (int)(n & 0xffff)) {
		if (ret >= 0)
			errno = EIO;
		die("SCRATCH_PEEK answered %d for %ld", ret, n);
	}
	ret = ioctl(nul, SCRATCH_TRANSFORM, &x);
	c = now();
	if (ret || x.value != (__u64)n * 2 + 1) {
		if (!ret)
			errno = EIO;
		die("SCRATCH_TRANSFORM answered %d, value %llu for %ld", ret,
		    (unsigned long long)x.value, n);
	}
	push(&floor->map, (b - a) * 1e6);
	push(&floor->unmap, (c - b) * 1e6);
	push(&floor->pair, (c - a) * 1e6);
}

static int run_loop(enum mode mode, const struct target *daemon,
		    const struct target *direct, const char *null_node,
		    __u64 size, double seconds, long min_n)
{
	struct path_times d = { 0 }, x = { 0 }, fl = { 0 };
	struct samples rt = { 0 };
	int arms = mode == VERSUS ? 3 : 4;
	int nul = open(null_node, O_RDWR | O_CLOEXEC);
	char *mem = NULL;
	double t0;
	long n = 0;
	int i;

	if (nul < 0)
		die("open %s", null_node);
	if (mode == WARM || mode == REGISTERED || mode == VERSUS)
		mem = shared_memory(size);
	if (mode == PRIVATE)
		mem = private_memory(size);
	if (mode == REGISTERED)
		register_memory(daemon, mem, size);
	/* Warm up each path once (with a small pair when each pair of this
	 * mode costs new memory). */
	timed_pair(daemon, mode, mem, mode == LAZY ? PAGE : size, NULL);
	timed_pair(direct, mode, mem, mode == LAZY ? PAGE : size, NULL);
	t0 = now();
	do {
		for (i = 0; i < arms; i++) {
			double a;

			switch ((n + i) % arms) {
			case 0:
				timed_pair(daemon, mode, mem, size, &d);
				break;
			case 1:
				timed_pair(direct, mode, mem, size, &x);
				break;
			case 2:
				a = now();
				if (ioctl(nul, SCRATCH_NOP, 0) != 0)
					die("SCRATCH_NOP on %s", null_node);
				push(&rt, (now() - a) * 1e6);
				break;
			default:
				timed_floor(nul, n, &fl);
			}
		}
		n++;
	} while (now() - t0 < seconds || n < min_n);
	if (mode == VERSUS) {
		printf("result versus %llu daemon_us=%.2f direct_us=%.2f round_trip_us=%.2f n=%ld\n",
		       (unsigned long long)size, median(d.pair.v, n),
		       median(x.pair.v, n), median(rt.v, n), n);
	} else {
		printf("result loop %s %llu daemon_map_us=%.2f daemon_unmap_us=%.2f daemon_us=%.2f "
		       "direct_map_us=%.2f direct_unmap_us=%.2f direct_us=%.2f round_trip_us=%.2f "
		       "peek_us=%.2f transform_us=%.2f floor_us=%.2f n=%ld\n",
		       mode_names[mode], (unsigned long long)size,
		       median(d.map.v, n), median(d.unmap.v, n), median(d.pair.v, n),
		       median(x.map.v, n), median(x.unmap.v, n), median(x.pair.v, n),
		       median(rt.v, n), median(fl.map.v, n), median(fl.unmap.v, n),
		       median(fl.pair.v, n), n);
	}
	close(nul);
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

/* Two targets: a daemon one, then a direct one. */
static void open_pair(struct target *daemon, struct target *direct,
		      const char *d, const char *x)
{
	open_target(daemon, d);
	open_target(direct, x);
	if (!daemon->daemon || direct->daemon) {
		errno = EINVAL;
		die("a daemon: target, then a direct: target");
	}
}

int main(int argc, char **argv)
{
	struct rlimit unlimited = { RLIM_INFINITY, RLIM_INFINITY };
	struct target t, direct;
	int m;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 3) {
		fprintf(stderr, "usage: see the comment at the top of map_rate.c\n");
		return 2;
	}
	/* Root may raise its own limit: the benchmark measures mapping, not
	 * the accounting refusing it. */
	setrlimit(RLIMIT_MEMLOCK, &unlimited);
	if (!strcmp(argv[1], "loop") && argc == 9) {
		for (m = 0; m < VERSUS; m++)
			if (!strcmp(argv[2], mode_names[m]))
				break;
		if (m == VERSUS) {
			errno = EINVAL;
			die("unknown loop mode %s", argv[2]);
		}
		open_pair(&t, &direct, argv[3], argv[4]);
		return run_loop(m, &t, &direct, argv[5],
				strtoull(argv[6], NULL, 0), atof(argv[7]),
				atol(argv[8]));
	}
	if (!strcmp(argv[1], "versus") && argc == 7) {
		open_pair(&t, &direct, argv[2], argv[3]);
		return run_loop(VERSUS, &t, &direct, argv[4],
				strtoull(argv[5], NULL, 0), atof(argv[6]), 1);
	}
	open_target(&t, argv[2]);
	if (!strcmp(argv[1], "pairs") && argc == 6)
		return run_pairs(&t, strtoull(argv[3], NULL, 0), atof(argv[4]),
				 atoi(argv[5]));
	if (!strcmp(argv[1], "clients") && argc == 5)
		return run_clients(&t, atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "map_rate: bad arguments\n");
	return 2;
}
