//! Region access: which region a `pread`/`pwrite` position falls in, and
//! whether the access is allowed. Pure logic over the table of regions the
//! node reads from the device when it is bound.

use cuse_server::Offset;
use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};

use crate::error::{Error, Result};

/// One region as `VFIO_DEVICE_GET_REGION_INFO` described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*` as the kernel reported them.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Where the region starts in the device file.
    pub offset: u64,
}

/// Direction of an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `pread` family.
    Read,
    /// `pwrite` family.
    Write,
}

/// The regions of a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionTable {
    regions: Vec<Region>,
}

impl RegionTable {
    /// A table of `regions`.
    pub fn new(regions: Vec<Region>) -> Self {
        RegionTable { regions }
    }

    /// The regions, by index.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Check an access of `len` bytes at file position `pos`: the position
    /// must fall in a region (for vfio-pci, region `pos >> 40`) of non-zero
    /// size, the whole access must stay inside it, and the region must
    /// allow the direction. Every refusal is `EINVAL`, as vfio-pci answers.
    pub fn check(&self, pos: u64, len: u64, access: Access) -> Result<&Region> {
        let Some(r) = self
            .regions
            .iter()
            .find(|r| r.size != 0 && pos >= r.offset && pos - r.offset < r.size)
        else {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "no region at offset {pos:#x}; use the offset VFIO_DEVICE_GET_REGION_INFO \
                     reports for the region"
                ),
            ));
        };
        let end = pos.checked_add(len);
        if end.is_none_or(|e| e > r.offset + r.size) {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "{len} bytes at {:#x} in region {} run past its end ({:#x} bytes)",
                    pos - r.offset,
                    r.index,
                    r.size
                ),
            ));
        }
        let (bit, what) = match access {
            Access::Read => (VFIO_REGION_INFO_FLAG_READ, "read"),
            Access::Write => (VFIO_REGION_INFO_FLAG_WRITE, "written"),
        };
        if r.flags & bit == 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!("region {} cannot be {what} (flags {:#x})", r.index, r.flags),
            ));
        }
        Ok(r)
    }
}

/// The absolute file position of a READ or WRITE, from the CUSE layer's
/// recovered offset. A positional call gives its position (pieces of a
/// split transfer already include their place in the buffer). A plain
/// `read`/`write` has no position — the node has no file position either
/// (CUSE has no seek) — and is refused with `ESPIPE`, as for a pipe. An
/// offset that could not be recovered is `EINVAL`.
pub fn position(offset: &Offset) -> Result<u64> {
    match offset {
        Offset::At(pos) => Ok(*pos),
        Offset::Stream { .. } => Err(Error::new(
            Errno::ESPIPE,
            "read/write without a position: a device node is accessed with \
             pread/pwrite (or preadv/pwritev) at the region's offset",
        )),
        Offset::Unknown { reason, .. } => Err(Error::new(
            Errno::EINVAL,
            format!("the file offset of the transfer could not be recovered: {reason}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cuse_server::OffsetError;

    const R: u32 = VFIO_REGION_INFO_FLAG_READ;
    const W: u32 = VFIO_REGION_INFO_FLAG_WRITE;

    /// vfio-pci's layout: region i at i << 40.
    fn table() -> RegionTable {
        RegionTable::new(vec![
            Region {
                index: 0,
                flags: R | W,
                size: 0x10_0000,
                offset: 0,
            },
            Region {
                index: 1,
                flags: 0,
                size: 0,
                offset: 1 << 40,
            },
            Region {
                index: 6,
                flags: R,
                size: 0x8000,
                offset: 6 << 40,
            },
            Region {
                index: 7,
                flags: R | W,
                size: 0x100,
                offset: 7 << 40,
            },
        ])
    }

    #[test]
    fn accesses_inside_a_region() {
        let t = table();
        assert_eq!(t.check(0, 4, Access::Read).unwrap().index, 0);
        assert_eq!(t.check(0xf_fffc, 4, Access::Write).unwrap().index, 0);
        assert_eq!(t.check((7 << 40) + 4, 2, Access::Write).unwrap().index, 7);
        assert_eq!(t.check(6 << 40, 0x8000, Access::Read).unwrap().index, 6);
        // Zero bytes at the last position of a region.
        assert_eq!(t.check(0xf_ffff, 0, Access::Read).unwrap().index, 0);
    }

    #[test]
    fn out_of_bounds_is_einval() {
        let t = table();
        let e = t.check(0xf_fffd, 4, Access::Read).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.contains("past its end"), "{}", e.message);
        // Just past the region: no region there.
        assert_eq!(
            t.check(0x10_0000, 1, Access::Read).unwrap_err().errno,
            Errno::EINVAL
        );
        // A zero-size region does not exist.
        assert_eq!(
            t.check(1 << 40, 1, Access::Read).unwrap_err().errno,
            Errno::EINVAL
        );
        // Past the config space, between regions, at the very top.
        assert_eq!(
            t.check((7 << 40) + 0x100, 1, Access::Read)
                .unwrap_err()
                .errno,
            Errno::EINVAL
        );
        assert_eq!(
            t.check(3 << 40, 1, Access::Read).unwrap_err().errno,
            Errno::EINVAL
        );
        assert_eq!(
            t.check(u64::MAX, 1, Access::Read).unwrap_err().errno,
            Errno::EINVAL
        );
        // Length overflowing 64 bits.
        assert_eq!(
            t.check(8, u64::MAX, Access::Read).unwrap_err().errno,
            Errno::EINVAL
        );
    }

    #[test]
    fn permissions() {
        let t = table();
        let e = t.check(6 << 40, 4, Access::Write).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.contains("cannot be written"), "{}", e.message);
        assert!(t.check(6 << 40, 4, Access::Read).is_ok());
        let empty = RegionTable::default();
        assert_eq!(
            empty.check(0, 1, Access::Read).unwrap_err().errno,
            Errno::EINVAL
        );
    }

    #[test]
    fn offset_decision() {
        assert_eq!(
            position(&Offset::At(0x300_0000_0010)).unwrap(),
            0x300_0000_0010
        );
        let e = position(&Offset::Stream { within: 0 }).unwrap_err();
        assert_eq!(e.errno, Errno::ESPIPE);
        let e = position(&Offset::Unknown {
            within: 0,
            reason: OffsetError::NotInSyscall,
        })
        .unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.contains("not in a system call"), "{}", e.message);
        // A split transfer's later piece: the CUSE layer already added it.
        let t = table();
        let pos = position(&Offset::At((6 << 40) + 0x2_0000 - 0x1_a000)).unwrap();
        assert_eq!(t.check(pos, 0x1000, Access::Read).unwrap().index, 6);
    }
}
