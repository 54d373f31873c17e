//! The handler side: the [`Device`] trait a server implements and the
//! types its methods take and return.

use std::io::IoSlice;
use std::sync::Weak;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use zerocopy::IntoBytes;

use crate::request::Request;
use crate::session::Channel;
use crate::wire::{FuseNotifyPollWakeupOut, FuseOutHeader, FUSE_NOTIFY_POLL};
use crate::Offset;

/// `POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM`: what the kernel reports
/// for a file without a poll method, and what [`Device::poll`] answers by
/// default.
pub const DEFAULT_POLL_MASK: u32 =
    (libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM) as u32;

/// The flags a file was opened with (`open(2)`'s flags, e.g. `O_RDWR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFlags(pub u32);

impl OpenFlags {
    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// As `nix`'s `OFlag` (unknown bits kept).
    pub fn oflag(self) -> OFlag {
        OFlag::from_bits_retain(self.0 as i32)
    }

    /// Whether the file may be read (`O_RDONLY` or `O_RDWR`).
    pub fn readable(self) -> bool {
        matches!(
            self.0 as i32 & libc::O_ACCMODE,
            libc::O_RDONLY | libc::O_RDWR
        )
    }

    /// Whether the file may be written (`O_WRONLY` or `O_RDWR`).
    pub fn writable(self) -> bool {
        matches!(
            self.0 as i32 & libc::O_ACCMODE,
            libc::O_WRONLY | libc::O_RDWR
        )
    }

    /// Whether `O_NONBLOCK` is set.
    pub fn nonblocking(self) -> bool {
        self.0 as i32 & libc::O_NONBLOCK != 0
    }
}

/// An ioctl as the handler sees it.
///
/// With `CUSE_UNRESTRICTED_IOCTL` (always requested by this crate) the
/// kernel does not copy the argument: `arg` is the caller's raw argument
/// (usually a pointer in the caller's address space), `input` is empty and
/// `out_size` is 0. Read and write the caller's struct with
/// [`Request::read_obj`]/[`Request::write_obj`].
#[derive(Debug, Clone, Copy)]
pub struct IoctlArgs<'a> {
    /// The ioctl command number.
    pub cmd: u32,
    /// The raw argument.
    pub arg: u64,
    /// Input bytes the kernel copied in (empty for unrestricted ioctls).
    pub input: &'a [u8],
    /// How many output bytes the kernel accepts in [`IoctlResult::out`].
    pub out_size: u32,
}

/// A successful ioctl's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoctlResult {
    /// The ioctl's return value as the caller sees it (usually 0).
    pub result: i32,
    /// Output bytes for the kernel to copy out; at most
    /// [`IoctlArgs::out_size`] (more is a server error answered `EIO`).
    pub out: Vec<u8>,
}

impl IoctlResult {
    /// Return value `result`, no output bytes.
    pub fn value(result: i32) -> Self {
        IoctlResult {
            result,
            out: Vec::new(),
        }
    }
}

/// A handle to wake the pollers of one open file: kept by a
/// [`Device::poll`] implementation, `notify()`'d when the file becomes
/// ready. Cheap to clone; holds no reference that keeps the device alive.
#[derive(Clone)]
pub struct PollHandle {
    kh: u64,
    channel: Weak<dyn Channel>,
}

impl std::fmt::Debug for PollHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollHandle").field("kh", &self.kh).finish()
    }
}

impl PollHandle {
    pub(crate) fn new(kh: u64, channel: Weak<dyn Channel>) -> Self {
        PollHandle { kh, channel }
    }

    /// The kernel's handle for the polled file.
    pub fn kh(&self) -> u64 {
        self.kh
    }

    /// Wake everyone polling this file (the kernel then polls again).
    /// `ENOTCONN` once the device is gone.
    pub fn notify(&self) -> Result<(), Errno> {
        let channel = self.channel.upgrade().ok_or(Errno::ENOTCONN)?;
        let body = FuseNotifyPollWakeupOut { kh: self.kh };
        let header = FuseOutHeader {
            len: (std::mem::size_of::<FuseOutHeader>() + std::mem::size_of_val(&body)) as u32,
            error: FUSE_NOTIFY_POLL,
            unique: 0,
        };
        channel.send(&[
            IoSlice::new(header.as_bytes()),
            IoSlice::new(body.as_bytes()),
        ])
    }
}

/// A character device served over CUSE.
///
/// Every method runs on a worker thread of the device's pool, possibly
/// several at once (one per concurrent request), so implementations use
/// interior mutability. Return `Err(errno)` to fail the caller's system call
/// with that errno; the library encodes every reply. A panic is caught and
/// answered `EIO` (and logged). Never block indefinitely: a client whose
/// request is not answered cannot even be killed. Long waits should check
/// [`Request::interrupted`] (or use [`Request::wait_interrupted`]) and
/// answer `EINTR`.
///
/// Every method has a default that behaves like a kernel driver lacking it.
pub trait Device: Send + Sync + 'static {
    /// `open(2)`: returns the file handle passed to the other methods.
    /// Default: handle 0.
    fn open(&self, req: &Request, flags: OpenFlags) -> Result<u64, Errno> {
        let _ = (req, flags);
        Ok(0)
    }

    /// `read(2)` family: at most `size` bytes. `offset` is the real file
    /// offset recovered from the caller (see [`Offset`]). Default: `EINVAL`.
    fn read(&self, req: &Request, fh: u64, size: u32, offset: Offset) -> Result<Vec<u8>, Errno> {
        let _ = (req, fh, size, offset);
        Err(Errno::EINVAL)
    }

    /// `write(2)` family: returns the number of bytes taken (at most
    /// `data.len()`). Default: `EINVAL`.
    fn write(&self, req: &Request, fh: u64, data: &[u8], offset: Offset) -> Result<u32, Errno> {
        let _ = (req, fh, data, offset);
        Err(Errno::EINVAL)
    }

    /// `ioctl(2)` from a 64-bit caller (32-bit callers are refused with
    /// `ENOTTY` before reaching here). Default: `ENOTTY`.
    fn ioctl(&self, req: &Request, fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        let _ = (req, fh, args);
        Err(Errno::ENOTTY)
    }

    /// Whether ioctl `cmd` is answered at once, needing no state another
    /// call may be holding (an unknown number, a question about the
    /// driver): such a call takes no handler slot and never waits behind
    /// other calls, the caller's own included. Called on the thread that
    /// read the request, before anything else; keep it a table look-up.
    /// Default: no ioctl is quick.
    fn ioctl_is_quick(&self, cmd: u32) -> bool {
        let _ = cmd;
        false
    }

    /// `poll(2)`/`select(2)`/`epoll`: returns the ready events (`POLLIN`
    /// etc. bits; the kernel masks them with `events`). `waiter` is given
    /// when the caller will sleep: keep it and call
    /// [`PollHandle::notify`] when readiness changes. Default:
    /// [`DEFAULT_POLL_MASK`] (always readable and writable), as the kernel
    /// does for a file without poll. (This crate never answers `ENOSYS`:
    /// that would turn poll off for the whole connection.)
    fn poll(
        &self,
        req: &Request,
        fh: u64,
        events: u32,
        waiter: Option<PollHandle>,
    ) -> Result<u32, Errno> {
        let _ = (req, fh, events, waiter);
        Ok(DEFAULT_POLL_MASK)
    }

    /// The last close of an open file. Sent without credentials, so there is
    /// no [`Request`]. Default: nothing.
    fn release(&self, fh: u64) {
        let _ = fh;
    }
}
