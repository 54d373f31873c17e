//! The one reader of struct arguments: the kernel's
//! `copy_struct_from_user` for every extensible struct of every node, and
//! a bounded copy of VFIO's variable-length arguments.
//!
//! An extensible struct starts with its size as the caller knows it
//! (`argsz` in the RFC and VFIO, `size` in iommufd: the same `u32` in the
//! same place, under the same rules):
//!
//! - below the struct's minimum (the end of its last mandatory field):
//!   `EINVAL`;
//! - up to the struct this daemon knows: read, the rest zero-filled;
//! - past it: the extra bytes must be zero (`E2BIG`), and more than
//!   [`MAX_TAIL`] of them is `E2BIG` without reading them, so a client
//!   cannot make the daemon read gigabytes (the kernel reads them all;
//!   nothing in these ABIs needs more);
//! - an unreadable argument: `EFAULT`.
//!
//! The common case is one copy from the caller: the whole known struct is
//! read at once, and only if that faults (a shorter struct that ends just
//! before an unmapped page) is the size read first, then the bytes it
//! covers.

use ioasid_uapi::error::{Error, Result};
use ioasid_uapi::plain::{bytes_of, bytes_of_mut, zeroed};
use ioasid_uapi::ArgStruct;
use nix::errno::Errno;

use crate::caller::Caller;

/// The longest tail past a known struct that is read and checked for
/// zeros; a longer one is refused with `E2BIG`.
pub const MAX_TAIL: usize = 64 * 1024;

/// The largest variable-length argument ([`read_data`]) the daemon copies;
/// a larger one is refused with `E2BIG` before anything past the size is
/// read.
pub const MAX_ARG: usize = 64 * 1024;

/// Chunk in which a tail is read.
const TAIL_CHUNK: usize = 4096;

/// How a struct's `flags` field is checked on input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flags {
    /// The struct has no flags field (or the daemon does not look at it:
    /// the kernel it forwards to checks).
    Absent,
    /// The `u32` at byte `at` must have no bit outside `accepted`; any
    /// other bit is the table's unknown-flags errno.
    Mask {
        /// Offset of the field.
        at: usize,
        /// The bits the command accepts.
        accepted: u32,
    },
    /// The field is output only: its input value is ignored
    /// (`IOASID_GET_INFO`).
    Output,
}

impl Flags {
    /// The accepted bits, for a checked field.
    pub const fn accepted(&self) -> Option<u32> {
        match self {
            Flags::Mask { accepted, .. } => Some(*accepted),
            _ => None,
        }
    }
}

/// What the bytes past the known struct are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Input from a newer caller: they must be zero (`E2BIG`).
    Zero,
    /// An output buffer (the capability chain of `IOASID_GET_INFO`): not
    /// read, not checked.
    Output,
}

/// The facts about a struct argument the reader needs: the kernel's
/// `IOCTL_OP(…, struct, last_field)`, plus the flags rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructRules {
    /// The struct's name in C, for messages.
    pub c_name: &'static str,
    /// Smallest size accepted: the end of the last mandatory field
    /// (`EINVAL` below).
    pub min_size: usize,
    /// The size of the struct this daemon knows.
    pub size: usize,
    /// The input check of its flags field.
    pub flags: Flags,
    /// What the bytes past `size` are.
    pub tail: Tail,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// `EINVAL`: the caller's size is below the struct's minimum.
fn below_minimum(given: usize, rules: &StructRules) -> Error {
    Error::new(
        Errno::EINVAL,
        format!(
            "argsz {given} is below the {} bytes of struct {}",
            rules.min_size, rules.c_name
        ),
    )
}

/// Read `buf.len()` bytes of the argument at `addr`.
pub(crate) fn read_arg(caller: &dyn Caller, addr: u64, buf: &mut [u8]) -> Result<()> {
    caller.read_mem(addr, buf).map_err(|e| {
        Error::new(
            e,
            format!(
                "cannot read {} bytes of the argument at {addr:#x}",
                buf.len()
            ),
        )
    })
}

/// Write `data` to the argument at `addr`.
pub(crate) fn write_arg(caller: &dyn Caller, addr: u64, data: &[u8]) -> Result<()> {
    caller.write_mem(addr, data).map_err(|e| {
        Error::new(
            e,
            format!(
                "cannot write {} bytes of the argument at {addr:#x}",
                data.len()
            ),
        )
    })
}

/// Read the extensible struct `T` at `addr` by `rules`; returns it and the
/// size the caller gave. A flag outside the accepted ones is
/// `unknown_flags` (the table's errno). Bytes past the caller's size are
/// never used: they are zero in the value returned.
pub fn read_struct<T: ArgStruct>(
    caller: &dyn Caller,
    addr: u64,
    rules: &StructRules,
    unknown_flags: Errno,
) -> Result<(T, usize)> {
    debug_assert_eq!(rules.size, std::mem::size_of::<T>());
    let mut value = zeroed::<T>();
    let whole = caller.read_mem(addr, bytes_of_mut(&mut value)).is_ok();
    let given = if whole {
        u32_at(bytes_of(&value), 0)
    } else {
        let mut size = [0u8; 4];
        read_arg(caller, addr, &mut size)?;
        u32::from_ne_bytes(size)
    } as usize;
    if given < rules.min_size {
        return Err(below_minimum(given, rules));
    }
    let known = given.min(rules.size);
    if whole {
        bytes_of_mut(&mut value)[known..].fill(0);
    } else {
        read_arg(caller, addr, &mut bytes_of_mut(&mut value)[..known])?;
    }
    if given > rules.size && rules.tail == Tail::Zero {
        check_zero_tail(caller, addr, rules, given)?;
    }
    if let Flags::Mask { at, accepted } = rules.flags {
        let unknown = u32_at(bytes_of(&value), at) & !accepted;
        if unknown != 0 {
            return Err(Error::new(
                unknown_flags,
                format!("unknown flags {unknown:#x} in struct {}", rules.c_name),
            ));
        }
    }
    Ok((value, given))
}

/// The bytes `[size, given)` past the struct must be zero.
fn check_zero_tail(
    caller: &dyn Caller,
    addr: u64,
    rules: &StructRules,
    given: usize,
) -> Result<()> {
    let tail = given - rules.size;
    if tail > MAX_TAIL {
        return Err(Error::new(
            Errno::E2BIG,
            format!(
                "argsz {given} is more than {MAX_TAIL} bytes past struct {} ({} bytes)",
                rules.c_name, rules.size
            ),
        ));
    }
    let mut chunk = vec![0u8; tail.min(TAIL_CHUNK)];
    let mut at = rules.size;
    while at < given {
        let n = (given - at).min(TAIL_CHUNK);
        read_arg(caller, addr + at as u64, &mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().position(|&b| b != 0) {
            return Err(Error::new(
                Errno::E2BIG,
                format!(
                    "byte {} of the argument, past struct {} ({} bytes), is not zero",
                    at + i,
                    rules.c_name,
                    rules.size
                ),
            ));
        }
        at += n;
    }
    Ok(())
}

/// Read a variable-length argument (a VFIO struct and the array or buffer
/// after it) by its size: `EINVAL` below `rules.min_size` (what VFIO
/// answers), `E2BIG` above [`MAX_ARG`]. Returns the caller's bytes, exactly
/// as many as it said.
pub fn read_data(caller: &dyn Caller, addr: u64, rules: &StructRules) -> Result<Vec<u8>> {
    let mut size = [0u8; 4];
    read_arg(caller, addr, &mut size)?;
    let given = u32::from_ne_bytes(size) as usize;
    if given < rules.min_size {
        return Err(below_minimum(given, rules));
    }
    if given > MAX_ARG {
        return Err(Error::new(
            Errno::E2BIG,
            format!(
                "argsz {given} of struct {} is more than the daemon copies ({MAX_ARG} bytes)",
                rules.c_name
            ),
        ));
    }
    let mut buf = vec![0u8; given];
    read_arg(caller, addr, &mut buf)?;
    Ok(buf)
}
