//! Every system call of the crate, in one place.
//!
//! Most go through `nix`, which wraps them safely; the two pidfd calls have
//! no `nix` wrapper and are made here with `libc::syscall`, each `unsafe`
//! block with its SAFETY note.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use nix::sys::uio::RemoteIoVec;
use nix::unistd::Pid;

/// Open `/dev/cuse` (or another path) read-write, close-on-exec. Blocking:
/// a thread blocked in `read(2)` on it is woken exclusively (one reader per
/// request), and by [`WAKE_SIGNAL`] at shutdown.
pub(crate) fn open_cuse(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(path, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
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

/// The signal that wakes a server thread blocked in `read(2)` on
/// `/dev/cuse` when its node shuts down: the sixth real-time signal
/// (`SIGRTMIN + 5`). Its handler does nothing; it is installed without
/// `SA_RESTART`, so the `read` fails with `EINTR` and the thread sees that it
/// must stop.
pub(crate) fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

extern "C" fn ignore_wake(_: libc::c_int) {}

/// Install the no-op handler of [`wake_signal`] (once per process).
///
/// The action is built with `nix::sys::signal`; it is installed with
/// `libc::sigaction` because nix's `Signal` has no real-time signals.
pub(crate) fn install_wake_handler() -> Result<(), Errno> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet};
    static INSTALLED: std::sync::OnceLock<Result<(), Errno>> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // No SA_RESTART: a blocked read fails with EINTR.
        let action = SigAction::new(
            SigHandler::Handler(ignore_wake),
            SaFlags::empty(),
            SigSet::empty(),
        );
        let act: libc::sigaction = action.into();
        // SAFETY: `act` is a valid sigaction whose handler is an
        // async-signal-safe function that does nothing; the old action is
        // not asked for (null pointer).
        let ret = unsafe { libc::sigaction(wake_signal(), &act, std::ptr::null_mut()) };
        Errno::result(ret).map(drop)
    })
}

/// Let the calling thread receive [`wake_signal`] even if its creator
/// blocked it (threads inherit the signal mask).
pub(crate) fn unblock_wake_signal() {
    let mut set: libc::sigset_t = *nix::sys::signal::SigSet::empty().as_ref();
    // SAFETY: `set` is an initialised (empty) sigset_t of this frame;
    // sigaddset only adds a valid signal number to it, and pthread_sigmask
    // only changes this thread's mask (the old mask is not asked for).
    unsafe {
        libc::sigaddset(&mut set, wake_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// The calling thread's pthread id, for [`wake`].
pub(crate) fn this_thread() -> libc::pthread_t {
    nix::sys::pthread::pthread_self()
}

/// Send [`wake_signal`] to `thread`, which must be alive: callers keep the
/// ids of live threads only (a thread removes its own id, under the same
/// lock, before it exits).
pub(crate) fn wake(thread: libc::pthread_t) {
    // SAFETY: per the contract above `thread` names a live thread of this
    // process; pthread_kill only queues a signal whose handler does nothing.
    unsafe {
        libc::pthread_kill(thread, wake_signal());
    }
}

/// A timer that sends [`wake_signal`] to the thread that made it, every
/// period while armed (`timer_create` with `SIGEV_THREAD_ID`): it wakes an
/// idle server thread blocked in `read(2)` so that the thread can see
/// whether it has been idle long enough to leave. Deleted on drop. Not
/// `Send`: it belongs to its thread.
pub(crate) struct WakeTimer {
    id: libc::timer_t,
}

impl WakeTimer {
    /// A disarmed timer aimed at the calling thread.
    pub(crate) fn for_this_thread() -> Result<Self, Errno> {
        // SAFETY: an all-zero sigevent is a valid value (SIGEV_SIGNAL with
        // signal 0); the fields that matter are set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = wake_signal();
        sev.sigev_notify_thread_id = nix::unistd::gettid().as_raw();
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` and `id` are live locals the call reads and writes
        // for its duration only; the result is checked before `id` is used.
        let ret = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) };
        if ret != 0 {
            return Err(Errno::last());
        }
        Ok(WakeTimer { id })
    }

    /// Fire after `period`, then every `period`, until disarmed.
    pub(crate) fn arm(&self, period: std::time::Duration) -> Result<(), Errno> {
        let ts = libc::timespec {
            tv_sec: period.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_nsec: period.subsec_nanos().into(),
        };
        self.set(libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        })
    }

    /// Stop firing.
    pub(crate) fn disarm(&self) -> Result<(), Errno> {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        self.set(libc::itimerspec {
            it_interval: zero,
            it_value: zero,
        })
    }

    fn set(&self, spec: libc::itimerspec) -> Result<(), Errno> {
        // SAFETY: `self.id` is a timer created by timer_create and not yet
        // deleted (deleted only in drop); `spec` is a live local read for the
        // duration of the call; the old value is not asked for.
        let ret = unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(Errno::last());
        }
        Ok(())
    }
}

impl Drop for WakeTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` is a live timer, deleted exactly once, here.
        unsafe {
            libc::timer_delete(self.id);
        }
    }
}
