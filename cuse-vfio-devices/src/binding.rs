//! The bind state of one device node, as a pure state machine.
//!
//! A node is *unbound* until `VFIO_BIND_IOASID_FD` succeeds on one of its
//! open files; it is then *bound* to that open file (its CUSE file handle)
//! and to one ioasid context. Only that open file may use the device; every
//! other open file, and every open file before the bind, gets `EINVAL` for
//! the device's ioctls and region access, which is what the kernel's VFIO
//! device cdev answers before `VFIO_DEVICE_BIND_IOMMUFD`
//! (`vfio_device_fops_unl_ioctl`/`_read`/`_write` check `access_granted`).
//! A second bind, from any open file, is `EBUSY`.

use ioasid_engine::ContextId;
use nix::errno::Errno;

use crate::error::{Error, Result};

/// What a bound node holds.
#[derive(Debug)]
pub struct Bound<T> {
    /// The open file that did the bind.
    pub fh: u64,
    /// The ioasid context it is bound to.
    pub ctx: ContextId,
    /// What the binding owns (the device fd, the region table).
    pub payload: T,
}

/// The bind state: unbound, or bound by one open file.
#[derive(Debug)]
pub struct BindState<T> {
    bound: Option<Bound<T>>,
}

impl<T> Default for BindState<T> {
    fn default() -> Self {
        BindState { bound: None }
    }
}

impl<T> BindState<T> {
    /// Whether the node is bound.
    pub fn is_bound(&self) -> bool {
        self.bound.is_some()
    }

    /// The binding, if any.
    pub fn bound(&self) -> Option<&Bound<T>> {
        self.bound.as_ref()
    }

    /// Whether open file `fh` may bind now: `EBUSY` if the node is bound
    /// (through this or another open file).
    pub fn check_bindable(&self, fh: u64) -> Result<()> {
        match &self.bound {
            None => Ok(()),
            Some(b) if b.fh == fh => Err(Error::new(
                Errno::EBUSY,
                "the device is already bound through this open file; unbind it first",
            )),
            Some(_) => Err(Error::new(
                Errno::EBUSY,
                "the device is bound through another open file (another client?); a device \
                 is bound to one ioasid fd at a time",
            )),
        }
    }

    /// Record a bind by `fh` to `ctx` (after [`BindState::check_bindable`]).
    pub fn bind(&mut self, fh: u64, ctx: ContextId, payload: T) -> Result<()> {
        self.check_bindable(fh)?;
        self.bound = Some(Bound { fh, ctx, payload });
        Ok(())
    }

    /// The binding, for a request of open file `fh` that needs the device.
    pub fn access(&self, fh: u64) -> Result<&Bound<T>> {
        match &self.bound {
            Some(b) if b.fh == fh => Ok(b),
            Some(_) => Err(Error::new(
                Errno::EINVAL,
                "the device is bound through another open file; only that file may use it",
            )),
            None => Err(Error::new(
                Errno::EINVAL,
                "the device is not bound: VFIO_BIND_IOASID_FD an ioasid fd first",
            )),
        }
    }

    /// `VFIO_UNBIND_IOASID_FD` from `fh` naming context `ctx`: `EINVAL`
    /// unless `fh` holds the binding and `ctx` is its context.
    pub fn unbind(&mut self, fh: u64, ctx: ContextId) -> Result<Bound<T>> {
        let b = self.access(fh)?;
        if b.ctx != ctx {
            return Err(Error::new(
                Errno::EINVAL,
                "VFIO_UNBIND_IOASID_FD: the fd is not the ioasid fd this device is bound to",
            ));
        }
        Ok(self.bound.take().expect("checked"))
    }

    /// The last close of open file `fh`: the binding, if `fh` held it.
    pub fn release(&mut self, fh: u64) -> Option<Bound<T>> {
        if self.bound.as_ref().is_some_and(|b| b.fh == fh) {
            self.bound.take()
        } else {
            None
        }
    }

    /// Drop the binding if `stale(ctx)` says its context is gone.
    pub fn forget_if(&mut self, stale: impl FnOnce(ContextId) -> bool) -> Option<Bound<T>> {
        if self.bound.as_ref().is_some_and(|b| stale(b.ctx)) {
            self.bound.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: ContextId = ContextId(1);
    const C2: ContextId = ContextId(2);

    #[test]
    fn unbound_refuses_access_and_unbind() {
        let s = BindState::<()>::default();
        let e = s.access(1).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.contains("VFIO_BIND_IOASID_FD"), "{}", e.message);
        let mut s = s;
        assert_eq!(s.unbind(1, C1).unwrap_err().errno, Errno::EINVAL);
        assert!(s.release(1).is_none());
    }

    #[test]
    fn bind_gives_access_to_that_file_only() {
        let mut s = BindState::default();
        s.bind(1, C1, "dev").unwrap();
        assert_eq!(s.access(1).unwrap().payload, "dev");
        assert_eq!(s.access(2).unwrap_err().errno, Errno::EINVAL);
        // Second bind from the same file and from another file: EBUSY.
        assert_eq!(s.bind(1, C2, "x").unwrap_err().errno, Errno::EBUSY);
        assert_eq!(s.bind(2, C2, "x").unwrap_err().errno, Errno::EBUSY);
        assert_eq!(s.access(1).unwrap().ctx, C1, "unchanged by the refusals");
    }

    #[test]
    fn unbind_needs_the_binding_file_and_context() {
        let mut s = BindState::default();
        s.bind(1, C1, ()).unwrap();
        assert_eq!(s.unbind(2, C1).unwrap_err().errno, Errno::EINVAL);
        let e = s.unbind(1, C2).unwrap_err();
        assert!(e.message.contains("not the ioasid fd"), "{}", e.message);
        assert!(s.is_bound());
        assert_eq!(s.unbind(1, C1).unwrap().fh, 1);
        assert!(!s.is_bound());
        // Re-bindable, from any file.
        s.bind(3, C2, ()).unwrap();
    }

    #[test]
    fn release_of_the_binding_file_only() {
        let mut s = BindState::default();
        s.bind(1, C1, ()).unwrap();
        assert!(s.release(2).is_none());
        assert!(s.is_bound());
        assert_eq!(s.release(1).unwrap().ctx, C1);
        assert!(!s.is_bound());
    }

    #[test]
    fn forget_only_a_stale_context() {
        let mut s = BindState::default();
        s.bind(1, C1, ()).unwrap();
        assert!(s.forget_if(|c| c == C2).is_none());
        assert!(s.is_bound());
        assert!(s.forget_if(|c| c == C1).is_some());
        assert!(!s.is_bound());
        assert!(s.forget_if(|_| true).is_none());
    }
}
