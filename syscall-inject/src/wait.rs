//! Waiting for a tracee: raw `waitpid` statuses decoded here (nix's
//! `WaitStatus` cannot hold real-time signals, and a status it fails to
//! decode would be lost), bounded by the thread's [`Alarm`].

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::error::Error;
use crate::sys::Alarm;

/// What one `waitpid` reported about the tracee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// A `PTRACE_EVENT_STOP` trap: after `PTRACE_INTERRUPT` (signal
    /// SIGTRAP) or a group stop (the stop signal).
    TrapStop(i32),
    /// A system-call entry or exit stop (`SIGTRAP | 0x80`, with
    /// `PTRACE_O_TRACESYSGOOD`).
    SyscallStop,
    /// A signal-delivery stop: signal `n` is about to be delivered.
    Signal(i32),
    /// Another ptrace event we did not ask for.
    OtherTrap(i32),
    /// The thread exited or was killed (and is now reaped).
    Dead,
}

/// Decode a `waitpid` status.
pub(crate) fn decode(status: i32) -> Report {
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Report::Dead;
    }
    // Anything else reported to a tracer is a stop.
    let sig = libc::WSTOPSIG(status);
    let event = status >> 16;
    if event == libc::PTRACE_EVENT_STOP {
        Report::TrapStop(sig)
    } else if event != 0 {
        Report::OtherTrap(event)
    } else if sig == libc::SIGTRAP | 0x80 {
        Report::SyscallStop
    } else {
        Report::Signal(sig)
    }
}

/// A deadline for every wait of one injection, enforced by a per-thread
/// alarm signal that interrupts a blocked `waitpid`.
pub(crate) struct Deadline {
    at: Instant,
    allowed: Duration,
    _alarm: Alarm,
}

impl Deadline {
    pub(crate) fn start(tid: Pid, allowed: Duration) -> Result<Self, Error> {
        let alarm = Alarm::arm(allowed).map_err(|errno| Error::Ptrace {
            tid: tid.as_raw(),
            what: "arming the wait alarm (timer_create)",
            errno,
        })?;
        Ok(Deadline {
            at: Instant::now() + allowed,
            allowed,
            _alarm: alarm,
        })
    }

    /// Block until the tracee reports something, or the deadline passes.
    pub(crate) fn wait(&self, tid: Pid) -> Result<Report, Error> {
        loop {
            match raw_wait(tid, 0) {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => unreachable!("waitpid without WNOHANG returned no status"),
                Err(Errno::EINTR) if Instant::now() < self.at => continue,
                Err(Errno::EINTR) => {
                    return Err(Error::Timeout {
                        tid: tid.as_raw(),
                        after: self.allowed,
                        state: thread_state(tid),
                    })
                }
                // Not our tracee any more: reaped, or never was.
                Err(Errno::ECHILD) => return Ok(Report::Dead),
                Err(errno) => {
                    return Err(Error::Ptrace {
                        tid: tid.as_raw(),
                        what: "waitpid",
                        errno,
                    })
                }
            }
        }
    }
}

/// `waitpid(tid, __WALL | extra)`; `None` for "nothing yet" under WNOHANG.
pub(crate) fn raw_wait(tid: Pid, extra: libc::c_int) -> Result<Option<Report>, Errno> {
    let mut status: libc::c_int = 0;
    // SAFETY: the kernel writes one int to `status`, in this frame; the
    // return value is checked before it is read.
    let ret = unsafe { libc::waitpid(tid.as_raw(), &mut status, libc::__WALL | extra) };
    match Errno::result(ret)? {
        0 => Ok(None),
        _ => Ok(Some(decode(status))),
    }
}

/// The state letter of `/proc/<tid>/stat` (`?` if unreadable).
pub(crate) fn thread_state(tid: Pid) -> char {
    std::fs::read_to_string(format!("/proc/{tid}/stat"))
        .ok()
        .and_then(|s| {
            // The name in parentheses may contain anything; the state
            // follows the last ')'.
            let rest = &s[s.rfind(')')? + 1..];
            rest.trim_start().chars().next()
        })
        .unwrap_or('?')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped(sig: i32, event: i32) -> i32 {
        (event << 16) | (sig << 8) | 0x7f
    }

    #[test]
    fn statuses_decode() {
        assert_eq!(decode(0), Report::Dead); // exited 0
        assert_eq!(decode(libc::SIGKILL), Report::Dead); // killed
        assert_eq!(
            decode(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_STOP)),
            Report::TrapStop(libc::SIGTRAP)
        );
        assert_eq!(
            decode(stopped(libc::SIGSTOP, libc::PTRACE_EVENT_STOP)),
            Report::TrapStop(libc::SIGSTOP)
        );
        assert_eq!(
            decode(stopped(libc::SIGTRAP | 0x80, 0)),
            Report::SyscallStop
        );
        // A real-time signal survives decoding (nix's WaitStatus cannot
        // hold one).
        let rt = libc::SIGRTMIN() + 3;
        assert_eq!(decode(stopped(rt, 0)), Report::Signal(rt));
        assert_eq!(
            decode(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_EXEC)),
            Report::OtherTrap(libc::PTRACE_EVENT_EXEC)
        );
    }
}
