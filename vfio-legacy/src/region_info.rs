//! `VFIO_DEVICE_GET_REGION_INFO` as a device node answers it: the mmap
//! capabilities taken out (CUSE cannot mmap), the rest passed on by VFIO's
//! rules for the caller's `argsz`.
//!
//! [`strip_mmap`] clears `VFIO_REGION_INFO_FLAG_MMAP` and unlinks the
//! sparse-mmap and MSI-X-mappable capabilities from the chain, so programs
//! fall back to `pread`/`pwrite`; [`reply`] is what the caller gets back.
//! Every capability is read with bounds checks; a malformed chain is
//! dropped, never a panic, and a walk ends because offsets must strictly
//! increase.

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_region_info, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};

use crate::device::VfioArg;

/// `sizeof(struct vfio_region_info)`: where its capability chain starts,
/// and also its minimum `argsz` (VFIO's `offsetofend(offset)`).
pub const REGION_INFO_SIZE: usize = std::mem::size_of::<vfio_region_info>();
/// `sizeof(struct vfio_info_cap_header)`.
const CAP_HEADER_SIZE: usize = std::mem::size_of::<vfio_info_cap_header>();

/// Capabilities that describe mmap and are removed from region info.
const MMAP_CAPS: [u32; 2] = [
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
];

/// One capability of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Offset from the start of the info struct.
    pub offset: usize,
    /// Capability id.
    pub id: u16,
    /// Its `next` field as found.
    pub next: u32,
}

/// Walk the capability chain of `info` starting at `first`, within
/// `info[..end]`. Every capability must lie at or after `base`, be 4-byte
/// aligned, have its header inside `end`, and be followed by a strictly
/// greater offset (so the walk ends after at most `end / 8` steps).
pub fn walk_chain(
    info: &VfioArg<vfio_region_info>,
    first: usize,
    base: usize,
    end: usize,
) -> std::result::Result<Vec<Cap>, String> {
    let end = end.min(info.len());
    let mut caps = Vec::new();
    let mut at = first;
    loop {
        let header = (at >= base
            && at % 4 == 0
            && at.checked_add(CAP_HEADER_SIZE).is_some_and(|e| e <= end))
        .then(|| info.read_at::<vfio_info_cap_header>(at))
        .flatten();
        let Some(h) = header else {
            return Err(format!(
                "capability at offset {at} is outside [{base}, {end}) or misaligned"
            ));
        };
        caps.push(Cap {
            offset: at,
            id: h.id,
            next: h.next,
        });
        if h.next == 0 {
            return Ok(caps);
        }
        let next = h.next as usize;
        if next <= at {
            return Err(format!(
                "capability at offset {at} points back to {next} (a loop)"
            ));
        }
        at = next;
    }
}

/// What [`strip_mmap`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stripped {
    /// Bytes the caller needs for the struct and the remaining chain
    /// (`REGION_INFO_SIZE` when no capability remains).
    pub needed: usize,
    /// Ids of the capabilities removed.
    pub removed: Vec<u16>,
    /// Why the chain was dropped whole, if it was malformed.
    pub malformed: Option<String>,
}

/// Remove every trace of mmap from a region info the kernel returned:
/// `info[..chain_end]` holds the struct and, if the `CAPS` flag is set and
/// `cap_offset` is not 0, the chain (offsets counted from the start of the
/// struct). Clears `VFIO_REGION_INFO_FLAG_MMAP`; unlinks the sparse-mmap
/// and MSI-X-mappable capabilities (fixing the `next` offsets and zeroing
/// their bytes); clears `CAPS` and `cap_offset` if nothing remains. A
/// malformed chain is dropped whole.
pub fn strip_mmap(info: &mut VfioArg<vfio_region_info>, chain_end: usize) -> Stripped {
    let mut out = Stripped {
        needed: REGION_INFO_SIZE,
        removed: Vec::new(),
        malformed: None,
    };
    let mut h = info.header();
    h.flags &= !VFIO_REGION_INFO_FLAG_MMAP;
    let first = h.cap_offset as usize;
    if h.flags & VFIO_REGION_INFO_FLAG_CAPS == 0 || first == 0 {
        info.set_header(&h);
        return out;
    }
    let chain_end = chain_end.min(info.len());
    let caps = match walk_chain(info, first, REGION_INFO_SIZE, chain_end) {
        Ok(caps) => caps,
        Err(why) => {
            h.flags &= !VFIO_REGION_INFO_FLAG_CAPS;
            h.cap_offset = 0;
            info.set_header(&h);
            out.malformed = Some(why);
            return out;
        }
    };
    // Extent of capability i: up to the next one in the original chain, or
    // the end of the chain.
    let extent = |i: usize| -> std::ops::Range<usize> {
        let start = caps[i].offset;
        let stop = caps.get(i + 1).map_or(chain_end, |c| c.offset);
        start..stop.max(start + CAP_HEADER_SIZE).min(chain_end)
    };
    let kept: Vec<usize> = (0..caps.len())
        .filter(|&i| !MMAP_CAPS.contains(&u32::from(caps[i].id)))
        .collect();
    for (i, cap) in caps.iter().enumerate() {
        if !kept.contains(&i) {
            out.removed.push(cap.id);
            info.as_bytes_mut()[extent(i)].fill(0);
        }
    }
    for (k, &i) in kept.iter().enumerate() {
        let next = kept.get(k + 1).map_or(0, |&j| caps[j].offset as u32);
        let at = caps[i].offset;
        let mut cap: vfio_info_cap_header = info.read_at(at).expect("walked");
        cap.next = next;
        info.write_at(at, &cap);
    }
    match (kept.first(), kept.last()) {
        (Some(&head), Some(&last)) => {
            h.cap_offset = caps[head].offset as u32;
            out.needed = extent(last).end;
        }
        _ => {
            h.flags &= !VFIO_REGION_INFO_FLAG_CAPS;
            h.cap_offset = 0;
        }
    }
    info.set_header(&h);
    out
}

/// What goes back to a caller whose `argsz` is `caller_argsz`, given the
/// complete, stripped region info `full` (struct + chain) and what
/// [`strip_mmap`] reported. VFIO's rule: when the chain does not fit, the
/// call still succeeds with `CAPS` set, `cap_offset` 0 and `argsz` raised
/// to the size needed; when it fits, `argsz` is left as given.
pub fn reply(
    full: &VfioArg<vfio_region_info>,
    caller_argsz: usize,
    stripped: &Stripped,
) -> VfioArg<vfio_region_info> {
    let mut h = full.header();
    let has_caps = h.flags & VFIO_REGION_INFO_FLAG_CAPS != 0;
    if has_caps && stripped.needed <= caller_argsz && stripped.needed <= full.len() {
        let mut out = VfioArg::new(&h, stripped.needed);
        out.tail_mut()
            .copy_from_slice(&full.as_bytes()[REGION_INFO_SIZE..stripped.needed]);
        h.argsz = caller_argsz as u32;
        out.set_header(&h);
        return out;
    }
    h.cap_offset = 0;
    h.argsz = if has_caps {
        stripped.needed as u32
    } else {
        caller_argsz as u32
    };
    let mut out = VfioArg::new(&h, REGION_INFO_SIZE);
    out.set_header(&h);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio::{
        VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    };

    const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    const SPARSE: u16 = VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16;
    const TYPE: u16 = VFIO_REGION_INFO_CAP_TYPE as u16;
    const MSIX: u16 = VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16;

    type Info = VfioArg<vfio_region_info>;

    /// A region info as the kernel writes it: struct, then capabilities of
    /// the given ids and body sizes (8-byte aligned), linked in order.
    fn info(flags: u32, caps: &[(u16, usize)]) -> Info {
        let mut h = vfio_region_info {
            flags,
            index: 0,
            size: 0x10_0000,
            offset: 0x123,
            ..Default::default()
        };
        let mut chain: Vec<(usize, u16, usize)> = Vec::new();
        let mut at = REGION_INFO_SIZE;
        for &(id, body) in caps {
            chain.push((at, id, body));
            at += CAP_HEADER_SIZE + body;
        }
        if let Some(&(first, _, _)) = chain.first() {
            h.cap_offset = first as u32;
            h.flags |= VFIO_REGION_INFO_FLAG_CAPS;
        }
        let mut b = Info::new(&h, at);
        for (k, &(off, id, body)) in chain.iter().enumerate() {
            let next = chain.get(k + 1).map_or(0, |c| c.0 as u32);
            let cap = vfio_info_cap_header {
                id,
                version: 1,
                next,
            };
            b.write_at(off, &cap).unwrap();
            b.as_bytes_mut()[off + CAP_HEADER_SIZE..off + CAP_HEADER_SIZE + body].fill(0xa5);
        }
        b
    }

    fn flags(b: &Info) -> u32 {
        b.header().flags
    }

    fn cap_offset(b: &Info) -> usize {
        b.header().cap_offset as usize
    }

    fn next_of(b: &Info, at: usize) -> usize {
        b.read_at::<vfio_info_cap_header>(at).unwrap().next as usize
    }

    fn ids(buf: &Info) -> Vec<u16> {
        let first = cap_offset(buf);
        if flags(buf) & VFIO_REGION_INFO_FLAG_CAPS == 0 {
            assert_eq!(first, 0, "cap_offset without CAPS");
            return vec![];
        }
        walk_chain(buf, first, REGION_INFO_SIZE, buf.len())
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect()
    }

    fn set_next(b: &mut Info, at: usize, next: u32) {
        let mut cap: vfio_info_cap_header = b.read_at(at).unwrap();
        cap.next = next;
        b.write_at(at, &cap).unwrap();
    }

    #[test]
    fn mmap_flag_cleared_without_caps() {
        let mut b = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[]);
        let s = strip_mmap(&mut b, REGION_INFO_SIZE);
        assert_eq!(flags(&b), RW);
        assert_eq!(s.needed, REGION_INFO_SIZE);
        assert!(s.removed.is_empty() && s.malformed.is_none());
        // Size and offset untouched.
        assert_eq!((b.header().size, b.header().offset), (0x10_0000, 0x123));
    }

    #[test]
    fn sparse_only_chain_becomes_empty() {
        let mut b = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(SPARSE, 8 + 32)]);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(flags(&b), RW, "MMAP and CAPS cleared");
        assert_eq!(cap_offset(&b), 0);
        assert_eq!(s.removed, vec![SPARSE]);
        assert_eq!(s.needed, REGION_INFO_SIZE);
        assert!(b.tail().iter().all(|&x| x == 0), "cap bytes zeroed");
    }

    #[test]
    fn sparse_first_middle_last() {
        // first
        let mut b = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(SPARSE, 40), (TYPE, 8)]);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(ids(&b), vec![TYPE]);
        assert_eq!(cap_offset(&b), REGION_INFO_SIZE + 48);
        assert_eq!(s.needed, end);
        // middle, with MSIX too
        let mut b = info(RW, &[(TYPE, 8), (SPARSE, 24), (MSIX, 0), (7, 8)]);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(ids(&b), vec![TYPE, 7]);
        assert_eq!(s.removed, vec![SPARSE, MSIX]);
        assert_eq!(s.needed, end);
        let first = REGION_INFO_SIZE;
        assert_eq!(next_of(&b, first), first + 16 + 32 + 8);
        // last: the needed size shrinks to the end of the last kept cap.
        let mut b = info(RW, &[(TYPE, 8), (MSIX, 0), (SPARSE, 24)]);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(ids(&b), vec![TYPE]);
        assert_eq!(s.needed, REGION_INFO_SIZE + 16);
        assert_eq!(next_of(&b, REGION_INFO_SIZE), 0, "next cleared");
        assert!(b.as_bytes()[s.needed..].iter().all(|&x| x == 0));
    }

    #[test]
    fn bad_chains_are_dropped_without_panic() {
        // A loop: the cap points to itself.
        let mut b = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(TYPE, 8), (SPARSE, 8)]);
        set_next(&mut b, REGION_INFO_SIZE, REGION_INFO_SIZE as u32);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert!(s.malformed.unwrap().contains("loop"));
        assert_eq!(flags(&b), RW);
        assert_eq!(cap_offset(&b), 0);
        // Pointing past the end, into the struct, misaligned, huge.
        for bad in [end as u32, 4, REGION_INFO_SIZE as u32 + 2, u32::MAX] {
            let mut b = info(RW, &[(TYPE, 8), (SPARSE, 8)]);
            set_next(&mut b, REGION_INFO_SIZE, bad);
            let s = strip_mmap(&mut b, end);
            assert!(s.malformed.is_some(), "next {bad:#x}");
            assert_eq!(ids(&b), Vec::<u16>::new());
        }
        // cap_offset itself bad.
        let mut b = info(RW, &[(TYPE, 8)]);
        let mut h = b.header();
        h.cap_offset = 0xffff_fff0;
        b.set_header(&h);
        let s = strip_mmap(&mut b, end);
        assert!(s.malformed.is_some());
        // A chain_end beyond the buffer.
        let mut b = info(RW, &[(SPARSE, 8)]);
        let s = strip_mmap(&mut b, 1 << 30);
        assert_eq!(s.removed, vec![SPARSE]);
        // A buffer shorter than the struct cannot be made at all.
        assert!(Info::from_bytes(vec![0xff; 10]).is_err());
        assert!(Info::from_bytes(Vec::new()).is_err());
    }

    #[test]
    fn long_chain_walk_is_bounded() {
        let caps: Vec<(u16, usize)> = (0..2000)
            .map(|i| (if i % 2 == 0 { SPARSE } else { TYPE }, 0))
            .collect();
        let mut b = info(RW, &caps);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(s.removed.len(), 1000);
        assert_eq!(ids(&b).len(), 1000);
    }

    #[test]
    fn reply_fits_or_asks_for_room() {
        let mut full = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(TYPE, 8), (SPARSE, 24)]);
        let end = full.len();
        let s = strip_mmap(&mut full, end);
        // Enough room: struct + TYPE cap, argsz as the caller gave it.
        let r = reply(&full, 4096, &s);
        assert_eq!(r.len(), REGION_INFO_SIZE + 16);
        assert_eq!(r.argsz(), 4096);
        assert_eq!(cap_offset(&r), REGION_INFO_SIZE);
        assert_eq!(ids(&r), vec![TYPE]);
        // Not enough: CAPS set, cap_offset 0, argsz = needed.
        let r = reply(&full, REGION_INFO_SIZE, &s);
        assert_eq!(r.len(), REGION_INFO_SIZE);
        assert_eq!(r.argsz(), REGION_INFO_SIZE + 16);
        assert_eq!(cap_offset(&r), 0);
        assert_ne!(flags(&r) & VFIO_REGION_INFO_FLAG_CAPS, 0);
        assert_eq!(flags(&r) & VFIO_REGION_INFO_FLAG_MMAP, 0);
        // No caps left: struct only, argsz untouched.
        let mut full = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(SPARSE, 24)]);
        let end = full.len();
        let s = strip_mmap(&mut full, end);
        let r = reply(&full, 40, &s);
        assert_eq!(r.len(), REGION_INFO_SIZE);
        assert_eq!(r.argsz(), 40);
        assert_eq!(flags(&r), RW);
    }
}
