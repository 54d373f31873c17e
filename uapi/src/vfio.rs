//! Numbers of the legacy VFIO ioctls (`include/uapi/linux/vfio.h`), which
//! the daemon issues on real VFIO files or forwards from a device node.
//! The `vfio-bindings` crate has VFIO's structs and constants but not its
//! ioctl numbers (bindgen cannot translate `_IO()`), so they live here.
//! Several numbers are shared by commands on different file types, exactly
//! as in the kernel (e.g. `VFIO_BASE + 12`).

pub use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_detach_iommufd_pt,
    VFIO_DEVICE_ATTACH_PASID, VFIO_DEVICE_BIND_FLAG_TOKEN, VFIO_DEVICE_DETACH_PASID,
    VFIO_PCI_DEVID_NOT_OWNED, VFIO_PCI_DEVID_OWNED, VFIO_PCI_HOT_RESET_FLAG_DEV_ID,
    VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED,
};
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_info_cap_header, vfio_irq_info, vfio_irq_set, vfio_pci_dependent_device,
    vfio_pci_hot_reset, vfio_pci_hot_reset_info, vfio_region_info,
};

use crate::numbers::{io, VFIO_BASE, VFIO_TYPE};
use crate::structs::ArgStruct;

const fn vfio(n: u8) -> u32 {
    io(VFIO_TYPE, VFIO_BASE + n)
}

// ---- container (/dev/vfio/vfio) ----

/// `VFIO_GET_API_VERSION`
pub const VFIO_GET_API_VERSION: u32 = vfio(0);
/// `VFIO_CHECK_EXTENSION`
pub const VFIO_CHECK_EXTENSION: u32 = vfio(1);
/// `VFIO_SET_IOMMU`
pub const VFIO_SET_IOMMU: u32 = vfio(2);

// ---- group (/dev/vfio/N) ----

/// `VFIO_GROUP_GET_STATUS`
pub const VFIO_GROUP_GET_STATUS: u32 = vfio(3);
/// `VFIO_GROUP_SET_CONTAINER`
pub const VFIO_GROUP_SET_CONTAINER: u32 = vfio(4);
/// `VFIO_GROUP_UNSET_CONTAINER`
pub const VFIO_GROUP_UNSET_CONTAINER: u32 = vfio(5);
/// `VFIO_GROUP_GET_DEVICE_FD`
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio(6);

// ---- device ----

/// `VFIO_DEVICE_GET_INFO`
pub const VFIO_DEVICE_GET_INFO: u32 = vfio(7);
/// `VFIO_DEVICE_GET_REGION_INFO`
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio(8);
/// `VFIO_DEVICE_GET_IRQ_INFO`
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = vfio(9);
/// `VFIO_DEVICE_SET_IRQS`
pub const VFIO_DEVICE_SET_IRQS: u32 = vfio(10);
/// `VFIO_DEVICE_RESET`
pub const VFIO_DEVICE_RESET: u32 = vfio(11);
/// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`
pub const VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: u32 = vfio(12);
/// `VFIO_DEVICE_PCI_HOT_RESET`
pub const VFIO_DEVICE_PCI_HOT_RESET: u32 = vfio(13);
/// `VFIO_DEVICE_QUERY_GFX_PLANE`
pub const VFIO_DEVICE_QUERY_GFX_PLANE: u32 = vfio(14);
/// `VFIO_DEVICE_GET_GFX_DMABUF`
pub const VFIO_DEVICE_GET_GFX_DMABUF: u32 = vfio(15);
/// `VFIO_DEVICE_IOEVENTFD`
pub const VFIO_DEVICE_IOEVENTFD: u32 = vfio(16);
/// `VFIO_DEVICE_FEATURE`
pub const VFIO_DEVICE_FEATURE: u32 = vfio(17);
/// `VFIO_DEVICE_BIND_IOMMUFD` (the cdev `/dev/vfio/devices/vfioN` only)
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = vfio(18);
/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (cdev only)
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = vfio(19);
/// `VFIO_DEVICE_DETACH_IOMMUFD_PT` (cdev only)
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u32 = vfio(20);
/// `VFIO_MIG_GET_PRECOPY_INFO` (on a migration data fd)
pub const VFIO_MIG_GET_PRECOPY_INFO: u32 = vfio(21);

// ---- type1 IOMMU (on the container) ----

/// `VFIO_IOMMU_GET_INFO`
pub const VFIO_IOMMU_GET_INFO: u32 = vfio(12);
/// `VFIO_IOMMU_MAP_DMA`
pub const VFIO_IOMMU_MAP_DMA: u32 = vfio(13);
/// `VFIO_IOMMU_UNMAP_DMA`
pub const VFIO_IOMMU_UNMAP_DMA: u32 = vfio(14);
/// `VFIO_IOMMU_ENABLE`
pub const VFIO_IOMMU_ENABLE: u32 = vfio(15);
/// `VFIO_IOMMU_DISABLE`
pub const VFIO_IOMMU_DISABLE: u32 = vfio(16);
/// `VFIO_IOMMU_DIRTY_PAGES`
pub const VFIO_IOMMU_DIRTY_PAGES: u32 = vfio(17);

/// Every number above with its name (for tables and tests).
pub const ALL: &[(&str, u32)] = &[
    ("VFIO_GET_API_VERSION", VFIO_GET_API_VERSION),
    ("VFIO_CHECK_EXTENSION", VFIO_CHECK_EXTENSION),
    ("VFIO_SET_IOMMU", VFIO_SET_IOMMU),
    ("VFIO_GROUP_GET_STATUS", VFIO_GROUP_GET_STATUS),
    ("VFIO_GROUP_SET_CONTAINER", VFIO_GROUP_SET_CONTAINER),
    ("VFIO_GROUP_UNSET_CONTAINER", VFIO_GROUP_UNSET_CONTAINER),
    ("VFIO_GROUP_GET_DEVICE_FD", VFIO_GROUP_GET_DEVICE_FD),
    ("VFIO_DEVICE_GET_INFO", VFIO_DEVICE_GET_INFO),
    ("VFIO_DEVICE_GET_REGION_INFO", VFIO_DEVICE_GET_REGION_INFO),
    ("VFIO_DEVICE_GET_IRQ_INFO", VFIO_DEVICE_GET_IRQ_INFO),
    ("VFIO_DEVICE_SET_IRQS", VFIO_DEVICE_SET_IRQS),
    ("VFIO_DEVICE_RESET", VFIO_DEVICE_RESET),
    (
        "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
        VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    ),
    ("VFIO_DEVICE_PCI_HOT_RESET", VFIO_DEVICE_PCI_HOT_RESET),
    ("VFIO_DEVICE_QUERY_GFX_PLANE", VFIO_DEVICE_QUERY_GFX_PLANE),
    ("VFIO_DEVICE_GET_GFX_DMABUF", VFIO_DEVICE_GET_GFX_DMABUF),
    ("VFIO_DEVICE_IOEVENTFD", VFIO_DEVICE_IOEVENTFD),
    ("VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE),
    ("VFIO_DEVICE_BIND_IOMMUFD", VFIO_DEVICE_BIND_IOMMUFD),
    (
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    ),
    (
        "VFIO_DEVICE_DETACH_IOMMUFD_PT",
        VFIO_DEVICE_DETACH_IOMMUFD_PT,
    ),
    ("VFIO_MIG_GET_PRECOPY_INFO", VFIO_MIG_GET_PRECOPY_INFO),
    ("VFIO_IOMMU_GET_INFO", VFIO_IOMMU_GET_INFO),
    ("VFIO_IOMMU_MAP_DMA", VFIO_IOMMU_MAP_DMA),
    ("VFIO_IOMMU_UNMAP_DMA", VFIO_IOMMU_UNMAP_DMA),
    ("VFIO_IOMMU_ENABLE", VFIO_IOMMU_ENABLE),
    ("VFIO_IOMMU_DISABLE", VFIO_IOMMU_DISABLE),
    ("VFIO_IOMMU_DIRTY_PAGES", VFIO_IOMMU_DIRTY_PAGES),
];

/// Makes `vfio-bindings` structs [`ArgStruct`]s, each with the size its
/// fields add up to checked at compile time (so there is no padding).
macro_rules! vfio_arg_structs {
    ($($t:ident = $size:literal,)+) => {
        $(
            const _: () = assert!(std::mem::size_of::<$t>() == $size);
            // SAFETY: bindgen's `#[repr(C)]` copy of a VFIO uapi struct made
            // of `__u16`/`__u32`/`__u64` fields, unions of `__u32`s and
            // zero-length flexible arrays only: no pointers, references or
            // drop glue, every bit pattern valid; its size is the sum of its
            // fields (asserted above), so it has no padding.
            unsafe impl ArgStruct for $t {
                const C_NAME: &'static str = stringify!($t);
            }
        )+
    };
}

vfio_arg_structs! {
    vfio_device_info = 24,
    vfio_region_info = 32,
    vfio_info_cap_header = 8,
    vfio_irq_info = 16,
    vfio_irq_set = 20,
    vfio_pci_hot_reset_info = 12,
    vfio_pci_dependent_device = 8,
    vfio_pci_hot_reset = 12,
    vfio_device_bind_iommufd = 24,
    vfio_device_attach_iommufd_pt = 16,
    vfio_device_detach_iommufd_pt = 12,
}
