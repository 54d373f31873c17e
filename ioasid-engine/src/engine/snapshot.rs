//! What the engine holds, for `cuse-ioasid status`, read without waiting
//! for a client's call.
//!
//! A client call holds its context's lock for as long as it runs: a 1 GiB
//! map pins page after page under it, a bound page table is walked under
//! it. A status request must never wait behind that, so
//! [`Engine::snapshot`] only *tries* each context's lock:
//!
//! - free: the context is read there and then (its IOASIDs, mappings,
//!   registrations and bound devices; summing mapping sizes is the only
//!   work proportional to its size), and the result kept as the context's
//!   last snapshot;
//! - held by a call: the context is reported busy with its last snapshot
//!   and that snapshot's age, and marked *wanted*; the call holding the
//!   lock takes a fresh snapshot on its way out (a flag test per call when
//!   nothing is wanted), so the next request finds current figures.
//!
//! Besides the context locks, a request takes the table of contexts for
//! reading (held by others only to insert or remove a context) and the
//! board of last snapshots (held only to store or copy an `Arc`). Neither
//! is ever held across a backend call.
//!
//! The engine's own counters (page-table walks, malformed entries) are
//! atomics, read without any lock.

use std::time::{Duration, Instant};

use super::*;

/// One IOASID as a snapshot found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoasidSnapshot {
    /// Its number in its file.
    pub id: IoasidId,
    /// The parent, for a child IOASID.
    pub parent: Option<IoasidId>,
    /// A device has been attached at least once (it accepts map and unmap).
    pub attached_once: bool,
    /// Its DMA mappings.
    pub mappings: usize,
    /// Bytes they cover.
    pub mapped_bytes: u64,
    /// IOMMU groups whose domain holds its mappings (a child's: its
    /// shadow) now.
    pub realised_in: Vec<GroupId>,
    /// Entries of a child's shadow.
    pub shadow_entries: usize,
    /// A child's bound page table.
    pub pgtable: Option<PgtableStatus>,
    /// A child's bound PASID table.
    pub pasid_table: Option<PasidTableStatus>,
}

/// A device bound to a context, and where it is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundDeviceSnapshot {
    /// The device.
    pub device: DeviceId,
    /// Its PCI address.
    pub name: String,
    /// Its IOMMU group.
    pub group: GroupId,
    /// The root IOASID its RID is attached to.
    pub rid: Option<IoasidId>,
    /// The child of `rid` its RID is attached to.
    pub child: Option<IoasidId>,
    /// PASID attachments: (PASID, IOASID).
    pub pasids: Vec<(u32, IoasidId)>,
}

/// One context (one open `/dev/ioasid` file) as a snapshot found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextSnapshot {
    /// The context.
    pub id: ContextId,
    /// Its IOASIDs, by number.
    pub ioasids: Vec<IoasidSnapshot>,
    /// Memory registrations (`IOASID_REGISTER_MEMORY`).
    pub registrations: usize,
    /// Bytes registered.
    pub registered_bytes: u64,
    /// Bytes of mappings not made from a registration.
    pub own_bytes: u64,
    /// Bytes pinned for the context, charged against the calling process's
    /// `RLIMIT_MEMLOCK`: registered bytes plus `own_bytes`.
    pub pinned_bytes: u64,
    /// Its bound devices, by id.
    pub devices: Vec<BoundDeviceSnapshot>,
    /// IOMMU groups taken out of service by a failed undo in it.
    pub groups_out_of_service: usize,
}

/// A context as one status request found it.
#[derive(Clone, Debug)]
pub struct ContextView {
    /// The context.
    pub id: ContextId,
    /// A call held the context: `snapshot` is the last one taken.
    pub busy: bool,
    /// The figures; `None` only when the context was busy at every look.
    pub snapshot: Option<Arc<ContextSnapshot>>,
    /// How old `snapshot` is (zero when the context was free).
    pub age: Duration,
}

/// The engine's own counters since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Page-table walks (at bind, at invalidation, of each PASID's table).
    pub walks: u64,
    /// Walks that met malformed entries (malformed tables).
    pub malformed_walks: u64,
    /// Malformed entries met, in all.
    pub malformed_entries: u64,
    /// Walks cut short by their budget.
    pub truncated_walks: u64,
}

/// The last snapshot of every context, and the engine's counters.
#[derive(Debug, Default)]
pub(super) struct Board {
    /// How many contexts are wanted (a flag test per call when none is).
    wanted: AtomicUsize,
    last: Mutex<HashMap<ContextId, Entry>>,
    walks: AtomicU64,
    malformed_walks: AtomicU64,
    malformed_entries: AtomicU64,
    truncated_walks: AtomicU64,
}

#[derive(Debug, Default)]
struct Entry {
    last: Option<(Arc<ContextSnapshot>, Instant)>,
    wanted: bool,
}

impl Board {
    /// A call on `c` is done (its lock still held): take the snapshot a
    /// status request wanted, if any.
    pub(super) fn call_done(&self, c: &Context, devices: &BTreeMap<DeviceId, DeviceSpec>) {
        if self.wanted.load(Ordering::Relaxed) == 0 {
            return;
        }
        let wanted = {
            let mut last = lock(&self.last);
            match last.get_mut(&c.id) {
                Some(e) if e.wanted => {
                    e.wanted = false;
                    self.wanted.fetch_sub(1, Ordering::Relaxed);
                    true
                }
                _ => false,
            }
        };
        if wanted {
            self.store(c.id, Arc::new(take(c, devices)));
        }
    }

    /// Context `ctx` is closed: forget it.
    pub(super) fn forget(&self, ctx: ContextId) {
        if let Some(e) = lock(&self.last).remove(&ctx) {
            if e.wanted {
                self.wanted.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Count one page-table walk.
    pub(super) fn count_walk(&self, stats: &WalkStats) {
        self.walks.fetch_add(1, Ordering::Relaxed);
        if stats.malformed > 0 {
            self.malformed_walks.fetch_add(1, Ordering::Relaxed);
            self.malformed_entries
                .fetch_add(stats.malformed, Ordering::Relaxed);
        }
        if stats.truncated {
            self.truncated_walks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn store(&self, ctx: ContextId, snapshot: Arc<ContextSnapshot>) {
        lock(&self.last).entry(ctx).or_default().last = Some((snapshot, Instant::now()));
    }

    /// The busy context `ctx`'s last snapshot; marks it wanted.
    fn busy(&self, ctx: ContextId) -> ContextView {
        let mut last = lock(&self.last);
        let e = last.entry(ctx).or_default();
        if !e.wanted {
            e.wanted = true;
            self.wanted.fetch_add(1, Ordering::Relaxed);
        }
        let (snapshot, age) = match &e.last {
            Some((s, at)) => (Some(s.clone()), at.elapsed()),
            None => (None, Duration::ZERO),
        };
        ContextView {
            id: ctx,
            busy: true,
            snapshot,
            age,
        }
    }
}

/// Read context `c` (its lock held); `devices` names its bound devices.
fn take(c: &Context, devices: &BTreeMap<DeviceId, DeviceSpec>) -> ContextSnapshot {
    let ioasids = c
        .ioasids
        .iter()
        .map(|(k, io)| {
            let id = k as IoasidId + 1;
            IoasidSnapshot {
                id,
                parent: io.parent,
                attached_once: io.known.is_some(),
                mappings: io.mappings.len(),
                mapped_bytes: io.mappings.values().map(|m| m.size).sum(),
                realised_in: c.groups_of(id).to_vec(),
                shadow_entries: io.shadow.len(),
                pgtable: io.pgtable.as_ref().map(|t| PgtableStatus {
                    root: t.root,
                    leaves: t.leaves.len() as u64,
                    last_walk: t.last_walk,
                    malformed: t.malformed,
                    walks: t.walks,
                }),
                pasid_table: io.pasid_table.as_ref().map(pasid_status),
            }
        })
        .collect();
    ContextSnapshot {
        id: c.id,
        ioasids,
        registrations: c.registrations.len(),
        registered_bytes: c.registered_bytes,
        own_bytes: c.own_bytes,
        pinned_bytes: c.pinned(),
        devices: c
            .bound
            .iter()
            .map(|(&device, b)| {
                let spec = devices.get(&device);
                BoundDeviceSnapshot {
                    device,
                    name: spec.map_or_else(|| "?".to_string(), |s| s.name.clone()),
                    group: spec.map_or(0, |s| s.group),
                    rid: b.rid,
                    child: b.child,
                    pasids: b.pasids.iter().map(|(&p, &i)| (p, i)).collect(),
                }
            })
            .collect(),
        groups_out_of_service: c.broken.load(Ordering::Relaxed),
    }
}

impl Engine {
    /// Every open context, by id, as it is now or, for a context a call
    /// holds, as it was last seen (see the module documentation: this
    /// never waits for a client's call).
    pub fn snapshot(&self) -> Vec<ContextView> {
        let mut contexts: Vec<(ContextId, Arc<Mutex<Context>>)> = self
            .contexts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect();
        contexts.sort_by_key(|(id, _)| *id);
        let mut views = Vec::with_capacity(contexts.len());
        for (id, arc) in contexts {
            let guard = match arc.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    views.push(self.board.busy(id));
                    continue;
                }
            };
            if guard.closed {
                continue;
            }
            let s = Arc::new(take(&guard, &self.devices));
            drop(guard);
            self.board.store(id, s.clone());
            views.push(ContextView {
                id,
                busy: false,
                snapshot: Some(s),
                age: Duration::ZERO,
            });
        }
        views
    }

    /// Page-table walks and malformed entries since the engine started.
    pub fn counters(&self) -> EngineCounters {
        EngineCounters {
            walks: self.board.walks.load(Ordering::Relaxed),
            malformed_walks: self.board.malformed_walks.load(Ordering::Relaxed),
            malformed_entries: self.board.malformed_entries.load(Ordering::Relaxed),
            truncated_walks: self.board.truncated_walks.load(Ordering::Relaxed),
        }
    }
}
