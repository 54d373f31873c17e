//! Fakes of the seams to the system, for the crate's own tests and for
//! other crates' host tests and fuzz targets (feature `testing`): a VFIO
//! device file that answers from a fixed table ([`FakeDevice`]), its opener
//! ([`FakeOpener`]) and a lookup of ioasid files by inode ([`FakeLookup`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ioasid_engine::{ContextId, DeviceId, DeviceSpec};
use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_info_cap_header, vfio_irq_info, vfio_irq_set, vfio_pci_dependent_device,
    vfio_pci_dependent_device__bindgen_ty_1, vfio_pci_hot_reset_info, vfio_region_info,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_legacy::{DeviceFile, VfioArg};

use crate::device_file::{ContextLookup, DeviceOpener};
use crate::error::{Error, Result};

/// Region flag: readable.
pub const R: u32 = VFIO_REGION_INFO_FLAG_READ;
/// Region flag: writable.
pub const W: u32 = VFIO_REGION_INFO_FLAG_WRITE;
/// Offset of the fake's BAR 0 (4 KiB, read-write, mmap-able).
pub const BAR0: u64 = 0;
/// Offset of the fake's ROM region (2 KiB, read-only).
pub const ROM: u64 = 6 << 40;
/// Offset of the fake's config space (256 bytes, read-write).
pub const CONFIG: u64 = 7 << 40;

// ---- a fake VFIO device ------------------------------------------------

/// An fd number a SET_IRQS passed and the inode it named.
pub type IrqFd = (i32, Option<u64>);

/// What the fake devices of one device id saw.
#[derive(Debug, Default)]
pub struct DeviceLog {
    /// Device files opened.
    pub opens: AtomicUsize,
    /// Device files closed (dropped).
    pub closes: AtomicUsize,
    /// `VFIO_DEVICE_RESET`s.
    pub resets: AtomicUsize,
    /// For each SET_IRQS: (fd number as passed, inode of the file or None).
    pub irq_fds: Mutex<Vec<Vec<IrqFd>>>,
    /// Region bytes by absolute offset.
    pub mem: Mutex<HashMap<u64, u8>>,
    /// For each PCI_HOT_RESET: the inodes of the group fds passed.
    pub hot_resets: Mutex<Vec<Vec<Option<u64>>>>,
}

/// An open device file: 9 regions ([`fake_region`]), 5 IRQs, resets
/// counted; group 7's devices can be hot reset together.
#[derive(Debug)]
pub struct FakeDevice {
    /// Where it records what it saw.
    pub log: Arc<DeviceLog>,
    /// Its IOMMU group.
    pub group: u32,
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        self.log.closes.fetch_add(1, Ordering::SeqCst);
    }
}

/// (index, flags, size, offset) of the fake's regions; 9 regions, VGA (8)
/// missing (EINVAL), BARs 1..5 empty.
pub fn fake_region(index: u32) -> Option<(u32, u64, u64)> {
    match index {
        0 => Some((R | W | VFIO_REGION_INFO_FLAG_MMAP, 0x1000, BAR0)),
        1..=5 => Some((0, 0, u64::from(index) << 40)),
        6 => Some((R, 0x800, ROM)),
        7 => Some((R | W, 0x100, CONFIG)),
        _ => None,
    }
}

/// Put the native-endian `v` at byte `at` of `b`.
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
/// The native-endian `u32` at byte `at` of `b`.
pub fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

/// The inode of the file `fd` names.
pub fn inode(fd: BorrowedFd<'_>) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|s| s.st_ino)
}

impl DeviceFile for FakeDevice {
    fn info(&self, arg: &mut VfioArg<vfio_device_info>) -> std::result::Result<(), Errno> {
        let mut h = arg.header();
        h.flags = 3; // RESET | PCI
        h.num_regions = 9;
        h.num_irqs = 5;
        arg.set_header(&h);
        Ok(())
    }

    fn region_info(&self, arg: &mut VfioArg<vfio_region_info>) -> std::result::Result<(), Errno> {
        let mut h = arg.header();
        let (flags, size, offset) = fake_region(h.index).ok_or(Errno::EINVAL)?;
        h.size = size;
        h.offset = offset;
        h.flags = flags;
        h.cap_offset = 0;
        if h.index == 0 {
            // sparse mmap (header, nr_areas 1, reserved, one area: 16 + 16
            // bytes) then a region type capability (header, type, subtype),
            // as the kernel lays them out.
            let region = std::mem::size_of::<vfio_region_info>();
            let sparse = vfio_info_cap_header {
                id: VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16,
                version: 1,
                next: (region + 32) as u32,
            };
            let kind = vfio_info_cap_header {
                id: VFIO_REGION_INFO_CAP_TYPE as u16,
                version: 1,
                next: 0,
            };
            h.flags |= VFIO_REGION_INFO_FLAG_CAPS;
            if arg.len() < region + 48 {
                h.argsz = (region + 48) as u32;
                arg.set_header(&h);
            } else {
                h.cap_offset = region as u32;
                arg.set_header(&h);
                arg.write_at(region, &sparse).unwrap();
                let tail = arg.tail_mut();
                put32(tail, 8, 1); // nr_areas
                tail[24..32].copy_from_slice(&0x1000u64.to_ne_bytes()); // area size
                arg.write_at(region + 32, &kind).unwrap();
                put32(arg.tail_mut(), 40, 0x8086);
                put32(arg.tail_mut(), 44, 7);
            }
            return Ok(());
        }
        arg.set_header(&h);
        Ok(())
    }

    fn irq_info(&self, arg: &mut VfioArg<vfio_irq_info>) -> std::result::Result<(), Errno> {
        let mut h = arg.header();
        h.count = if h.index == 2 { 8 } else { 1 };
        arg.set_header(&h);
        Ok(())
    }

    fn set_irqs(&self, arg: &mut VfioArg<vfio_irq_set>) -> std::result::Result<(), Errno> {
        let fds = arg
            .eventfds()
            .unwrap()
            .unwrap_or_default()
            .into_iter()
            .map(|fd| {
                let ino = (fd >= 0)
                    // SAFETY: only inspected during the call, while the
                    // node holds the copy open.
                    .then(|| inode(unsafe { BorrowedFd::borrow_raw(fd) }))
                    .flatten();
                (fd, ino)
            })
            .collect();
        self.log.irq_fds.lock().unwrap().push(fds);
        Ok(())
    }

    fn reset(&self) -> std::result::Result<(), Errno> {
        self.log.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn hot_reset_info(
        &self,
        arg: &mut VfioArg<vfio_pci_hot_reset_info>,
    ) -> std::result::Result<(), Errno> {
        // Group 7's two devices sit behind a bridge and can be reset
        // together; the others cannot be hot reset.
        if self.group != 7 {
            return Err(Errno::ENODEV);
        }
        let mut h = arg.header();
        h.count = 2;
        arg.set_header(&h);
        if arg.len() < 12 + 16 {
            return Err(Errno::ENOSPC);
        }
        for (i, devfn) in [8u8, 16].into_iter().enumerate() {
            let d = vfio_pci_dependent_device {
                __bindgen_anon_1: vfio_pci_dependent_device__bindgen_ty_1 { group_id: 7 },
                segment: 0,
                bus: 1,
                devfn,
            };
            arg.write_at(12 + 8 * i, &d).unwrap();
        }
        Ok(())
    }

    fn hot_reset(&self, groups: &[BorrowedFd<'_>]) -> std::result::Result<(), Errno> {
        let inodes = groups.iter().map(|g| inode(*g)).collect();
        self.log.hot_resets.lock().unwrap().push(inodes);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::result::Result<usize, Errno> {
        let mem = self.log.mem.lock().unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = *mem.get(&(pos + i as u64)).unwrap_or(&0xff);
        }
        Ok(buf.len())
    }

    fn write_at(&self, data: &[u8], pos: u64) -> std::result::Result<usize, Errno> {
        let mut mem = self.log.mem.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            mem.insert(pos + i as u64, *b);
        }
        Ok(data.len())
    }
}

/// Opens [`FakeDevice`]s; lends memfds as the files of groups 3 and 7.
pub struct FakeOpener {
    /// The log of each device id.
    pub logs: Mutex<HashMap<DeviceId, Arc<DeviceLog>>>,
    /// Fail every open with this errno.
    pub fail: Mutex<Option<Errno>>,
    /// The "group files": memfds, by group.
    pub groups: HashMap<u32, OwnedFd>,
}

impl Default for FakeOpener {
    fn default() -> Self {
        let memfd =
            || nix::sys::memfd::memfd_create(c"group", nix::sys::memfd::MFdFlags::empty()).unwrap();
        FakeOpener {
            logs: Mutex::default(),
            fail: Mutex::default(),
            groups: [(3, memfd()), (7, memfd())].into_iter().collect(),
        }
    }
}

impl FakeOpener {
    /// The log of device `id`.
    pub fn log(&self, id: DeviceId) -> Arc<DeviceLog> {
        self.logs.lock().unwrap().entry(id).or_default().clone()
    }
}

impl DeviceOpener for FakeOpener {
    fn open_device(&self, spec: &DeviceSpec) -> Result<Box<dyn DeviceFile>> {
        if let Some(e) = *self.fail.lock().unwrap() {
            return Err(Error::new(e, "VFIO_GROUP_GET_DEVICE_FD failed (fake)"));
        }
        let log = self.log(spec.id);
        log.opens.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FakeDevice {
            log,
            group: spec.group,
        }))
    }

    fn group_fds(&self, groups: &[u32]) -> Result<Vec<BorrowedFd<'_>>> {
        groups
            .iter()
            .map(|g| {
                self.groups
                    .get(g)
                    .map(|f| f.as_fd())
                    .ok_or_else(|| Error::new(Errno::ENOENT, format!("group {g} (fake)")))
            })
            .collect()
    }
}

/// Ioasid (and iommufd) files are memfds registered by inode.
#[derive(Default)]
pub struct FakeLookup {
    /// The context of each registered inode.
    pub contexts: Mutex<HashMap<u64, ContextId>>,
}

impl ContextLookup for FakeLookup {
    fn context_of(&self, file: BorrowedFd<'_>) -> Result<ContextId> {
        inode(file)
            .and_then(|i| self.contexts.lock().unwrap().get(&i).copied())
            .ok_or_else(|| Error::new(Errno::EINVAL, "not an ioasid file (fake)"))
    }
}
