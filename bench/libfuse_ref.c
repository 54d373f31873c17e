/*
 * libfuse_ref: the reference CUSE device for scripts/bench, written the
 * usual libfuse way on cuse_lowlevel (libfuse 3).
 *
 * Usage: libfuse_ref NAME [-s]
 *   Serves /dev/NAME in the foreground (libfuse's multi-threaded loop; -s:
 *   single-threaded) until SIGTERM or SIGINT.
 *
 * Ioctls (bench/bench_ioctl.h):
 *   REF_NOP    _IO('R', 1): returns 0 at once, one request.
 *   REF_XFORM  _IOWR('R', 2, struct ref_xform): the 32-byte transform of
 *              the scratchpad (value * 2 + 1, text upper-cased, flag bit
 *              31), restricted-ioctl style: the first request answers
 *              FUSE_IOCTL_RETRY with one in and one out iovec, the kernel
 *              copies the struct in and sends a second request with the
 *              data, whose answer carries the struct back: two requests.
 *   REF_COUNT  _IO('R', 3): returns the ioctl requests received so far,
 *              this one included.
 */
#define FUSE_USE_VERSION 35

#include <cuse_lowlevel.h>
#include <fuse_lowlevel.h>

#include <ctype.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>

#include "bench_ioctl.h"

static atomic_int requests;

static void ref_open(fuse_req_t req, struct fuse_file_info *fi)
{
	fuse_reply_open(req, fi);
}

static void ref_ioctl(fuse_req_t req, int cmd, void *arg,
		      struct fuse_file_info *fi, unsigned flags,
		      const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
	int seen = atomic_fetch_add(&requests, 1) + 1;

	(void)fi;
	(void)flags;
	switch ((unsigned)cmd) {
	case REF_NOP:
		fuse_reply_ioctl(req, 0, NULL, 0);
		return;
	case REF_COUNT:
		fuse_reply_ioctl(req, seen, NULL, 0);
		return;
	case REF_XFORM: {
		struct ref_xform x;
		size_t i;

		if (in_bufsz < sizeof(x) || out_bufsz < sizeof(x)) {
			struct iovec iov = { arg, sizeof(x) };

			fuse_reply_ioctl_retry(req, &iov, 1, &iov, 1);
			return;
		}
		memcpy(&x, in_buf, sizeof(x));
		x.value = x.value * 2 + 1;
		for (i = 0; i < sizeof(x.text); i++)
			x.text[i] = toupper(x.text[i]);
		x.flags |= 1u << 31;
		fuse_reply_ioctl(req, 0, &x, sizeof(x));
		return;
	}
	default:
		fuse_reply_err(req, ENOTTY);
	}
}

static const struct cuse_lowlevel_ops ops = {
	.open = ref_open,
	.ioctl = ref_ioctl,
};

int main(int argc, char **argv)
{
	char devname[128];
	const char *dev_info_argv[] = { devname };
	const char *fuse_argv[4];
	struct cuse_info ci;
	int fuse_argc = 0;

	if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "-s"))) {
		fprintf(stderr, "usage: libfuse_ref NAME [-s]\n");
		return 2;
	}
	snprintf(devname, sizeof(devname), "DEVNAME=%s", argv[1]);
	memset(&ci, 0, sizeof(ci));
	ci.dev_info_argc = 1;
	ci.dev_info_argv = dev_info_argv;
	ci.flags = CUSE_UNRESTRICTED_IOCTL;

	fuse_argv[fuse_argc++] = argv[0];
	fuse_argv[fuse_argc++] = "-f";
	if (argc == 3)
		fuse_argv[fuse_argc++] = "-s";
	fuse_argv[fuse_argc] = NULL;
	return cuse_lowlevel_main(fuse_argc, (char **)fuse_argv, &ci, &ops,
				  NULL);
}
