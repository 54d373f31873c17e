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
//! ```no_run
//! use std::sync::Arc;
//! use cuse_server::{Device, DeviceConfig, IoctlArgs, IoctlResult, Request, Server};
//! use nix::errno::Errno;
//!
//! struct Doubler;
//! impl Device for Doubler {
//!     fn ioctl(&self, req: &Request, _fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
//!         // The argument points at a u64 in the caller: read, double, write back.
//!         let v: u64 = req.read_obj(args.arg)?;
//!         req.write_obj(args.arg, &(v * 2))?;
//!         Ok(IoctlResult::value(0))
//!     }
//! }
//!
//! let server = Server::new()?;
//! let node = server.register(DeviceConfig::new("doubler"), Arc::new(Doubler))?;
//! println!("{} is {}", node.path.display(), node.dev);
//! let stop = server.shutdown_handle(); // give to a signal-waiting thread
//! # stop.stop();
//! server.wait(); // until stop.stop(); then nodes are removed
//! # Ok::<(), cuse_server::Error>(())
//! ```
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
//!   (no hand-over between threads), shutdown.
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
mod sys;
pub mod wire;

#[cfg(test)]
mod tests;

pub use device::{Device, IoctlArgs, IoctlResult, OpenFlags, PollHandle, DEFAULT_POLL_MASK};
pub use nix::errno::Errno;
pub use offset::{Offset, OffsetError};
pub use request::Request;
pub use server::{DeviceConfig, DeviceNumber, NodeInfo, Server, ShutdownHandle, MAX_TRANSFER};
pub use session::{Channel, Session, Work};

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
