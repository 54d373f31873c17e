//! Decoding the bytes `VFIO_IOMMU_GET_INFO` returns: the base
//! `struct vfio_iommu_type1_info` and its capability chain.
//!
//! The chain is read with bounds checks everywhere: an offset outside the
//! buffer, a capability shorter than its layout, or a `next` that does not
//! move forward is reported as `EIO`, never a panic.

use ioasid_engine::backend::DomainInfo;
use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_iommu_type1_info, vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_dma_avail, vfio_iova_range, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
};

use crate::error::{Error, Result};

/// Size of the base struct: what the first call passes as `argsz`.
pub(crate) const BASE_SIZE: usize = std::mem::size_of::<vfio_iommu_type1_info>();

// Field offsets, from the bindings' layout.
const ARGSZ: usize = std::mem::offset_of!(vfio_iommu_type1_info, argsz);
const FLAGS: usize = std::mem::offset_of!(vfio_iommu_type1_info, flags);
const PGSIZES: usize = std::mem::offset_of!(vfio_iommu_type1_info, iova_pgsizes);
const CAP_OFFSET: usize = std::mem::offset_of!(vfio_iommu_type1_info, cap_offset);
const HDR_SIZE: usize = std::mem::size_of::<vfio_info_cap_header>();
const HDR_ID: usize = std::mem::offset_of!(vfio_info_cap_header, id);
const HDR_NEXT: usize = std::mem::offset_of!(vfio_info_cap_header, next);
const IOVA_NR: usize = std::mem::offset_of!(vfio_iommu_type1_info_cap_iova_range, nr_iovas);
const IOVA_RANGES: usize = std::mem::offset_of!(vfio_iommu_type1_info_cap_iova_range, iova_ranges);
const RANGE_SIZE: usize = std::mem::size_of::<vfio_iova_range>();
const AVAIL: usize = std::mem::offset_of!(vfio_iommu_type1_info_dma_avail, avail);
const AVAIL_SIZE: usize = std::mem::size_of::<vfio_iommu_type1_info_dma_avail>();

/// Upper bound on chain length, against loops in a corrupt chain.
const MAX_CAPS: usize = 64;

fn bytes<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    bytes(buf, at).map(u16::from_ne_bytes)
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    bytes(buf, at).map(u32::from_ne_bytes)
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    bytes(buf, at).map(u64::from_ne_bytes)
}

fn malformed(what: impl Into<String>) -> Error {
    Error::new(
        Errno::EIO,
        format!("malformed VFIO_IOMMU_GET_INFO reply: {}", what.into()),
    )
}

/// The size the kernel asked for in `argsz` (it raises `argsz` when the
/// capabilities do not fit the buffer it was given).
pub(crate) fn wanted_size(buf: &[u8]) -> Option<usize> {
    u32_at(buf, ARGSZ).map(|n| n as usize)
}

/// Whether the reply has a capability chain that did not fit the buffer.
pub(crate) fn needs_bigger_buffer(buf: &[u8]) -> bool {
    let flags = u32_at(buf, FLAGS).unwrap_or(0);
    flags & VFIO_IOMMU_INFO_CAPS != 0 && wanted_size(buf).is_some_and(|n| n > buf.len())
}

/// Decode a reply of `buf.len()` bytes.
pub fn parse(buf: &[u8]) -> Result<DomainInfo> {
    let flags = u32_at(buf, FLAGS).ok_or_else(|| malformed("shorter than the base struct"))?;
    let mut info = DomainInfo::default();
    if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        info.pgsize_bitmap = u64_at(buf, PGSIZES).ok_or_else(|| malformed("no iova_pgsizes"))?;
    }
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(info);
    }
    let mut off = u32_at(buf, CAP_OFFSET).ok_or_else(|| malformed("no cap_offset"))? as usize;
    let mut count = 0;
    while off != 0 {
        count += 1;
        if count > MAX_CAPS {
            return Err(malformed("capability chain too long"));
        }
        if off < BASE_SIZE || off.saturating_add(HDR_SIZE) > buf.len() {
            return Err(malformed(format!(
                "capability at {off} outside the {}-byte buffer",
                buf.len()
            )));
        }
        let id = u16_at(buf, off + HDR_ID).unwrap_or_default();
        let next = u32_at(buf, off + HDR_NEXT).unwrap_or_default() as usize;
        match u32::from(id) {
            VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                let nr = u32_at(buf, off + IOVA_NR)
                    .ok_or_else(|| malformed("truncated IOVA_RANGE"))?
                    as usize;
                info.iova_ranges.clear();
                for i in 0..nr {
                    let at = off + IOVA_RANGES + i * RANGE_SIZE;
                    let start = u64_at(buf, at);
                    let last = u64_at(buf, at + 8);
                    match (start, last) {
                        (Some(s), Some(l)) => info.iova_ranges.push((s, l)),
                        _ => return Err(malformed(format!("IOVA_RANGE {i} of {nr} truncated"))),
                    }
                }
            }
            VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                if off + AVAIL_SIZE > buf.len() {
                    return Err(malformed("truncated DMA_AVAIL"));
                }
                info.dma_avail = u32_at(buf, off + AVAIL);
            }
            // MIGRATION and anything newer: not needed.
            _ => {}
        }
        if next != 0 && next <= off {
            return Err(malformed(format!(
                "capability at {off} points back to {next}"
            )));
        }
        off = next;
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build a reply by hand, field by field, following
    /// `struct vfio_iommu_type1_info` (argsz u32, flags u32, iova_pgsizes u64,
    /// cap_offset u32, pad u32), `struct vfio_info_cap_header` (id u16,
    /// version u16, next u32), `..._cap_iova_range` (header, nr_iovas u32,
    /// reserved u32, then {start u64, end u64}...) and `..._dma_avail`
    /// (header, avail u32).
    struct Fixture(Vec<u8>);

    impl Fixture {
        fn base(flags: u32, pgsizes: u64, cap_offset: u32) -> Self {
            let mut v = Vec::new();
            v.extend_from_slice(&0u32.to_ne_bytes()); // argsz, patched below
            v.extend_from_slice(&flags.to_ne_bytes());
            v.extend_from_slice(&pgsizes.to_ne_bytes());
            v.extend_from_slice(&cap_offset.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            Fixture(v)
        }
        fn header(&mut self, id: u16, next: u32) {
            self.0.extend_from_slice(&id.to_ne_bytes());
            self.0.extend_from_slice(&1u16.to_ne_bytes());
            self.0.extend_from_slice(&next.to_ne_bytes());
        }
        fn u32(&mut self, x: u32) {
            self.0.extend_from_slice(&x.to_ne_bytes());
        }
        fn u64(&mut self, x: u64) {
            self.0.extend_from_slice(&x.to_ne_bytes());
        }
        fn done(mut self) -> Vec<u8> {
            let n = self.0.len() as u32;
            self.0[..4].copy_from_slice(&n.to_ne_bytes());
            self.0
        }
    }

    const PGS: u64 = 0x4000_0020_1000; // 4K | 2M | 1G

    /// What Linux 6.1 returns for a container with a group attached: the
    /// IOVA ranges around the x86 MSI window, then DMA_AVAIL.
    fn typical() -> Vec<u8> {
        let mut f = Fixture::base(VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS, PGS, 24);
        // IOVA_RANGE at 24, 16 + 2*16 = 48 bytes long, next at 72.
        f.header(1, 72);
        f.u32(2);
        f.u32(0);
        f.u64(0);
        f.u64(0xfedf_ffff);
        f.u64(0xfef0_0000);
        f.u64(0x7f_ffff_ffff);
        // DMA_AVAIL at 72.
        f.header(3, 0);
        f.u32(65535);
        f.done()
    }

    #[test]
    fn parses_pgsizes_iova_ranges_and_dma_avail() {
        let buf = typical();
        assert_eq!(buf.len(), 84);
        let info = parse(&buf).unwrap();
        assert_eq!(info.pgsize_bitmap, PGS);
        assert_eq!(
            info.iova_ranges,
            vec![(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]
        );
        assert_eq!(info.dma_avail, Some(65535));
    }

    #[test]
    fn skips_unknown_capabilities() {
        let mut f = Fixture::base(VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS, PGS, 24);
        // MIGRATION (id 2), 32 bytes, then DMA_AVAIL at 56.
        f.header(2, 56);
        f.u32(0);
        f.u32(0);
        f.u64(0x1000);
        f.u64(0);
        f.header(3, 0);
        f.u32(7);
        let info = parse(&f.done()).unwrap();
        assert_eq!(info.iova_ranges, vec![]);
        assert_eq!(info.dma_avail, Some(7));
    }

    #[test]
    fn without_caps_flag_the_chain_is_ignored() {
        let buf = Fixture::base(VFIO_IOMMU_INFO_PGSIZES, 0x1000, 999).done();
        let info = parse(&buf).unwrap();
        assert_eq!(info.pgsize_bitmap, 0x1000);
        assert_eq!(info.dma_avail, None);
    }

    /// The kernel's answer to a too-small buffer: CAPS set, cap_offset 0,
    /// argsz raised to what it needs.
    #[test]
    fn detects_a_too_small_buffer() {
        let mut buf = Fixture::base(VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS, PGS, 0).done();
        buf[..4].copy_from_slice(&84u32.to_ne_bytes());
        assert!(needs_bigger_buffer(&buf));
        assert_eq!(wanted_size(&buf), Some(84));
        // Still decodes (no chain yet).
        assert_eq!(parse(&buf).unwrap().pgsize_bitmap, PGS);
        assert!(!needs_bigger_buffer(&typical()));
    }

    #[test]
    fn malformed_chains_are_errors_not_panics() {
        let good = typical();
        // Truncated anywhere inside the chain.
        for len in [0, 10, 30, 40, 60, 80] {
            let r = parse(&good[..len]);
            if len < BASE_SIZE {
                assert_eq!(r.unwrap_err().errno, Errno::EIO, "len {len}");
            } else {
                let e = r.unwrap_err();
                assert_eq!(e.errno, Errno::EIO, "len {len}");
            }
        }
        // A loop: the last capability points back to the first.
        let mut looped = good.clone();
        looped[72 + 4..72 + 8].copy_from_slice(&24u32.to_ne_bytes());
        assert!(parse(&looped).unwrap_err().message.contains("points back"));
        // A cap_offset inside the base struct.
        let mut inside = good.clone();
        inside[16..20].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(parse(&inside).unwrap_err().errno, Errno::EIO);
        // nr_iovas claiming more ranges than fit.
        let mut many = good;
        many[32..36].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&many).unwrap_err().message.contains("truncated"));
    }
}
