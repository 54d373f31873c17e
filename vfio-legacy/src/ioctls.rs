//! VFIO ioctl request numbers.
//!
//! `vfio-bindings` has the structs and constants but not the request
//! numbers, which the C header builds with `_IO(VFIO_TYPE, VFIO_BASE + n)`.
//! They are computed here, in one place, and pinned by a test against the
//! values of `include/uapi/linux/vfio.h`.

use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};

/// `_IO(type, nr)`: no direction, no size.
const fn io(ty: u8, nr: u32) -> libc::c_ulong {
    ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

const fn vfio(n: u32) -> libc::c_ulong {
    io(VFIO_TYPE, VFIO_BASE + n)
}

/// Container: the API version (`VFIO_API_VERSION`).
pub const VFIO_GET_API_VERSION: libc::c_ulong = vfio(0);
/// Container: whether an extension (IOMMU model or feature) is supported.
pub const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio(1);
/// Container: choose the IOMMU model.
pub const VFIO_SET_IOMMU: libc::c_ulong = vfio(2);
/// Group: `struct vfio_group_status`.
pub const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio(3);
/// Group: put the group into a container (argument: pointer to the fd).
pub const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio(4);
/// Group: open a device by name (argument: NUL-terminated string).
pub const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio(6);
/// Device: `struct vfio_device_info`.
pub const VFIO_DEVICE_GET_INFO: libc::c_ulong = vfio(7);
/// Device: `struct vfio_region_info`.
pub const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio(8);
/// Container (type1): `struct vfio_iommu_type1_info`.
pub const VFIO_IOMMU_GET_INFO: libc::c_ulong = vfio(12);
/// Container (type1): `struct vfio_iommu_type1_dma_map`.
pub const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio(13);
/// Container (type1): `struct vfio_iommu_type1_dma_unmap`.
pub const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio(14);

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of `include/uapi/linux/vfio.h` (`VFIO_TYPE` is `';'` = 0x3b,
    /// `VFIO_BASE` 100 = 0x64), computed by hand from the header's
    /// `_IO(VFIO_TYPE, VFIO_BASE + n)` definitions.
    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
    }
}
