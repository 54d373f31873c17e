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
//!    stopped: under the context lock again, the reservation is made real
//!    in every domain realising the IOASID now, or dropped; the client's
//!    call returns that result. A reservation unmapped meanwhile (by
//!    another thread of the client) is left alone: the map happened, then
//!    the unmap.
//!
//! Pages pinned by one process can be pinned into another domain only by
//! that same process (the same address space: an `exec` makes another), so
//! attaching a device whose group must replay private mappings is done by
//! the attaching thread, and refused with `EFAULT` when it belongs to
//! another process. A parent of nested IOASIDs maps shared memory only (its
//! children's shadows are made of the daemon's aliases).

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
        let engine = self
            .me
            .upgrade()
            .expect("the engine is alive while it serves");
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

    /// Phase 2 of a private map, as the client's thread.
    fn pin_private_map(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        map: DmaMap,
        token: u64,
        thread: Result<&mut dyn ClientThread, Error>,
    ) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let reserved = c
            .ioasid(ioasid)
            .ok()
            .and_then(|io| io.mappings.get(&map.iova))
            .is_some_and(|m| matches!(m.memory, Memory::Pending(t) if t == token));
        if !reserved {
            // Unmapped (or its IOASID freed) by another thread meanwhile.
            return Ok(());
        }
        let result = thread.and_then(|thread| {
            let mm = thread.mm()?;
            let entry = ClientEntry {
                iova: map.iova,
                client_vaddr: map.vaddr,
                size: map.size,
                prot: map.prot,
            };
            let mut done: SmallVec<[GroupId; 2]> = SmallVec::new();
            for g in c.groups_of(ioasid) {
                if let Err(e) = self.backend.map_as_client(g, thread, entry) {
                    for &d in &done {
                        if let Err(undo) = self.backend.unmap(d, map.iova, map.size) {
                            self.undo_failed(
                                &c,
                                d,
                                "unmapping a private map refused elsewhere",
                                &undo,
                            );
                        }
                    }
                    return Err(e);
                }
                done.push(g);
            }
            Ok((mm, done))
        });
        let io = c.ioasid_mut(ioasid)?;
        match result {
            Ok((mm, pinned_in)) => {
                let m = io.mappings.get_mut(&map.iova).expect("reserved above");
                m.memory = Memory::Private { mm, pinned_in };
                Ok(())
            }
            Err(e) => {
                io.mappings.remove(&map.iova);
                self.give_budget(c.owner, Item::Mappings, 1);
                Err(e)
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
                Memory::Private { mm, .. } => Some(mm.pid),
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
        let engine = self
            .me
            .upgrade()
            .expect("the engine is alive while it serves");
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
    /// `group`'s domain; on failure detach `dev` again.
    fn replay_private(
        &self,
        ctx: ContextId,
        dev: DeviceId,
        group: GroupId,
        id: IoasidId,
        thread: Result<&mut dyn ClientThread, Error>,
    ) -> Result<(), Error> {
        let arc = self.context(ctx)?;
        let mut c = lock(&arc);
        c.check_open(ctx)?;
        let still = c.bound.get(&dev).is_some_and(|b| b.rid == Some(id))
            && c.realising.get(&group).is_some_and(|r| r.ioasid == id);
        if !still {
            // Detached meanwhile by another thread: nothing to replay.
            return Ok(());
        }
        let result = thread.and_then(|thread| {
            let mm = thread.mm()?;
            let todo: Vec<(MmId, ClientEntry)> = c
                .ioasid(id)?
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
                .collect();
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
                if let Some(Memory::Private { pinned_in, .. }) = c
                    .ioasid_mut(id)?
                    .mappings
                    .get_mut(&iova)
                    .map(|m| &mut m.memory)
                {
                    pinned_in.push(group);
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            let spec = self.spec(dev)?.clone();
            if let Err(undo) = self.detach_rid(&mut c, &spec, id) {
                self.undo_failed(&c, group, "detaching after a failed private replay", &undo);
            }
            return Err(e);
        }
        Ok(())
    }
}
