//! Pins every ioctl number to a literal, checks that none collides with a
//! VFIO or iommufd ioctl. (The command tables, which say what each command
//! takes, are the front ends' and are tested there.)
#![cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]

use std::collections::BTreeSet;

use ioasid_uapi::*;

/// The numbers of the commands on the ioasid file (`ioasid_numbers_are_pinned`
/// checks each constant is one of them).
fn ioasid_commands() -> impl Iterator<Item = u32> {
    (0..=13)
        .map(|i| io(IOASID_TYPE, IOASID_BASE + i))
        .chain([IOASID_DAEMON_IDENTIFY])
}

/// The numbers of the commands this ABI adds to a VFIO device file.
fn device_commands() -> impl Iterator<Item = u32> {
    (22..=25).map(|n| io(VFIO_TYPE, VFIO_BASE + n))
}

#[test]
fn ioasid_numbers_are_pinned() {
    assert_eq!(io(b';', 0x20), 0x3b20);
    assert_eq!(IOASID_CHECK_EXTENSION, 0x3b20);
    assert_eq!(IOASID_REGISTER_MEMORY, 0x3b21);
    assert_eq!(IOASID_UNREGISTER_MEMORY, 0x3b22);
    assert_eq!(IOASID_ALLOC, 0x3b23);
    assert_eq!(IOASID_FREE, 0x3b24);
    assert_eq!(IOASID_GET_INFO, 0x3b25);
    assert_eq!(IOASID_MAP_DMA, 0x3b26);
    assert_eq!(IOASID_UNMAP_DMA, 0x3b27);
    assert_eq!(IOASID_CREATE_NESTING, 0x3b28);
    assert_eq!(IOASID_BIND_PGTABLE, 0x3b29);
    assert_eq!(IOASID_UNBIND_PGTABLE, 0x3b2a);
    assert_eq!(IOASID_BIND_PASID_TABLE, 0x3b2b);
    assert_eq!(IOASID_UNBIND_PASID_TABLE, 0x3b2c);
    assert_eq!(IOASID_INVALIDATE_CACHE, 0x3b2d);
    assert_eq!(IOASID_DAEMON_IDENTIFY, 0x3b5f);
}

#[test]
fn device_numbers_are_pinned() {
    assert_eq!(VFIO_BIND_IOASID_FD, 0x3b7a);
    assert_eq!(VFIO_UNBIND_IOASID_FD, 0x3b7b);
    assert_eq!(VFIO_ATTACH_IOASID, 0x3b7c);
    assert_eq!(VFIO_DETACH_IOASID, 0x3b7d);
}

#[test]
fn legacy_vfio_numbers_are_pinned() {
    use ioasid_uapi::vfio::*;
    // _IO(';', 100 + n) as in include/uapi/linux/vfio.h.
    let expected: &[(&str, u32)] = &[
        ("VFIO_GET_API_VERSION", 0x3b64),
        ("VFIO_CHECK_EXTENSION", 0x3b65),
        ("VFIO_SET_IOMMU", 0x3b66),
        ("VFIO_GROUP_GET_STATUS", 0x3b67),
        ("VFIO_GROUP_SET_CONTAINER", 0x3b68),
        ("VFIO_GROUP_UNSET_CONTAINER", 0x3b69),
        ("VFIO_GROUP_GET_DEVICE_FD", 0x3b6a),
        ("VFIO_DEVICE_GET_INFO", 0x3b6b),
        ("VFIO_DEVICE_GET_REGION_INFO", 0x3b6c),
        ("VFIO_DEVICE_GET_IRQ_INFO", 0x3b6d),
        ("VFIO_DEVICE_SET_IRQS", 0x3b6e),
        ("VFIO_DEVICE_RESET", 0x3b6f),
        ("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", 0x3b70),
        ("VFIO_DEVICE_PCI_HOT_RESET", 0x3b71),
        ("VFIO_DEVICE_QUERY_GFX_PLANE", 0x3b72),
        ("VFIO_DEVICE_GET_GFX_DMABUF", 0x3b73),
        ("VFIO_DEVICE_IOEVENTFD", 0x3b74),
        ("VFIO_DEVICE_FEATURE", 0x3b75),
        ("VFIO_DEVICE_BIND_IOMMUFD", 0x3b76),
        ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", 0x3b77),
        ("VFIO_DEVICE_DETACH_IOMMUFD_PT", 0x3b78),
        ("VFIO_MIG_GET_PRECOPY_INFO", 0x3b79),
        ("VFIO_IOMMU_GET_INFO", 0x3b70),
        ("VFIO_IOMMU_MAP_DMA", 0x3b71),
        ("VFIO_IOMMU_UNMAP_DMA", 0x3b72),
        ("VFIO_IOMMU_ENABLE", 0x3b73),
        ("VFIO_IOMMU_DISABLE", 0x3b74),
        ("VFIO_IOMMU_DIRTY_PAGES", 0x3b75),
    ];
    assert_eq!(ALL, expected);
    assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
}

#[test]
fn no_number_collides_with_vfio_or_iommufd() {
    // Linux 6.12: VFIO uses _IO(';', 100 + 0..=21); iommufd uses
    // _IO(';', 0x80..=0x8e), and ioctl-number.rst reserves 0x80..=0xff for
    // it, so check the whole reserved range.
    let vfio: BTreeSet<u32> = (100u32..=121).map(|n| 0x3b00 | n).collect();
    let iommufd: BTreeSet<u32> = (0x80u32..=0xff).map(|n| 0x3b00 | n).collect();
    let ours: Vec<u32> = ioasid_commands().collect();
    for n in &ours {
        assert!(!vfio.contains(n), "{n:#x} collides with VFIO");
        assert!(!iommufd.contains(n), "{n:#x} collides with iommufd");
        // Inside the unclaimed part of ';' (0x00..0x63).
        assert!((n & 0xff) < 100, "{n:#x} outside 0x00..0x63");
    }
    let distinct: BTreeSet<u32> = ours.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        ours.len(),
        "ioasid numbers must be distinct"
    );
    for n in device_commands() {
        assert!(!vfio.contains(&n), "{n:#x} collides with a VFIO ioctl");
        assert!(!iommufd.contains(&n));
        assert!(!distinct.contains(&n));
    }
}
