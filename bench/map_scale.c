/*
 * map_scale: many mappings at once, through the daemon or directly on a
 * legacy VFIO container (the targets: see map_common.h).
 *
 * Usage:
 *   map_scale KIND TARGET LEVELS PAIRS BUDGET [DAEMON_PID]
 *       LEVELS is a comma list of mapping counts (ascending, e.g.
 *       0,10000,100000). For each level: fill the IOASID/container with
 *       4 KiB mappings at consecutive IOVAs up to that count (the map
 *       calls timed), then time up to PAIRS map+unmap pairs of one more
 *       4 KiB mapping, and read the memory figures. At the end one unmap
 *       removes all of them (timed). KIND says which memory:
 *         shared    the mappings reuse the 256 pages of one memfd mapping
 *                   (one area of this process: the daemon aliases it once
 *                   and every mapping shares that alias); the extra pair
 *                   maps one other page, the same each time;
 *         distinct  every mapping is a buffer of its own: a 4 KiB mmap of
 *                   one memfd at its own file offset (page 2i for the
 *                   i-th, so that no two neighbouring areas have
 *                   contiguous offsets and the kernel cannot merge them),
 *                   populated. Each is an area of its own with its own
 *                   (device, inode, offset) key: the daemon must alias
 *                   each one separately and its idle cache, which keeps
 *                   released aliases by that key, can never match one. The
 *                   extra pairs each map a new such buffer (cold), which
 *                   is unmapped (and its page freed) after its pair.
 *       BUDGET (seconds) bounds the whole run: a fill that runs past it
 *       stops, reports the count it reached, and no later level is
 *       started; the extra pairs stop at a twentieth of it (at least 3).
 *       Prints per level, then the teardown:
 *         level N reached=M fill_per_s=F fill_last_per_s=L pairs=P
 *           pair_per_s=R rss_kib= anon_kib= shmem_kib= slab_kib=
 *           pagetables_kib= client_areas= daemon_areas= stopped=0|1
 *         teardown M seconds=S rss_kib= anon_kib= daemon_areas=
 *       fill_last_per_s: the rate of the last 1000 maps before the level;
 *       rss/anon/shmem: VmRSS, RssAnon, RssShmem of DAEMON_PID (-1 without);
 *       slab/pagetables: the whole guest's (/proc/meminfo);
 *       client_areas / daemon_areas: the areas of this process / of
 *       DAEMON_PID that map the mappings' memfd (its inode in the maps).
 * Every call is checked; exit status 1 with a message on the first error.
 */
#define _GNU_SOURCE
#include <sys/resource.h>

#include "map_common.h"

#define SHARED_PAGES 256
#define LAST 1000

/* How many areas of process `pid` (0: this one) map inode `ino`. */
static long areas_of(long pid, unsigned long ino)
{
	char path[64], line[512];
	unsigned long i;
	long n = 0;
	FILE *f;

	if (pid < 0)
		return -1;
	if (pid)
		snprintf(path, sizeof(path), "/proc/%ld/maps", pid);
	else
		snprintf(path, sizeof(path), "/proc/self/maps");
	f = fopen(path, "r");
	if (!f)
		die("open %s", path);
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "%*s %*s %*s %*s %lu", &i) == 1 && i == ino)
			n++;
	fclose(f);
	return n;
}

struct memory {
	int distinct;
	int fd;			/* the memfd of every mapping */
	unsigned long ino;
	char *shared;		/* shared: its SHARED_PAGES pages */
	char *extra;		/* shared: the page of the extra pairs */
	__u64 next;		/* distinct: the next unused file page */
};

/* The buffer of the i-th mapping. */
static char *buffer(struct memory *m, long i)
{
	char *p;

	if (!m->distinct)
		return m->shared + (i % SHARED_PAGES) * PAGE;
	p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
		 m->fd, m->next * PAGE);
	if (p == MAP_FAILED)
		die("mmap of memfd page %llu (vm.max_map_count?)",
		    (unsigned long long)m->next);
	m->next += 2;
	return p;
}

/* One more map+unmap; its time. */
static double extra_pair(const struct target *t, struct memory *m)
{
	char *p = m->distinct ? buffer(m, 0) : m->extra;
	double a = now(), took;

	map(t, p, IOVA_PAIRS, PAGE);
	unmap(t, IOVA_PAIRS, PAGE);
	took = now() - a;
	if (m->distinct) {
		__u64 off = (m->next - 2) * PAGE;

		if (munmap(p, PAGE) ||
		    fallocate(m->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			      off, PAGE))
			die("freeing an extra buffer");
	}
	return took;
}

static int run_scale(const struct target *t, int distinct, char *levels,
		     long pairs, double budget, long pid)
{
	struct memory m = { .distinct = distinct };
	long want[64], nlevels = 0, have = 0, i, l;
	double start = now(), ring[LAST];
	int stopped = 0;
	struct stat st;
	char *tok;

	for (tok = strtok(levels, ","); tok && nlevels < 64; tok = strtok(NULL, ","))
		want[nlevels++] = atol(tok);
	if (!nlevels)
		return 2;
	m.fd = memfd_create("map_scale", MFD_CLOEXEC);
	/* distinct: every buffer on an even page, with room for the extras. */
	if (m.fd < 0 || ftruncate(m.fd, distinct ?
			   2 * (want[nlevels - 1] + pairs * nlevels + 1) * PAGE :
			   SHARED_PAGES * PAGE) || fstat(m.fd, &st))
		die("memfd");
	m.ino = st.st_ino;
	if (!distinct) {
		m.shared = mmap(NULL, SHARED_PAGES * PAGE, PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_POPULATE, m.fd, 0);
		if (m.shared == MAP_FAILED)
			die("mmap");
		m.extra = shared_memory(PAGE);
	}
	for (l = 0; l < nlevels && !stopped; l++) {
		long from = have, done = 0, k, last_n;
		double pair = 0, in_maps = 0, last = 0;

		for (i = have; i < want[l]; i++) {
			char *p = buffer(&m, i);
			double a = now();

			map(t, p, IOVA_SCALE + i * PAGE, PAGE);
			ring[(i - from) % LAST] = now() - a;
			in_maps += ring[(i - from) % LAST];
			have = i + 1;
			if (i % 256 == 255 && now() - start > budget) {
				stopped = 1;
				break;
			}
		}
		last_n = have - from < LAST ? have - from : LAST;
		for (k = 0; k < last_n; k++)
			last += ring[k];
		while (done < pairs && (done < 3 || pair < budget / 20)) {
			pair += extra_pair(t, &m);
			done++;
		}
		printf("level %ld reached=%ld fill_per_s=%.1f fill_last_per_s=%.1f "
		       "pairs=%ld pair_per_s=%.1f rss_kib=%ld anon_kib=%ld shmem_kib=%ld "
		       "slab_kib=%ld pagetables_kib=%ld client_areas=%ld daemon_areas=%ld "
		       "stopped=%d\n",
		       want[l], have, have > from ? (have - from) / in_maps : 0.0,
		       last_n ? last_n / last : 0.0,
		       done, done / pair, kib_field(pid, "VmRSS"),
		       kib_field(pid, "RssAnon"), kib_field(pid, "RssShmem"),
		       kib_field(0, "Slab"), kib_field(0, "PageTables"),
		       areas_of(0, m.ino), areas_of(pid, m.ino), stopped);
	}
	{
		double a = now();

		if (have)
			unmap(t, IOVA_SCALE, have * PAGE);
		printf("teardown %ld seconds=%.3f rss_kib=%ld anon_kib=%ld daemon_areas=%ld\n",
		       have, now() - a, kib_field(pid, "VmRSS"),
		       kib_field(pid, "RssAnon"), areas_of(pid, m.ino));
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct rlimit unlimited = { RLIM_INFINITY, RLIM_INFINITY };
	struct target t;
	int distinct;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 6 && argc != 7) {
		fprintf(stderr, "usage: see the comment at the top of map_scale.c\n");
		return 2;
	}
	if (strcmp(argv[1], "shared") && strcmp(argv[1], "distinct")) {
		fprintf(stderr, "map_scale: KIND is shared or distinct\n");
		return 2;
	}
	distinct = !strcmp(argv[1], "distinct");
	/* Root may raise its own limit: the benchmark measures mapping, not
	 * the accounting refusing it. */
	setrlimit(RLIMIT_MEMLOCK, &unlimited);
	open_target(&t, argv[2]);
	return run_scale(&t, distinct, argv[3], atol(argv[4]), atof(argv[5]),
			 argc == 7 ? atol(argv[6]) : -1);
}
