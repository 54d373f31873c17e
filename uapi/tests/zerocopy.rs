//! The structs read from and write to raw bytes the way a caller's memory
//! holds them (little-endian, C layout).
#![cfg(target_endian = "little")]

use ioasid_uapi::*;
use zerocopy::{FromBytes, IntoBytes};

#[test]
fn dma_map_bytes_round_trip() {
    let m = IoasidDmaMap {
        argsz: 40,
        flags: IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE,
        ioasid: 7,
        reserved: 0,
        vaddr: 0x7f00_1234_5000,
        iova: 0x4000_0000,
        size: 0x20_0000,
    };
    let bytes = m.as_bytes();
    assert_eq!(bytes.len(), 40);
    assert_eq!(&bytes[0..4], &40u32.to_le_bytes());
    assert_eq!(&bytes[4..8], &3u32.to_le_bytes());
    assert_eq!(&bytes[8..12], &7u32.to_le_bytes());
    assert_eq!(&bytes[16..24], &0x7f00_1234_5000u64.to_le_bytes());
    assert_eq!(&bytes[24..32], &0x4000_0000u64.to_le_bytes());
    assert_eq!(&bytes[32..40], &0x20_0000u64.to_le_bytes());
    assert_eq!(IoasidDmaMap::read_from_bytes(bytes).unwrap(), m);
}

#[test]
fn short_or_long_buffers_are_refused_not_truncated() {
    let bytes = [0u8; 40];
    assert!(IoasidDmaUnmap::read_from_bytes(&bytes[..31]).is_err());
    assert!(IoasidDmaUnmap::read_from_bytes(&bytes[..33]).is_err());
    // A dispatcher reads the known prefix of a longer argsz.
    let (u, tail) = IoasidDmaUnmap::read_from_prefix(&bytes).unwrap();
    assert_eq!(u, IoasidDmaUnmap::default());
    assert_eq!(tail.len(), 8);
}

#[test]
fn info_with_a_capability_chain_decodes() {
    // What a front end writes for GET_INFO: the struct, then an IOVA-range
    // capability with two ranges, then a parent capability.
    let mut buf = Vec::new();
    let ranges_off = size_of::<IoasidInfo>();
    let parent_off =
        ranges_off + size_of::<IoasidInfoCapIovaRanges>() + 2 * size_of::<IoasidIovaRange>();
    let total = parent_off + size_of::<IoasidInfoCapParent>();
    buf.extend_from_slice(
        IoasidInfo {
            argsz: total as u32,
            flags: IOASID_INFO_PGSIZES
                | IOASID_INFO_CAPS
                | IOASID_INFO_MAP_DMA
                | IOASID_INFO_NESTED,
            ioasid: 2,
            cap_offset: ranges_off as u32,
            pgsize_bitmap: 0x4020_1000,
        }
        .as_bytes(),
    );
    buf.extend_from_slice(
        IoasidInfoCapIovaRanges {
            header: IoasidInfoCapHeader {
                id: IOASID_INFO_CAP_IOVA_RANGES,
                version: 1,
                next: parent_off as u32,
            },
            nr_ranges: 2,
            reserved: 0,
        }
        .as_bytes(),
    );
    for (start, last) in [(0, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff_ffff)] {
        buf.extend_from_slice(IoasidIovaRange { start, last }.as_bytes());
    }
    buf.extend_from_slice(
        IoasidInfoCapParent {
            header: IoasidInfoCapHeader {
                id: IOASID_INFO_CAP_PARENT,
                version: 1,
                next: 0,
            },
            parent: 1,
            reserved: 0,
        }
        .as_bytes(),
    );
    assert_eq!(buf.len(), total);

    // Walk it the way a C user would.
    let (info, _) = IoasidInfo::read_from_prefix(&buf).unwrap();
    assert_ne!(info.flags & IOASID_INFO_CAPS, 0);
    let mut off = info.cap_offset as usize;
    let mut seen = Vec::new();
    while off != 0 {
        let (h, _) = IoasidInfoCapHeader::read_from_prefix(&buf[off..]).unwrap();
        assert_eq!(off % 8, 0, "capabilities are 8-byte aligned");
        match h.id {
            IOASID_INFO_CAP_IOVA_RANGES => {
                let (cap, rest) = IoasidInfoCapIovaRanges::read_from_prefix(&buf[off..]).unwrap();
                let (ranges, _) =
                    <[IoasidIovaRange]>::ref_from_prefix_with_elems(rest, cap.nr_ranges as usize)
                        .unwrap();
                seen.push(format!("ranges {:#x}", ranges[1].start));
            }
            IOASID_INFO_CAP_PARENT => {
                let (cap, _) = IoasidInfoCapParent::read_from_prefix(&buf[off..]).unwrap();
                seen.push(format!("parent {}", cap.parent));
            }
            other => panic!("unexpected capability {other}"),
        }
        off = h.next as usize;
    }
    assert_eq!(seen, ["ranges 0xfef00000", "parent 1"]);
}

#[test]
fn every_struct_is_as_big_as_its_layout_says() {
    for (name, size, fields) in ALL_STRUCTS {
        let last = fields.last().unwrap();
        assert_eq!(
            last.offset + last.size,
            *size,
            "{name} has trailing padding"
        );
    }
}
