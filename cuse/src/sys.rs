//! Every system call of the crate, in one place.
//!
//! Most go through `nix`, which wraps them safely; the two pidfd calls have
//! no `nix` wrapper and are made here with `libc::syscall`, each `unsafe`
//! block with its SAFETY note.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use nix::sys::uio::RemoteIoVec;
use nix::unistd::Pid;

/// Open `/dev/cuse` (or another path) read-write, close-on-exec, nonblocking.
pub(crate) fn open_cuse(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
}

/// One `read(2)`.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    nix::unistd::read(fd, buf)
}

/// One `writev(2)`: a FUSE message must be written in a single call.
pub(crate) fn writev(fd: BorrowedFd<'_>, iov: &[IoSlice<'_>]) -> Result<usize, Errno> {
    nix::sys::uio::writev(fd, iov)
}

/// Readiness of one fd as seen by `poll(2)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ready {
    pub readable: bool,
    pub error: bool,
}

/// `poll(2)` on up to two fds for input; `timeout_ms` < 0 waits forever.
/// EINTR is reported as "nothing ready".
pub(crate) fn poll_in(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> Result<Vec<Ready>, Errno> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let timeout = if timeout_ms < 0 {
        PollTimeout::NONE
    } else {
        PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::MAX)
    };
    match nix::poll::poll(&mut pfds, timeout) {
        Ok(_) => {}
        Err(Errno::EINTR) => return Ok(vec![Ready::default(); fds.len()]),
        Err(e) => return Err(e),
    }
    Ok(pfds
        .iter()
        .map(|p| {
            let r = p.revents().unwrap_or(PollFlags::empty());
            Ready {
                readable: r.contains(PollFlags::POLLIN),
                error: r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL),
            }
        })
        .collect())
}

/// Copy from another process's memory; returns the bytes copied.
pub(crate) fn process_vm_read(pid: u32, addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let remote = [RemoteIoVec {
        base: usize::try_from(addr).map_err(|_| Errno::EFAULT)?,
        len: buf.len(),
    }];
    let mut local = [IoSliceMut::new(buf)];
    nix::sys::uio::process_vm_readv(pid_of(pid)?, &mut local, &remote)
}

/// Copy into another process's memory; returns the bytes copied.
pub(crate) fn process_vm_write(pid: u32, addr: u64, data: &[u8]) -> Result<usize, Errno> {
    let remote = [RemoteIoVec {
        base: usize::try_from(addr).map_err(|_| Errno::EFAULT)?,
        len: data.len(),
    }];
    let local = [IoSlice::new(data)];
    nix::sys::uio::process_vm_writev(pid_of(pid)?, &local, &remote)
}

fn pid_of(pid: u32) -> Result<Pid, Errno> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .map(Pid::from_raw)
        .ok_or(Errno::ESRCH)
}

/// `pidfd_open(pid, 0)` (Linux 5.3+). On Linux < 6.9 `pid` must be a
/// thread-group leader (a process id), not any thread id.
pub(crate) fn pidfd_open(pid: u32) -> Result<OwnedFd, Errno> {
    let pid = pid_of(pid)?;
    // SAFETY: pidfd_open takes two integers and touches no memory of ours;
    // the result is checked before use.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0u32) };
    owned_fd_from(ret)
}

/// `pidfd_getfd(pidfd, fd, 0)` (Linux 5.6+): a duplicate of file
/// descriptor `fd` of the process `pidfd` refers to.
pub(crate) fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> Result<OwnedFd, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd is a valid open fd borrowed for the duration of the
    // call; the call takes integers only and touches no memory of ours;
    // the result is checked before use.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0u32) };
    owned_fd_from(ret)
}

fn owned_fd_from(ret: libc::c_long) -> Result<OwnedFd, Errno> {
    if ret < 0 {
        return Err(Errno::last());
    }
    let raw = i32::try_from(ret).map_err(|_| Errno::EOVERFLOW)?;
    // SAFETY: the kernel just returned `raw` as a new file descriptor that
    // nothing else owns; wrapping it immediately makes it closed exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// An eventfd used to wake threads blocked in [`poll_in`].
#[derive(Debug)]
pub(crate) struct Waker(nix::sys::eventfd::EventFd);

impl Waker {
    pub(crate) fn new() -> Result<Self, Errno> {
        nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .map(Waker)
    }

    /// Make the eventfd readable for good (level-triggered: every poller wakes).
    pub(crate) fn wake(&self) -> Result<(), Errno> {
        match self.0.write(1) {
            Ok(_) | Err(Errno::EAGAIN) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
