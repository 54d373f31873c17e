//! [`DeviceNode`]: one `/dev/vfio/devices/devN`, and [`DeviceNodes`], the
//! daemon's set of them.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use cuse_server::{DeviceNumber, Offset};
use ioasid_engine::{ClosedContext, ContextId, DeviceId, DeviceSpec, Engine};
use ioasid_uapi::vfio as nr;
use ioasid_uapi::{VfioAttachIoasid, IOASID_ATTACH_USER_PASID};
use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_pci_dependent_device, vfio_pci_hot_reset, vfio_pci_hot_reset_info,
    vfio_region_info,
};
use vfio_legacy::VfioLegacy;
use vfio_legacy::{DeviceFile, VfioArg};

use crate::binding::{BindState, Bound};
use crate::cdev::CdevNode;
use crate::device_file::{ContextLookup, DeviceOpener, IoasidIdentify};
use crate::error::{Error, Result};
use crate::ioctl::{DEVICE_TABLE, NEEDS_BIND};
use crate::regions::{self, Access, Region, RegionTable};
use ioctl_table::log::{self, Client};
use ioctl_table::{Caller, Ucmd};

/// Most regions read into the table at bind (vfio-pci has 9 plus
/// device-specific ones).
const MAX_REGIONS: u32 = 64;

/// What a binding owns: the real device file (closing it resets the
/// device) and the region table read when it was opened.
#[derive(Debug, Clone)]
pub(crate) struct Opened {
    pub(crate) device: Arc<dyn DeviceFile>,
    pub(crate) regions: Arc<RegionTable>,
}

/// One `/dev/vfio/devices/devN` node: implements [`cuse_server::Device`].
///
/// See the crate documentation for the protocol. Every method takes
/// `&self`; the bind state sits behind one mutex that is never held while
/// a request waits for another CUSE node (the ioasid fd lookup and the
/// closing of the caller's copied fds happen outside it).
pub struct DeviceNode {
    spec: DeviceSpec,
    engine: Arc<Engine>,
    opener: Arc<dyn DeviceOpener>,
    lookup: Arc<dyn ContextLookup>,
    state: Mutex<BindState<Opened>>,
    next_fh: AtomicU64,
}

impl std::fmt::Debug for DeviceNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceNode")
            .field("spec", &self.spec)
            .field("state", &self.lock().bound().map(|b| (b.fh, b.ctx)))
            .finish()
    }
}

impl DeviceNode {
    /// The node of device `spec` (one of `engine`'s devices), opening the
    /// real device through `vfio` at bind time and recognising ioasid fds
    /// by the `/dev/ioasid` node's device number `ioasid_dev`.
    pub fn new(
        engine: Arc<Engine>,
        vfio: Arc<VfioLegacy>,
        spec: DeviceSpec,
        ioasid_dev: DeviceNumber,
    ) -> Self {
        Self::with_parts(
            engine,
            spec,
            vfio,
            Arc::new(IoasidIdentify::new(ioasid_dev)),
        )
    }

    /// The node with explicit seams: how the device is opened and how an
    /// ioasid fd is resolved to its context (fakes in tests).
    pub fn with_parts(
        engine: Arc<Engine>,
        spec: DeviceSpec,
        opener: Arc<dyn DeviceOpener>,
        lookup: Arc<dyn ContextLookup>,
    ) -> Self {
        DeviceNode {
            spec,
            engine,
            opener,
            lookup,
            state: Mutex::new(BindState::default()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// The device served.
    pub fn spec(&self) -> &DeviceSpec {
        &self.spec
    }

    /// The context the node is bound to, if any.
    pub fn bound_context(&self) -> Option<ContextId> {
        self.lock().bound().map(|b| b.ctx)
    }

    fn lock(&self) -> MutexGuard<'_, BindState<Opened>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget the binding if the engine no longer binds the device to its
    /// context (the context was closed). Closes the device fd (the kernel
    /// resets the device). Returns whether a binding was dropped. The
    /// daemon calls it through [`DeviceNodes::on_context_closed`]; every
    /// request also checks, so a missed call only delays the reset.
    pub fn forget_stale(&self) -> bool {
        let gone = {
            let mut st = self.lock();
            self.take_stale(&mut st)
        };
        match gone {
            Some(b) => {
                self.note(
                    b.ctx,
                    b.fh,
                    "ioasid fd closed: device unbound, device fd closed (the device is reset)",
                );
                drop(b);
                true
            }
            None => false,
        }
    }

    fn take_stale(&self, st: &mut BindState<Opened>) -> Option<Bound<Opened>> {
        let now = self.engine.bound_context(self.spec.id);
        st.forget_if(|ctx| now != Some(ctx))
    }

    /// The binding of open file `fh`, for a request that needs the device.
    pub(crate) fn access(&self, fh: u64) -> Result<(ContextId, Opened)> {
        let (r, stale) = {
            let mut st = self.lock();
            let stale = self.take_stale(&mut st);
            (st.access(fh).map(|b| (b.ctx, b.payload.clone())), stale)
        };
        drop(stale);
        r
    }

    /// Log a refused request (see [`log_refusal`]).
    fn log(&self, op: &str, fh: u64, e: &Error) {
        let bound = self.lock().bound().map(|b| (b.fh, b.ctx));
        log_refusal(&self.spec, bound, op, fh, e);
    }

    /// An info line about open file `fh` bound to `ctx` (see [`note`]).
    fn note(&self, ctx: ContextId, fh: u64, what: &str) {
        note(&self.spec, ctx, fh, what);
    }

    /// Handle ioctl `cmd` with argument `arg` from open file `fh`; the
    /// whole ioctl path, with the caller behind a trait.
    ///
    /// The commands are the rows of [`DEVICE_TABLE`]. A VFIO number the
    /// table does not serve is `EINVAL` until the device is bound (as the
    /// kernel's device cdev answers before `access_granted`), `ENOTTY`
    /// after; any other number is `ENOTTY`.
    pub fn handle_ioctl(&self, caller: &dyn Caller, fh: u64, cmd: u32, arg: u64) -> Result<i32> {
        let table = &DEVICE_TABLE;
        let Some(op) = table.find(cmd) else {
            if nr::ALL.iter().any(|(_, n)| *n == cmd) {
                self.access(fh)?;
            }
            return Err(crate::ioctl::not_served(cmd, "a device node"));
        };
        if op.requires == NEEDS_BIND {
            self.access(fh)?;
        }
        table.call(op, self, caller, fh, arg)
    }

    /// The caller's fd number in an integer ioctl argument.
    fn fd_arg(arg: u64) -> Result<i32> {
        // An `int` passed as `unsigned long` arrives sign-extended.
        i32::try_from(arg as i64)
            .map_err(|_| Error::new(Errno::EBADF, format!("{arg:#x} is not a file descriptor")))
    }

    /// Copy the caller's fd and find its context. The copy is returned so
    /// the caller of this function drops it *after* releasing the state
    /// lock: if the client closed its ioasid fd meanwhile, dropping the
    /// copy is the last close, which makes the kernel send RELEASE to the
    /// `/dev/ioasid` node and wait for it; that release closes the context
    /// and calls back into this node.
    fn resolve(&self, caller: &dyn Caller, arg: u64) -> Result<(OwnedFd, ContextId)> {
        let fd = Self::fd_arg(arg)?;
        let file = caller.get_fd(fd).map_err(|e| {
            let what = if e == Errno::EBADF {
                "is not an open file descriptor of the caller".to_string()
            } else {
                format!("could not be copied from the caller: {e}")
            };
            Error::new(e, format!("ioasid fd {fd} {what}"))
        })?;
        let ctx = self.lookup.context_of(file.as_fd())?;
        Ok((file, ctx))
    }

    pub(crate) fn bind(&self, caller: &dyn Caller, fh: u64, arg: u64) -> Result<i32> {
        let (file, ctx) = self.resolve(caller, arg)?;
        let (r, stale) = {
            let mut st = self.lock();
            let stale = self.take_stale(&mut st);
            (self.bind_locked(&mut st, fh, ctx), stale)
        };
        drop(stale);
        drop(file);
        if r.is_ok() {
            self.note(ctx, fh, "bound");
        }
        r.map(|()| 0)
    }

    fn bind_locked(&self, st: &mut BindState<Opened>, fh: u64, ctx: ContextId) -> Result<()> {
        st.check_bindable(fh)?;
        self.engine.bind(self.spec.id, ctx)?;
        let opened = open_device(&*self.opener, &self.spec).inspect_err(|_| {
            if let Err(e) = self.engine.unbind(self.spec.id, ctx) {
                tracing::warn!(device = %self.spec.name, error = %e, "rollback of a bind failed");
            }
        })?;
        st.bind(fh, ctx, opened)
    }

    pub(crate) fn unbind(&self, caller: &dyn Caller, fh: u64, arg: u64) -> Result<i32> {
        let (file, ctx) = self.resolve(caller, arg)?;
        let (r, stale) = {
            let mut st = self.lock();
            let stale = self.take_stale(&mut st);
            let r = st
                .access(fh)
                .and_then(|b| {
                    if b.ctx == ctx {
                        Ok(())
                    } else {
                        Err(Error::new(
                            Errno::EINVAL,
                            "VFIO_UNBIND_IOASID_FD: the fd is not the ioasid fd this device \
                             is bound to",
                        ))
                    }
                })
                .and_then(|()| self.engine.unbind(self.spec.id, ctx))
                .and_then(|()| st.unbind(fh, ctx));
            (r, stale)
        };
        drop(stale);
        drop(file);
        // Dropping the binding closes the device fd: the kernel resets it.
        let gone = r?;
        self.note(ctx, fh, "unbound");
        drop(gone);
        Ok(0)
    }

    pub(crate) fn attach(&self, u: &Ucmd<'_>, a: VfioAttachIoasid, attach: bool) -> Result<i32> {
        let fh = u.fh;
        let (ctx, _) = self.access(fh)?;
        // What the attach leaves to the caller's own thread (replaying
        // private memory) is logged as the bound context's.
        let client = u.client_as(Client::Context(ctx.0));
        let pasid = if a.flags & IOASID_ATTACH_USER_PASID != 0 {
            Some(a.user_pasid)
        } else if a.user_pasid != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "user_pasid is {:#x} without IOASID_ATTACH_USER_PASID; it must be 0",
                    a.user_pasid
                ),
            ));
        } else {
            None
        };
        if attach {
            self.engine
                .attach(self.spec.id, ctx, &client, a.ioasid, pasid)?;
            if let Some(p) = pasid {
                self.note(
                    ctx,
                    fh,
                    &format!(
                        "PASID {p} attachment to IOASID {} recorded; legacy VFIO cannot route \
                         PASID-tagged DMA",
                        a.ioasid
                    ),
                );
            }
        } else {
            self.engine.detach(self.spec.id, ctx, a.ioasid, pasid)?;
        }
        Ok(0)
    }

    /// `VFIO_DEVICE_PCI_HOT_RESET`. The caller holds no group fds in this
    /// model: it passes `count` 0 (and no fds); the daemon asks the device
    /// which devices the reset affects (`GET_PCI_HOT_RESET_INFO`), requires
    /// every device of their IOMMU groups to be bound to the caller's
    /// context (`EPERM` otherwise: the reset would hit another client's
    /// device), and passes its own group fds.
    pub(crate) fn hot_reset(
        &self,
        ctx: ContextId,
        dev: &dyn DeviceFile,
        given: VfioArg<vfio_pci_hot_reset>,
    ) -> Result<i32> {
        const NAME: &str = "VFIO_DEVICE_PCI_HOT_RESET";
        let vfio_pci_hot_reset { flags, count, .. } = given.header();
        if flags != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!("{NAME}: flags {flags:#x} must be 0"),
            ));
        }
        if count != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "{NAME}: count {count}: a device node's client has no group fds; pass \
                     count 0 and the daemon supplies the fds of the affected groups"
                ),
            ));
        }
        let info = affected_devices(dev)?;
        let groups = info.groups()?;
        for &g in &groups {
            let members: Vec<&DeviceSpec> =
                self.engine.devices().filter(|d| d.group == g).collect();
            if members.is_empty() {
                return Err(Error::new(
                    Errno::EPERM,
                    format!(
                        "{NAME}: the reset affects IOMMU group {g}, which this daemon does not \
                         serve"
                    ),
                ));
            }
            if let Some(other) = members
                .iter()
                .find(|d| self.engine.bound_context(d.id) != Some(ctx))
            {
                return Err(Error::new(
                    Errno::EPERM,
                    format!(
                        "{NAME}: the reset would also reset {} (IOMMU group {g}), which is not \
                         bound to this ioasid fd; bind it to the same ioasid fd first",
                        other.name
                    ),
                ));
            }
        }
        let files = self.opener.group_fds(&groups)?;
        dev.hot_reset(&files)
            .map_err(|e| Error::new(e, format!("{NAME} failed on the device")))?;
        if let Some(dropped) = log::client_line(Client::Context(ctx.0)) {
            tracing::info!(device = %self.spec.name, groups = ?groups, "hot reset{dropped}");
        }
        Ok(0)
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

    /// The last close of open file `fh`: if it holds the binding, detach
    /// and unbind the device and close the device fd (the kernel resets the
    /// device).
    pub fn handle_release(&self, fh: u64) {
        let gone = self.lock().release(fh);
        let Some(b) = gone else { return };
        match self.engine.unbind(self.spec.id, b.ctx) {
            Ok(()) => self.note(b.ctx, fh, "released: unbound"),
            Err(e) => {
                // The context may be closing at the same time; it unbinds.
                tracing::debug!(device = %self.spec.name, fh, error = %e, "unbind at release")
            }
        }
        drop(b);
    }
}

crate::node::serve_device!(DeviceNode);

/// The one log rule for a refused request of a device node
/// (`ioctl_table::log`): the line is charged to the context open file `fh`
/// is bound to (`bound`: the bound file and its context), or else to the
/// file itself.
pub(crate) fn log_refusal(
    spec: &DeviceSpec,
    bound: Option<(u64, ContextId)>,
    op: &str,
    fh: u64,
    e: &Error,
) {
    let client = match bound {
        Some((b, ctx)) if b == fh => Client::Context(ctx.0),
        _ => Client::DeviceFile(spec.id.0, fh),
    };
    log::refusal(client, &spec.name, op, e);
}

/// An info line about open file `fh` of device `spec`, bound to `ctx`,
/// within that client's log budget.
pub(crate) fn note(spec: &DeviceSpec, ctx: ContextId, fh: u64, what: &str) {
    if let Some(dropped) = log::client_line(Client::Context(ctx.0)) {
        tracing::info!(device = %spec.name, fh, ctx = ctx.0, "{what}{dropped}");
    }
}

/// `impl cuse_server::Device` for a device node type with `next_fh`,
/// `log` and the `handle_*` methods (both dialects' nodes).
macro_rules! serve_device {
    ($node:ty) => {
        impl cuse_server::Device for $node {
            fn open(
                &self,
                _req: &cuse_server::Request,
                _flags: cuse_server::OpenFlags,
            ) -> std::result::Result<u64, nix::errno::Errno> {
                Ok(self
                    .next_fh
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            }

            fn read(
                &self,
                _req: &cuse_server::Request,
                fh: u64,
                size: u32,
                offset: cuse_server::Offset,
            ) -> std::result::Result<Vec<u8>, nix::errno::Errno> {
                self.handle_read(fh, size, &offset).map_err(|e| {
                    self.log("read", fh, &e);
                    e.errno
                })
            }

            fn write(
                &self,
                _req: &cuse_server::Request,
                fh: u64,
                data: &[u8],
                offset: cuse_server::Offset,
            ) -> std::result::Result<u32, nix::errno::Errno> {
                self.handle_write(fh, data, &offset).map_err(|e| {
                    self.log("write", fh, &e);
                    e.errno
                })
            }

            fn ioctl(
                &self,
                req: &cuse_server::Request,
                fh: u64,
                args: cuse_server::IoctlArgs<'_>,
            ) -> std::result::Result<cuse_server::IoctlResult, nix::errno::Errno> {
                match self.handle_ioctl(req, fh, args.cmd, args.arg) {
                    Ok(v) => Ok(cuse_server::IoctlResult::value(v)),
                    Err(e) => {
                        self.log(&format!("ioctl {:#x}", args.cmd), fh, &e);
                        Err(e.errno)
                    }
                }
            }

            fn release(&self, fh: u64) {
                self.handle_release(fh)
            }
        }
    };
}
pub(crate) use serve_device;

/// `pread` of `size` bytes at `offset` of a region of `opened`.
pub(crate) fn read_region(opened: &Opened, size: u32, offset: &Offset) -> Result<Vec<u8>> {
    let pos = regions::position(offset)?;
    if size == 0 {
        return Ok(Vec::new());
    }
    opened.regions.check(pos, u64::from(size), Access::Read)?;
    let mut buf = vec![0u8; size as usize];
    let n = opened
        .device
        .read_at(&mut buf, pos)
        .map_err(|e| Error::new(e, format!("pread of {size} bytes at {pos:#x} failed")))?;
    buf.truncate(n);
    Ok(buf)
}

/// `pwrite` of `data` at `offset` of a region of `opened`.
pub(crate) fn write_region(opened: &Opened, data: &[u8], offset: &Offset) -> Result<u32> {
    let pos = regions::position(offset)?;
    if data.is_empty() {
        return Ok(0);
    }
    opened
        .regions
        .check(pos, data.len() as u64, Access::Write)?;
    let n = opened.device.write_at(data, pos).map_err(|e| {
        Error::new(
            e,
            format!("pwrite of {} bytes at {pos:#x} failed", data.len()),
        )
    })?;
    Ok(n as u32)
}

/// Open device `spec` through `opener` and read its region table.
pub(crate) fn open_device(opener: &dyn DeviceOpener, spec: &DeviceSpec) -> Result<Opened> {
    let device: Arc<dyn DeviceFile> = Arc::from(opener.open_device(spec)?);
    let mut info = VfioArg::new(&vfio_device_info::default(), 0);
    device
        .info(&mut info)
        .map_err(|e| Error::new(e, "VFIO_DEVICE_GET_INFO on the opened device failed"))?;
    let num_regions = info.header().num_regions;
    if num_regions > MAX_REGIONS {
        tracing::warn!(
            device = %spec.name,
            num_regions,
            "the device reports more regions than the daemon serves ({MAX_REGIONS}); the \
             rest cannot be read or written"
        );
    }
    let mut regions = Vec::new();
    for index in 0..num_regions.min(MAX_REGIONS) {
        let ask = vfio_region_info {
            index,
            ..Default::default()
        };
        let mut r = VfioArg::new(&ask, 0);
        match device.region_info(&mut r) {
            Ok(()) => {
                let h = r.header();
                regions.push(Region {
                    index,
                    flags: h.flags,
                    size: h.size,
                    offset: h.offset,
                })
            }
            // vfio-pci answers EINVAL for regions a device lacks (VGA).
            Err(e) => tracing::debug!(device = %spec.name, index, errno = %e, "no region"),
        }
    }
    Ok(Opened {
        device,
        regions: Arc::new(RegionTable::new(regions)),
    })
}

/// What `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` says of `dev` (the devices a
/// hot reset affects): asked with no room, then with room for the count
/// the device reported (bounded; the set may change meanwhile).
pub(crate) fn affected_devices(dev: &dyn DeviceFile) -> Result<VfioArg<vfio_pci_hot_reset_info>> {
    const INFO: &str = "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO";
    // Which devices the reset affects: ask with no room, then with room
    // for the count the device reported (bounded; the set may change).
    let header = std::mem::size_of::<vfio_pci_hot_reset_info>();
    let device = std::mem::size_of::<vfio_pci_dependent_device>();
    let mut size = header;
    let mut info = None;
    for _ in 0..4 {
        let mut b = VfioArg::new(&vfio_pci_hot_reset_info::default(), size);
        match dev.hot_reset_info(&mut b) {
            Ok(()) => {
                info = Some(b);
                break;
            }
            Err(Errno::ENOSPC) => {
                size = header + device * (b.header().count as usize).min(4096);
            }
            Err(e) => {
                return Err(Error::new(
                    e,
                    format!("{INFO} failed: the device cannot be hot reset ({e})"),
                ))
            }
        }
    }
    let info = info.ok_or_else(|| {
        Error::new(
            Errno::EAGAIN,
            format!("{INFO}: the set of affected devices kept changing; try again"),
        )
    })?;
    Ok(info)
}

/// The daemon's device nodes, one per engine device, sharing the way ioasid
/// fds are recognised.
pub struct DeviceNodes {
    engine: Arc<Engine>,
    opener: Arc<dyn DeviceOpener>,
    lookup: Arc<dyn ContextLookup>,
    identify: Option<Arc<IoasidIdentify>>,
    nodes: Mutex<BTreeMap<DeviceId, Arc<DeviceNode>>>,
    /// How `/dev/iommu` files are recognised (the cdevs' bind).
    iommufd: Arc<IoasidIdentify>,
    cdevs: Mutex<BTreeMap<DeviceId, Arc<CdevNode>>>,
}

impl std::fmt::Debug for DeviceNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceNodes")
            .field("nodes", &self.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DeviceNodes {
    /// Nodes for `engine`'s devices, opened through `vfio`. Ioasid fds are
    /// recognised once [`DeviceNodes::set_ioasid_device`] is called (until
    /// then every bind is `EINVAL`).
    pub fn new(engine: Arc<Engine>, vfio: Arc<VfioLegacy>) -> Self {
        let identify = Arc::new(IoasidIdentify::default());
        DeviceNodes {
            engine,
            opener: vfio,
            lookup: identify.clone(),
            identify: Some(identify),
            nodes: Mutex::new(BTreeMap::new()),
            iommufd: Arc::new(IoasidIdentify::named("/dev/iommu")),
            cdevs: Mutex::new(BTreeMap::new()),
        }
    }

    /// Nodes with explicit seams (tests).
    pub fn with_parts(
        engine: Arc<Engine>,
        opener: Arc<dyn DeviceOpener>,
        lookup: Arc<dyn ContextLookup>,
    ) -> Self {
        DeviceNodes {
            engine,
            opener,
            lookup,
            identify: None,
            nodes: Mutex::new(BTreeMap::new()),
            iommufd: Arc::new(IoasidIdentify::named("/dev/iommu")),
            cdevs: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<DeviceId, Arc<DeviceNode>>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tell the nodes the device number of the registered `/dev/ioasid`
    /// node. Once only; `Err(dev)` if already set or built by
    /// [`DeviceNodes::with_parts`].
    pub fn set_ioasid_device(&self, dev: DeviceNumber) -> std::result::Result<(), DeviceNumber> {
        match &self.identify {
            Some(i) => i.set_device(dev),
            None => Err(dev),
        }
    }

    /// The node of device `id`, created on first use. `EINVAL` if the
    /// engine has no such device.
    pub fn node(&self, id: DeviceId) -> Result<Arc<DeviceNode>> {
        let spec = self.engine.device(id).cloned().ok_or_else(|| {
            Error::new(Errno::EINVAL, format!("the engine has no device {}", id.0))
        })?;
        let mut nodes = self.lock();
        let node = nodes.entry(id).or_insert_with(|| {
            Arc::new(DeviceNode::with_parts(
                self.engine.clone(),
                spec,
                self.opener.clone(),
                self.lookup.clone(),
            ))
        });
        Ok(node.clone())
    }

    /// Tell the cdev nodes the device number of the registered `/dev/iommu`
    /// node. Once only; `Err(dev)` if already set.
    pub fn set_iommufd_device(&self, dev: DeviceNumber) -> std::result::Result<(), DeviceNumber> {
        self.iommufd.set_device(dev)
    }

    /// The `vfioN` cdev node of device `id` (the iommufd dialect of the
    /// same device as [`DeviceNodes::node`]), created on first use; `sriov`
    /// if the device is an SR-IOV function. `EINVAL` if the engine has no
    /// such device.
    pub fn cdev(&self, id: DeviceId, sriov: bool) -> Result<Arc<CdevNode>> {
        let spec = self.engine.device(id).cloned().ok_or_else(|| {
            Error::new(Errno::EINVAL, format!("the engine has no device {}", id.0))
        })?;
        let mut cdevs = self.cdevs.lock().unwrap_or_else(|e| e.into_inner());
        let node = cdevs.entry(id).or_insert_with(|| {
            Arc::new(CdevNode::new(
                self.engine.clone(),
                spec,
                self.opener.clone(),
                self.iommufd.clone(),
                sriov,
            ))
        });
        Ok(node.clone())
    }

    /// The close hook: the `/dev/ioasid` front end calls it after
    /// `Engine::close_context`; every node whose device the engine unbound
    /// closes its device fd (the kernel resets the device) and forgets the
    /// binding.
    pub fn on_context_closed(&self, closed: &ClosedContext) {
        let nodes: Vec<Arc<DeviceNode>> = {
            let map = self.lock();
            closed
                .unbound
                .iter()
                .filter_map(|id| map.get(id).cloned())
                .collect()
        };
        let cdevs: Vec<Arc<CdevNode>> = {
            let map = self.cdevs.lock().unwrap_or_else(|e| e.into_inner());
            closed
                .unbound
                .iter()
                .filter_map(|id| map.get(id).cloned())
                .collect()
        };
        // Outside the locks: dropping a binding closes its files.
        for node in &nodes {
            node.forget_stale();
        }
        for node in &cdevs {
            node.forget_stale();
        }
    }
}
