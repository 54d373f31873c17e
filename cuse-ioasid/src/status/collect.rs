//! Building a [`Status`] from what the daemon holds: the engine's
//! snapshot, the watched nodes' open files and counters, the CUSE
//! server's figures and, from `/proc`, each client's command name and
//! memory-lock limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use ioasid_engine::{ContextId, ContextSnapshot, ContextView, DeviceId, Engine};

use super::model::*;
use super::watch::{Clients, ErrnoCounters, NodeCounters};

/// A device the daemon serves, as the status names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedDevice {
    /// Its engine id.
    pub id: DeviceId,
    /// Its PCI address.
    pub pci: String,
    /// Its node (`/dev/vfio/devices/dev1`).
    pub node: String,
    /// Its IOMMU group.
    pub group: u32,
}

/// What one status request gathered before asking the front ends.
pub struct Seen<'a> {
    /// The engine's contexts (one [`Engine::snapshot`] per request).
    pub contexts: &'a HashMap<ContextId, ContextView>,
    /// The devices served.
    pub devices: &'a [ServedDevice],
}

/// A front end's part of the status: it describes its own open files.
///
/// `/dev/ioasid` and `/dev/iommu` ([`ContextFiles`]) turn a file's
/// context into IOASIDs (an iommufd IOAS is one) and bound devices; a
/// device node of either dialect ([`DeviceFiles`]) names its device.
pub trait Inspect: Send + Sync {
    /// The node's kind (`ioasid`, `iommufd`, `device`, `cdev`).
    fn kind(&self) -> &'static str;

    /// Fill in what open file `fh` holds (its node, kind and handle are
    /// filled in already).
    fn describe(&self, fh: u64, seen: &Seen<'_>, file: &mut OpenFile);
}

/// `/dev/ioasid` or `/dev/iommu`: a file is an engine context.
pub struct ContextFiles {
    /// The node's kind (`ioasid`, `iommufd`).
    pub kind: &'static str,
}

impl Inspect for ContextFiles {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn describe(&self, fh: u64, seen: &Seen<'_>, file: &mut OpenFile) {
        // Not in the snapshot: closed after the snapshot was taken.
        let Some(view) = seen.contexts.get(&ContextId(fh)) else {
            return;
        };
        file.busy = view.busy;
        file.age_ms = view.age.as_millis() as u64;
        if let Some(s) = &view.snapshot {
            describe_context(s, seen.devices, file);
        }
    }
}

/// A context's IOASIDs, memory and devices, as `/dev/ioasid` shows them.
pub fn describe_context(s: &ContextSnapshot, devices: &[ServedDevice], file: &mut OpenFile) {
    file.memory = Some(Memory {
        pinned_bytes: s.pinned_bytes,
        registrations: s.registrations,
        registered_bytes: s.registered_bytes,
    });
    let node_of = |id: DeviceId| {
        devices
            .iter()
            .find(|d| d.id == id)
            .map_or_else(String::new, |d| d.node.clone())
    };
    file.objects = s
        .ioasids
        .iter()
        .map(|io| {
            let mut attached = Vec::new();
            for d in &s.devices {
                if d.rid == Some(io.id) || d.child == Some(io.id) {
                    attached.push(d.name.clone());
                }
                for &(pasid, _) in d.pasids.iter().filter(|(_, i)| *i == io.id) {
                    attached.push(format!("{} pasid {pasid}", d.name));
                }
            }
            let mut notes = Vec::new();
            if !io.attached_once {
                notes.push("no device attached yet: map refused".to_string());
            }
            if io.parent.is_some() {
                notes.push(format!("shadow of {} entries", io.shadow_entries));
            }
            if let Some(t) = &io.pgtable {
                notes.push(format!(
                    "page table at {:#x}: {} leaves, {} walks, {} malformed entries",
                    t.root, t.leaves, t.walks, t.malformed
                ));
            }
            if let Some(t) = &io.pasid_table {
                notes.push(format!(
                    "PASID table at {:#x}: {} entries, {} valid, {} bad, {} unreadable, {} malformed page-table entries",
                    t.table, t.entries, t.valid, t.bad_entries, t.unreadable_entries, t.malformed
                ));
            }
            Object {
                kind: "IOASID".into(),
                id: io.id,
                parent: io.parent,
                mappings: io.mappings as u64,
                mapped_bytes: io.mapped_bytes,
                attached,
                groups: io.realised_in.clone(),
                notes,
            }
        })
        .collect();
    file.devices = s
        .devices
        .iter()
        .map(|d| {
            let mut attached = Vec::new();
            attached.extend(d.rid.map(|i| format!("IOASID {i}")));
            attached.extend(d.child.map(|i| format!("IOASID {i}")));
            attached.extend(
                d.pasids
                    .iter()
                    .map(|(pasid, i)| format!("IOASID {i} pasid {pasid}")),
            );
            BoundDevice {
                pci: d.name.clone(),
                node: node_of(d.device),
                group: d.group,
                attached,
            }
        })
        .collect();
    file.groups_out_of_service = s.groups_out_of_service;
}

/// A device node: a file names its device.
pub struct DeviceFiles {
    /// The node's kind (`device` for devN, `cdev` for vfioN).
    pub kind: &'static str,
    /// The node's device.
    pub pci: String,
}

impl Inspect for DeviceFiles {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn describe(&self, _fh: u64, _seen: &Seen<'_>, file: &mut OpenFile) {
        file.device = Some(self.pci.clone());
    }
}

/// Everything a status request reads.
pub struct Sources {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The watched nodes' open files.
    pub clients: Arc<Clients>,
    /// Requests per node kind.
    pub counters: Vec<Arc<NodeCounters>>,
    /// Errors per errno.
    pub errors: Arc<ErrnoCounters>,
    /// The devices served, in node order.
    pub devices: Vec<ServedDevice>,
    /// A process's memory-lock limit.
    pub memlock: Box<dyn Fn(u32) -> Limit + Send + Sync>,
    /// A process's command name (empty if it is gone).
    pub command: Box<dyn Fn(u32) -> String + Send + Sync>,
    /// The CUSE server's figures.
    pub cuse: Box<dyn Fn() -> Vec<NodeCalls> + Send + Sync>,
    /// When the daemon started serving.
    pub started: Instant,
}

impl Sources {
    /// The status now.
    pub fn status(&self) -> Status {
        let contexts: HashMap<ContextId, ContextView> = self
            .engine
            .snapshot()
            .into_iter()
            .map(|v| (v.id, v))
            .collect();
        let seen = Seen {
            contexts: &contexts,
            devices: &self.devices,
        };
        let mut by_pid: BTreeMap<u32, Vec<OpenFile>> = BTreeMap::new();
        let mut owner_of: HashMap<String, FileRef> = HashMap::new();
        for opened in self.clients.list() {
            let mut file = OpenFile {
                node: opened.node.to_string(),
                kind: opened.inspect.kind().to_string(),
                handle: opened.fh,
                ..OpenFile::default()
            };
            opened.inspect.describe(opened.fh, &seen, &mut file);
            for d in &file.devices {
                owner_of.insert(
                    d.pci.clone(),
                    FileRef {
                        pid: opened.pid,
                        node: file.node.clone(),
                        handle: file.handle,
                    },
                );
            }
            // A file whose opener could not be looked up counts as pid 0.
            by_pid
                .entry(opened.pid.unwrap_or(0))
                .or_default()
                .push(file);
        }
        let processes = by_pid
            .into_iter()
            .map(|(pid, files)| Process {
                pid,
                command: (self.command)(pid),
                memlock_limit: (self.memlock)(pid),
                pinned_bytes: None,
                files,
            })
            .collect();
        let devices = self
            .devices
            .iter()
            .map(|d| Device {
                node: d.node.clone(),
                pci: d.pci.clone(),
                group: d.group,
                bound_to: owner_of.get(&d.pci).cloned(),
            })
            .collect();
        let walks = self.engine.counters();
        Status {
            daemon: Daemon {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_s: self.started.elapsed().as_secs(),
                memory: daemon_memory(),
            },
            processes,
            devices,
            counters: Counters {
                requests: self.counters.iter().flat_map(|c| c.requests()).collect(),
                errors: self.errors.by_name(),
                walks: Walks {
                    walks: walks.walks,
                    malformed_tables: walks.malformed_walks,
                    malformed_entries: walks.malformed_entries,
                    truncated: walks.truncated_walks,
                },
            },
            cuse: (self.cuse)(),
        }
    }
}

/// `/proc/PID/comm`, or empty.
pub fn proc_command(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

/// The daemon's own memory now.
fn daemon_memory() -> DaemonMemory {
    let f = crate::heap::figures();
    DaemonMemory {
        rss_bytes: f.rss_bytes,
        heap_in_use_bytes: f.heap_in_use_bytes,
        heap_free_bytes: f.heap_free_bytes,
        give_backs: f.give_backs,
    }
}
