//! The raw system calls of this crate: `ioctl(2)` on a file the daemon
//! owns. Everything else goes through `nix`.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// `ioctl(fd, cmd, buf)` where `cmd` reads and writes the struct in `buf`
/// and never touches memory past `buf.len()` (the caller guarantees that the
/// struct's `argsz`, if any, is at most `buf.len()`).
pub(crate) fn ioctl_buf(fd: BorrowedFd<'_>, cmd: u32, buf: &mut [u8]) -> Result<i32, Errno> {
    // SAFETY: `fd` is an open file borrowed for the call; `buf` is a live,
    // exclusively borrowed allocation that outlives the call, and the caller
    // guarantees the command stays inside it (VFIO commands are bounded by
    // the struct's argsz, which the caller set to at most `buf.len()`); the
    // return value is checked below.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::c_ulong, buf.as_mut_ptr()) };
    Errno::result(ret)
}

/// `ioctl(fd, cmd, arg)` with an integer argument (no memory involved).
pub(crate) fn ioctl_int(fd: BorrowedFd<'_>, cmd: u32, arg: libc::c_ulong) -> Result<i32, Errno> {
    // SAFETY: `fd` is an open file borrowed for the call; the argument is a
    // plain integer that the command does not dereference (the commands used
    // here take none or an integer); the return value is checked below.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as libc::c_ulong, arg) };
    Errno::result(ret)
}
