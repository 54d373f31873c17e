//! `/dev/iommu`: the kernel's iommufd uAPI (Linux 7.1's
//! `<linux/iommufd.h>`), served on the same engine as `/dev/ioasid`. One
//! engine context per open file; its objects (IOAS, HWPT, bound devices)
//! are the engine's (`ioasid-engine`, `engine/ioas.rs` and `hwpt.rs`).
//!
//! The node is a thin adapter, like [`crate::node::IoasidNode`]: `open`
//! creates a context, `ioctl` runs a row of [`ioctl::IOMMUFD_TABLE`], and
//! `release` (the last close) destroys the context. A bound device file
//! keeps a copy of the client's `/dev/iommu` file until it is unbound, so,
//! as in the kernel, closing `/dev/iommu` with devices bound changes
//! nothing: the release comes once the last device file is closed.
//! docs/iommufd-semantics.md has every rule with its kernel source.

pub mod ioctl;

use std::collections::BTreeSet;
use std::sync::Arc;

use cuse_server::{Device, Errno, IoctlArgs, IoctlResult, OpenFlags, Request};
use ioasid_engine::{ContextId, DeviceId, Engine};

use ioctl_table::log::{self, Client};
use ioctl_table::ClientOf;

use crate::node::CloseHook;

/// The `/dev/iommu` node.
pub struct IommufdNode {
    pub(crate) engine: Arc<Engine>,
    /// The devices with PCI ATS (`IOMMU_GET_HW_INFO` reports the others
    /// as `IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED`).
    pub(crate) ats: BTreeSet<DeviceId>,
    on_close: CloseHook,
}

impl IommufdNode {
    /// A node serving `engine`'s contexts; `ats` names the devices that
    /// have the PCI ATS capability; `on_close` runs after each context is
    /// destroyed.
    pub fn new(engine: Arc<Engine>, ats: BTreeSet<DeviceId>, on_close: CloseHook) -> Self {
        IommufdNode {
            engine,
            ats,
            on_close,
        }
    }
}

impl Device for IommufdNode {
    fn open(&self, req: &Request, _flags: OpenFlags) -> Result<u64, Errno> {
        // Charged to the caller's process, as an open of /dev/ioasid.
        let client = ClientOf::new(req, Client::RefusedOpen, "open");
        let ctx = self.engine.open_context_for(&client).map_err(|e| {
            log::refusal(Client::RefusedOpen, "iommu", "open", &e);
            e.errno
        })?;
        tracing::debug!(ctx = ctx.0, tid = req.tid(), "/dev/iommu opened");
        Ok(ctx.0)
    }

    fn ioctl_is_quick(&self, cmd: u32) -> bool {
        ioctl::IOMMUFD_TABLE.is_quick(cmd)
    }

    fn ioctl(&self, req: &Request, fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        let value = ioctl::dispatch(self, ContextId(fh), req, args.cmd, args.arg)?;
        Ok(IoctlResult::value(value))
    }

    fn release(&self, fh: u64) {
        match self.engine.close_context(ContextId(fh)) {
            Ok(closed) => {
                for e in &closed.errors {
                    tracing::error!(ctx = fh, "while closing an iommufd context: {e}");
                }
                (self.on_close)(&closed);
            }
            Err(e) => tracing::warn!(ctx = fh, "closing iommufd context: {e}"),
        }
    }
}
