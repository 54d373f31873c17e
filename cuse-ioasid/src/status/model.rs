//! What `cuse-ioasid status` reports: the daemon sends it as JSON (the
//! `--json` output), the client renders it as text.
//!
//! The shape is per client process, then per open file, then per object
//! of the file. A front end describes its own files ([`super::Inspect`]):
//! `/dev/ioasid` files hold IOASIDs; a future `/dev/iommu` file its IOASes
//! and HWPTs, with no change here. Memory is accounted per file today
//! ([`OpenFile::memory`]); [`Process::pinned_bytes`] is where a per-process
//! figure goes once the engine keeps one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything a status request reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The daemon itself.
    pub daemon: Daemon,
    /// The client processes, by pid.
    pub processes: Vec<Process>,
    /// Every device the daemon serves, in node order.
    pub devices: Vec<Device>,
    /// Requests, errors, malformed tables.
    pub counters: Counters,
    /// The CUSE server's threads and calls, per node.
    pub cuse: Vec<NodeCalls>,
}

/// The daemon process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Daemon {
    /// Its pid.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// Seconds since it started serving.
    pub uptime_s: u64,
    /// Its own memory.
    pub memory: DaemonMemory,
}

/// The daemon's own memory (see `cuse_ioasid::heap`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonMemory {
    /// Resident bytes, including client pages it maps.
    pub rss_bytes: u64,
    /// Heap bytes its state uses.
    pub heap_in_use_bytes: u64,
    /// Heap bytes freed but kept by the allocator.
    pub heap_free_bytes: u64,
    /// Times freed memory was given back to the system after a release.
    pub give_backs: u64,
}

/// A process's `RLIMIT_MEMLOCK` as the daemon reads it now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// This many bytes.
    Bytes(u64),
    /// No limit (`RLIM_INFINITY`, or the process holds CAP_IPC_LOCK).
    Unlimited,
    /// The process is gone or could not be asked.
    #[default]
    Unknown,
}

/// One client process: the process that opened the files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Process {
    /// Its pid (thread-group id).
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`); empty once it has exited (a
    /// child it forked may still hold its files).
    pub command: String,
    /// Its memory-lock limit, against which its pinned bytes are charged.
    pub memlock_limit: Limit,
    /// Bytes pinned for the process as a whole, when the engine accounts
    /// per process; `None` while it accounts per file (see
    /// [`OpenFile::memory`]).
    pub pinned_bytes: Option<u64>,
    /// Its open files, by node then handle.
    pub files: Vec<OpenFile>,
}

/// One open file of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenFile {
    /// The node (`/dev/ioasid`, `/dev/vfio/devices/dev1`).
    pub node: String,
    /// The node's kind (`ioasid`, `device`; a front end names its own).
    pub kind: String,
    /// The file's handle in the daemon (for `/dev/ioasid`: its context).
    pub handle: u64,
    /// For a device node: the device's PCI address.
    pub device: Option<String>,
    /// A call was running on the file: the figures below are as the
    /// daemon last saw them, `age_ms` ago (none yet if `memory` is absent).
    pub busy: bool,
    /// Age of the figures of a busy file.
    pub age_ms: u64,
    /// Memory pinned for the file, where the front end accounts it.
    pub memory: Option<Memory>,
    /// The file's address spaces (IOASIDs; IOASes and HWPTs).
    pub objects: Vec<Object>,
    /// Devices bound to the file.
    pub devices: Vec<BoundDevice>,
    /// IOMMU groups taken out of service by a failed undo in this file.
    pub groups_out_of_service: usize,
}

/// Memory pinned for one file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Memory {
    /// Bytes charged against the process's RLIMIT_MEMLOCK.
    pub pinned_bytes: u64,
    /// Memory registrations.
    pub registrations: usize,
    /// Bytes registered.
    pub registered_bytes: u64,
}

/// An address space of a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Object {
    /// `IOASID` (a front end names its own: `IOAS`, `HWPT`).
    pub kind: String,
    /// Its number in the file.
    pub id: u32,
    /// The object it nests in.
    pub parent: Option<u32>,
    /// DMA mappings.
    pub mappings: u64,
    /// Bytes they cover.
    pub mapped_bytes: u64,
    /// Devices attached: PCI address, with ` pasid N` for a PASID
    /// attachment.
    pub attached: Vec<String>,
    /// IOMMU groups whose domain holds its mappings now.
    pub groups: Vec<u32>,
    /// What else the front end says of it (a bound page table, a shadow).
    pub notes: Vec<String>,
}

/// A device bound to a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BoundDevice {
    /// Its PCI address.
    pub pci: String,
    /// Its node.
    pub node: String,
    /// Its IOMMU group.
    pub group: u32,
    /// Where it is attached: `IOASID 1`, `IOASID 2 pasid 5`.
    pub attached: Vec<String>,
}

/// A device the daemon serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Device {
    /// Its node.
    pub node: String,
    /// Its PCI address.
    pub pci: String,
    /// Its IOMMU group.
    pub group: u32,
    /// The file it is bound to, if any.
    pub bound_to: Option<FileRef>,
}

/// Names an open file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FileRef {
    /// The process that opened it (`None`: not known to the status
    /// registry, which does not happen for files opened through a node).
    pub pid: Option<u32>,
    /// Its node.
    pub node: String,
    /// Its handle.
    pub handle: u64,
}

/// The daemon's own counters since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Requests per node kind and command (ioctls by their C name; `open`,
    /// `read`, `write`, `poll`, `release`; `unknown ioctl`), with how many
    /// failed.
    pub requests: Vec<Requests>,
    /// Failed requests per errno (`ENOENT`...).
    pub errors: BTreeMap<String, u64>,
    /// Page-table walks and what they met.
    pub walks: Walks,
}

/// One command's requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Requests {
    /// The node kind.
    pub kind: String,
    /// The command.
    pub command: String,
    /// Requests.
    pub calls: u64,
    /// Requests answered with an error.
    pub failed: u64,
}

/// Page-table walks (bound page tables and PASID tables).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Walks {
    /// Walks.
    pub walks: u64,
    /// Walks that met malformed entries: malformed tables.
    pub malformed_tables: u64,
    /// Malformed entries, in all.
    pub malformed_entries: u64,
    /// Walks cut short by their budget.
    pub truncated: u64,
}

/// The CUSE server's threads and calls of one node (`Server::stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeCalls {
    /// The node's name under /dev.
    pub node: String,
    /// Server threads alive.
    pub threads: usize,
    /// Threads started so far.
    pub spawned: u64,
    /// Requests being handled.
    pub running: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    /// Requests refused because their client had too many waiting.
    pub refused: u64,
}
