//! Why an injection was refused or failed. Every variant says what the user
//! can do about it; [`Error::errno`] is the errno to give the client.

use std::time::Duration;

use nix::errno::Errno;

/// A refused or failed injection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// This crate only knows x86_64's system call convention.
    #[error("system call injection is implemented for x86_64 only (this is {arch})")]
    UnsupportedArch {
        /// The architecture the crate was built for.
        arch: &'static str,
    },
    /// The thread runs 32-bit code (`cs` is not the 64-bit user segment).
    #[error("thread {tid} runs 32-bit code; only 64-bit processes can be served this way")]
    Not64Bit {
        /// The thread.
        tid: i32,
    },
    /// `PTRACE_SEIZE` failed because a debugger or tracer holds the thread.
    #[error(
        "thread {tid} is already traced by process {tracer} (a debugger or strace?); \
         run it without the tracer, or use shared memory (memfd, MAP_SHARED)"
    )]
    AlreadyTraced {
        /// The thread.
        tid: i32,
        /// `TracerPid:` of the thread.
        tracer: i32,
    },
    /// Yama's `kernel.yama.ptrace_scope` is 3: no process may attach.
    #[error(
        "ptrace of thread {tid} refused: kernel.yama.ptrace_scope is 3 (no attach at all); \
         set it to 2 or lower, or use shared memory"
    )]
    Yama {
        /// The thread.
        tid: i32,
    },
    /// `PTRACE_SEIZE` refused for another reason: an LSM (SELinux,
    /// AppArmor, Landlock) or the process being unreachable.
    #[error(
        "ptrace of thread {tid} refused ({errno}): a security module (SELinux, AppArmor) \
         or the kernel denies this daemon ptrace access; allow it, or use shared memory"
    )]
    Refused {
        /// The thread.
        tid: i32,
        /// What `PTRACE_SEIZE` answered.
        errno: Errno,
    },
    /// The thread runs under seccomp (strict mode, or a filter while
    /// filters are not allowed by the [`Options`](crate::Options)): an
    /// injected call could kill it or change its signal dispositions.
    #[error(
        "thread {tid} runs under seccomp ({mode}); an injected system call could be fatal to \
         it, so none is made: run it without a seccomp filter, or use shared memory"
    )]
    Seccomp {
        /// The thread.
        tid: i32,
        /// `strict` or `filter`.
        mode: &'static str,
    },
    /// An injected call failed in a way that only a seccomp filter (or an
    /// LSM) explains: `ENOSYS` for a call every kernel has, or `EPERM`/
    /// `EACCES` where no permission is involved.
    #[error(
        "the injected {call} in thread {tid} failed with {errno}: a seccomp filter or a \
         security module blocks it; allow it, or use shared memory"
    )]
    Blocked {
        /// The thread.
        tid: i32,
        /// The system call's name.
        call: &'static str,
        /// What it returned.
        errno: Errno,
    },
    /// The thread did not stop where it should: not on the return path of
    /// the expected system call, a signal was on its way, or its stack
    /// cannot hold the arguments.
    #[error("thread {tid} is not where a system call can be injected: {why}")]
    NotWhereExpected {
        /// The thread.
        tid: i32,
        /// What was found instead.
        why: String,
    },
    /// The thread exited (or was killed) during the operation.
    #[error("thread {tid} exited during the injection")]
    Gone {
        /// The thread.
        tid: i32,
    },
    /// The thread did not reach the next stop in time (frozen by a cgroup
    /// freezer, or the machine is overloaded).
    #[error(
        "thread {tid} did not stop within {after:?} (state {state}); it is released when it \
         next stops (see the crate docs)"
    )]
    Timeout {
        /// The thread.
        tid: i32,
        /// The time allowed.
        after: Duration,
        /// Its state letter from `/proc/<tid>/stat`.
        state: char,
    },
    /// A ptrace request or a wait failed unexpectedly.
    #[error("{what} on thread {tid} failed: {errno}")]
    Ptrace {
        /// The thread.
        tid: i32,
        /// What was being done.
        what: &'static str,
        /// The error.
        errno: Errno,
    },
}

impl Error {
    /// The errno for the client whose request could not be served this way:
    /// `ESRCH` if it is gone, otherwise `EFAULT` (its memory cannot be
    /// pinned for it, as the kernel answers for memory it cannot pin).
    pub fn errno(&self) -> Errno {
        match self {
            Error::Gone { .. } => Errno::ESRCH,
            _ => Errno::EFAULT,
        }
    }
}
