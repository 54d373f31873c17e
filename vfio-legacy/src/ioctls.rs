//! VFIO ioctl request numbers, in the type `libc::ioctl` takes.
//!
//! `vfio-bindings` has the structs and constants but not the request
//! numbers; the ABI crate computes them once (`ioasid_uapi::vfio`, pinned
//! there against `include/uapi/linux/vfio.h`), and this module only
//! converts the ones this crate issues.

use ioasid_uapi::vfio as nr;

pub const VFIO_GET_API_VERSION: libc::c_ulong = nr::VFIO_GET_API_VERSION as libc::c_ulong;
pub const VFIO_CHECK_EXTENSION: libc::c_ulong = nr::VFIO_CHECK_EXTENSION as libc::c_ulong;
pub const VFIO_SET_IOMMU: libc::c_ulong = nr::VFIO_SET_IOMMU as libc::c_ulong;
pub const VFIO_GROUP_GET_STATUS: libc::c_ulong = nr::VFIO_GROUP_GET_STATUS as libc::c_ulong;
pub const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = nr::VFIO_GROUP_SET_CONTAINER as libc::c_ulong;
pub const VFIO_GROUP_UNSET_CONTAINER: libc::c_ulong =
    nr::VFIO_GROUP_UNSET_CONTAINER as libc::c_ulong;
pub const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = nr::VFIO_GROUP_GET_DEVICE_FD as libc::c_ulong;
pub const VFIO_DEVICE_GET_INFO: libc::c_ulong = nr::VFIO_DEVICE_GET_INFO as libc::c_ulong;
pub const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong =
    nr::VFIO_DEVICE_GET_REGION_INFO as libc::c_ulong;
pub const VFIO_DEVICE_RESET: libc::c_ulong = nr::VFIO_DEVICE_RESET as libc::c_ulong;
pub const VFIO_IOMMU_GET_INFO: libc::c_ulong = nr::VFIO_IOMMU_GET_INFO as libc::c_ulong;
pub const VFIO_IOMMU_MAP_DMA: libc::c_ulong = nr::VFIO_IOMMU_MAP_DMA as libc::c_ulong;
pub const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = nr::VFIO_IOMMU_UNMAP_DMA as libc::c_ulong;
