//! What the `ioctl-tables` target knows of each command of each node: the
//! fields of its argument (to generate values a handler gets past its first
//! checks) and the errnos the node's uAPI documentation allows once the
//! argument has been read (`docs/uapi.md` for `/dev/ioasid` and `devN`,
//! `docs/iommufd-semantics.md` for `/dev/iommu` and `vfioN`). The reader's
//! own errnos (`EINVAL` below the minimum, `E2BIG`, `EFAULT`, unknown
//! flags) are predicted exactly by the target, not listed here.

use ioasid_uapi::iommufd::*;
use ioasid_uapi::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_detach_iommufd_pt,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_DEVICE_BIND_IOMMUFD, VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_IRQ_INFO, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_PCI_HOT_RESET, VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS,
};
use ioasid_uapi::*;
use ioctl_table::size_of_field;
use nix::errno::Errno::{self, *};
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, vfio_pci_hot_reset, vfio_pci_hot_reset_info,
    vfio_region_info,
};

use super::Node;

/// What a field holds, for the generator.
#[derive(Clone, Copy, Debug)]
pub enum K {
    /// `argsz`/`size`: set by the target's size policy.
    Size,
    /// A flags word: a subset of these bits, sometimes one more.
    Flags(&'static [u64]),
    /// An IOASID or an iommufd object id (mostly one of the few that exist).
    Id,
    /// An IOVA (mostly page multiples in the first 16 MiB).
    Iova,
    /// A client address (mostly in the client's shared memory).
    Vaddr,
    /// A length (mostly a few pages).
    Len,
    /// A pointer into the caller's memory (mostly its scratch area).
    Ptr,
    /// A file descriptor number of the caller.
    Fd,
    /// A small count.
    Count,
    /// A reserved field: mostly 0.
    Zero,
    /// One of these values, mostly.
    Pick(&'static [u64]),
    /// Anything.
    Any,
}

/// One field of an argument struct.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// Its offset.
    pub at: usize,
    /// Its width in bytes.
    pub width: usize,
    /// What it holds.
    pub kind: K,
}

/// What a command takes.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// Nothing (the integer is ignored).
    None,
    /// An integer.
    Int(K),
    /// A struct: its fields, and for a VFIO variable-length struct the
    /// array that may follow it.
    Struct(&'static [Field], Option<Array>),
}

/// The array after a VFIO variable-length struct.
#[derive(Clone, Copy, Debug)]
pub struct Array {
    /// Bytes per element.
    pub elem: usize,
    /// What an element holds.
    pub kind: K,
    /// The offset of the struct's count of elements, if it has one.
    pub count_at: Option<usize>,
}

const fn array(elem: usize, kind: K, count_at: Option<usize>) -> Option<Array> {
    Some(Array {
        elem,
        kind,
        count_at,
    })
}

/// One command of one node.
#[derive(Clone, Copy, Debug)]
pub struct Cmd {
    /// Its number.
    pub number: u32,
    /// Its argument.
    pub arg: Arg,
    /// It takes file descriptors of the caller (the target gives the
    /// caller some only then: copying them costs system calls).
    pub fds: bool,
    /// It reaches client memory through the engine, where `EFAULT` means
    /// memory the daemon cannot alias, not a fault of the argument.
    pub engine_memory: bool,
    /// The errnos its handler may answer, after the reader.
    pub allowed: &'static [Errno],
}

macro_rules! fields {
    ($t:ty { $($f:ident : $k:expr),* $(,)? }) => {
        &[$(Field {
            at: ::core::mem::offset_of!($t, $f),
            width: size_of_field(|s: &$t| &s.$f),
            kind: $k,
        }),*]
    };
}

const fn cmd(number: u32, arg: Arg, allowed: &'static [Errno]) -> Cmd {
    Cmd {
        number,
        arg,
        fds: false,
        engine_memory: false,
        allowed,
    }
}

const fn with_fds(c: Cmd) -> Cmd {
    Cmd { fds: true, ..c }
}

const fn memory(c: Cmd) -> Cmd {
    Cmd {
        engine_memory: true,
        ..c
    }
}

const fn st(f: &'static [Field]) -> Arg {
    Arg::Struct(f, None)
}

const RW: &[u64] = &[1, 2];
const ATTACH_FLAGS: &[u64] = &[IOASID_ATTACH_USER_PASID as u64];
const INV_FLAGS: &[u64] = &[
    IOASID_INVALIDATE_ADDR as u64,
    IOASID_INVALIDATE_PASID as u64,
    IOASID_INVALIDATE_PASID_CACHE as u64,
];
const MAP_FLAGS: &[u64] = &[
    IOMMU_IOAS_MAP_FIXED_IOVA as u64,
    IOMMU_IOAS_MAP_WRITEABLE as u64,
    IOMMU_IOAS_MAP_READABLE as u64,
];
const NO_FLAGS: &[u64] = &[];

const REGISTER: &[Field] = fields!(IoasidRegisterMemory {
    argsz: K::Size,
    flags: K::Flags(NO_FLAGS),
    vaddr: K::Vaddr,
    size: K::Len,
});

/// `/dev/ioasid`.
pub const IOASID: &[Cmd] = &[
    cmd(
        IOASID_CHECK_EXTENSION,
        Arg::Int(K::Pick(&[1, 2, 3, 4, 5, 6, 7, 8])),
        &[],
    ),
    memory(cmd(
        IOASID_REGISTER_MEMORY,
        st(REGISTER),
        &[EINVAL, EEXIST, ENOMEM],
    )),
    cmd(
        IOASID_UNREGISTER_MEMORY,
        st(REGISTER),
        &[EINVAL, ENOENT, EBUSY],
    ),
    cmd(IOASID_ALLOC, Arg::None, &[ENOSPC]),
    cmd(IOASID_FREE, Arg::Int(K::Id), &[ENOENT, EBUSY]),
    cmd(
        IOASID_GET_INFO,
        st(fields!(IoasidInfo {
            argsz: K::Size,
            flags: K::Any,
            ioasid: K::Id,
            cap_offset: K::Any,
            pgsize_bitmap: K::Any,
        })),
        &[ENOENT, EBUSY],
    ),
    memory(cmd(
        IOASID_MAP_DMA,
        st(fields!(IoasidDmaMap {
            argsz: K::Size,
            flags: K::Flags(RW),
            ioasid: K::Id,
            reserved: K::Zero,
            vaddr: K::Vaddr,
            iova: K::Iova,
            size: K::Len,
        })),
        &[EINVAL, ENOENT, EEXIST, EBUSY, ENODEV, ENOMEM, ENOSPC],
    )),
    cmd(
        IOASID_UNMAP_DMA,
        st(fields!(IoasidDmaUnmap {
            argsz: K::Size,
            flags: K::Flags(&[IOASID_DMA_UNMAP_FLAG_ALL as u64]),
            ioasid: K::Id,
            reserved: K::Zero,
            iova: K::Iova,
            size: K::Len,
        })),
        &[EINVAL, ENOENT, EBUSY, ENODEV],
    ),
    cmd(
        IOASID_CREATE_NESTING,
        Arg::Int(K::Id),
        &[ENOENT, EINVAL, ENODEV, EBUSY, ENOSPC],
    ),
    memory(cmd(
        IOASID_BIND_PGTABLE,
        st(fields!(IoasidBindPgtable {
            argsz: K::Size,
            flags: K::Flags(NO_FLAGS),
            ioasid: K::Id,
            format: K::Pick(&[IOASID_PGTABLE_X86_64_4LVL as u64]),
            addr_width: K::Pick(&[48]),
            reserved: K::Zero,
            pgtable: K::Iova,
        })),
        &[EINVAL, ENOENT, EBUSY, ENODEV],
    )),
    cmd(
        IOASID_UNBIND_PGTABLE,
        st(fields!(IoasidUnbindPgtable {
            argsz: K::Size,
            flags: K::Flags(NO_FLAGS),
            ioasid: K::Id,
            reserved: K::Zero,
        })),
        &[EINVAL, ENOENT, EBUSY, ENODEV],
    ),
    memory(cmd(
        IOASID_BIND_PASID_TABLE,
        st(fields!(IoasidBindPasidTable {
            argsz: K::Size,
            flags: K::Flags(NO_FLAGS),
            ioasid: K::Id,
            format: K::Pick(&[IOASID_PASID_TABLE_FLAT_X86_64 as u64]),
            table: K::Iova,
            entries: K::Count,
            reserved: K::Zero,
        })),
        &[EINVAL, ENOENT, EBUSY, ENODEV],
    )),
    cmd(
        IOASID_UNBIND_PASID_TABLE,
        st(fields!(IoasidUnbindPasidTable {
            argsz: K::Size,
            flags: K::Flags(NO_FLAGS),
            ioasid: K::Id,
            reserved: K::Zero,
        })),
        &[EINVAL, ENOENT, EBUSY, ENODEV],
    ),
    cmd(
        IOASID_INVALIDATE_CACHE,
        st(fields!(IoasidInvalidateCache {
            argsz: K::Size,
            flags: K::Flags(INV_FLAGS),
            ioasid: K::Id,
            pasid: K::Count,
            addr: K::Iova,
            size: K::Len,
        })),
        &[EINVAL, ENOENT, EBUSY, ENODEV],
    ),
    cmd(IOASID_DAEMON_IDENTIFY, Arg::None, &[EPERM]),
];

/// `/dev/iommu`.
pub const IOMMUFD: &[Cmd] = &[
    cmd(
        IOMMU_DESTROY,
        st(fields!(iommu_destroy {
            size: K::Size,
            id: K::Id
        })),
        &[ENOENT, EBUSY],
    ),
    cmd(
        IOMMU_IOAS_ALLOC,
        st(fields!(iommu_ioas_alloc {
            size: K::Size,
            flags: K::Flags(NO_FLAGS),
            out_ioas_id: K::Any
        })),
        &[ENOSPC],
    ),
    cmd(
        IOMMU_IOAS_ALLOW_IOVAS,
        st(fields!(iommu_ioas_allow_iovas {
            size: K::Size,
            ioas_id: K::Id,
            num_iovas: K::Count,
            __reserved: K::Zero,
            allowed_iovas: K::Ptr,
        })),
        &[EOPNOTSUPP, ENOENT, EINVAL, EADDRINUSE, ENOMEM],
    ),
    cmd(
        IOMMU_IOAS_COPY,
        st(fields!(iommu_ioas_copy {
            size: K::Size,
            flags: K::Flags(MAP_FLAGS),
            dst_ioas_id: K::Id,
            src_ioas_id: K::Id,
            length: K::Len,
            dst_iova: K::Iova,
            src_iova: K::Iova,
        })),
        &[EOVERFLOW, EINVAL, ENOENT, EPERM, EEXIST, ENOSPC, ENOMEM],
    ),
    cmd(
        IOMMU_IOAS_IOVA_RANGES,
        st(fields!(iommu_ioas_iova_ranges {
            size: K::Size,
            ioas_id: K::Id,
            num_iovas: K::Count,
            __reserved: K::Zero,
            allowed_iovas: K::Ptr,
            out_iova_alignment: K::Any,
        })),
        &[EOPNOTSUPP, ENOENT, EMSGSIZE],
    ),
    memory(cmd(
        IOMMU_IOAS_MAP,
        st(fields!(iommu_ioas_map {
            size: K::Size,
            flags: K::Flags(MAP_FLAGS),
            ioas_id: K::Id,
            __reserved: K::Zero,
            user_va: K::Vaddr,
            length: K::Len,
            iova: K::Iova,
        })),
        &[
            EOPNOTSUPP, EOVERFLOW, EINVAL, ENOENT, EEXIST, ENOSPC, ENOMEM,
        ],
    )),
    cmd(
        IOMMU_IOAS_UNMAP,
        st(fields!(iommu_ioas_unmap {
            size: K::Size,
            ioas_id: K::Id,
            iova: K::Iova,
            length: K::Len
        })),
        &[ENOENT, EOVERFLOW, EINVAL],
    ),
    cmd(
        IOMMU_OPTION,
        st(fields!(iommu_option {
            size: K::Size,
            option_id: K::Pick(&[0, 1]),
            op: K::Pick(&[0, 1]),
            __reserved: K::Zero,
            object_id: K::Id,
            val64: K::Pick(&[0, 1]),
        })),
        &[EOPNOTSUPP, EPERM, EBUSY, EINVAL, ENOENT, EADDRINUSE],
    ),
    cmd(
        IOMMU_VFIO_IOAS,
        st(fields!(iommu_vfio_ioas {
            size: K::Size,
            ioas_id: K::Id,
            op: K::Pick(&[0, 1, 2]),
            __reserved: K::Zero,
        })),
        &[EOPNOTSUPP, ENODEV, ENOENT],
    ),
    cmd(
        IOMMU_HWPT_ALLOC,
        st(fields!(iommu_hwpt_alloc {
            size: K::Size,
            flags: K::Flags(&[1, 2, 4, 8]),
            dev_id: K::Id,
            pt_id: K::Id,
            out_hwpt_id: K::Any,
            __reserved: K::Zero,
            data_type: K::Pick(&[0, 1, 2]),
            data_len: K::Pick(&[0, 8]),
            data_uptr: K::Ptr,
            fault_id: K::Zero,
            __reserved2: K::Any,
        })),
        &[EOPNOTSUPP, EINVAL, ENOENT, EADDRINUSE, ENOSPC],
    ),
    cmd(
        IOMMU_GET_HW_INFO,
        st(fields!(iommu_hw_info {
            size: K::Size,
            flags: K::Flags(&[1]),
            dev_id: K::Id,
            data_len: K::Count,
            data_uptr: K::Ptr,
            __bindgen_anon_1: K::Pick(&[0, 1, 2]),
            out_max_pasid_log2: K::Any,
            __reserved: K::Zero,
            out_capabilities: K::Any,
        })),
        &[EOPNOTSUPP, ENOENT],
    ),
    cmd(
        IOMMU_HWPT_SET_DIRTY_TRACKING,
        st(fields!(iommu_hwpt_set_dirty_tracking {
            size: K::Size,
            flags: K::Flags(&[1]),
            hwpt_id: K::Id,
            __reserved: K::Zero,
        })),
        &[EOPNOTSUPP, ENOENT],
    ),
    cmd(
        IOMMU_HWPT_GET_DIRTY_BITMAP,
        st(fields!(iommu_hwpt_get_dirty_bitmap {
            size: K::Size,
            hwpt_id: K::Id,
            flags: K::Flags(&[1]),
            __reserved: K::Zero,
            iova: K::Iova,
            length: K::Len,
            page_size: K::Pick(&[4096, 0]),
            data: K::Ptr,
        })),
        &[EOPNOTSUPP, ENOENT, EOVERFLOW, EINVAL],
    ),
    cmd(
        IOMMU_HWPT_INVALIDATE,
        st(fields!(iommu_hwpt_invalidate {
            size: K::Size,
            hwpt_id: K::Id,
            data_uptr: K::Ptr,
            data_type: K::Pick(&[0, 1]),
            entry_len: K::Pick(&[0, 16, 4096, 4097]),
            entry_num: K::Count,
            __reserved: K::Zero,
        })),
        &[EOPNOTSUPP, EINVAL, ENOENT],
    ),
    cmd(
        IOMMU_FAULT_QUEUE_ALLOC,
        st(fields!(iommu_fault_alloc {
            size: K::Size,
            flags: K::Flags(NO_FLAGS),
            out_fault_id: K::Any,
            out_fault_fd: K::Any,
        })),
        &[EOPNOTSUPP],
    ),
    with_fds(memory(cmd(
        IOMMU_IOAS_MAP_FILE,
        st(fields!(iommu_ioas_map_file {
            size: K::Size,
            flags: K::Flags(MAP_FLAGS),
            ioas_id: K::Id,
            fd: K::Fd,
            start: K::Iova,
            length: K::Len,
            iova: K::Iova,
        })),
        &[
            EOPNOTSUPP, EOVERFLOW, EINVAL, ENOENT, EBADF, EEXIST, ENOSPC, ENOMEM, EPERM,
        ],
    ))),
    cmd(
        IOMMU_VIOMMU_ALLOC,
        st(fields!(iommu_viommu_alloc {
            size: K::Size,
            flags: K::Flags(NO_FLAGS),
            type_: K::Pick(&[0, 1, 2]),
            dev_id: K::Id,
            hwpt_id: K::Id,
            out_viommu_id: K::Any,
            data_len: K::Count,
            __reserved: K::Zero,
            data_uptr: K::Ptr,
        })),
        &[EOPNOTSUPP, ENOENT],
    ),
    cmd(
        IOMMU_VDEVICE_ALLOC,
        st(fields!(iommu_vdevice_alloc {
            size: K::Size,
            viommu_id: K::Id,
            dev_id: K::Id,
            out_vdevice_id: K::Any,
            virt_id: K::Any,
        })),
        &[EINVAL, ENOENT],
    ),
    cmd(
        IOMMU_IOAS_CHANGE_PROCESS,
        st(fields!(iommu_ioas_change_process {
            size: K::Size,
            __reserved: K::Zero
        })),
        &[EOPNOTSUPP, EINVAL, ENOMEM],
    ),
    cmd(
        IOMMU_VEVENTQ_ALLOC,
        st(fields!(iommu_veventq_alloc {
            size: K::Size,
            flags: K::Flags(NO_FLAGS),
            viommu_id: K::Id,
            type_: K::Pick(&[0, 1]),
            veventq_depth: K::Count,
            out_veventq_id: K::Any,
            out_veventq_fd: K::Any,
            __reserved: K::Zero,
        })),
        &[EOPNOTSUPP, EINVAL, ENOENT],
    ),
    cmd(
        IOMMU_HW_QUEUE_ALLOC,
        st(fields!(iommu_hw_queue_alloc {
            size: K::Size,
            flags: K::Flags(NO_FLAGS),
            viommu_id: K::Id,
            type_: K::Pick(&[0, 1]),
            index: K::Count,
            out_hw_queue_id: K::Any,
            nesting_parent_iova: K::Iova,
            length: K::Len,
        })),
        &[EOPNOTSUPP, EINVAL, EOVERFLOW, ENOENT],
    ),
];

const IRQ_SET_FLAGS: &[u64] = &[1, 2, 4, 8, 16, 32];

const DEVICE_INFO: &[Field] = fields!(vfio_device_info {
    argsz: K::Size,
    flags: K::Any,
    num_regions: K::Any,
    num_irqs: K::Any,
    cap_offset: K::Any,
    pad: K::Any,
});
const REGION_INFO: &[Field] = fields!(vfio_region_info {
    argsz: K::Size,
    flags: K::Any,
    index: K::Count,
    cap_offset: K::Any,
    size: K::Any,
    offset: K::Any,
});
const IRQ_INFO: &[Field] = fields!(vfio_irq_info {
    argsz: K::Size,
    flags: K::Any,
    index: K::Count,
    count: K::Any,
});
const IRQ_SET: &[Field] = fields!(vfio_irq_set {
    argsz: K::Size,
    flags: K::Flags(IRQ_SET_FLAGS),
    index: K::Count,
    start: K::Count,
    count: K::Count,
});
const HOT_RESET_INFO: &[Field] = fields!(vfio_pci_hot_reset_info {
    argsz: K::Size,
    flags: K::Any,
    count: K::Count,
});
const HOT_RESET: &[Field] = fields!(vfio_pci_hot_reset {
    argsz: K::Size,
    flags: K::Zero,
    count: K::Count,
});

/// The VFIO device commands both device nodes forward; `hot_reset` is
/// what the node may answer to a reset (`EPERM` on `devN` for devices it
/// does not own, `EINVAL` on `vfioN`).
const fn device_commands(hot_reset: &'static [Errno]) -> [Cmd; 7] {
    [
        cmd(
            VFIO_DEVICE_GET_INFO,
            Arg::Struct(DEVICE_INFO, array(8, K::Any, None)),
            &[EINVAL],
        ),
        cmd(
            VFIO_DEVICE_GET_REGION_INFO,
            Arg::Struct(REGION_INFO, array(16, K::Zero, None)),
            &[EINVAL],
        ),
        cmd(VFIO_DEVICE_GET_IRQ_INFO, st(IRQ_INFO), &[EINVAL]),
        with_fds(cmd(
            VFIO_DEVICE_SET_IRQS,
            Arg::Struct(IRQ_SET, array(4, K::Fd, Some(16))),
            &[EINVAL, EBADF, EMFILE],
        )),
        cmd(VFIO_DEVICE_RESET, Arg::None, &[EINVAL]),
        cmd(
            VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
            Arg::Struct(HOT_RESET_INFO, array(8, K::Any, Some(8))),
            &[EINVAL, ENODEV, ENOSPC],
        ),
        with_fds(cmd(
            VFIO_DEVICE_PCI_HOT_RESET,
            Arg::Struct(HOT_RESET, array(4, K::Fd, Some(8))),
            hot_reset,
        )),
    ]
}

const DEVICE_DEVN: [Cmd; 7] = device_commands(&[EINVAL, ENODEV, EPERM]);
const DEVICE_VFION: [Cmd; 7] = device_commands(&[EINVAL, ENODEV, EBUSY]);

const ATTACH: &[Field] = fields!(VfioAttachIoasid {
    argsz: K::Size,
    flags: K::Flags(ATTACH_FLAGS),
    ioasid: K::Id,
    user_pasid: K::Zero,
});

/// `/dev/vfio/devices/devN`.
pub const DEVN: &[Cmd] = &[
    DEVICE_DEVN[0],
    DEVICE_DEVN[1],
    DEVICE_DEVN[2],
    DEVICE_DEVN[3],
    DEVICE_DEVN[4],
    DEVICE_DEVN[5],
    DEVICE_DEVN[6],
    with_fds(cmd(
        VFIO_BIND_IOASID_FD,
        Arg::Int(K::Fd),
        &[EBADF, EINVAL, EBUSY],
    )),
    with_fds(cmd(
        VFIO_UNBIND_IOASID_FD,
        Arg::Int(K::Fd),
        &[EBADF, EINVAL],
    )),
    cmd(
        VFIO_ATTACH_IOASID,
        st(ATTACH),
        &[EINVAL, ENOENT, EBUSY, ENOMEM, ENOSPC],
    ),
    cmd(VFIO_DETACH_IOASID, st(ATTACH), &[EINVAL, ENOENT, EBUSY]),
];

/// `/dev/vfio/devices/vfioN`.
pub const VFION: &[Cmd] = &[
    DEVICE_VFION[0],
    DEVICE_VFION[1],
    DEVICE_VFION[2],
    DEVICE_VFION[3],
    DEVICE_VFION[4],
    DEVICE_VFION[5],
    DEVICE_VFION[6],
    with_fds(cmd(
        VFIO_DEVICE_BIND_IOMMUFD,
        st(fields!(vfio_device_bind_iommufd {
            argsz: K::Size,
            flags: K::Flags(&[1]),
            iommufd: K::Fd,
            out_devid: K::Any,
            token_uuid_ptr: K::Ptr,
        })),
        &[EINVAL, EBUSY, EBADF, EBADFD],
    )),
    cmd(
        VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        st(fields!(vfio_device_attach_iommufd_pt {
            argsz: K::Size,
            flags: K::Flags(&[1]),
            pt_id: K::Id,
            pasid: K::Zero,
        })),
        &[EINVAL, ENOENT, EADDRINUSE, ENOSPC, ENOMEM],
    ),
    cmd(
        VFIO_DEVICE_DETACH_IOMMUFD_PT,
        st(fields!(vfio_device_detach_iommufd_pt {
            argsz: K::Size,
            flags: K::Flags(&[1]),
            pasid: K::Zero,
        })),
        &[EINVAL],
    ),
];

/// The commands of `node`.
pub fn of(node: Node) -> &'static [Cmd] {
    match node {
        Node::Ioasid => IOASID,
        Node::Iommufd => IOMMUFD,
        Node::DevN => DEVN,
        Node::VfioN => VFION,
    }
}
