//! Every number of the ABI: ioctl numbers, extension ids, flags,
//! capability ids and formats. Names are those of the C header.

/// `_IOC_NONE` shifted into place: 0 on the asm-generic layout (x86, arm,
/// riscv, ...), 1 << 29 on the architectures whose `_IOC_NONE` is 1.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const IOC_NONE_BITS: u32 = 1 << 29;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const IOC_NONE_BITS: u32 = 0;

/// The kernel's `_IO(ty, nr)`: an ioctl number with no size and no
/// direction, `(ty << 8) | nr` on x86-64.
pub const fn io(ty: u8, nr: u8) -> u32 {
    IOC_NONE_BITS | ((ty as u32) << 8) | nr as u32
}

/// The ioctl type of every command of this ABI: `';'`, shared with VFIO
/// and iommufd (see the header for why the numbers do not collide).
pub const IOASID_TYPE: u8 = b';';
/// First command number on the ioasid file; `IOASID_BASE + 0..63` is
/// `0x20..0x5f`, unclaimed under `';'` (VFIO starts at 0x64, iommufd at 0x80).
pub const IOASID_BASE: u8 = 0x20;
/// VFIO's ioctl type (`include/uapi/linux/vfio.h`).
pub const VFIO_TYPE: u8 = b';';
/// VFIO's first command number.
pub const VFIO_BASE: u8 = 100;

// ---- extension ids for IOASID_CHECK_EXTENSION ----

/// `IOASID_MAP_DMA`/`IOASID_UNMAP_DMA` with VFIO type1v2 semantics.
pub const IOASID_EXT_TYPE1V2_DMA: u32 = 1;
/// `IOASID_REGISTER_MEMORY`/`IOASID_UNREGISTER_MEMORY`.
pub const IOASID_EXT_REGISTER_MEMORY: u32 = 2;
/// `IOASID_CREATE_NESTING`, nesting emulated by a shadow page table.
pub const IOASID_EXT_NESTING_SOFTWARE: u32 = 3;
/// Nesting walked by the IOMMU. Always 0 on legacy VFIO.
pub const IOASID_EXT_NESTING_HARDWARE: u32 = 4;
/// `IOASID_BIND_PGTABLE`/`UNBIND_PGTABLE`/`INVALIDATE_CACHE`, emulated by
/// walking and shadowing the user's table.
pub const IOASID_EXT_BIND_PGTABLE_SHADOW: u32 = 5;
/// `IOASID_BIND_PASID_TABLE`/`UNBIND_PASID_TABLE`, emulated.
pub const IOASID_EXT_BIND_PASID_TABLE_SHADOW: u32 = 6;
/// `VFIO_ATTACH_IOASID` with `IOASID_ATTACH_USER_PASID`: recorded, not routed.
pub const IOASID_EXT_USER_PASID_TRACKED: u32 = 7;
/// PASID-tagged DMA routed to the IOASID. Always 0 on legacy VFIO.
pub const IOASID_EXT_PASID_DMA_ROUTING: u32 = 8;

// ---- commands on the ioasid file ----

/// Argument: extension id (integer). Returns 1 or 0.
pub const IOASID_CHECK_EXTENSION: u32 = io(IOASID_TYPE, IOASID_BASE);
/// Argument: [`IoasidRegisterMemory`](crate::IoasidRegisterMemory).
pub const IOASID_REGISTER_MEMORY: u32 = io(IOASID_TYPE, IOASID_BASE + 1);
/// Argument: [`IoasidRegisterMemory`](crate::IoasidRegisterMemory).
pub const IOASID_UNREGISTER_MEMORY: u32 = io(IOASID_TYPE, IOASID_BASE + 2);
/// No argument (ignored). Returns the new IOASID.
pub const IOASID_ALLOC: u32 = io(IOASID_TYPE, IOASID_BASE + 3);
/// Argument: the IOASID (integer).
pub const IOASID_FREE: u32 = io(IOASID_TYPE, IOASID_BASE + 4);
/// Argument: [`IoasidInfo`](crate::IoasidInfo) plus room for capabilities.
pub const IOASID_GET_INFO: u32 = io(IOASID_TYPE, IOASID_BASE + 5);
/// Argument: [`IoasidDmaMap`](crate::IoasidDmaMap).
pub const IOASID_MAP_DMA: u32 = io(IOASID_TYPE, IOASID_BASE + 6);
/// Argument: [`IoasidDmaUnmap`](crate::IoasidDmaUnmap) (size written back).
pub const IOASID_UNMAP_DMA: u32 = io(IOASID_TYPE, IOASID_BASE + 7);
/// Argument: the parent IOASID (integer). Returns the child IOASID.
pub const IOASID_CREATE_NESTING: u32 = io(IOASID_TYPE, IOASID_BASE + 8);
/// Argument: [`IoasidBindPgtable`](crate::IoasidBindPgtable).
pub const IOASID_BIND_PGTABLE: u32 = io(IOASID_TYPE, IOASID_BASE + 9);
/// Argument: [`IoasidUnbindPgtable`](crate::IoasidUnbindPgtable).
pub const IOASID_UNBIND_PGTABLE: u32 = io(IOASID_TYPE, IOASID_BASE + 10);
/// Argument: [`IoasidBindPasidTable`](crate::IoasidBindPasidTable).
pub const IOASID_BIND_PASID_TABLE: u32 = io(IOASID_TYPE, IOASID_BASE + 11);
/// Argument: [`IoasidUnbindPasidTable`](crate::IoasidUnbindPasidTable).
pub const IOASID_UNBIND_PASID_TABLE: u32 = io(IOASID_TYPE, IOASID_BASE + 12);
/// Argument: [`IoasidInvalidateCache`](crate::IoasidInvalidateCache).
pub const IOASID_INVALIDATE_CACHE: u32 = io(IOASID_TYPE, IOASID_BASE + 13);
/// Daemon-private, not for applications: no argument (ignored); returns
/// the context id of the ioasid file, answered only to the daemon itself
/// (`EPERM` for everyone else).
pub const IOASID_DAEMON_IDENTIFY: u32 = io(IOASID_TYPE, IOASID_BASE + 63);

// ---- commands on a VFIO device file ----

/// Argument: an ioasid fd of the caller (integer).
pub const VFIO_BIND_IOASID_FD: u32 = io(VFIO_TYPE, VFIO_BASE + 22);
/// Argument: the ioasid fd the device is bound to (integer).
pub const VFIO_UNBIND_IOASID_FD: u32 = io(VFIO_TYPE, VFIO_BASE + 23);
/// Argument: [`VfioAttachIoasid`](crate::VfioAttachIoasid).
pub const VFIO_ATTACH_IOASID: u32 = io(VFIO_TYPE, VFIO_BASE + 24);
/// Argument: [`VfioAttachIoasid`](crate::VfioAttachIoasid).
pub const VFIO_DETACH_IOASID: u32 = io(VFIO_TYPE, VFIO_BASE + 25);

// ---- IOASID_GET_INFO ----

/// `pgsize_bitmap` is valid.
pub const IOASID_INFO_PGSIZES: u32 = 1 << 0;
/// The IOASID has a capability chain (`cap_offset`, or `argsz` raised).
pub const IOASID_INFO_CAPS: u32 = 1 << 1;
/// The IOASID accepts `IOASID_MAP_DMA`/`IOASID_UNMAP_DMA`.
pub const IOASID_INFO_MAP_DMA: u32 = 1 << 2;
/// The IOASID accepts `IOASID_BIND_PGTABLE`.
pub const IOASID_INFO_BIND_PGTABLE: u32 = 1 << 3;
/// The IOASID accepts `IOASID_BIND_PASID_TABLE`.
pub const IOASID_INFO_BIND_PASID_TABLE: u32 = 1 << 4;
/// The IOASID is a child (see `IOASID_INFO_CAP_PARENT`).
pub const IOASID_INFO_NESTED: u32 = 1 << 5;

/// Capability: permitted IOVA ranges.
pub const IOASID_INFO_CAP_IOVA_RANGES: u16 = 1;
/// Capability: the IOASID may be a parent of `IOASID_CREATE_NESTING`.
pub const IOASID_INFO_CAP_NESTING: u16 = 2;
/// Capability: page-table formats `IOASID_BIND_PGTABLE` accepts.
pub const IOASID_INFO_CAP_PGTABLE_FORMATS: u16 = 3;
/// Capability: PASID attachments.
pub const IOASID_INFO_CAP_PASID: u16 = 4;
/// Capability: the parent of a child IOASID.
pub const IOASID_INFO_CAP_PARENT: u16 = 5;
/// Capability: how many more mappings may be created.
pub const IOASID_INFO_CAP_DMA_AVAIL: u16 = 6;
/// Capability: shadow and walk status of a child IOASID.
pub const IOASID_INFO_CAP_SHADOW: u16 = 7;

/// Nesting kind: shadowed by software.
pub const IOASID_NESTING_SOFTWARE: u32 = 1 << 0;
/// Nesting kind: walked by the IOMMU.
pub const IOASID_NESTING_HARDWARE: u32 = 1 << 1;
/// Page-table format descriptor flag: walked in software and shadowed.
pub const IOASID_PGTABLE_FORMAT_SHADOWED: u32 = 1 << 0;
/// PASID capability flag: PASID attachments are recorded.
pub const IOASID_PASID_ATTACH_TRACKED: u32 = 1 << 0;
/// PASID capability flag: PASID-tagged DMA is translated.
pub const IOASID_PASID_DMA_ROUTED: u32 = 1 << 1;
/// Shadow capability flag: a page table is bound.
pub const IOASID_SHADOW_PGTABLE: u32 = 1 << 0;
/// Shadow capability flag: a PASID table is bound.
pub const IOASID_SHADOW_PASID_TABLE: u32 = 1 << 1;
/// Shadow capability flag: a walk ran out of budget and is incomplete.
pub const IOASID_SHADOW_TRUNCATED: u32 = 1 << 2;

// ---- map / unmap ----

/// Readable from the device.
pub const IOASID_DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// Writable from the device.
pub const IOASID_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// Unmap everything (`iova` and `size` must be 0); VFIO_DMA_UNMAP_FLAG_ALL's value.
pub const IOASID_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

// ---- formats ----

/// x86-64 4-level page table (IA-32e paging, VT-d first level), 48-bit input.
pub const IOASID_PGTABLE_X86_64_4LVL: u32 = 1;
/// Flat PASID table of 8-byte entries indexed by PASID, each naming an
/// `IOASID_PGTABLE_X86_64_4LVL` root table.
pub const IOASID_PASID_TABLE_FLAT_X86_64: u32 = 1;

// ---- invalidation ----

/// Invalidate only `[addr, addr + size)`.
pub const IOASID_INVALIDATE_ADDR: u32 = 1 << 0;
/// Restrict to the PASID in `pasid` (PASID-table IOASID only).
pub const IOASID_INVALIDATE_PASID: u32 = 1 << 1;
/// Re-read PASID table entries (PASID-table IOASID only).
pub const IOASID_INVALIDATE_PASID_CACHE: u32 = 1 << 2;

// ---- attach ----

/// `user_pasid` is valid: attach under that PASID instead of the RID.
pub const IOASID_ATTACH_USER_PASID: u32 = 1 << 0;

// ---- limits that are part of the ABI (stated in the header's prose) ----

/// Largest IOASID: IOASIDs fit the `int` an ioctl returns.
pub const IOASID_MAX_ID: u32 = 0x7fff_ffff;
/// Width of a PASID; `user_pasid` and `pasid` are below `1 << 20`.
pub const IOASID_PASID_BITS: u32 = 20;
/// Most entries a flat PASID table may have.
pub const IOASID_PASID_TABLE_MAX_ENTRIES: u32 = 1 << IOASID_PASID_BITS;
