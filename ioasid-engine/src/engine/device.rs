//! Devices and the group rule: bind, unbind, attach and detach, one RID
//! address space per IOMMU group, and the RFC's rule that an IOASID with
//! part of a group attached refuses every command.

use super::*;

impl Engine {
    /// Bind device `dev` to context `ctx`. `EBUSY` if it is bound already
    /// (here or elsewhere), or if another device of its IOMMU group is
    /// bound to another context.
    pub fn bind(&self, dev: DeviceId, ctx: ContextId) -> Result<(), Error> {
        let spec = self.spec(dev)?;
        self.with_context(ctx, |c| {
            let mut reg = lock(&self.registry);
            if let Some(owner) = reg.out_of_service.get(&spec.group) {
                let what = match owner {
                    None => "its domain could not be emptied; restart the daemon",
                    Some(_) => {
                        "a failed change of its domain could not be undone; unbind its devices \
                         or close the ioasid fd that holds them"
                    }
                };
                return Err(err(
                    EBUSY,
                    format!(
                        "device {}: IOMMU group {} is out of service ({what})",
                        spec.name, spec.group
                    ),
                ));
            }
            if let Some(&(holder, n)) = reg.pinning.get(&spec.group) {
                if holder != ctx {
                    return Err(err(
                        EBUSY,
                        format!(
                            "device {}: the previous holder of IOMMU group {} is still pinning \
                             private memory into its domain ({n} map(s) by its client's thread, \
                             bounded by --inject-timeout-ms); try again",
                            spec.name, spec.group
                        ),
                    ));
                }
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
        })
    }

    /// Unbind device `dev` from context `ctx`, detaching it from every
    /// IOASID first. `EINVAL` if it is not bound to `ctx`.
    pub fn unbind(&self, dev: DeviceId, ctx: ContextId) -> Result<(), Error> {
        let spec = self.spec(dev)?;
        self.with_context(ctx, |c| {
            let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
            let (rid, child) = (bd.rid, bd.child);
            if let Some(id) = child {
                self.detach_child_rid(c, spec, id)?;
            }
            if let Some(id) = rid {
                self.detach_rid(c, spec, id)?;
            }
            let attached = c.bound.iter().any(|(d, b)| {
                *d != dev
                    && self.devices[d].group == spec.group
                    && (b.rid.is_some() || b.child.is_some())
            });
            if !attached && self.is_broken(c, spec.group) {
                // Nothing of the group is attached any more: empty its
                // domain to put it back in service.
                match self.backend.unmap_all(spec.group) {
                    Ok(()) => self.emptied(c, spec.group),
                    Err(e) => tracing::warn!(
                        group = spec.group,
                        errno = %e.errno,
                        "IOMMU group {} stays out of service: emptying its domain failed ({})",
                        spec.group,
                        e.message
                    ),
                }
            }
            c.bound.remove(&dev);
            lock(&self.registry).bound.remove(&dev);
            Ok(())
        })
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
    ///
    /// A group that must replay private memory into its domain gets it
    /// from `client`'s own thread after the call is answered (`EFAULT` at
    /// once if `client` is another process than the memory's).
    pub fn attach(
        &self,
        dev: DeviceId,
        ctx: ContextId,
        client: &dyn Client,
        ioasid: IoasidId,
        pasid: Option<u32>,
    ) -> Result<(), Error> {
        let spec = self.spec(dev)?;
        self.with_context(ctx, |c| {
            let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
            self.check_in_service(c, [spec.group])?;
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
                    Some(p) => self.attach_child_rid(c, spec, ioasid, p),
                    None => self.attach_rid(c, client, spec, ioasid),
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
        })
    }

    pub(super) fn attach_rid(
        &self,
        c: &mut Context,
        client: &dyn Client,
        spec: &DeviceSpec,
        id: IoasidId,
    ) -> Result<(), Error> {
        if let Some(cur) = c.bound[&spec.id].rid {
            return Err(already_attached(spec, cur));
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
                if let Err(e) = self.replay_private_later(c, client, spec.id, spec.group, id) {
                    if let Err(undo) = self.backend.unmap_all(spec.group) {
                        self.undo_failed(
                            c,
                            spec.group,
                            "emptying the domain after a refused attach",
                            &undo,
                        );
                    }
                    return Err(e);
                }
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
        self.with_context(ctx, |c| {
            let bd = c.bound.get(&dev).ok_or_else(|| not_bound(spec))?;
            c.ioasid(ioasid)?;
            match pasid {
                None if bd.child == Some(ioasid) => self.detach_child_rid(c, spec, ioasid),
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
                    self.detach_rid(c, spec, ioasid)
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
        })
    }

    pub(super) fn detach_rid(
        &self,
        c: &mut Context,
        spec: &DeviceSpec,
        id: IoasidId,
    ) -> Result<(), Error> {
        let last = !c.bound.iter().any(|(d, b)| {
            *d != spec.id && b.rid == Some(id) && self.devices[d].group == spec.group
        });
        if last {
            self.backend.unmap_all(spec.group)?;
            self.emptied(c, spec.group);
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
    pub(super) fn check_group_rule(&self, c: &Context, id: IoasidId) -> Result<(), Error> {
        let child = c.ioasid(id)?.parent.is_some();
        // The groups realising `id` (for a root, also through its children).
        let realises = |g: GroupId| {
            c.realising
                .get(&g)
                .is_some_and(|r| r.ioasid == id || (!child && c.parent_of(r.ioasid) == Some(id)))
        };
        // A group out of service refuses every command on what it realises.
        self.check_in_service(c, c.realising.keys().copied().filter(|&g| realises(g)))?;
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
}

/// `EBUSY`: `spec` is attached by RID to `cur` already.
pub(super) fn already_attached(spec: &DeviceSpec, cur: IoasidId) -> Error {
    err(
        EBUSY,
        format!(
            "device {} is already attached to IOASID {cur} by RID; detach it first",
            spec.name
        ),
    )
}
