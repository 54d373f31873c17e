//! Failed undos and groups out of service.
//!
//! Every change of a realising domain is all or nothing: when one step
//! fails, the steps already done are undone. When an *undo* fails too, the
//! domain may hold entries the engine does not know of (a mapping that
//! was refused, a shadow entry of a translation that is gone), so:
//!
//! - it is logged at warn level, with the group and what was being undone;
//! - the group is taken out of service: every later command on an IOASID
//!   it realises, and every attach of one of its devices, answers `EIO`
//!   with a message that says what to do (the front end logs it once);
//! - every alias its context gives back meanwhile is held, not released,
//!   since the domain may still map it;
//! - the group is back in service, and the held aliases released, once its
//!   domain has been emptied with `UNMAP_ALL`: when the last device of the
//!   group detaches (or is unbound, or the ioasid fd is closed). Detach and
//!   unbind are never refused for this reason: they are the way out. A
//!   domain that cannot be emptied even then leaves the group fenced off
//!   until the daemon restarts (binding its devices is `EBUSY`).

use super::*;

impl Engine {
    /// Undoing a change of `group`'s domain failed: warn and take the
    /// group out of service (see the module documentation).
    pub(super) fn undo_failed(&self, c: &Context, group: GroupId, what: &str, error: &Error) {
        tracing::warn!(
            group,
            errno = %error.errno,
            "IOMMU group {group} is out of service: {what} failed ({}); its domain may map \
             memory the daemon no longer tracks. Commands on it answer EIO until its devices \
             are detached or unbound (which empties the domain) or the ioasid fd is closed",
            error.message
        );
        let mut reg = lock(&self.registry);
        if reg.out_of_service.insert(group, Some(c.id)).is_none() {
            c.broken.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `EIO` if a group of `groups` is out of service.
    pub(super) fn check_in_service(
        &self,
        c: &Context,
        groups: impl IntoIterator<Item = GroupId>,
    ) -> Result<(), Error> {
        if c.broken.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let reg = lock(&self.registry);
        for g in groups {
            if reg.out_of_service.contains_key(&g) {
                return Err(err(
                    EIO,
                    format!(
                        "IOMMU group {g} is out of service (a failed change of its domain could \
                         not be undone); detach or unbind its devices, or close the ioasid fd, \
                         to empty its domain and put it back in service"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether `group` is out of service because of this context.
    pub(super) fn is_broken(&self, c: &Context, group: GroupId) -> bool {
        c.broken.load(Ordering::Relaxed) > 0
            && lock(&self.registry).out_of_service.get(&group) == Some(&Some(c.id))
    }

    /// `group`'s domain was just emptied with `UNMAP_ALL`: if it was out of
    /// service, it is back, and when no group of the context is out of
    /// service any more, the aliases held meanwhile are released.
    pub(super) fn emptied(&self, c: &mut Context, group: GroupId) {
        // The private pins it held went with it.
        for (_, io) in c.ioasids.iter_mut() {
            for m in io.mappings.values_mut() {
                if let Memory::Private { pinned_in, .. } = &mut m.memory {
                    pinned_in.retain(|g| *g != group);
                }
            }
        }
        let was = {
            let mut reg = lock(&self.registry);
            match reg.out_of_service.get(&group) {
                Some(Some(owner)) if *owner == c.id => reg.out_of_service.remove(&group).is_some(),
                _ => false,
            }
        };
        if !was {
            return;
        }
        tracing::info!(
            group,
            "IOMMU group {group} is back in service: its domain was emptied"
        );
        if c.broken.fetch_sub(1, Ordering::Relaxed) == 1 {
            for alias in std::mem::take(&mut c.held) {
                self.backend.release_alias(&alias);
            }
        }
    }

    /// Give back an alias, or hold it while a group of the context is out
    /// of service (its domain may still map it).
    pub(super) fn release(&self, c: &mut Context, alias: Alias) {
        if c.broken.load(Ordering::Relaxed) > 0 {
            c.held.push(alias);
        } else {
            self.backend.release_alias(&alias);
        }
    }
}
