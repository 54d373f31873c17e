//! The engine: contexts, IOASIDs, mappings, registrations, devices,
//! nesting and tables, one concern per module:
//!
//! - `types`: the public vocabulary (ids, requests, reports);
//! - `context`: contexts and IOASIDs (alloc, free, info);
//! - `mapping`: map, unmap and registration, on every realising domain;
//! - `device`: bind, attach, detach and the group rule;
//! - `nesting`: child IOASIDs and their shadows;
//! - `tables`: bound page tables, PASID tables and invalidation;
//! - `ioas`, `hwpt`, `iova`: iommufd's objects (IOAS, HWPT, device ids),
//!   its IOAS commands, attach and replace, and the IOVA allocator;
//! - `snapshot`: what a status request sees, without waiting for calls;
//! - this file: the [`Engine`] itself, opening and closing contexts.
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
//!   make, runs under it, so contexts never wait for each other. One
//!   exception: a private map (see `private`) is made by the client's own
//!   thread *without* the lock, because a client killed meanwhile closes
//!   its files on its way out and waits for their release, which takes the
//!   lock. What it read under the lock is checked again under the lock
//!   afterwards, and the groups it maps into are held in the registry
//!   (`pinning`) so that no other context can bind them meanwhile.
//! - `registry` (which device is bound to which context, which groups are
//!   out of service) is taken *after* a context lock, never before, and
//!   never while holding two context locks. Lock order: context → registry.
//! - `board` (the last snapshot of each context, for status requests) is
//!   held only to store or copy one; it is taken after a context lock or
//!   alone. [`Engine::snapshot`] only *tries* context locks, so a status
//!   request never waits for a client's call (see `snapshot`).
//!
//! Group ownership (all bound devices of a group belong to one context)
//! means a group's domain and its devices' attachments are only ever
//! touched under the lock of the context that owns the group.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use nix::errno::Errno::{EBUSY, EEXIST, EFAULT, EINVAL, EIO, ENODEV, ENOENT, ENOMEM, ENOSPC};
use slab::Slab;
use smallvec::SmallVec;

use crate::backend::{
    Alias, Backend, ClientEntry, ClientThread, DmaEntry, DomainInfo, GroupId, MmId, Pid,
    ProcessMemory, Prot, Resolved, Segment, Segments,
};
use crate::error::{err, Error};
use crate::pgtable::{self, Leaf, PasidEntry, WalkStats};

mod accounts;
mod client;
mod context;
mod device;
mod hwpt;
mod ioas;
mod iova;
mod mapping;
mod nesting;
mod private;
mod service;
mod snapshot;
mod tables;
mod types;

use accounts::{Accounts, Item};
use context::*;

pub use accounts::Budgets;
pub use client::{Client, ClientWork};

pub use ioas::{IoasMap, MapSource, ObjectId, ObjectKind};
use nesting::*;
pub use snapshot::{
    BoundDeviceSnapshot, ContextSnapshot, ContextView, EngineCounters, IoasidSnapshot,
};
use tables::*;
pub use types::*;

#[derive(Debug, Default)]
struct Registry {
    bound: HashMap<DeviceId, ContextId>,
    /// Groups whose domain may hold what the engine does not track: an
    /// undo failed in the context named (`Some`), or the domain could not
    /// be emptied when its context closed (`None`: until the daemon
    /// restarts). See `service`.
    out_of_service: HashMap<GroupId, Option<ContextId>>,
    /// Groups a client's thread is pinning private memory into, without
    /// the context lock (see `private`): the context and how many such
    /// maps are in flight. No other context may bind a device of the group
    /// until they are settled, so a late map or its undo never reaches a
    /// domain that has changed hands.
    pinning: HashMap<GroupId, (ContextId, usize)>,
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
    /// What each client process holds (a leaf lock: taken last).
    accounts: Mutex<Accounts>,
    /// Private memory is pinned by the client's own thread (else refused
    /// with `EFAULT`, as before issue 14).
    private_memory: AtomicBool,
    /// Numbers of private-map reservations.
    next_reservation: AtomicU64,
    /// The engine itself, for work that runs after a reply.
    me: Weak<Engine>,
    /// Last snapshots and counters, for status requests (see `snapshot`).
    board: snapshot::Board,
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

/// The groups realising an IOASID: a handful at most.
type Groups = smallvec::SmallVec<[GroupId; 4]>;

/// The segments, relative to the mapping's start, of `[off, off + size)`
/// of an alias.
fn slice_segments(segments: &[Segment], off: u64, size: u64) -> Segments {
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

impl Engine {
    /// An engine serving `devices` over `backend`. Fails with `EINVAL` when
    /// two devices share an id.
    pub fn new(backend: Arc<dyn Backend>, devices: Vec<DeviceSpec>) -> Result<Arc<Self>, Error> {
        let mut table = BTreeMap::new();
        for d in devices {
            if let Some(old) = table.insert(d.id, d) {
                return Err(err(
                    EINVAL,
                    format!("device id {} given twice ({})", old.id.0, old.name),
                ));
            }
        }
        Ok(Arc::new_cyclic(|me| Engine {
            backend,
            devices: table,
            contexts: RwLock::new(HashMap::new()),
            next_context: AtomicU64::new(1),
            registry: Mutex::new(Registry::default()),
            walk_limit: AtomicU64::new(pgtable::DEFAULT_WALK_LIMIT),
            accounts: Mutex::new(Accounts::default()),
            private_memory: AtomicBool::new(true),
            next_reservation: AtomicU64::new(1),
            me: me.clone(),
            board: snapshot::Board::default(),
        }))
    }

    /// Pin private memory (`MAP_PRIVATE`, anonymous, heap, stack) by the
    /// client's own thread (the default), or refuse it with `EFAULT` and
    /// advice to use shared memory (`false`: `--no-private-memory`).
    pub fn set_private_memory(&self, enabled: bool) {
        self.private_memory.store(enabled, Ordering::Relaxed);
    }

    /// Set what one client process may hold (default [`Budgets::default`]).
    pub fn set_budgets(&self, budgets: Budgets) {
        lock(&self.accounts).budgets = budgets;
    }

    /// This engine, for work that runs after the call (a client's own
    /// thread pinning private memory).
    fn shared(&self) -> Arc<Engine> {
        self.me
            .upgrade()
            .expect("the engine is alive while it serves")
    }

    /// Bytes of shared memory the daemon pins for process `pid`, each byte
    /// once however often it is mapped (private memory is charged by the
    /// kernel, to the process's own `locked_vm`).
    pub fn pinned_bytes_of_process(&self, pid: Pid) -> u64 {
        lock(&self.accounts).pinned(pid)
    }

    fn take_budget(&self, owner: Option<Pid>, item: Item, n: usize) -> Result<(), Error> {
        match owner {
            Some(pid) => lock(&self.accounts).take(pid, item, n),
            None => Ok(()),
        }
    }

    fn give_budget(&self, owner: Option<Pid>, item: Item, n: usize) {
        if let Some(pid) = owner {
            lock(&self.accounts).give(pid, item, n);
        }
    }

    /// Give back what holding `alias` charged to process `charged`: its
    /// bytes and its areas.
    fn uncharge(&self, charged: Pid, alias: &Alias) {
        let mut a = lock(&self.accounts);
        a.uncharge(charged, &alias.segments);
        a.give(charged, Item::Aliases, alias.segments.len());
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

    /// Map `entry` into `group`'s domain: the one place the engine hands
    /// client memory to a domain.
    fn map_alias(&self, group: GroupId, entry: DmaEntry) -> Result<(), Error> {
        // SAFETY: every daemon address the engine maps is cut from a
        // segment of an alias it holds: a root mapping's own, a
        // registration's (kept while a mapping uses it), or for a shadow
        // entry the parent mapping's, which is taken out of every child's
        // shadow before it goes. An alias is released only after the
        // domains stopped mapping it, or, when an undo failed and a domain
        // may still map it, only once that group's domain has been emptied
        // (the group is out of service meanwhile).
        unsafe { self.backend.map(group, entry) }
    }

    /// Run `f` on context `ctx` under its lock: `EINVAL` if the context
    /// is not open (or was closed while this call waited for the lock).
    fn with_context<R>(
        &self,
        ctx: ContextId,
        f: impl FnOnce(&mut Context) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let result = f(&mut c);
        self.board.call_done(&c, &self.devices);
        result
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

    /// Open a new context (one open of `/dev/ioasid`) that no client
    /// process is charged with (tools and tests).
    pub fn open_context(&self) -> ContextId {
        self.insert_context(None)
    }

    /// Open a new context for `client`'s process, which is charged with
    /// it, its IOASIDs and its mappings (see [`Budgets`]): `EMFILE` past
    /// its budget of files.
    pub fn open_context_for(&self, client: &dyn Client) -> Result<ContextId, Error> {
        let pid = client.pid()?;
        lock(&self.accounts).take(pid, Item::Files, 1)?;
        Ok(self.insert_context(Some(pid)))
    }

    fn insert_context(&self, owner: Option<Pid>) -> ContextId {
        let id = ContextId(self.next_context.fetch_add(1, Ordering::Relaxed));
        self.contexts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::new(Mutex::new(Context::new(id, owner))));
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
        self.board.forget(ctx);
        let mut closed = ClosedContext::default();
        // The groups to empty: those realising an IOASID, and those out of
        // service because of this context (their domain may hold anything).
        let mut groups: BTreeSet<GroupId> = std::mem::take(&mut c.realising).into_keys().collect();
        groups.extend(
            lock(&self.registry)
                .out_of_service
                .iter()
                .filter(|(_, owner)| **owner == Some(ctx))
                .map(|(g, _)| *g),
        );
        for group in groups {
            if let Err(e) = self.backend.unmap_all(group) {
                lock(&self.registry).out_of_service.insert(group, None);
                closed.errors.push(Error::new(
                    e.errno,
                    format!(
                        "IOMMU group {group}: could not empty its domain ({}); the group is \
                         out of service until the daemon restarts",
                        e.message
                    ),
                ));
            } else {
                let mut reg = lock(&self.registry);
                if reg.out_of_service.get(&group) == Some(&Some(ctx)) {
                    reg.out_of_service.remove(&group);
                }
            }
        }
        c.broken.store(0, Ordering::Relaxed);
        for alias in std::mem::take(&mut c.held) {
            self.backend.release_alias(&alias);
        }
        let bound = std::mem::take(&mut c.bound);
        {
            let mut reg = lock(&self.registry);
            for dev in bound.keys() {
                reg.bound.remove(dev);
            }
        }
        closed.unbound = bound.into_keys().collect();
        let owner = c.owner;
        self.give_budget(owner, Item::Files, 1);
        self.give_budget(owner, Item::Ioasids, c.ioasids.len());
        self.give_budget(owner, Item::Mappings, c.mapping_count());
        for (_, ioasid) in std::mem::take(&mut c.ioasids) {
            for (_, m) in ioasid.mappings {
                if let Memory::Own { alias, charged } = m.memory {
                    self.uncharge(charged, &alias);
                    self.backend.release_alias(&alias);
                }
            }
        }
        for (_, r) in std::mem::take(&mut c.registrations) {
            if let Some((alias, charged)) = r.alias {
                self.uncharge(charged, &alias);
                self.backend.release_alias(&alias);
            }
        }
        c.own_bytes = 0;
        c.registered_bytes = 0;
        drop(c);
        // Released aliases may linger in the backend's idle cache, keeping
        // client files alive: a closed context leaves nothing behind.
        self.backend.trim();
        Ok(closed)
    }

    /// Bytes pinned for context `ctx`: registered bytes plus the bytes of
    /// mappings not made from a registration.
    pub fn pinned_bytes(&self, ctx: ContextId) -> Result<u64, Error> {
        self.with_context(ctx, |c| Ok(c.pinned()))
    }

    /// Set the budget of one table walk (default
    /// [`pgtable::DEFAULT_WALK_LIMIT`]): each table read costs
    /// [`pgtable::TABLE_READ_COST`], each present entry 1; a walk that runs
    /// out stops and is counted as malformed. A PASID-table read shares one
    /// budget among all the PASIDs it walks.
    pub fn set_walk_limit(&self, limit: u64) {
        self.walk_limit.store(limit, Ordering::Relaxed);
    }
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
