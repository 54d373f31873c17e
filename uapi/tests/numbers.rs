//! Pins every ioctl number to a literal, checks that none collides with a
//! VFIO or iommufd ioctl, and checks the command table.
#![cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]

use std::collections::BTreeSet;

use ioasid_uapi::*;

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
    let ours: Vec<u32> = IoasidCmd::ALL.iter().map(|c| c.request()).collect();
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
    for d in VfioDeviceCmd::ALL {
        let n = d.request();
        assert!(
            !vfio.contains(&n),
            "{} collides with a VFIO ioctl",
            d.name()
        );
        assert!(!iommufd.contains(&n));
        assert!(!distinct.contains(&n));
    }
}

#[test]
fn command_table_is_consistent() {
    for (i, c) in IoasidCmd::ALL.iter().enumerate() {
        assert_eq!(IoasidCmd::try_from(c.request()), Ok(*c));
        if *c != IoasidCmd::DaemonIdentify {
            assert_eq!(c.request(), 0x3b20 + i as u32, "{} out of order", c.name());
        }
    }
    for c in VfioDeviceCmd::ALL {
        assert_eq!(VfioDeviceCmd::try_from(c.request()), Ok(c));
    }
    assert_eq!(IoasidCmd::try_from(0x3b2e), Err(0x3b2e));
    assert_eq!(IoasidCmd::try_from(vfio::VFIO_IOMMU_MAP_DMA), Err(0x3b71));
    assert_eq!(
        VfioDeviceCmd::try_from(vfio::VFIO_DEVICE_RESET),
        Err(0x3b6f)
    );
}

#[test]
fn argument_kinds_and_minimum_sizes() {
    use IoasidCmd::*;
    let kind = |c: IoasidCmd| c.arg();
    for c in [Alloc, DaemonIdentify] {
        assert_eq!(kind(c), ArgKind::None, "{}", c.name());
    }
    for c in [CheckExtension, Free, CreateNesting] {
        assert_eq!(kind(c), ArgKind::Int, "{}", c.name());
    }
    let sizes = [
        (RegisterMemory, "ioasid_register_memory", 24),
        (UnregisterMemory, "ioasid_register_memory", 24),
        (GetInfo, "ioasid_info", 24),
        (MapDma, "ioasid_dma_map", 40),
        (UnmapDma, "ioasid_dma_unmap", 32),
        (BindPgtable, "ioasid_bind_pgtable", 32),
        (UnbindPgtable, "ioasid_unbind_pgtable", 16),
        (BindPasidTable, "ioasid_bind_pasid_table", 32),
        (UnbindPasidTable, "ioasid_unbind_pasid_table", 16),
        (InvalidateCache, "ioasid_invalidate_cache", 32),
    ];
    for (c, name, size) in sizes {
        let ArgKind::Struct(s) = kind(c) else {
            panic!("{} takes a struct", c.name())
        };
        assert_eq!(
            (s.c_name, s.min_size, s.size),
            (name, size, size),
            "{}",
            c.name()
        );
        assert_eq!(s.tail_is_output, c == GetInfo);
    }
    let ArgKind::Struct(info) = GetInfo.arg() else {
        unreachable!()
    };
    assert_eq!(info.flags, FlagsCheck::OutputOnly);
    let ArgKind::Struct(map) = MapDma.arg() else {
        unreachable!()
    };
    assert_eq!(map.flags, FlagsCheck::Mask(0b11));
    let ArgKind::Struct(unmap) = UnmapDma.arg() else {
        unreachable!()
    };
    assert_eq!(unmap.flags, FlagsCheck::Mask(0b10));
    let ArgKind::Struct(inv) = InvalidateCache.arg() else {
        unreachable!()
    };
    assert_eq!(inv.flags, FlagsCheck::Mask(0b111));
    let ArgKind::Struct(reg) = RegisterMemory.arg() else {
        unreachable!()
    };
    assert_eq!(reg.flags, FlagsCheck::Mask(0));

    assert_eq!(VfioDeviceCmd::BindIoasidFd.arg(), ArgKind::Int);
    assert_eq!(VfioDeviceCmd::UnbindIoasidFd.arg(), ArgKind::Int);
    for c in [VfioDeviceCmd::AttachIoasid, VfioDeviceCmd::DetachIoasid] {
        let ArgKind::Struct(s) = c.arg() else {
            panic!()
        };
        assert_eq!((s.c_name, s.min_size), ("vfio_attach_ioasid", 16));
        assert_eq!(s.flags, FlagsCheck::Mask(IOASID_ATTACH_USER_PASID));
    }
}

#[test]
fn extensions_gate_the_right_commands() {
    use IoasidCmd::*;
    assert_eq!(MapDma.extension(), Some(IOASID_EXT_TYPE1V2_DMA));
    assert_eq!(RegisterMemory.extension(), Some(IOASID_EXT_REGISTER_MEMORY));
    assert_eq!(CreateNesting.extension(), Some(IOASID_EXT_NESTING_SOFTWARE));
    assert_eq!(
        BindPgtable.extension(),
        Some(IOASID_EXT_BIND_PGTABLE_SHADOW)
    );
    assert_eq!(
        InvalidateCache.extension(),
        Some(IOASID_EXT_BIND_PGTABLE_SHADOW)
    );
    assert_eq!(
        BindPasidTable.extension(),
        Some(IOASID_EXT_BIND_PASID_TABLE_SHADOW)
    );
    for c in [CheckExtension, Alloc, Free, GetInfo, DaemonIdentify] {
        assert_eq!(c.extension(), None, "{} is always available", c.name());
    }
}
