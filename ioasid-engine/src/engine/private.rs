//! Private memory (issue 14): `MAP_PRIVATE`, anonymous memory, the heap and
//! stacks cannot be aliased by the daemon, and VFIO type1 pins only the
//! memory of the process that issues `VFIO_IOMMU_MAP_DMA`. So the map is
//! made by the client's own thread, once its call is answered
//! ([`Client::defer_as_client`], [`Backend::map_as_client`]), in two
//! phases:
//!
//! 1. Under the context lock, with the call: everything is checked as for
//!    shared memory, the `RLIMIT_MEMLOCK` sum is checked (see
//!    `docs/design.md`, "Memory accounting"), and the IOVA range is
//!    *reserved* ([`Memory::Pending`]) so no other map takes it.
//! 2. After the reply, on the same daemon thread, the client's thread
//!    stopped: the reservation is made real in every domain realising the
//!    IOASID, or dropped; the client's call returns that result. The
//!    client's thread runs without the context lock (a killed client's
//!    release needs it); the domains are read under the lock and held
//!    against other contexts' binds ([`InFlight`]), and what changed
//!    meanwhile is settled under the lock afterwards: a reservation
//!    unmapped meanwhile (by another thread of the client) is left alone
//!    (the map happened, then the unmap), a group detached meanwhile loses
//!    the map again, a group attached meanwhile gets its turn.
//!
//! Pages pinned by one process can be pinned into another domain only by
//! that same process (the same address space: an `exec` makes another), so
//! attaching a device whose group must replay private mappings is done by
//! the attaching thread, and refused with `EFAULT` when it belongs to
//! another process. A parent of nested IOASIDs maps shared memory only (its
//! children's shadows are made of the daemon's aliases).

use nix::errno::Errno::EAGAIN;

use super::*;

impl Engine {
    /// Phase 1 of a private map (see the module documentation): reserve
    /// `map.iova` and leave the map to `client`'s own thread.
    pub(super) fn map_private(
        &self,
        c: &mut Context,
        client: &dyn Client,
        ioasid: IoasidId,
        map: DmaMap,
        why: String,
    ) -> Result<(), Error> {
        if !self.private_memory.load(Ordering::Relaxed) {
            return Err(mapping::private_refused(&why));
        }
        if c.has_children(ioasid) {
            return Err(err(
                EFAULT,
                format!(
                    "{why}: IOASID {ioasid} has nested children, whose shadows are made of the \
                     daemon's aliases of its memory, so it maps shared memory only (memfd, shm, \
                     hugetlbfs, MAP_SHARED)"
                ),
            ));
        }
        let domains = c.groups_of(ioasid).len().max(1) as u64;
        self.check_private_memlock(client.tid(), map.size.saturating_mul(domains))?;
        let token = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        c.ioasid_mut(ioasid)?.mappings.insert(
            map.iova,
            Mapping {
                vaddr: map.vaddr,
                size: map.size,
                prot: map.prot,
                memory: Memory::Pending(token),
            },
        );
        let engine = self.shared();
        let ctx = c.id;
        let work: ClientWork =
            Box::new(move |thread| engine.pin_private_map(ctx, ioasid, map, token, thread));
        if let Err(e) = client.defer_as_client(work) {
            c.ioasid_mut(ioasid)?.mappings.remove(&map.iova);
            return Err(Error::new(
                e.errno,
                format!(
                    "{why}, which only its own thread can pin, but: {}",
                    e.message
                ),
            ));
        }
        tracing::debug!(
            ctx = ctx.0,
            ioasid,
            iova = map.iova,
            size = map.size,
            "private memory: the client's thread maps it after the reply"
        );
        Ok(())
    }

    /// The kernel charges what the client's thread pins to the client's own
    /// `locked_vm` and checks its limit against that alone; the daemon
    /// checks the sum with the shared memory it pins for the process, so
    /// mixing both cannot exceed the limit. `more`: the bytes the kernel
    /// will charge (type1 charges each domain).
    fn check_private_memlock(&self, tid: Pid, more: u64) -> Result<(), Error> {
        let Some(limit) = self.backend.memlock_limit(tid)? else {
            return Ok(());
        };
        let pm = self.backend.process_memory(tid)?;
        let shared = lock(&self.accounts).pinned(pm.pid);
        if shared.saturating_add(pm.locked).saturating_add(more) > limit {
            return Err(mapping::memlock_exceeded(
                pm.pid, more, shared, pm.locked, limit,
            ));
        }
        Ok(())
    }

    /// Phase 2 of a private map, as the client's thread. No lock is held
    /// while the client's thread runs: a client killed meanwhile closes its
    /// files on its way out, and their release takes the context lock (a
    /// CUSE release is synchronous), so holding it would make the two wait
    /// for each other until the injection's timeout. The domains to map
    /// are read under the lock, mapped without it, and checked again under
    /// it: what no longer belongs (the reservation unmapped, the group
    /// detached, the context closed) is unmapped again, and groups that
    /// joined meanwhile get their turn.
    fn pin_private_map(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        map: DmaMap,
        token: u64,
        thread: Result<&mut dyn ClientThread, Error>,
    ) -> Result<(), Error> {
        let reserved = |c: &Context| {
            c.ioasid(ioasid)
                .ok()
                .and_then(|io| io.mappings.get(&map.iova))
                .is_some_and(|m| matches!(m.memory, Memory::Pending(t) if t == token))
        };
        let arc = self.context(ctx)?;
        let mut in_flight = InFlight::new(self, ctx);
        let mut todo = {
            let c = lock(&arc);
            c.check_open(ctx)?;
            if !reserved(&c) {
                // Unmapped (or its IOASID freed) by another thread meanwhile.
                return Ok(());
            }
            let groups = c.groups_of(ioasid);
            in_flight.hold(&groups);
            groups
        };
        let entry = ClientEntry {
            iova: map.iova,
            client_vaddr: map.vaddr,
            size: map.size,
            prot: map.prot,
        };
        let mut mapped: SmallVec<[GroupId; 2]> = SmallVec::new();
        let (mut thread, mut outcome) = match thread {
            Ok(t) => {
                let mm = t.mm();
                (Some(t), mm)
            }
            Err(e) => (None, Err(e)),
        };
        let mut rounds = 0;
        loop {
            if let (Some(t), Ok(_)) = (thread.as_deref_mut(), &outcome) {
                for &g in &todo {
                    match self.backend.map_as_client(g, t, entry) {
                        Ok(()) => mapped.push(g),
                        Err(e) => {
                            outcome = Err(e);
                            break;
                        }
                    }
                }
            }
            let mut c = lock(&arc);
            let open = c.check_open(ctx).is_ok();
            let still = open && reserved(&c);
            let now = if still {
                c.groups_of(ioasid)
            } else {
                Groups::new()
            };
            let keep = outcome.is_ok() && still;
            // Unmap what is not wanted (or all of it, on failure).
            let stale: Vec<GroupId> = mapped
                .iter()
                .copied()
                .filter(|g| !keep || !now.contains(g))
                .collect();
            for g in &stale {
                if let Err(undo) = self.backend.unmap(*g, map.iova, map.size) {
                    self.undo_failed(&c, *g, "unmapping a private map that lost its place", &undo);
                }
            }
            mapped.retain(|g| !stale.contains(g));
            if !keep {
                if still {
                    c.ioasid_mut(ioasid)?.mappings.remove(&map.iova);
                    self.give_budget(c.owner, Item::Mappings, 1);
                }
                return outcome.map(drop);
            }
            todo = now.into_iter().filter(|g| !mapped.contains(g)).collect();
            in_flight.hold(&todo);
            rounds += 1;
            if todo.is_empty() || rounds == 4 {
                if !todo.is_empty() {
                    // Attaches keep racing with this map: give up cleanly.
                    for g in mapped.drain(..) {
                        if let Err(undo) = self.backend.unmap(g, map.iova, map.size) {
                            self.undo_failed(&c, g, "unmapping a private map given up", &undo);
                        }
                    }
                    c.ioasid_mut(ioasid)?.mappings.remove(&map.iova);
                    self.give_budget(c.owner, Item::Mappings, 1);
                    return Err(err(
                        EAGAIN,
                        format!(
                            "IOASID {ioasid} kept gaining devices while private memory was \
                             being mapped at IOVA {:#x}; map it again",
                            map.iova
                        ),
                    ));
                }
                let m = c
                    .ioasid_mut(ioasid)?
                    .mappings
                    .get_mut(&map.iova)
                    .expect("reserved, checked above");
                let mm = outcome?;
                m.memory = Memory::Private {
                    mm,
                    pinned_in: mapped,
                };
                return Ok(());
            }
        }
    }

    /// Attaching a group to root IOASID `id` that holds private mappings
    /// (the group's shared mappings are replayed already): check that the
    /// attaching `client` belongs to the process whose memory they are, and
    /// leave their replay into `group`'s domain to its thread. `EFAULT`
    /// when it is another process.
    pub(super) fn replay_private_later(
        &self,
        c: &Context,
        client: &dyn Client,
        dev: DeviceId,
        group: GroupId,
        id: IoasidId,
    ) -> Result<(), Error> {
        let owners: BTreeSet<Pid> = c
            .ioasid(id)?
            .mappings
            .values()
            .filter_map(|m| match &m.memory {
                Memory::Private { mm, pinned_in } if !pinned_in.contains(&group) => Some(mm.pid),
                _ => None,
            })
            .collect();
        if owners.is_empty() {
            return Ok(());
        }
        let pid = client.pid()?;
        if let Some(other) = owners.iter().find(|&&o| o != pid) {
            return Err(err(
                EFAULT,
                format!(
                    "IOASID {id} maps private memory of process {other}, which only that \
                     process's own threads can pin; process {pid} cannot attach IOMMU group \
                     {group} to it (its domain would need those pages): attach from process \
                     {other}, or map shared memory (memfd, shm, MAP_SHARED)"
                ),
            ));
        }
        let engine = self.shared();
        let ctx = c.id;
        let work: ClientWork =
            Box::new(move |thread| engine.replay_private(ctx, dev, group, id, thread));
        client.defer_as_client(work).map_err(|e| {
            Error::new(
                e.errno,
                format!(
                    "IOASID {id} maps private memory, which only the client's own thread can pin \
                     into IOMMU group {group}, but: {}",
                    e.message
                ),
            )
        })
    }

    /// As the attaching thread: pin every private mapping of `id` into
    /// `group`'s domain; on failure detach `dev` again. As for a map, no
    /// lock is held while the thread runs; what changed meanwhile is
    /// settled under the lock afterwards.
    fn replay_private(
        &self,
        ctx: ContextId,
        dev: DeviceId,
        group: GroupId,
        id: IoasidId,
        thread: Result<&mut dyn ClientThread, Error>,
    ) -> Result<(), Error> {
        let attached = |c: &Context| {
            c.bound.get(&dev).is_some_and(|b| b.rid == Some(id))
                && c.realising.get(&group).is_some_and(|r| r.ioasid == id)
        };
        let arc = self.context(ctx)?;
        let mut in_flight = InFlight::new(self, ctx);
        let todo: Vec<(MmId, ClientEntry)> = {
            let c = lock(&arc);
            c.check_open(ctx)?;
            if !attached(&c) {
                // Detached meanwhile by another thread: nothing to replay.
                return Ok(());
            }
            in_flight.hold(&[group]);
            c.ioasid(id)?
                .mappings
                .iter()
                .filter_map(|(&iova, m)| match &m.memory {
                    Memory::Private { mm, pinned_in } if !pinned_in.contains(&group) => Some((
                        *mm,
                        ClientEntry {
                            iova,
                            client_vaddr: m.vaddr,
                            size: m.size,
                            prot: m.prot,
                        },
                    )),
                    _ => None,
                })
                .collect()
        };
        let mut done: Vec<ClientEntry> = Vec::new();
        let result = thread.and_then(|thread| {
            let mm = thread.mm()?;
            for (owner, entry) in todo {
                let iova = entry.iova;
                if owner != mm {
                    return Err(err(
                        EFAULT,
                        format!(
                            "the private memory mapped at IOVA {iova:#x} of IOASID {id} belongs \
                             to an address space process {} no longer has (it ran exec since): \
                             its pages cannot be pinned into IOMMU group {group}; unmap it and \
                             map it again",
                            owner.pid
                        ),
                    ));
                }
                self.backend
                    .map_as_client(group, thread, entry)
                    .map_err(|e| {
                        Error::new(
                            e.errno,
                            format!(
                            "attaching IOMMU group {group} to IOASID {id}: replaying the private \
                             mapping at IOVA {iova:#x} failed: {}",
                            e.message
                        ),
                        )
                    })?;
                done.push(entry);
            }
            Ok(())
        });
        let mut c = lock(&arc);
        let unmap = |c: &Context, entries: &[ClientEntry]| {
            for e in entries {
                if let Err(undo) = self.backend.unmap(group, e.iova, e.size) {
                    self.undo_failed(
                        c,
                        group,
                        "unmapping a private replay that lost its place",
                        &undo,
                    );
                }
            }
        };
        if c.check_open(ctx).is_err() || !attached(&c) {
            // Closed or detached meanwhile: the domain was emptied, perhaps
            // before these maps landed.
            unmap(&c, &done);
            return result;
        }
        if let Err(e) = result {
            unmap(&c, &done);
            if c.objects.attached.contains_key(&dev) {
                // Attached through iommufd's VFIO_DEVICE_ATTACH_IOMMUFD_PT.
                self.detach_pt_locked(&mut c, dev);
            } else {
                let spec = self.spec(dev)?.clone();
                if let Err(undo) = self.detach_rid(&mut c, &spec, id) {
                    self.undo_failed(&c, group, "detaching after a failed private replay", &undo);
                }
            }
            return Err(e);
        }
        // Keep what is still the same private mapping; unmap the rest.
        let mut gone = Vec::new();
        for e in done {
            match c
                .ioasid_mut(id)?
                .mappings
                .get_mut(&e.iova)
                .map(|m| (m.vaddr, m.size, &mut m.memory))
            {
                Some((v, s, Memory::Private { pinned_in, .. }))
                    if v == e.client_vaddr && s == e.size =>
                {
                    pinned_in.push(group)
                }
                _ => gone.push(e),
            }
        }
        unmap(&c, &gone);
        Ok(())
    }
}

/// The groups one private map (or replay) is pinning into without the
/// context lock, held in the registry until it is settled (see
/// `Registry::pinning`): another context's bind of them is `EBUSY`
/// meanwhile.
struct InFlight<'a> {
    engine: &'a Engine,
    ctx: ContextId,
    groups: SmallVec<[GroupId; 2]>,
}

impl<'a> InFlight<'a> {
    fn new(engine: &'a Engine, ctx: ContextId) -> Self {
        InFlight {
            engine,
            ctx,
            groups: SmallVec::new(),
        }
    }

    /// Hold `groups` too; called under the context lock that found them
    /// bound to this context.
    fn hold(&mut self, groups: &[GroupId]) {
        let mut reg = lock(&self.engine.registry);
        for &g in groups {
            if self.groups.contains(&g) {
                continue;
            }
            reg.pinning.entry(g).or_insert((self.ctx, 0)).1 += 1;
            self.groups.push(g);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut reg = lock(&self.engine.registry);
        for g in &self.groups {
            if let Some(held) = reg.pinning.get_mut(g) {
                held.1 -= 1;
                if held.1 == 0 {
                    reg.pinning.remove(g);
                }
            }
        }
    }
}
