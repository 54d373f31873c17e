//! `/dev/ioasid` as a CUSE device: one IOASID context per open file.
//!
//! The node is a thin adapter: `open` creates a context in the engine and
//! uses its id as the file handle, `ioctl` hands the request to
//! [`crate::ioctl::dispatch`] with the caller's memory, and `release` (the
//! last close, also when the client died) destroys the context. Everything
//! the context held — mappings, pins, aliases, bindings — goes with it.

use std::sync::Arc;

use cuse_server::{Device, Errno, IoctlArgs, IoctlResult, OpenFlags, Request};
use ioasid_engine::{ClosedContext, ContextId, Engine};

use crate::ioctl::{dispatch, CallerMemory};

/// What to do after a context was closed: the device front end closes the
/// device fds of the devices the engine unbound.
pub type CloseHook = Box<dyn Fn(&ClosedContext) + Send + Sync>;

/// The `/dev/ioasid` node.
pub struct IoasidNode {
    engine: Arc<Engine>,
    on_close: CloseHook,
}

impl IoasidNode {
    /// A node serving `engine`'s contexts; `on_close` runs after each
    /// context is destroyed.
    pub fn new(engine: Arc<Engine>, on_close: CloseHook) -> Self {
        IoasidNode { engine, on_close }
    }
}

/// The caller of a CUSE request as [`CallerMemory`].
struct Caller<'a>(&'a Request);

impl CallerMemory for Caller<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.0.read_mem(addr, buf)
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), Errno> {
        self.0.write_mem(addr, buf)
    }

    /// `fuse_in_header.pid`: the calling thread, blocked in its ioctl for
    /// as long as the request is served.
    fn task(&self) -> i32 {
        // Thread ids fit an int (pid_max is at most 2^22).
        self.0.tid() as i32
    }

    /// `Request::pid` reads `/proc/<tid>/status` once per request.
    fn pid(&self) -> Result<i32, Errno> {
        let req = self.0;
        let pid = req.pid().inspect_err(|_| {
            tracing::debug!(
                tid = req.tid(),
                "caller vanished before its ioctl was served"
            );
        })?;
        i32::try_from(pid).map_err(|_| Errno::ESRCH)
    }
}

impl Device for IoasidNode {
    fn open(&self, req: &Request, _flags: OpenFlags) -> Result<u64, Errno> {
        let ctx = self.engine.open_context();
        tracing::debug!(ctx = ctx.0, tid = req.tid(), "/dev/ioasid opened");
        Ok(ctx.0)
    }

    fn ioctl(&self, req: &Request, fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        let value = dispatch(
            &self.engine,
            ContextId(fh),
            &Caller(req),
            args.cmd,
            args.arg,
        )?;
        Ok(IoctlResult::value(value))
    }

    fn release(&self, fh: u64) {
        match self.engine.close_context(ContextId(fh)) {
            Ok(closed) => {
                for e in &closed.errors {
                    tracing::error!(ctx = fh, "while closing an ioasid context: {e}");
                }
                if !closed.unbound.is_empty() {
                    tracing::info!(
                        ctx = fh,
                        devices = ?closed.unbound,
                        "ioasid fd closed: its devices were detached and unbound"
                    );
                }
                (self.on_close)(&closed);
            }
            Err(e) => tracing::warn!(ctx = fh, "closing ioasid context: {e}"),
        }
    }
}
