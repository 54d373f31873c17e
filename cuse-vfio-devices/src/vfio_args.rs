//! Pure rewriting of VFIO device ioctl arguments, over byte buffers.
//!
//! - [`strip_mmap`] / [`region_info_reply`]: `VFIO_DEVICE_GET_REGION_INFO`
//!   must not advertise mmap (CUSE cannot mmap): the `MMAP` flag is
//!   cleared and the sparse-mmap and MSI-X-mappable capabilities are
//!   unlinked from the chain, so programs fall back to `pread`/`pwrite`.
//! - [`IrqSet`]: the header of `VFIO_DEVICE_SET_IRQS` and its eventfd array,
//!   whose numbers are fds of the caller and must be replaced by the
//!   daemon's copies.
//!
//! Every function checks bounds and returns an error (or drops a malformed
//! capability chain) instead of panicking; walking a chain is bounded
//! because offsets must strictly increase.

use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_irq_set, vfio_region_info, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};

use crate::error::{Error, Result};

/// `sizeof(struct vfio_region_info)`: where its capability chain starts,
/// and also its minimum `argsz` (VFIO's `offsetofend(offset)`).
pub const REGION_INFO_SIZE: usize = std::mem::size_of::<vfio_region_info>();
/// `sizeof(struct vfio_info_cap_header)`.
const CAP_HEADER_SIZE: usize = std::mem::size_of::<vfio_info_cap_header>();
/// `offsetofend(struct vfio_irq_set, count)`: the header before the data.
pub const IRQ_SET_HEADER: usize = std::mem::size_of::<vfio_irq_set>();

const FLAGS_AT: usize = std::mem::offset_of!(vfio_region_info, flags);
const CAP_OFFSET_AT: usize = std::mem::offset_of!(vfio_region_info, cap_offset);
const ARGSZ_AT: usize = 0;

/// Capabilities that describe mmap and are removed from region info.
const MMAP_CAPS: [u32; 2] = [
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
];

/// The most eventfds one `VFIO_DEVICE_SET_IRQS` may carry (the PCI MSI-X
/// limit); more is `EINVAL` before any fd is copied.
pub const MAX_IRQ_FDS: u32 = 2048;

fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(b.try_into().ok()?))
}

fn get_u16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(b.try_into().ok()?))
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    if let Some(b) = buf.get_mut(at..at + 4) {
        b.copy_from_slice(&v.to_ne_bytes());
    }
}

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

/// Walk the capability chain starting at `first` within `buf[..end]`.
/// Every capability must lie at or after `base`, be 4-byte aligned, have
/// its header inside `end`, and be followed by a strictly greater offset
/// (so the walk ends after at most `end / 8` steps).
pub fn walk_chain(
    buf: &[u8],
    first: usize,
    base: usize,
    end: usize,
) -> std::result::Result<Vec<Cap>, String> {
    let end = end.min(buf.len());
    let mut caps = Vec::new();
    let mut at = first;
    loop {
        if at < base || at % 4 != 0 || !at.checked_add(CAP_HEADER_SIZE).is_some_and(|e| e <= end) {
            return Err(format!(
                "capability at offset {at} is outside [{base}, {end}) or misaligned"
            ));
        }
        let id = get_u16(buf, at).unwrap_or(0);
        let next = get_u32(buf, at + 4).unwrap_or(0);
        caps.push(Cap {
            offset: at,
            id,
            next,
        });
        if next == 0 {
            return Ok(caps);
        }
        let next = next as usize;
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

/// Remove every trace of mmap from a `struct vfio_region_info` returned by
/// the kernel: `buf[..chain_end]` holds the struct and, if the `CAPS` flag
/// is set and `cap_offset` is not 0, the chain (offsets counted from the
/// start of the struct). Clears `VFIO_REGION_INFO_FLAG_MMAP`; unlinks the
/// sparse-mmap and MSI-X-mappable capabilities (fixing the `next` offsets
/// and zeroing their bytes); clears `CAPS` and `cap_offset` if nothing
/// remains. A malformed chain is dropped whole.
pub fn strip_mmap(buf: &mut [u8], chain_end: usize) -> Stripped {
    let mut out = Stripped {
        needed: REGION_INFO_SIZE,
        removed: Vec::new(),
        malformed: None,
    };
    let Some(flags) = get_u32(buf, FLAGS_AT) else {
        return out;
    };
    let mut flags = flags & !VFIO_REGION_INFO_FLAG_MMAP;
    let first = get_u32(buf, CAP_OFFSET_AT).unwrap_or(0) as usize;
    if flags & VFIO_REGION_INFO_FLAG_CAPS == 0 || first == 0 {
        put_u32(buf, FLAGS_AT, flags);
        return out;
    }
    let chain_end = chain_end.min(buf.len());
    let caps = match walk_chain(buf, first, REGION_INFO_SIZE, chain_end) {
        Ok(caps) => caps,
        Err(why) => {
            flags &= !VFIO_REGION_INFO_FLAG_CAPS;
            put_u32(buf, FLAGS_AT, flags);
            put_u32(buf, CAP_OFFSET_AT, 0);
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
    for i in 0..caps.len() {
        if !kept.contains(&i) {
            out.removed.push(caps[i].id);
            buf[extent(i)].fill(0);
        }
    }
    for (k, &i) in kept.iter().enumerate() {
        let next = kept.get(k + 1).map_or(0, |&j| caps[j].offset as u32);
        put_u32(buf, caps[i].offset + 4, next);
    }
    match (kept.first(), kept.last()) {
        (Some(&head), Some(&last)) => {
            put_u32(buf, CAP_OFFSET_AT, caps[head].offset as u32);
            out.needed = extent(last).end;
        }
        _ => {
            flags &= !VFIO_REGION_INFO_FLAG_CAPS;
            put_u32(buf, CAP_OFFSET_AT, 0);
        }
    }
    put_u32(buf, FLAGS_AT, flags);
    out
}

/// The bytes to write back to a caller whose `argsz` is `caller_argsz`,
/// given the complete, stripped region info `full` (struct + chain) and
/// what [`strip_mmap`] reported. VFIO's rule: when the chain does not fit,
/// the call still succeeds with `CAPS` set, `cap_offset` 0 and `argsz`
/// raised to the size needed; when it fits, `argsz` is left as given.
pub fn region_info_reply(full: &[u8], caller_argsz: usize, stripped: &Stripped) -> Vec<u8> {
    let has_caps = get_u32(full, FLAGS_AT).unwrap_or(0) & VFIO_REGION_INFO_FLAG_CAPS != 0;
    let base_len = REGION_INFO_SIZE.min(full.len());
    if has_caps && stripped.needed <= caller_argsz && stripped.needed <= full.len() {
        let mut out = full[..stripped.needed].to_vec();
        put_u32(&mut out, ARGSZ_AT, caller_argsz as u32);
        return out;
    }
    let mut out = full[..base_len].to_vec();
    put_u32(&mut out, CAP_OFFSET_AT, 0);
    if has_caps {
        put_u32(&mut out, ARGSZ_AT, stripped.needed as u32);
    } else {
        put_u32(&mut out, ARGSZ_AT, caller_argsz as u32);
    }
    out
}

/// The header of a `VFIO_DEVICE_SET_IRQS` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqSet {
    /// `argsz`.
    pub argsz: u32,
    /// `flags` (data type and action).
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
}

impl IrqSet {
    /// Parse the header of `buf` (the caller's `argsz` bytes).
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let field = |name: &str, at| {
            get_u32(buf, at).ok_or_else(|| {
                Error::new(
                    Errno::EINVAL,
                    format!(
                        "VFIO_DEVICE_SET_IRQS: argsz {} is below the header ({IRQ_SET_HEADER} bytes, missing {name})",
                        buf.len()
                    ),
                )
            })
        };
        Ok(IrqSet {
            argsz: field("argsz", std::mem::offset_of!(vfio_irq_set, argsz))?,
            flags: field("flags", std::mem::offset_of!(vfio_irq_set, flags))?,
            index: field("index", std::mem::offset_of!(vfio_irq_set, index))?,
            start: field("start", std::mem::offset_of!(vfio_irq_set, start))?,
            count: field("count", std::mem::offset_of!(vfio_irq_set, count))?,
        })
    }

    /// Whether the data is an array of eventfds.
    pub fn has_eventfds(&self) -> bool {
        self.flags & VFIO_IRQ_SET_DATA_TYPE_MASK == VFIO_IRQ_SET_DATA_EVENTFD
    }

    /// The `count` eventfd numbers (`s32`, -1 = none) following the header
    /// in `buf`. `EINVAL` if there are more than [`MAX_IRQ_FDS`] or they do
    /// not fit in `argsz` (VFIO's own rule), before anything is copied.
    pub fn eventfds(&self, buf: &[u8]) -> Result<Vec<i32>> {
        if self.count > MAX_IRQ_FDS {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "VFIO_DEVICE_SET_IRQS: count {} is more than {MAX_IRQ_FDS} eventfds",
                    self.count
                ),
            ));
        }
        let need = IRQ_SET_HEADER + self.count as usize * 4;
        if need > buf.len() || need > self.argsz as usize {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "VFIO_DEVICE_SET_IRQS: {} eventfds need argsz {need}, argsz is {}",
                    self.count, self.argsz
                ),
            ));
        }
        Ok(buf[IRQ_SET_HEADER..need]
            .chunks_exact(4)
            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Write `fds` over the eventfd array of `buf` (after [`eventfds`]
    /// accepted it, so it fits).
    ///
    /// [`eventfds`]: IrqSet::eventfds
    pub fn put_eventfds(buf: &mut [u8], fds: &[i32]) {
        for (i, fd) in fds.iter().enumerate() {
            let at = IRQ_SET_HEADER + 4 * i;
            if let Some(b) = buf.get_mut(at..at + 4) {
                b.copy_from_slice(&fd.to_ne_bytes());
            }
        }
    }
}

/// `sizeof(struct vfio_pci_hot_reset_info)` and `struct vfio_pci_hot_reset`
/// without their arrays: `argsz`, `flags`, `count`.
pub const HOT_RESET_HEADER: usize = 12;
/// `sizeof(struct vfio_pci_dependent_device)`.
const DEPENDENT_DEVICE_SIZE: usize = 8;

/// The IOMMU groups of the devices a `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`
/// answer (`buf`, header plus `count` devices) lists, without repeats, in
/// order of appearance. `EINVAL` if the devices do not fit in `buf`.
pub fn hot_reset_groups(buf: &[u8]) -> Result<Vec<u32>> {
    let count = get_u32(buf, 8).unwrap_or(0) as usize;
    let need = count
        .checked_mul(DEPENDENT_DEVICE_SIZE)
        .and_then(|n| n.checked_add(HOT_RESET_HEADER));
    if !need.is_some_and(|n| n <= buf.len()) {
        return Err(Error::new(
            Errno::EINVAL,
            format!(
                "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO listed {count} devices in {} bytes",
                buf.len()
            ),
        ));
    }
    let mut groups = Vec::new();
    for i in 0..count {
        let g = get_u32(buf, HOT_RESET_HEADER + DEPENDENT_DEVICE_SIZE * i).unwrap_or(0);
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    Ok(groups)
}

/// A `struct vfio_pci_hot_reset` naming the group files `fds`.
pub fn hot_reset_arg(fds: &[i32]) -> Vec<u8> {
    let argsz = HOT_RESET_HEADER + 4 * fds.len();
    let mut b = Vec::with_capacity(argsz);
    b.extend_from_slice(&(argsz as u32).to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&(fds.len() as u32).to_ne_bytes());
    for fd in fds {
        b.extend_from_slice(&fd.to_ne_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio::{
        VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_BOOL, VFIO_REGION_INFO_CAP_TYPE,
        VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    };

    const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    const SPARSE: u16 = VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16;
    const TYPE: u16 = VFIO_REGION_INFO_CAP_TYPE as u16;
    const MSIX: u16 = VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16;

    /// A region info as the kernel writes it: struct, then capabilities of
    /// the given ids and body sizes (8-byte aligned), linked in order.
    fn info(flags: u32, caps: &[(u16, usize)]) -> Vec<u8> {
        let mut b = vec![0u8; REGION_INFO_SIZE];
        put_u32(&mut b, FLAGS_AT, flags);
        put_u32(&mut b, 8, 0); // index
        b[16..24].copy_from_slice(&0x10_0000u64.to_ne_bytes()); // size
        b[24..32].copy_from_slice(&0x123u64.to_ne_bytes()); // offset
        let mut prev: Option<usize> = None;
        for &(id, body) in caps {
            let at = b.len();
            if let Some(p) = prev {
                put_u32(&mut b, p + 4, at as u32);
            } else {
                put_u32(&mut b, CAP_OFFSET_AT, at as u32);
                put_u32(&mut b, FLAGS_AT, flags | VFIO_REGION_INFO_FLAG_CAPS);
            }
            b.extend_from_slice(&id.to_ne_bytes());
            b.extend_from_slice(&1u16.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend(vec![0xa5u8; body]);
            prev = Some(at);
        }
        let len = b.len() as u32;
        put_u32(&mut b, ARGSZ_AT, len);
        b
    }

    fn ids(buf: &[u8]) -> Vec<u16> {
        let flags = get_u32(buf, FLAGS_AT).unwrap();
        let first = get_u32(buf, CAP_OFFSET_AT).unwrap() as usize;
        if flags & VFIO_REGION_INFO_FLAG_CAPS == 0 {
            assert_eq!(first, 0, "cap_offset without CAPS");
            return vec![];
        }
        walk_chain(buf, first, REGION_INFO_SIZE, buf.len())
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect()
    }

    #[test]
    fn mmap_flag_cleared_without_caps() {
        let mut b = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[]);
        let s = strip_mmap(&mut b, REGION_INFO_SIZE);
        assert_eq!(get_u32(&b, FLAGS_AT).unwrap(), RW);
        assert_eq!(s.needed, REGION_INFO_SIZE);
        assert!(s.removed.is_empty() && s.malformed.is_none());
        // Size and offset untouched.
        assert_eq!(&b[16..32], &info(RW, &[])[16..32]);
    }

    #[test]
    fn sparse_only_chain_becomes_empty() {
        let mut b = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(SPARSE, 8 + 32)]);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(get_u32(&b, FLAGS_AT).unwrap(), RW, "MMAP and CAPS cleared");
        assert_eq!(get_u32(&b, CAP_OFFSET_AT).unwrap(), 0);
        assert_eq!(s.removed, vec![SPARSE]);
        assert_eq!(s.needed, REGION_INFO_SIZE);
        assert!(
            b[REGION_INFO_SIZE..].iter().all(|&x| x == 0),
            "cap bytes zeroed"
        );
    }

    #[test]
    fn sparse_first_middle_last() {
        // first
        let mut b = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(SPARSE, 40), (TYPE, 8)]);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(ids(&b), vec![TYPE]);
        assert_eq!(
            get_u32(&b, CAP_OFFSET_AT).unwrap() as usize,
            REGION_INFO_SIZE + 48
        );
        assert_eq!(s.needed, end);
        // middle, with MSIX too
        let mut b = info(RW, &[(TYPE, 8), (SPARSE, 24), (MSIX, 0), (7, 8)]);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(ids(&b), vec![TYPE, 7]);
        assert_eq!(s.removed, vec![SPARSE, MSIX]);
        assert_eq!(s.needed, end);
        let first = REGION_INFO_SIZE;
        assert_eq!(
            get_u32(&b, first + 4).unwrap() as usize,
            first + 16 + 32 + 8
        );
        // last: the needed size shrinks to the end of the last kept cap.
        let mut b = info(RW, &[(TYPE, 8), (MSIX, 0), (SPARSE, 24)]);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert_eq!(ids(&b), vec![TYPE]);
        assert_eq!(s.needed, REGION_INFO_SIZE + 16);
        assert_eq!(
            get_u32(&b, REGION_INFO_SIZE + 4).unwrap(),
            0,
            "next cleared"
        );
        assert!(b[s.needed..].iter().all(|&x| x == 0));
    }

    #[test]
    fn bad_chains_are_dropped_without_panic() {
        // A loop: the cap points to itself.
        let mut b = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(TYPE, 8), (SPARSE, 8)]);
        put_u32(&mut b, REGION_INFO_SIZE + 4, REGION_INFO_SIZE as u32);
        let end = b.len();
        let s = strip_mmap(&mut b, end);
        assert!(s.malformed.unwrap().contains("loop"));
        assert_eq!(get_u32(&b, FLAGS_AT).unwrap(), RW);
        assert_eq!(get_u32(&b, CAP_OFFSET_AT).unwrap(), 0);
        // Pointing past the end, into the struct, misaligned, huge.
        for bad in [end as u32, 4, REGION_INFO_SIZE as u32 + 2, u32::MAX] {
            let mut b = info(RW, &[(TYPE, 8), (SPARSE, 8)]);
            put_u32(&mut b, REGION_INFO_SIZE + 4, bad);
            let s = strip_mmap(&mut b, end);
            assert!(s.malformed.is_some(), "next {bad:#x}");
            assert_eq!(ids(&b), Vec::<u16>::new());
        }
        // cap_offset itself bad.
        let mut b = info(RW, &[(TYPE, 8)]);
        put_u32(&mut b, CAP_OFFSET_AT, 0xffff_fff0);
        let s = strip_mmap(&mut b, end);
        assert!(s.malformed.is_some());
        // A chain_end beyond the buffer, a buffer shorter than the struct.
        let mut b = info(RW, &[(SPARSE, 8)]);
        let s = strip_mmap(&mut b, 1 << 30);
        assert_eq!(s.removed, vec![SPARSE]);
        let mut short = vec![0xffu8; 10];
        strip_mmap(&mut short, 10);
        assert_eq!(
            get_u32(&short, FLAGS_AT).unwrap() & VFIO_REGION_INFO_FLAG_MMAP,
            0
        );
        strip_mmap(&mut [], 0);
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
        let r = region_info_reply(&full, 4096, &s);
        assert_eq!(r.len(), REGION_INFO_SIZE + 16);
        assert_eq!(get_u32(&r, ARGSZ_AT).unwrap(), 4096);
        assert_eq!(
            get_u32(&r, CAP_OFFSET_AT).unwrap() as usize,
            REGION_INFO_SIZE
        );
        assert_eq!(ids(&r), vec![TYPE]);
        // Not enough: CAPS set, cap_offset 0, argsz = needed.
        let r = region_info_reply(&full, REGION_INFO_SIZE, &s);
        assert_eq!(r.len(), REGION_INFO_SIZE);
        assert_eq!(
            get_u32(&r, ARGSZ_AT).unwrap() as usize,
            REGION_INFO_SIZE + 16
        );
        assert_eq!(get_u32(&r, CAP_OFFSET_AT).unwrap(), 0);
        assert_ne!(
            get_u32(&r, FLAGS_AT).unwrap() & VFIO_REGION_INFO_FLAG_CAPS,
            0
        );
        assert_eq!(
            get_u32(&r, FLAGS_AT).unwrap() & VFIO_REGION_INFO_FLAG_MMAP,
            0
        );
        // No caps left: struct only, argsz untouched.
        let mut full = info(RW | VFIO_REGION_INFO_FLAG_MMAP, &[(SPARSE, 24)]);
        let end = full.len();
        let s = strip_mmap(&mut full, end);
        let r = region_info_reply(&full, 40, &s);
        assert_eq!(r.len(), REGION_INFO_SIZE);
        assert_eq!(get_u32(&r, ARGSZ_AT).unwrap(), 40);
        assert_eq!(get_u32(&r, FLAGS_AT).unwrap(), RW);
    }

    fn irq_set(flags: u32, count: u32, argsz: u32, data: &[i32]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [argsz, flags, 2, 0, count] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        for d in data {
            b.extend_from_slice(&d.to_ne_bytes());
        }
        b
    }

    #[test]
    fn irq_set_header_and_fds() {
        let ev = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let b = irq_set(ev, 3, 32, &[5, -1, 9]);
        let h = IrqSet::parse(&b).unwrap();
        assert_eq!((h.argsz, h.index, h.start, h.count), (32, 2, 0, 3));
        assert!(h.has_eventfds());
        assert_eq!(h.eventfds(&b).unwrap(), vec![5, -1, 9]);
        let mut b2 = b.clone();
        IrqSet::put_eventfds(&mut b2, &[50, -1, 90]);
        assert_eq!(
            IrqSet::parse(&b2).unwrap().eventfds(&b2).unwrap(),
            vec![50, -1, 90]
        );
        assert_eq!(
            &b2[..IRQ_SET_HEADER],
            &b[..IRQ_SET_HEADER],
            "header untouched"
        );
        // BOOL data is not fds.
        let b = irq_set(
            VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
            1,
            21,
            &[],
        );
        assert!(!IrqSet::parse(&b).unwrap().has_eventfds());
    }

    #[test]
    fn hot_reset_info_groups_and_arg() {
        let mut info = Vec::new();
        for v in [12u32 + 24, 0, 3] {
            info.extend_from_slice(&v.to_ne_bytes());
        }
        for (g, bus, devfn) in [(7u32, 1u8, 8u8), (7, 1, 16), (9, 2, 0)] {
            info.extend_from_slice(&g.to_ne_bytes());
            info.extend_from_slice(&0u16.to_ne_bytes());
            info.push(bus);
            info.push(devfn);
        }
        assert_eq!(hot_reset_groups(&info).unwrap(), vec![7, 9]);
        // count larger than the bytes, or absurd: EINVAL, no panic.
        put_u32(&mut info, 8, 4);
        assert_eq!(hot_reset_groups(&info).unwrap_err().errno, Errno::EINVAL);
        put_u32(&mut info, 8, u32::MAX);
        assert_eq!(hot_reset_groups(&info).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(hot_reset_groups(&[]).unwrap_err().errno, Errno::EINVAL);
        let arg = hot_reset_arg(&[5, 6]);
        assert_eq!(arg.len(), 20);
        assert_eq!(
            (
                get_u32(&arg, 0),
                get_u32(&arg, 4),
                get_u32(&arg, 8),
                get_u32(&arg, 12),
                get_u32(&arg, 16)
            ),
            (Some(20), Some(0), Some(2), Some(5), Some(6))
        );
    }

    #[test]
    fn irq_set_bad_counts() {
        let ev = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        // count larger than argsz allows.
        let b = irq_set(ev, 4, 32, &[1, 2, 3]);
        let e = IrqSet::parse(&b).unwrap().eventfds(&b).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        // argsz claims the room, buffer does not hold it.
        let b = irq_set(ev, 3, 64, &[1, 2]);
        assert_eq!(
            IrqSet::parse(&b).unwrap().eventfds(&b).unwrap_err().errno,
            Errno::EINVAL
        );
        // huge count: refused before any arithmetic can overflow.
        let b = irq_set(ev, u32::MAX, 32, &[1, 2, 3]);
        let e = IrqSet::parse(&b).unwrap().eventfds(&b).unwrap_err();
        assert!(e.message.contains("more than 2048"), "{}", e.message);
        // count 0 is fine (no fds).
        let b = irq_set(ev, 0, 20, &[]);
        assert_eq!(
            IrqSet::parse(&b).unwrap().eventfds(&b).unwrap(),
            Vec::<i32>::new()
        );
        // short header.
        assert_eq!(IrqSet::parse(&b[..16]).unwrap_err().errno, Errno::EINVAL);
    }
}
