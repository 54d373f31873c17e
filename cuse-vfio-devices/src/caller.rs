//! The process that issued a request: its memory and its file descriptors,
//! behind a trait so the decoding is tested against a byte buffer.

use std::os::fd::OwnedFd;

use cuse_server::Request;
use ioasid_uapi::{ArgStruct, FlagsCheck, StructArg};
use nix::errno::Errno;
use zerocopy::FromBytes;

use crate::error::{Error, Result};

/// The caller of an ioctl, read or write.
pub trait Caller {
    /// Fill `buf` from the caller's address `addr` (`EFAULT` if unreadable).
    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), Errno>;
    /// Write `data` at the caller's address `addr` (`EFAULT` if unwritable).
    fn write_mem(&self, addr: u64, data: &[u8]) -> std::result::Result<(), Errno>;
    /// A copy of the caller's file descriptor `fd` (`EBADF` if not open).
    fn get_fd(&self, fd: i32) -> std::result::Result<OwnedFd, Errno>;
}

impl Caller for Request {
    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), Errno> {
        Request::read_mem(self, addr, buf)
    }
    fn write_mem(&self, addr: u64, data: &[u8]) -> std::result::Result<(), Errno> {
        Request::write_mem(self, addr, data)
    }
    fn get_fd(&self, fd: i32) -> std::result::Result<OwnedFd, Errno> {
        Request::get_fd(self, fd)
    }
}

/// The largest argument of a forwarded VFIO ioctl (`argsz`) the daemon
/// copies; a larger one is refused with `E2BIG` before anything is read.
pub const MAX_ARG: usize = 64 * 1024;

/// Read `buf.len()` bytes of the argument at `addr`.
pub(crate) fn read(caller: &dyn Caller, addr: u64, buf: &mut [u8]) -> Result<()> {
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
pub(crate) fn write(caller: &dyn Caller, addr: u64, data: &[u8]) -> Result<()> {
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

/// Read the `argsz` field (the first `u32`) of the struct at `arg`.
pub(crate) fn read_argsz(caller: &dyn Caller, arg: u64) -> Result<u32> {
    let mut b = [0u8; 4];
    read(caller, arg, &mut b)?;
    Ok(u32::from_ne_bytes(b))
}

/// Read a VFIO struct argument by its `argsz`: `EINVAL` below `min_size`
/// (what VFIO answers), `E2BIG` above [`MAX_ARG`]. Returns the caller's
/// bytes, exactly `argsz` of them.
pub(crate) fn read_vfio_arg(
    caller: &dyn Caller,
    arg: u64,
    name: &str,
    min_size: usize,
) -> Result<Vec<u8>> {
    let argsz = read_argsz(caller, arg)? as usize;
    if argsz < min_size {
        return Err(Error::new(
            Errno::EINVAL,
            format!("{name}: argsz {argsz} is below the minimum {min_size}"),
        ));
    }
    if argsz > MAX_ARG {
        return Err(Error::new(
            Errno::E2BIG,
            format!("{name}: argsz {argsz} is more than the daemon copies ({MAX_ARG} bytes)"),
        ));
    }
    let mut buf = vec![0u8; argsz];
    read(caller, arg, &mut buf)?;
    Ok(buf)
}

/// Read one of this ABI's extensible structs at `arg` by the ABI's rules
/// (the uapi crate's [`StructArg`] table): `argsz` below the minimum is
/// `EINVAL`; bytes past the known struct must be zero (`E2BIG`), and a tail
/// longer than [`MAX_ARG`] is `E2BIG` without being read; unknown flags are
/// `EINVAL`.
pub(crate) fn read_ext_struct<T: ArgStruct>(caller: &dyn Caller, arg: u64) -> Result<T> {
    let rules = StructArg::of::<T>();
    let given = read_argsz(caller, arg)? as usize;
    if given < rules.min_size {
        return Err(Error::new(
            Errno::EINVAL,
            format!(
                "argsz {given} is below sizeof(struct {}) = {}",
                rules.c_name, rules.min_size
            ),
        ));
    }
    let mut value = T::new_zeroed();
    let known = given.min(rules.size);
    read(caller, arg, &mut value.as_mut_bytes()[..known])?;
    if given > rules.size && !rules.tail_is_output {
        let tail = given - rules.size;
        if tail > MAX_ARG {
            return Err(Error::new(
                Errno::E2BIG,
                format!(
                    "argsz {given} is more than {MAX_ARG} bytes past struct {} ({} bytes)",
                    rules.c_name, rules.size
                ),
            ));
        }
        let mut rest = vec![0u8; tail];
        read(caller, arg + rules.size as u64, &mut rest)?;
        if let Some(i) = rest.iter().position(|&b| b != 0) {
            return Err(Error::new(
                Errno::E2BIG,
                format!(
                    "byte {} of the argument, past struct {} ({} bytes), is not zero",
                    rules.size + i,
                    rules.c_name,
                    rules.size
                ),
            ));
        }
    }
    if let FlagsCheck::Mask(mask) = rules.flags {
        let flags = u32::read_from_bytes(&value.as_bytes()[4..8]).unwrap_or(0);
        if flags & !mask != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "unknown flags {:#x} in struct {}",
                    flags & !mask,
                    rules.c_name
                ),
            ));
        }
    }
    Ok(value)
}

/// A caller made of a byte buffer at a fixed address, and a table of fds:
/// for unit tests of the decoding.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::cell::RefCell;
    use std::os::fd::{AsFd, OwnedFd};

    pub(crate) struct FakeCaller {
        pub base: u64,
        pub mem: RefCell<Vec<u8>>,
        pub fds: Vec<(i32, OwnedFd)>,
    }

    impl FakeCaller {
        pub fn new(base: u64, mem: Vec<u8>) -> Self {
            FakeCaller {
                base,
                mem: RefCell::new(mem),
                fds: Vec::new(),
            }
        }

        fn range(
            &self,
            addr: u64,
            len: usize,
        ) -> std::result::Result<std::ops::Range<usize>, Errno> {
            let start = addr.checked_sub(self.base).ok_or(Errno::EFAULT)? as usize;
            let end = start.checked_add(len).ok_or(Errno::EFAULT)?;
            if end > self.mem.borrow().len() {
                return Err(Errno::EFAULT);
            }
            Ok(start..end)
        }
    }

    impl Caller for FakeCaller {
        fn read_mem(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), Errno> {
            let r = self.range(addr, buf.len())?;
            buf.copy_from_slice(&self.mem.borrow()[r]);
            Ok(())
        }
        fn write_mem(&self, addr: u64, data: &[u8]) -> std::result::Result<(), Errno> {
            let r = self.range(addr, data.len())?;
            self.mem.borrow_mut()[r].copy_from_slice(data);
            Ok(())
        }
        fn get_fd(&self, fd: i32) -> std::result::Result<OwnedFd, Errno> {
            let (_, f) = self
                .fds
                .iter()
                .find(|(n, _)| *n == fd)
                .ok_or(Errno::EBADF)?;
            f.as_fd().try_clone_to_owned().map_err(|_| Errno::EMFILE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeCaller;
    use super::*;
    use ioasid_uapi::{VfioAttachIoasid, IOASID_ATTACH_USER_PASID};
    use zerocopy::IntoBytes;

    const BASE: u64 = 0x10_0000;

    fn attach_bytes(argsz: u32, flags: u32, ioasid: u32, pasid: u32, tail: &[u8]) -> Vec<u8> {
        let mut v = VfioAttachIoasid {
            argsz,
            flags,
            ioasid,
            user_pasid: pasid,
        }
        .as_bytes()
        .to_vec();
        v.extend_from_slice(tail);
        v
    }

    fn attach(mem: Vec<u8>) -> Result<VfioAttachIoasid> {
        let c = FakeCaller::new(BASE, mem);
        read_ext_struct::<VfioAttachIoasid>(&c, BASE)
    }

    #[test]
    fn attach_struct_length_rules() {
        // min - 1: EINVAL.
        let e = attach(attach_bytes(15, 0, 1, 0, &[])).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.contains("below"), "{}", e.message);
        // exact.
        let a = attach(attach_bytes(16, 0, 7, 0, &[])).unwrap();
        assert_eq!((a.ioasid, a.flags, a.user_pasid), (7, 0, 0));
        // oversized with zeros: accepted.
        let a = attach(attach_bytes(16 + 24, 0, 9, 0, &[0; 24])).unwrap();
        assert_eq!(a.ioasid, 9);
        // oversized with a non-zero byte: E2BIG.
        let mut tail = [0u8; 24];
        tail[23] = 1;
        let e = attach(attach_bytes(16 + 24, 0, 9, 0, &tail)).unwrap_err();
        assert_eq!(e.errno, Errno::E2BIG);
        assert!(e.message.contains("byte 39"), "{}", e.message);
        // argsz claims more than the caller's memory holds: EFAULT.
        let e = attach(attach_bytes(16 + 64, 0, 9, 0, &[0; 8])).unwrap_err();
        assert_eq!(e.errno, Errno::EFAULT);
        // a gigantic argsz is refused without being read.
        let e = attach(attach_bytes(u32::MAX, 0, 9, 0, &[])).unwrap_err();
        assert_eq!(e.errno, Errno::E2BIG);
        // no memory at all.
        assert_eq!(attach(vec![1, 2]).unwrap_err().errno, Errno::EFAULT);
    }

    #[test]
    fn attach_struct_flags() {
        let a = attach(attach_bytes(16, IOASID_ATTACH_USER_PASID, 3, 5, &[])).unwrap();
        assert_eq!((a.flags, a.user_pasid), (IOASID_ATTACH_USER_PASID, 5));
        let e = attach(attach_bytes(16, 1 << 1, 3, 0, &[])).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.contains("unknown flags 0x2"), "{}", e.message);
    }

    #[test]
    fn vfio_arg_bounds() {
        let mut mem = vec![0u8; 64];
        mem[..4].copy_from_slice(&32u32.to_ne_bytes());
        let c = FakeCaller::new(BASE, mem.clone());
        assert_eq!(read_vfio_arg(&c, BASE, "X", 32).unwrap().len(), 32);
        assert_eq!(
            read_vfio_arg(&c, BASE, "X", 33).unwrap_err().errno,
            Errno::EINVAL
        );
        mem[..4].copy_from_slice(&(MAX_ARG as u32 + 1).to_ne_bytes());
        let c = FakeCaller::new(BASE, mem.clone());
        assert_eq!(
            read_vfio_arg(&c, BASE, "X", 16).unwrap_err().errno,
            Errno::E2BIG
        );
        mem[..4].copy_from_slice(&65u32.to_ne_bytes());
        let c = FakeCaller::new(BASE, mem);
        assert_eq!(
            read_vfio_arg(&c, BASE, "X", 16).unwrap_err().errno,
            Errno::EFAULT
        );
    }
}
