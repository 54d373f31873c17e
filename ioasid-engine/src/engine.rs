//! Contexts, IOASIDs, mappings, registrations and devices.
//!
//! # Model
//!
//! A *context* is one open of `/dev/ioasid`. It owns its IOASIDs, its
//! memory registrations and the devices bound to it. An IOASID is a
//! software object: its mappings live in [`Ioasid::mappings`] and are
//! *realised* in the domain of every IOMMU group that has a device attached
//! to the IOASID by RID. The first such device of a group replays the
//! mappings into the group's domain; the last one to detach empties it.
//!
//! # Nesting (software)
//!
//! A *child* IOASID ([`Engine::create_nesting`]) translates into its
//! parent's IOVA space. Its translations come from its own mappings (the
//! DMA mapping protocol, "vaddr" being a parent IOVA), from a bound page
//! table ([`Engine::bind_pgtable`], walked in software) or from nothing
//! (a bound PASID table, which is tracked but routes no RID DMA). The
//! engine keeps the child's *shadow*: each translation composed with the
//! parent's mappings as they are now, one piece per (translation, parent
//! alias segment) overlap, with the intersection of both permissions;
//! pieces the parent does not map are left out (DMA there is blocked). The
//! shadow is what the domain of every group realising the child holds, and
//! every change at either level is applied to those domains as a diff.
//!
//! A group realises the child as soon as one of its devices is attached to
//! the child by RID (such a device stays attached to the parent by RID):
//! its domain then holds the child's shadow instead of the parent's
//! mappings, and gets the parent's back when its last device leaves the
//! child.
//!
//! A bound page table is read at bind and at each invalidation only (an
//! IOTLB): the engine caches its leaves (input → parent IOVA), so a table
//! entry changed without an invalidation is not seen, while a parent map or
//! unmap recomposes the shadow from the cached leaves at once.
//!
//! # Locking
//!
//! - `contexts` (a `RwLock` over the table of contexts) is held only to
//!   look a context up, insert or remove one; it is released before any
//!   other lock is taken.
//! - Each context has its own `Mutex`. Every operation on a context's
//!   IOASIDs, registrations and devices, including the backend calls they
//!   make, runs under it, so contexts never wait for each other.
//! - `registry` (which device is bound to which context, which groups are
//!   out of service) is taken *after* a context lock, never before, and
//!   never while holding two context locks. Lock order: context → registry.
//!
//! Group ownership (all bound devices of a group belong to one context)
//! means a group's domain and its devices' attachments are only ever
//! touched under the lock of the context that owns the group.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use nix::errno::Errno::{EBUSY, EEXIST, EFAULT, EINVAL, ENODEV, ENOENT, ENOMEM, ENOSPC};
use slab::Slab;

use crate::backend::{Alias, Backend, DomainInfo, GroupId, Pid, Prot, Segment};
use crate::error::{err, Error};
use crate::pgtable::{self, Leaf, PasidEntry, WalkStats};

/// Width of a PCIe PASID.
pub const PASID_BITS: u32 = 20;

/// `IOASID_PGTABLE_X86_64_4LVL`: the one page-table format
/// [`Engine::bind_pgtable`] accepts.
pub const PGTABLE_X86_64_4LVL: u32 = 1;

/// `IOASID_PASID_TABLE_FLAT_X86_64`: the one PASID-table format
/// [`Engine::bind_pasid_table`] accepts.
pub const PASID_TABLE_FLAT_X86_64: u32 = 1;

/// Most entries of a flat PASID table.
pub const PASID_TABLE_MAX_ENTRIES: u32 = 1 << PASID_BITS;

/// An fd-local IOASID number. The first one allocated is 1; freed numbers
/// may be reused.
pub type IoasidId = u32;

/// A stable number for a device the daemon serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

/// One open of `/dev/ioasid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextId(pub u64);

/// A device the daemon serves, given at construction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its stable id.
    pub id: DeviceId,
    /// Its name, the PCI address (BDF) such as `0000:00:03.0`.
    pub name: String,
    /// Its IOMMU group.
    pub group: GroupId,
}

/// One map request, VFIO type1 style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// First I/O virtual address.
    pub iova: u64,
    /// Address of the memory in the calling process.
    pub vaddr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Access granted to the devices.
    pub prot: Prot,
}

/// One attachment of a device to an IOASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    /// The device.
    pub device: DeviceId,
    /// `None` for the RID attachment, `Some(pasid)` for a PASID one.
    pub pasid: Option<u32>,
}

/// A page table bound to a child IOASID, as last walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PgtableStatus {
    /// The root table (a parent IOVA).
    pub root: u64,
    /// Leaves cached now (what the shadow is made from).
    pub leaves: u64,
    /// The last walk (at bind or at an invalidation; a range
    /// invalidation walks only the range).
    pub last_walk: WalkStats,
    /// Malformed entries met by every walk since the bind.
    pub malformed: u64,
    /// Walks since the bind.
    pub walks: u64,
}

/// A PASID table bound to a child IOASID, as last read. PASID DMA is not
/// routed: these tables are read and walked, not realised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PasidTableStatus {
    /// The table (a parent IOVA).
    pub table: u64,
    /// Its number of entries.
    pub entries: u32,
    /// PASIDs whose entry is present and well formed.
    pub valid: u32,
    /// Entries with bits set besides present and the address: treated as
    /// not present.
    pub bad_entries: u32,
    /// Entries that could not be read (the parent no longer maps them).
    pub unreadable_entries: u32,
    /// Leaves of the valid PASIDs' page tables.
    pub leaves: u64,
    /// Malformed page-table entries met by the last walk of each PASID's
    /// table.
    pub malformed: u64,
    /// Some PASID's last walk ran out of budget.
    pub truncated: bool,
}

/// What an invalidation covers ([`Engine::invalidate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Invalidation {
    /// `Some((addr, size))`: only this input range; `None`: everything.
    pub range: Option<(u64, u64)>,
    /// On a PASID-table IOASID: only this PASID (else every PASID).
    pub pasid: Option<u32>,
    /// On a PASID-table IOASID: re-read the table entries first.
    pub pasid_cache: bool,
}

/// What `IOASID_GET_INFO` reports, before encoding.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct IoasidInfo {
    /// A device has been attached at least once: the IOASID accepts map
    /// and unmap, and the fields below are meaningful.
    pub attached: bool,
    /// Supported page sizes: the AND over the realising domains, or the
    /// last known value when no group realises the IOASID now.
    pub pgsize_bitmap: u64,
    /// Permitted IOVA ranges, inclusive, ascending: the intersection over
    /// the realising domains, or the last known value.
    pub iova_ranges: Vec<(u64, u64)>,
    /// Number of mappings.
    pub mappings: usize,
    /// Bytes mapped.
    pub mapped_bytes: u64,
    /// Devices attached now, by device then PASID (RID first).
    pub devices: Vec<Attachment>,
    /// How many more mappings fit: the minimum over the realising domains,
    /// when they say (the last known value when no group realises it).
    pub dma_avail: Option<u32>,
    /// The parent, for a child IOASID.
    pub parent: Option<IoasidId>,
    /// The children, for a parent.
    pub children: Vec<IoasidId>,
    /// Levels of children that may still be created below this IOASID:
    /// 1 for a root that has had a device attached, else 0.
    pub nesting_levels: u32,
    /// Entries of a child's shadow (what each realising domain holds).
    pub shadow_entries: usize,
    /// The bound page table, if any.
    pub pgtable: Option<PgtableStatus>,
    /// The bound PASID table, if any.
    pub pasid_table: Option<PasidTableStatus>,
}

/// What closing a context did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClosedContext {
    /// The devices that were bound to it and now are not: the device front
    /// end closes their device fds.
    pub unbound: Vec<DeviceId>,
    /// Backend failures met on the way. A group whose domain could not be
    /// emptied is taken out of service (its devices cannot be bound again).
    pub errors: Vec<Error>,
}

/// Where a mapping's memory comes from.
#[derive(Debug)]
enum Memory {
    /// An alias of its own, released when the mapping goes.
    Own(Alias),
    /// A slice of the registration starting at this client address.
    Registered(u64),
    /// None: a child's mapping, whose `vaddr` is a parent IOVA.
    Nested,
}

#[derive(Debug)]
struct Mapping {
    vaddr: u64,
    size: u64,
    prot: Prot,
    memory: Memory,
}

/// One entry of a child's shadow, keyed by its IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ShadowEntry {
    daemon_vaddr: u64,
    size: u64,
    prot: Prot,
}

type Shadow = BTreeMap<u64, ShadowEntry>;

/// One mapping of a parent as a child's shadow sees it.
struct ParentPiece {
    size: u64,
    prot: Prot,
    segs: Vec<Segment>,
}

/// A parent's mappings, by IOVA.
type ParentView = BTreeMap<u64, ParentPiece>;

#[derive(Debug)]
struct BoundPgtable {
    root: u64,
    /// By input address; never overlapping.
    leaves: BTreeMap<u64, Leaf>,
    last_walk: WalkStats,
    malformed: u64,
    walks: u64,
}

/// What the engine knows of one PASID-table entry that is not plainly
/// non-present.
#[derive(Debug)]
enum PasidState {
    Walked {
        leaves: BTreeMap<u64, Leaf>,
        root: u64,
        stats: WalkStats,
    },
    Bad,
    Unreadable,
}

#[derive(Debug)]
struct BoundPasidTable {
    table: u64,
    entries: u32,
    pasids: BTreeMap<u32, PasidState>,
}

/// An I/O address space.
#[derive(Debug, Default)]
struct Ioasid {
    /// By IOVA; never overlapping. A child's have [`Memory::Nested`].
    mappings: BTreeMap<u64, Mapping>,
    /// Domain constraints, `Some` once a device has been attached.
    known: Option<DomainInfo>,
    /// Set for a child.
    parent: Option<IoasidId>,
    /// A child's bound page table.
    pgtable: Option<BoundPgtable>,
    /// A child's bound PASID table.
    pasid_table: Option<BoundPasidTable>,
    /// A child's shadow: what every group realising it holds.
    shadow: Shadow,
}

impl Ioasid {
    /// What already translates for this child, if anything: a child uses
    /// one protocol at a time (DMA mappings, a page table or a PASID
    /// table), so binding a table needs none of them in use.
    fn protocol_in_use(&self) -> Option<&'static str> {
        if self.pgtable.is_some() {
            Some("a page table is bound; unbind it first")
        } else if self.pasid_table.is_some() {
            Some("a PASID table is bound; unbind it first")
        } else if !self.mappings.is_empty() {
            Some("it has DMA mappings; unmap them first")
        } else {
            None
        }
    }
}

#[derive(Debug)]
struct Registration {
    size: u64,
    alias: Alias,
    /// Mappings using it.
    users: usize,
}

#[derive(Debug, Default)]
struct BoundDevice {
    /// RID attachment to a root IOASID.
    rid: Option<IoasidId>,
    /// RID attachment to a child of `rid`.
    child: Option<IoasidId>,
    pasids: BTreeMap<u32, IoasidId>,
}

/// A group whose domain holds an IOASID's mappings (a root's mappings, or
/// a child's shadow).
#[derive(Debug)]
struct Realising {
    ioasid: IoasidId,
    info: DomainInfo,
}

#[derive(Debug, Default)]
struct Context {
    /// Set by `close_context`; every later operation fails.
    closed: bool,
    /// Slab key `k` is IOASID `k + 1`.
    ioasids: Slab<Ioasid>,
    bound: BTreeMap<DeviceId, BoundDevice>,
    /// By client start address; never overlapping.
    registrations: BTreeMap<u64, Registration>,
    realising: BTreeMap<GroupId, Realising>,
    /// Bytes of registrations.
    registered_bytes: u64,
    /// Bytes of mappings holding their own alias.
    own_bytes: u64,
}

#[derive(Debug, Default)]
struct Registry {
    bound: HashMap<DeviceId, ContextId>,
    /// Groups whose domain could not be emptied on close.
    out_of_service: HashSet<GroupId>,
}

/// The IOASID engine. Share it as `Arc<Engine>`; every method takes `&self`.
pub struct Engine {
    backend: Arc<dyn Backend>,
    devices: BTreeMap<DeviceId, DeviceSpec>,
    contexts: RwLock<HashMap<ContextId, Arc<Mutex<Context>>>>,
    next_context: AtomicU64,
    registry: Mutex<Registry>,
    /// Budget of one table walk (see [`pgtable::walk`]).
    walk_limit: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The smallest page size of a bitmap, never below 4 KiB.
fn min_pgsize(bitmap: u64) -> u64 {
    if bitmap == 0 {
        4096
    } else {
        (1u64 << bitmap.trailing_zeros()).max(4096)
    }
}

fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s1, l1) in a {
        for &(s2, l2) in b {
            let (s, l) = (s1.max(s2), l1.min(l2));
            if s <= l {
                out.push((s, l));
            }
        }
    }
    out.sort_unstable();
    out
}

fn combine<'a>(mut infos: impl Iterator<Item = &'a DomainInfo>) -> Option<DomainInfo> {
    let first = infos.next()?.clone();
    Some(infos.fold(first, |acc, i| DomainInfo {
        pgsize_bitmap: acc.pgsize_bitmap & i.pgsize_bitmap,
        iova_ranges: intersect(&acc.iova_ranges, &i.iova_ranges),
        dma_avail: match (acc.dma_avail, i.dma_avail) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    }))
}

/// The segments, relative to the mapping's start, of `[off, off + size)`
/// of an alias.
fn slice_segments(segments: &[Segment], off: u64, size: u64) -> Vec<Segment> {
    let end = off + size;
    segments
        .iter()
        .filter_map(|s| {
            let start = s.offset.max(off);
            let stop = (s.offset + s.len).min(end);
            (start < stop).then(|| Segment {
                offset: start - off,
                daemon_vaddr: s.daemon_vaddr + (start - s.offset),
                len: stop - start,
            })
        })
        .collect()
}

fn ioasid_key(id: IoasidId) -> Option<usize> {
    (id as usize).checked_sub(1)
}

impl Context {
    fn check_open(&self, ctx: ContextId) -> Result<(), Error> {
        if self.closed {
            return Err(not_open(ctx));
        }
        Ok(())
    }

    fn ioasid(&self, id: IoasidId) -> Result<&Ioasid, Error> {
        ioasid_key(id)
            .and_then(|k| self.ioasids.get(k))
            .ok_or_else(|| {
                err(
                    ENOENT,
                    format!("IOASID {id} does not exist in this ioasid fd"),
                )
            })
    }

    fn ioasid_mut(&mut self, id: IoasidId) -> Result<&mut Ioasid, Error> {
        ioasid_key(id)
            .and_then(|k| self.ioasids.get_mut(k))
            .ok_or_else(|| {
                err(
                    ENOENT,
                    format!("IOASID {id} does not exist in this ioasid fd"),
                )
            })
    }

    fn groups_of(&self, id: IoasidId) -> Vec<GroupId> {
        self.realising
            .iter()
            .filter(|(_, r)| r.ioasid == id)
            .map(|(g, _)| *g)
            .collect()
    }

    /// The pieces of client memory behind mapping `m` (borrowed from its
    /// alias when it has one of its own).
    fn segments<'a>(&'a self, m: &'a Mapping) -> Cow<'a, [Segment]> {
        match &m.memory {
            Memory::Own(alias) => Cow::Borrowed(&alias.segments),
            Memory::Nested => Cow::Borrowed(&[]),
            Memory::Registered(start) => {
                let reg = &self.registrations[start];
                Cow::Owned(slice_segments(&reg.alias.segments, m.vaddr - start, m.size))
            }
        }
    }

    fn pinned(&self) -> u64 {
        self.registered_bytes + self.own_bytes
    }

    fn parent_of(&self, id: IoasidId) -> Option<IoasidId> {
        self.ioasid(id).ok().and_then(|io| io.parent)
    }

    fn has_children(&self, id: IoasidId) -> bool {
        self.ioasids.iter().any(|(_, io)| io.parent == Some(id))
    }

    fn children_of(&self, id: IoasidId) -> Vec<IoasidId> {
        self.ioasids
            .iter()
            .filter(|(_, io)| io.parent == Some(id))
            .map(|(k, _)| k as IoasidId + 1)
            .collect()
    }

    /// The groups whose devices are RID-attached to root `id`: those
    /// realising it and those realising one of its children.
    fn member_groups(&self, id: IoasidId) -> Vec<GroupId> {
        self.realising
            .iter()
            .filter(|(_, r)| r.ioasid == id || self.parent_of(r.ioasid) == Some(id))
            .map(|(g, _)| *g)
            .collect()
    }
}

impl Engine {
    /// An engine serving `devices` over `backend`. Fails with `EINVAL` when
    /// two devices share an id.
    pub fn new(backend: Arc<dyn Backend>, devices: Vec<DeviceSpec>) -> Result<Self, Error> {
        let mut table = BTreeMap::new();
        for d in devices {
            if let Some(old) = table.insert(d.id, d) {
                return Err(err(
                    EINVAL,
                    format!("device id {} given twice ({})", old.id.0, old.name),
                ));
            }
        }
        Ok(Engine {
            backend,
            devices: table,
            contexts: RwLock::new(HashMap::new()),
            next_context: AtomicU64::new(1),
            registry: Mutex::new(Registry::default()),
            walk_limit: AtomicU64::new(pgtable::DEFAULT_WALK_LIMIT),
        })
    }

    /// The devices served, by id.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceSpec> {
        self.devices.values()
    }

    /// The device with id `id`.
    pub fn device(&self, id: DeviceId) -> Option<&DeviceSpec> {
        self.devices.get(&id)
    }

    /// The context device `dev` is bound to, if any.
    pub fn bound_context(&self, dev: DeviceId) -> Option<ContextId> {
        lock(&self.registry).bound.get(&dev).copied()
    }

    fn context(&self, ctx: ContextId) -> Result<Arc<Mutex<Context>>, Error> {
        self.contexts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ctx)
            .cloned()
            .ok_or_else(|| not_open(ctx))
    }

    fn name(&self, dev: DeviceId) -> &str {
        self.devices.get(&dev).map_or("?", |d| d.name.as_str())
    }

    fn spec(&self, dev: DeviceId) -> Result<&DeviceSpec, Error> {
        self.devices
            .get(&dev)
            .ok_or_else(|| err(EINVAL, format!("no device with id {}", dev.0)))
    }

    /// Open a new context (one open of `/dev/ioasid`).
    pub fn open_context(&self) -> ContextId {
        let id = ContextId(self.next_context.fetch_add(1, Ordering::Relaxed));
        self.contexts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::new(Mutex::new(Context::default())));
        id
    }

    /// Destroy context `ctx` and everything in it: detach and unbind its
    /// devices (emptying their groups' domains), free its IOASIDs and
    /// release every alias. `EINVAL` if `ctx` is not open.
    pub fn close_context(&self, ctx: ContextId) -> Result<ClosedContext, Error> {
        let arc = self
            .contexts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ctx)
            .ok_or_else(|| not_open(ctx))?;
        let mut c = lock(&arc);
        // Operations that looked the context up before it left the table
        // find it closed once they get the lock.
        c.closed = true;
        let mut closed = ClosedContext::default();
        for (group, _) in std::mem::take(&mut c.realising) {
            if let Err(e) = self.backend.unmap_all(group) {
                lock(&self.registry).out_of_service.insert(group);
                closed.errors.push(Error::new(
                    e.errno,
                    format!(
                        "IOMMU group {group}: could not empty its domain ({}); the group is \
                         out of service until the daemon restarts",
                        e.message
                    ),
                ));
            }
        }
        let bound = std::mem::take(&mut c.bound);
        {
            let mut reg = lock(&self.registry);
            for dev in bound.keys() {
                reg.bound.remove(dev);
            }
        }
        closed.unbound = bound.into_keys().collect();
        for (_, ioasid) in std::mem::take(&mut c.ioasids) {
            for (_, m) in ioasid.mappings {
                if let Memory::Own(alias) = m.memory {
                    self.backend.release_alias(&alias);
                }
            }
        }
        for (_, r) in std::mem::take(&mut c.registrations) {
            self.backend.release_alias(&r.alias);
        }
        c.own_bytes = 0;
        c.registered_bytes = 0;
        drop(c);
        // Released aliases may linger in the backend's idle cache, keeping
        // client files alive: a closed context leaves nothing behind.
        self.backend.trim();
        Ok(closed)
    }

    /// Bind device `dev` to context `ctx`. `EBUSY` if it is bound already
    /// (here or elsewhere), or if another device of its IOMMU group is
    /// bound to another context.
    pub fn bind(&self, dev: DeviceId, ctx: ContextId) -> Result<(), Error> {
        let spec = self.spec(dev)?;
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let mut reg = lock(&self.registry);
        if reg.out_of_service.contains(&spec.group) {
            return Err(err(
                EBUSY,
                format!(
                    "device {}: IOMMU group {} is out of service (its domain could not be \
                     emptied); restart the daemon",
                    spec.name, spec.group
                ),
            ));
        }
        if let Some(owner) = reg.bound.get(&dev) {
            let where_ = if *owner == ctx {
                "this ioasid fd"
            } else {
                "another ioasid fd"
            };
            return Err(err(
                EBUSY,
                format!("device {} is already bound to {where_}", spec.name),
            ));
        }
        for other in self.devices.values() {
            if other.group != spec.group || other.id == dev {
                continue;
            }
            if let Some(owner) = reg.bound.get(&other.id) {
                if *owner != ctx {
                    return Err(err(
                        EBUSY,
                        format!(
                            "device {} shares IOMMU group {} with {}, which is bound to \
                             another ioasid fd; all devices of a group must be bound to \
                             the same ioasid fd",
                            spec.name, spec.group, other.name
                        ),
                    ));
                }
            }
        }
        reg.bound.insert(dev, ctx);
        c.bound.insert(dev, BoundDevice::default());
        Ok(())
    }

    /// Unbind device `dev` from context `ctx`, detaching it from every
    /// IOASID first. `EINVAL` if it is not bound to `ctx`.
    pub fn unbind(&self, dev: DeviceId, ctx: ContextId) -> Result<(), Error> {
        let spec = self.spec(dev)?;
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
        let (rid, child) = (bd.rid, bd.child);
        if let Some(id) = child {
            self.detach_child_rid(&mut c, spec, id)?;
        }
        if let Some(id) = rid {
            self.detach_rid(&mut c, spec, id)?;
        }
        c.bound.remove(&dev);
        lock(&self.registry).bound.remove(&dev);
        Ok(())
    }

    /// Attach device `dev`, bound to `ctx`, to IOASID `ioasid`: by RID when
    /// `pasid` is `None`, else under that PASID.
    ///
    /// `EINVAL` if the device is not bound to `ctx` or the PASID does not
    /// fit [`PASID_BITS`]; `ENOENT` if the IOASID does not exist; `EBUSY` for a second RID attachment of the device,
    /// a RID attachment to another IOASID than the rest of its group's, or
    /// a (device, PASID) pair attached already. Replaying the IOASID's
    /// mappings into a newly realising group is all or nothing; its
    /// failures pass through.
    pub fn attach(
        &self,
        dev: DeviceId,
        ctx: ContextId,
        ioasid: IoasidId,
        pasid: Option<u32>,
    ) -> Result<(), Error> {
        let spec = self.spec(dev)?;
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
        let parent = c.ioasid(ioasid)?.parent;
        if let Some(p) = parent {
            if bd.rid != Some(p) {
                return Err(err(
                    EINVAL,
                    format!(
                        "IOASID {ioasid} is a child of IOASID {p}: attach device {} to IOASID \
                         {p} by RID first",
                        spec.name
                    ),
                ));
            }
        }
        let Some(pasid) = pasid else {
            return match parent {
                Some(p) => self.attach_child_rid(&mut c, spec, ioasid, p),
                None => self.attach_rid(&mut c, spec, ioasid),
            };
        };
        if pasid >= 1 << PASID_BITS {
            return Err(err(
                EINVAL,
                format!("PASID {pasid:#x} does not fit {PASID_BITS} bits"),
            ));
        }
        if let Some(other) = bd.pasids.get(&pasid) {
            return Err(err(
                EBUSY,
                format!(
                    "device {} is already attached to IOASID {other} under PASID {pasid}; \
                     detach it first",
                    spec.name
                ),
            ));
        }
        // Legacy VFIO cannot route PASID-tagged DMA: the attachment is
        // recorded, the group's domain is not touched.
        if c.ioasid(ioasid)?.known.is_none() {
            let info = self.backend.domain_info(spec.group)?;
            c.ioasid_mut(ioasid)?.known = Some(info);
        }
        c.bound
            .get_mut(&dev)
            .expect("checked above")
            .pasids
            .insert(pasid, ioasid);
        Ok(())
    }

    fn attach_rid(&self, c: &mut Context, spec: &DeviceSpec, id: IoasidId) -> Result<(), Error> {
        if let Some(cur) = c.bound[&spec.id].rid {
            return Err(err(
                EBUSY,
                format!(
                    "device {} is already attached to IOASID {cur} by RID; detach it first",
                    spec.name
                ),
            ));
        }
        match c.realising.get(&spec.group) {
            // Another device of the group is attached to a child of `id`:
            // the group keeps the child's shadow (and the child refuses
            // commands until this device joins it: the group rule).
            Some(r) if c.parent_of(r.ioasid) == Some(id) => {}
            Some(r) if r.ioasid != id => {
                let other = c
                    .bound
                    .iter()
                    .find(|(d, b)| b.rid == Some(r.ioasid) && self.devices[d].group == spec.group)
                    .map_or("?", |(d, _)| self.name(*d));
                return Err(err(
                    EBUSY,
                    format!(
                        "device {} shares IOMMU group {} with {other}, which is attached to \
                         IOASID {}; the devices of a group share one address space: attach \
                         to IOASID {} or detach {other} first",
                        spec.name, spec.group, r.ioasid, r.ioasid
                    ),
                ));
            }
            Some(_) => {}
            None => {
                let info = self.backend.domain_info(spec.group)?;
                self.replay(c, spec.group, id)?;
                c.realising
                    .insert(spec.group, Realising { ioasid: id, info });
                let groups = c.member_groups(id);
                let combined = combine(groups.iter().map(|g| &c.realising[g].info));
                c.ioasid_mut(id)?.known = combined;
            }
        }
        c.bound.get_mut(&spec.id).expect("bound").rid = Some(id);
        Ok(())
    }

    /// Map every mapping of `id` into `group`'s (empty) domain, or nothing.
    fn replay(&self, c: &Context, group: GroupId, id: IoasidId) -> Result<(), Error> {
        let io = c.ioasid(id)?;
        for (&iova, m) in &io.mappings {
            if let Err(e) = self.map_segments(group, iova, &c.segments(m), m.prot) {
                if let Err(undo) = self.backend.unmap_all(group) {
                    tracing::debug!(group, error = %undo, "rollback of a replay failed");
                }
                return Err(Error::new(
                    e.errno,
                    format!(
                        "attaching IOMMU group {group} to IOASID {id}: replaying the mapping at \
                         IOVA {iova:#x} failed: {}",
                        e.message
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Map one mapping's segments into `group`; all or nothing.
    fn map_segments(
        &self,
        group: GroupId,
        iova: u64,
        segs: &[Segment],
        prot: Prot,
    ) -> Result<(), Error> {
        for (i, s) in segs.iter().enumerate() {
            if let Err(e) = self
                .backend
                .map(group, iova + s.offset, s.daemon_vaddr, s.len, prot)
            {
                for done in &segs[..i] {
                    if let Err(undo) = self.backend.unmap(group, iova + done.offset, done.len) {
                        tracing::debug!(group, error = %undo, "rollback of a map failed");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Detach device `dev` from IOASID `ioasid` (RID when `pasid` is
    /// `None`). `EINVAL` if the device is not bound to `ctx`; `ENOENT` if
    /// the IOASID does not exist or the device is not attached that way.
    pub fn detach(
        &self,
        dev: DeviceId,
        ctx: ContextId,
        ioasid: IoasidId,
        pasid: Option<u32>,
    ) -> Result<(), Error> {
        let spec = self.spec(dev)?;
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
        c.ioasid(ioasid)?;
        match pasid {
            None if bd.child == Some(ioasid) => self.detach_child_rid(&mut c, spec, ioasid),
            None if bd.rid == Some(ioasid) => {
                let on_child = bd.child.or_else(|| {
                    bd.pasids
                        .values()
                        .copied()
                        .find(|&i| c.parent_of(i) == Some(ioasid))
                });
                if let Some(child) = on_child {
                    return Err(err(
                        EBUSY,
                        format!(
                            "device {} is still attached to IOASID {child}, a child of IOASID \
                             {ioasid}; detach it from the child first",
                            spec.name
                        ),
                    ));
                }
                self.detach_rid(&mut c, spec, ioasid)
            }
            Some(p) if bd.pasids.get(&p) == Some(&ioasid) => {
                c.bound.get_mut(&dev).expect("bound").pasids.remove(&p);
                Ok(())
            }
            _ => Err(err(
                ENOENT,
                format!(
                    "device {} is not attached to IOASID {ioasid}{}",
                    spec.name,
                    pasid.map_or(" by RID".to_string(), |p| format!(" under PASID {p}"))
                ),
            )),
        }
    }

    fn detach_rid(&self, c: &mut Context, spec: &DeviceSpec, id: IoasidId) -> Result<(), Error> {
        let last = !c.bound.iter().any(|(d, b)| {
            *d != spec.id && b.rid == Some(id) && self.devices[d].group == spec.group
        });
        if last {
            self.backend.unmap_all(spec.group)?;
            c.realising.remove(&spec.group);
            let groups = c.member_groups(id);
            if let Some(combined) = combine(groups.iter().map(|g| &c.realising[g].info)) {
                c.ioasid_mut(id)?.known = Some(combined);
            }
        }
        c.bound.get_mut(&spec.id).expect("bound").rid = None;
        Ok(())
    }

    /// The RFC's group rule: while some bound devices of a group are
    /// attached to `id` by RID and others are not, `id` refuses everything.
    ///
    /// For a child, "attached" means attached to the child by RID, in the
    /// groups realising the child; for a root, attached to it by RID, in the
    /// groups realising it or one of its children.
    fn check_group_rule(&self, c: &Context, id: IoasidId) -> Result<(), Error> {
        let child = c.ioasid(id)?.parent.is_some();
        // The groups realising `id` (for a root, also through its children).
        let realises = |g: GroupId| {
            c.realising
                .get(&g)
                .is_some_and(|r| r.ioasid == id || (!child && c.parent_of(r.ioasid) == Some(id)))
        };
        let left_out = |d: &DeviceId, b: &BoundDevice| {
            realises(self.devices[d].group)
                && if child {
                    b.child != Some(id)
                } else {
                    b.rid != Some(id)
                }
        };
        // Checked on every map and unmap: no allocation unless it fails.
        if !c.bound.iter().any(|(d, b)| left_out(d, b)) {
            return Ok(());
        }
        let missing: Vec<&str> = c
            .bound
            .iter()
            .filter(|(d, b)| left_out(d, b))
            .map(|(d, _)| self.name(*d))
            .collect();
        Err(err(
            EBUSY,
            format!(
                "IOASID {id} has only part of an IOMMU group attached: {} bound to this \
                 ioasid fd but not attached; attach them too, or unbind them",
                missing.join(", ")
            ),
        ))
    }

    /// Allocate an IOASID in context `ctx`. It accepts map and unmap only
    /// once a device has been attached.
    pub fn alloc(&self, ctx: ContextId) -> Result<IoasidId, Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let entry = c.ioasids.vacant_entry();
        let id = u32::try_from(entry.key() + 1)
            .ok()
            .filter(|&i| i <= i32::MAX as u32)
            .ok_or_else(|| err(ENOSPC, "no IOASID number left in this ioasid fd"))?;
        entry.insert(Ioasid::default());
        Ok(id)
    }

    /// Free IOASID `ioasid` and its mappings. `ENOENT` if unknown, `EBUSY`
    /// while a device is attached to it (or the group rule holds).
    pub fn free(&self, ctx: ContextId, ioasid: IoasidId) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        c.ioasid(ioasid)?;
        self.check_group_rule(&c, ioasid)?;
        let users: Vec<&str> = c
            .bound
            .iter()
            .filter(|(_, b)| {
                b.rid == Some(ioasid)
                    || b.child == Some(ioasid)
                    || b.pasids.values().any(|&i| i == ioasid)
            })
            .map(|(d, _)| self.name(*d))
            .collect();
        let children = c.children_of(ioasid);
        if !children.is_empty() {
            return Err(err(
                EBUSY,
                format!("IOASID {ioasid} has children {children:?}; free them first"),
            ));
        }
        if !users.is_empty() {
            return Err(err(
                EBUSY,
                format!(
                    "IOASID {ioasid} is in use by {}; detach them first",
                    users.join(", ")
                ),
            ));
        }
        let key = ioasid_key(ioasid).expect("checked above");
        let io = c.ioasids.remove(key);
        for (_, m) in io.mappings {
            self.drop_memory(&mut c, m);
        }
        Ok(())
    }

    /// Give back what a removed mapping held.
    fn drop_memory(&self, c: &mut Context, m: Mapping) {
        match m.memory {
            Memory::Own(alias) => {
                self.backend.release_alias(&alias);
                c.own_bytes -= m.size;
            }
            Memory::Registered(start) => {
                if let Some(r) = c.registrations.get_mut(&start) {
                    r.users -= 1;
                }
            }
            Memory::Nested => {}
        }
    }

    /// Check an IOASID accepts commands; returns its realising groups and
    /// domain constraints.
    fn usable<'c>(
        &self,
        c: &'c Context,
        id: IoasidId,
    ) -> Result<(Vec<GroupId>, &'c DomainInfo), Error> {
        let io = c.ioasid(id)?;
        self.check_group_rule(c, id)?;
        let known = io.known.as_ref().ok_or_else(|| {
            err(
                ENODEV,
                format!(
                    "IOASID {id} has never had a device attached; attach a device \
                     (VFIO_ATTACH_IOASID) before mapping"
                ),
            )
        })?;
        Ok((c.groups_of(id), known))
    }

    /// Map `map.size` bytes of process `pid` at `map.vaddr` to `map.iova`
    /// in IOASID `ioasid`, in every realising domain.
    ///
    /// Errors: `ENOENT` unknown IOASID, or the context has registered
    /// memory and the range is not inside one registration; `EBUSY` group
    /// rule; `ENODEV` no device ever attached; `EINVAL` no access bit,
    /// size 0, misaligned, overflowing, outside the permitted ranges;
    /// `EEXIST` overlapping; `ENOMEM` over `RLIMIT_MEMLOCK`; backend errors
    /// (`EFAULT` unaliasable memory, `ENOSPC` full domain) pass through.
    /// On failure nothing changes.
    pub fn map_dma(
        &self,
        ctx: ContextId,
        pid: Pid,
        ioasid: IoasidId,
        map: DmaMap,
    ) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let (groups, known) = self.usable(&c, ioasid)?;
        self.check_no_table(&c, ioasid)?;
        let DmaMap {
            iova,
            vaddr,
            size,
            prot,
        } = map;
        if !prot.read && !prot.write {
            return Err(err(EINVAL, "a mapping must allow read, write or both"));
        }
        if size == 0 {
            return Err(err(EINVAL, "cannot map 0 bytes"));
        }
        let pg = min_pgsize(known.pgsize_bitmap);
        if (iova | vaddr | size) & (pg - 1) != 0 {
            return Err(err(
                EINVAL,
                format!(
                    "iova {iova:#x}, vaddr {vaddr:#x} and size {size:#x} must be multiples of \
                     the IOMMU page size {pg:#x}"
                ),
            ));
        }
        let (Some(end), Some(_)) = (iova.checked_add(size), vaddr.checked_add(size)) else {
            return Err(err(EINVAL, "iova + size or vaddr + size overflows"));
        };
        let last = end - 1;
        if !known.iova_ranges.is_empty()
            && !known
                .iova_ranges
                .iter()
                .any(|&(a, b)| a <= iova && last <= b)
        {
            return Err(err(
                EINVAL,
                format!(
                    "IOVA range {iova:#x}..={last:#x} is not inside one permitted range \
                     (see IOASID_GET_INFO)"
                ),
            ));
        }
        let io = c.ioasid(ioasid)?;
        let is_child = io.parent.is_some();
        if let Some((&s, m)) = io.mappings.range(..end).next_back() {
            if s + m.size > iova {
                return Err(err(
                    EEXIST,
                    format!(
                        "IOVA range {iova:#x}..={last:#x} overlaps the mapping at {s:#x} \
                         ({:#x} bytes); unmap it first",
                        m.size
                    ),
                ));
            }
        }
        if is_child {
            return self.map_child(&mut c, ioasid, iova, vaddr, size, prot);
        }
        let memory = if c.registrations.is_empty() {
            self.check_memlock(&c, pid, size)?;
            Memory::Own(self.backend.alias(pid, vaddr, size)?)
        } else {
            let inside = c
                .registrations
                .range(..=vaddr)
                .next_back()
                .filter(|(&s, r)| vaddr + size <= s + r.size);
            match inside {
                Some((&s, _)) => Memory::Registered(s),
                None => {
                    return Err(err(
                        ENOENT,
                        format!(
                            "vaddr range {vaddr:#x}+{size:#x} is not inside one registered \
                             range; this ioasid fd has registered memory, so every map must \
                             lie in a registration (IOASID_REGISTER_MEMORY)"
                        ),
                    ))
                }
            }
        };
        let mapping = Mapping {
            vaddr,
            size,
            prot,
            memory,
        };
        let segs = c.segments(&mapping);
        for (i, &g) in groups.iter().enumerate() {
            if let Err(e) = self.map_segments(g, iova, &segs, prot) {
                for &done in &groups[..i] {
                    if let Err(undo) = self.backend.unmap(done, iova, size) {
                        tracing::debug!(group = done, error = %undo, "rollback of a map failed");
                    }
                }
                if let Memory::Own(alias) = &mapping.memory {
                    self.backend.release_alias(alias);
                }
                return Err(e);
            }
        }
        match mapping.memory {
            Memory::Own(_) => c.own_bytes += size,
            Memory::Registered(s) => c.registrations.get_mut(&s).expect("found above").users += 1,
            Memory::Nested => {}
        }
        c.ioasid_mut(ioasid)?.mappings.insert(iova, mapping);
        // The children see the new mapping at once.
        if c.has_children(ioasid) {
            let view = parent_view(&c, ioasid, &[])?;
            if let Err(e) = self.refresh_children(&mut c, ioasid, &view) {
                let m = c
                    .ioasid_mut(ioasid)?
                    .mappings
                    .remove(&iova)
                    .expect("inserted above");
                for &g in &groups {
                    if let Err(undo) = self.backend.unmap(g, iova, size) {
                        tracing::debug!(group = g, error = %undo, "rollback of a map failed");
                    }
                }
                self.drop_memory(&mut c, m);
                return Err(e);
            }
        }
        Ok(())
    }

    fn check_memlock(&self, c: &Context, pid: Pid, more: u64) -> Result<(), Error> {
        let Some(limit) = self.backend.memlock_limit(pid)? else {
            return Ok(());
        };
        let total = c.pinned().saturating_add(more);
        if total > limit {
            return Err(err(
                ENOMEM,
                format!(
                    "pinning {more:#x} more bytes would bring this ioasid fd to {total:#x} \
                     bytes, above the RLIMIT_MEMLOCK of process {pid} ({limit:#x} bytes); \
                     raise the limit (ulimit -l), or register the memory once with \
                     IOASID_REGISTER_MEMORY"
                ),
            ));
        }
        Ok(())
    }

    /// Unmap the mappings inside `[iova, iova + size)` of IOASID `ioasid`
    /// and return the bytes unmapped, with VFIO type1v2 semantics: a range
    /// with nothing mapped succeeds with 0 (iommufd would answer `ENOENT`);
    /// a range that would split a mapping is `EINVAL`; size 0, misaligned
    /// or overflowing is `EINVAL`. `ENOENT`, `EBUSY`, `ENODEV` as for
    /// [`Engine::map_dma`].
    pub fn unmap_dma(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        iova: u64,
        size: u64,
    ) -> Result<u64, Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let (groups, known) = self.usable(&c, ioasid)?;
        self.check_no_table(&c, ioasid)?;
        if size == 0 {
            return Err(err(EINVAL, "cannot unmap 0 bytes"));
        }
        let pg = min_pgsize(known.pgsize_bitmap);
        if (iova | size) & (pg - 1) != 0 {
            return Err(err(
                EINVAL,
                format!(
                    "iova {iova:#x} and size {size:#x} must be multiples of the IOMMU page \
                     size {pg:#x}"
                ),
            ));
        }
        let end = iova
            .checked_add(size)
            .ok_or_else(|| err(EINVAL, "iova + size overflows"))?;
        let io = c.ioasid(ioasid)?;
        let split = |s: u64, m: &Mapping| {
            err(
                EINVAL,
                format!(
                    "unmapping {iova:#x}+{size:#x} would split the mapping at {s:#x} ({:#x} \
                     bytes); unmap whole mappings",
                    m.size
                ),
            )
        };
        if let Some((&s, m)) = io.mappings.range(..iova).next_back() {
            if s + m.size > iova {
                return Err(split(s, m));
            }
        }
        if let Some((&s, m)) = io.mappings.range(iova..end).next_back() {
            if s + m.size > end {
                return Err(split(s, m));
            }
        }
        let gone: Vec<u64> = io.mappings.range(iova..end).map(|(&s, _)| s).collect();
        if gone.is_empty() {
            return Ok(0);
        }
        self.remove(&mut c, ioasid, &groups, &gone, |b, g| {
            b.unmap(g, iova, size).map(|_| ())
        })
    }

    /// Unmap everything from IOASID `ioasid` (`VFIO_DMA_UNMAP_FLAG_ALL`);
    /// returns the bytes unmapped.
    pub fn unmap_all_dma(&self, ctx: ContextId, ioasid: IoasidId) -> Result<u64, Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let (groups, _) = self.usable(&c, ioasid)?;
        self.check_no_table(&c, ioasid)?;
        let gone: Vec<u64> = c.ioasid(ioasid)?.mappings.keys().copied().collect();
        if gone.is_empty() {
            return Ok(0);
        }
        self.remove(&mut c, ioasid, &groups, &gone, |b, g| b.unmap_all(g))
    }

    /// Remove the mappings starting at `gone` from `ioasid`: a child's
    /// through its shadow; a root's from its groups, after taking them out
    /// of its children's shadows (so no domain maps memory about to be
    /// released).
    fn remove(
        &self,
        c: &mut Context,
        ioasid: IoasidId,
        groups: &[GroupId],
        gone: &[u64],
        unmap: impl Fn(&dyn Backend, GroupId) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        if c.ioasid(ioasid)?.parent.is_some() {
            return self.unmap_child(c, ioasid, gone);
        }
        if !c.has_children(ioasid) {
            return self.remove_mappings(c, ioasid, groups, gone, unmap);
        }
        let without = parent_view(c, ioasid, gone)?;
        self.refresh_children(c, ioasid, &without)?;
        match self.remove_mappings(c, ioasid, groups, gone, unmap) {
            Ok(bytes) => Ok(bytes),
            Err(e) => {
                let full = parent_view(c, ioasid, &[])?;
                if let Err(undo) = self.refresh_children(c, ioasid, &full) {
                    tracing::warn!(ioasid, error = %undo, "restoring the children's shadows failed");
                }
                Err(e)
            }
        }
    }

    /// Remove the mappings starting at `gone` from `ioasid` and from every
    /// realising group (with `unmap`); on a backend failure, map them back
    /// into the groups already done and change nothing.
    fn remove_mappings(
        &self,
        c: &mut Context,
        ioasid: IoasidId,
        groups: &[GroupId],
        gone: &[u64],
        unmap: impl Fn(&dyn Backend, GroupId) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        for (i, &g) in groups.iter().enumerate() {
            if let Err(e) = unmap(self.backend.as_ref(), g) {
                let io = c.ioasid(ioasid)?;
                for &done in &groups[..i] {
                    for s in gone {
                        let m = &io.mappings[s];
                        if let Err(undo) = self.map_segments(done, *s, &c.segments(m), m.prot) {
                            tracing::debug!(group = done, error = %undo, "rollback of an unmap failed");
                        }
                    }
                }
                return Err(e);
            }
        }
        let mut bytes = 0;
        for s in gone {
            let m = c
                .ioasid_mut(ioasid)?
                .mappings
                .remove(s)
                .expect("collected above");
            bytes += m.size;
            self.drop_memory(c, m);
        }
        Ok(bytes)
    }

    /// Register `[vaddr, vaddr + size)` of process `pid`: alias and account
    /// it once, for any number of later maps. `EINVAL` size 0, not 4 KiB
    /// aligned or overflowing; `EEXIST` overlapping a registration;
    /// `ENOMEM` over `RLIMIT_MEMLOCK`; `EFAULT` (from the backend) memory
    /// that cannot be aliased.
    pub fn register_memory(
        &self,
        ctx: ContextId,
        pid: Pid,
        vaddr: u64,
        size: u64,
    ) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        if size == 0 || (vaddr | size) & 4095 != 0 {
            return Err(err(
                EINVAL,
                format!("vaddr {vaddr:#x} and size {size:#x} must be non-zero multiples of 4 KiB"),
            ));
        }
        let end = vaddr
            .checked_add(size)
            .ok_or_else(|| err(EINVAL, "vaddr + size overflows"))?;
        if let Some((&s, r)) = c.registrations.range(..end).next_back() {
            if s + r.size > vaddr {
                return Err(err(
                    EEXIST,
                    format!(
                        "{vaddr:#x}+{size:#x} overlaps the registration {s:#x}+{:#x}",
                        r.size
                    ),
                ));
            }
        }
        self.check_memlock(&c, pid, size)?;
        let alias = self.backend.alias(pid, vaddr, size)?;
        c.registrations.insert(
            vaddr,
            Registration {
                size,
                alias,
                users: 0,
            },
        );
        c.registered_bytes += size;
        Ok(())
    }

    /// Undo [`Engine::register_memory`]. `ENOENT` unless `(vaddr, size)` is
    /// exactly a registration; `EBUSY` while a mapping uses it.
    pub fn unregister_memory(&self, ctx: ContextId, vaddr: u64, size: u64) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let r = c
            .registrations
            .get(&vaddr)
            .filter(|r| r.size == size)
            .ok_or_else(|| {
                err(
                    ENOENT,
                    format!("{vaddr:#x}+{size:#x} is not a registration of this ioasid fd"),
                )
            })?;
        if r.users > 0 {
            return Err(err(
                EBUSY,
                format!(
                    "registration {vaddr:#x}+{size:#x} is used by {} mapping(s); unmap them first",
                    r.users
                ),
            ));
        }
        let r = c.registrations.remove(&vaddr).expect("found above");
        self.backend.release_alias(&r.alias);
        c.registered_bytes -= size;
        Ok(())
    }

    /// What IOASID `ioasid` is: empty (`attached == false`) until a device
    /// has been attached. `ENOENT` unknown, `EBUSY` group rule.
    pub fn info(&self, ctx: ContextId, ioasid: IoasidId) -> Result<IoasidInfo, Error> {
        let arc = self.context(ctx)?;
        let c = lock(&arc);
        c.check_open(ctx)?;
        let io = c.ioasid(ioasid)?;
        self.check_group_rule(&c, ioasid)?;
        let mut devices: Vec<Attachment> = Vec::new();
        for (&device, b) in &c.bound {
            if b.rid == Some(ioasid) {
                devices.push(Attachment {
                    device,
                    pasid: None,
                });
            }
            for (&p, &i) in &b.pasids {
                if i == ioasid {
                    devices.push(Attachment {
                        device,
                        pasid: Some(p),
                    });
                }
            }
        }
        for (&device, b) in &c.bound {
            if b.child == Some(ioasid) {
                devices.push(Attachment {
                    device,
                    pasid: None,
                });
            }
        }
        devices.sort();
        let children = c.children_of(ioasid);
        let Some(known) = &io.known else {
            return Ok(IoasidInfo {
                devices,
                parent: io.parent,
                children,
                ..IoasidInfo::default()
            });
        };
        let groups = c.groups_of(ioasid);
        // With no realising group, report what was last known.
        let mut dma_avail = if groups.is_empty() {
            known.dma_avail
        } else {
            None
        };
        for g in groups {
            let now = self.backend.domain_info(g)?.dma_avail;
            dma_avail = match (dma_avail, now) {
                (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                (a, b) => a.or(b),
            };
        }
        Ok(IoasidInfo {
            attached: true,
            pgsize_bitmap: known.pgsize_bitmap,
            iova_ranges: known.iova_ranges.clone(),
            mappings: io.mappings.len(),
            mapped_bytes: io.mappings.values().map(|m| m.size).sum(),
            devices,
            dma_avail,
            parent: io.parent,
            children,
            nesting_levels: u32::from(io.parent.is_none()),
            shadow_entries: io.shadow.len(),
            pgtable: io.pgtable.as_ref().map(|t| PgtableStatus {
                root: t.root,
                leaves: t.leaves.len() as u64,
                last_walk: t.last_walk,
                malformed: t.malformed,
                walks: t.walks,
            }),
            pasid_table: io.pasid_table.as_ref().map(pasid_status),
        })
    }

    /// Bytes pinned for context `ctx`: registered bytes plus the bytes of
    /// mappings not made from a registration.
    pub fn pinned_bytes(&self, ctx: ContextId) -> Result<u64, Error> {
        let arc = self.context(ctx)?;
        let c = lock(&arc);
        c.check_open(ctx)?;
        Ok(c.pinned())
    }
}

/// Nesting, page-table and PASID-table binding.
impl Engine {
    /// Set the budget of one table walk (default
    /// [`pgtable::DEFAULT_WALK_LIMIT`]): each table read costs
    /// [`pgtable::TABLE_READ_COST`], each present entry 1; a walk that runs
    /// out stops and is counted as malformed. A PASID-table read shares one
    /// budget among all the PASIDs it walks.
    pub fn set_walk_limit(&self, limit: u64) {
        self.walk_limit.store(limit, Ordering::Relaxed);
    }

    /// Create a child of IOASID `parent` (one level of software nesting).
    ///
    /// `ENOENT` unknown parent; `EINVAL` the parent is itself a child (one
    /// level only); `ENODEV` the parent never had a device attached;
    /// `EBUSY` the group rule on the parent; `ENOSPC` no number left.
    pub fn create_nesting(&self, ctx: ContextId, parent: IoasidId) -> Result<IoasidId, Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let io = c.ioasid(parent)?;
        if let Some(p) = io.parent {
            return Err(err(
                EINVAL,
                format!(
                    "IOASID {parent} is a child of IOASID {p}; only one level of nesting is \
                     offered (see IOASID_INFO_CAP_NESTING)"
                ),
            ));
        }
        let never = io.known.is_none();
        self.check_group_rule(&c, parent)?;
        if never {
            return Err(err(
                ENODEV,
                format!(
                    "IOASID {parent} has never had a device attached; attach a device to it \
                     before creating a child"
                ),
            ));
        }
        let entry = c.ioasids.vacant_entry();
        let id = u32::try_from(entry.key() + 1)
            .ok()
            .filter(|&i| i <= i32::MAX as u32)
            .ok_or_else(|| err(ENOSPC, "no IOASID number left in this ioasid fd"))?;
        entry.insert(Ioasid {
            parent: Some(parent),
            ..Ioasid::default()
        });
        Ok(id)
    }

    /// Bind the page table rooted at `root` (an IOVA of the parent) to
    /// child IOASID `ioasid`, walk it and make its translations effective.
    ///
    /// `EINVAL` not a child, `format` not [`PGTABLE_X86_64_4LVL`],
    /// `addr_width` not 48, `root` not 4 KiB aligned; `EBUSY` a table is
    /// bound already, or the child has mappings or a PASID table; `EFAULT`
    /// the root table is not mapped readable in the parent; `ENOENT`,
    /// `EBUSY` (group rule), `ENODEV` as for [`Engine::map_dma`]. Malformed
    /// entries do not fail the bind: they are skipped, counted in
    /// [`PgtableStatus`] and logged.
    pub fn bind_pgtable(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        format: u32,
        addr_width: u32,
        root: u64,
    ) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        self.usable(&c, ioasid)?;
        let parent = child_parent(&c, ioasid)?;
        if format != PGTABLE_X86_64_4LVL {
            return Err(err(
                EINVAL,
                format!(
                    "page-table format {format} is unknown; use IOASID_PGTABLE_X86_64_4LVL (1)"
                ),
            ));
        }
        if addr_width != pgtable::ADDR_WIDTH {
            return Err(err(
                EINVAL,
                format!("addr_width {addr_width}: IOASID_PGTABLE_X86_64_4LVL takes 48"),
            ));
        }
        if root & (pgtable::TABLE_BYTES - 1) != 0 {
            return Err(err(
                EINVAL,
                format!("root table {root:#x} is not 4 KiB aligned"),
            ));
        }
        if let Some(what) = c.ioasid(ioasid)?.protocol_in_use() {
            return Err(err(EBUSY, format!("IOASID {ioasid}: {what}")));
        }
        let view = parent_view(&c, parent, &[])?;
        if self.read_table(&view, root).is_none() {
            return Err(err(
                EFAULT,
                format!(
                    "the root table at {root:#x} is not mapped readable in the parent IOASID \
                     {parent}"
                ),
            ));
        }
        let mut budget = self.walk_limit.load(Ordering::Relaxed);
        let (found, stats) = pgtable::walk(
            &mut |a| self.read_table(&view, a),
            root,
            0,
            pgtable::INPUT_END,
            &mut budget,
        );
        log_walk(ioasid, None, &stats);
        c.ioasid_mut(ioasid)?.pgtable = Some(BoundPgtable {
            root,
            leaves: found.into_iter().collect(),
            last_walk: stats,
            malformed: stats.malformed,
            walks: 1,
        });
        let shadow = child_shadow(c.ioasid(ioasid)?, &view);
        if let Err(e) = self.apply_shadow(&mut c, ioasid, shadow) {
            c.ioasid_mut(ioasid)?.pgtable = None;
            return Err(e);
        }
        Ok(())
    }

    /// Unbind the page table of child `ioasid`: it translates nothing
    /// until a table is bound or mappings are made. `ENOENT` if no page
    /// table is bound; `EBUSY` (group rule), `ENODEV` as usual.
    pub fn unbind_pgtable(&self, ctx: ContextId, ioasid: IoasidId) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        self.usable(&c, ioasid)?;
        let Some(old) = c.ioasid_mut(ioasid)?.pgtable.take() else {
            return Err(err(
                ENOENT,
                format!("IOASID {ioasid} has no page table bound"),
            ));
        };
        if let Err(e) = self.apply_shadow(&mut c, ioasid, Shadow::new()) {
            c.ioasid_mut(ioasid)?.pgtable = Some(old);
            return Err(e);
        }
        Ok(())
    }

    /// Bind the flat PASID table at `table` (an IOVA of the parent, with
    /// `entries` entries) to child `ioasid`, read its entries and walk the
    /// page tables they name. PASID DMA is not routed, so nothing is
    /// mapped: what was found is reported by [`Engine::info`].
    ///
    /// `EINVAL` not a child, `format` not [`PASID_TABLE_FLAT_X86_64`],
    /// `entries` 0 or above 2^20, `table` not 4 KiB aligned or the table
    /// overflowing; `EBUSY` a PASID table is bound already, or the child
    /// has mappings or a page table; `EFAULT` the table is not mapped
    /// readable in the parent; the usual `ENOENT`, `EBUSY`, `ENODEV`.
    pub fn bind_pasid_table(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        format: u32,
        table: u64,
        entries: u32,
    ) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        self.usable(&c, ioasid)?;
        let parent = child_parent(&c, ioasid)?;
        if format != PASID_TABLE_FLAT_X86_64 {
            return Err(err(
                EINVAL,
                format!(
                    "PASID-table format {format} is unknown; use IOASID_PASID_TABLE_FLAT_X86_64 (1)"
                ),
            ));
        }
        if entries == 0 || entries > PASID_TABLE_MAX_ENTRIES {
            return Err(err(
                EINVAL,
                format!("{entries} entries: a PASID table has 1 to 2^20"),
            ));
        }
        if table & (pgtable::TABLE_BYTES - 1) != 0 {
            return Err(err(
                EINVAL,
                format!("PASID table {table:#x} is not 4 KiB aligned"),
            ));
        }
        if table.checked_add(8 * u64::from(entries)).is_none() {
            return Err(err(EINVAL, "table + 8 * entries overflows"));
        }
        if let Some(what) = c.ioasid(ioasid)?.protocol_in_use() {
            return Err(err(EBUSY, format!("IOASID {ioasid}: {what}")));
        }
        let view = parent_view(&c, parent, &[])?;
        let chunks = (u64::from(entries) * 8).div_ceil(pgtable::TABLE_BYTES);
        for k in 0..chunks {
            let at = table + k * pgtable::TABLE_BYTES;
            if self.read_table(&view, at).is_none() {
                return Err(err(
                    EFAULT,
                    format!(
                        "the PASID table is not mapped readable in the parent IOASID {parent} \
                         (at {at:#x})"
                    ),
                ));
            }
        }
        let mut bound = BoundPasidTable {
            table,
            entries,
            pasids: BTreeMap::new(),
        };
        self.reread_pasids(ioasid, &view, &mut bound, 0..entries);
        c.ioasid_mut(ioasid)?.pasid_table = Some(bound);
        Ok(())
    }

    /// Unbind the PASID table of child `ioasid`. `ENOENT` if none is bound.
    pub fn unbind_pasid_table(&self, ctx: ContextId, ioasid: IoasidId) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        self.usable(&c, ioasid)?;
        if c.ioasid_mut(ioasid)?.pasid_table.take().is_none() {
            return Err(err(
                ENOENT,
                format!("IOASID {ioasid} has no PASID table bound"),
            ));
        }
        Ok(())
    }

    /// The user changed a table bound to `ioasid`: walk again what `inv`
    /// covers and make the result effective.
    ///
    /// With a page table: `inv.range` `None` walks the whole table and
    /// replaces every cached leaf; `Some((addr, size))` (4 KiB aligned,
    /// size > 0) walks only the entries meeting that input range and
    /// replaces the cached leaves meeting it (or meeting a new leaf). With
    /// a PASID table: `pasid_cache` re-reads the entries (of `inv.pasid`,
    /// or all) and walks the tables they name; without it, the current
    /// tables of those PASIDs are walked again over the range.
    ///
    /// `EINVAL` no table bound; PASID fields on an IOASID without a PASID
    /// table; `range` with `pasid_cache`; misaligned, zero or overflowing
    /// range; a PASID past the table. A backend failure (e.g. `ENOSPC`)
    /// leaves the previous translations in force.
    pub fn invalidate(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        inv: Invalidation,
    ) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        self.usable(&c, ioasid)?;
        let (start, end) = match inv.range {
            None => (0, pgtable::INPUT_END),
            Some((addr, size)) => {
                if size == 0 || (addr | size) & (pgtable::TABLE_BYTES - 1) != 0 {
                    return Err(err(
                        EINVAL,
                        format!(
                            "invalidation range {addr:#x}+{size:#x} must be a non-empty multiple \
                             of 4 KiB"
                        ),
                    ));
                }
                let end = addr
                    .checked_add(size)
                    .ok_or_else(|| err(EINVAL, "addr + size overflows"))?;
                (addr, end)
            }
        };
        let io = c.ioasid(ioasid)?;
        if inv.pasid.is_some() || inv.pasid_cache {
            let Some(pt) = &io.pasid_table else {
                return Err(err(
                    EINVAL,
                    format!(
                        "IOASID {ioasid} has no PASID table: PASID invalidation flags do not apply"
                    ),
                ));
            };
            if inv.pasid_cache && inv.range.is_some() {
                return Err(err(
                    EINVAL,
                    "a PASID-cache invalidation re-reads whole entries: it takes no address range",
                ));
            }
            if let Some(p) = inv.pasid {
                if p >= pt.entries {
                    return Err(err(
                        EINVAL,
                        format!("PASID {p} is past the table ({} entries)", pt.entries),
                    ));
                }
            }
        }
        let Some(parent) = io.parent else {
            return Err(err(
                EINVAL,
                format!("IOASID {ioasid} is not a child: no table is bound"),
            ));
        };
        let view = parent_view(&c, parent, &[])?;
        if io.pgtable.is_some() {
            return self.invalidate_pgtable(&mut c, ioasid, &view, start, end);
        }
        let Some(mut pt) = c.ioasid_mut(ioasid)?.pasid_table.take() else {
            return Err(err(EINVAL, format!("IOASID {ioasid} has no table bound")));
        };
        let which = match inv.pasid {
            Some(p) => p..p + 1,
            None => 0..pt.entries,
        };
        if inv.pasid_cache {
            self.reread_pasids(ioasid, &view, &mut pt, which);
        } else {
            let mut budget = self.walk_limit.load(Ordering::Relaxed);
            for (&p, state) in pt.pasids.range_mut(which) {
                if let PasidState::Walked {
                    leaves,
                    root,
                    stats,
                } = state
                {
                    let (found, s) = pgtable::walk(
                        &mut |a| self.read_table(&view, a),
                        *root,
                        start,
                        end,
                        &mut budget,
                    );
                    log_walk(ioasid, Some(p), &s);
                    *stats = s;
                    merge_leaves(leaves, start, end, found, inv.range.is_none());
                }
            }
        }
        c.ioasid_mut(ioasid)?.pasid_table = Some(pt);
        Ok(())
    }

    fn invalidate_pgtable(
        &self,
        c: &mut Context,
        ioasid: IoasidId,
        view: &ParentView,
        start: u64,
        end: u64,
    ) -> Result<(), Error> {
        let root = c.ioasid(ioasid)?.pgtable.as_ref().expect("checked").root;
        let mut budget = self.walk_limit.load(Ordering::Relaxed);
        let (found, stats) = pgtable::walk(
            &mut |a| self.read_table(view, a),
            root,
            start,
            end,
            &mut budget,
        );
        log_walk(ioasid, None, &stats);
        let whole = start == 0 && end >= pgtable::INPUT_END;
        let ranges = known_ranges(c.ioasid(ioasid)?);
        // Only the shadow of the leaves taken out and put in changes.
        let mut added = Shadow::new();
        for (input, l) in &found {
            compose(view, &ranges, *input, l.gpa, l.size, l.prot, &mut added);
        }
        let new_keys: Vec<u64> = found.iter().map(|(k, _)| *k).collect();
        let t = c.ioasid_mut(ioasid)?.pgtable.as_mut().expect("checked");
        let killed = merge_leaves(&mut t.leaves, start, end, found, whole);
        let io = c.ioasid(ioasid)?;
        let removed: Vec<(u64, ShadowEntry)> = if whole {
            io.shadow.iter().map(|(k, v)| (*k, *v)).collect()
        } else {
            killed
                .iter()
                .flat_map(|(k, l)| shadow_in(&io.shadow, *k, l.size))
                .collect()
        };
        match self.apply_delta(c, ioasid, removed, added) {
            Ok(()) => {
                let t = c.ioasid_mut(ioasid)?.pgtable.as_mut().expect("checked");
                t.last_walk = stats;
                t.malformed += stats.malformed;
                t.walks += 1;
                Ok(())
            }
            Err(e) => {
                let t = c.ioasid_mut(ioasid)?.pgtable.as_mut().expect("checked");
                for k in new_keys {
                    t.leaves.remove(&k);
                }
                t.leaves.extend(killed);
                Err(e)
            }
        }
    }

    /// Read the entries `which` of a PASID table and walk the tables they
    /// name, with one budget.
    fn reread_pasids(
        &self,
        ioasid: IoasidId,
        view: &ParentView,
        pt: &mut BoundPasidTable,
        which: std::ops::Range<u32>,
    ) {
        let mut budget = self.walk_limit.load(Ordering::Relaxed);
        let mut chunk: Option<(u64, Option<[u64; pgtable::ENTRIES]>)> = None;
        for p in which {
            let at = pt.table + 8 * u64::from(p);
            let page = at & !(pgtable::TABLE_BYTES - 1);
            if chunk.as_ref().map(|c| c.0) != Some(page) {
                chunk = Some((page, self.read_table(view, page)));
            }
            let entry = chunk
                .as_ref()
                .and_then(|c| c.1.as_ref())
                .map(|e| e[((at - page) / 8) as usize]);
            let state = match entry.map(pgtable::pasid_entry) {
                None => Some(PasidState::Unreadable),
                Some(PasidEntry::NotPresent) => None,
                Some(PasidEntry::Malformed) => Some(PasidState::Bad),
                Some(PasidEntry::Root(root)) => {
                    let (found, stats) = pgtable::walk(
                        &mut |a| self.read_table(view, a),
                        root,
                        0,
                        pgtable::INPUT_END,
                        &mut budget,
                    );
                    log_walk(ioasid, Some(p), &stats);
                    Some(PasidState::Walked {
                        leaves: found.into_iter().collect(),
                        root,
                        stats,
                    })
                }
            };
            match state {
                Some(s) => {
                    if matches!(s, PasidState::Bad | PasidState::Unreadable) {
                        tracing::info!(
                            ioasid,
                            pasid = p,
                            "PASID-table entry is malformed or unreadable: treated as not present"
                        );
                    }
                    pt.pasids.insert(p, s);
                }
                None => {
                    pt.pasids.remove(&p);
                }
            }
        }
    }

    /// Read the 4 KiB table at parent IOVA `gpa`, if the parent maps it
    /// readable.
    fn read_table(&self, view: &ParentView, gpa: u64) -> Option<[u64; pgtable::ENTRIES]> {
        let (&start, p) = view.range(..=gpa).next_back()?;
        let off = gpa - start;
        if !p.prot.read || off.checked_add(pgtable::TABLE_BYTES)? > p.size {
            return None;
        }
        let seg = p
            .segs
            .iter()
            .find(|s| s.offset <= off && off + pgtable::TABLE_BYTES <= s.offset + s.len)?;
        let mut buf = [0u8; pgtable::TABLE_BYTES as usize];
        self.backend
            .read(seg.daemon_vaddr + (off - seg.offset), &mut buf)
            .ok()?;
        Some(pgtable::entries_of(&buf))
    }

    /// `EBUSY` if a table is bound to `id` (no map or unmap then).
    fn check_no_table(&self, c: &Context, id: IoasidId) -> Result<(), Error> {
        let io = c.ioasid(id)?;
        if io.pgtable.is_some() || io.pasid_table.is_some() {
            return Err(err(
                EBUSY,
                format!(
                    "a {} is bound to IOASID {id}: it takes no MAP_DMA or UNMAP_DMA; unbind it \
                     first",
                    if io.pgtable.is_some() {
                        "page table"
                    } else {
                        "PASID table"
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Map `[iova, iova + size)` of child `id` to parent IOVA `gpa`.
    fn map_child(
        &self,
        c: &mut Context,
        id: IoasidId,
        iova: u64,
        gpa: u64,
        size: u64,
        prot: Prot,
    ) -> Result<(), Error> {
        let parent = child_parent(c, id)?;
        c.ioasid_mut(id)?.mappings.insert(
            iova,
            Mapping {
                vaddr: gpa,
                size,
                prot,
                memory: Memory::Nested,
            },
        );
        let view = parent_view_range(c, parent, gpa, gpa.saturating_add(size))?;
        let mut added = Shadow::new();
        let ranges = known_ranges(c.ioasid(id)?);
        compose(&view, &ranges, iova, gpa, size, prot, &mut added);
        if let Err(e) = self.apply_delta(c, id, Vec::new(), added) {
            c.ioasid_mut(id)?.mappings.remove(&iova);
            return Err(e);
        }
        Ok(())
    }

    /// Remove the mappings starting at `gone` from child `id`.
    fn unmap_child(&self, c: &mut Context, id: IoasidId, gone: &[u64]) -> Result<u64, Error> {
        let mut removed = Vec::new();
        for s in gone {
            let m = c.ioasid_mut(id)?.mappings.remove(s).expect("collected");
            removed.push((*s, m));
        }
        let io = c.ioasid(id)?;
        let entries: Vec<(u64, ShadowEntry)> = removed
            .iter()
            .flat_map(|(s, m)| shadow_in(&io.shadow, *s, m.size))
            .collect();
        if let Err(e) = self.apply_delta(c, id, entries, Shadow::new()) {
            let io = c.ioasid_mut(id)?;
            for (s, m) in removed {
                io.mappings.insert(s, m);
            }
            return Err(e);
        }
        Ok(removed.iter().map(|(_, m)| m.size).sum())
    }

    /// Recompute the shadow of every child of `parent` against `view` and
    /// apply it; all or nothing.
    fn refresh_children(
        &self,
        c: &mut Context,
        parent: IoasidId,
        view: &ParentView,
    ) -> Result<(), Error> {
        let mut done: Vec<(IoasidId, Shadow)> = Vec::new();
        for k in c.children_of(parent) {
            let new = child_shadow(c.ioasid(k)?, view);
            let old = c.ioasid(k)?.shadow.clone();
            if let Err(e) = self.apply_shadow(c, k, new) {
                for (d, old) in done.into_iter().rev() {
                    if let Err(undo) = self.apply_shadow(c, d, old) {
                        tracing::warn!(ioasid = d, error = %undo, "restoring a shadow failed");
                    }
                }
                return Err(e);
            }
            done.push((k, old));
        }
        Ok(())
    }

    /// Make `new` the shadow of child `id` in every group realising it,
    /// changing only the entries that differ; all or nothing.
    fn apply_shadow(&self, c: &mut Context, id: IoasidId, new: Shadow) -> Result<(), Error> {
        let old = &c.ioasid(id)?.shadow;
        let removed: Vec<(u64, ShadowEntry)> = old
            .iter()
            .filter(|(k, v)| new.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect();
        let added: Shadow = new
            .into_iter()
            .filter(|(k, v)| old.get(k) != Some(v))
            .collect();
        self.apply_delta(c, id, removed, added)
    }

    /// Take the entries `removed` out of child `id`'s shadow and put
    /// `added` in, in every group realising it; all or nothing. An entry
    /// in both is left alone (no gap in DMA for what did not change).
    fn apply_delta(
        &self,
        c: &mut Context,
        id: IoasidId,
        removed: Vec<(u64, ShadowEntry)>,
        mut added: Shadow,
    ) -> Result<(), Error> {
        let removed: Vec<(u64, ShadowEntry)> = removed
            .into_iter()
            .filter(|(k, v)| {
                if added.get(k) == Some(v) {
                    added.remove(k);
                    false
                } else {
                    true
                }
            })
            .collect();
        let added: Vec<(u64, ShadowEntry)> = added.into_iter().collect();
        let groups = c.groups_of(id);
        for (i, &g) in groups.iter().enumerate() {
            if let Err(e) = self.shadow_update(g, &removed, &added) {
                for &done in &groups[..i] {
                    if let Err(undo) = self.shadow_update(done, &added, &removed) {
                        tracing::warn!(group = done, error = %undo, "rollback of a shadow update failed");
                    }
                }
                return Err(e);
            }
        }
        let shadow = &mut c.ioasid_mut(id)?.shadow;
        for (k, _) in &removed {
            shadow.remove(k);
        }
        shadow.extend(added);
        Ok(())
    }

    /// In group `g`'s domain: unmap `removed`, then map `added`; on a
    /// failure put back what was done.
    fn shadow_update(
        &self,
        g: GroupId,
        removed: &[(u64, ShadowEntry)],
        added: &[(u64, ShadowEntry)],
    ) -> Result<(), Error> {
        let remap = |entries: &[(u64, ShadowEntry)]| {
            for (iova, e) in entries {
                if let Err(undo) = self.backend.map(g, *iova, e.daemon_vaddr, e.size, e.prot) {
                    tracing::warn!(group = g, error = %undo, "rollback of a shadow unmap failed");
                }
            }
        };
        for (i, (iova, e)) in removed.iter().enumerate() {
            if let Err(fail) = self.backend.unmap(g, *iova, e.size) {
                remap(&removed[..i]);
                return Err(fail);
            }
        }
        for (i, (iova, e)) in added.iter().enumerate() {
            if let Err(fail) = self.backend.map(g, *iova, e.daemon_vaddr, e.size, e.prot) {
                for (iova, e) in &added[..i] {
                    if let Err(undo) = self.backend.unmap(g, *iova, e.size) {
                        tracing::warn!(group = g, error = %undo, "rollback of a shadow map failed");
                    }
                }
                remap(removed);
                return Err(fail);
            }
        }
        Ok(())
    }

    /// Map the shadow of child `id` into `group`'s (empty) domain, or
    /// nothing.
    fn replay_shadow(&self, c: &Context, group: GroupId, id: IoasidId) -> Result<(), Error> {
        for (&iova, e) in &c.ioasid(id)?.shadow {
            if let Err(fail) = self
                .backend
                .map(group, iova, e.daemon_vaddr, e.size, e.prot)
            {
                if let Err(undo) = self.backend.unmap_all(group) {
                    tracing::debug!(group, error = %undo, "rollback of a replay failed");
                }
                return Err(Error::new(
                    fail.errno,
                    format!(
                        "attaching IOMMU group {group} to IOASID {id}: mapping its shadow at IOVA \
                         {iova:#x} failed: {}",
                        fail.message
                    ),
                ));
            }
        }
        Ok(())
    }

    /// RID-attach `spec` (RID-attached to `parent`) to child `child`: its
    /// group's domain switches from the parent's mappings to the child's
    /// shadow when it is the group's first device on the child.
    fn attach_child_rid(
        &self,
        c: &mut Context,
        spec: &DeviceSpec,
        child: IoasidId,
        parent: IoasidId,
    ) -> Result<(), Error> {
        if let Some(cur) = c.bound[&spec.id].child {
            return Err(err(
                EBUSY,
                format!(
                    "device {} is already attached to IOASID {cur} by RID; detach it first",
                    spec.name
                ),
            ));
        }
        let switch = match c.realising.get(&spec.group) {
            Some(r) if r.ioasid == child => None,
            Some(r) if r.ioasid == parent => Some(r.info.clone()),
            other => {
                let cur = other.map_or(0, |r| r.ioasid);
                return Err(err(
                    EBUSY,
                    format!(
                        "device {}: IOMMU group {} uses IOASID {cur}; the devices of a group \
                         share one I/O page table, so they must all use the same child",
                        spec.name, spec.group
                    ),
                ));
            }
        };
        if let Some(info) = switch {
            self.backend.unmap_all(spec.group)?;
            if let Err(e) = self.replay_shadow(c, spec.group, child) {
                if let Err(undo) = self.replay(c, spec.group, parent) {
                    tracing::warn!(group = spec.group, error = %undo, "restoring the parent's mappings failed");
                }
                return Err(e);
            }
            c.realising.insert(
                spec.group,
                Realising {
                    ioasid: child,
                    info,
                },
            );
            let groups = c.groups_of(child);
            let combined = combine(groups.iter().map(|g| &c.realising[g].info));
            c.ioasid_mut(child)?.known = combined;
        }
        c.bound.get_mut(&spec.id).expect("bound").child = Some(child);
        Ok(())
    }

    /// Undo [`Engine::attach_child_rid`]: the group's last device leaving
    /// the child gets the parent's mappings back into the group's domain.
    fn detach_child_rid(
        &self,
        c: &mut Context,
        spec: &DeviceSpec,
        child: IoasidId,
    ) -> Result<(), Error> {
        let parent = child_parent(c, child)?;
        let last = !c.bound.iter().any(|(d, b)| {
            *d != spec.id && b.child == Some(child) && self.devices[d].group == spec.group
        });
        if last {
            self.backend.unmap_all(spec.group)?;
            if let Err(e) = self.replay(c, spec.group, parent) {
                if let Err(undo) = self.replay_shadow(c, spec.group, child) {
                    tracing::warn!(group = spec.group, error = %undo, "restoring the child's shadow failed");
                }
                return Err(e);
            }
            if let Some(r) = c.realising.get_mut(&spec.group) {
                r.ioasid = parent;
            }
            let groups = c.groups_of(child);
            if let Some(combined) = combine(groups.iter().map(|g| &c.realising[g].info)) {
                c.ioasid_mut(child)?.known = Some(combined);
            }
        }
        c.bound.get_mut(&spec.id).expect("bound").child = None;
        Ok(())
    }
}

/// The parent of child `id`; `EINVAL` for a root.
fn child_parent(c: &Context, id: IoasidId) -> Result<IoasidId, Error> {
    c.ioasid(id)?.parent.ok_or_else(|| {
        err(
            EINVAL,
            format!("IOASID {id} is not a child (IOASID_CREATE_NESTING makes one)"),
        )
    })
}

/// The mappings of `parent` but those starting at `skip`, with their
/// daemon addresses.
fn parent_view(c: &Context, parent: IoasidId, skip: &[u64]) -> Result<ParentView, Error> {
    let skip: BTreeSet<u64> = skip.iter().copied().collect();
    Ok(c.ioasid(parent)?
        .mappings
        .iter()
        .filter(|(k, _)| !skip.contains(k))
        .map(|(&k, m)| {
            (
                k,
                ParentPiece {
                    size: m.size,
                    prot: m.prot,
                    segs: c.segments(m).into_owned(),
                },
            )
        })
        .collect())
}

/// The mappings of `parent` that meet `[lo, hi)`, with their daemon
/// addresses.
fn parent_view_range(c: &Context, parent: IoasidId, lo: u64, hi: u64) -> Result<ParentView, Error> {
    let mappings = &c.ioasid(parent)?.mappings;
    let mut view = ParentView::new();
    for (&k, m) in mappings.range(..hi).rev() {
        if k + m.size <= lo {
            break;
        }
        view.insert(
            k,
            ParentPiece {
                size: m.size,
                prot: m.prot,
                segs: c.segments(m).into_owned(),
            },
        );
    }
    Ok(view)
}

/// The permitted IOVA ranges a child's shadow is clipped to.
fn known_ranges(io: &Ioasid) -> Vec<(u64, u64)> {
    io.known
        .as_ref()
        .map_or_else(Vec::new, |k| k.iova_ranges.clone())
}

/// The shadow entries of `shadow` starting in `[start, start + size)`:
/// those made from a translation of that input range.
fn shadow_in(shadow: &Shadow, start: u64, size: u64) -> Vec<(u64, ShadowEntry)> {
    shadow
        .range(start..start.saturating_add(size))
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// The shadow of child `io` over the parent's mappings `view`: every
/// translation (its mappings, or its page table's leaves) composed with
/// the parent pieces it overlaps, clipped to the permitted IOVA ranges.
fn child_shadow(io: &Ioasid, view: &ParentView) -> Shadow {
    let ranges: &[(u64, u64)] = io.known.as_ref().map_or(&[], |k| &k.iova_ranges);
    let mut out = Shadow::new();
    match &io.pgtable {
        Some(t) => {
            for (&input, l) in &t.leaves {
                compose(view, ranges, input, l.gpa, l.size, l.prot, &mut out);
            }
        }
        None => {
            for (&iova, m) in &io.mappings {
                compose(view, ranges, iova, m.vaddr, m.size, m.prot, &mut out);
            }
        }
    }
    out
}

/// Add to `out` the pieces of `[input, input + size) -> [gpa, gpa + size)`
/// that the parent maps.
fn compose(
    view: &ParentView,
    ranges: &[(u64, u64)],
    input: u64,
    gpa: u64,
    size: u64,
    prot: Prot,
    out: &mut Shadow,
) {
    let end = gpa.saturating_add(size);
    for (&start, p) in view.range(..end).rev() {
        if start + p.size <= gpa {
            break;
        }
        let lo = gpa.max(start);
        let hi = end.min(start + p.size);
        let both = Prot {
            read: prot.read && p.prot.read,
            write: prot.write && p.prot.write,
        };
        if !both.read && !both.write {
            continue;
        }
        for seg in slice_segments(&p.segs, lo - start, hi - lo) {
            let iova = input + (lo - gpa) + seg.offset;
            let last = iova + (seg.len - 1);
            if ranges.is_empty() {
                out.insert(
                    iova,
                    ShadowEntry {
                        daemon_vaddr: seg.daemon_vaddr,
                        size: seg.len,
                        prot: both,
                    },
                );
                continue;
            }
            for &(a, b) in ranges {
                let (s, l) = (iova.max(a), last.min(b));
                if s <= l {
                    out.insert(
                        s,
                        ShadowEntry {
                            daemon_vaddr: seg.daemon_vaddr + (s - iova),
                            size: l - s + 1,
                            prot: both,
                        },
                    );
                }
            }
        }
    }
}

/// Replace the cached leaves that meet `[start, end)` (all of them when
/// `whole`), or that overlap a new leaf, with `found`.
///
/// Returns the leaves taken out (all of them when `whole`).
fn merge_leaves(
    leaves: &mut BTreeMap<u64, Leaf>,
    start: u64,
    end: u64,
    found: Vec<(u64, Leaf)>,
    whole: bool,
) -> Vec<(u64, Leaf)> {
    if whole {
        let old = std::mem::replace(leaves, found.into_iter().collect());
        return old.into_iter().collect();
    }
    let mut kill = Vec::new();
    let mut meets = |leaves: &BTreeMap<u64, Leaf>, s: u64, e: u64| {
        for (&k, l) in leaves.range(..e).rev() {
            if k + l.size <= s {
                break;
            }
            kill.push(k);
        }
    };
    meets(leaves, start, end);
    for (k, l) in &found {
        meets(leaves, *k, k + l.size);
    }
    let mut killed = Vec::new();
    for k in kill {
        if let Some(l) = leaves.remove(&k) {
            killed.push((k, l));
        }
    }
    leaves.extend(found);
    killed
}

fn log_walk(ioasid: IoasidId, pasid: Option<u32>, stats: &WalkStats) {
    if stats.malformed > 0 {
        tracing::info!(
            ioasid,
            pasid,
            malformed = stats.malformed,
            truncated = stats.truncated,
            "page-table walk skipped malformed entries (their ranges stay untranslated)"
        );
    }
}

fn pasid_status(t: &BoundPasidTable) -> PasidTableStatus {
    let mut s = PasidTableStatus {
        table: t.table,
        entries: t.entries,
        ..PasidTableStatus::default()
    };
    for state in t.pasids.values() {
        match state {
            PasidState::Walked { leaves, stats, .. } => {
                s.valid += 1;
                s.leaves += leaves.len() as u64;
                s.malformed += stats.malformed;
                s.truncated |= stats.truncated;
            }
            PasidState::Bad => s.bad_entries += 1,
            PasidState::Unreadable => s.unreadable_entries += 1,
        }
    }
    s
}

fn not_open(ctx: ContextId) -> Error {
    err(EINVAL, format!("ioasid context {} is not open", ctx.0))
}

fn not_bound(spec: &DeviceSpec) -> Error {
    err(
        EINVAL,
        format!(
            "device {} is not bound to this ioasid fd; bind it first (VFIO_BIND_IOASID_FD)",
            spec.name
        ),
    )
}
