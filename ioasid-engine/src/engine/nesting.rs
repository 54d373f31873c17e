//! Nesting and shadows: child IOASIDs, their shadow (each translation
//! composed with the parent's mappings) and how every change at either
//! level reaches the realising domains as a difference.

use super::*;

/// One entry of a child's shadow, keyed by its IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ShadowEntry {
    pub(super) daemon_vaddr: u64,
    pub(super) size: u64,
    pub(super) prot: Prot,
}

impl ShadowEntry {
    /// The domain entry of this shadow entry at `iova`.
    pub(super) fn at(&self, iova: u64) -> DmaEntry {
        DmaEntry {
            iova,
            daemon_vaddr: self.daemon_vaddr,
            size: self.size,
            prot: self.prot,
        }
    }
}

pub(super) type Shadow = BTreeMap<u64, ShadowEntry>;

/// One mapping of a parent as a child's shadow sees it.
pub(super) struct ParentPiece {
    pub(super) size: u64,
    pub(super) prot: Prot,
    pub(super) segs: Vec<Segment>,
}

/// A parent's mappings, by IOVA.
pub(super) type ParentView = BTreeMap<u64, ParentPiece>;

impl Engine {
    /// Create a child of IOASID `parent` (one level of software nesting).
    ///
    /// `ENOENT` unknown parent; `EINVAL` the parent is itself a child (one
    /// level only); `ENODEV` the parent never had a device attached;
    /// `EBUSY` the group rule on the parent; `ENOSPC` no number left.
    pub fn create_nesting(&self, ctx: ContextId, parent: IoasidId) -> Result<IoasidId, Error> {
        self.with_context(ctx, |c| {
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
            self.check_group_rule(c, parent)?;
            if never {
                return Err(err(
                    ENODEV,
                    format!(
                        "IOASID {parent} has never had a device attached; attach a device to it \
                         before creating a child"
                    ),
                ));
            }
            if c.ioasid(parent)?
                .mappings
                .values()
                .any(|m| m.memory.is_private())
            {
                return Err(err(
                    EINVAL,
                    format!(
                        "IOASID {parent} maps private memory, pinned by the client's own thread; \
                         a child's shadow is made of the daemon's aliases of its parent's memory, \
                         so a parent must map shared memory only (memfd, shm, hugetlbfs, \
                         MAP_SHARED)"
                    ),
                ));
            }
            let entry = c.ioasids.vacant_entry();
            let id = u32::try_from(entry.key() + 1)
                .ok()
                .filter(|&i| i <= i32::MAX as u32)
                .ok_or_else(|| err(ENOSPC, "no IOASID number left in this ioasid fd"))?;
            self.take_budget(c.owner, Item::Ioasids, 1)?;
            entry.insert(Ioasid {
                parent: Some(parent),
                ..Ioasid::default()
            });
            Ok(id)
        })
    }

    /// Map `[iova, iova + size)` of child `id` to parent IOVA `gpa`.
    pub(super) fn map_child(
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
    pub(super) fn unmap_child(
        &self,
        c: &mut Context,
        id: IoasidId,
        gone: &[u64],
    ) -> Result<u64, Error> {
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
        self.give_budget(c.owner, Item::Mappings, removed.len());
        Ok(removed.iter().map(|(_, m)| m.size).sum())
    }

    /// Recompute the shadow of every child of `parent` against `view` and
    /// apply it; all or nothing.
    pub(super) fn refresh_children(
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
    pub(super) fn apply_shadow(
        &self,
        c: &mut Context,
        id: IoasidId,
        new: Shadow,
    ) -> Result<(), Error> {
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
    pub(super) fn apply_delta(
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
            if let Err(e) = self.shadow_update(c, g, &removed, &added) {
                for &done in &groups[..i] {
                    if let Err(undo) = self.shadow_update(c, done, &added, &removed) {
                        self.undo_failed(
                            c,
                            done,
                            "undoing a shadow update refused elsewhere",
                            &undo,
                        );
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
    pub(super) fn shadow_update(
        &self,
        c: &Context,
        g: GroupId,
        removed: &[(u64, ShadowEntry)],
        added: &[(u64, ShadowEntry)],
    ) -> Result<(), Error> {
        let remap = |entries: &[(u64, ShadowEntry)]| {
            for (iova, e) in entries {
                if let Err(undo) = self.map_alias(g, e.at(*iova)) {
                    self.undo_failed(c, g, "mapping back a shadow entry", &undo);
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
            if let Err(fail) = self.map_alias(g, e.at(*iova)) {
                for (iova, e) in &added[..i] {
                    if let Err(undo) = self.backend.unmap(g, *iova, e.size) {
                        self.undo_failed(c, g, "unmapping a new shadow entry", &undo);
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
    pub(super) fn replay_shadow(
        &self,
        c: &Context,
        group: GroupId,
        id: IoasidId,
    ) -> Result<(), Error> {
        for (&iova, e) in &c.ioasid(id)?.shadow {
            if let Err(fail) = self.map_alias(group, e.at(iova)) {
                if let Err(undo) = self.backend.unmap_all(group) {
                    self.undo_failed(
                        c,
                        group,
                        "emptying the domain after a failed shadow replay",
                        &undo,
                    );
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
    pub(super) fn attach_child_rid(
        &self,
        c: &mut Context,
        spec: &DeviceSpec,
        child: IoasidId,
        parent: IoasidId,
    ) -> Result<(), Error> {
        if let Some(cur) = c.bound[&spec.id].child {
            return Err(super::device::already_attached(spec, cur));
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
                    self.undo_failed(c, spec.group, "restoring the parent's mappings", &undo);
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
    pub(super) fn detach_child_rid(
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
            self.emptied(c, spec.group);
            if let Err(e) = self.replay(c, spec.group, parent) {
                if let Err(undo) = self.replay_shadow(c, spec.group, child) {
                    self.undo_failed(c, spec.group, "restoring the child's shadow", &undo);
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
pub(super) fn child_parent(c: &Context, id: IoasidId) -> Result<IoasidId, Error> {
    c.ioasid(id)?.parent.ok_or_else(|| {
        err(
            EINVAL,
            format!("IOASID {id} is not a child (IOASID_CREATE_NESTING makes one)"),
        )
    })
}

/// The mappings of `parent` but those starting at `skip`, with their
/// daemon addresses.
pub(super) fn parent_view(
    c: &Context,
    parent: IoasidId,
    skip: &[u64],
) -> Result<ParentView, Error> {
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
                    segs: c.segments(m).to_vec(),
                },
            )
        })
        .collect())
}

/// The mappings of `parent` that meet `[lo, hi)`, with their daemon
/// addresses.
pub(super) fn parent_view_range(
    c: &Context,
    parent: IoasidId,
    lo: u64,
    hi: u64,
) -> Result<ParentView, Error> {
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
                segs: c.segments(m).to_vec(),
            },
        );
    }
    Ok(view)
}

/// The permitted IOVA ranges a child's shadow is clipped to.
pub(super) fn known_ranges(io: &Ioasid) -> Vec<(u64, u64)> {
    io.known
        .as_ref()
        .map_or_else(Vec::new, |k| k.iova_ranges.clone())
}

/// The shadow entries of `shadow` starting in `[start, start + size)`:
/// those made from a translation of that input range.
pub(super) fn shadow_in(shadow: &Shadow, start: u64, size: u64) -> Vec<(u64, ShadowEntry)> {
    shadow
        .range(start..start.saturating_add(size))
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// The shadow of child `io` over the parent's mappings `view`: every
/// translation (its mappings, or its page table's leaves) composed with
/// the parent pieces it overlaps, clipped to the permitted IOVA ranges.
pub(super) fn child_shadow(io: &Ioasid, view: &ParentView) -> Shadow {
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
pub(super) fn compose(
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
