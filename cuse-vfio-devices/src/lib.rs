//! The `/dev/vfio/devices/devN` nodes: bind, attach and the device's own
//! VFIO ioctls, served over CUSE.
//!
//! One [`DeviceNode`] per VFIO device the daemon serves implements
//! [`cuse_server::Device`]. It realises the RFC's device-centric VFIO on
//! top of the [`ioasid_engine::Engine`] and the legacy VFIO backend
//! ([`vfio_legacy::VfioLegacy`]).
//!
//! # Wiring (the daemon)
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(engine: Arc<ioasid_engine::Engine>, vfio: Arc<vfio_legacy::VfioLegacy>,
//! #         server: cuse_server::Server, ioasid: cuse_server::NodeInfo,
//! #         closed: ioasid_engine::ClosedContext) {
//! use cuse_vfio_devices::DeviceNodes;
//!
//! let nodes = Arc::new(DeviceNodes::new(engine.clone(), vfio.clone()));
//! // ... register /dev/ioasid (its front end keeps `nodes` for the hook) ...
//! nodes.set_ioasid_device(ioasid.dev).unwrap();
//! for spec in engine.devices() {
//!     let node = nodes.node(spec.id).unwrap();
//!     server
//!         .register(cuse_server::DeviceConfig::new(format!("vfio/devices/dev{}", spec.id.0)), node)
//!         .unwrap();
//! }
//! // In the /dev/ioasid front end, when a context is closed:
//! //     let closed = engine.close_context(ctx)?;
//! nodes.on_context_closed(&closed);
//! # }
//! ```
//!
//! A single node can also be built directly with
//! [`DeviceNode::new`]`(engine, vfio, spec, ioasid_dev)` and registered with
//! `Server::register`; its close hook is [`DeviceNode::forget_stale`].
//!
//! # Protocol
//!
//! - **Unbound**: until `VFIO_BIND_IOASID_FD` succeeds on an open file,
//!   the device's ioctls (and `VFIO_ATTACH_IOASID`/`DETACH`/`UNBIND`) and
//!   region access answer `EINVAL`, as the kernel's VFIO device cdev does
//!   before `VFIO_DEVICE_BIND_IOMMUFD` (`vfio_main.c`: `access_granted`).
//!   Numbers that are no VFIO device command at all answer `ENOTTY`.
//! - **`VFIO_BIND_IOASID_FD(fd)`**: the fd is copied from the caller
//!   (`pidfd_getfd`; not open → `EBADF`), must be a character device with
//!   the `/dev/ioasid` node's device number and answer the daemon-private
//!   `IOASID_DAEMON_IDENTIFY` (else `EINVAL`). Then `Engine::bind` (device
//!   bound elsewhere, group owned by another context → `EBUSY`), the real
//!   device fd is opened and its region table read. The open file that
//!   bound is the only one that may use the device; a second bind from any
//!   open file is `EBUSY`.
//! - **`VFIO_UNBIND_IOASID_FD(fd)`**: the fd must resolve to the bound
//!   context (`EINVAL` otherwise); detaches everything, unbinds, closes the
//!   device fd (the kernel resets the device).
//! - **`VFIO_ATTACH_IOASID`/`VFIO_DETACH_IOASID`**: `struct
//!   vfio_attach_ioasid` under the ABI's extensible-struct rules (argsz
//!   below 16 `EINVAL`, non-zero bytes past it `E2BIG`, unknown flags
//!   `EINVAL`, `user_pasid` non-zero without `IOASID_ATTACH_USER_PASID`
//!   `EINVAL`), then `Engine::attach`/`detach`. PASID attachments are
//!   recorded; legacy VFIO cannot route PASID-tagged DMA.
//! - **Device ioctls** forwarded to the real device fd, the argument read
//!   by its `argsz` (below VFIO's minimum `EINVAL`, above 64 KiB `E2BIG`)
//!   and written back: `GET_INFO`, `GET_REGION_INFO`, `GET_IRQ_INFO`,
//!   `SET_IRQS` (eventfds copied from the caller, -1 kept), `RESET`,
//!   `GET_PCI_HOT_RESET_INFO` (written back on `ENOSPC` too).
//!   `VFIO_DEVICE_PCI_HOT_RESET`: the client holds no group fds in this
//!   model, so it passes `count` 0 (anything else is `EINVAL`); the daemon
//!   asks the device which devices the reset affects, requires every
//!   device of their IOMMU groups to be bound to the caller's ioasid fd
//!   (`EPERM` otherwise: the reset would hit devices it does not own) and
//!   passes its own group fds. Other VFIO commands (`FEATURE`,
//!   `IOEVENTFD`, the GFX ones, container commands) answer `ENOTTY`.
//! - **No mmap** (CUSE cannot): region info never advertises it —
//!   `VFIO_REGION_INFO_FLAG_MMAP` is cleared and the sparse-mmap and
//!   MSI-X-mappable capabilities are unlinked from the chain — so programs
//!   use `pread`/`pwrite`.
//! - **Region access**: `pread`/`pwrite` (and `preadv`/`pwritev`) at the
//!   offsets region info reports. The real offset is recovered by the CUSE
//!   layer ([`cuse_server::Offset`]); pieces of a transfer split by CUSE
//!   already carry their place. A plain `read`/`write` (no position) is
//!   `ESPIPE`; an offset that cannot be recovered is `EINVAL`. The access
//!   must lie inside one region (`EINVAL`) whose READ/WRITE flag allows it
//!   (`EINVAL`), and is then done on the real device fd at the same offset.
//! - **Release**: the last close of the binding open file (or the death of
//!   its process) detaches, unbinds and closes the device fd, so the next
//!   client gets a reset device. When the bound `/dev/ioasid` file is
//!   closed, the engine unbinds the device and
//!   [`DeviceNodes::on_context_closed`] closes the device fd; a node also
//!   notices a vanished context on its next request.
//!
//! Every refusal is logged once through `tracing` with its errno and what
//! to do: at debug level for a client's mistake, at warn level for a
//! failure of the daemon or the device.
//!
//! # Layers
//!
//! - [`ioctl`]: the node's ioctl table ([`ioctl_table`] rows) and thin
//!   handlers; VFIO's structs are read, rewritten and forwarded through
//!   `vfio-legacy`'s typed wrappers ([`vfio_legacy::VfioArg`],
//!   [`vfio_legacy::DeviceFile`]), the only code that touches VFIO.
//! - [`regions`], [`binding`]: pure logic over state, unit-tested.
//! - [`device_file`]: the seams to the system (opening the device, asking
//!   an ioasid fd for its context), with the real implementations.
//! - `node`: [`DeviceNode`] and [`DeviceNodes`].

pub mod binding;
pub mod cdev;
pub mod device_file;
mod error;
pub mod ioctl;
mod node;
pub mod regions;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

pub use cdev::CdevNode;
pub use device_file::{ContextLookup, DeviceOpener, IoasidIdentify};
pub use error::{Error, Result};
pub use ioctl_table::{Caller, MAX_ARG};
pub use node::{DeviceNode, DeviceNodes};
pub use vfio_legacy::DeviceFile;
