//! What a call may do, decided from the caller's memory before the call:
//! the row's precondition, the reader's outcome (the kernel's
//! `copy_struct_from_user`, VFIO's rules for its variable-length structs),
//! and where the command may write.

use std::ops::Range;

use ioasid_uapi::iommufd::{
    iommu_hw_info, iommu_ioas_iova_ranges, IOMMU_GET_HW_INFO, IOMMU_IOAS_IOVA_RANGES,
};
use ioasid_uapi::vfio::VFIO_DEVICE_BIND_IOMMUFD;
use ioctl_table::fake::FakeCaller;
use ioctl_table::{Handler, StructRules, Table, Tail, MAX_ARG, MAX_TAIL};
use nix::errno::Errno;

use super::commands::Cmd;
use super::Node;

/// A row's argument as the reader sees it.
pub(super) enum Row {
    /// An integer or nothing: the reader reads no memory.
    Plain,
    /// A struct, read by `read_struct` (`false`) or `read_data` (`true`).
    Struct(StructRules, bool),
}

pub(super) fn row_in<Cx>(table: &Table<Cx>, number: u32) -> Option<Row> {
    let op = table.find(number)?;
    Some(match &op.handler {
        Handler::None(_) | Handler::Int(_) => Row::Plain,
        Handler::Struct(r, _) => Row::Struct(*r, false),
        Handler::Data(r, _) => Row::Struct(*r, true),
    })
}

pub(super) fn row_of(node: Node, number: u32) -> Option<Row> {
    match node {
        Node::Ioasid => row_in(&cuse_ioasid::ioctl::IOASID_TABLE, number),
        Node::Iommufd => row_in(&cuse_ioasid::iommufd::ioctl::IOMMUFD_TABLE, number),
        Node::DevN => row_in(&cuse_vfio_devices::ioctl::DEVICE_TABLE, number),
        Node::VfioN => row_in(&cuse_vfio_devices::cdev::CDEV_TABLE, number),
    }
}

fn unknown_flags(node: Node) -> Errno {
    match node {
        Node::Iommufd => Errno::EOPNOTSUPP,
        _ => Errno::EINVAL,
    }
}

/// Whether the caller's `len` bytes at `addr` can be read.
pub(super) fn readable(c: &FakeCaller, addr: u64, len: usize) -> bool {
    let Some(end) = addr.checked_add(len as u64) else {
        return false;
    };
    addr >= c.base
        && end <= c.base + c.mem.borrow().len() as u64
        && !c
            .holes
            .borrow()
            .iter()
            .any(|h| h.start < end && addr < h.end)
}

/// The first address of `[start, end)` the caller cannot read, if any
/// (`start` is readable).
fn first_unreadable(c: &FakeCaller, start: u64, end: u64) -> Option<u64> {
    let mem_end = c.base + c.mem.borrow().len() as u64;
    let holes = c.holes.borrow();
    let hole = holes
        .iter()
        .filter(|h| h.start < end && start < h.end)
        .map(|h| h.start.max(start))
        .min();
    let past = (mem_end < end).then_some(mem_end);
    match (hole, past) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn u32_at(c: &FakeCaller, addr: u64) -> u32 {
    u32::from_ne_bytes(c.get(addr, 4).try_into().unwrap())
}

/// What the reader does with the argument at `arg`: the errnos it may
/// fail with, or the size it passes on.
enum Reader {
    Fails(Vec<Errno>),
    Passes(usize),
}

fn predict(c: &FakeCaller, rules: &StructRules, data: bool, arg: u64, unknown: Errno) -> Reader {
    use Errno::*;
    if !readable(c, arg, 4) {
        return Reader::Fails(vec![EFAULT]);
    }
    let given = u32_at(c, arg) as usize;
    if given < rules.min_size {
        return Reader::Fails(vec![EINVAL]);
    }
    if data {
        if given > MAX_ARG {
            return Reader::Fails(vec![E2BIG]);
        }
        if !readable(c, arg, given) {
            return Reader::Fails(vec![EFAULT]);
        }
        return Reader::Passes(given);
    }
    let known = given.min(rules.size);
    if !readable(c, arg, known) {
        return Reader::Fails(vec![EFAULT]);
    }
    if given > rules.size && rules.tail == Tail::Zero {
        if given - rules.size > MAX_TAIL {
            return Reader::Fails(vec![E2BIG]);
        }
        // The first unreadable byte of the tail, and the first non-zero
        // one before it (the reader reads in 4 KiB chunks: a chunk that
        // faults hides a non-zero byte in it).
        let start = arg + rules.size as u64;
        let end = arg + given as u64;
        let fault = first_unreadable(c, start, end);
        let stop = fault.unwrap_or(end);
        let mem = c.mem.borrow();
        let bytes = &mem[(start - c.base) as usize..(stop - c.base) as usize];
        match (bytes.iter().any(|&b| b != 0), fault) {
            (true, Some(_)) => return Reader::Fails(vec![E2BIG, EFAULT]),
            (true, None) => return Reader::Fails(vec![E2BIG]),
            (false, Some(_)) => return Reader::Fails(vec![EFAULT]),
            (false, None) => {}
        }
    }
    if let ioctl_table::Flags::Mask { at, accepted } = rules.flags {
        let flags = if at + 4 <= known {
            u32_at(c, arg + at as u64)
        } else {
            0
        };
        if flags & !accepted != 0 {
            return Reader::Fails(vec![unknown]);
        }
    }
    Reader::Passes(given)
}

/// Whether the row's precondition holds (the node checks it before the
/// argument is read), and the errno when it does not.
fn precondition(
    node: Node,
    number: u32,
    row: Option<&Row>,
    bound_here: bool,
) -> Result<(), Vec<Errno>> {
    use Errno::*;
    match node {
        Node::Ioasid | Node::Iommufd => match row {
            Some(_) => Ok(()),
            None => Err(vec![ENOTTY]),
        },
        Node::DevN => {
            let needs_bind = cuse_vfio_devices::ioctl::DEVICE_TABLE
                .find(number)
                .is_some_and(|op| op.requires == cuse_vfio_devices::ioctl::NEEDS_BIND);
            match row {
                None if bound_here => Err(vec![ENOTTY]),
                // A VFIO number the node does not serve is EINVAL before bind.
                None => Err(vec![EINVAL, ENOTTY]),
                Some(_) if needs_bind && !bound_here => Err(vec![EINVAL]),
                Some(_) => Ok(()),
            }
        }
        Node::VfioN => {
            if number != VFIO_DEVICE_BIND_IOMMUFD && !bound_here {
                Err(vec![EINVAL])
            } else if row.is_none() {
                Err(vec![ENOTTY])
            } else {
                Ok(())
            }
        }
    }
}

/// The buffer a command's struct names, which it may write: the ranges
/// of `IOMMU_IOAS_IOVA_RANGES` and the data of `IOMMU_GET_HW_INFO`.
fn named_buffers(
    c: &FakeCaller,
    node: Node,
    number: u32,
    arg: u64,
    given: usize,
) -> Option<Range<u64>> {
    let field = |at: usize, width: usize| -> u64 {
        if at + width > given || !readable(c, arg + at as u64, width) {
            return 0;
        }
        let mut b = [0u8; 8];
        b[..width].copy_from_slice(&c.get(arg + at as u64, width));
        u64::from_ne_bytes(b)
    };
    use std::mem::offset_of;
    match (node, number) {
        (Node::Iommufd, IOMMU_IOAS_IOVA_RANGES) => {
            let ptr = field(offset_of!(iommu_ioas_iova_ranges, allowed_iovas), 8);
            let n = field(offset_of!(iommu_ioas_iova_ranges, num_iovas), 4);
            Some(ptr..ptr.saturating_add(16 * n))
        }
        (Node::Iommufd, IOMMU_GET_HW_INFO) => {
            let ptr = field(offset_of!(iommu_hw_info, data_uptr), 8);
            let n = field(offset_of!(iommu_hw_info, data_len), 4);
            Some(ptr..ptr.saturating_add(n))
        }
        _ => None,
    }
}

/// What a call may do, decided from the caller's memory before it.
pub(super) enum Expect {
    /// Refused before any handler runs (precondition or reader): one of
    /// these errnos, nothing written.
    Refused(Vec<Errno>),
    /// Past the reader: the command's errnos, writes inside `inside`.
    Handled {
        cmd: Cmd,
        inside: Vec<Range<u64>>,
        /// Faults the reader itself causes (its first, whole-struct read
        /// of a shorter struct).
        reader_faults: usize,
        /// The size the caller gave a struct (0 for an integer).
        given: usize,
    },
}

pub(super) fn expect(
    c: &FakeCaller,
    node: Node,
    number: u32,
    cmd: Option<&Cmd>,
    row: Option<&Row>,
    bound_here: bool,
    arg: u64,
) -> Expect {
    if let Err(errnos) = precondition(node, number, row, bound_here) {
        return Expect::Refused(errnos);
    }
    let (row, cmd) = (
        row.expect("a row"),
        *cmd.expect("every row has a description"),
    );
    let mut inside = Vec::new();
    let mut reader_faults = 0;
    let mut given_size = 0;
    if let Row::Struct(rules, data) = row {
        if !*data && !readable(c, arg, rules.size) {
            reader_faults = 1;
        }
        match predict(c, rules, *data, arg, unknown_flags(node)) {
            Reader::Fails(errnos) => return Expect::Refused(errnos),
            Reader::Passes(given) => {
                given_size = given;
                let end = if *data || rules.tail == Tail::Output {
                    given
                } else {
                    given.min(rules.size)
                };
                inside.push(arg..arg + end as u64);
                inside.extend(named_buffers(c, node, number, arg, given));
            }
        }
    }
    Expect::Handled {
        cmd,
        inside,
        reader_faults,
        given: given_size,
    }
}
