//! The IOVA space of an iommufd IOAS as pure functions: usable ranges
//! (holes between reserved ranges), and the kernel's IOVA allocator
//! (`io_pagetable.c`, `iopt_alloc_iova`).

/// The CPU page size the kernel's iommufd works in (x86-64).
pub(super) const PAGE_SIZE: u64 = 4096;

/// The largest alignment the allocator uses: the huge page size (2 MiB on
/// x86-64 with transparent huge pages, as Debian's kernels have).
pub(super) const HPAGE_SIZE: u64 = 2 << 20;

/// Whether the inclusive range `[start, last]` lies inside one of `holes`
/// (inclusive ranges).
pub(super) fn inside(holes: &[(u64, u64)], start: u64, last: u64) -> bool {
    holes.iter().any(|&(s, l)| s <= start && last <= l)
}

/// Whether the inclusive ranges `[a0, a1]` and `[b0, b1]` meet.
pub(super) fn meets(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// The reserved ranges (inclusive) of a space whose usable ranges are
/// `holes` (inclusive, ascending, disjoint): their complement in
/// `[0, u64::MAX]`.
pub(super) fn reserved(holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = Some(0u64);
    for &(s, l) in holes {
        if let Some(a) = at {
            if s > a {
                out.push((a, s - 1));
            }
        }
        at = l.checked_add(1);
    }
    if let Some(a) = at {
        out.push((a, u64::MAX));
    }
    out
}

/// The IOVA `iopt_alloc_iova` picks for a mapping of `length` bytes at
/// user address (or file offset) `addr`, or `None` when nothing fits
/// (`ENOSPC`). `Err(align)`: the alignment the allocator would use is
/// below the IOAS's `iova_alignment` (`EINVAL`).
///
/// `holes`: the usable ranges; `used`: the mapped ranges; `allowed`: the
/// `ALLOW_IOVAS` list, empty for everything (all inclusive). The lowest
/// fitting IOVA in `[PAGE_SIZE, u64::MAX - PAGE_SIZE]` wins, aligned to
/// `min(roundup_pow_of_two(length), lowest set bit of addr, HPAGE_SIZE)`
/// with `addr`'s offset in its page kept.
pub(super) fn alloc_iova(
    holes: &[(u64, u64)],
    used: &[(u64, u64)],
    allowed: &[(u64, u64)],
    addr: u64,
    length: u64,
    iova_alignment: u64,
) -> Result<Option<u64>, u64> {
    let page_offset = addr % PAGE_SIZE;
    let pow = length.checked_next_power_of_two().unwrap_or(1 << 63);
    let mut align = if addr == 0 {
        pow
    } else {
        pow.min(1 << addr.trailing_zeros())
    };
    align = align.min(HPAGE_SIZE);
    if align < iova_alignment {
        return Err(align);
    }
    let fit = |start: u64, last: u64| -> Option<u64> {
        let aligned = start.checked_add(align - 1)? & !(align - 1) | page_offset;
        (aligned < last && last - aligned >= length - 1).then_some(aligned)
    };
    let everything = [(PAGE_SIZE, u64::MAX - PAGE_SIZE)];
    let mut spans: Vec<(u64, u64)> = if allowed.is_empty() {
        everything.to_vec()
    } else {
        allowed.to_vec()
    };
    spans.sort_unstable();
    let mut holes = holes.to_vec();
    holes.sort_unstable();
    let mut used = used.to_vec();
    used.sort_unstable();
    for (a_start, a_last) in spans {
        let (a_start, a_last) = (a_start.max(PAGE_SIZE), a_last.min(u64::MAX - PAGE_SIZE));
        if a_start > a_last {
            continue;
        }
        let Some(start) = fit(a_start, a_last) else {
            continue;
        };
        for &(h_start, h_last) in &holes {
            let (lo, hi) = (h_start.max(start), h_last.min(a_last));
            if lo > hi {
                continue;
            }
            let mut cursor = lo;
            let mut gaps: Vec<(u64, u64)> = used.clone();
            gaps.push((hi.saturating_add(1), hi.saturating_add(1)));
            for (u_start, u_last) in gaps {
                if u_last < cursor {
                    continue;
                }
                let gap_last = u_start.saturating_sub(1).min(hi);
                if u_start > cursor && gap_last >= cursor {
                    if let Some(got) = fit(cursor, gap_last) {
                        return Ok(Some(got));
                    }
                }
                cursor = cursor.max(u_last.saturating_add(1));
                if cursor > hi || u_last == u64::MAX {
                    break;
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [(u64, u64); 1] = [(0, u64::MAX)];

    #[test]
    fn the_lowest_aligned_place_never_0() {
        // 2 pages at a 4-page aligned address: aligned to 8 KiB, from 4 KiB.
        assert_eq!(
            alloc_iova(&ALL, &[], &[], 0x7f00_0000_4000, 0x2000, 1),
            Ok(Some(0x2000))
        );
        // Length 3 pages rounds up to 4 pages of alignment.
        assert_eq!(alloc_iova(&ALL, &[], &[], 0, 0x3000, 1), Ok(Some(0x4000)));
        // An address in the middle of a page keeps its offset.
        assert_eq!(
            alloc_iova(&ALL, &[], &[], 0x1010, 0x100, 1),
            Ok(Some(0x1010))
        );
        // Huge lengths are aligned to at most 2 MiB.
        assert_eq!(
            alloc_iova(&ALL, &[], &[], 0, 1 << 30, 1),
            Ok(Some(0x20_0000))
        );
    }

    #[test]
    fn used_ranges_reserved_holes_and_allowed_spans_are_avoided() {
        let used = [(0x1000, 0x2fff)];
        assert_eq!(
            alloc_iova(&ALL, &used, &[], 0x1000, 0x1000, 1),
            Ok(Some(0x3000))
        );
        let holes = [(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)];
        let full = [(0x1000, 0xfedf_ffff)];
        assert_eq!(
            alloc_iova(&holes, &full, &[], 0x1000, 0x1000, 0x1000),
            Ok(Some(0xfef0_0000))
        );
        let allowed = [(0x40_0000, 0x5f_ffff)];
        assert_eq!(
            alloc_iova(&ALL, &[], &allowed, 0, 0x2000, 1),
            Ok(Some(0x40_0000))
        );
        let tiny = [(0x40_0000, 0x40_0fff)];
        assert_eq!(
            alloc_iova(&ALL, &[], &tiny, 0, 0x2000, 1),
            Ok(None),
            "ENOSPC"
        );
    }

    #[test]
    fn an_alignment_below_the_ioas_is_einval() {
        assert_eq!(alloc_iova(&ALL, &[], &[], 0x1010, 0x100, 0x1000), Err(0x10));
    }

    #[test]
    fn reserved_is_the_complement_of_the_holes() {
        assert_eq!(reserved(&ALL), vec![]);
        assert_eq!(
            reserved(&[(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)]),
            vec![(0xfee0_0000, 0xfeef_ffff), (1 << 48, u64::MAX)]
        );
        assert_eq!(
            reserved(&[(0x1000, 0x1fff)]),
            vec![(0, 0xfff), (0x2000, u64::MAX)]
        );
        assert!(inside(&ALL, 5, 10));
        assert!(meets((0, 5), (5, 9)) && !meets((0, 4), (5, 9)));
    }
}
