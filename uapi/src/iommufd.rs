//! The upstream iommufd uAPI (`include/uapi/linux/iommufd.h` of Linux 7.1,
//! as the `iommufd-bindings` 0.2.0 crate was generated from it): the
//! command numbers, which bindgen cannot translate from `_IO()`, and the
//! crate's structs made [`ArgStruct`]s with their sizes checked at compile
//! time. The structs themselves are the crate's; nothing is mirrored here.
//!
//! The cdev structs of `<linux/vfio.h>` (`vfio_device_bind_iommufd` and
//! the attach/detach pair) are in [`crate::vfio`].

use iommufd_bindings::iommufd as b;
pub use iommufd_bindings::iommufd::{
    iommu_destroy, iommu_fault_alloc, iommu_hw_info, iommu_hw_queue_alloc, iommu_hwpt_alloc,
    iommu_hwpt_get_dirty_bitmap, iommu_hwpt_invalidate, iommu_hwpt_set_dirty_tracking,
    iommu_ioas_alloc, iommu_ioas_allow_iovas, iommu_ioas_change_process, iommu_ioas_copy,
    iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_map_file, iommu_ioas_unmap,
    iommu_iova_range, iommu_option, iommu_vdevice_alloc, iommu_veventq_alloc, iommu_vfio_ioas,
    iommu_viommu_alloc,
};

use crate::numbers::io;
use crate::structs::ArgStruct;

/// The ioctl type of every iommufd command (`';'`, shared with VFIO).
pub const IOMMUFD_TYPE: u8 = b::IOMMUFD_TYPE;

const fn cmd(nr: u32) -> u32 {
    io(IOMMUFD_TYPE, nr as u8)
}

/// `IOMMU_DESTROY`
pub const IOMMU_DESTROY: u32 = cmd(b::IOMMUFD_CMD_DESTROY);
/// `IOMMU_IOAS_ALLOC`
pub const IOMMU_IOAS_ALLOC: u32 = cmd(b::IOMMUFD_CMD_IOAS_ALLOC);
/// `IOMMU_IOAS_ALLOW_IOVAS`
pub const IOMMU_IOAS_ALLOW_IOVAS: u32 = cmd(b::IOMMUFD_CMD_IOAS_ALLOW_IOVAS);
/// `IOMMU_IOAS_COPY`
pub const IOMMU_IOAS_COPY: u32 = cmd(b::IOMMUFD_CMD_IOAS_COPY);
/// `IOMMU_IOAS_IOVA_RANGES`
pub const IOMMU_IOAS_IOVA_RANGES: u32 = cmd(b::IOMMUFD_CMD_IOAS_IOVA_RANGES);
/// `IOMMU_IOAS_MAP`
pub const IOMMU_IOAS_MAP: u32 = cmd(b::IOMMUFD_CMD_IOAS_MAP);
/// `IOMMU_IOAS_UNMAP`
pub const IOMMU_IOAS_UNMAP: u32 = cmd(b::IOMMUFD_CMD_IOAS_UNMAP);
/// `IOMMU_OPTION`
pub const IOMMU_OPTION: u32 = cmd(b::IOMMUFD_CMD_OPTION);
/// `IOMMU_VFIO_IOAS`
pub const IOMMU_VFIO_IOAS: u32 = cmd(b::IOMMUFD_CMD_VFIO_IOAS);
/// `IOMMU_HWPT_ALLOC`
pub const IOMMU_HWPT_ALLOC: u32 = cmd(b::IOMMUFD_CMD_HWPT_ALLOC);
/// `IOMMU_GET_HW_INFO`
pub const IOMMU_GET_HW_INFO: u32 = cmd(b::IOMMUFD_CMD_GET_HW_INFO);
/// `IOMMU_HWPT_SET_DIRTY_TRACKING`
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u32 = cmd(b::IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING);
/// `IOMMU_HWPT_GET_DIRTY_BITMAP`
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u32 = cmd(b::IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);
/// `IOMMU_HWPT_INVALIDATE`
pub const IOMMU_HWPT_INVALIDATE: u32 = cmd(b::IOMMUFD_CMD_HWPT_INVALIDATE);
/// `IOMMU_FAULT_QUEUE_ALLOC`
pub const IOMMU_FAULT_QUEUE_ALLOC: u32 = cmd(b::IOMMUFD_CMD_FAULT_QUEUE_ALLOC);
/// `IOMMU_IOAS_MAP_FILE`
pub const IOMMU_IOAS_MAP_FILE: u32 = cmd(b::IOMMUFD_CMD_IOAS_MAP_FILE);
/// `IOMMU_VIOMMU_ALLOC`
pub const IOMMU_VIOMMU_ALLOC: u32 = cmd(b::IOMMUFD_CMD_VIOMMU_ALLOC);
/// `IOMMU_VDEVICE_ALLOC`
pub const IOMMU_VDEVICE_ALLOC: u32 = cmd(b::IOMMUFD_CMD_VDEVICE_ALLOC);
/// `IOMMU_IOAS_CHANGE_PROCESS`
pub const IOMMU_IOAS_CHANGE_PROCESS: u32 = cmd(b::IOMMUFD_CMD_IOAS_CHANGE_PROCESS);
/// `IOMMU_VEVENTQ_ALLOC`
pub const IOMMU_VEVENTQ_ALLOC: u32 = cmd(b::IOMMUFD_CMD_VEVENTQ_ALLOC);
/// `IOMMU_HW_QUEUE_ALLOC`
pub const IOMMU_HW_QUEUE_ALLOC: u32 = cmd(b::IOMMUFD_CMD_HW_QUEUE_ALLOC);

/// The first command number (`IOMMUFD_CMD_BASE`).
pub const IOMMUFD_CMD_FIRST: u32 = b::IOMMUFD_CMD_BASE;
/// The last command number of Linux 7.1.
pub const IOMMUFD_CMD_LAST: u32 = b::IOMMUFD_CMD_HW_QUEUE_ALLOC;

/// Every command with its name, in number order.
pub const ALL: &[(&str, u32)] = &[
    ("IOMMU_DESTROY", IOMMU_DESTROY),
    ("IOMMU_IOAS_ALLOC", IOMMU_IOAS_ALLOC),
    ("IOMMU_IOAS_ALLOW_IOVAS", IOMMU_IOAS_ALLOW_IOVAS),
    ("IOMMU_IOAS_COPY", IOMMU_IOAS_COPY),
    ("IOMMU_IOAS_IOVA_RANGES", IOMMU_IOAS_IOVA_RANGES),
    ("IOMMU_IOAS_MAP", IOMMU_IOAS_MAP),
    ("IOMMU_IOAS_UNMAP", IOMMU_IOAS_UNMAP),
    ("IOMMU_OPTION", IOMMU_OPTION),
    ("IOMMU_VFIO_IOAS", IOMMU_VFIO_IOAS),
    ("IOMMU_HWPT_ALLOC", IOMMU_HWPT_ALLOC),
    ("IOMMU_GET_HW_INFO", IOMMU_GET_HW_INFO),
    (
        "IOMMU_HWPT_SET_DIRTY_TRACKING",
        IOMMU_HWPT_SET_DIRTY_TRACKING,
    ),
    ("IOMMU_HWPT_GET_DIRTY_BITMAP", IOMMU_HWPT_GET_DIRTY_BITMAP),
    ("IOMMU_HWPT_INVALIDATE", IOMMU_HWPT_INVALIDATE),
    ("IOMMU_FAULT_QUEUE_ALLOC", IOMMU_FAULT_QUEUE_ALLOC),
    ("IOMMU_IOAS_MAP_FILE", IOMMU_IOAS_MAP_FILE),
    ("IOMMU_VIOMMU_ALLOC", IOMMU_VIOMMU_ALLOC),
    ("IOMMU_VDEVICE_ALLOC", IOMMU_VDEVICE_ALLOC),
    ("IOMMU_IOAS_CHANGE_PROCESS", IOMMU_IOAS_CHANGE_PROCESS),
    ("IOMMU_VEVENTQ_ALLOC", IOMMU_VEVENTQ_ALLOC),
    ("IOMMU_HW_QUEUE_ALLOC", IOMMU_HW_QUEUE_ALLOC),
];

// ---- flags and enum values (the crate's long bindgen names, shortened) ----

/// `IOMMU_IOAS_MAP_FIXED_IOVA`
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
/// `IOMMU_IOAS_MAP_WRITEABLE`
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
/// `IOMMU_IOAS_MAP_READABLE`
pub const IOMMU_IOAS_MAP_READABLE: u32 = b::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
/// Every flag of `IOMMU_IOAS_MAP`, `MAP_FILE` and `COPY`.
pub const IOMMU_IOAS_MAP_ALL: u32 =
    IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;
/// `IOMMU_OPTION_RLIMIT_MODE`
pub const IOMMU_OPTION_RLIMIT_MODE: u32 = b::iommufd_option_IOMMU_OPTION_RLIMIT_MODE;
/// `IOMMU_OPTION_HUGE_PAGES`
pub const IOMMU_OPTION_HUGE_PAGES: u32 = b::iommufd_option_IOMMU_OPTION_HUGE_PAGES;
/// `IOMMU_OPTION_OP_SET`
pub const IOMMU_OPTION_OP_SET: u16 = b::iommufd_option_ops_IOMMU_OPTION_OP_SET as u16;
/// `IOMMU_OPTION_OP_GET`
pub const IOMMU_OPTION_OP_GET: u16 = b::iommufd_option_ops_IOMMU_OPTION_OP_GET as u16;
/// `IOMMU_VFIO_IOAS_GET`
pub const IOMMU_VFIO_IOAS_GET: u16 = b::iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_GET as u16;
/// `IOMMU_VFIO_IOAS_SET`
pub const IOMMU_VFIO_IOAS_SET: u16 = b::iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_SET as u16;
/// `IOMMU_VFIO_IOAS_CLEAR`
pub const IOMMU_VFIO_IOAS_CLEAR: u16 = b::iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_CLEAR as u16;
/// `IOMMU_HWPT_DATA_NONE`
pub const IOMMU_HWPT_DATA_NONE: u32 = b::iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE;
/// `IOMMU_HW_INFO_TYPE_NONE`
pub const IOMMU_HW_INFO_TYPE_NONE: u32 = b::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_NONE;
/// `IOMMU_HW_INFO_FLAG_INPUT_TYPE`
pub const IOMMU_HW_INFO_FLAG_INPUT_TYPE: u32 =
    b::iommufd_hw_info_flags_IOMMU_HW_INFO_FLAG_INPUT_TYPE;
/// `IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED`
pub const IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED: u64 =
    b::iommufd_hw_capabilities_IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED as u64;
/// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE`
pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 =
    b::iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE;
/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 =
    b::iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR;
/// `IOMMU_VIOMMU_TYPE_DEFAULT`
pub const IOMMU_VIOMMU_TYPE_DEFAULT: u32 = b::iommu_viommu_type_IOMMU_VIOMMU_TYPE_DEFAULT;
/// `IOMMU_VEVENTQ_TYPE_DEFAULT`
pub const IOMMU_VEVENTQ_TYPE_DEFAULT: u32 = b::iommu_veventq_type_IOMMU_VEVENTQ_TYPE_DEFAULT;
/// `IOMMU_HW_QUEUE_TYPE_DEFAULT`
pub const IOMMU_HW_QUEUE_TYPE_DEFAULT: u32 = b::iommu_hw_queue_type_IOMMU_HW_QUEUE_TYPE_DEFAULT;

/// Makes `iommufd-bindings` structs [`ArgStruct`]s, each with the size its
/// fields add up to checked at compile time (so there is no padding).
macro_rules! iommufd_arg_structs {
    ($($t:ident = $size:literal,)+) => {
        $(
            const _: () = assert!(std::mem::size_of::<$t>() == $size);
            // SAFETY: bindgen's `#[repr(C)]` copy of an iommufd uapi struct
            // made of `__u8`/`__u16`/`__u32`/`__s32`/`__u64` fields and (in
            // `iommu_hw_info`) a union of two `__u32`s: no pointers (user
            // pointers are `__u64`), references or drop glue, every bit
            // pattern valid; its size is the sum of its fields (asserted
            // above), so it has no padding.
            unsafe impl ArgStruct for $t {
                const C_NAME: &'static str = stringify!($t);
            }
        )+
    };
}

iommufd_arg_structs! {
    iommu_destroy = 8,
    iommu_ioas_alloc = 12,
    iommu_ioas_allow_iovas = 24,
    iommu_ioas_copy = 40,
    iommu_ioas_iova_ranges = 32,
    iommu_ioas_map = 40,
    iommu_ioas_unmap = 24,
    iommu_option = 24,
    iommu_vfio_ioas = 12,
    iommu_hwpt_alloc = 48,
    iommu_hw_info = 40,
    iommu_hwpt_set_dirty_tracking = 16,
    iommu_hwpt_get_dirty_bitmap = 48,
    iommu_hwpt_invalidate = 32,
    iommu_fault_alloc = 16,
    iommu_ioas_map_file = 40,
    iommu_viommu_alloc = 40,
    iommu_vdevice_alloc = 24,
    iommu_ioas_change_process = 8,
    iommu_veventq_alloc = 32,
    iommu_hw_queue_alloc = 40,
    iommu_iova_range = 16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_the_kernels() {
        // `_IO(';', 0x80 + n)`, pinned to literals.
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert_eq!(IOMMU_HW_QUEUE_ALLOC, 0x3b94);
        for (i, (_, n)) in ALL.iter().enumerate() {
            assert_eq!(*n, 0x3b80 + i as u32);
        }
        assert_eq!(ALL.len() as u32, IOMMUFD_CMD_LAST - IOMMUFD_CMD_FIRST + 1);
    }
}
