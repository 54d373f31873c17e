//! `IOASID_GET_INFO`: what the engine knows of an IOASID, encoded as
//! `struct ioasid_info` and its capability chain.

use std::mem::offset_of;

use ioasid_engine::{ContextId, Engine};
use ioasid_uapi::error::{Errno, Error, Result};
use ioasid_uapi::{
    IoasidInfo, IoasidInfoCapDmaAvail, IoasidInfoCapHeader, IoasidInfoCapIovaRanges,
    IoasidInfoCapNesting, IoasidInfoCapParent, IoasidInfoCapPasid, IoasidInfoCapPgtableFormats,
    IoasidInfoCapShadow, IoasidIovaRange, IoasidPgtableFormatDesc,
};
use ioctl_table::Ucmd;
use zerocopy::IntoBytes;

/// Width of a PASID, reported in `IOASID_INFO_CAP_PASID`.
const PASID_BITS: u32 = ioasid_uapi::IOASID_PASID_BITS;

/// Size of `struct ioasid_info`: the capability chain starts there.
const INFO_SIZE: usize = std::mem::size_of::<IoasidInfo>();

/// `IOASID_GET_INFO`: the fixed fields, then the capability chain inside
/// the caller's `argsz` (VFIO style: when it does not fit, the call
/// succeeds with `IOASID_INFO_CAPS` set, `cap_offset` 0 and `argsz` raised
/// to the size needed).
pub(crate) fn get_info(engine: &Engine, u: &Ucmd<'_>, mut out: IoasidInfo) -> Result<i32> {
    let ctx = ContextId(u.fh);
    let info = engine.info(ctx, out.ioasid)?;
    out.flags = 0;
    out.cap_offset = 0;
    out.pgsize_bitmap = 0;
    let chain = if info.attached {
        out.flags = ioasid_uapi::IOASID_INFO_PGSIZES | ioasid_uapi::IOASID_INFO_MAP_DMA;
        if info.parent.is_some() {
            // A child takes either protocol (one at a time: the other is
            // EBUSY while one is in use).
            out.flags |= ioasid_uapi::IOASID_INFO_NESTED
                | ioasid_uapi::IOASID_INFO_BIND_PGTABLE
                | ioasid_uapi::IOASID_INFO_BIND_PASID_TABLE;
        }
        out.pgsize_bitmap = info.pgsize_bitmap;
        capability_chain(&info, INFO_SIZE)
    } else {
        Vec::new()
    };
    if !chain.is_empty() {
        out.flags |= ioasid_uapi::IOASID_INFO_CAPS;
        let needed = INFO_SIZE + chain.len();
        if u.user_size >= needed {
            u.write_at(INFO_SIZE, &chain)?;
            out.cap_offset = INFO_SIZE as u32;
        } else {
            out.argsz = u32::try_from(needed)
                .map_err(|_| Error::new(Errno::EOVERFLOW, "capability chain too large"))?;
        }
    }
    // Output fields only: argsz and flags, then cap_offset and
    // pgsize_bitmap; `ioasid` (input) is left alone.
    u.write_fields(&out, 0..offset_of!(IoasidInfo, ioasid))?;
    u.write_fields(&out, offset_of!(IoasidInfo, cap_offset)..INFO_SIZE)?;
    Ok(0)
}

/// Append one capability (header + body + trailing bytes) to `chain`,
/// linking the previous one to it.
fn push_cap(chain: &mut Vec<u8>, base: usize, last: &mut Option<usize>, bytes: &[u8]) {
    let at = chain.len();
    if let Some(prev) = *last {
        let next = u32::try_from(base + at).unwrap_or(0);
        let field = prev + std::mem::offset_of!(IoasidInfoCapHeader, next);
        chain[field..field + 4].copy_from_slice(&next.to_ne_bytes());
    }
    chain.extend_from_slice(bytes);
    // Capabilities are 8-byte aligned.
    chain.resize(chain.len().next_multiple_of(8), 0);
    *last = Some(at);
}

/// The capability chain of an attached IOASID, as it will sit at offset
/// `base` of the caller's `struct ioasid_info`.
fn capability_chain(info: &ioasid_engine::IoasidInfo, base: usize) -> Vec<u8> {
    let header = |id| IoasidInfoCapHeader {
        id,
        version: 1,
        next: 0,
    };
    let mut chain = Vec::new();
    let mut last = None;

    let mut ranges = IoasidInfoCapIovaRanges {
        header: header(ioasid_uapi::IOASID_INFO_CAP_IOVA_RANGES),
        nr_ranges: info.iova_ranges.len() as u32,
        reserved: 0,
    }
    .as_bytes()
    .to_vec();
    for &(start, last) in &info.iova_ranges {
        ranges.extend_from_slice(IoasidIovaRange { start, last }.as_bytes());
    }
    push_cap(&mut chain, base, &mut last, &ranges);

    if let Some(avail) = info.dma_avail {
        let cap = IoasidInfoCapDmaAvail {
            header: header(ioasid_uapi::IOASID_INFO_CAP_DMA_AVAIL),
            avail,
            reserved: 0,
        };
        push_cap(&mut chain, base, &mut last, cap.as_bytes());
    }

    let pasid = IoasidInfoCapPasid {
        header: header(ioasid_uapi::IOASID_INFO_CAP_PASID),
        flags: ioasid_uapi::IOASID_PASID_ATTACH_TRACKED,
        pasid_bits: PASID_BITS,
        pasid_table_format: if info.parent.is_some() {
            ioasid_uapi::IOASID_PASID_TABLE_FLAT_X86_64
        } else {
            0
        },
        reserved: 0,
    };
    push_cap(&mut chain, base, &mut last, pasid.as_bytes());

    if info.nesting_levels > 0 {
        let cap = IoasidInfoCapNesting {
            header: header(ioasid_uapi::IOASID_INFO_CAP_NESTING),
            flags: ioasid_uapi::IOASID_NESTING_SOFTWARE,
            levels: info.nesting_levels,
        };
        push_cap(&mut chain, base, &mut last, cap.as_bytes());
    }

    if let Some(parent) = info.parent {
        let cap = IoasidInfoCapParent {
            header: header(ioasid_uapi::IOASID_INFO_CAP_PARENT),
            parent,
            reserved: 0,
        };
        push_cap(&mut chain, base, &mut last, cap.as_bytes());

        let mut formats = IoasidInfoCapPgtableFormats {
            header: header(ioasid_uapi::IOASID_INFO_CAP_PGTABLE_FORMATS),
            nr_formats: 1,
            reserved: 0,
        }
        .as_bytes()
        .to_vec();
        let x86 = IoasidPgtableFormatDesc {
            format: ioasid_uapi::IOASID_PGTABLE_X86_64_4LVL,
            flags: ioasid_uapi::IOASID_PGTABLE_FORMAT_SHADOWED,
            addr_width: ioasid_engine::pgtable::ADDR_WIDTH,
            reserved: 0,
            pgsize_bitmap: ioasid_engine::pgtable::PGSIZES,
        };
        formats.extend_from_slice(x86.as_bytes());
        push_cap(&mut chain, base, &mut last, &formats);

        push_cap(&mut chain, base, &mut last, shadow_cap(info).as_bytes());
    }
    chain
}

/// `IOASID_INFO_CAP_SHADOW` of a child: its shadow and the accounting of
/// the walks of a bound page table or PASID table.
fn shadow_cap(info: &ioasid_engine::IoasidInfo) -> IoasidInfoCapShadow {
    let mut cap = IoasidInfoCapShadow {
        header: IoasidInfoCapHeader {
            id: ioasid_uapi::IOASID_INFO_CAP_SHADOW,
            version: 1,
            next: 0,
        },
        shadow_entries: info.shadow_entries as u64,
        ..IoasidInfoCapShadow::default()
    };
    if let Some(t) = &info.pgtable {
        cap.flags |= ioasid_uapi::IOASID_SHADOW_PGTABLE;
        if t.last_walk.truncated {
            cap.flags |= ioasid_uapi::IOASID_SHADOW_TRUNCATED;
        }
        cap.leaves = t.leaves;
        cap.last_walk_leaves = t.last_walk.leaves;
        cap.last_walk_malformed = t.last_walk.malformed;
        cap.last_walk_tables = t.last_walk.tables;
        cap.malformed = t.malformed;
        cap.walks = t.walks;
    }
    if let Some(t) = &info.pasid_table {
        cap.flags |= ioasid_uapi::IOASID_SHADOW_PASID_TABLE;
        if t.truncated {
            cap.flags |= ioasid_uapi::IOASID_SHADOW_TRUNCATED;
        }
        cap.pasid_entries = t.entries;
        cap.pasid_valid = t.valid;
        cap.pasid_bad = t.bad_entries;
        cap.pasid_unreadable = t.unreadable_entries;
        cap.pasid_leaves = t.leaves;
        cap.pasid_malformed = t.malformed;
    }
    cap
}
