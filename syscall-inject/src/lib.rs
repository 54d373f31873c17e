//! Make a thread of another process issue system calls as itself, while it
//! is stopped on the way out of a system call it was blocked in, and leave
//! it exactly as it was.
//!
//! The use it was written for: a server that answers a request a client
//! thread is blocked on (a CUSE ioctl) can have that thread itself issue a
//! call that only the client can make for itself, such as a VFIO map that
//! pins the client's own private pages. The crate knows nothing of CUSE or
//! VFIO.
//!
//! ```no_run
//! use syscall_inject::{Options, Seized};
//! # fn answer_the_request() {}
//! # let tid = 0;
//! // The thread `tid` is blocked in ioctl(2), waiting for us.
//! let seized = Seized::seize(tid, Options::default())?;
//! answer_the_request(); // its ioctl returns...
//! let mut stopped = seized.wait_stop(libc::SYS_ioctl)?; // ...and traps
//! let pid = stopped.syscall(libc::SYS_getpid, &[])?; // runs as the client
//! stopped.finish(0)?; // its ioctl returns 0; registers etc. as they were
//! # Ok::<(), syscall_inject::Error>(())
//! ```
//!
//! **x86_64 only.** Elsewhere [`Seized::seize`] refuses with
//! [`Error::UnsupportedArch`]. The tracee must be a 64-bit process.
//!
//! # The sequence
//!
//! 1. [`Seized::seize`]: `PTRACE_SEIZE` (no stop, no signal), then
//!    `PTRACE_INTERRUPT`. Refused up front: a thread under seccomp (strict
//!    always, a filter unless [`Options::allow_seccomp_filter`]), one
//!    already traced (a debugger, strace: `EPERM`, told apart by
//!    `TracerPid:`), Yama scope 3, any other refusal (an LSM).
//! 2. The caller lets the system call return (answers the request).
//! 3. [`Seized::wait_stop`]: the thread traps with `PTRACE_EVENT_STOP` on
//!    its way back to user mode, before any user instruction. Checked:
//!    64-bit code segment, `orig_rax` is the expected call, the two bytes
//!    before `rip` are `syscall`. `PTRACE_O_EXITKILL` is set now, not at
//!    the seize (see "A dying daemon").
//! 4. [`Stopped::syscall`], as often as needed: on the first, the signal
//!    mask is saved and every signal blocked (`PTRACE_SETSIGMASK`); then
//!    registers are set (`rip - 2`, `rax` = number, arguments,
//!    `orig_rax = -1`) and the thread is resumed to its syscall-entry stop
//!    and its syscall-exit stop (`PTRACE_SYSCALL` twice, with
//!    `PTRACE_O_TRACESYSGOOD`); `rax` then holds the result. The only user
//!    instruction the thread executes is that `syscall` instruction.
//!    [`Stopped::put`] copies argument structs below the red zone (the
//!    128 bytes under `rsp` a leaf function may use), saving what was
//!    there first.
//! 5. [`Stopped::finish`]: stack bytes, signal mask and registers (with
//!    the chosen return value in `rax`) are put back, and
//!    `PTRACE_DETACH`. Pending signals are delivered by the kernel right
//!    after, on the thread's way to user mode.
//!
//! What the thread never sees changed: general registers (and everything
//! else of `user_regs_struct`: segments, `fs_base`), FPU/vector state
//! (never touched), its signal mask, the memory below `rsp`, its pending
//! signals, `errno` (user memory, written only by user code, and no user
//! code runs). Its other threads keep running: ptrace attaches to one
//! thread. What it does see: the effects of the injected calls themselves
//! (an fd a call opened), and time.
//!
//! # Kernel facts the design rests on
//!
//! Read in Linux 6.1 (Debian 12) and 7.2 (Debian sid); both agree on each
//! point unless said otherwise.
//!
//! - **PTRACE_INTERRUPT traps at least once** (kernel/ptrace.c, "At least
//!   one trap is guaranteed to happen after this request"): it sets
//!   `JOBCTL_TRAP_STOP` and `signal_wake_up`s the thread, which sets
//!   `TIF_SIGPENDING` and wakes an interruptible sleep, not a killable or
//!   uninterruptible one. Any trap clears it (`ptrace_stop`: "any trap
//!   clears pending STOP trap"), so the first stop may be a different one.
//! - **Where the trap happens**: `get_signal` (kernel/signal.c) runs on
//!   every return to user mode with `TIF_SIGPENDING`; its loop handles a
//!   pending group stop first, then `JOBCTL_TRAP_MASK` (`do_jobctl_trap`:
//!   for a seized tracee a `PTRACE_EVENT_STOP`, signal SIGTRAP, or the
//!   stop signal during a group stop), and only then dequeues signals. So
//!   a signal pending at that point stays queued: the trap comes first.
//!   The trap is inside `get_signal`, before the architecture's restart
//!   logic (`arch_do_signal_or_restart`), so `rip` still points after the
//!   `syscall` instruction and `rax` holds the call's result.
//! - **Restart logic reads `orig_rax`**: after `get_signal` returns
//!   nothing, x86's `arch_do_signal_or_restart` restarts the call when
//!   `orig_rax >= 0` and `rax` is an `-ERESTART*` code. Injected calls run
//!   with `orig_rax = -1` so no restart logic applies on their way out;
//!   [`Stopped::finish`] restores the original `orig_rax`, so finishing
//!   with the original `rax` of an interrupted call restarts it exactly as
//!   the kernel would have.
//! - **Signals during injection**: each resume re-enters the exit path,
//!   where `get_signal` would dequeue a pending signal and report a
//!   signal-delivery stop, after which it could not be put back with its
//!   `siginfo`. Blocking every signal with `PTRACE_SETSIGMASK` prevents
//!   that (`dequeue_signal` takes the blocked mask). `PTRACE_SETSIGMASK`
//!   sets `->blocked` without `recalc_sigpending` and clears
//!   `TIF_RESTORE_SIGMASK`; `PTRACE_GETSIGMASK` returns `saved_sigmask`
//!   when that flag is set. Calls that swap the mask (`ppoll`,
//!   `pselect`, `sigsuspend`) are therefore poor hosts; `ioctl` is not one.
//! - **Detaching wakes signal handling**: `__ptrace_unlink` clears
//!   `SYSCALL_TRACE` and every pending trap, re-arms a group stop in
//!   effect, and calls `ptrace_signal_wake_up`, which sets
//!   `TIF_SIGPENDING`; the restored mask is therefore re-evaluated and
//!   pending signals are delivered on the way out.
//! - **Single-step is avoided on purpose**: its SIGTRAP is *forced*
//!   (`force_sig_fault`), and `force_sig_info_to_task` unblocks a blocked
//!   forced signal and resets its handler to `SIG_DFL`, a change the
//!   client would see. Syscall stops (`ptrace_report_syscall_*`) queue no
//!   signal.
//! - **Seccomp runs after the syscall-entry stop** (`syscall_trace_enter`:
//!   ptrace report, then `__secure_computing`), so a filter sees the
//!   injected call and may kill the process or force SIGSYS (see the
//!   previous point); that is why filtered threads are refused by default.
//! - **FUSE's wait** (fs/fuse/dev.c, `request_wait_answer`): interruptible
//!   until a signal, then, once the request has been read by the server,
//!   FUSE_INTERRUPT is queued and the wait goes on killable
//!   (`wait_event_killable`), then uninterruptible if killed. The trap's
//!   `TIF_SIGPENDING` thus turns into one FUSE_INTERRUPT and no early
//!   return: the call returns only when answered (or the connection
//!   aborts). A real signal arriving too causes no second INTERRUPT
//!   (`FR_INTERRUPTED` is set once).
//! - **ptrace belongs to the attaching thread**: every request checks
//!   `child->parent == current` (`ptrace_check_attach`), and a thread that
//!   exits detaches its tracees (`exit_ptrace`, SIGKILL first for
//!   `PT_EXITKILL` ones). Wait statuses of tracees are visible to any
//!   thread of the tracer's process: nothing else in the process may call
//!   `wait(-1)`/`waitpid(-1)` while an injection runs.
//! - **A traced thread that dies stays a zombie until its tracer reaps
//!   it** (`exit_notify`: a ptraced task notifies the tracer), so every
//!   death seen here is reaped with `waitpid(tid, __WALL)`.
//!
//! # A dying daemon
//!
//! `PTRACE_O_EXITKILL` is set at the first stop, before any register is
//! changed. A daemon (thread) that dies after that kills the client
//! (`exit_ptrace` sends SIGKILL): the client would otherwise run on with
//! the injected registers. One that dies before (between seize and trap)
//! leaves the client untouched: it is simply detached.
//!
//! # Bounded waits
//!
//! Every wait of one injection (from [`Seized::wait_stop`] to
//! [`Stopped::finish`]) shares [`Options::timeout`]. `waitpid` blocks; a
//! per-thread POSIX timer sends [`wake_signal`] (`SIGRTMIN + 6`, a no-op
//! handler installed without `SA_RESTART`) to the waiting thread at the
//! deadline and every 5 ms after, until the injection ends. The signal
//! must not be blocked in the calling thread. What a wait can block on:
//! the thread not reaching its trap because a cgroup v1 freezer holds it
//! (`try_to_freeze` runs before the trap in `get_signal`; the v2 freezer's
//! trap comes after ours), or because the machine is overloaded. A thread
//! that times out is *parked*: it stays traced by the calling thread,
//! which releases it (restoring whatever was changed) at the next
//! [`Seized::seize`] or [`sweep_parked`] once it has stopped, or when the
//! calling thread exits (harmless before the first stop, fatal to the
//! client after it, as above). A thread pool whose idle threads exit must
//! therefore keep a thread for which [`still_tracing`] answers true
//! (cuse-server: `DeviceConfig::keep_thread_while(still_tracing)`).
//!
//! The wake signal is not the one cuse-server uses for its idle and
//! shutdown wake-ups (`SIGRTMIN + 5`): both handlers do nothing, and a
//! stray one only makes a blocking call return `EINTR` early, which both
//! retry.
//!
//! # Refusals
//!
//! Every [`Error`] says why and what to do; [`Error::errno`] maps it to
//! the errno the client should see (`EFAULT`, or `ESRCH` if it is gone).

#![deny(missing_docs)]

mod error;
mod options;
mod sys;

#[cfg(target_arch = "x86_64")]
mod tracee;
#[cfg(target_arch = "x86_64")]
mod wait;

#[cfg(not(target_arch = "x86_64"))]
#[path = "unsupported.rs"]
mod tracee;

pub use error::Error;
pub use options::Options;
pub use sys::wake_signal;
pub use tracee::{state_of, still_tracing, sweep_parked, Seized, Stopped, SCRATCH_SIZE};
