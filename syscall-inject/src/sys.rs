//! Every raw system call of the crate that `nix` does not wrap: the
//! tracee's signal mask (`PTRACE_GETSIGMASK`/`PTRACE_SETSIGMASK`), `kcmp`,
//! and the per-thread alarm that bounds a blocking `waitpid`.
//!
//! SAFETY notes follow one pattern: (1) what the kernel reads or writes
//! lives in this frame and has the size the request names; (2) the return
//! value is checked before any output is used.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;
use std::time::Duration;

use nix::errno::Errno;
use nix::unistd::Pid;

/// Size of the kernel's `sigset_t` (64 signals), which the sigmask
/// requests insist on.
const KERNEL_SIGSET_SIZE: usize = 8;

/// `PTRACE_GETSIGMASK`: the stopped tracee's blocked signals, bit `n-1`
/// for signal `n`.
pub(crate) fn get_sigmask(tid: Pid) -> Result<u64, Errno> {
    let mut mask: u64 = 0;
    // SAFETY: (1) the kernel writes KERNEL_SIGSET_SIZE bytes to `mask`, a
    // u64 of this frame; (2) checked.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            tid.as_raw(),
            KERNEL_SIGSET_SIZE,
            &mut mask as *mut u64,
        )
    };
    Errno::result(ret).map(|_| mask)
}

/// `PTRACE_SETSIGMASK` (the kernel drops SIGKILL and SIGSTOP from it).
pub(crate) fn set_sigmask(tid: Pid, mask: u64) -> Result<(), Errno> {
    // SAFETY: (1) the kernel reads KERNEL_SIGSET_SIZE bytes from `mask`, a
    // u64 of this frame; (2) checked.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            tid.as_raw(),
            KERNEL_SIGSET_SIZE,
            &mask as *const u64,
        )
    };
    Errno::result(ret).map(drop)
}

/// `kcmp(KCMP_FILE)`: is file descriptor `fd` of process `pid` the same
/// open file as our `ours`? `EBADF` if `fd` is not open there.
pub(crate) fn same_file(pid: Pid, fd: i32, ours: BorrowedFd<'_>) -> Result<bool, Errno> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: every argument is an integer; the kernel touches no memory of
    // ours; (2) checked.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid.as_raw() as libc::c_long,
            libc::c_long::from(nix::unistd::getpid().as_raw()),
            KCMP_FILE,
            fd as libc::c_long,
            ours.as_raw_fd() as libc::c_long,
        )
    };
    Errno::result(ret).map(|r| r == 0)
}

/// The signal that ends a blocking wait at its deadline. Its handler does
/// nothing and is installed without `SA_RESTART`, so a `waitpid` it lands
/// in fails with `EINTR`.
pub fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

extern "C" fn on_wake_signal(_: libc::c_int) {}

fn install_wake_handler() -> Result<(), Errno> {
    static INSTALLED: OnceLock<Result<(), Errno>> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // nix's `Signal` has no real-time signals: libc's struct directly.
        // SAFETY: an all-zero sigaction is a valid value of the C struct
        // (empty mask, no flags).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_wake_signal as extern "C" fn(libc::c_int) as usize;
        // No SA_RESTART: the point is to interrupt waitpid.
        action.sa_flags = 0;
        // SAFETY: (1) `action` lives in this frame and is a `struct
        // sigaction`; the handler does nothing, so it is async-signal-safe;
        // (2) checked.
        let ret = unsafe { libc::sigaction(wake_signal(), &action, std::ptr::null_mut()) };
        Errno::result(ret).map(drop)
    })
}

/// A per-thread alarm: from `deadline` on, [`wake_signal`] hits the
/// thread that armed it every few milliseconds until the alarm is dropped
/// (repeating, so a signal that lands just before a `waitpid` starts does
/// not leave that `waitpid` blocked).
pub(crate) struct Alarm {
    timer: libc::timer_t,
}

impl Alarm {
    pub(crate) fn arm(after: Duration) -> Result<Self, Errno> {
        install_wake_handler()?;
        // SAFETY: an all-zero sigevent is a valid value of the C struct.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = wake_signal();
        ev.sigev_notify_thread_id = nix::unistd::gettid().as_raw();
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: (1) `ev` and `timer` live in this frame; (2) checked.
        let ret = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut timer) };
        Errno::result(ret)?;
        let alarm = Alarm { timer };
        let first = if after.is_zero() {
            Duration::from_nanos(1)
        } else {
            after
        };
        let spec = libc::itimerspec {
            it_value: timespec(first),
            it_interval: timespec(Duration::from_millis(5)),
        };
        // SAFETY: (1) `spec` lives in this frame, no old value asked for;
        // the timer was just created; (2) checked.
        let ret = unsafe { libc::timer_settime(alarm.timer, 0, &spec, std::ptr::null_mut()) };
        Errno::result(ret)?;
        Ok(alarm)
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        // SAFETY: the timer was created by `arm` and is deleted only here.
        unsafe { libc::timer_delete(self.timer) };
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}
