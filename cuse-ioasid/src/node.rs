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

use ioctl_table::log::{self, Client};
use ioctl_table::ClientOf;

use crate::ioctl::{dispatch, IOASID_TABLE};

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

impl Device for IoasidNode {
    fn open(&self, req: &Request, _flags: OpenFlags) -> Result<u64, Errno> {
        let client = ClientOf::new(req, Client::RefusedOpen, "open");
        let ctx = self.engine.open_context_for(&client).map_err(|e| {
            log::refusal(Client::RefusedOpen, "ioasid", "open", &e);
            e.errno
        })?;
        tracing::debug!(ctx = ctx.0, tid = req.tid(), "/dev/ioasid opened");
        Ok(ctx.0)
    }

    fn ioctl_is_quick(&self, cmd: u32) -> bool {
        IOASID_TABLE.is_quick(cmd)
    }

    fn ioctl(&self, req: &Request, fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        let value = dispatch(&self.engine, ContextId(fh), req, args.cmd, args.arg)?;
        Ok(IoctlResult::value(value))
    }

    fn release(&self, fh: u64) {
        match self.engine.close_context(ContextId(fh)) {
            Ok(closed) => {
                for e in &closed.errors {
                    tracing::error!(ctx = fh, "while closing an ioasid context: {e}");
                }
                if !closed.unbound.is_empty() {
                    if let Some(dropped) = log::client_line(Client::Context(fh)) {
                        tracing::info!(
                            ctx = fh,
                            devices = ?closed.unbound,
                            "ioasid fd closed: its devices were detached and unbound{dropped}"
                        );
                    }
                }
                (self.on_close)(&closed);
            }
            Err(e) => tracing::warn!(ctx = fh, "closing ioasid context: {e}"),
        }
    }
}
