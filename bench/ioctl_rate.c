/*
 * ioctl_rate: time one ioctl in a loop and print its rate.
 *
 * Usage: ioctl_rate KIND PATH SECONDS REPS
 *
 * KIND is one of
 *   vfio-null        VFIO_GET_API_VERSION on PATH (/dev/vfio/vfio)
 *   scratch-null     SCRATCH_NOP on the scratchpad example device
 *   scratch-struct   SCRATCH_TRANSFORM (32-byte struct, read + written back)
 *   ioasid-null      IOASID_CHECK_EXTENSION(IOASID_EXT_TYPE1V2_DMA)
 *   ioasid-struct    IOASID_GET_INFO of an IOASID of this file
 *   ref-null         REF_NOP on the libfuse reference device
 *   ref-struct       REF_XFORM on it (32-byte struct, FUSE_IOCTL_RETRY)
 *
 * Each of REPS repetitions issues the ioctl for about SECONDS seconds (the
 * clock is read every 64 calls). Every answer is checked, so a broken
 * device cannot look fast. Output, one line per repetition and a summary:
 *   rep KIND N OPS SECONDS RATE
 *   result KIND median=RATE min=RATE max=RATE reps=REPS
 * For scratch-struct and ref-struct a last line counts the requests the
 * server saw for COUNT_OPS calls (read from its own request counter):
 *   requests KIND ops=COUNT_OPS requests=R
 * Exit status 0, or 1 with a message when a call fails or answers wrong.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <linux/ioasid.h>
#include <linux/vfio.h>

#include "bench_ioctl.h"

#define COUNT_OPS 1000

static const char *kind;

static void die(const char *what)
{
	fprintf(stderr, "ioctl_rate %s: %s: %s\n", kind, what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fd;
static __u32 info_ioasid;

/* One call of the kind being measured; exits on a wrong answer. */
static void one_call(int k, uint64_t i)
{
	switch (k) {
	case 0:
		if (ioctl(fd, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
			die("VFIO_GET_API_VERSION");
		break;
	case 1:
		if (ioctl(fd, SCRATCH_NOP, 0) != 0)
			die("SCRATCH_NOP");
		break;
	case 2: {
		struct scratch_xform x = { .argsz = sizeof(x), .value = i };

		memcpy(x.text, "benchmark", 10);
		if (ioctl(fd, SCRATCH_TRANSFORM, &x) != 0)
			die("SCRATCH_TRANSFORM");
		if (x.value != i * 2 + 1 || memcmp(x.text, "BENCHMARK", 10))
			die("SCRATCH_TRANSFORM answered wrong");
		break;
	}
	case 3:
		if (ioctl(fd, IOASID_CHECK_EXTENSION, IOASID_EXT_TYPE1V2_DMA) != 1)
			die("IOASID_CHECK_EXTENSION");
		break;
	case 4: {
		struct ioasid_info info = { .argsz = sizeof(info),
					    .flags = 0xff,
					    .ioasid = info_ioasid };

		if (ioctl(fd, IOASID_GET_INFO, &info) != 0)
			die("IOASID_GET_INFO");
		if (info.flags != 0 || info.argsz != sizeof(info))
			die("IOASID_GET_INFO answered wrong");
		break;
	}
	case 5:
		if (ioctl(fd, REF_NOP, 0) != 0)
			die("REF_NOP");
		break;
	case 6: {
		struct ref_xform x = { .value = i };

		memcpy(x.text, "benchmark", 10);
		if (ioctl(fd, REF_XFORM, &x) != 0)
			die("REF_XFORM");
		if (x.value != i * 2 + 1 || memcmp(x.text, "BENCHMARK", 10))
			die("REF_XFORM answered wrong");
		break;
	}
	}
}

/* The server's request counter (ioctl requests seen so far). */
static long long requests_seen(int k)
{
	if (k == 2) {
		struct scratch_stats st;

		if (ioctl(fd, SCRATCH_STATS, &st) != 0)
			die("SCRATCH_STATS");
		return (long long)st.ioctls;
	}
	{
		int n = ioctl(fd, REF_COUNT, 0);

		if (n < 0)
			die("REF_COUNT");
		return n;
	}
}

int main(int argc, char **argv)
{
	static const char *kinds[] = { "vfio-null",    "scratch-null",
				       "scratch-struct", "ioasid-null",
				       "ioasid-struct", "ref-null",
				       "ref-struct" };
	double seconds, rates[64], tmp;
	int k = -1, reps, r, a, b;

	if (argc != 5) {
		fprintf(stderr, "usage: ioctl_rate KIND PATH SECONDS REPS\n");
		return 2;
	}
	kind = argv[1];
	for (a = 0; a < (int)(sizeof(kinds) / sizeof(kinds[0])); a++)
		if (!strcmp(kind, kinds[a]))
			k = a;
	seconds = atof(argv[3]);
	reps = atoi(argv[4]);
	if (k < 0 || seconds <= 0 || reps < 1 || reps > 64) {
		fprintf(stderr, "ioctl_rate: bad arguments\n");
		return 2;
	}
	fd = open(argv[2], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die(argv[2]);
	if (k == 4) {
		int id = ioctl(fd, IOASID_ALLOC);

		if (id <= 0)
			die("IOASID_ALLOC");
		info_ioasid = id;
	}

	/* Warm up: start the server's workers, fault in the code. */
	for (a = 0; a < 200; a++)
		one_call(k, a);

	for (r = 0; r < reps; r++) {
		uint64_t n = 0;
		double t0 = now(), t;

		do {
			for (a = 0; a < 64; a++, n++)
				one_call(k, n);
			t = now() - t0;
		} while (t < seconds);
		rates[r] = n / t;
		printf("rep %s %d %llu %.4f %.1f\n", kind, r,
		       (unsigned long long)n, t, rates[r]);
	}
	/* Median: sort the few rates. */
	for (a = 0; a < reps; a++)
		for (b = a + 1; b < reps; b++)
			if (rates[b] < rates[a]) {
				tmp = rates[a];
				rates[a] = rates[b];
				rates[b] = tmp;
			}
	printf("result %s median=%.1f min=%.1f max=%.1f reps=%d\n", kind,
	       reps % 2 ? rates[reps / 2]
			: (rates[reps / 2 - 1] + rates[reps / 2]) / 2,
	       rates[0], rates[reps - 1], reps);

	if (k == 2 || k == 6) {
		long long before = requests_seen(k), after;

		for (a = 0; a < COUNT_OPS; a++)
			one_call(k, a);
		after = requests_seen(k);
		/* The second counter call counts itself. */
		printf("requests %s ops=%d requests=%lld\n", kind, COUNT_OPS,
		       after - before - 1);
	}
	return 0;
}
