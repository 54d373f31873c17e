//! The argument structs, field for field as in the C header (`__reserved`
//! is spelled `reserved`). Each carries compile-time checks of its size and
//! of every field's offset, and describes its layout through [`CStruct`].

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// One field of an ABI struct, as the layout test compares it with C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldLayout {
    /// Rust field name (C name without leading underscores).
    pub name: &'static str,
    /// Byte offset.
    pub offset: usize,
    /// Byte size.
    pub size: usize,
}

/// An ABI struct mirrored from the C header.
pub trait CStruct: FromBytes + IntoBytes + KnownLayout + Immutable + Copy {
    /// The struct's name in C (`struct <C_NAME>`).
    const C_NAME: &'static str;
    /// Every field, in declaration order.
    const FIELDS: &'static [FieldLayout];
}

/// A struct an ioctl takes by pointer, read from and written to the caller
/// or the kernel as plain bytes (see [`crate::plain`]). Every [`CStruct`]
/// is one; a struct of a bindings crate is made one in this crate (VFIO's
/// in [`crate::vfio`]), with its own safety argument.
///
/// # Safety
///
/// Implement it only for a `#[repr(C)]` struct without padding, pointers,
/// references or drop glue, every bit pattern of which (all zeros
/// included) is a valid value.
pub unsafe trait ArgStruct: Sized + Send + Sync + 'static {
    /// The struct's name in C, for messages.
    const C_NAME: &'static str;
}

// SAFETY: a `CStruct` derives zerocopy's `FromBytes` (every bit pattern is
// valid) and `IntoBytes` (no padding), which the derive checks at compile
// time; it is `Copy` (no drop glue) and `abi_struct!` makes it `#[repr(C)]`.
unsafe impl<T: CStruct + Send + Sync + 'static> ArgStruct for T {
    const C_NAME: &'static str = <T as CStruct>::C_NAME;
}

/// Defines an ABI struct with literal size and offsets, checked at compile
/// time, and its [`CStruct`] description generated from the same list, so
/// the description cannot miss a field.
macro_rules! abi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident = $cname:literal, size $size:literal {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty = $off:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )+
        }

        const _: () = {
            assert!(::core::mem::size_of::<$name>() == $size);
            $( assert!(::core::mem::offset_of!($name, $field) == $off); )+
        };

        impl CStruct for $name {
            const C_NAME: &'static str = $cname;
            const FIELDS: &'static [FieldLayout] = &[
                $( FieldLayout {
                    name: stringify!($field),
                    offset: ::core::mem::offset_of!($name, $field),
                    size: ::core::mem::size_of::<$ty>(),
                }, )+
            ];
        }
    };
}

abi_struct! {
    /// `IOASID_REGISTER_MEMORY` / `IOASID_UNREGISTER_MEMORY`.
    pub struct IoasidRegisterMemory = "ioasid_register_memory", size 24 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// None defined: must be 0.
        pub flags: u32 = 4,
        /// Start, in the caller's address space.
        pub vaddr: u64 = 8,
        /// Bytes.
        pub size: u64 = 16,
    }
}

abi_struct! {
    /// `IOASID_GET_INFO`: in `argsz`, `ioasid`; out the rest, then the
    /// capability chain inside `argsz`.
    pub struct IoasidInfo = "ioasid_info", size 24 {
        /// In: buffer size; out: raised to the size needed for the chain.
        pub argsz: u32 = 0,
        /// Out: `IOASID_INFO_*` (ignored on input).
        pub flags: u32 = 4,
        /// In: the IOASID.
        pub ioasid: u32 = 8,
        /// Out: offset of the first capability, or 0.
        pub cap_offset: u32 = 12,
        /// Out: page sizes `IOASID_MAP_DMA` accepts.
        pub pgsize_bitmap: u64 = 16,
    }
}

abi_struct! {
    /// Header of every `IOASID_GET_INFO` capability.
    pub struct IoasidInfoCapHeader = "ioasid_info_cap_header", size 8 {
        /// `IOASID_INFO_CAP_*`.
        pub id: u16 = 0,
        /// 1 for every capability of this ABI.
        pub version: u16 = 2,
        /// Offset of the next capability from the start of the info struct; 0 ends.
        pub next: u32 = 4,
    }
}

abi_struct! {
    /// One permitted IOVA range, `last` inclusive.
    pub struct IoasidIovaRange = "ioasid_iova_range", size 16 {
        /// First IOVA.
        pub start: u64 = 0,
        /// Last IOVA (inclusive).
        pub last: u64 = 8,
    }
}

abi_struct! {
    /// `IOASID_INFO_CAP_IOVA_RANGES`, followed by `nr_ranges` [`IoasidIovaRange`].
    pub struct IoasidInfoCapIovaRanges = "ioasid_info_cap_iova_ranges", size 16 {
        /// Capability header.
        pub header: IoasidInfoCapHeader = 0,
        /// Number of ranges that follow.
        pub nr_ranges: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
    }
}

abi_struct! {
    /// `IOASID_INFO_CAP_NESTING`.
    pub struct IoasidInfoCapNesting = "ioasid_info_cap_nesting", size 16 {
        /// Capability header.
        pub header: IoasidInfoCapHeader = 0,
        /// `IOASID_NESTING_SOFTWARE` / `IOASID_NESTING_HARDWARE`.
        pub flags: u32 = 8,
        /// Levels of children that may still be created below this IOASID.
        pub levels: u32 = 12,
    }
}

abi_struct! {
    /// One page-table format `IOASID_BIND_PGTABLE` accepts.
    pub struct IoasidPgtableFormatDesc = "ioasid_pgtable_format_desc", size 24 {
        /// `IOASID_PGTABLE_*`.
        pub format: u32 = 0,
        /// `IOASID_PGTABLE_FORMAT_SHADOWED`.
        pub flags: u32 = 4,
        /// Input address width accepted, in bits.
        pub addr_width: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
        /// Page sizes the format maps.
        pub pgsize_bitmap: u64 = 16,
    }
}

abi_struct! {
    /// `IOASID_INFO_CAP_PGTABLE_FORMATS`, followed by `nr_formats`
    /// [`IoasidPgtableFormatDesc`].
    pub struct IoasidInfoCapPgtableFormats = "ioasid_info_cap_pgtable_formats", size 16 {
        /// Capability header.
        pub header: IoasidInfoCapHeader = 0,
        /// Number of descriptors that follow.
        pub nr_formats: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
    }
}

abi_struct! {
    /// `IOASID_INFO_CAP_PASID`.
    pub struct IoasidInfoCapPasid = "ioasid_info_cap_pasid", size 24 {
        /// Capability header.
        pub header: IoasidInfoCapHeader = 0,
        /// `IOASID_PASID_ATTACH_TRACKED` / `IOASID_PASID_DMA_ROUTED`.
        pub flags: u32 = 8,
        /// Width of a PASID (20).
        pub pasid_bits: u32 = 12,
        /// `IOASID_PASID_TABLE_*` that `IOASID_BIND_PASID_TABLE` accepts here, 0: none.
        pub pasid_table_format: u32 = 16,
        /// Must be 0.
        pub reserved: u32 = 20,
    }
}

abi_struct! {
    /// `IOASID_INFO_CAP_PARENT`.
    pub struct IoasidInfoCapParent = "ioasid_info_cap_parent", size 16 {
        /// Capability header.
        pub header: IoasidInfoCapHeader = 0,
        /// The parent IOASID.
        pub parent: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
    }
}

abi_struct! {
    /// `IOASID_INFO_CAP_DMA_AVAIL`.
    pub struct IoasidInfoCapDmaAvail = "ioasid_info_cap_dma_avail", size 16 {
        /// Capability header.
        pub header: IoasidInfoCapHeader = 0,
        /// Mappings `IOASID_MAP_DMA` may still create before `ENOSPC`.
        pub avail: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
    }
}

abi_struct! {
    /// `IOASID_INFO_CAP_SHADOW`: shadow and walk status of a child.
    pub struct IoasidInfoCapShadow = "ioasid_info_cap_shadow", size 104 {
        /// Capability header.
        pub header: IoasidInfoCapHeader = 0,
        /// `IOASID_SHADOW_*`.
        pub flags: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
        /// Entries of the shadow now.
        pub shadow_entries: u64 = 16,
        /// Leaves of the bound page table cached now.
        pub leaves: u64 = 24,
        /// Leaves found by the last walk.
        pub last_walk_leaves: u64 = 32,
        /// Malformed entries met by the last walk.
        pub last_walk_malformed: u64 = 40,
        /// Tables read by the last walk.
        pub last_walk_tables: u64 = 48,
        /// Malformed entries met by every walk since the bind.
        pub malformed: u64 = 56,
        /// Walks since the bind.
        pub walks: u64 = 64,
        /// Entries of the bound PASID table.
        pub pasid_entries: u32 = 72,
        /// PASIDs with a present, well-formed entry.
        pub pasid_valid: u32 = 76,
        /// Present entries with other bits set (treated as not present).
        pub pasid_bad: u32 = 80,
        /// Entries the parent no longer maps readable.
        pub pasid_unreadable: u32 = 84,
        /// Leaves of the valid PASIDs' page tables.
        pub pasid_leaves: u64 = 88,
        /// Malformed entries met by the last walk of each valid PASID's table.
        pub pasid_malformed: u64 = 96,
    }
}

abi_struct! {
    /// `IOASID_MAP_DMA`.
    pub struct IoasidDmaMap = "ioasid_dma_map", size 40 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// `IOASID_DMA_MAP_FLAG_READ` / `_WRITE`.
        pub flags: u32 = 4,
        /// The IOASID.
        pub ioasid: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
        /// Caller address (root IOASID) or parent IOVA (child).
        pub vaddr: u64 = 16,
        /// IOVA.
        pub iova: u64 = 24,
        /// Bytes.
        pub size: u64 = 32,
    }
}

abi_struct! {
    /// `IOASID_UNMAP_DMA`; `size` is written back.
    pub struct IoasidDmaUnmap = "ioasid_dma_unmap", size 32 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// `IOASID_DMA_UNMAP_FLAG_ALL`.
        pub flags: u32 = 4,
        /// The IOASID.
        pub ioasid: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
        /// IOVA.
        pub iova: u64 = 16,
        /// In: bytes; out: bytes unmapped.
        pub size: u64 = 24,
    }
}

abi_struct! {
    /// `IOASID_BIND_PGTABLE`.
    pub struct IoasidBindPgtable = "ioasid_bind_pgtable", size 32 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// None defined: must be 0.
        pub flags: u32 = 4,
        /// The child IOASID.
        pub ioasid: u32 = 8,
        /// `IOASID_PGTABLE_*`.
        pub format: u32 = 12,
        /// Input address width, in bits (48 for `IOASID_PGTABLE_X86_64_4LVL`).
        pub addr_width: u32 = 16,
        /// Must be 0.
        pub reserved: u32 = 20,
        /// Root table, an IOVA of the parent.
        pub pgtable: u64 = 24,
    }
}

abi_struct! {
    /// `IOASID_UNBIND_PGTABLE`.
    pub struct IoasidUnbindPgtable = "ioasid_unbind_pgtable", size 16 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// None defined: must be 0.
        pub flags: u32 = 4,
        /// The child IOASID.
        pub ioasid: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
    }
}

abi_struct! {
    /// `IOASID_BIND_PASID_TABLE`.
    pub struct IoasidBindPasidTable = "ioasid_bind_pasid_table", size 32 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// None defined: must be 0.
        pub flags: u32 = 4,
        /// The child IOASID.
        pub ioasid: u32 = 8,
        /// `IOASID_PASID_TABLE_*`.
        pub format: u32 = 12,
        /// The table, an IOVA of the parent.
        pub table: u64 = 16,
        /// Number of entries (PASIDs `0..entries`).
        pub entries: u32 = 24,
        /// Must be 0.
        pub reserved: u32 = 28,
    }
}

abi_struct! {
    /// `IOASID_UNBIND_PASID_TABLE`.
    pub struct IoasidUnbindPasidTable = "ioasid_unbind_pasid_table", size 16 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// None defined: must be 0.
        pub flags: u32 = 4,
        /// The child IOASID.
        pub ioasid: u32 = 8,
        /// Must be 0.
        pub reserved: u32 = 12,
    }
}

abi_struct! {
    /// `IOASID_INVALIDATE_CACHE`.
    pub struct IoasidInvalidateCache = "ioasid_invalidate_cache", size 32 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// `IOASID_INVALIDATE_ADDR` / `_PASID` / `_PASID_CACHE`.
        pub flags: u32 = 4,
        /// The IOASID.
        pub ioasid: u32 = 8,
        /// The PASID, with `IOASID_INVALIDATE_PASID`; else 0.
        pub pasid: u32 = 12,
        /// Start of the range, with `IOASID_INVALIDATE_ADDR`; else 0.
        pub addr: u64 = 16,
        /// Bytes, with `IOASID_INVALIDATE_ADDR`; else 0.
        pub size: u64 = 24,
    }
}

abi_struct! {
    /// `VFIO_ATTACH_IOASID` / `VFIO_DETACH_IOASID`.
    pub struct VfioAttachIoasid = "vfio_attach_ioasid", size 16 {
        /// Size of the struct as the caller knows it.
        pub argsz: u32 = 0,
        /// `IOASID_ATTACH_USER_PASID`.
        pub flags: u32 = 4,
        /// The IOASID.
        pub ioasid: u32 = 8,
        /// The PASID, with `IOASID_ATTACH_USER_PASID`; else 0.
        pub user_pasid: u32 = 12,
    }
}

/// Layouts of every ABI struct, for tests that compare them with C.
pub const ALL_STRUCTS: &[(&str, usize, &[FieldLayout])] = &[
    entry::<IoasidRegisterMemory>(),
    entry::<IoasidInfo>(),
    entry::<IoasidInfoCapHeader>(),
    entry::<IoasidIovaRange>(),
    entry::<IoasidInfoCapIovaRanges>(),
    entry::<IoasidInfoCapNesting>(),
    entry::<IoasidPgtableFormatDesc>(),
    entry::<IoasidInfoCapPgtableFormats>(),
    entry::<IoasidInfoCapPasid>(),
    entry::<IoasidInfoCapParent>(),
    entry::<IoasidInfoCapDmaAvail>(),
    entry::<IoasidInfoCapShadow>(),
    entry::<IoasidDmaMap>(),
    entry::<IoasidDmaUnmap>(),
    entry::<IoasidBindPgtable>(),
    entry::<IoasidUnbindPgtable>(),
    entry::<IoasidBindPasidTable>(),
    entry::<IoasidUnbindPasidTable>(),
    entry::<IoasidInvalidateCache>(),
    entry::<VfioAttachIoasid>(),
];

const fn entry<T: CStruct>() -> (&'static str, usize, &'static [FieldLayout]) {
    (T::C_NAME, core::mem::size_of::<T>(), T::FIELDS)
}
