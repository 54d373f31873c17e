/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * The /dev/ioasid user API, as proposed by the 2021 "/dev/ioasid uAPI
 * proposal" (RFC, 27 May 2021) and served by cuse-ioasid from user space.
 *
 * The RFC fixes the names, the ioctl numbers relative to a base and the
 * behaviour; it leaves every struct layout "TBD". This header fixes them.
 * docs/uapi.md explains every choice; this header is the reference for C.
 *
 * Self-contained: needs only <linux/types.h> and <linux/ioctl.h>.
 *
 * ------------------------------------------------------------------------
 * Conventions shared by every command
 * ------------------------------------------------------------------------
 *
 * Numbers. Every command is _IO(type, nr): the number carries no size and
 * no direction (VFIO's convention). The argument is either a plain integer
 * passed as the ioctl's third argument, or a pointer to a struct that the
 * implementation reads and writes itself.
 *
 * Extensible structs. Every struct starts with
 *     __u32 argsz;   size of the struct as the caller knows it
 *     __u32 flags;   command flags; unknown bits are rejected
 * has naturally aligned __u64 fields, explicit __reserved fields that must
 * be zero, and no implicit padding. The rules (those of iommufd, with
 * VFIO's errno for unknown flags):
 *   - argsz below the struct's size in this header          -> EINVAL
 *   - argsz above it: the bytes past the known struct must
 *     all be zero (then they are ignored)                    -> else E2BIG
 *     (except IOASID_GET_INFO, where they are the output buffer of the
 *     capability chain and are not checked)
 *   - argsz more than 64 KiB above it (the daemon reads no further) -> E2BIG
 *   - a flag bit this header does not define                 -> EINVAL
 *   - a __reserved field that is not zero                    -> EINVAL
 *   - the struct cannot be read or written                   -> EFAULT
 * Output fields are written back over the first min(argsz, known size)
 * bytes; nothing past the known struct is ever written, except by
 * IOASID_GET_INFO's capability chain, which lies within argsz.
 * The minimum argsz of every command is sizeof() of its struct here.
 *
 * Integer arguments. IOASID_CHECK_EXTENSION, IOASID_FREE,
 * IOASID_CREATE_NESTING, VFIO_BIND_IOASID_FD and VFIO_UNBIND_IOASID_FD take
 * the integer itself. IOASID_ALLOC and IOASID_DAEMON_IDENTIFY take no
 * argument and IGNORE the third ioctl argument: C programs commonly call
 * ioctl(fd, IOASID_ALLOC) with two arguments, and the variadic third one
 * is then whatever the register held; requiring 0 would fail at random.
 *
 * IOASIDs. An IOASID is a positive integer local to one open file of
 * /dev/ioasid: the first one allocated is 1, 0 is never valid, every value
 * is below 2^31 so that it fits the int an ioctl returns. The id of a freed
 * IOASID may be given out again.
 *
 * A new IOASID accepts no command until a device has been attached to it
 * (VFIO_ATTACH_IOASID): until then every command naming it fails with
 * ENODEV, except IOASID_GET_INFO (which succeeds and reports an empty
 * IOASID: flags 0, pgsize_bitmap 0, no capabilities) and IOASID_FREE.
 * Once a device has been attached, the IOASID stays usable after its last
 * device detaches: its mappings are kept and apply again at the next
 * attach, and IOASID_GET_INFO keeps reporting what it reported while the
 * last device was attached.
 *
 * The IOMMU group rule (RFC). While some devices of an IOMMU group are
 * attached (by RID) to an IOASID and other devices of that group that are
 * bound to the same ioasid file are not, the IOASID refuses EVERY command
 * with EBUSY. Attach the missing devices too, or unbind them.
 *
 * ------------------------------------------------------------------------
 * Errno vocabulary (each command below lists its own cases)
 * ------------------------------------------------------------------------
 *   ENOTTY  unknown ioctl number on this file, or a command of an extension
 *           that IOASID_CHECK_EXTENSION reports as 0
 *   EINVAL  argsz too small; unknown flags; __reserved not zero; iova,
 *           vaddr or size not aligned to the smallest page size; zero size;
 *           address arithmetic overflows; outside the permitted IOVA
 *           ranges; an unmap that would split a mapping; a bad format
 *   E2BIG   non-zero bytes past the known struct
 *   EFAULT  the argument cannot be read or written; memory the daemon
 *           cannot share (MAP_PRIVATE mappings, including ordinary
 *           anonymous memory: use memfd, shm, hugetlbfs, a shared file or
 *           MAP_SHARED|MAP_ANONYMOUS)
 *   ENOENT  unknown IOASID; no such registration or bound table; a map
 *           outside the registered ranges of a file that registers memory
 *   EEXIST  a map overlapping an existing mapping; a registration
 *           overlapping an existing registration
 *   EBUSY   object in use; the IOMMU group rule
 *   ENODEV  a command on an IOASID that never had a device attached
 *   ENOMEM  the caller's RLIMIT_MEMLOCK would be exceeded
 *   ENOSPC  too many mappings (the limit of the VFIO type1 backend)
 *   EPERM   IOASID_DAEMON_IDENTIFY from any process but the daemon
 *   EBADF   VFIO_BIND_IOASID_FD/VFIO_UNBIND_IOASID_FD: not an open fd
 *
 * ------------------------------------------------------------------------
 * Choice of IOASID_TYPE and IOASID_BASE
 * ------------------------------------------------------------------------
 * The type is ';', the one VFIO and iommufd use, because the ioasid file is
 * the successor of the VFIO container. Linux's ioctl-number.rst registers
 * ';' 0x64-0x7F for linux/vfio.h and ';' 0x80-0xFF for linux/iommufd.h,
 * and nothing else under ';'. Read from the Linux 6.12 headers:
 *   - vfio.h: every command is _IO(';', VFIO_BASE + n) with VFIO_BASE 100
 *     and n = 0..21, i.e. 0x64..0x79 (n = 12..21 each serve commands on
 *     several file types: container, device, migration fd);
 *   - iommufd.h: every command is _IO(';', IOMMUFD_CMD_*) with values from
 *     IOMMUFD_CMD_BASE 0x80 (DESTROY) to 0x8e (FAULT_QUEUE_ALLOC); later
 *     kernels continue upwards (0x8f IOAS_MAP_FILE ... 0x94 HW_QUEUE_ALLOC
 *     at the time of writing).
 * IOASID_BASE is 0x20: the whole block IOASID_BASE + 0..63 = 0x20..0x5f
 * lies in the unregistered part 0x00..0x63 of ';', below VFIO's first
 * number; it holds the 14 RFC commands (0x20..0x2d), IOASID_DAEMON_IDENTIFY
 * (0x5f) and room for the RFC's fault and dirty-tracking commands.
 *
 * The four device commands keep the RFC's numbers VFIO_BASE + 22..25
 * (0x7a..0x7d): no command in the 6.12 vfio.h (nor in later ones up to the
 * time of writing) uses VFIO_BASE + 22 or above.
 *
 * ------------------------------------------------------------------------
 * Not provided
 * ------------------------------------------------------------------------
 * I/O page fault reporting and dirty page tracking: the RFC gives them no
 * number and no layout ("TBD"); this ABI does not provide them. See
 * docs/uapi.md for what the merged kernel uAPI (iommufd) did instead.
 */
#ifndef _UAPI_LINUX_IOASID_H
#define _UAPI_LINUX_IOASID_H

#include <linux/types.h>
#include <linux/ioctl.h>

#ifdef __cplusplus
extern "C" {
#endif

#define IOASID_TYPE	(';')
#define IOASID_BASE	0x20

/* IOASIDs are 1..IOASID_MAX_ID. */
#define IOASID_MAX_ID			0x7fffffff
/* Width of a PASID: user_pasid and pasid fields are below 1 << 20. */
#define IOASID_PASID_BITS		20
/* Most entries of a flat PASID table. */
#define IOASID_PASID_TABLE_MAX_ENTRIES	(1 << IOASID_PASID_BITS)

/* ======================================================================
 * Extension ids for IOASID_CHECK_EXTENSION (fd-level capabilities).
 * The answer is 1 if the running daemon provides the extension, else 0;
 * an unknown id (and 0) answers 0. The commands of an extension answered
 * 0 fail with ENOTTY.
 * ====================================================================== */

/*
 * IOASID_MAP_DMA / IOASID_UNMAP_DMA with VFIO type1v2 semantics, including
 * IOASID_DMA_UNMAP_FLAG_ALL.
 */
#define IOASID_EXT_TYPE1V2_DMA			1
/* IOASID_REGISTER_MEMORY / IOASID_UNREGISTER_MEMORY. */
#define IOASID_EXT_REGISTER_MEMORY		2
/*
 * IOASID_CREATE_NESTING with software nesting: a child's mappings are merged
 * with its parent's into one shadow page table. Both levels use the DMA
 * mapping protocol; a child's "vaddr" is an IOVA of the parent.
 */
#define IOASID_EXT_NESTING_SOFTWARE		3
/*
 * Nesting walked by the IOMMU itself (two-stage translation). Always 0 on
 * legacy VFIO: its VFIO_TYPE1_NESTING_IOMMU model never gained a way to
 * bind a first-stage table and was withdrawn (vfio.h now names it
 * __VFIO_RESERVED_TYPE1_NESTING_IOMMU).
 */
#define IOASID_EXT_NESTING_HARDWARE		4
/*
 * IOASID_BIND_PGTABLE / IOASID_UNBIND_PGTABLE / IOASID_INVALIDATE_CACHE,
 * emulated: the implementation walks the user's table (in the parent's IOVA
 * space) and shadows it; an invalidation makes it walk again.
 */
#define IOASID_EXT_BIND_PGTABLE_SHADOW		5
/*
 * IOASID_BIND_PASID_TABLE / IOASID_UNBIND_PASID_TABLE and the PASID flags
 * of IOASID_INVALIDATE_CACHE, emulated the same way.
 */
#define IOASID_EXT_BIND_PASID_TABLE_SHADOW	6
/*
 * VFIO_ATTACH_IOASID with IOASID_ATTACH_USER_PASID is accepted and the
 * attachment is recorded (listed, checked for conflicts, detachable); DMA
 * tagged with that PASID is NOT routed to the IOASID (see the next one).
 */
#define IOASID_EXT_USER_PASID_TRACKED		7
/*
 * DMA tagged with a PASID is translated by the IOASID attached under that
 * PASID. Always 0 on legacy VFIO, which cannot route PASID-tagged DMA.
 */
#define IOASID_EXT_PASID_DMA_ROUTING		8

/* ======================================================================
 * Commands on the ioasid file (open("/dev/ioasid"))
 * ====================================================================== */

/*
 * IOASID_CHECK_EXTENSION - _IO(IOASID_TYPE, IOASID_BASE + 0)
 * Argument: an IOASID_EXT_* id (integer).
 * Returns 1 if provided, 0 if not (also for unknown ids). No errors.
 */
#define IOASID_CHECK_EXTENSION		_IO(IOASID_TYPE, IOASID_BASE + 0)

/*
 * IOASID_REGISTER_MEMORY - _IO(IOASID_TYPE, IOASID_BASE + 1)
 * Argument: struct ioasid_register_memory. Returns 0.
 *
 * Pins and accounts [vaddr, vaddr + size) of the caller once. Later maps
 * inside a registered range reuse it, and a page registered once and
 * mapped into several IOASIDs is accounted once. Once the file has any
 * registration, every IOASID_MAP_DMA on a root IOASID must lie inside one
 * registered range (ENOENT otherwise).
 * Errors: EINVAL (argsz, flags, vaddr or size not 4 KiB aligned, size 0,
 * overflow), E2BIG, EFAULT (unreadable struct; memory not shareable),
 * EEXIST (overlaps a registration), ENOMEM (RLIMIT_MEMLOCK).
 *
 * IOASID_UNREGISTER_MEMORY - _IO(IOASID_TYPE, IOASID_BASE + 2)
 * Argument: struct ioasid_register_memory, exactly as registered. Returns 0.
 * Errors: EINVAL, E2BIG, EFAULT as above; ENOENT (no registration with
 * exactly this vaddr and size); EBUSY (a mapping still uses it).
 */
struct ioasid_register_memory {
	__u32	argsz;
	__u32	flags;		/* none defined: must be 0 */
	__aligned_u64	vaddr;	/* start, in the caller's address space */
	__aligned_u64	size;	/* bytes */
};
#define IOASID_REGISTER_MEMORY		_IO(IOASID_TYPE, IOASID_BASE + 1)
#define IOASID_UNREGISTER_MEMORY	_IO(IOASID_TYPE, IOASID_BASE + 2)

/*
 * IOASID_ALLOC - _IO(IOASID_TYPE, IOASID_BASE + 3)
 * Argument: none (ignored). Returns the new IOASID (> 0).
 * Errors: ENOSPC (no IOASID number left below 2^31).
 */
#define IOASID_ALLOC			_IO(IOASID_TYPE, IOASID_BASE + 3)

/*
 * IOASID_FREE - _IO(IOASID_TYPE, IOASID_BASE + 4)
 * Argument: the IOASID (integer). Returns 0. Its mappings are removed and
 * their memory unpinned.
 * Errors: ENOENT (unknown IOASID), EBUSY (devices are attached to it, it
 * has children, or the group rule).
 */
#define IOASID_FREE			_IO(IOASID_TYPE, IOASID_BASE + 4)

/*
 * IOASID_GET_INFO - _IO(IOASID_TYPE, IOASID_BASE + 5)
 * Argument: struct ioasid_info, followed by room for the capability chain.
 * In: argsz, ioasid. Out: flags, cap_offset, pgsize_bitmap, the chain.
 * Returns 0.
 *
 * flags is output only: its input value is ignored (as in VFIO's GET_INFO
 * calls), so a struct returned by a first call may be passed again as is.
 *
 * The capability chain follows VFIO's rules: each capability starts with
 * struct ioasid_info_cap_header; cap_offset and every header's "next" are
 * offsets from the start of struct ioasid_info; next == 0 ends the chain;
 * capabilities are 8-byte aligned and come in no particular order. If the
 * IOASID has capabilities but argsz cannot hold them all, the call still
 * succeeds: IOASID_INFO_CAPS is set, cap_offset is 0, nothing is written
 * past the struct, and argsz is raised to the size needed; call again with
 * a buffer that big.
 *
 * Unlike every other command, the bytes past struct ioasid_info are an
 * output buffer: they are not checked (never E2BIG); the chain is written
 * there and the rest is left untouched.
 *
 * An IOASID that never had a device attached is reported empty: flags 0,
 * pgsize_bitmap 0, cap_offset 0, argsz unchanged.
 * Errors: EINVAL (argsz), EFAULT, ENOENT (unknown IOASID), EBUSY (group
 * rule).
 */
struct ioasid_info {
	__u32	argsz;
	__u32	flags;		/* out: IOASID_INFO_* */
#define IOASID_INFO_PGSIZES		(1 << 0) /* pgsize_bitmap is valid */
#define IOASID_INFO_CAPS		(1 << 1) /* has a capability chain */
#define IOASID_INFO_MAP_DMA		(1 << 2) /* accepts MAP/UNMAP_DMA */
#define IOASID_INFO_BIND_PGTABLE	(1 << 3) /* accepts BIND_PGTABLE */
#define IOASID_INFO_BIND_PASID_TABLE	(1 << 4) /* accepts BIND_PASID_TABLE */
#define IOASID_INFO_NESTED		(1 << 5) /* a child: see CAP_PARENT */
	__u32	ioasid;		/* in */
	__u32	cap_offset;	/* out: offset of the first capability, or 0 */
	__aligned_u64	pgsize_bitmap;	/* out: page sizes MAP_DMA accepts */
};
#define IOASID_GET_INFO			_IO(IOASID_TYPE, IOASID_BASE + 5)

struct ioasid_info_cap_header {
	__u16	id;		/* IOASID_INFO_CAP_* */
	__u16	version;	/* 1 for every capability of this header */
	__u32	next;		/* offset of the next capability, 0: last */
};

/*
 * Permitted IOVA ranges (the RFC v2 plan: permitted rather than reserved).
 * IOASID_MAP_DMA outside them fails with EINVAL. Followed immediately by
 * nr_ranges struct ioasid_iova_range, sorted, not overlapping.
 */
#define IOASID_INFO_CAP_IOVA_RANGES	1
struct ioasid_iova_range {
	__aligned_u64	start;
	__aligned_u64	last;	/* inclusive */
};
struct ioasid_info_cap_iova_ranges {
	struct ioasid_info_cap_header header;
	__u32	nr_ranges;
	__u32	__reserved;
	/* struct ioasid_iova_range ranges[nr_ranges]; */
};

/*
 * Nesting: IOASID_CREATE_NESTING accepts this IOASID as a parent. With one
 * level of nesting the capability shows on the parent only.
 */
#define IOASID_INFO_CAP_NESTING		2
struct ioasid_info_cap_nesting {
	struct ioasid_info_cap_header header;
	__u32	flags;
#define IOASID_NESTING_SOFTWARE		(1 << 0) /* shadowed by software */
#define IOASID_NESTING_HARDWARE		(1 << 1) /* walked by the IOMMU */
	__u32	levels;		/* levels of children that may still be
				 * created below this IOASID (>= 1) */
};

/*
 * Page-table formats IOASID_BIND_PGTABLE accepts on this IOASID. Followed
 * immediately by nr_formats struct ioasid_pgtable_format_desc.
 */
#define IOASID_INFO_CAP_PGTABLE_FORMATS	3
struct ioasid_pgtable_format_desc {
	__u32	format;		/* IOASID_PGTABLE_* */
	__u32	flags;
#define IOASID_PGTABLE_FORMAT_SHADOWED	(1 << 0) /* walked in software */
	__u32	addr_width;	/* input address width accepted, in bits */
	__u32	__reserved;
	__aligned_u64	pgsize_bitmap;	/* page sizes the format maps */
};
struct ioasid_info_cap_pgtable_formats {
	struct ioasid_info_cap_header header;
	__u32	nr_formats;
	__u32	__reserved;
	/* struct ioasid_pgtable_format_desc formats[nr_formats]; */
};

/*
 * PASID support: shown on an IOASID to which devices may be attached with
 * IOASID_ATTACH_USER_PASID.
 */
#define IOASID_INFO_CAP_PASID		4
struct ioasid_info_cap_pasid {
	struct ioasid_info_cap_header header;
	__u32	flags;
#define IOASID_PASID_ATTACH_TRACKED	(1 << 0) /* attachments recorded */
#define IOASID_PASID_DMA_ROUTED		(1 << 1) /* PASID DMA translated */
	__u32	pasid_bits;	/* width of a PASID (20 for PCIe) */
	__u32	pasid_table_format; /* IOASID_PASID_TABLE_* that
				     * BIND_PASID_TABLE accepts here, 0: none */
	__u32	__reserved;
};

/* The parent of a child IOASID (IOASID_INFO_NESTED is set too). */
#define IOASID_INFO_CAP_PARENT		5
struct ioasid_info_cap_parent {
	struct ioasid_info_cap_header header;
	__u32	parent;
	__u32	__reserved;
};

/* How many more mappings IOASID_MAP_DMA may create before ENOSPC. */
#define IOASID_INFO_CAP_DMA_AVAIL	6
struct ioasid_info_cap_dma_avail {
	struct ioasid_info_cap_header header;
	__u32	avail;
	__u32	__reserved;
};

/*
 * Shadow and walk status of a child IOASID (IOASID_INFO_NESTED is set too).
 * The daemon realises a child in software: it composes the child's
 * translations with the parent's into a "shadow" that the realising VFIO
 * containers hold, and reads bound page tables and PASID tables from the
 * parent's memory. Malformed entries it meets (reserved bits set, a table
 * that loops back into a table above it, a table the parent does not map
 * readable, a walk that runs out of its budget) are skipped, leave their
 * range untranslated, and are counted here.
 *
 * shadow_entries	entries of the shadow now (what each realising
 *			container holds for the child)
 * The page-table fields are meaningful with IOASID_SHADOW_PGTABLE:
 * leaves		leaves of the bound table cached now
 * last_walk_leaves	leaves found by the last walk (bind or invalidation;
 *			an address invalidation walks only its range)
 * last_walk_malformed	malformed entries met by the last walk
 * last_walk_tables	tables read by the last walk
 * malformed		malformed entries met by every walk since the bind
 * walks		walks since the bind (the bind's walk included)
 * The PASID-table fields are meaningful with IOASID_SHADOW_PASID_TABLE
 * (state after the last read of each entry):
 * pasid_entries	entries of the bound table
 * pasid_valid		PASIDs whose entry is present and well formed
 * pasid_bad		present entries with bits set besides present and
 *			the address (treated as not present)
 * pasid_unreadable	entries the parent no longer maps readable
 * pasid_leaves		leaves of the valid PASIDs' page tables
 * pasid_malformed	malformed page-table entries met by the last walk
 *			of each valid PASID's table
 * IOASID_SHADOW_TRUNCATED: the last walk of the page table, or of some
 * PASID's table, ran out of budget (see docs/uapi.md) and is incomplete.
 */
#define IOASID_INFO_CAP_SHADOW		7
struct ioasid_info_cap_shadow {
	struct ioasid_info_cap_header header;
	__u32	flags;
#define IOASID_SHADOW_PGTABLE		(1 << 0) /* a page table is bound */
#define IOASID_SHADOW_PASID_TABLE	(1 << 1) /* a PASID table is bound */
#define IOASID_SHADOW_TRUNCATED		(1 << 2) /* a walk ran out of budget */
	__u32	__reserved;
	__aligned_u64	shadow_entries;
	__aligned_u64	leaves;
	__aligned_u64	last_walk_leaves;
	__aligned_u64	last_walk_malformed;
	__aligned_u64	last_walk_tables;
	__aligned_u64	malformed;
	__aligned_u64	walks;
	__u32	pasid_entries;
	__u32	pasid_valid;
	__u32	pasid_bad;
	__u32	pasid_unreadable;
	__aligned_u64	pasid_leaves;
	__aligned_u64	pasid_malformed;
};

/*
 * IOASID_MAP_DMA - _IO(IOASID_TYPE, IOASID_BASE + 6)
 * Argument: struct ioasid_dma_map. Returns 0.
 *
 * Maps [iova, iova + size) of the IOASID to [vaddr, vaddr + size) with VFIO
 * type1v2 semantics. On a root IOASID vaddr is an address of the caller,
 * whose memory must be shared (see EFAULT). On a child IOASID (software
 * nesting) vaddr is an IOVA of the parent: the child mapping is translated
 * through the parent's mappings as they are now and as they change; parts
 * not mapped in the parent do not translate (DMA there is blocked) until
 * the parent maps them, and the effective permissions are those of both
 * levels. Memory is pinned and accounted by the parent only.
 * Errors: EINVAL (argsz; flags; neither READ nor WRITE; iova, vaddr or
 * size not aligned to the smallest page size of pgsize_bitmap; size 0;
 * overflow; outside the permitted IOVA ranges), E2BIG, EFAULT (unreadable
 * struct; memory not shareable), ENOENT (unknown IOASID; a file that
 * registers memory and a range not inside one registration), EEXIST
 * (overlaps a mapping), EBUSY (a page table is bound to this IOASID; group
 * rule), ENODEV (never attached), ENOMEM (RLIMIT_MEMLOCK), ENOSPC (too
 * many mappings).
 */
struct ioasid_dma_map {
	__u32	argsz;
	__u32	flags;
#define IOASID_DMA_MAP_FLAG_READ	(1 << 0) /* readable from device */
#define IOASID_DMA_MAP_FLAG_WRITE	(1 << 1) /* writable from device */
	__u32	ioasid;
	__u32	__reserved;
	__aligned_u64	vaddr;
	__aligned_u64	iova;
	__aligned_u64	size;
};
#define IOASID_MAP_DMA			_IO(IOASID_TYPE, IOASID_BASE + 6)

/*
 * IOASID_UNMAP_DMA - _IO(IOASID_TYPE, IOASID_BASE + 7)
 * Argument: struct ioasid_dma_unmap. In: iova, size. Out: size, the bytes
 * actually unmapped. Returns 0.
 *
 * Type1v2 semantics: every mapping inside [iova, iova + size) is removed; a
 * range that would split a mapping fails (EINVAL) and removes nothing; a
 * range with nothing mapped succeeds and reports size 0 (iommufd answers
 * ENOENT there; this ABI keeps type1v2). With IOASID_DMA_UNMAP_FLAG_ALL
 * (the value of VFIO_DMA_UNMAP_FLAG_ALL) everything is unmapped and iova and
 * size must be 0.
 * Errors: EINVAL (argsz; flags; alignment; size 0 without FLAG_ALL;
 * overflow; split; FLAG_ALL with iova or size not 0), E2BIG, EFAULT,
 * ENOENT (unknown IOASID), EBUSY (a page table is bound; group rule),
 * ENODEV (never attached).
 */
struct ioasid_dma_unmap {
	__u32	argsz;
	__u32	flags;
#define IOASID_DMA_UNMAP_FLAG_ALL	(1 << 1) /* unmap everything */
	__u32	ioasid;
	__u32	__reserved;
	__aligned_u64	iova;
	__aligned_u64	size;	/* in: bytes; out: bytes unmapped */
};
#define IOASID_UNMAP_DMA		_IO(IOASID_TYPE, IOASID_BASE + 7)

/*
 * IOASID_CREATE_NESTING - _IO(IOASID_TYPE, IOASID_BASE + 8)
 * Argument: the parent IOASID (integer). Returns the child IOASID (> 0).
 *
 * The parent must carry IOASID_INFO_CAP_NESTING. A device attached to the
 * child (by RID or with a PASID) must already be attached by RID to the
 * parent. The child uses the DMA mapping protocol (software nesting) or,
 * alternatively, IOASID_BIND_PGTABLE or IOASID_BIND_PASID_TABLE.
 * Errors: ENOENT (unknown parent), EINVAL (the parent cannot nest any
 * more), ENODEV (the parent never had a device attached), EBUSY (group
 * rule), ENOSPC (no IOASID number left).
 */
#define IOASID_CREATE_NESTING		_IO(IOASID_TYPE, IOASID_BASE + 8)

/*
 * IOASID_BIND_PGTABLE - _IO(IOASID_TYPE, IOASID_BASE + 9)
 * Argument: struct ioasid_bind_pgtable. Returns 0.
 *
 * Binds a user-managed I/O page table to a child IOASID. pgtable is the
 * address of the root table in the PARENT's IOVA space; the table is read
 * through the parent's mappings. It applies to every routing (RID, or
 * RID+PASID) of every device attached to the child. After changing the
 * table, the user issues IOASID_INVALIDATE_CACHE; until then the change may
 * or may not be seen (as with a hardware IOTLB).
 *
 * IOASID_PGTABLE_X86_64_4LVL: the x86-64 4-level format (IA-32e paging,
 * also VT-d first-level translation). Four levels of 4 KiB tables, 512
 * 8-byte little-endian entries each, indexed by input address bits 39..47,
 * 30..38, 21..29, 12..20; addr_width must be 48, pgtable 4 KiB aligned.
 * Entry bits: 0 present (also grants read), 1 writable (write is granted
 * when set at every level walked), 7 PS (a leaf at level 3 maps 1 GiB, at
 * level 2 maps 2 MiB), 12..51 the address (of the next table, or of the
 * page: for a 2 MiB or 1 GiB leaf only bits 21..51 or 30..51 count).
 * All other bits (user, PWT, PCD, accessed, dirty, XD, 52..62, ...) are
 * ignored and never written: accessed and dirty bits are not set.
 * A non-present entry, or a table not mapped readable in the parent,
 * leaves its range untranslated (DMA there is blocked).
 *
 * Errors: EINVAL (argsz; flags; reserved; not a child; unknown format;
 * addr_width; pgtable not aligned), E2BIG, EFAULT (unreadable struct; the
 * root table is not mapped readable in the parent), ENOENT (unknown
 * IOASID), EBUSY (already bound; the child has DMA mappings or a PASID
 * table; group rule), ENODEV (never attached).
 */
#define IOASID_PGTABLE_X86_64_4LVL	1
struct ioasid_bind_pgtable {
	__u32	argsz;
	__u32	flags;		/* none defined: must be 0 */
	__u32	ioasid;		/* the child */
	__u32	format;		/* IOASID_PGTABLE_* */
	__u32	addr_width;	/* input address width, in bits */
	__u32	__reserved;
	__aligned_u64	pgtable; /* root table, an IOVA of the parent */
};
#define IOASID_BIND_PGTABLE		_IO(IOASID_TYPE, IOASID_BASE + 9)

/*
 * IOASID_UNBIND_PGTABLE - _IO(IOASID_TYPE, IOASID_BASE + 10)
 * Argument: struct ioasid_unbind_pgtable. Returns 0. The child then
 * translates nothing until a table is bound or mappings are made.
 * Errors: EINVAL (argsz, flags, reserved), E2BIG, EFAULT, ENOENT (unknown
 * IOASID; no table bound), EBUSY (group rule), ENODEV (never attached).
 */
struct ioasid_unbind_pgtable {
	__u32	argsz;
	__u32	flags;		/* none defined: must be 0 */
	__u32	ioasid;
	__u32	__reserved;
};
#define IOASID_UNBIND_PGTABLE		_IO(IOASID_TYPE, IOASID_BASE + 10)

/*
 * IOASID_BIND_PASID_TABLE - _IO(IOASID_TYPE, IOASID_BASE + 11)
 * Argument: struct ioasid_bind_pasid_table. Returns 0.
 *
 * Binds a PASID table kept in user (guest) memory to a child IOASID, which
 * then stands for the per-RID vPASID space of the devices attached to it:
 * PASID p of such a device is translated by the page table that entry p of
 * the table names. table is an address in the PARENT's IOVA space.
 *
 * IOASID_PASID_TABLE_FLAT_X86_64: a flat array of `entries` 8-byte
 * little-endian entries indexed by PASID (PASID 0 is entry 0), contiguous
 * in the parent's IOVA space, table 4 KiB aligned, 1 <= entries <= 2^20.
 * Entry bits: 0 present; 12..51 the address, in the parent's IOVA space,
 * of that PASID's IOASID_PGTABLE_X86_64_4LVL root table (48-bit input).
 * An entry with any other bit set is treated as not present. The user
 * writes entries itself and then issues IOASID_INVALIDATE_CACHE with
 * IOASID_INVALIDATE_PASID_CACHE.
 *
 * Errors: EINVAL (argsz; flags; not a child; unknown format; entries 0 or
 * above 2^20; table not aligned; overflow), E2BIG, EFAULT (unreadable
 * struct; the table is not mapped readable in the parent), ENOENT
 * (unknown IOASID), EBUSY (already bound; the child has DMA mappings or a
 * bound page table; group rule), ENODEV (never attached).
 */
#define IOASID_PASID_TABLE_FLAT_X86_64	1
struct ioasid_bind_pasid_table {
	__u32	argsz;
	__u32	flags;		/* none defined: must be 0 */
	__u32	ioasid;		/* the child */
	__u32	format;		/* IOASID_PASID_TABLE_* */
	__aligned_u64	table;	/* an IOVA of the parent */
	__u32	entries;	/* number of entries (PASIDs 0..entries-1) */
	__u32	__reserved;
};
#define IOASID_BIND_PASID_TABLE		_IO(IOASID_TYPE, IOASID_BASE + 11)

/*
 * IOASID_UNBIND_PASID_TABLE - _IO(IOASID_TYPE, IOASID_BASE + 12)
 * Argument: struct ioasid_unbind_pasid_table. Returns 0.
 * Errors: EINVAL (argsz, flags, reserved), E2BIG, EFAULT, ENOENT (unknown
 * IOASID; no PASID table bound), EBUSY (group rule), ENODEV.
 */
struct ioasid_unbind_pasid_table {
	__u32	argsz;
	__u32	flags;		/* none defined: must be 0 */
	__u32	ioasid;
	__u32	__reserved;
};
#define IOASID_UNBIND_PASID_TABLE	_IO(IOASID_TYPE, IOASID_BASE + 12)

/*
 * IOASID_INVALIDATE_CACHE - _IO(IOASID_TYPE, IOASID_BASE + 13)
 * Argument: struct ioasid_invalidate_cache. Returns 0.
 *
 * Tells the implementation that the user changed a bound table; the
 * implementation walks the attached routings itself (no cache type and no
 * IOMMU granularity in the struct, as the RFC asks). Granularity:
 *   flags 0                     every translation of the IOASID; addr and
 *                               size must be 0
 *   IOASID_INVALIDATE_ADDR      only [addr, addr + size) of the input
 *                               space: 4 KiB aligned, size > 0
 * On an IOASID with a bound PASID table, additionally:
 *   IOASID_INVALIDATE_PASID     restrict to the PASID in `pasid` (else
 *                               every PASID; pasid must then be 0)
 *   IOASID_INVALIDATE_PASID_CACHE  re-read the PASID table entries (the
 *                               one of `pasid`, or all) and everything
 *                               reached through them; not with ADDR
 * Errors: EINVAL (argsz; flags; PASID flags on an IOASID without a PASID
 * table; alignment; overflow; pasid >= 2^20 or past the table; the
 * IOASID has no bound table), E2BIG, EFAULT, ENOENT (unknown IOASID),
 * EBUSY (group rule), ENODEV.
 */
struct ioasid_invalidate_cache {
	__u32	argsz;
	__u32	flags;
#define IOASID_INVALIDATE_ADDR		(1 << 0)
#define IOASID_INVALIDATE_PASID		(1 << 1)
#define IOASID_INVALIDATE_PASID_CACHE	(1 << 2)
	__u32	ioasid;
	__u32	pasid;
	__aligned_u64	addr;
	__aligned_u64	size;
};
#define IOASID_INVALIDATE_CACHE		_IO(IOASID_TYPE, IOASID_BASE + 13)

/*
 * IOASID_DAEMON_IDENTIFY - _IO(IOASID_TYPE, IOASID_BASE + 63)
 * NOT FOR APPLICATIONS. Private to the daemon that serves /dev/ioasid:
 * when a device node receives VFIO_BIND_IOASID_FD, the daemon copies the
 * caller's fd and asks that file which ioasid context it is. Argument:
 * none (ignored). Returns the context id (>= 0).
 * Errors: EPERM for every process but the daemon itself.
 */
#define IOASID_DAEMON_IDENTIFY		_IO(IOASID_TYPE, IOASID_BASE + 63)

/* ======================================================================
 * Commands on a VFIO device file (open("/dev/vfio/devices/devN"))
 * All other VFIO device ioctls keep working on that file.
 * ====================================================================== */

#ifndef VFIO_TYPE
#define VFIO_TYPE	(';')
#endif
#ifndef VFIO_BASE
#define VFIO_BASE	100
#endif

/*
 * VFIO_BIND_IOASID_FD - _IO(VFIO_TYPE, VFIO_BASE + 22)
 * Argument: an ioasid fd of the caller (integer). Returns 0.
 * A device is bound to at most one ioasid file. All bound devices of an
 * IOMMU group must be bound to the same ioasid file.
 * Errors: EBADF (not an open fd), EINVAL (not a /dev/ioasid file of this
 * daemon), EBUSY (the device is already bound; another device of its IOMMU
 * group is bound to a different ioasid file).
 *
 * VFIO_UNBIND_IOASID_FD - _IO(VFIO_TYPE, VFIO_BASE + 23)
 * Argument: the ioasid fd it is bound to (integer). Returns 0. Detaches
 * the device from every IOASID first.
 * Errors: EBADF (not an open fd), EINVAL (not the ioasid file this device
 * is bound to, or not bound).
 */
#define VFIO_BIND_IOASID_FD		_IO(VFIO_TYPE, VFIO_BASE + 22)
#define VFIO_UNBIND_IOASID_FD		_IO(VFIO_TYPE, VFIO_BASE + 23)

/*
 * VFIO_ATTACH_IOASID - _IO(VFIO_TYPE, VFIO_BASE + 24)
 * Argument: struct vfio_attach_ioasid. Returns 0.
 *
 * Without IOASID_ATTACH_USER_PASID (user_pasid must be 0) the device's RID
 * is attached: its DMA is translated by the IOASID. A device has at most
 * one RID attachment to a root IOASID (and, while it lasts, at most one to
 * a child of that root); all RID-attached devices of an IOMMU group share
 * one IOASID. The first device of a group attached makes the IOASID's
 * mappings effective for the group.
 * With IOASID_ATTACH_USER_PASID, the device is attached under the PASID
 * user_pasid (< 2^20), which is used as the physical PASID. The same IOASID
 * may be attached under different PASIDs on different devices.
 * Attaching to a child requires a RID attachment to its parent.
 *
 * Errors: EINVAL (argsz; flags; reserved; device not bound; user_pasid
 * >= 2^20; the device's IOMMU is incompatible with the IOASID, e.g. an
 * existing mapping falls in one of its reserved ranges; attach to a child
 * without attach to its parent), E2BIG, EFAULT, ENOENT (unknown IOASID),
 * EBUSY (the device already has that attachment or another RID attachment;
 * another device of its group is RID-attached to another IOASID), ENOMEM,
 * ENOSPC (making the mappings effective failed; nothing changed).
 *
 * VFIO_DETACH_IOASID - _IO(VFIO_TYPE, VFIO_BASE + 25)
 * Argument: struct vfio_attach_ioasid naming the attachment (ioasid, and
 * the PASID if IOASID_ATTACH_USER_PASID). Returns 0. The last device of a
 * group detached leaves the group with no DMA at all.
 * Errors: EINVAL (argsz, flags, reserved, device not bound), E2BIG,
 * EFAULT, ENOENT (unknown IOASID, or the device has no such attachment),
 * EBUSY (the device is still attached to a child of this IOASID).
 */
struct vfio_attach_ioasid {
	__u32	argsz;
	__u32	flags;
#define IOASID_ATTACH_USER_PASID	(1 << 0)
	__u32	ioasid;
	__u32	user_pasid;
};
#define VFIO_ATTACH_IOASID		_IO(VFIO_TYPE, VFIO_BASE + 24)
#define VFIO_DETACH_IOASID		_IO(VFIO_TYPE, VFIO_BASE + 25)

#ifdef __cplusplus
}
#endif

#endif /* _UAPI_LINUX_IOASID_H */
