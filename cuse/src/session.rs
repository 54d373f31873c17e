//! Request/reply layer: turns one message from the kernel into a typed
//! call of the [`Device`] and writes exactly one reply.
//!
//! Work is split in two: [`Session::accept`] parses the message, answers
//! what needs no handler (INTERRUPT, unknown opcodes, malformed input) and
//! records the request as in flight, so that an INTERRUPT read by any thread
//! finds it; [`Session::run`] calls the handler and replies. The server runs
//! both on the thread that read the message, unless every handler slot is
//! taken (then the request waits in a queue). [`Session::handle`] does both.

use std::collections::HashMap;
use std::io::IoSlice;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use tracing::{debug, error, warn};
use zerocopy::IntoBytes;

use crate::device::{Device, IoctlArgs, OpenFlags, PollHandle};
use crate::offset::{self, Direction};
use crate::request::{InterruptFlag, Request};
use crate::wire::*;
use crate::Error;

/// Where replies and notifications go: the `/dev/cuse` fd that read the
/// request, or an in-memory fake in tests.
pub trait Channel: Send + Sync + 'static {
    /// Write one whole message (header and body) in one go.
    fn send(&self, parts: &[IoSlice<'_>]) -> Result<(), Errno>;
}

/// A request parsed by [`Session::accept`], to be passed to [`Session::run`]
/// together with the message it was parsed from.
#[derive(Debug)]
pub struct Work {
    header: FuseInHeader,
    op: Operation,
    flag: Arc<InterruptFlag>,
}

impl Work {
    /// The request's unique id.
    pub fn unique(&self) -> u64 {
        self.header.unique
    }

    /// The calling thread (`fuse_in_header.pid`; 0 for RELEASE, which the
    /// kernel sends on behalf of no one).
    pub fn tid(&self) -> u32 {
        self.header.pid
    }

    /// Whether this is a RELEASE (the last close of an open file): the
    /// server never makes it wait behind other work.
    pub fn is_release(&self) -> bool {
        matches!(self.op, Operation::Release(_))
    }

    /// The ioctl command number, for an IOCTL.
    pub fn ioctl_cmd(&self) -> Option<u32> {
        match &self.op {
            Operation::Ioctl(i, _) => Some(i.cmd),
            _ => None,
        }
    }

    /// Whether an INTERRUPT for this request has arrived.
    pub fn interrupted(&self) -> bool {
        self.flag.is_raised()
    }
}

#[derive(Debug, Clone)]
enum Operation {
    Open(FuseOpenIn),
    Read(FuseReadIn),
    Write(FuseWriteIn, Range<usize>),
    Release(FuseReleaseIn),
    Ioctl(FuseIoctlIn, Range<usize>),
    Poll(FusePollIn),
}

/// The protocol engine of one device node.
pub struct Session {
    device: Arc<dyn Device>,
    channel: Arc<dyn Channel>,
    inflight: Mutex<HashMap<u64, Arc<InterruptFlag>>>,
    proc_root: Arc<Path>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Session {
    /// A session serving `device`, replying through `channel`.
    pub fn new(device: Arc<dyn Device>, channel: Arc<dyn Channel>) -> Self {
        Session {
            device,
            channel,
            inflight: Mutex::new(HashMap::new()),
            proc_root: Arc::from(Path::new("/proc")),
        }
    }

    /// Look callers up under `root` instead of `/proc` (for tests).
    pub fn with_proc_root(mut self, root: &Path) -> Self {
        self.proc_root = Arc::from(root);
        self
    }

    /// The process (thread-group id) of calling thread `tid`, from
    /// `/proc/<tid>/status`; `ESRCH` if it is gone.
    pub(crate) fn caller_process(&self, tid: u32) -> Result<u32, Errno> {
        crate::request::tgid_of(&self.proc_root, tid)
    }

    /// Whether `work` needs no handler slot: a RELEASE (the last close,
    /// which must never wait behind other work) or an ioctl the device
    /// answers at once ([`Device::ioctl_is_quick`]).
    pub fn is_slotless(&self, work: &Work) -> bool {
        work.is_release()
            || work
                .ioctl_cmd()
                .is_some_and(|cmd| self.device.ioctl_is_quick(cmd))
    }

    /// Number of requests accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.table().len()
    }

    /// Mark every request in flight as interrupted (used at shutdown).
    pub fn interrupt_all(&self) {
        for flag in self.table().values() {
            flag.raise();
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<InterruptFlag>>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accept and run one message on the calling thread.
    pub fn handle(&self, msg: &[u8]) {
        if let Some(work) = self.accept(msg) {
            self.run(work, msg);
        }
    }

    /// Parse one message read from the kernel. Answers on the spot what
    /// needs no handler and returns `None`; otherwise records the request as
    /// in flight and returns it for [`Session::run`] (with the same `msg`).
    pub fn accept(&self, msg: &[u8]) -> Option<Work> {
        let mut cur = Cursor::new(msg);
        let header: FuseInHeader = match cur.take("fuse_in_header") {
            Ok(h) => h,
            Err(e) => {
                error!(error = %e, "unparsable message from the kernel dropped");
                return None;
            }
        };
        let unique = header.unique;
        if header.len as usize != msg.len() {
            warn!(
                unique,
                header_len = header.len,
                read_len = msg.len(),
                "message length differs from its header; answering EIO"
            );
            self.reply_error(unique, Errno::EIO);
            return None;
        }
        let opcode = match Opcode::try_from(header.opcode) {
            Ok(op) => op,
            Err(op) => {
                debug!(unique, opcode = op, "unknown opcode; answering ENOSYS");
                self.reply_error(unique, Errno::ENOSYS);
                return None;
            }
        };
        let parsed = match opcode {
            Opcode::Forget | Opcode::BatchForget => return None,
            Opcode::Interrupt => {
                self.interrupt(&header, &mut cur);
                return None;
            }
            Opcode::CuseInit | Opcode::Flush | Opcode::Destroy => {
                debug!(
                    unique,
                    ?opcode,
                    "opcode not served by a CUSE device; answering ENOSYS"
                );
                self.reply_error(unique, Errno::ENOSYS);
                return None;
            }
            Opcode::Open => cur.take("fuse_open_in").map(Operation::Open),
            Opcode::Read => cur.take("fuse_read_in").map(Operation::Read),
            Opcode::Release => cur.take("fuse_release_in").map(Operation::Release),
            Opcode::Poll => cur.take("fuse_poll_in").map(Operation::Poll),
            Opcode::Write => cur.take::<FuseWriteIn>("fuse_write_in").and_then(|w| {
                let start = msg.len() - cur.remaining();
                cur.take_bytes(w.size as usize, "write data")
                    .map(|d| Operation::Write(w, start..start + d.len()))
            }),
            Opcode::Ioctl => cur.take::<FuseIoctlIn>("fuse_ioctl_in").and_then(|i| {
                let start = msg.len() - cur.remaining();
                cur.take_bytes(i.in_size as usize, "ioctl input")
                    .map(|d| Operation::Ioctl(i, start..start + d.len()))
            }),
        };
        let op = match parsed {
            Ok(op) => op,
            Err(e) => {
                warn!(unique, ?opcode, error = %e, "malformed request; answering EIO");
                self.reply_error(unique, Errno::EIO);
                return None;
            }
        };
        let flag = Arc::new(InterruptFlag::default());
        self.table().insert(unique, flag.clone());
        Some(Work { header, op, flag })
    }

    /// INTERRUPT: raise the flag of the named request if we hold it. If we
    /// do not (its reader has not recorded it yet, or it was answered
    /// already), answer `EAGAIN`: the kernel then requeues the interrupt if
    /// the request still exists and otherwise ignores the answer. No answer
    /// is expected in the normal case.
    fn interrupt(&self, header: &FuseInHeader, cur: &mut Cursor<'_>) {
        let target = match cur.take::<FuseInterruptIn>("fuse_interrupt_in") {
            Ok(i) => i.unique,
            Err(e) => {
                warn!(unique = header.unique, error = %e, "malformed INTERRUPT ignored");
                return;
            }
        };
        let found = self.table().get(&target).cloned();
        match found {
            Some(flag) if flag.provoked() => {
                debug!(
                    target,
                    "INTERRUPT provoked by the server itself (Request::expect_interrupt); not a cancel"
                );
            }
            Some(flag) => {
                debug!(target, "request interrupted");
                flag.raise();
            }
            None => {
                debug!(
                    target,
                    "INTERRUPT for a request not in flight; answering EAGAIN"
                );
                self.reply_error(header.unique, Errno::EAGAIN);
            }
        }
    }

    /// Answer an accepted request with `errno` without calling the handler
    /// (e.g. `EINTR` for one interrupted while it waited for a slot).
    pub fn refuse(&self, work: Work, errno: Errno) {
        Reply::new(self, work.header.unique).error(errno);
    }

    /// Call the handler for an accepted request and send its one reply.
    /// `msg` is the message `work` was accepted from.
    pub fn run(&self, work: Work, msg: &[u8]) {
        self.run_then(work, msg, || {});
    }

    /// [`Session::run`], calling `handled` once the handler has returned,
    /// just before the reply goes out (the server counts the thread as
    /// about to read again from then on: the caller may issue its next
    /// request before this thread is back in `read`). With work left by
    /// [`Request::after_reply`], `handled` is called after that work
    /// instead, which runs right after the reply.
    pub(crate) fn run_then(&self, work: Work, msg: &[u8], handled: impl FnOnce()) {
        let Work { header, op, flag } = work;
        let reply = Reply::new(self, header.unique);
        let req = Request::new(
            header.unique,
            header.pid,
            header.uid,
            header.gid,
            flag,
            self.proc_root.clone(),
        );
        let mut outcome = catch_unwind(AssertUnwindSafe(|| self.dispatch(&req, &op, msg)));
        if let Some(errno) = req.take_reply_instead() {
            outcome = Ok(Err(errno));
        }
        let after = req.take_after_reply();
        let mut handled = Some(handled);
        if after.is_none() {
            if let Some(f) = handled.take() {
                f();
            }
        }
        match outcome {
            Ok(Ok(Answer(fixed, data))) => reply.ok(&fixed, &data),
            Ok(Err(errno)) => reply.error(errno),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                error!(unique = header.unique, panic = %what, "device handler panicked; answering EIO");
                reply.error(Errno::EIO);
            }
        }
        if let Some(work) = after {
            if catch_unwind(AssertUnwindSafe(work)).is_err() {
                error!(
                    unique = header.unique,
                    "work left to run after the reply panicked"
                );
            }
        }
        if let Some(f) = handled {
            f();
        }
    }

    fn dispatch(&self, req: &Request, op: &Operation, msg: &[u8]) -> Result<Answer, Errno> {
        let dev = &*self.device;
        match op {
            Operation::Open(o) => {
                let fh = dev.open(req, OpenFlags(o.flags))?;
                Ok(Answer::fixed(FuseOpenOut {
                    fh,
                    ..Default::default()
                }))
            }
            Operation::Read(r) => {
                let offset = offset::resolve(&self.proc_root, req.tid(), Direction::Read, r.offset);
                let data = dev.read(req, r.fh, r.size, offset)?;
                if data.len() > r.size as usize {
                    error!(
                        unique = req.unique(),
                        asked = r.size,
                        got = data.len(),
                        "read handler returned more than asked; answering EIO"
                    );
                    return Err(Errno::EIO);
                }
                Ok(Answer(Vec::new(), data))
            }
            Operation::Write(w, range) => {
                let data = &msg[range.clone()];
                let offset =
                    offset::resolve(&self.proc_root, req.tid(), Direction::Write, w.offset);
                let n = dev.write(req, w.fh, data, offset)?;
                if n as usize > data.len() {
                    error!(
                        unique = req.unique(),
                        given = data.len(),
                        claimed = n,
                        "write handler claims more bytes than given; answering EIO"
                    );
                    return Err(Errno::EIO);
                }
                Ok(Answer::fixed(FuseWriteOut {
                    size: n,
                    padding: 0,
                }))
            }
            Operation::Release(r) => {
                dev.release(r.fh);
                Ok(Answer(Vec::new(), Vec::new()))
            }
            Operation::Ioctl(i, range) => {
                if i.flags & (FUSE_IOCTL_COMPAT | FUSE_IOCTL_32BIT | FUSE_IOCTL_COMPAT_X32) != 0 {
                    debug!(
                        unique = req.unique(),
                        cmd = i.cmd,
                        flags = i.flags,
                        "ioctl from a 32-bit caller refused with ENOTTY"
                    );
                    return Err(Errno::ENOTTY);
                }
                let args = IoctlArgs {
                    cmd: i.cmd,
                    arg: i.arg,
                    input: &msg[range.clone()],
                    out_size: i.out_size,
                };
                let res = dev.ioctl(req, i.fh, args)?;
                if res.out.len() > i.out_size as usize {
                    error!(
                        unique = req.unique(),
                        cmd = i.cmd,
                        out_size = i.out_size,
                        got = res.out.len(),
                        "ioctl handler returned more output than the kernel accepts; answering EIO"
                    );
                    return Err(Errno::EIO);
                }
                let out = FuseIoctlOut {
                    result: res.result,
                    ..Default::default()
                };
                Ok(Answer(out.as_bytes().to_vec(), res.out))
            }
            Operation::Poll(p) => {
                let waiter = (p.flags & FUSE_POLL_SCHEDULE_NOTIFY != 0)
                    .then(|| PollHandle::new(p.kh, Arc::downgrade(&self.channel)));
                let revents = dev.poll(req, p.fh, p.events, waiter)?;
                Ok(Answer::fixed(FusePollOut {
                    revents,
                    padding: 0,
                }))
            }
        }
    }

    fn reply_error(&self, unique: u64, errno: Errno) {
        self.send(unique, -(errno as i32), &[], &[]);
    }

    fn send(&self, unique: u64, error: i32, fixed: &[u8], data: &[u8]) {
        let header = FuseOutHeader {
            len: (std::mem::size_of::<FuseOutHeader>() + fixed.len() + data.len()) as u32,
            error,
            unique,
        };
        let parts = [
            IoSlice::new(header.as_bytes()),
            IoSlice::new(fixed),
            IoSlice::new(data),
        ];
        match self.channel.send(&parts) {
            Ok(()) => {}
            // The request no longer exists (aborted, or the kernel gave up
            // on it) or the connection is gone: nobody is waiting.
            Err(Errno::ENOENT) | Err(Errno::ENODEV) | Err(Errno::ENOTCONN) => {
                debug!(unique, "reply not delivered: request or connection gone")
            }
            Err(e) => error!(unique, error = %e, "writing a reply to /dev/cuse failed"),
        }
    }
}

/// A handler's answer: a fixed-size reply struct and variable data.
struct Answer(Vec<u8>, Vec<u8>);

impl Answer {
    fn fixed<T: IntoBytes + zerocopy::Immutable>(value: T) -> Self {
        Answer(value.as_bytes().to_vec(), Vec::new())
    }
}

/// The one answer owed to a request. Consumed by [`Reply::ok`] or
/// [`Reply::error`]; dropped unanswered it answers `EIO` and logs a warning,
/// so a client is never left waiting.
pub(crate) struct Reply<'a> {
    session: &'a Session,
    unique: u64,
    answered: bool,
}

impl<'a> Reply<'a> {
    pub(crate) fn new(session: &'a Session, unique: u64) -> Self {
        Reply {
            session,
            unique,
            answered: false,
        }
    }

    pub(crate) fn ok(mut self, fixed: &[u8], data: &[u8]) {
        self.finish(0, fixed, data);
    }

    pub(crate) fn error(mut self, errno: Errno) {
        let code = errno as i32;
        let code = if code <= 0 || code >= 512 {
            error!(
                unique = self.unique,
                errno = code,
                "handler returned an invalid errno; answering EIO"
            );
            libc::EIO
        } else {
            code
        };
        self.finish(-code, &[], &[]);
    }

    fn finish(&mut self, error: i32, fixed: &[u8], data: &[u8]) {
        self.answered = true;
        self.session.send(self.unique, error, fixed, data);
        self.session.table().remove(&self.unique);
    }
}

impl Drop for Reply<'_> {
    fn drop(&mut self) {
        if !self.answered {
            warn!(
                unique = self.unique,
                "request dropped unanswered; answering EIO"
            );
            self.finish(-libc::EIO, &[], &[]);
        }
    }
}

/// Parameters of the CUSE_INIT answer.
#[derive(Debug, Clone)]
pub(crate) struct InitParams<'a> {
    pub name: &'a str,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub max_read: u32,
    pub max_write: u32,
}

/// The bytes answering the kernel's CUSE_INIT request `msg`.
pub(crate) fn init_reply(msg: &[u8], p: &InitParams<'_>) -> Result<Vec<u8>, Error> {
    let proto = |what: String| Error::Protocol(what);
    let mut cur = Cursor::new(msg);
    let header: FuseInHeader = cur
        .take("fuse_in_header")
        .map_err(|e| proto(e.to_string()))?;
    if header.len as usize != msg.len() {
        return Err(proto(format!(
            "CUSE_INIT length {} differs from bytes read {}",
            header.len,
            msg.len()
        )));
    }
    if header.opcode != Opcode::CuseInit as u32 {
        return Err(proto(format!(
            "expected CUSE_INIT, got opcode {}",
            header.opcode
        )));
    }
    let init: CuseInitIn = cur.take("cuse_init_in").map_err(|e| proto(e.to_string()))?;
    if init.major != FUSE_KERNEL_VERSION {
        return Err(proto(format!(
            "kernel speaks FUSE {}.{}, this crate {FUSE_KERNEL_VERSION}.x",
            init.major, init.minor
        )));
    }
    if init.minor < CUSE_MIN_MINOR_VERSION {
        return Err(proto(format!("kernel FUSE minor {} too old", init.minor)));
    }
    let out = CuseInitOut {
        major: FUSE_KERNEL_VERSION,
        minor: init.minor.min(FUSE_KERNEL_MINOR_VERSION),
        flags: CUSE_UNRESTRICTED_IOCTL,
        max_read: p.max_read,
        max_write: p.max_write,
        dev_major: p.dev_major,
        dev_minor: p.dev_minor,
        ..Default::default()
    };
    let info = format!("DEVNAME={}\0", p.name);
    if info.len() > CUSE_INIT_INFO_MAX {
        return Err(Error::InvalidName(p.name.to_owned()));
    }
    let len =
        std::mem::size_of::<FuseOutHeader>() + std::mem::size_of::<CuseInitOut>() + info.len();
    let oh = FuseOutHeader {
        len: len as u32,
        error: 0,
        unique: header.unique,
    };
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(oh.as_bytes());
    bytes.extend_from_slice(out.as_bytes());
    bytes.extend_from_slice(info.as_bytes());
    Ok(bytes)
}
