/*
 * inject_rate: map + unmap pairs of private memory through a node whose map
 * is issued by the client's own thread (issue 14; the example daemon
 * vfio-legacy/examples/inject_dma.rs), for comparison with map_rate's
 * shared-memory pairs through the daemon.
 *
 *   inject_rate NODE SIZE PAIRS
 *
 * SIZE bytes of anonymous MAP_PRIVATE memory, populated, mapped at IOVA
 * 1 MiB and unmapped PAIRS times (the first pair, which brings the
 * container into the client, is timed apart). Prints
 *   result inject SIZE first_us=F median_us=M min_us=m n=PAIRS
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "../tests/c/private_map.h"

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double pair(int fd, void *buf, size_t size)
{
	double t0 = now_us();
	int r = target_map(fd, 1 << 20, buf, size);
	if (r) {
		fprintf(stderr, "inject_rate: map: %s\n", strerror(-r));
		exit(1);
	}
	r = target_unmap(fd, 1 << 20, size);
	if (r < 0) {
		fprintf(stderr, "inject_rate: unmap: %s\n", strerror(-r));
		exit(1);
	}
	return now_us() - t0;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: inject_rate NODE SIZE PAIRS\n");
		return 1;
	}
	setenv("INJECT_NODE", argv[1], 1);
	size_t size = strtoull(argv[2], NULL, 0);
	long n = strtol(argv[3], NULL, 0);
	int fd = target_open();
	if (fd < 0) {
		perror("inject_rate: open");
		return 1;
	}
	void *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
			 -1, 0);
	if (buf == MAP_FAILED) {
		perror("inject_rate: mmap");
		return 1;
	}
	double first = pair(fd, buf, size);
	double *us = calloc(n, sizeof(*us));
	for (long i = 0; i < n; i++)
		us[i] = pair(fd, buf, size);
	qsort(us, n, sizeof(*us), cmp);
	printf("result inject %zu first_us=%.0f median_us=%.0f min_us=%.0f n=%ld\n", size, first,
	       us[n / 2], us[0], n);
	return 0;
}
