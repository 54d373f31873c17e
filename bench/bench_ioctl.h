/*
 * Ioctl numbers and structs of the two test devices scripts/bench talks to:
 * the scratchpad example of the CUSE library (cuse/examples/scratchpad.rs,
 * magic 'S') and the libfuse reference device (bench/libfuse_ref.c,
 * magic 'R').
 */
#ifndef BENCH_IOCTL_H
#define BENCH_IOCTL_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* The scratchpad: see the doc comment of cuse/examples/scratchpad.rs. */
struct scratch_xform {
	__u32 argsz;
	__u32 flags;
	__u64 value; /* out: value * 2 + 1 */
	__u8 text[16]; /* out: upper-cased */
};
struct scratch_stats {
	__u64 opens, releases, reads, writes, ioctls, polls;
};
#define SCRATCH_TRANSFORM _IOWR('S', 1, struct scratch_xform)
#define SCRATCH_STATS _IOR('S', 2, struct scratch_stats)
#define SCRATCH_NOP _IO('S', 9)
/* Reads the struct, writes nothing back, returns value & 0xffff. */
#define SCRATCH_PEEK _IOW('S', 13, struct scratch_xform)

/* The libfuse reference device: the same 32-byte transform. */
struct ref_xform {
	__u32 argsz;
	__u32 flags;
	__u64 value;
	__u8 text[16];
};
#define REF_NOP _IO('R', 1)
#define REF_XFORM _IOWR('R', 2, struct ref_xform)
/* Returns the number of ioctl requests the device has received, this one
 * included. */
#define REF_COUNT _IO('R', 3)

#endif
