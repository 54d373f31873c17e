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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use libc::{EBUSY, EEXIST, EINVAL, ENODEV, ENOENT, ENOMEM};
use slab::Slab;

use crate::backend::{Alias, Backend, DomainInfo, GroupId, Pid, Prot, Segment};
use crate::error::{err, EngineError};

/// Width of a PCIe PASID.
pub const PASID_BITS: u32 = 20;

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
}

/// What closing a context did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClosedContext {
    /// The devices that were bound to it and now are not: the device front
    /// end closes their device fds.
    pub unbound: Vec<DeviceId>,
    /// Backend failures met on the way. A group whose domain could not be
    /// emptied is taken out of service (its devices cannot be bound again).
    pub errors: Vec<EngineError>,
}

/// Where a mapping's memory comes from.
#[derive(Debug)]
enum Memory {
    /// An alias of its own, released when the mapping goes.
    Own(Alias),
    /// A slice of the registration starting at this client address.
    Registered(u64),
}

#[derive(Debug)]
struct Mapping {
    vaddr: u64,
    size: u64,
    prot: Prot,
    memory: Memory,
}

/// An I/O address space. Nesting (a parent IOASID) will be added here.
#[derive(Debug, Default)]
struct Ioasid {
    /// By IOVA; never overlapping.
    mappings: BTreeMap<u64, Mapping>,
    /// Domain constraints, `Some` once a device has been attached.
    known: Option<DomainInfo>,
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
    rid: Option<IoasidId>,
    pasids: BTreeMap<u32, IoasidId>,
}

/// A group whose domain holds an IOASID's mappings.
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
    fn check_open(&self, ctx: ContextId) -> Result<(), EngineError> {
        if self.closed {
            return Err(not_open(ctx));
        }
        Ok(())
    }

    fn ioasid(&self, id: IoasidId) -> Result<&Ioasid, EngineError> {
        ioasid_key(id)
            .and_then(|k| self.ioasids.get(k))
            .ok_or_else(|| {
                err(
                    ENOENT,
                    format!("IOASID {id} does not exist in this ioasid fd"),
                )
            })
    }

    fn ioasid_mut(&mut self, id: IoasidId) -> Result<&mut Ioasid, EngineError> {
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

    fn segments(&self, m: &Mapping) -> Vec<Segment> {
        match &m.memory {
            Memory::Own(alias) => alias.segments.clone(),
            Memory::Registered(start) => {
                let reg = &self.registrations[start];
                slice_segments(&reg.alias.segments, m.vaddr - start, m.size)
            }
        }
    }

    fn pinned(&self) -> u64 {
        self.registered_bytes + self.own_bytes
    }
}

impl Engine {
    /// An engine serving `devices` over `backend`. Fails with `EINVAL` when
    /// two devices share an id.
    pub fn new(backend: Arc<dyn Backend>, devices: Vec<DeviceSpec>) -> Result<Self, EngineError> {
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

    fn context(&self, ctx: ContextId) -> Result<Arc<Mutex<Context>>, EngineError> {
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

    fn spec(&self, dev: DeviceId) -> Result<&DeviceSpec, EngineError> {
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
    pub fn close_context(&self, ctx: ContextId) -> Result<ClosedContext, EngineError> {
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
                closed.errors.push(EngineError::new(
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
        Ok(closed)
    }

    /// Bind device `dev` to context `ctx`. `EBUSY` if it is bound already
    /// (here or elsewhere), or if another device of its IOMMU group is
    /// bound to another context.
    pub fn bind(&self, dev: DeviceId, ctx: ContextId) -> Result<(), EngineError> {
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
    pub fn unbind(&self, dev: DeviceId, ctx: ContextId) -> Result<(), EngineError> {
        let spec = self.spec(dev)?;
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
        if let Some(id) = bd.rid {
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
    ) -> Result<(), EngineError> {
        let spec = self.spec(dev)?;
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
        c.ioasid(ioasid)?;
        let Some(pasid) = pasid else {
            return self.attach_rid(&mut c, spec, ioasid);
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

    fn attach_rid(
        &self,
        c: &mut Context,
        spec: &DeviceSpec,
        id: IoasidId,
    ) -> Result<(), EngineError> {
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
                let groups = c.groups_of(id);
                let combined = combine(groups.iter().map(|g| &c.realising[g].info));
                c.ioasid_mut(id)?.known = combined;
            }
        }
        c.bound.get_mut(&spec.id).expect("bound").rid = Some(id);
        Ok(())
    }

    /// Map every mapping of `id` into `group`'s (empty) domain, or nothing.
    fn replay(&self, c: &Context, group: GroupId, id: IoasidId) -> Result<(), EngineError> {
        let io = c.ioasid(id)?;
        for (&iova, m) in &io.mappings {
            if let Err(e) = self.map_segments(group, iova, &c.segments(m), m.prot) {
                if let Err(undo) = self.backend.unmap_all(group) {
                    tracing::debug!(group, error = %undo, "rollback of a replay failed");
                }
                return Err(EngineError::new(
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
    ) -> Result<(), EngineError> {
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
                return Err(e.into());
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
    ) -> Result<(), EngineError> {
        let spec = self.spec(dev)?;
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
        c.ioasid(ioasid)?;
        match pasid {
            None if bd.rid == Some(ioasid) => self.detach_rid(&mut c, spec, ioasid),
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

    fn detach_rid(
        &self,
        c: &mut Context,
        spec: &DeviceSpec,
        id: IoasidId,
    ) -> Result<(), EngineError> {
        let last = !c.bound.iter().any(|(d, b)| {
            *d != spec.id && b.rid == Some(id) && self.devices[d].group == spec.group
        });
        if last {
            self.backend.unmap_all(spec.group)?;
            c.realising.remove(&spec.group);
            let groups = c.groups_of(id);
            if let Some(combined) = combine(groups.iter().map(|g| &c.realising[g].info)) {
                c.ioasid_mut(id)?.known = Some(combined);
            }
        }
        c.bound.get_mut(&spec.id).expect("bound").rid = None;
        Ok(())
    }

    /// The RFC's group rule: while some bound devices of a group are
    /// attached to `id` by RID and others are not, `id` refuses everything.
    fn check_group_rule(&self, c: &Context, id: IoasidId) -> Result<(), EngineError> {
        let groups: BTreeSet<GroupId> = c.groups_of(id).into_iter().collect();
        let missing: Vec<&str> = c
            .bound
            .iter()
            .filter(|(d, b)| groups.contains(&self.devices[d].group) && b.rid != Some(id))
            .map(|(d, _)| self.name(*d))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
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
    pub fn alloc(&self, ctx: ContextId) -> Result<IoasidId, EngineError> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let entry = c.ioasids.vacant_entry();
        let id = u32::try_from(entry.key() + 1)
            .ok()
            .filter(|&i| i <= i32::MAX as u32)
            .ok_or_else(|| err(libc::ENOSPC, "no IOASID number left in this ioasid fd"))?;
        entry.insert(Ioasid::default());
        Ok(id)
    }

    /// Free IOASID `ioasid` and its mappings. `ENOENT` if unknown, `EBUSY`
    /// while a device is attached to it (or the group rule holds).
    pub fn free(&self, ctx: ContextId, ioasid: IoasidId) -> Result<(), EngineError> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        c.ioasid(ioasid)?;
        self.check_group_rule(&c, ioasid)?;
        let users: Vec<&str> = c
            .bound
            .iter()
            .filter(|(_, b)| b.rid == Some(ioasid) || b.pasids.values().any(|&i| i == ioasid))
            .map(|(d, _)| self.name(*d))
            .collect();
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
        }
    }

    /// Check an IOASID accepts commands; returns its realising groups and
    /// domain constraints.
    fn usable(&self, c: &Context, id: IoasidId) -> Result<(Vec<GroupId>, DomainInfo), EngineError> {
        let io = c.ioasid(id)?;
        self.check_group_rule(c, id)?;
        let known = io.known.clone().ok_or_else(|| {
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
    ) -> Result<(), EngineError> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let (groups, known) = self.usable(&c, ioasid)?;
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
        }
        c.ioasid_mut(ioasid)?.mappings.insert(iova, mapping);
        Ok(())
    }

    fn check_memlock(&self, c: &Context, pid: Pid, more: u64) -> Result<(), EngineError> {
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
    ) -> Result<u64, EngineError> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let (groups, known) = self.usable(&c, ioasid)?;
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
        self.remove_mappings(&mut c, ioasid, &groups, &gone, |b, g| {
            b.unmap(g, iova, size).map(|_| ())
        })
    }

    /// Unmap everything from IOASID `ioasid` (`VFIO_DMA_UNMAP_FLAG_ALL`);
    /// returns the bytes unmapped.
    pub fn unmap_all_dma(&self, ctx: ContextId, ioasid: IoasidId) -> Result<u64, EngineError> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let (groups, _) = self.usable(&c, ioasid)?;
        let gone: Vec<u64> = c.ioasid(ioasid)?.mappings.keys().copied().collect();
        if gone.is_empty() {
            return Ok(0);
        }
        self.remove_mappings(&mut c, ioasid, &groups, &gone, |b, g| b.unmap_all(g))
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
        unmap: impl Fn(&dyn Backend, GroupId) -> Result<(), crate::backend::BackendError>,
    ) -> Result<u64, EngineError> {
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
                return Err(e.into());
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
    ) -> Result<(), EngineError> {
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
    pub fn unregister_memory(
        &self,
        ctx: ContextId,
        vaddr: u64,
        size: u64,
    ) -> Result<(), EngineError> {
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
    pub fn info(&self, ctx: ContextId, ioasid: IoasidId) -> Result<IoasidInfo, EngineError> {
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
        let Some(known) = &io.known else {
            return Ok(IoasidInfo {
                devices,
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
        })
    }

    /// Bytes pinned for context `ctx`: registered bytes plus the bytes of
    /// mappings not made from a registration.
    pub fn pinned_bytes(&self, ctx: ContextId) -> Result<u64, EngineError> {
        let arc = self.context(ctx)?;
        let c = lock(&arc);
        c.check_open(ctx)?;
        Ok(c.pinned())
    }
}

fn not_open(ctx: ContextId) -> EngineError {
    err(EINVAL, format!("ioasid context {} is not open", ctx.0))
}

fn not_bound(spec: &DeviceSpec) -> EngineError {
    err(
        EINVAL,
        format!(
            "device {} is not bound to this ioasid fd; bind it first (VFIO_BIND_IOASID_FD)",
            spec.name
        ),
    )
}
