//! iommufd's devices and HWPTs (`drivers/iommu/iommufd/device.c`,
//! `hw_pagetable.c`): bind and unbind, `IOMMU_HWPT_ALLOC` of paging HWPTs,
//! attach (to a HWPT, or to an IOAS through an automatic HWPT), replace
//! and detach.
//!
//! On legacy VFIO a paging HWPT is realised by the containers of the
//! groups whose devices are attached to it: attaching the first device of
//! a group checks the IOAS against the group's domain (its reserved
//! regions and page size: `EADDRINUSE`), replays the IOAS's mappings into
//! the group's container, and records the group as realising the IOAS's
//! IOASID, exactly as the RFC's first attach does; the last detach empties
//! the container. All devices of a group share one HWPT (the group has
//! one container): attaching one to another HWPT while the rest of its
//! group stays is `EINVAL`, as the kernel answers.
//!
//! A second attach of an attached device is a replace: its group moves to
//! the new HWPT. Between two HWPTs of one IOAS that is a relabelling; to
//! another IOAS the container is emptied and refilled, so unlike the
//! kernel's atomic replace there is a moment without translation (DMA then
//! faults instead of reaching stale memory).

use nix::errno::Errno::{EADDRINUSE, EOPNOTSUPP};

use super::ioas::{misaligned, HwptObject, Object, ObjectId};
use super::iova::{self, PAGE_SIZE};
use super::*;

/// What `pt_id` of an attach names.
enum Target {
    /// An IOAS: its automatic HWPT (made if there is none).
    Ioas(ObjectId),
    /// A HWPT.
    Hwpt(ObjectId),
}

impl Engine {
    /// `VFIO_DEVICE_BIND_IOMMUFD`: bind device `dev` to iommufd context
    /// `ctx`; its object id. `EBUSY` as [`Engine::bind`] (bound already,
    /// through either dialect, or its group is held by another context).
    pub fn iommufd_bind(&self, dev: DeviceId, ctx: ContextId) -> Result<ObjectId, Error> {
        self.bind(dev, ctx)?;
        let r = self.with_context(ctx, |c| {
            let id = c.objects.free_id()?;
            c.objects.ids.insert(id, Object::Device(dev));
            Ok(id)
        });
        if r.is_err() {
            let _ = self.unbind(dev, ctx);
        }
        r
    }

    /// The unbind of a closing device file: detach (an automatic HWPT
    /// left without devices goes), forget the device object, unbind.
    pub fn iommufd_unbind(&self, dev: DeviceId, ctx: ContextId) -> Result<(), Error> {
        let detached = self.detach_pt(dev, ctx);
        self.with_context(ctx, |c| {
            c.objects
                .ids
                .retain(|_, o| !matches!(o, Object::Device(d) if *d == dev));
            Ok(())
        })?;
        let unbound = self.unbind(dev, ctx);
        detached.and(unbound)
    }

    /// The device of object `id` (`ENOENT` unknown or another kind).
    pub fn device_object(&self, ctx: ContextId, id: ObjectId) -> Result<DeviceId, Error> {
        self.with_context(ctx, |c| c.objects.device(id))
    }

    /// The object id of device `dev` in context `ctx`, if bound there.
    pub fn device_object_id(&self, ctx: ContextId, dev: DeviceId) -> Option<ObjectId> {
        self.with_context(ctx, |c| {
            Ok(c.objects
                .ids
                .iter()
                .find(|(_, o)| matches!(o, Object::Device(d) if *d == dev))
                .map(|(&id, _)| id))
        })
        .ok()
        .flatten()
    }

    /// `IOMMU_HWPT_ALLOC` of a paging HWPT for device object `dev_id` on
    /// `pt_id`; its id. `ENOENT` `dev_id` is not a device; `EINVAL`
    /// `pt_id` unknown or a device; `EOPNOTSUPP` a HWPT as parent (nesting)
    /// or, on an IOAS, any of `flags` or driver data (`with_data`);
    /// `EADDRINUSE` an IOAS mapping that is not page aligned.
    pub fn hwpt_alloc(
        &self,
        ctx: ContextId,
        dev_id: ObjectId,
        pt_id: ObjectId,
        flags: u32,
        with_data: bool,
    ) -> Result<ObjectId, Error> {
        self.with_context(ctx, |c| {
            c.objects.device(dev_id)?;
            match c.objects.ids.get(&pt_id) {
                None => Err(err(EINVAL, format!("pt_id {pt_id}: no such object"))),
                Some(Object::Device(_)) => Err(err(
                    EINVAL,
                    format!("pt_id {pt_id} is a device, not an IOAS"),
                )),
                Some(Object::Hwpt(_)) => Err(err(
                    EOPNOTSUPP,
                    "nested HWPTs are not offered: legacy VFIO has one level of translation",
                )),
                Some(Object::Ioas(io)) => {
                    if flags != 0 || with_data {
                        return Err(err(
                            EOPNOTSUPP,
                            format!(
                                "flags {flags:#x} or driver data: legacy VFIO offers plain paging \
                                 HWPTs only"
                            ),
                        ));
                    }
                    let mappings = &c.ioasid(io.ioasid)?.mappings;
                    if let Some(s) = misaligned(io, mappings, PAGE_SIZE) {
                        return Err(err(
                            EADDRINUSE,
                            format!("the IOAS's mapping at {s:#x} is not page aligned"),
                        ));
                    }
                    let id = c.objects.free_id()?;
                    c.objects.ids.insert(
                        id,
                        Object::Hwpt(HwptObject {
                            ioas: pt_id,
                            auto: false,
                        }),
                    );
                    Ok(id)
                }
            }
        })
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` of device `dev` (bound to `ctx`) to
    /// `pt_id`, an IOAS or a HWPT; the id of the HWPT used. `ENOENT`
    /// unknown id; `EINVAL` a device id, or another device of the group
    /// attached elsewhere; `EADDRINUSE` an IOAS mapping or allowed range
    /// meeting the group's reserved regions, or a mapping not aligned to
    /// its page size. An attached device is moved (replace).
    ///
    /// Private memory mapped in the IOAS is pinned into the group's domain
    /// by `client`'s own thread after the call (see `private`); `EFAULT`
    /// when `client` is another process than the memory's, or cannot be
    /// reached: the device is then left detached.
    pub fn attach_pt(
        &self,
        dev: DeviceId,
        ctx: ContextId,
        client: &dyn Client,
        pt_id: ObjectId,
    ) -> Result<ObjectId, Error> {
        let spec = self.spec(dev)?;
        self.with_context(ctx, |c| {
            if !c.bound.contains_key(&dev) {
                return Err(not_bound(spec));
            }
            let target = match c.objects.ids.get(&pt_id) {
                None => return Err(err(ENOENT, format!("pt_id {pt_id}: no such object"))),
                Some(Object::Device(_)) => {
                    return Err(err(EINVAL, format!("pt_id {pt_id} is a device")))
                }
                Some(Object::Ioas(_)) => Target::Ioas(pt_id),
                Some(Object::Hwpt(_)) => Target::Hwpt(pt_id),
            };
            self.check_in_service(c, [spec.group])?;
            let current = c.objects.attached.get(&dev).copied();
            // The HWPT to use, and whether it must be made.
            let (hwpt, ioas, new) = match target {
                Target::Hwpt(h) => (h, c.objects.hwpt(h)?.ioas, false),
                Target::Ioas(ioas) => {
                    let auto = c
                        .objects
                        .hwpts_of(ioas)
                        .find(|h| c.objects.hwpt(*h).is_ok_and(|x| x.auto));
                    match auto {
                        Some(h) => (h, ioas, false),
                        None => (c.objects.free_id()?, ioas, true),
                    }
                }
            };
            if current == Some(hwpt) {
                return Ok(hwpt);
            }
            // The devices of the group attached now, which move with it.
            let mates: Vec<(DeviceId, ObjectId)> = c
                .objects
                .attached
                .iter()
                .filter(|(d, _)| **d != dev && self.devices[d].group == spec.group)
                .map(|(&d, &h)| (d, h))
                .collect();
            if let Some(&(other, h)) = mates
                .iter()
                .find(|(_, h)| *h != hwpt && Some(*h) != current)
            {
                return Err(err(
                    EINVAL,
                    format!(
                        "device {} shares IOMMU group {} with {}, which is attached to HWPT {h}; \
                         the devices of a group share one page table",
                        spec.name,
                        spec.group,
                        self.name(other)
                    ),
                ));
            }
            let ioasid = c.objects.ioas(ioas)?.ioasid;
            if new {
                c.objects
                    .ids
                    .insert(hwpt, Object::Hwpt(HwptObject { ioas, auto: true }));
            }
            let moved = self.realise_group(c, spec.group, ioas, ioasid);
            if let Err(e) = moved {
                if new {
                    c.objects.ids.remove(&hwpt);
                }
                return Err(e);
            }
            let movers: Vec<DeviceId> = std::iter::once(dev)
                .chain(
                    mates
                        .iter()
                        .filter(|(_, h)| Some(*h) == current)
                        .map(|(d, _)| *d),
                )
                .collect();
            for &d in &movers {
                c.objects.attached.insert(d, hwpt);
                if let Some(b) = c.bound.get_mut(&d) {
                    b.rid = Some(ioasid);
                }
            }
            if let Some(old) = current {
                self.drop_auto_hwpt(c, old);
            }
            // Last, as nothing may fail once the client's thread has work.
            if let Err(e) = self.replay_private_later(c, client, dev, spec.group, ioasid) {
                for d in movers {
                    self.detach_pt_locked(c, d);
                }
                return Err(e);
            }
            Ok(hwpt)
        })
    }

    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT` of device `dev`: nothing when it is
    /// not attached. The last device of its group empties the group's
    /// domain; an automatic HWPT left without devices goes.
    pub fn detach_pt(&self, dev: DeviceId, ctx: ContextId) -> Result<(), Error> {
        self.spec(dev)?;
        self.with_context(ctx, |c| {
            self.detach_pt_locked(c, dev);
            Ok(())
        })
    }

    /// [`Engine::detach_pt`] under the context lock.
    pub(super) fn detach_pt_locked(&self, c: &mut Context, dev: DeviceId) {
        let group = self.devices[&dev].group;
        let Some(hwpt) = c.objects.attached.remove(&dev) else {
            return;
        };
        if let Some(b) = c.bound.get_mut(&dev) {
            b.rid = None;
        }
        let last = !c
            .objects
            .attached
            .keys()
            .any(|d| self.devices[d].group == group);
        if last && c.realising.contains_key(&group) {
            let r = self.backend.unmap_all(group);
            c.realising.remove(&group);
            match r {
                Ok(()) => self.emptied(c, group),
                Err(e) => self.undo_failed(c, group, "emptying a detached group", &e),
            }
        }
        self.drop_auto_hwpt(c, hwpt);
    }

    /// Destroy `hwpt` if it is automatic and has no device left.
    fn drop_auto_hwpt(&self, c: &mut Context, hwpt: ObjectId) {
        let auto = c.objects.hwpt(hwpt).is_ok_and(|h| h.auto);
        if auto && c.objects.users_of(hwpt).next().is_none() {
            c.objects.ids.remove(&hwpt);
        }
    }

    /// Make `group`'s domain hold IOAS `ioas` (IOASID `ioasid`): check the
    /// IOAS against the domain (`EADDRINUSE`), empty the domain if it holds
    /// another IOAS, and replay. On failure the domain holds what it held.
    fn realise_group(
        &self,
        c: &mut Context,
        group: GroupId,
        ioas: ObjectId,
        ioasid: IoasidId,
    ) -> Result<(), Error> {
        let before = c.realising.get(&group).map(|r| r.ioasid);
        if before == Some(ioasid) {
            return Ok(());
        }
        let info = self.backend.domain_info(group)?;
        let io = c.objects.ioas(ioas)?;
        let mappings = &c.ioasid(ioasid)?.mappings;
        if let Some((&s, m)) = mappings
            .iter()
            .find(|(&s, m)| !iova::inside(&info.iova_ranges, s, s + (m.size - 1)))
        {
            return Err(err(
                EADDRINUSE,
                format!(
                    "the IOAS's mapping at {s:#x} ({:#x} bytes) lies in a region IOMMU group \
                     {group} reserves (see IOMMU_IOAS_IOVA_RANGES once attached); unmap it first",
                    m.size
                ),
            ));
        }
        let reserved = iova::reserved(&info.iova_ranges);
        if let Some(&(s, l)) = io
            .allowed
            .iter()
            .find(|&&r| reserved.iter().any(|&x| iova::meets(x, r)))
        {
            return Err(err(
                EADDRINUSE,
                format!(
                    "the IOAS allows {s:#x}..={l:#x}, which IOMMU group {group} reserves; \
                     change IOMMU_IOAS_ALLOW_IOVAS first"
                ),
            ));
        }
        let pg = min_pgsize(info.pgsize_bitmap);
        if let Some(s) = misaligned(io, mappings, pg) {
            return Err(err(
                EADDRINUSE,
                format!(
                    "the IOAS's mapping at {s:#x} is not aligned to the IOMMU page size {pg:#x}"
                ),
            ));
        }
        if let Some(old) = before {
            self.backend.unmap_all(group)?;
            self.emptied(c, group);
            c.realising.remove(&group);
            if let Err(e) = self.replay(c, group, ioasid) {
                // Back to the old IOAS.
                let old_info = info.clone();
                match self.replay(c, group, old) {
                    Ok(()) => {
                        c.realising.insert(
                            group,
                            Realising {
                                ioasid: old,
                                info: old_info,
                            },
                        );
                    }
                    Err(undo) => self.undo_failed(c, group, "restoring a replaced IOAS", &undo),
                }
                return Err(e);
            }
        } else {
            self.replay(c, group, ioasid)?;
        }
        c.realising.insert(group, Realising { ioasid, info });
        Ok(())
    }
}
