//! [`VfioLegacy`]: one type1v2 container per IOMMU group, and the engine's
//! [`Backend`] on top of them. A container a client was given (to map its
//! private memory by its own thread) is replaced by a fresh one before the
//! group's devices are opened again, so what the client kept reaches
//! nothing.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use ioasid_engine::backend::{
    Alias, Backend, ClientEntry, ClientThread, DmaEntry, DomainInfo, GroupId, Pid, ProcessMemory,
    Prot, Resolved,
};
use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE, VFIO_UNMAP_ALL,
};

use crate::alias::{memlock_limit, process_memory, ClientMemory};
use crate::client_map::{self, ClientAddr, ClientDmaMap, ClientFd};
use crate::device::VfioDevice;
use crate::discovery::Sysfs;
use crate::error::{Context, Error, Result};
use crate::iommu_info;
use crate::sys;

/// Where the system's files are. [`Paths::default`] is the real system.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The VFIO directory (`/dev/vfio`).
    pub dev_vfio: PathBuf,
    /// sysfs, for error messages about groups (`/sys`).
    pub sysfs: Sysfs,
    /// procfs, for aliasing client memory (`/proc`).
    pub proc_root: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            dev_vfio: PathBuf::from("/dev/vfio"),
            sysfs: Sysfs::default(),
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// One IOMMU group in its own type1v2 container.
#[derive(Debug)]
struct GroupDomain {
    // Field order is drop order: the group leaves the container before the
    // container closes.
    group: File,
    /// Replaced by a fresh one once a client was given a copy and the
    /// group's devices are all closed ([`VfioLegacy::open_device`]).
    container: RwLock<File>,
    /// A client holds a copy of the container (see [`client_map`]).
    exposed: AtomicBool,
}

impl GroupDomain {
    fn container(&self) -> RwLockReadGuard<'_, File> {
        self.container.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The legacy VFIO backend: every managed IOMMU group sits in a type1v2
/// container of its own for the object's whole life (an empty container
/// blocks the group's DMA), and client memory is aliased through
/// `/proc/<pid>/map_files`.
///
/// Dropping it unmaps every DMA mapping, closes groups and containers, and
/// unmaps every alias.
#[derive(Debug)]
pub struct VfioLegacy {
    // Field order is drop order: containers close (and unpin) before the
    // aliases they pinned are unmapped.
    domains: BTreeMap<GroupId, GroupDomain>,
    memory: ClientMemory,
    /// `/proc/self/mem`, opened at the first [`Backend::read`].
    own_memory: std::sync::OnceLock<File>,
    /// The VFIO directory, for fresh containers.
    dev_vfio: PathBuf,
    /// Where each client process holds each group's container, as last
    /// checked (`kcmp` checks it again before each use).
    client_fds: Mutex<HashMap<(Pid, GroupId), ClientFd>>,
}

impl VfioLegacy {
    /// Put each of `groups` into a type1v2 container of its own.
    pub fn new(groups: &[GroupId]) -> Result<Self> {
        Self::with_paths(groups, &Paths::default())
    }

    /// [`VfioLegacy::new`] with other system paths.
    pub fn with_paths(groups: &[GroupId], paths: &Paths) -> Result<Self> {
        let mut domains = BTreeMap::new();
        for &g in groups {
            if let std::collections::btree_map::Entry::Vacant(slot) = domains.entry(g) {
                slot.insert(open_domain(g, paths)?);
            }
        }
        tracing::info!(groups = ?domains.keys().collect::<Vec<_>>(), "VFIO groups in their containers");
        Ok(VfioLegacy {
            domains,
            memory: ClientMemory::with_proc_root(&paths.proc_root),
            own_memory: std::sync::OnceLock::new(),
            dev_vfio: paths.dev_vfio.clone(),
            client_fds: Mutex::new(HashMap::new()),
        })
    }

    /// The managed groups, ascending.
    pub fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.domains.keys().copied()
    }

    /// The open group file of `group` (`/dev/vfio/N`), e.g. for
    /// `VFIO_DEVICE_PCI_HOT_RESET`, which names the affected groups by fd.
    pub fn group_fd(&self, group: GroupId) -> Result<BorrowedFd<'_>> {
        Ok(self.domain(group)?.group.as_fd())
    }

    /// A copy of the container of `group` now, e.g. to bring into a
    /// client that maps its own memory ([`crate::client_map`]); the group
    /// counts as exposed from now on (see [`VfioLegacy::open_device`]).
    pub fn container_fd(&self, group: GroupId) -> Result<std::os::fd::OwnedFd> {
        let d = self.domain(group)?;
        d.exposed.store(true, Ordering::SeqCst);
        d.container()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io(&e, format!("dup of group {group}'s container")))
    }

    /// Whether a client was given `group`'s current container.
    pub fn is_exposed(&self, group: GroupId) -> Result<bool> {
        Ok(self.domain(group)?.exposed.load(Ordering::SeqCst))
    }

    /// Move `group` into a fresh container if a client holds a copy of
    /// the current one and no device fd of the group is open: the client's
    /// copy then reaches no device. Returns whether it moved.
    fn renew_if_exposed(&self, group: GroupId) -> Result<bool> {
        let d = self.domain(group)?;
        if !d.exposed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut container = d.container.write().unwrap_or_else(|e| e.into_inner());
        match sys::group_unset_container(d.group.as_fd()) {
            Ok(()) => {}
            // A device of the group is open: the same binding goes on.
            Err(Errno::EBUSY) => return Ok(false),
            Err(e) => {
                return Err(Error::new(
                    e,
                    format!("VFIO_GROUP_UNSET_CONTAINER for group {group}"),
                ))
            }
        }
        let fresh = open_container(&self.dev_vfio)?;
        sys::group_set_container(d.group.as_fd(), fresh.as_fd())
            .context(|| format!("VFIO_GROUP_SET_CONTAINER for group {group} (fresh container)"))?;
        sys::set_iommu(fresh.as_fd(), VFIO_TYPE1v2_IOMMU)
            .context(|| format!("VFIO_SET_IOMMU(TYPE1v2) for group {group} (fresh container)"))?;
        *container = fresh;
        d.exposed.store(false, Ordering::SeqCst);
        self.client_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, g), _| *g != group);
        tracing::info!(
            group,
            "IOMMU group {group} moved to a fresh container: the copy a client was given reaches \
             nothing any more"
        );
        Ok(true)
    }

    /// The aliases of client memory, for inspection.
    pub fn client_memory(&self) -> &ClientMemory {
        &self.memory
    }

    fn domain(&self, group: GroupId) -> Result<&GroupDomain> {
        self.domains.get(&group).ok_or_else(|| {
            Error::new(
                Errno::ENOENT,
                format!("IOMMU group {group} is not managed by this daemon"),
            )
        })
    }

    /// Open device `bdf` of `group` (`VFIO_GROUP_GET_DEVICE_FD`). Closing
    /// the returned fd resets the device. When no other device of the
    /// group is open and a client was given the group's container, the
    /// group first moves to a fresh container (containers per binding).
    pub fn open_device(&self, group: GroupId, bdf: &str) -> Result<VfioDevice> {
        self.renew_if_exposed(group)?;
        let d = self.domain(group)?;
        let name = CString::new(bdf)
            .map_err(|_| Error::new(Errno::EINVAL, format!("bad device name {bdf:?}")))?;
        let fd = sys::group_get_device_fd(d.group.as_fd(), &name).context(|| {
            format!("VFIO_GROUP_GET_DEVICE_FD {bdf} in group {group} (is it in this group, and not open elsewhere?)")
        })?;
        Ok(VfioDevice::new(fd))
    }

    /// `VFIO_IOMMU_GET_INFO` of `group`'s container, with its capabilities.
    pub fn iommu_info(&self, group: GroupId) -> Result<DomainInfo> {
        let d = self.domain(group)?;
        // Room for the usual capability chain (a few IOVA ranges, migration,
        // DMA avail: well under 1 KiB), so one call is enough. The kernel
        // raises argsz when the capabilities do not fit; the chain cannot
        // grow without a change of attached groups, but bound the retries
        // anyway.
        let mut buf = vec![0u8; iommu_info::BASE_SIZE.max(1024)];
        for _ in 0..4 {
            sys::iommu_get_info(d.container().as_fd(), &mut buf)
                .context(|| format!("VFIO_IOMMU_GET_INFO on group {group}'s container"))?;
            if !iommu_info::needs_bigger_buffer(&buf) {
                return iommu_info::parse(&buf);
            }
            let want = iommu_info::wanted_size(&buf).unwrap_or(buf.len());
            buf = vec![0u8; want];
        }
        Err(Error::new(
            Errno::EIO,
            format!("VFIO_IOMMU_GET_INFO on group {group}: the reply kept growing"),
        ))
    }

    /// `VFIO_IOMMU_MAP_DMA` in `group`'s container: the kernel pins
    /// `[vaddr, vaddr + size)` of this process and lets the group's devices
    /// read it (and write it, with `prot.write`).
    ///
    /// # Safety
    ///
    /// The range must be memory of this process that no Rust reference
    /// points into for as long as the container maps it (the devices change
    /// it behind Rust's back: a reference into DMA-mapped memory is
    /// undefined behaviour), such as an alias from [`ClientMemory`], kept
    /// until the range is unmapped.
    pub unsafe fn map_dma(
        &self,
        group: GroupId,
        iova: u64,
        vaddr: u64,
        size: u64,
        prot: Prot,
    ) -> Result<()> {
        let d = self.domain(group)?;
        let mut flags = 0;
        if prot.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if prot.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        let map = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr,
            iova,
            size,
        };
        // SAFETY: the range is memory no Rust reference points into, kept
        // while mapped: this function's own contract.
        unsafe { sys::iommu_map_dma(d.container().as_fd(), &map) }.context(|| {
            format!("VFIO_IOMMU_MAP_DMA iova {iova:#x} size {size:#x} vaddr {vaddr:#x} in group {group}")
        })
    }

    /// `VFIO_IOMMU_UNMAP_DMA` in `group`'s container; the bytes unmapped.
    pub fn unmap_dma(&self, group: GroupId, iova: u64, size: u64) -> Result<u64> {
        self.unmap_raw(group, iova, size, 0)
    }

    /// `VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_ALL`.
    pub fn unmap_all_dma(&self, group: GroupId) -> Result<u64> {
        self.unmap_raw(group, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL)
    }

    fn unmap_raw(&self, group: GroupId, iova: u64, size: u64, flags: u32) -> Result<u64> {
        let d = self.domain(group)?;
        let mut unmap = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags,
            iova,
            size,
            ..Default::default()
        };
        sys::iommu_unmap_dma(d.container().as_fd(), &mut unmap).context(|| {
            if flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
                format!("VFIO_IOMMU_UNMAP_DMA (all) in group {group}")
            } else {
                format!("VFIO_IOMMU_UNMAP_DMA iova {iova:#x} size {size:#x} in group {group}")
            }
        })?;
        Ok(unmap.size)
    }
}

impl Drop for VfioLegacy {
    fn drop(&mut self) {
        for &g in self.domains.keys() {
            if let Err(e) = self.unmap_all_dma(g) {
                tracing::warn!("on shutdown: {e}");
            }
        }
        // Then the fields drop: groups and containers close, aliases unmap.
    }
}

fn open_vfio_file(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

fn open_domain(g: GroupId, paths: &Paths) -> Result<GroupDomain> {
    let container = open_container(&paths.dev_vfio)?;
    let gpath = paths.dev_vfio.join(g.to_string());
    let group = open_vfio_file(&gpath).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::ENOENT) => format!(" (no device of IOMMU group {g} is bound to vfio-pci)"),
            Some(libc::EBUSY) => format!(
                " (IOMMU group {g} is held by another VFIO user, e.g. QEMU or another daemon)"
            ),
            _ => String::new(),
        };
        Error::io(&e, format!("cannot open {}{hint}", gpath.display()))
    })?;
    let status = sys::group_get_status(group.as_fd())
        .context(|| format!("VFIO_GROUP_GET_STATUS on group {g}"))?;
    if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(not_viable(g, &paths.sysfs));
    }
    if status.flags & VFIO_GROUP_FLAGS_CONTAINER_SET != 0 {
        return Err(Error::new(
            Errno::EBUSY,
            format!("IOMMU group {g} is already in a container"),
        ));
    }
    sys::group_set_container(group.as_fd(), container.as_fd())
        .context(|| format!("VFIO_GROUP_SET_CONTAINER for group {g}"))?;
    sys::set_iommu(container.as_fd(), VFIO_TYPE1v2_IOMMU)
        .context(|| format!("VFIO_SET_IOMMU(TYPE1v2) for group {g}"))?;
    Ok(GroupDomain {
        group,
        container: RwLock::new(container),
        exposed: AtomicBool::new(false),
    })
}

/// A new container (`/dev/vfio/vfio`), its API version and the extensions
/// the daemon needs checked.
fn open_container(dev_vfio: &Path) -> Result<File> {
    let cpath = dev_vfio.join("vfio");
    let container = open_vfio_file(&cpath).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (VFIO is not loaded: `modprobe vfio-pci` and bind the devices to vfio-pci)"
        } else {
            ""
        };
        Error::io(&e, format!("cannot open {}{hint}", cpath.display()))
    })?;
    let version = sys::get_api_version(container.as_fd())
        .context(|| format!("VFIO_GET_API_VERSION on {}", cpath.display()))?;
    if version != VFIO_API_VERSION as i32 {
        return Err(Error::new(
            Errno::EINVAL,
            format!("VFIO API version {version}, expected {VFIO_API_VERSION}"),
        ));
    }
    for (ext, name) in [
        (VFIO_TYPE1v2_IOMMU, "VFIO_TYPE1v2_IOMMU"),
        (VFIO_UNMAP_ALL, "VFIO_UNMAP_ALL"),
    ] {
        let ok = sys::check_extension(container.as_fd(), ext)
            .context(|| format!("VFIO_CHECK_EXTENSION({name})"))?;
        if !ok {
            return Err(Error::new(
                Errno::ENODEV,
                format!(
                    "the kernel's VFIO lacks {name} (load vfio_iommu_type1; Linux 5.13+ is \
                     needed for VFIO_UNMAP_ALL)"
                ),
            ));
        }
    }

    Ok(container)
}

/// The error for a group the kernel says is not viable, naming the devices
/// of the group bound to other drivers.
fn not_viable(g: GroupId, sysfs: &Sysfs) -> Error {
    let culprits = match sysfs.group_members(g) {
        Ok(members) => {
            let list: Vec<String> = members
                .iter()
                .filter_map(|(bdf, drv)| match drv.as_deref() {
                    Some(d) if d != "vfio-pci" => Some(format!("{bdf} (bound to {d})")),
                    _ => None,
                })
                .collect();
            if list.is_empty() {
                "none found in sysfs".to_string()
            } else {
                list.join(", ")
            }
        }
        Err(e) => format!("cannot list its devices: {e}"),
    };
    Error::new(
        Errno::EPERM,
        format!(
            "IOMMU group {g} is not viable: every device in it must be bound to vfio-pci \
             (or to no driver); bound elsewhere: {culprits}"
        ),
    )
}

impl Backend for VfioLegacy {
    fn alias(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Alias> {
        self.memory.alias(pid, vaddr, size)
    }

    fn release_alias(&self, alias: &Alias) {
        self.memory.release(alias)
    }

    fn alias_file(
        &self,
        file: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        write: bool,
    ) -> Result<Alias> {
        self.memory.alias_file(file, offset, size, write)
    }

    fn share_alias(&self, alias: &Alias, offset: u64, size: u64) -> Result<Alias> {
        self.memory.share(alias, offset, size)
    }

    fn trim(&self) {
        self.memory.trim()
    }

    fn memlock_limit(&self, pid: Pid) -> Result<Option<u64>> {
        memlock_limit(pid)
    }

    fn resolve(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Resolved> {
        self.memory.resolve(pid, vaddr, size)
    }

    fn process_memory(&self, pid: Pid) -> Result<ProcessMemory> {
        process_memory(pid)
    }

    /// The client's thread is a `syscall_inject::Stopped`: the container
    /// is brought into the client once (and checked with `kcmp` before
    /// each use), then the thread issues `VFIO_IOMMU_MAP_DMA` itself.
    fn map_as_client(
        &self,
        group: GroupId,
        thread: &mut dyn ClientThread,
        entry: ClientEntry,
    ) -> Result<()> {
        let tid = thread.tid();
        let stopped = thread
            .as_any()
            .downcast_mut::<syscall_inject::Stopped>()
            .ok_or_else(|| {
                Error::new(
                    Errno::EFAULT,
                    format!("thread {tid} is not stopped where it can map its own memory"),
                )
            })?;
        let d = self.domain(group)?;
        let container = d.container();
        d.exposed.store(true, Ordering::SeqCst);
        let key = (stopped.pid(), group);
        let known = self
            .client_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        let at = client_map::ensure_container(stopped, container.as_fd(), known)?;
        self.client_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, at);
        let map = ClientDmaMap {
            iova: entry.iova,
            vaddr: ClientAddr(entry.client_vaddr),
            size: entry.size,
            prot: entry.prot,
        };
        client_map::issue_map(stopped, at, &map)
            .map_err(|e| Error::new(e.errno, format!("group {group}: {}", e.message)))
    }

    fn domain_info(&self, group: GroupId) -> Result<DomainInfo> {
        self.iommu_info(group)
    }

    unsafe fn map(&self, group: GroupId, e: DmaEntry) -> Result<()> {
        self.domain(group)?; // an unknown group is ENOENT before anything else
        self.memory.check_access(e.daemon_vaddr, e.size, e.prot)?;
        // SAFETY: the range lies in a live alias the engine keeps while the
        // container may map it (`Backend::map`'s contract; checked just
        // above to lie in one alias that allows `e.prot`); aliases are
        // mappings of client files that no Rust reference points into.
        unsafe { self.map_dma(group, e.iova, e.daemon_vaddr, e.size, e.prot) }
    }

    fn unmap(&self, group: GroupId, iova: u64, size: u64) -> Result<u64> {
        self.unmap_dma(group, iova, size)
    }

    fn unmap_all(&self, group: GroupId) -> Result<()> {
        self.unmap_all_dma(group)?;
        Ok(())
    }

    fn read(&self, daemon_vaddr: u64, buf: &mut [u8]) -> Result<()> {
        let mem = match self.own_memory.get() {
            Some(f) => f,
            None => {
                let f = open_own_memory()?;
                self.own_memory.get_or_init(|| f)
            }
        };
        read_own_memory(mem, daemon_vaddr, buf)
    }
}

fn open_own_memory() -> Result<File> {
    File::open("/proc/self/mem").context(|| "opening /proc/self/mem".to_string())
}

/// Copy `buf.len()` bytes of the daemon's own memory at `addr` (inside an
/// alias of client memory) through `/proc/self/mem`.
///
/// The kernel does the copy, so no Rust reference or raw read ever touches
/// memory that the client or a device may be writing at the same time (a
/// data race in Rust's model), and an address that is not backed any more
/// (e.g. a shared file the client truncated) fails with an errno instead of
/// killing the daemon with `SIGBUS`. No `unsafe` is needed. Any failure is
/// reported as `EFAULT`. `mem` is `/proc/self/mem`, opened once.
pub(crate) fn read_own_memory(mem: &File, addr: u64, buf: &mut [u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    mem.read_exact_at(buf, addr).map_err(|e| {
        Error::new(
            Errno::EFAULT,
            format!(
                "reading {} bytes of client memory at daemon address {addr:#x}: {e}",
                buf.len()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_memory_and_refuses_unmapped_addresses() {
        let data: Vec<u8> = (0..=255u8).cycle().take(8192).collect();
        let mut buf = vec![0u8; 4096];
        let mem = super::open_own_memory().unwrap();
        super::read_own_memory(&mem, data.as_ptr() as u64 + 100, &mut buf).unwrap();
        assert_eq!(buf[..], data[100..4196]);
        let e = super::read_own_memory(&mem, 0, &mut buf).unwrap_err();
        assert_eq!(e.errno, nix::errno::Errno::EFAULT);
        assert!(e.message.contains("0x0"), "{}", e.message);
    }

    use super::*;

    fn no_vfio_paths(name: &str) -> Paths {
        let dir =
            std::env::temp_dir().join(format!("vfio-legacy-novfio-{name}-{}", std::process::id()));
        Paths {
            dev_vfio: dir,
            ..Paths::default()
        }
    }

    #[test]
    fn not_viable_names_the_devices_to_rebind() {
        let root = std::env::temp_dir().join(format!("vfio-legacy-viable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let devs = root.join("kernel/iommu_groups/9/devices");
        std::fs::create_dir_all(&devs).unwrap();
        for (bdf, drv) in [
            ("0000:01:01.0", Some("vfio-pci")),
            ("0000:01:02.0", Some("e1000e")),
            ("0000:01:03.0", None),
        ] {
            let dev = root.join("devices").join(bdf);
            std::fs::create_dir_all(&dev).unwrap();
            if let Some(d) = drv {
                let ddir = root.join("bus/pci/drivers").join(d);
                std::fs::create_dir_all(&ddir).unwrap();
                std::os::unix::fs::symlink(&ddir, dev.join("driver")).unwrap();
            }
            std::os::unix::fs::symlink(&dev, devs.join(bdf)).unwrap();
        }
        let e = not_viable(9, &Sysfs::new(&root));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(e.errno, Errno::EPERM);
        assert!(e.message.contains("group 9 is not viable"), "{}", e.message);
        assert!(
            e.message.contains("must be bound to vfio-pci"),
            "{}",
            e.message
        );
        assert!(
            e.message
                .ends_with("bound elsewhere: 0000:01:02.0 (bound to e1000e)"),
            "{}",
            e.message
        );
    }

    #[test]
    fn missing_vfio_says_to_load_vfio_pci() {
        let e = VfioLegacy::with_paths(&[3], &no_vfio_paths("missing")).unwrap_err();
        assert_eq!(e.errno, Errno::ENOENT);
        assert!(e.message.contains("modprobe vfio-pci"), "{}", e.message);
    }

    #[test]
    fn no_groups_needs_no_vfio_and_rejects_unknown_groups() {
        let v = VfioLegacy::with_paths(&[], &no_vfio_paths("none")).unwrap();
        assert_eq!(v.groups().count(), 0);
        let e = Backend::domain_info(&v, 4).unwrap_err();
        assert_eq!(e.errno, Errno::ENOENT);
        assert!(e.message.contains("group 4"), "{}", e.message);
        assert_eq!(
            // SAFETY: group 4 is not managed: the call fails before anything
            // reaches the kernel.
            unsafe {
                let entry = DmaEntry {
                    iova: 0,
                    daemon_vaddr: 0x1000,
                    size: 0x1000,
                    prot: Prot::default(),
                };
                Backend::map(&v, 4, entry)
            }
            .unwrap_err()
            .errno,
            Errno::ENOENT
        );
        assert_eq!(
            v.open_device(4, "0000:00:03.0").unwrap_err().errno,
            Errno::ENOENT
        );
    }

    #[test]
    fn memlock_limit_of_self_is_none_for_root_with_cap_ipc_lock() {
        let v = VfioLegacy::with_paths(&[], &no_vfio_paths("memlock")).unwrap();
        let has_cap = sys::has_cap_ipc_lock(std::process::id() as i32).unwrap();
        let got = Backend::memlock_limit(&v, std::process::id() as i32).unwrap();
        if has_cap {
            assert_eq!(got, None);
        } else {
            assert_eq!(
                got,
                sys::memlock_soft_limit(std::process::id() as i32).unwrap()
            );
        }
        assert_eq!(
            Backend::memlock_limit(&v, i32::MAX).unwrap_err().errno,
            Errno::ESRCH
        );
    }
}
