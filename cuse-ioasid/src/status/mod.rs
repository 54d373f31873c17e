//! `cuse-ioasid status`: a look inside the running daemon.
//!
//! - [`watch`]: every node's device is wrapped in a [`Watched`], which
//!   counts requests per command and errors per errno, and keeps which
//!   process opened which file;
//! - [`collect`]: a request builds a [`Status`] from the engine's snapshot
//!   ([`ioasid_engine::Engine::snapshot`], which never waits for a
//!   client's call), the open files, each front end's description of its
//!   files ([`Inspect`]), the counters and the CUSE server's figures;
//! - [`socket`]: the daemon answers on a Unix socket (root's, or the
//!   `--node-group` group's), one JSON document per connection;
//! - [`model`] is that document; [`render`] its text form.
//!
//! What a request locks (docs/design.md, "Looking inside"): the table of
//! contexts for reading, each context's lock only by `try_lock`, the
//! engine's board of last snapshots, the open-file registry and the CUSE
//! server's node list and pool states, each held only to copy what it
//! holds. None of them is held across a client's call or a system call.

pub mod collect;
pub mod model;
pub mod render;
pub mod socket;
pub mod watch;

pub use collect::{ContextFiles, DeviceFiles, Inspect, Seen, ServedDevice, Sources};
pub use model::Status;
pub use socket::{StatusSocket, DEFAULT_SOCKET};
pub use watch::{Clients, ErrnoCounters, NodeCounters, Watched};

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cuse_server::{Device, Server};
use ioasid_engine::backend::Backend;
use ioasid_engine::Engine;

use model::{Limit, NodeCalls};

/// What the daemon sets up for status requests while it registers its
/// nodes: the open-file registry and the counters every node shares.
pub struct Wiring {
    clients: Arc<Clients>,
    errors: Arc<ErrnoCounters>,
    ioasid: Arc<NodeCounters>,
    device: Arc<NodeCounters>,
    iommufd: Arc<NodeCounters>,
    cdev: Arc<NodeCounters>,
}

impl Default for Wiring {
    fn default() -> Self {
        let errors = Arc::new(ErrnoCounters::default());
        Wiring {
            clients: Arc::default(),
            ioasid: Arc::new(NodeCounters::new(
                "ioasid",
                &crate::ioctl::IOASID_TABLE,
                errors.clone(),
            )),
            device: Arc::new(NodeCounters::new(
                "device",
                &cuse_vfio_devices::ioctl::DEVICE_TABLE,
                errors.clone(),
            )),
            iommufd: Arc::new(NodeCounters::new(
                "iommufd",
                &crate::iommufd::ioctl::IOMMUFD_TABLE,
                errors.clone(),
            )),
            cdev: Arc::new(NodeCounters::new(
                "cdev",
                &cuse_vfio_devices::cdev::CDEV_TABLE,
                errors.clone(),
            )),
            errors,
        }
    }
}

impl Wiring {
    /// The `/dev/ioasid` node `node`'s device, watched.
    pub fn ioasid_node(&self, device: Arc<dyn Device>, node: &str) -> Arc<dyn Device> {
        let files = ContextFiles { kind: "ioasid" };
        self.watch(device, node, Arc::new(files), &self.ioasid)
    }

    /// The `/dev/iommu` node `node`'s device, watched.
    pub fn iommufd_node(&self, device: Arc<dyn Device>, node: &str) -> Arc<dyn Device> {
        let files = ContextFiles { kind: "iommufd" };
        self.watch(device, node, Arc::new(files), &self.iommufd)
    }

    /// The device node `node` (devN) of PCI device `pci`, watched.
    pub fn device_node(&self, device: Arc<dyn Device>, node: &str, pci: &str) -> Arc<dyn Device> {
        let files = DeviceFiles {
            kind: "device",
            pci: pci.to_string(),
        };
        self.watch(device, node, Arc::new(files), &self.device)
    }

    /// The iommufd device cdev `node` (vfioN) of PCI device `pci`, watched.
    pub fn cdev_node(&self, device: Arc<dyn Device>, node: &str, pci: &str) -> Arc<dyn Device> {
        let files = DeviceFiles {
            kind: "cdev",
            pci: pci.to_string(),
        };
        self.watch(device, node, Arc::new(files), &self.cdev)
    }

    fn watch(
        &self,
        device: Arc<dyn Device>,
        node: &str,
        inspect: Arc<dyn Inspect>,
        counters: &Arc<NodeCounters>,
    ) -> Arc<dyn Device> {
        Arc::new(Watched::new(
            device,
            node,
            inspect,
            counters.clone(),
            self.clients.clone(),
        ))
    }

    /// What status requests read, once every node is registered.
    pub fn sources(
        self,
        engine: Arc<Engine>,
        backend: Arc<dyn Backend>,
        devices: Vec<ServedDevice>,
        server: Arc<Server>,
    ) -> Sources {
        Sources {
            engine,
            clients: self.clients,
            counters: vec![self.ioasid, self.iommufd, self.device, self.cdev],
            errors: self.errors,
            devices,
            memlock: Box::new(move |pid| match backend.memlock_limit(pid as i32) {
                Ok(Some(n)) => Limit::Bytes(n),
                Ok(None) => Limit::Unlimited,
                Err(_) => Limit::Unknown,
            }),
            command: Box::new(collect::proc_command),
            cuse: Box::new(move || {
                server
                    .stats()
                    .into_iter()
                    .map(|(node, p)| NodeCalls {
                        node,
                        threads: p.threads,
                        spawned: p.spawned,
                        running: p.running,
                        waiting: p.waiting,
                        refused: p.refused,
                    })
                    .collect()
            }),
            started: Instant::now(),
        }
    }
}

/// `cuse-ioasid status`: ask the daemon on `socket`; its answer as text,
/// or as (pretty) JSON.
pub fn show(socket: &Path, json: bool) -> anyhow::Result<String> {
    let value = socket::request(socket)?;
    if json {
        return Ok(serde_json::to_string_pretty(&value)? + "\n");
    }
    let status: Status = serde_json::from_value(value)?;
    Ok(render::render(&status))
}

#[cfg(test)]
mod tests;
