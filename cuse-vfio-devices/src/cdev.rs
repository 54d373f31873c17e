//! [`CdevNode`]: one `/dev/vfio/devices/vfioN`, the kernel's VFIO device
//! cdev (`drivers/vfio/device_cdev.c`, `vfio_main.c`), served in the
//! iommufd dialect only, with N the kernel's own index (the entry of
//! `/sys/bus/pci/devices/BDF/vfio-dev/`).
//!
//! The device is the engine's, the same one the RFC's `devN` node serves:
//! the engine binds it to one context at a time, so a device bound through
//! one node is `EBUSY` for the other's bind (the kernel's answer when the
//! group path and the cdev path meet).
//!
//! - Until `VFIO_DEVICE_BIND_IOMMUFD` succeeds on an open file, every
//!   ioctl on it but the bind, known or not, and `pread`/`pwrite`, answer
//!   `EINVAL`; after it, a number the table lacks is `ENOTTY`.
//! - Bind, in the kernel's order: the extensible struct (`argsz` below 16
//!   `EINVAL`, non-zero bytes past 24 `E2BIG`), a negative fd or an
//!   unknown flag `EINVAL`, bound through the RFC's node `EBUSY`, this file
//!   bound already `EINVAL`, the SR-IOV token (`EFAULT` unreadable,
//!   `EINVAL`: not offered), the fd (`EBADF` not open, `EBADFD` not a
//!   `/dev/iommu` file of this daemon), bound through another `vfioN` file
//!   `EINVAL`, the group held by another context `EBUSY`. The copy of the
//!   iommufd taken with `pidfd_getfd` is kept until unbind, so closing
//!   `/dev/iommu` first keeps the context alive, as in the kernel.
//! - Attach/detach: VFIO's `argsz`/`minsz` rules (nothing past the struct
//!   is read), then the engine's `attach_pt` (the HWPT id written back
//!   into `pt_id`) and `detach_pt`. PASID attachments: no HWPT is
//!   PASID-capable, so `EINVAL`; a PASID detach is a no-op.
//! - The device's own VFIO commands and region access: as on `devN`. The
//!   hot reset comes in the cdev's device-id form.
//! - Release (the last close of the binding file): unbind (detach, device
//!   object gone), close the device fd (the kernel resets the device),
//!   drop the iommufd copy, all before the release is answered.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use cuse_server::Offset;
use ioasid_engine::{ContextId, DeviceSpec, Engine, ObjectId};
use ioasid_uapi::error::{Errno, Error, Result};
use ioasid_uapi::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_detach_iommufd_pt,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_DEVICE_ATTACH_PASID, VFIO_DEVICE_BIND_FLAG_TOKEN,
    VFIO_DEVICE_BIND_IOMMUFD, VFIO_DEVICE_DETACH_IOMMUFD_PT, VFIO_DEVICE_DETACH_PASID,
    VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_IRQ_INFO, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_PCI_HOT_RESET, VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS, VFIO_PCI_DEVID_NOT_OWNED, VFIO_PCI_DEVID_OWNED,
    VFIO_PCI_HOT_RESET_FLAG_DEV_ID, VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED,
};
use ioctl_table::{ioctl_op, Caller, Table, Ucmd};
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, vfio_pci_hot_reset, vfio_pci_hot_reset_info,
    vfio_region_info,
};
use vfio_legacy::{Dependent, VfioArg};

use crate::binding::BindState;
use crate::device_file::{ContextLookup, DeviceOpener};
use crate::ioctl::{device_info, irq_info, region_info, reset, set_irqs, DeviceAccess};
use crate::node::{
    affected_devices, log_refusal, note, open_device, read_region, write_region, Opened,
};

/// What a bound cdev file holds.
#[derive(Debug)]
struct CdevBinding {
    opened: Opened,
    /// The client's `/dev/iommu` file, copied at bind: held until unbind,
    /// as the kernel holds it (closing `/dev/iommu` first keeps the
    /// context).
    _iommufd: OwnedFd,
}

/// One `/dev/vfio/devices/vfioN` node: implements [`cuse_server::Device`].
pub struct CdevNode {
    spec: DeviceSpec,
    engine: Arc<Engine>,
    opener: Arc<dyn DeviceOpener>,
    lookup: Arc<dyn ContextLookup>,
    /// The device is an SR-IOV function (the bind token applies to it).
    sriov: bool,
    state: Mutex<BindState<CdevBinding>>,
    next_fh: AtomicU64,
}

impl std::fmt::Debug for CdevNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CdevNode")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Every command of a `vfioN` node. The bind is the only one served
/// before the file is bound.
pub static CDEV_TABLE: Table<CdevNode> = Table {
    node: "/dev/vfio/devices/vfioN",
    unknown_flags: Errno::EINVAL,
    ops: &[
        ioctl_op!(VFIO_DEVICE_GET_INFO, device_info, data vfio_device_info, num_irqs),
        ioctl_op!(VFIO_DEVICE_GET_REGION_INFO, region_info, data vfio_region_info, offset),
        ioctl_op!(VFIO_DEVICE_GET_IRQ_INFO, irq_info, data vfio_irq_info, count),
        ioctl_op!(VFIO_DEVICE_SET_IRQS, set_irqs, data vfio_irq_set, count),
        ioctl_op!(VFIO_DEVICE_RESET, reset),
        ioctl_op!(
            VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hot_reset_info, data vfio_pci_hot_reset_info, count
        ),
        ioctl_op!(VFIO_DEVICE_PCI_HOT_RESET, hot_reset, data vfio_pci_hot_reset, count),
        ioctl_op!(
            VFIO_DEVICE_BIND_IOMMUFD,
            bind,
            vfio_device_bind_iommufd,
            out_devid,
            flags = VFIO_DEVICE_BIND_FLAG_TOKEN
        ),
        ioctl_op!(
            VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            attach,
            vfio_device_attach_iommufd_pt,
            pt_id
        )
        .output_tail(),
        ioctl_op!(
            VFIO_DEVICE_DETACH_IOMMUFD_PT,
            detach,
            vfio_device_detach_iommufd_pt,
            flags
        )
        .output_tail(),
    ],
};

impl DeviceAccess for CdevNode {
    fn access(&self, fh: u64) -> Result<(ContextId, Opened)> {
        let (r, stale) = {
            let mut st = self.lock();
            let now = self.engine.bound_context(self.spec.id);
            let stale = st.forget_if(|ctx| now != Some(ctx));
            let r = match st.bound() {
                Some(b) if b.fh == fh => Ok((b.ctx, b.payload.opened.clone())),
                _ => Err(Error::new(
                    Errno::EINVAL,
                    "this open file of the device is not bound: VFIO_DEVICE_BIND_IOMMUFD first",
                )),
            };
            (r, stale)
        };
        drop(stale);
        r
    }
}

impl CdevNode {
    /// The node of device `spec` (one of `engine`'s devices), opening the
    /// device through `opener` and recognising `/dev/iommu` files with
    /// `lookup`; `sriov` if the device is an SR-IOV function.
    pub fn new(
        engine: Arc<Engine>,
        spec: DeviceSpec,
        opener: Arc<dyn DeviceOpener>,
        lookup: Arc<dyn ContextLookup>,
        sriov: bool,
    ) -> Self {
        CdevNode {
            spec,
            engine,
            opener,
            lookup,
            sriov,
            state: Mutex::new(BindState::default()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// The device served.
    pub fn spec(&self) -> &DeviceSpec {
        &self.spec
    }

    fn lock(&self) -> MutexGuard<'_, BindState<CdevBinding>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Log a refused request (see [`log_refusal`]).
    fn log(&self, op: &str, fh: u64, e: &Error) {
        let bound = self.lock().bound().map(|b| (b.fh, b.ctx));
        log_refusal(&self.spec, bound, op, fh, e);
    }

    /// Forget the binding if its context is gone (see
    /// [`crate::DeviceNode::forget_stale`]); whether one was dropped.
    pub fn forget_stale(&self) -> bool {
        let gone = {
            let now = self.engine.bound_context(self.spec.id);
            self.lock().forget_if(|ctx| now != Some(ctx))
        };
        gone.is_some()
    }

    /// Handle ioctl `cmd` with argument `arg` from open file `fh`: before
    /// the file is bound, everything but the bind is `EINVAL`.
    pub fn handle_ioctl(&self, caller: &dyn Caller, fh: u64, cmd: u32, arg: u64) -> Result<i32> {
        if cmd != VFIO_DEVICE_BIND_IOMMUFD {
            self.access(fh)?;
        }
        let Some(op) = CDEV_TABLE.find(cmd) else {
            return Err(crate::ioctl::not_served(cmd, "a VFIO device cdev"));
        };
        CDEV_TABLE.call(op, self, caller, fh, arg)
    }

    /// `pread` of `size` bytes at `offset` by open file `fh`.
    pub fn handle_read(&self, fh: u64, size: u32, offset: &Offset) -> Result<Vec<u8>> {
        let (_, opened) = self.access(fh)?;
        read_region(&opened, size, offset)
    }

    /// `pwrite` of `data` at `offset` by open file `fh`.
    pub fn handle_write(&self, fh: u64, data: &[u8], offset: &Offset) -> Result<u32> {
        let (_, opened) = self.access(fh)?;
        write_region(&opened, data, offset)
    }

    /// The last close of open file `fh`: if it holds the binding, unbind
    /// (detach, device object gone), close the device fd (the kernel resets
    /// the device) and drop the iommufd copy, before returning.
    pub fn handle_release(&self, fh: u64) {
        let gone = self.lock().release(fh);
        let Some(b) = gone else { return };
        match self.engine.iommufd_unbind(self.spec.id, b.ctx) {
            Ok(()) => note(&self.spec, b.ctx, fh, "released: unbound"),
            Err(e) => {
                tracing::debug!(device = %self.spec.name, fh, error = %e, "unbind at release")
            }
        }
        drop(b);
    }

    fn bind(&self, u: &Ucmd<'_>, b: vfio_device_bind_iommufd) -> Result<i32> {
        let fh = u.fh;
        if b.iommufd < 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!("iommufd {} is not a file descriptor", b.iommufd),
            ));
        }
        {
            let st = self.lock();
            if st.bound().is_none() && self.engine.bound_context(self.spec.id).is_some() {
                return Err(Error::new(
                    Errno::EBUSY,
                    format!(
                        "device {} is bound through its RFC node (/dev/vfio/devices/devN); \
                         unbind it there first",
                        self.spec.name
                    ),
                ));
            }
            if st.bound().is_some_and(|x| x.fh == fh) {
                return Err(Error::new(
                    Errno::EINVAL,
                    "this file is bound already; close it to unbind",
                ));
            }
        }
        if b.flags & VFIO_DEVICE_BIND_FLAG_TOKEN != 0 {
            let mut uuid = [0u8; 16];
            u.caller
                .read_mem(b.token_uuid_ptr, &mut uuid)
                .map_err(|e| Error::new(e, "token_uuid_ptr cannot be read"))?;
            return Err(Error::new(
                Errno::EINVAL,
                if self.sriov {
                    "SR-IOV VF tokens are not offered by the daemon"
                } else {
                    "VFIO_DEVICE_BIND_FLAG_TOKEN: the device is not an SR-IOV function"
                },
            ));
        }
        let file = u.caller.get_fd(b.iommufd).map_err(|e| {
            Error::new(
                e,
                format!("iommufd {} is not an open file of the caller", b.iommufd),
            )
        })?;
        let ctx = match self.lookup.context_of(file.as_fd()) {
            Ok(ctx) => ctx,
            Err(e) => {
                drop(file);
                return Err(Error::new(Errno::EBADFD, e.message));
            }
        };
        let r = self.bind_locked(fh, ctx, file);
        let devid = match r {
            Ok(devid) => devid,
            Err((e, file)) => {
                drop(file); // outside the lock: may be the iommufd's last close
                return Err(e);
            }
        };
        let mut out = b;
        out.out_devid = devid;
        let at = std::mem::offset_of!(vfio_device_bind_iommufd, out_devid);
        if let Err(e) = u.write_fields(&out, at..at + 4) {
            self.handle_release(fh);
            return Err(e);
        }
        note(
            &self.spec,
            ctx,
            fh,
            &format!("bound (iommufd), devid {devid}"),
        );
        Ok(0)
    }

    /// Steps 7 and 8 of the bind, under the state lock; on failure the
    /// iommufd copy comes back to be dropped outside it.
    fn bind_locked(
        &self,
        fh: u64,
        ctx: ContextId,
        file: OwnedFd,
    ) -> std::result::Result<ObjectId, (Error, Option<OwnedFd>)> {
        let mut st = self.lock();
        if st.bound().is_some() {
            return Err((
                Error::new(
                    Errno::EINVAL,
                    "the device is bound through another open file of this node",
                ),
                Some(file),
            ));
        }
        let devid = match self.engine.iommufd_bind(self.spec.id, ctx) {
            Ok(id) => id,
            Err(e) => return Err((e, Some(file))),
        };
        let opened = match open_device(&*self.opener, &self.spec) {
            Ok(o) => o,
            Err(e) => {
                if let Err(u) = self.engine.iommufd_unbind(self.spec.id, ctx) {
                    tracing::warn!(device = %self.spec.name, error = %u, "rollback of a bind failed");
                }
                return Err((e, Some(file)));
            }
        };
        let binding = CdevBinding {
            opened,
            _iommufd: file,
        };
        // Cannot fail: the node was found unbound under this same lock.
        if let Err(e) = st.bind(fh, ctx, binding) {
            let _ = self.engine.iommufd_unbind(self.spec.id, ctx);
            return Err((e, None));
        }
        Ok(devid)
    }

    fn attach(&self, u: &Ucmd<'_>, a: vfio_device_attach_iommufd_pt) -> Result<i32> {
        let (ctx, _) = self.access(u.fh)?;
        if a.flags & !VFIO_DEVICE_ATTACH_PASID != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!("unknown flags {:#x}", a.flags),
            ));
        }
        if a.flags & VFIO_DEVICE_ATTACH_PASID != 0 {
            if u.user_size < std::mem::size_of::<vfio_device_attach_iommufd_pt>() {
                return Err(Error::new(
                    Errno::EINVAL,
                    "VFIO_DEVICE_ATTACH_PASID needs argsz 16 (the pasid field)",
                ));
            }
            return match self.engine.object_kind(ctx, a.pt_id)? {
                None => Err(Error::new(
                    Errno::ENOENT,
                    format!("pt_id {}: no such object", a.pt_id),
                )),
                Some(_) => Err(Error::new(
                    Errno::EINVAL,
                    "no HWPT is PASID-capable on legacy VFIO (PASID DMA cannot be routed)",
                )),
            };
        }
        // Private memory of the IOAS is pinned by the caller's own thread
        // after the reply; what goes wrong then is the context's line.
        let client = u.client_as(ioctl_table::log::Client::Context(ctx.0));
        let hwpt = self.engine.attach_pt(self.spec.id, ctx, &client, a.pt_id)?;
        let out = vfio_device_attach_iommufd_pt { pt_id: hwpt, ..a };
        let at = std::mem::offset_of!(vfio_device_attach_iommufd_pt, pt_id);
        u.write_fields(&out, at..at + 4)?;
        Ok(0)
    }

    fn detach(&self, u: &Ucmd<'_>, d: vfio_device_detach_iommufd_pt) -> Result<i32> {
        let (ctx, _) = self.access(u.fh)?;
        if d.flags & !VFIO_DEVICE_DETACH_PASID != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!("unknown flags {:#x}", d.flags),
            ));
        }
        if d.flags & VFIO_DEVICE_DETACH_PASID == 0 {
            self.engine.detach_pt(self.spec.id, ctx)?;
        }
        Ok(0)
    }

    /// Whether IOMMU group `group` has a device bound to context `ctx`.
    fn group_owned(&self, group: u32, ctx: ContextId) -> bool {
        self.engine
            .devices()
            .any(|d| d.group == group && self.engine.bound_context(d.id) == Some(ctx))
    }

    /// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` in the device-id form: each
    /// affected device by its id in the caller's iommufd, or
    /// `VFIO_PCI_DEVID_OWNED` when only its group is owned, or
    /// `VFIO_PCI_DEVID_NOT_OWNED` (which clears `DEV_ID_OWNED`).
    fn hot_reset_info(&self, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
        let (ctx, opened) = self.access(u.fh)?;
        let mut info: VfioArg<vfio_pci_hot_reset_info> = VfioArg::from_bytes(arg)?;
        match opened.device.hot_reset_info(&mut info) {
            Ok(()) => {}
            Err(Errno::ENOSPC) => {
                let mut h = info.header();
                h.flags = 0;
                info.set_header(&h);
                u.write_at(0, &info.as_bytes()[..12])?;
                return Err(Error::new(
                    Errno::ENOSPC,
                    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: no room; count says how many",
                ));
            }
            Err(e) => {
                return Err(Error::new(
                    e,
                    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO failed on the device",
                ))
            }
        }
        let mut owned = true;
        let mapped: Vec<Dependent> = info
            .dependents()?
            .into_iter()
            .map(|d| {
                let dev = self.engine.devices().find(|s| s.name == d.bdf());
                let id = match dev.and_then(|s| self.engine.device_object_id(ctx, s.id)) {
                    Some(id) => id,
                    None if self.group_owned(d.id, ctx) => VFIO_PCI_DEVID_OWNED,
                    None => {
                        owned = false;
                        VFIO_PCI_DEVID_NOT_OWNED as u32
                    }
                };
                Dependent { id, ..d }
            })
            .collect();
        info.set_dependents(&mapped)
            .ok_or_else(|| Error::new(Errno::EINVAL, "the device list does not fit"))?;
        let mut h = info.header();
        h.flags = VFIO_PCI_HOT_RESET_FLAG_DEV_ID
            | if owned {
                VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
            } else {
                0
            };
        info.set_header(&h);
        u.write_at(0, info.as_bytes())?;
        Ok(0)
    }

    /// `VFIO_DEVICE_PCI_HOT_RESET` of a cdev: no group fds (`count` 0);
    /// every affected group must be owned by the caller's iommufd
    /// (`EINVAL` otherwise, as the kernel answers); the daemon passes its
    /// own group files.
    fn hot_reset(&self, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
        const NAME: &str = "VFIO_DEVICE_PCI_HOT_RESET";
        let (ctx, opened) = self.access(u.fh)?;
        let given: VfioArg<vfio_pci_hot_reset> = VfioArg::from_bytes(arg)?;
        let vfio_pci_hot_reset { flags, count, .. } = given.header();
        if flags != 0 || count != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "{NAME}: flags {flags:#x} and count {count} must be 0 on a device cdev \
                     (no group fds)"
                ),
            ));
        }
        let info = affected_devices(&*opened.device)?;
        let groups = info.groups()?;
        if let Some(g) = groups.iter().find(|&&g| !self.group_owned(g, ctx)) {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "{NAME}: the reset affects IOMMU group {g}, none of whose devices is bound \
                     to this iommufd"
                ),
            ));
        }
        let files = self.opener.group_fds(&groups)?;
        opened
            .device
            .hot_reset(&files)
            .map_err(|e| Error::new(e, format!("{NAME} failed on the device")))?;
        note(
            &self.spec,
            ctx,
            u.fh,
            &format!("hot reset of groups {groups:?}"),
        );
        Ok(0)
    }
}

fn bind(n: &CdevNode, u: &Ucmd<'_>, b: vfio_device_bind_iommufd) -> Result<i32> {
    n.bind(u, b)
}

fn attach(n: &CdevNode, u: &Ucmd<'_>, a: vfio_device_attach_iommufd_pt) -> Result<i32> {
    n.attach(u, a)
}

fn detach(n: &CdevNode, u: &Ucmd<'_>, d: vfio_device_detach_iommufd_pt) -> Result<i32> {
    n.detach(u, d)
}

fn hot_reset_info(n: &CdevNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    n.hot_reset_info(u, arg)
}

fn hot_reset(n: &CdevNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    n.hot_reset(u, arg)
}

crate::node::serve_device!(CdevNode);
