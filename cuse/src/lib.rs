//! Serve Linux character devices from user space over CUSE.
//!
//! A process opens `/dev/cuse`, answers the kernel's `CUSE_INIT` request
//! with a device name, and the kernel creates `/dev/<name>`; every
//! `open`/`read`/`write`/`ioctl`/`poll`/`close` on that node then arrives
//! as a FUSE request on the `/dev/cuse` fd and waits for the server's
//! answer. This crate does that protocol (FUSE 7.38) and hands each request
//! to a [`Device`] implementation as a typed, synchronous method call.
//!
//! # Example
//!
//! A whole server: a device whose one ioctl doubles the caller's number in
//! place, served as `/dev/doubler` until SIGTERM or SIGINT. It needs root
//! (or the capabilities to open `/dev/cuse` and reach the callers' memory)
//! and the `cuse` module, so it is compiled here but not run; the test
//! below runs its handler. A client calls `ioctl(fd, DOUBLE, &number)`.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use cuse_server::{Device, DeviceConfig, Errno, IoctlArgs, IoctlResult, Request, Server};
//! use nix::sys::signal::{SigSet, Signal};
//!
//! /// `_IOWR('D', 1, u64)`.
//! const DOUBLE: u32 = nix::request_code_readwrite!(b'D', 1, 8) as u32;
//!
//! struct Doubler;
//!
//! impl Device for Doubler {
//!     fn ioctl(&self, req: &Request, _fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
//!         if args.cmd != DOUBLE {
//!             return Err(Errno::ENOTTY);
//!         }
//!         // `arg` points at a u64 in the caller: read it, write it back doubled.
//!         let n: u64 = req.read_obj(args.arg)?;
//!         req.write_obj(args.arg, &n.checked_mul(2).ok_or(Errno::EOVERFLOW)?)?;
//!         Ok(IoctlResult::value(0))
//!     }
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Block the stop signals before any thread starts (threads inherit
//!     // the mask), so that only the waiting thread below receives them.
//!     let mut stop_signals = SigSet::empty();
//!     stop_signals.add(Signal::SIGTERM);
//!     stop_signals.add(Signal::SIGINT);
//!     stop_signals.thread_block()?;
//!
//!     let server = Server::new()?;
//!     let node = server.register(DeviceConfig::new("doubler"), Arc::new(Doubler))?;
//!     eprintln!("serving {} (device {})", node.path.display(), node.dev);
//!
//!     let stop = server.shutdown_handle();
//!     std::thread::spawn(move || {
//!         let _ = stop_signals.wait();
//!         stop.stop();
//!     });
//!     server.wait(); // returns once stopped; /dev/doubler is gone
//!     Ok(())
//! }
//! ```
//!
//! The handler is a plain method, so it is tested without CUSE or root by
//! calling it as if this thread had made the ioctl ([`Request::for_caller`]):
//!
//! ```
//! # use cuse_server::{Device, Errno, IoctlArgs, IoctlResult, Request};
//! # const DOUBLE: u32 = nix::request_code_readwrite!(b'D', 1, 8) as u32;
//! # struct Doubler;
//! # impl Device for Doubler {
//! #     fn ioctl(&self, req: &Request, _fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
//! #         if args.cmd != DOUBLE {
//! #             return Err(Errno::ENOTTY);
//! #         }
//! #         let n: u64 = req.read_obj(args.arg)?;
//! #         req.write_obj(args.arg, &n.checked_mul(2).ok_or(Errno::EOVERFLOW)?)?;
//! #         Ok(IoctlResult::value(0))
//! #     }
//! # }
//! let me = Request::for_caller(nix::unistd::gettid().as_raw() as u32, 0, 0);
//! let mut number: u64 = 21;
//! let addr = &mut number as *mut u64 as u64; // what the caller passes
//! let args = |cmd| IoctlArgs {
//!     cmd,
//!     arg: addr,
//!     input: &[],
//!     out_size: 0,
//! };
//! assert_eq!(Doubler.ioctl(&me, 0, args(DOUBLE)), Ok(IoctlResult::value(0)));
//! assert_eq!(Doubler.ioctl(&me, 0, args(DOUBLE + 1)), Err(Errno::ENOTTY));
//! assert_eq!(number, 42);
//! ```
//!
//! `examples/scratchpad.rs` in the crate's sources is a device that uses
//! every feature (offsets, poll, interrupts, the caller's fds); the
//! project's VM test drives it against the real kernel.
//!
//! # Layers
//!
//! - **wire** ([`wire`]): the protocol structs as `zerocopy` types with size
//!   checks, the opcodes as an enum, and a bounded [`wire::Cursor`]:
//!   malformed bytes give errors, never panics.
//! - **request/reply** ([`Session`]): parses a message into a typed
//!   operation, calls the [`Device`], encodes the one reply. Every request
//!   read is answered exactly once: handler errors become error replies, a
//!   panicking handler is answered `EIO` (and logged), and an internal reply
//!   object answers `EIO` with a warning if it is ever dropped unanswered.
//!   Replies go through a [`Channel`], so the whole layer is tested with an
//!   in-memory fake.
//! - **session** ([`Server`]): registration through `/dev/cuse`, a growable
//!   set of threads per node, each reading a request and handling it itself
//!   (no hand-over between threads), handler slots budgeted per client
//!   (see "Fairness"), idle threads that go away, shutdown.
//! - **caller access** ([`Request`]): the caller's thread and process id,
//!   uid, gid; its memory (`process_vm_readv`/`writev`); its file
//!   descriptors (`pidfd_getfd`); whether the request was interrupted; and
//!   the real file offset of a read or write ([`Offset`]).
//!
//! All raw system calls live in one small private `sys` module.
//!
//! # CUSE facts the design rests on
//!
//! - Registration: the kernel handles the `CUSE_INIT` reply inside the
//!   server's `write()`. A refused device (name or device number in use)
//!   aborts the connection: `write()` still succeeds, but the fd then polls
//!   as an error and the next `read()` fails with `ENODEV`.
//!   [`Server::register`] checks this right after writing and returns
//!   [`Error::Refused`]; it then reads the device number from
//!   `/sys/class/cuse/<name>/dev` (sysfs writes `/` in names as `!`).
//! - The read buffer must hold `max_write` + `fuse_in_header` +
//!   `fuse_write_in`, or every `read()` fails with `EINVAL`.
//! - This crate always asks for `CUSE_UNRESTRICTED_IOCTL`: an ioctl arrives
//!   with its raw argument and sizes 0, and the handler reads and writes the
//!   caller's struct itself ([`Request::read_obj`]): one round trip through
//!   the kernel per ioctl. (`FUSE_IOCTL_RETRY` is not offered.) Ioctls from
//!   32-bit callers (`FUSE_IOCTL_COMPAT`/`FUSE_IOCTL_32BIT`) are answered
//!   `ENOTTY` before reaching the handler, like a driver without
//!   `compat_ioctl`.
//! - `fuse_in_header.pid` is the calling **thread**. `pidfd_open` needs the
//!   process id on Linux < 6.9, found in `/proc/<tid>/status`.
//! - CUSE sends every READ/WRITE with offset 0 (the request's offset is only
//!   the position within a syscall split into requests of at most 128 KiB);
//!   the real offset is recovered from `/proc/<tid>/syscall` of the blocked
//!   caller (see [`Offset`]).
//! - A request that is read but never answered leaves its caller
//!   unkillable; an INTERRUPT names a request by unique id and needs no
//!   answer (an `EAGAIN` answer makes the kernel requeue it, which this
//!   crate uses for requests it does not know). Handlers must not block
//!   forever and should answer `EINTR` when [`Request::interrupted`].
//! - A handler may leave work to run on its thread right after its reply
//!   is written ([`Request::after_reply`]), and may declare an INTERRUPT it
//!   provokes itself (`PTRACE_INTERRUPT` of the caller) as no cancel
//!   ([`Request::expect_interrupt`]). Together they let a server answer a
//!   request and then have the caller's thread, trapped on its way out of
//!   the system call, issue calls as itself (crate `syscall-inject`).
//! - Answering `ENOSYS` to POLL turns poll off for the whole connection;
//!   the default [`Device::poll`] answers "readable and writable". A
//!   [`PollHandle`] wakes pollers with a `FUSE_NOTIFY_POLL` notification.
//! - Closing the `/dev/cuse` fd removes the node: requests in progress fail
//!   with `ECONNABORTED`, later operations on open files with `ENOTCONN`,
//!   new opens with `ENODEV`. A blocking `read()` on `/dev/cuse` is woken
//!   by nothing but a request, an abort or a signal, so at shutdown the
//!   server signals its idle threads (`SIGRTMIN + 5`, a no-op handler
//!   without `SA_RESTART`); the kernel wakes one blocked reader per request,
//!   so idle threads cost nothing.
//!
//! # Fairness
//!
//! Every caller blocked on a node waits for the server, so one client must
//! not be able to make the others wait. A node's handler slots
//! ([`DeviceConfig::max_workers`], default 32) are shared, and each client
//! *process* (the caller's thread-group id) may hold only
//! [`DeviceConfig::max_workers_per_client`] of them (default 8):
//!
//! - A client over its budget **waits for its own slots**, its calls in the
//!   order they came; nobody else waits for them. It is not answered an
//!   errno: an ioctl or read that fails with `EAGAIN` because the same
//!   process has other calls in flight would be a spurious failure for a
//!   multi-threaded program (QEMU's vCPU and I/O threads, a test issuing
//!   calls from a thread pool), and real programs do not retry it. The
//!   wait is interruptible: a signal to the waiting thread makes the kernel
//!   send an INTERRUPT, and a waiting call is then answered `EINTR` at once,
//!   without running. Only a client with more than 64 calls waiting gets
//!   `EAGAIN` for the extra ones (the server keeps each waiting call's
//!   bytes, up to 128 KiB for a write).
//! - When all shared slots are taken, a client with no call running may
//!   still start one, up to twice `max_workers` in all: a process making
//!   one call at a time never waits for the calls of others. A freed slot
//!   goes to the waiting client with the fewest calls running.
//! - RELEASE (the last close of a file, sent by the kernel with pid 0, so
//!   it is no one's call) never waits for a slot: its caller is in
//!   `close(2)` or `exit`, where the kernel waits for the answer without
//!   letting any signal interrupt it. INTERRUPT is answered by the thread
//!   that reads it. So a client killed while another one hogs the node
//!   still exits at once.
//! - An ioctl the device calls quick ([`Device::ioctl_is_quick`]: an
//!   unknown number, a question about the driver) takes no slot either: it
//!   is answered by the thread that read it, never behind other calls, the
//!   caller's own included.
//! - A caller's process is found in `/proc/<tid>/status` only when it can
//!   matter: while fewer calls run than one client may hold, calls start
//!   without that look-up. A thread that is already gone counts as a client
//!   of its own; callers the server cannot see (the kernel sends pid 0 for
//!   a caller outside the server's pid namespace) share one budget.
//! - Threads: one per running call, plus readers; after a burst, threads
//!   beyond the two an idle node keeps exit once they have waited
//!   [`DeviceConfig::idle_timeout`] (default 2 s) without a request.
//!   [`Server::stats`] shows threads, running and waiting calls per node.
//!
//! What CUSE itself cannot avoid: the kernel waits for a RELEASE
//! uninterruptibly (it is a *forced* request, `FR_FORCE`: in
//! `request_wait_answer` of `fs/fuse/dev.c` only a request still queued
//! can be abandoned on a fatal signal, and a forced one skips even that,
//! on 6.1 as on current kernels). So a client whose server is *stopped*
//! (`SIGSTOP`, a debugger) stays in D state at close, even when
//! SIGKILLed, until the server runs again and answers, or its
//! `/dev/cuse` fd is closed (then the kernel ends its requests itself).
//! A hung handler does the same to its caller's close of that file.
//! `tests/scenarios/test_cuse_fairness.py` shows it.
//!
//! # Testing a `Device`
//!
//! Handlers are plain methods: call them directly with
//! [`Request::for_caller`] naming your own thread, and the memory and fd
//! helpers act on the test process itself. To test the protocol level,
//! drive a [`Session`] with request bytes and an in-memory [`Channel`].
//!
//! # Logging
//!
//! Through `tracing`: a bad request from a client is logged at `debug`, a
//! server-side failure (handler panic, oversized answer, failed write to
//! `/dev/cuse`) at `warn`/`error`.

#![deny(missing_docs)]

mod device;
mod offset;
mod request;
mod server;
mod session;
mod slots;
mod sys;
pub mod wire;
mod workers;

#[cfg(test)]
mod tests;

pub use device::{Device, IoctlArgs, IoctlResult, OpenFlags, PollHandle, DEFAULT_POLL_MASK};
pub use nix::errno::Errno;
pub use offset::{Offset, OffsetError};
pub use request::Request;
pub use server::{DeviceConfig, DeviceNumber, NodeInfo, Server, ShutdownHandle, MAX_TRANSFER};
pub use session::{Channel, Session, Work};
pub use workers::PoolStats;

use std::path::PathBuf;

/// Errors of registration and serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/cuse` could not be opened (module not loaded: `ENOENT`;
    /// not root: `EACCES`).
    #[error("cannot open {path}: {errno}")]
    Open {
        /// The path tried.
        path: PathBuf,
        /// Why.
        errno: Errno,
    },
    /// A system call failed.
    #[error("{what}: {errno}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The kernel said something this crate does not understand.
    #[error("CUSE protocol error: {0}")]
    Protocol(String),
    /// The device name cannot be used.
    #[error("invalid device name {0:?}")]
    InvalidName(String),
    /// The kernel refused the device: its name (or the requested device
    /// number) is already in use.
    #[error("the kernel refused CUSE device {name:?}: name or device number already in use")]
    Refused {
        /// The name asked for.
        name: String,
    },
    /// The kernel accepted the device but it did not show up in sysfs or
    /// `/dev`.
    #[error("CUSE device {name:?} accepted but not found in /sys/class/cuse or /dev")]
    NotCreated {
        /// The name asked for.
        name: String,
    },
    /// The server is stopping or stopped.
    #[error("the server is stopped")]
    Stopped,
}
