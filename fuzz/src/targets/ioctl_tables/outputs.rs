//! What a command that succeeded wrote back, where the uAPI says what it
//! must look like: capability chains inside the caller's size (VFIO's
//! rules, which `IOASID_GET_INFO` follows too), no mmap advertised by a
//! device node (CUSE cannot map), and `IOMMU_IOAS_IOVA_RANGES`' ranges and
//! counts.

use std::mem::{offset_of, size_of};

use ioasid_uapi::iommufd::{iommu_ioas_iova_ranges, IOMMU_IOAS_IOVA_RANGES};
use ioasid_uapi::vfio::VFIO_DEVICE_GET_REGION_INFO;
use ioasid_uapi::{IoasidInfo, IOASID_GET_INFO, IOASID_INFO_CAPS};
use ioctl_table::fake::FakeCaller;
use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};

use super::Node;

fn u32_in(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_in(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The caller's bytes at `arg`, at most `len` of them: as many as its
/// memory holds.
fn bytes(c: &FakeCaller, arg: u64, len: usize) -> Vec<u8> {
    let end = c.base + c.mem.borrow().len() as u64;
    let n = end.saturating_sub(arg).min(len as u64) as usize;
    c.get(arg, n)
}

/// The capabilities (id, offset) of the chain starting at `first` in `b`,
/// every header 8-byte aligned, past the struct (`after`), inside `b`, and
/// each `next` forward (so the chain ends).
fn chain(b: &[u8], first: usize, after: usize, what: &str) -> Vec<(u16, usize)> {
    let mut caps = Vec::new();
    let mut at = first;
    while at != 0 {
        assert!(
            at % 8 == 0 && at >= after && at + 8 <= b.len(),
            "{what}: a capability at {at} (struct {after} bytes, argsz {})",
            b.len()
        );
        let id = u16::from_ne_bytes([b[at], b[at + 1]]);
        let next = u32_in(b, at + 4) as usize;
        assert!(
            next == 0 || next > at,
            "{what}: capability {at} links back to {next}"
        );
        caps.push((id, at));
        at = next;
    }
    caps
}

/// Check what command `number` of `node` wrote at `arg` for a caller
/// whose size was `given`, after `result` (a success, or an errno the
/// command writes back with).
pub fn check(
    c: &FakeCaller,
    node: Node,
    number: u32,
    arg: u64,
    given: usize,
    result: Result<i32, Errno>,
    what: &str,
) {
    match (node, number, result) {
        (Node::Ioasid, IOASID_GET_INFO, Ok(_)) => {
            let b = bytes(c, arg, given);
            let flags = u32_in(&b, offset_of!(IoasidInfo, flags));
            let first = u32_in(&b, offset_of!(IoasidInfo, cap_offset)) as usize;
            let argsz = u32_in(&b, 0) as usize;
            if first != 0 {
                assert!(
                    flags & IOASID_INFO_CAPS != 0,
                    "{what}: cap_offset without CAPS"
                );
                chain(&b, first, size_of::<IoasidInfo>(), what);
            } else if flags & IOASID_INFO_CAPS != 0 {
                assert!(argsz > given, "{what}: CAPS, no chain, argsz not raised");
            }
        }
        (Node::DevN | Node::VfioN, VFIO_DEVICE_GET_REGION_INFO, Ok(_)) => {
            let b = bytes(c, arg, given);
            let flags = u32_in(&b, offset_of!(vfio_region_info, flags));
            assert!(
                flags & VFIO_REGION_INFO_FLAG_MMAP == 0,
                "{what}: mmap advertised"
            );
            let first = u32_in(&b, offset_of!(vfio_region_info, cap_offset)) as usize;
            if first != 0 {
                assert!(
                    flags & VFIO_REGION_INFO_FLAG_CAPS != 0,
                    "{what}: cap_offset without CAPS"
                );
                for (id, at) in chain(&b, first, size_of::<vfio_region_info>(), what) {
                    let mmap = [
                        VFIO_REGION_INFO_CAP_SPARSE_MMAP,
                        VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
                    ];
                    assert!(
                        !mmap.contains(&u32::from(id)),
                        "{what}: mmap capability {id} at {at}"
                    );
                }
            }
        }
        (Node::Iommufd, IOMMU_IOAS_IOVA_RANGES, Ok(_) | Err(Errno::EMSGSIZE)) => {
            let b = bytes(c, arg, given.min(size_of::<iommu_ioas_iova_ranges>()));
            let total = u32_in(&b, offset_of!(iommu_ioas_iova_ranges, num_iovas)) as u64;
            let align = u64_in(&b, offset_of!(iommu_ioas_iova_ranges, out_iova_alignment));
            assert!(align.is_power_of_two(), "{what}: alignment {align:#x}");
            assert!(total >= 1, "{what}: an IOAS with no usable IOVA");
            let ptr = u64_in(&b, offset_of!(iommu_ioas_iova_ranges, allowed_iovas));
            let own = ptr < arg + given as u64 && arg < ptr.saturating_add(16 * total);
            if result.is_ok() && !own {
                // Every range fitted (in a buffer apart from the struct):
                // they are sorted and disjoint.
                let ranges = bytes(c, ptr, 16 * total as usize);
                let mut prev: Option<u64> = None;
                for r in ranges.chunks_exact(16) {
                    let (start, last) = (u64_in(r, 0), u64_in(r, 8));
                    assert!(start <= last, "{what}: range {start:#x}..={last:#x}");
                    assert!(
                        prev.is_none_or(|p| p < start),
                        "{what}: ranges overlap or unsorted"
                    );
                    prev = Some(last);
                }
            }
        }
        _ => {}
    }
}
