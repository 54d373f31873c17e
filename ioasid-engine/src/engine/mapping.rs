//! Mappings: map and unmap on an IOASID, applied to every realising
//! domain (all or nothing), memory registration, the `RLIMIT_MEMLOCK`
//! accounting, and replaying an IOASID into a group that joins it.

use super::*;

impl Engine {
    /// Map `map.size` bytes of `client`'s process at `map.vaddr` to
    /// `map.iova` in IOASID `ioasid`, in every realising domain.
    ///
    /// Shared memory is aliased and mapped by the daemon. Private memory
    /// (`MAP_PRIVATE`, anonymous, heap, stack) is mapped by the client's
    /// own thread once the call is answered ([`Client::defer_as_client`]):
    /// the IOVA range is reserved now, and the call's real result is the
    /// one the client's thread gets (see `private`).
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
        client: &dyn Client,
        ioasid: IoasidId,
        map: DmaMap,
    ) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            self.take_budget(c.owner, Item::Mappings, 1)?;
            let r = self.map_checked(c, client, ioasid, map);
            if r.is_err() {
                self.give_budget(c.owner, Item::Mappings, 1);
            }
            r
        })
    }

    fn map_checked(
        &self,
        c: &mut Context,
        client: &dyn Client,
        ioasid: IoasidId,
        map: DmaMap,
    ) -> Result<(), Error> {
        {
            let (groups, known) = self.usable(c, ioasid)?;
            self.check_no_table(c, ioasid)?;
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
                return self.map_child(c, ioasid, iova, vaddr, size, prot);
            }
            self.map_user(c, client, ioasid, &groups, map)
        }
    }

    /// Map `map` into IOASID `ioasid` (whose checks passed) and into
    /// `groups`, its realising domains: the client memory is resolved here.
    /// Shared memory is a registration or an alias of the caller's memory,
    /// charged to its process ([`Engine::charge_shared`]); private memory
    /// is reserved and left to the client's own thread (`private`). The
    /// one way from a client's address to a domain, for `IOASID_MAP_DMA`
    /// and iommufd's `IOMMU_IOAS_MAP` alike.
    pub(super) fn map_user(
        &self,
        c: &mut Context,
        client: &dyn Client,
        ioasid: IoasidId,
        groups: &[GroupId],
        map: DmaMap,
    ) -> Result<(), Error> {
        let DmaMap {
            iova, vaddr, size, ..
        } = map;
        let memory = if c.registrations.is_empty() {
            match self.backend.resolve(client.tid(), vaddr, size)? {
                Resolved::Shared(alias) => match self.charge_shared(client, &alias) {
                    Ok(charged) => Memory::Own { alias, charged },
                    Err(e) => {
                        self.release(c, alias);
                        return Err(e);
                    }
                },
                Resolved::Private { why } => return self.map_private(c, client, ioasid, map, why),
            }
        } else {
            let inside = c
                .registrations
                .range(..=vaddr)
                .next_back()
                .filter(|(&s, r)| vaddr + size <= s + r.size);
            match inside {
                Some((_, r)) if r.alias.is_none() => {
                    let why = format!("registered private memory at {vaddr:#x}");
                    return self.map_private(c, client, ioasid, map, why);
                }
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
            prot: map.prot,
            memory,
        };
        self.map_memory(c, ioasid, groups, iova, mapping)
    }

    /// Insert `mapping` at `iova` into IOASID `ioasid` and map it into
    /// `groups`, all or nothing; on failure its memory is given back.
    pub(super) fn map_memory(
        &self,
        c: &mut Context,
        ioasid: IoasidId,
        groups: &[GroupId],
        iova: u64,
        mapping: Mapping,
    ) -> Result<(), Error> {
        let (size, prot) = (mapping.size, mapping.prot);
        let segs = c.segments(&mapping);
        let mut failed = None;
        for (i, &g) in groups.iter().enumerate() {
            if let Err(e) = self.map_segments(c, g, iova, &segs, prot) {
                for &done in &groups[..i] {
                    if let Err(undo) = self.backend.unmap(done, iova, size) {
                        self.undo_failed(c, done, "unmapping a map refused elsewhere", &undo);
                    }
                }
                failed = Some(e);
                break;
            }
        }
        drop(segs);
        if let Some(e) = failed {
            if let Memory::Own { alias, charged } = mapping.memory {
                self.uncharge(charged, &alias);
                self.release(c, alias);
            }
            return Err(e);
        }
        match mapping.memory {
            Memory::Own { .. } => c.own_bytes += size,
            Memory::Registered(s) => c.registrations.get_mut(&s).expect("found above").users += 1,
            Memory::Nested | Memory::Private { .. } | Memory::Pending(_) => {}
        }
        c.ioasid_mut(ioasid)?.mappings.insert(iova, mapping);
        // The children see the new mapping at once.
        if c.has_children(ioasid) {
            let view = parent_view(c, ioasid, &[])?;
            if let Err(e) = self.refresh_children(c, ioasid, &view) {
                let m = c
                    .ioasid_mut(ioasid)?
                    .mappings
                    .remove(&iova)
                    .expect("inserted above");
                for &g in groups {
                    if let Err(undo) = self.backend.unmap(g, iova, size) {
                        self.undo_failed(c, g, "unmapping a map its children refused", &undo);
                    }
                }
                self.drop_memory(c, m);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Charge the shared memory behind `alias`, about to be pinned by the
    /// daemon, to the process of `client`, as type1 would: against its
    /// `RLIMIT_MEMLOCK`, together with everything it already has pinned
    /// through the daemon (in any ioasid file, each byte once) and what
    /// the kernel charges it itself (`VmLck`: `mlock`, its own VFIO maps,
    /// the private memory its thread pinned for the daemon). Returns the
    /// process charged. `ENOMEM` over the limit; the alias budget's
    /// `ENOMEM` past it. `VmLck` (a read of `/proc`) is asked only when a
    /// limit applies: without one, only the process is needed, and the
    /// client finds it cheaply when its thread leads the process.
    pub(super) fn charge_shared(&self, client: &dyn Client, alias: &Alias) -> Result<Pid, Error> {
        let limit = self.backend.memlock_limit(client.tid())?;
        let pm = match limit {
            Some(_) => self.backend.process_memory(client.tid())?,
            None => ProcessMemory {
                pid: client.pid()?,
                locked: 0,
            },
        };
        let mut a = lock(&self.accounts);
        if let Some(limit) = limit {
            let more = a.new_bytes(pm.pid, &alias.segments);
            let shared = a.pinned(pm.pid);
            let total = shared.saturating_add(more).saturating_add(pm.locked);
            if more > 0 && total > limit {
                return Err(memlock_exceeded(pm.pid, more, shared, pm.locked, limit));
            }
        }
        a.take(pm.pid, Item::Aliases, alias.segments.len())?;
        a.charge(pm.pid, &alias.segments);
        Ok(pm.pid)
    }

    /// Map one mapping's segments into `group`; all or nothing.
    pub(super) fn map_segments(
        &self,
        c: &Context,
        group: GroupId,
        iova: u64,
        segs: &[Segment],
        prot: Prot,
    ) -> Result<(), Error> {
        for (i, s) in segs.iter().enumerate() {
            if let Err(e) = self.map_alias(
                group,
                DmaEntry {
                    iova: iova + s.offset,
                    daemon_vaddr: s.daemon_vaddr,
                    size: s.len,
                    prot,
                },
            ) {
                for done in &segs[..i] {
                    if let Err(undo) = self.backend.unmap(group, iova + done.offset, done.len) {
                        self.undo_failed(c, group, "unmapping the first pieces of a map", &undo);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Map every mapping of `id` into `group`'s (empty) domain, or nothing.
    pub(super) fn replay(&self, c: &Context, group: GroupId, id: IoasidId) -> Result<(), Error> {
        let io = c.ioasid(id)?;
        for (&iova, m) in &io.mappings {
            if let Err(e) = self.map_segments(c, group, iova, &c.segments(m), m.prot) {
                if let Err(undo) = self.backend.unmap_all(group) {
                    self.undo_failed(c, group, "emptying the domain after a failed replay", &undo);
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
        self.with_context(ctx, |c| {
            let (groups, known) = self.usable(c, ioasid)?;
            self.check_no_table(c, ioasid)?;
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
            let gone: smallvec::SmallVec<[u64; 4]> =
                io.mappings.range(iova..end).map(|(&s, _)| s).collect();
            if gone.is_empty() {
                return Ok(0);
            }
            self.remove(c, ioasid, &groups, &gone, |b, g| {
                b.unmap(g, iova, size).map(|_| ())
            })
        })
    }

    /// Unmap everything from IOASID `ioasid` (`VFIO_DMA_UNMAP_FLAG_ALL`);
    /// returns the bytes unmapped.
    pub fn unmap_all_dma(&self, ctx: ContextId, ioasid: IoasidId) -> Result<u64, Error> {
        self.with_context(ctx, |c| {
            let (groups, _) = self.usable(c, ioasid)?;
            self.check_no_table(c, ioasid)?;
            let gone: Vec<u64> = c.ioasid(ioasid)?.mappings.keys().copied().collect();
            if gone.is_empty() {
                return Ok(0);
            }
            self.remove(c, ioasid, &groups, &gone, |b, g| b.unmap_all(g))
        })
    }

    /// Remove the mappings starting at `gone` from `ioasid`: a child's
    /// through its shadow; a root's from its groups, after taking them out
    /// of its children's shadows (so no domain maps memory about to be
    /// released).
    pub(super) fn remove(
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
    pub(super) fn remove_mappings(
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
                        if let Memory::Private { pinned_in, .. } = &m.memory {
                            if pinned_in.contains(&done) {
                                let undo = err(
                                    EIO,
                                    "private memory cannot be mapped back without its client's \
                                     thread",
                                );
                                self.undo_failed(
                                    c,
                                    done,
                                    "mapping back an unmap refused elsewhere",
                                    &undo,
                                );
                            }
                            continue;
                        }
                        if let Err(undo) = self.map_segments(c, done, *s, &c.segments(m), m.prot) {
                            self.undo_failed(
                                c,
                                done,
                                "mapping back an unmap refused elsewhere",
                                &undo,
                            );
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
        self.give_budget(c.owner, Item::Mappings, gone.len());
        Ok(bytes)
    }

    /// Register `[vaddr, vaddr + size)` of `client`'s process: shared
    /// memory is aliased and charged once, for any number of later maps;
    /// private memory is recorded, and each map inside it is pinned by the
    /// client's own thread (charged by the kernel then). `EINVAL` size 0,
    /// not 4 KiB aligned or overflowing; `EEXIST` overlapping a
    /// registration; `ENOMEM` over `RLIMIT_MEMLOCK`; `EFAULT` memory that
    /// is not mapped (or private, with private memory turned off).
    pub fn register_memory(
        &self,
        ctx: ContextId,
        client: &dyn Client,
        vaddr: u64,
        size: u64,
    ) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            if size == 0 || (vaddr | size) & 4095 != 0 {
                return Err(err(
                    EINVAL,
                    format!(
                        "vaddr {vaddr:#x} and size {size:#x} must be non-zero multiples of 4 KiB"
                    ),
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
            let alias = match self.backend.resolve(client.tid(), vaddr, size)? {
                Resolved::Shared(alias) => match self.charge_shared(client, &alias) {
                    Ok(charged) => Some((alias, charged)),
                    Err(e) => {
                        self.release(c, alias);
                        return Err(e);
                    }
                },
                Resolved::Private { why } => {
                    if !self.private_memory.load(Ordering::Relaxed) {
                        return Err(private_refused(&why));
                    }
                    None
                }
            };
            if alias.is_some() {
                c.registered_bytes += size;
            }
            c.registrations.insert(
                vaddr,
                Registration {
                    size,
                    alias,
                    users: 0,
                },
            );
            Ok(())
        })
    }

    /// Undo [`Engine::register_memory`]. `ENOENT` unless `(vaddr, size)` is
    /// exactly a registration; `EBUSY` while a mapping uses it.
    pub fn unregister_memory(&self, ctx: ContextId, vaddr: u64, size: u64) -> Result<(), Error> {
        self.with_context(ctx, |c| {
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
            if let Some((alias, charged)) = r.alias {
                self.uncharge(charged, &alias);
                self.release(c, alias);
                c.registered_bytes -= size;
            }
            Ok(())
        })
    }

    /// `EBUSY` if a table is bound to `id` (no map or unmap then).
    pub(super) fn check_no_table(&self, c: &Context, id: IoasidId) -> Result<(), Error> {
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
}

/// `ENOMEM`: pinning `more` bytes would take process `pid` over its
/// `RLIMIT_MEMLOCK`.
pub(super) fn memlock_exceeded(pid: Pid, more: u64, shared: u64, locked: u64, limit: u64) -> Error {
    err(
        ENOMEM,
        format!(
            "pinning {more:#x} more bytes for process {pid} would exceed its RLIMIT_MEMLOCK \
             ({limit:#x} bytes): the daemon pins {shared:#x} bytes of its shared memory (all its \
             ioasid files, each byte once) and the kernel charges it {locked:#x} bytes (VmLck: \
             mlock, private memory its own thread pinned); raise the limit (ulimit -l), unmap \
             something, or register memory you map more than once"
        ),
    )
}

/// `EFAULT`: private memory while private memory is turned off.
pub(super) fn private_refused(why: &str) -> Error {
    err(
        EFAULT,
        format!(
            "{why}; the daemon runs with --no-private-memory, so it pins only memory it can \
             share: map it MAP_SHARED from a memfd, POSIX/SysV shm, hugetlbfs or a shared file, \
             or MAP_SHARED|MAP_ANONYMOUS (QEMU: -object memory-backend-memfd,share=on)"
        ),
    )
}
