//! The two states of an injection: [`Seized`] (attached, the thread still
//! in its system call) and [`Stopped`] (trapped on the way out, before any
//! user instruction; system calls can be injected). x86_64 only.

use std::cell::RefCell;
use std::os::fd::BorrowedFd;

use libc::user_regs_struct;
use nix::errno::Errno;
use nix::sys::ptrace::{self, Options as PtraceOptions};
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::error::Error;
use crate::options::Options;
use crate::sys;
use crate::wait::{raw_wait, thread_state, Deadline, Report};

/// The `syscall` instruction (x86_64), two bytes.
const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
/// The 64-bit user code segment selector (`__USER_CS`).
const USER_CS_64: u64 = 0x33;
/// The x86_64 ABI's red zone below the stack pointer, which a leaf
/// function may use without moving `rsp`.
const RED_ZONE: u64 = 128;
/// Room for the injected calls' argument structs, below the red zone.
pub const SCRATCH_SIZE: usize = 1024;
/// Every signal but SIGKILL and SIGSTOP (which the kernel never blocks).
const ALL_SIGNALS: u64 = u64::MAX;

/// What `/proc/<tid>/status` says about a thread.
#[derive(Debug, Clone, Copy)]
struct Status {
    tgid: i32,
    tracer: i32,
    seccomp: u32,
}

fn read_status(tid: Pid) -> Result<Status, Error> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .map_err(|_| Error::Gone { tid: tid.as_raw() })?;
    let field = |name: &str| -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Ok(Status {
        tgid: field("Tgid:").unwrap_or(0) as i32,
        tracer: field("TracerPid:").unwrap_or(0) as i32,
        // Kernels without CONFIG_SECCOMP have no such line: no filter.
        seccomp: field("Seccomp:").unwrap_or(0) as u32,
    })
}

/// What is needed to put a thread back as it was, kept for a thread
/// abandoned on a timeout (see [`sweep_parked`]).
#[derive(Clone)]
struct Restore {
    regs: user_regs_struct,
    /// The original mask, if it was changed.
    mask: Option<u64>,
    /// Stack bytes overwritten below the red zone: (address, old bytes).
    stack: Option<(u64, Vec<u8>)>,
}

/// A thread left traced by this thread after a timeout.
struct Parked {
    tid: Pid,
    restore: Option<Restore>,
}

thread_local! {
    static PARKED: RefCell<Vec<Parked>> = const { RefCell::new(Vec::new()) };
}

/// Release the threads a timeout left traced by the calling thread, where
/// they have stopped since (restoring what was changed) or died. Runs at
/// every [`Seized::seize`]; call it from idle moments if you like.
pub fn sweep_parked() {
    PARKED.with(|p| {
        p.borrow_mut()
            .retain(|parked| match raw_wait(parked.tid, libc::WNOHANG) {
                Ok(None) => true,
                Ok(Some(Report::Dead)) | Err(_) => false,
                Ok(Some(ev)) => {
                    let sig = match ev {
                        Report::Signal(s) => s,
                        _ => 0,
                    };
                    if let Some(r) = &parked.restore {
                        let _ = restore(parked.tid, r, r.regs.rax as i64);
                    }
                    let _ = detach(parked.tid, sig);
                    debug!(
                        tid = parked.tid.as_raw(),
                        "released a thread parked after a timeout"
                    );
                    false
                }
            })
    });
}

/// Release what can be released ([`sweep_parked`]) and say whether the
/// calling thread still traces a thread parked after a timeout. Such a
/// thread must not exit: its tracee would be detached as it is, or killed
/// if the injection had begun (`PTRACE_O_EXITKILL`). A server whose idle
/// threads exit asks this first.
pub fn still_tracing() -> bool {
    sweep_parked();
    PARKED.with(|p| !p.borrow().is_empty())
}

fn park(tid: Pid, restore: Option<Restore>) {
    // The caller reports the failed injection; this is the detail.
    debug!(
        tid = tid.as_raw(),
        "thread parked: it stays traced by this daemon thread until it stops and is released \
         (next injection on this thread) or this daemon thread exits"
    );
    PARKED.with(|p| p.borrow_mut().push(Parked { tid, restore }));
}

fn ptrace_err(tid: Pid, what: &'static str) -> impl FnOnce(Errno) -> Error {
    move |errno| Error::Ptrace {
        tid: tid.as_raw(),
        what,
        errno,
    }
}

fn detach(tid: Pid, sig: i32) -> Result<(), Errno> {
    // SAFETY: integer arguments only; no memory of ours is touched.
    let ret = unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            tid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            sig as libc::c_long,
        )
    };
    Errno::result(ret).map(drop)
}

/// Resume to the next system-call stop, delivering nothing.
fn resume_syscall(tid: Pid) -> Result<(), Errno> {
    ptrace::syscall(tid, None)
}

fn restore(tid: Pid, r: &Restore, result: i64) -> Result<(), Errno> {
    if let Some((addr, old)) = &r.stack {
        write_mem(tid, *addr, old)?;
    }
    if let Some(mask) = r.mask {
        sys::set_sigmask(tid, mask)?;
    }
    let mut regs = r.regs;
    regs.rax = result as u64;
    ptrace::setregs(tid, regs)
}

fn read_mem(tid: Pid, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    let len = buf.len();
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let n = process_vm_readv(tid, &mut [std::io::IoSliceMut::new(buf)], &remote)?;
    if n == len {
        Ok(())
    } else {
        Err(Errno::EFAULT)
    }
}

fn write_mem(tid: Pid, addr: u64, data: &[u8]) -> Result<(), Errno> {
    let remote = [RemoteIoVec {
        base: addr as usize,
        len: data.len(),
    }];
    let n = process_vm_writev(tid, &[std::io::IoSlice::new(data)], &remote)?;
    if n == data.len() {
        Ok(())
    } else {
        Err(Errno::EFAULT)
    }
}

/// A thread attached with `PTRACE_SEIZE` and interrupted, still inside its
/// system call. The caller now lets that call return (answers the request
/// the thread waits on) and then calls [`Seized::wait_stop`], on the same
/// thread: ptrace requests are accepted only from the attaching thread.
#[derive(Debug)]
pub struct Seized {
    tid: Pid,
    tgid: Pid,
    options: Options,
    waited: bool,
}

impl Seized {
    /// Attach to thread `tid` (in the caller's pid namespace) and ask it to
    /// stop at its next chance (`PTRACE_INTERRUPT`): for a thread blocked
    /// in a system call, right after that call returns. Nothing of the
    /// thread changes until [`Seized::wait_stop`].
    ///
    /// Refusals: [`Error::Seccomp`], [`Error::AlreadyTraced`],
    /// [`Error::Yama`], [`Error::Refused`], [`Error::Gone`].
    pub fn seize(tid: i32, options: Options) -> Result<Seized, Error> {
        sweep_parked();
        let tid = Pid::from_raw(tid);
        let status = read_status(tid)?;
        match status.seccomp {
            0 => {}
            1 => {
                return Err(Error::Seccomp {
                    tid: tid.as_raw(),
                    mode: "strict",
                })
            }
            _ if !options.allow_seccomp_filter => {
                return Err(Error::Seccomp {
                    tid: tid.as_raw(),
                    mode: "filter",
                })
            }
            _ => {}
        }
        // EXITKILL is added at the first stop, before anything changes: a
        // daemon that dies before that leaves the thread as it was.
        if let Err(errno) = ptrace::seize(tid, PtraceOptions::PTRACE_O_TRACESYSGOOD) {
            return Err(classify_refusal(tid, errno));
        }
        let seized = Seized {
            tid,
            tgid: Pid::from_raw(status.tgid),
            options,
            waited: false,
        };
        if let Err(errno) = ptrace::interrupt(tid) {
            // Only a vanished thread makes INTERRUPT fail after SEIZE.
            let _ = detach(tid, 0);
            let mut seized = seized;
            seized.waited = true;
            return Err(if errno == Errno::ESRCH {
                Error::Gone { tid: tid.as_raw() }
            } else {
                Error::Ptrace {
                    tid: tid.as_raw(),
                    what: "PTRACE_INTERRUPT",
                    errno,
                }
            });
        }
        Ok(seized)
    }

    /// The thread.
    pub fn tid(&self) -> i32 {
        self.tid.as_raw()
    }

    /// Wait (at most [`Options::timeout`]) for the trap after system call
    /// `nr` returned, and check the thread is there: 64-bit code, stopped
    /// by the trap, on the return path of `nr`, right after a `syscall`
    /// instruction. Anything else detaches (delivering a signal that was
    /// on its way) and answers [`Error::NotWhereExpected`].
    pub fn wait_stop(mut self, nr: i64) -> Result<Stopped, Error> {
        self.waited = true;
        let tid = self.tid;
        let deadline = match Deadline::start(tid, self.options.timeout) {
            Ok(d) => d,
            Err(e) => {
                park(tid, None);
                return Err(e);
            }
        };
        let ev = match deadline.wait(tid) {
            Ok(ev) => ev,
            Err(e) => {
                park(tid, None);
                return Err(e);
            }
        };
        let not_there = |why: String| Error::NotWhereExpected {
            tid: tid.as_raw(),
            why,
        };
        match ev {
            Report::TrapStop(_) => {}
            Report::Dead => return Err(Error::Gone { tid: tid.as_raw() }),
            Report::Signal(sig) => {
                // Deliver it as if we had never been there.
                let _ = detach(tid, sig);
                return Err(not_there(format!("a signal ({sig}) was being delivered")));
            }
            other => {
                let _ = detach(tid, 0);
                return Err(not_there(format!("unexpected stop {other:?}")));
            }
        }
        let regs = match ptrace::getregs(tid) {
            Ok(r) => r,
            Err(errno) => return Err(self_gone_or(tid, &deadline, errno, "PTRACE_GETREGS")),
        };
        let mut stopped = Stopped {
            tid,
            tgid: self.tgid,
            saved: regs,
            mask: None,
            stack: None,
            used: 0,
            pending_signal: 0,
            deadline,
            finished: false,
        };
        if regs.cs != USER_CS_64 {
            stopped.release_untouched();
            return Err(Error::Not64Bit { tid: tid.as_raw() });
        }
        if regs.orig_rax as i64 != nr {
            stopped.release_untouched();
            return Err(not_there(format!(
                "stopped after system call {} instead of {nr}",
                regs.orig_rax as i64
            )));
        }
        let mut insn = [0u8; 2];
        if read_mem(tid, regs.rip.wrapping_sub(2), &mut insn).is_err() || insn != SYSCALL_INSN {
            stopped.release_untouched();
            return Err(not_there(format!(
                "no syscall instruction before rip {:#x}",
                regs.rip
            )));
        }
        // From here on a dying daemon must not leave the thread running
        // with our registers: EXITKILL.
        if let Err(errno) = ptrace::setoptions(
            tid,
            PtraceOptions::PTRACE_O_TRACESYSGOOD | PtraceOptions::PTRACE_O_EXITKILL,
        ) {
            return Err(stopped.fail(errno, "PTRACE_SETOPTIONS"));
        }
        Ok(stopped)
    }
}

impl Drop for Seized {
    fn drop(&mut self) {
        if !self.waited {
            // The handle was dropped instead of waited on: the thread will
            // trap once its call returns. Let the next sweep release it.
            warn!(
                tid = self.tid.as_raw(),
                "Seized dropped without wait_stop (a bug of the caller)"
            );
            park(self.tid, None);
        }
    }
}

fn classify_refusal(tid: Pid, errno: Errno) -> Error {
    let tid_raw = tid.as_raw();
    match errno {
        Errno::ESRCH => Error::Gone { tid: tid_raw },
        Errno::EPERM | Errno::EACCES => {
            if let Ok(st) = read_status(tid) {
                if st.tracer != 0 {
                    return Error::AlreadyTraced {
                        tid: tid_raw,
                        tracer: st.tracer,
                    };
                }
            }
            let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if yama == Some(3) {
                Error::Yama { tid: tid_raw }
            } else {
                Error::Refused {
                    tid: tid_raw,
                    errno,
                }
            }
        }
        _ => Error::Refused {
            tid: tid_raw,
            errno,
        },
    }
}

/// A ptrace request failed with `errno`: `ESRCH` means the thread is no
/// longer stopped, i.e. it was killed; reap it.
fn self_gone_or(tid: Pid, deadline: &Deadline, errno: Errno, what: &'static str) -> Error {
    if errno == Errno::ESRCH {
        // Killed while stopped: wait for (and reap) its death.
        loop {
            match deadline.wait(tid) {
                Ok(Report::Dead) => return Error::Gone { tid: tid.as_raw() },
                Ok(_) => continue,
                Err(e) => {
                    park(tid, None);
                    return e;
                }
            }
        }
    }
    ptrace_err(tid, what)(errno)
}

/// A thread stopped on the way out of its system call, before any user
/// instruction. Inject calls with [`Stopped::syscall`], pass them
/// argument structs with [`Stopped::put`], and end with
/// [`Stopped::finish`], which puts everything back: registers (with the
/// chosen return value), signal mask, stack bytes; then detaches.
/// Dropped without `finish`, it finishes with the original return value.
pub struct Stopped {
    tid: Pid,
    tgid: Pid,
    saved: user_regs_struct,
    mask: Option<u64>,
    /// The scratch area below the red zone and its old bytes.
    stack: Option<(u64, Vec<u8>)>,
    used: usize,
    /// A signal that arrived during injection and is delivered at detach.
    pending_signal: i32,
    deadline: Deadline,
    finished: bool,
}

impl std::fmt::Debug for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopped")
            .field("tid", &self.tid.as_raw())
            .field("rip", &format_args!("{:#x}", self.saved.rip))
            .finish()
    }
}

impl Stopped {
    /// The thread.
    pub fn tid(&self) -> i32 {
        self.tid.as_raw()
    }

    /// Its process (thread group).
    pub fn pid(&self) -> i32 {
        self.tgid.as_raw()
    }

    /// The registers as they were at the stop (`rax` holds the interrupted
    /// call's return value, `orig_rax` its number).
    pub fn regs(&self) -> &user_regs_struct {
        &self.saved
    }

    /// Copy `bytes` into the thread's stack below the red zone (16-byte
    /// aligned) and return their address there. The area (at most
    /// [`SCRATCH_SIZE`] bytes in all) is saved first and restored by
    /// [`Stopped::finish`].
    pub fn put(&mut self, bytes: &[u8]) -> Result<u64, Error> {
        let tid = self.tid;
        if self.stack.is_none() {
            let base = (self.saved.rsp - RED_ZONE - SCRATCH_SIZE as u64) & !63;
            let mut old = vec![0u8; SCRATCH_SIZE];
            read_mem(tid, base, &mut old).map_err(|e| Error::NotWhereExpected {
                tid: tid.as_raw(),
                why: format!(
                    "its stack below rsp {:#x} cannot hold {SCRATCH_SIZE} bytes ({e})",
                    self.saved.rsp
                ),
            })?;
            self.stack = Some((base, old));
        }
        let base = self.stack.as_ref().map_or(0, |s| s.0);
        let at = self.used.next_multiple_of(16);
        if at + bytes.len() > SCRATCH_SIZE {
            return Err(Error::NotWhereExpected {
                tid: tid.as_raw(),
                why: format!("argument structs over {SCRATCH_SIZE} bytes"),
            });
        }
        let addr = base + at as u64;
        write_mem(tid, addr, bytes).map_err(|errno| self.fail_ref(errno, "writing the stack"))?;
        self.used = at + bytes.len();
        Ok(addr)
    }

    /// Read the thread's memory (e.g. what an injected call wrote to a
    /// struct placed with [`Stopped::put`]).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        read_mem(self.tid, addr, buf).map_err(|errno| Error::Ptrace {
            tid: self.tid.as_raw(),
            what: "process_vm_readv",
            errno,
        })
    }

    /// Whether the thread's file descriptor `fd` is the same open file as
    /// our `ours` (`kcmp(KCMP_FILE)`); false if `fd` is not open there.
    pub fn same_file(&self, fd: i32, ours: BorrowedFd<'_>) -> Result<bool, Error> {
        match sys::same_file(self.tgid, fd, ours) {
            Ok(same) => Ok(same),
            Err(Errno::EBADF) => Ok(false),
            Err(errno) => Err(Error::Ptrace {
                tid: self.tid.as_raw(),
                what: "kcmp(KCMP_FILE)",
                errno,
            }),
        }
    }

    /// Make the thread issue system call `nr` with `args` (at most six, in
    /// the order of the C prototype) from the `syscall` instruction it
    /// stopped after, and return what the kernel answered (a negative
    /// errno on failure, as the raw system call returns it).
    ///
    /// The call runs as the thread: its credentials, its seccomp filter,
    /// its address space and file table. Whatever it changes there stays
    /// changed (an fd it opens stays open) unless the caller undoes it.
    /// Signals are blocked in the thread meanwhile (they stay pending and
    /// are delivered after [`Stopped::finish`]).
    pub fn syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64, Error> {
        assert!(args.len() <= 6, "a system call takes at most six arguments");
        let tid = self.tid;
        if self.mask.is_none() {
            let mask = sys::get_sigmask(tid).map_err(|e| self.fail_ref(e, "PTRACE_GETSIGMASK"))?;
            sys::set_sigmask(tid, ALL_SIGNALS)
                .map_err(|e| self.fail_ref(e, "PTRACE_SETSIGMASK"))?;
            self.mask = Some(mask);
        }
        let mut regs = self.saved;
        regs.rip = self.saved.rip - 2;
        regs.rax = nr as u64;
        // Not in a system call any more: no restart logic on the way out.
        regs.orig_rax = u64::MAX;
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) =
            (a[0], a[1], a[2], a[3], a[4], a[5]);
        ptrace::setregs(tid, regs).map_err(|e| self.fail_ref(e, "PTRACE_SETREGS"))?;
        // Entry stop, then exit stop.
        for _ in 0..2 {
            resume_syscall(tid).map_err(|e| self.fail_ref(e, "PTRACE_SYSCALL"))?;
            self.wait_syscall_stop()?;
        }
        let after = ptrace::getregs(tid).map_err(|e| self.fail_ref(e, "PTRACE_GETREGS"))?;
        Ok(after.rax as i64)
    }

    /// Wait for the next system-call stop, letting group stops pass and
    /// keeping a signal that must still be delivered.
    fn wait_syscall_stop(&mut self) -> Result<(), Error> {
        loop {
            match self.deadline.wait(self.tid) {
                Ok(Report::SyscallStop) => return Ok(()),
                Ok(Report::Dead) => {
                    self.finished = true;
                    return Err(Error::Gone {
                        tid: self.tid.as_raw(),
                    });
                }
                Ok(Report::TrapStop(_)) | Ok(Report::OtherTrap(_)) => {
                    resume_syscall(self.tid).map_err(|e| self.fail_ref(e, "PTRACE_SYSCALL"))?;
                }
                Ok(Report::Signal(sig)) => {
                    // Only a signal that cannot be blocked (SIGSTOP) or a
                    // forced one gets here; keep it for the detach.
                    debug!(
                        tid = self.tid.as_raw(),
                        sig, "signal during an injected call; delivered at detach"
                    );
                    self.pending_signal = sig;
                    resume_syscall(self.tid).map_err(|e| self.fail_ref(e, "PTRACE_SYSCALL"))?;
                }
                Err(e) => {
                    self.finished = true;
                    park(self.tid, Some(self.restore_info()));
                    return Err(e);
                }
            }
        }
    }

    fn restore_info(&self) -> Restore {
        Restore {
            regs: self.saved,
            mask: self.mask,
            stack: self.stack.clone(),
        }
    }

    /// Put the thread back as it was, with `result` as the return value of
    /// the system call it stopped after, and detach. A signal that arrived
    /// meanwhile is delivered by the kernel right after.
    pub fn finish(mut self, result: i64) -> Result<(), Error> {
        self.finish_with(result)
    }

    fn finish_with(&mut self, result: i64) -> Result<(), Error> {
        self.finished = true;
        let r = self.restore_info();
        restore(self.tid, &r, result)
            .and_then(|()| detach(self.tid, self.pending_signal))
            .map_err(|errno| self_gone_or(self.tid, &self.deadline, errno, "restoring the thread"))
    }

    /// Detach without having changed anything.
    fn release_untouched(&mut self) {
        self.finished = true;
        let _ = detach(self.tid, 0);
    }

    /// A request failed: the thread died (reap it) or something is wrong
    /// (put it back and detach).
    fn fail(mut self, errno: Errno, what: &'static str) -> Error {
        self.fail_ref(errno, what)
    }

    fn fail_ref(&mut self, errno: Errno, what: &'static str) -> Error {
        let err = self_gone_or(self.tid, &self.deadline, errno, what);
        if !matches!(err, Error::Gone { .. } | Error::Timeout { .. }) && !self.finished {
            let _ = self.finish_with(self.saved.rax as i64);
        }
        self.finished = true;
        err
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.finish_with(self.saved.rax as i64) {
                warn!(tid = self.tid.as_raw(), error = %e, "releasing a stopped thread failed");
            }
        }
    }
}

/// The state letter of a thread (`t` while stopped by a tracer), for
/// diagnostics.
pub fn state_of(tid: i32) -> char {
    thread_state(Pid::from_raw(tid))
}
