//! A VFIO device fd and the typed wrappers of its ioctls.
//!
//! - [`VfioArg`]: a VFIO argument, a `vfio-bindings` struct followed by
//!   what its `argsz` covers (an array, a capability chain), owned as one
//!   buffer whose `argsz` never exceeds it.
//! - [`DeviceFile`]: what a device node forwards to; [`VfioDevice`] is the
//!   real one (the front ends' tests have fakes).

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use ioasid_uapi::plain::{read_prefix, write_prefix};
use ioasid_uapi::vfio as nr;
use ioasid_uapi::ArgStruct;
use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, vfio_pci_dependent_device, vfio_pci_hot_reset,
    vfio_pci_hot_reset_info, vfio_region_info, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
};

use crate::error::{Error, Result};
use crate::sys;

/// Where every VFIO argument struct keeps its `argsz`: its first `u32`.
const ARGSZ: std::ops::Range<usize> = 0..4;

/// A VFIO ioctl argument: the struct `T` followed by the rest of what its
/// `argsz` (its first `u32`) covers. The buffer is never shorter than `T`,
/// and `argsz` is set to the buffer's length whenever the argument is
/// handed to the kernel, so the kernel never reads or writes past it.
pub struct VfioArg<T> {
    bytes: Vec<u8>,
    _struct: PhantomData<T>,
}

impl<T> std::fmt::Debug for VfioArg<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioArg")
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl<T: ArgStruct> VfioArg<T> {
    /// `header` followed by zeros up to `len` bytes (at least `T`'s size),
    /// with `argsz` set to the length.
    pub fn new(header: &T, len: usize) -> Self {
        let mut arg = VfioArg {
            bytes: vec![0u8; len.max(std::mem::size_of::<T>())],
            _struct: PhantomData,
        };
        arg.set_header(header);
        arg.sync_argsz();
        arg
    }

    /// A caller's argument as it gave it (`argsz` included). `EINVAL` if
    /// the bytes do not hold a whole `T`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() < std::mem::size_of::<T>() {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "{} bytes do not hold a struct {} ({} bytes)",
                    bytes.len(),
                    T::C_NAME,
                    std::mem::size_of::<T>()
                ),
            ));
        }
        Ok(VfioArg {
            bytes,
            _struct: PhantomData,
        })
    }

    /// The struct.
    pub fn header(&self) -> T {
        read_prefix(&self.bytes).expect("the buffer holds a T")
    }

    /// Replace the struct (the bytes after it are kept).
    pub fn set_header(&mut self, header: &T) {
        write_prefix(&mut self.bytes, header).expect("the buffer holds a T");
    }

    /// The bytes after the struct.
    pub fn tail(&self) -> &[u8] {
        &self.bytes[std::mem::size_of::<T>()..]
    }

    /// The bytes after the struct, to fill.
    pub fn tail_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[std::mem::size_of::<T>()..]
    }

    /// The `U` at byte `at` of the argument (a capability, an array
    /// entry), if it lies inside.
    pub fn read_at<U: ArgStruct>(&self, at: usize) -> Option<U> {
        read_prefix(self.bytes.get(at..)?)
    }

    /// Write `value` at byte `at`, if it fits inside.
    pub fn write_at<U: ArgStruct>(&mut self, at: usize, value: &U) -> Option<()> {
        write_prefix(self.bytes.get_mut(at..)?, value)
    }

    /// All the bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// All the bytes, to fill.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// The length of the buffer.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the buffer is empty (never: it holds a `T`).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The `argsz` field.
    pub fn argsz(&self) -> usize {
        let b = &self.bytes[ARGSZ];
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// Set `argsz` to the buffer's length.
    fn sync_argsz(&mut self) {
        let len = u32::try_from(self.bytes.len()).unwrap_or(u32::MAX);
        self.bytes[ARGSZ].copy_from_slice(&len.to_ne_bytes());
    }

    /// The buffer for an ioctl whose kernel side stays within `argsz`.
    fn for_kernel(&mut self) -> &mut [u8] {
        self.sync_argsz();
        &mut self.bytes
    }
}

impl VfioArg<vfio_irq_set> {
    /// The eventfd numbers of a `VFIO_DEVICE_SET_IRQS` whose data are
    /// eventfds (`None` for other data): `count` `s32`s after the header,
    /// -1 for none. `EINVAL` if there are more than [`MAX_IRQ_FDS`] or they
    /// do not fit in the argument (VFIO's own rule), before anything is
    /// copied.
    pub fn eventfds(&self) -> Result<Option<Vec<i32>>> {
        let h = self.header();
        if h.flags & VFIO_IRQ_SET_DATA_TYPE_MASK != VFIO_IRQ_SET_DATA_EVENTFD {
            return Ok(None);
        }
        if h.count > MAX_IRQ_FDS {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "VFIO_DEVICE_SET_IRQS: count {} is more than {MAX_IRQ_FDS} eventfds",
                    h.count
                ),
            ));
        }
        let need = h.count as usize * 4;
        if need > self.tail().len() {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "VFIO_DEVICE_SET_IRQS: {} eventfds need argsz {}, argsz is {}",
                    h.count,
                    std::mem::size_of::<vfio_irq_set>() + need,
                    self.len()
                ),
            ));
        }
        Ok(Some(
            self.tail()[..need]
                .chunks_exact(4)
                .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }

    /// Write `fds` over the eventfd array (after [`VfioArg::eventfds`]
    /// accepted it, so it fits; extra numbers are dropped).
    pub fn put_eventfds(&mut self, fds: &[i32]) {
        for (slot, fd) in self.tail_mut().chunks_exact_mut(4).zip(fds) {
            slot.copy_from_slice(&fd.to_ne_bytes());
        }
    }
}

/// The most eventfds one `VFIO_DEVICE_SET_IRQS` may carry (the PCI MSI-X
/// limit); more is `EINVAL` before any fd is copied.
pub const MAX_IRQ_FDS: u32 = 2048;

impl VfioArg<vfio_pci_hot_reset_info> {
    /// The IOMMU groups of the devices a `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`
    /// answer lists, without repeats, in order of appearance. `EINVAL` if
    /// the devices do not fit in the argument.
    pub fn groups(&self) -> Result<Vec<u32>> {
        let count = self.header().count as usize;
        let size = std::mem::size_of::<vfio_pci_dependent_device>();
        if count
            .checked_mul(size)
            .is_none_or(|n| n > self.tail().len())
        {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO listed {count} devices in {} bytes",
                    self.len()
                ),
            ));
        }
        let mut groups = Vec::new();
        for d in self.dependents()? {
            if !groups.contains(&d.id) {
                groups.push(d.id);
            }
        }
        Ok(groups)
    }

    /// The devices a `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` answer lists, in
    /// order. `EINVAL` if they do not fit in the argument.
    pub fn dependents(&self) -> Result<Vec<Dependent>> {
        let count = self.header().count as usize;
        let size = std::mem::size_of::<vfio_pci_dependent_device>();
        let first = std::mem::size_of::<vfio_pci_hot_reset_info>();
        (0..count)
            .map(|i| {
                let d: vfio_pci_dependent_device =
                    self.read_at(first + i * size).ok_or_else(|| {
                        Error::new(
                            Errno::EINVAL,
                            format!("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: device {i} is past argsz"),
                        )
                    })?;
                // SAFETY: both members of the union are `__u32`s: every bit
                // pattern is a valid `group_id`.
                let id = unsafe { d.__bindgen_anon_1.group_id };
                Ok(Dependent {
                    id,
                    segment: d.segment,
                    bus: d.bus,
                    devfn: d.devfn,
                })
            })
            .collect()
    }

    /// Write `devices` as the answer's device list, `count` with them (the
    /// device-id form of a cdev keeps the layout; only the id changes
    /// meaning). `None` if they do not fit.
    pub fn set_dependents(&mut self, devices: &[Dependent]) -> Option<()> {
        let size = std::mem::size_of::<vfio_pci_dependent_device>();
        let first = std::mem::size_of::<vfio_pci_hot_reset_info>();
        for (i, d) in devices.iter().enumerate() {
            let entry = vfio_pci_dependent_device {
                __bindgen_anon_1:
                    vfio_bindings::bindings::vfio::vfio_pci_dependent_device__bindgen_ty_1 {
                        devid: d.id,
                    },
                segment: d.segment,
                bus: d.bus,
                devfn: d.devfn,
            };
            self.write_at(first + i * size, &entry)?;
        }
        let mut h = self.header();
        h.count = devices.len() as u32;
        self.set_header(&h);
        Some(())
    }
}

/// One device a hot reset affects: its IOMMU group (legacy form) or its
/// iommufd device id (the cdev's `VFIO_PCI_HOT_RESET_FLAG_DEV_ID` form),
/// and its PCI address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dependent {
    /// The group id or device id.
    pub id: u32,
    /// PCI segment (domain).
    pub segment: u16,
    /// PCI bus.
    pub bus: u8,
    /// PCI device and function.
    pub devfn: u8,
}

impl Dependent {
    /// The device's PCI address, `DDDD:BB:DD.F`.
    pub fn bdf(&self) -> String {
        format!(
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment,
            self.bus,
            self.devfn >> 3,
            self.devfn & 7
        )
    }
}

/// An open VFIO device: what a bound device node forwards to. Dropping it
/// closes the device (the kernel resets it).
pub trait DeviceFile: Send + Sync + std::fmt::Debug {
    /// `VFIO_DEVICE_GET_INFO` with the caller's `argsz`.
    fn info(&self, arg: &mut VfioArg<vfio_device_info>) -> std::result::Result<(), Errno>;
    /// `VFIO_DEVICE_GET_REGION_INFO` (capabilities within `argsz`).
    fn region_info(&self, arg: &mut VfioArg<vfio_region_info>) -> std::result::Result<(), Errno>;
    /// `VFIO_DEVICE_GET_IRQ_INFO`.
    fn irq_info(&self, arg: &mut VfioArg<vfio_irq_info>) -> std::result::Result<(), Errno>;
    /// `VFIO_DEVICE_SET_IRQS`; eventfd numbers are the daemon's.
    fn set_irqs(&self, arg: &mut VfioArg<vfio_irq_set>) -> std::result::Result<(), Errno>;
    /// `VFIO_DEVICE_RESET`.
    fn reset(&self) -> std::result::Result<(), Errno>;
    /// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` (`ENOSPC` with `count` raised
    /// when the devices do not fit).
    fn hot_reset_info(
        &self,
        arg: &mut VfioArg<vfio_pci_hot_reset_info>,
    ) -> std::result::Result<(), Errno>;
    /// `VFIO_DEVICE_PCI_HOT_RESET` naming the group files `groups`.
    fn hot_reset(&self, groups: &[BorrowedFd<'_>]) -> std::result::Result<(), Errno>;
    /// `pread` at `pos`.
    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::result::Result<usize, Errno>;
    /// `pwrite` at `pos`.
    fn write_at(&self, data: &[u8], pos: u64) -> std::result::Result<usize, Errno>;
}

/// A real VFIO device fd (from `VFIO_GROUP_GET_DEVICE_FD`).
#[derive(Debug)]
pub struct VfioDevice {
    file: File,
}

impl VfioDevice {
    /// The device whose fd VFIO just returned.
    pub(crate) fn new(fd: OwnedFd) -> Self {
        VfioDevice {
            file: File::from(fd),
        }
    }

    /// The device file, for `pread`/`pwrite` at region offsets.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// `VFIO_DEVICE_GET_INFO` (the base struct; capabilities not read).
    pub fn info_base(&self) -> Result<vfio_device_info> {
        sys::device_get_info(self.file.as_fd())
            .map_err(|e| Error::new(e, "VFIO_DEVICE_GET_INFO failed"))
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` of region `index` (the base struct;
    /// capabilities not read). `offset` is where the region starts for
    /// `pread`/`pwrite` on the device file.
    pub fn region(&self, index: u32) -> Result<vfio_region_info> {
        sys::device_get_region_info(self.file.as_fd(), index).map_err(|e| {
            Error::new(
                e,
                format!("VFIO_DEVICE_GET_REGION_INFO region {index} failed"),
            )
        })
    }

    fn ioctl<T: ArgStruct>(
        &self,
        request: u32,
        arg: &mut VfioArg<T>,
    ) -> std::result::Result<(), Errno> {
        // SAFETY: `request` is one of the device commands below, each of
        // which reads and writes its argument within the `argsz` it finds
        // there, and `for_kernel` sets `argsz` to the buffer's length.
        unsafe { sys::device_ioctl(self.file.as_fd(), request, arg.for_kernel()) }.map(|_| ())
    }
}

impl DeviceFile for VfioDevice {
    fn info(&self, arg: &mut VfioArg<vfio_device_info>) -> std::result::Result<(), Errno> {
        self.ioctl(nr::VFIO_DEVICE_GET_INFO, arg)
    }

    fn region_info(&self, arg: &mut VfioArg<vfio_region_info>) -> std::result::Result<(), Errno> {
        self.ioctl(nr::VFIO_DEVICE_GET_REGION_INFO, arg)
    }

    fn irq_info(&self, arg: &mut VfioArg<vfio_irq_info>) -> std::result::Result<(), Errno> {
        self.ioctl(nr::VFIO_DEVICE_GET_IRQ_INFO, arg)
    }

    fn set_irqs(&self, arg: &mut VfioArg<vfio_irq_set>) -> std::result::Result<(), Errno> {
        self.ioctl(nr::VFIO_DEVICE_SET_IRQS, arg)
    }

    fn reset(&self) -> std::result::Result<(), Errno> {
        sys::device_reset(self.file.as_fd())
    }

    fn hot_reset_info(
        &self,
        arg: &mut VfioArg<vfio_pci_hot_reset_info>,
    ) -> std::result::Result<(), Errno> {
        self.ioctl(nr::VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, arg)
    }

    fn hot_reset(&self, groups: &[BorrowedFd<'_>]) -> std::result::Result<(), Errno> {
        let header = vfio_pci_hot_reset {
            count: u32::try_from(groups.len()).map_err(|_| Errno::EINVAL)?,
            ..Default::default()
        };
        let mut arg = VfioArg::new(
            &header,
            std::mem::size_of::<vfio_pci_hot_reset>() + 4 * groups.len(),
        );
        for (slot, g) in arg.tail_mut().chunks_exact_mut(4).zip(groups) {
            slot.copy_from_slice(&g.as_raw_fd().to_ne_bytes());
        }
        self.ioctl(nr::VFIO_DEVICE_PCI_HOT_RESET, &mut arg)
    }

    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::result::Result<usize, Errno> {
        self.file
            .read_at(buf, pos)
            .map_err(|e| Error::io(&e, "").errno)
    }

    fn write_at(&self, data: &[u8], pos: u64) -> std::result::Result<usize, Errno> {
        self.file
            .write_at(data, pos)
            .map_err(|e| Error::io(&e, "").errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio::{
        vfio_pci_dependent_device__bindgen_ty_1, VFIO_IRQ_SET_ACTION_TRIGGER,
        VFIO_IRQ_SET_DATA_BOOL,
    };

    fn irq_set(flags: u32, count: u32, argsz: usize, data: &[i32]) -> VfioArg<vfio_irq_set> {
        let h = vfio_irq_set {
            argsz: argsz as u32,
            flags,
            index: 2,
            start: 0,
            count,
            ..Default::default()
        };
        let mut a = VfioArg::new(&h, std::mem::size_of::<vfio_irq_set>() + 4 * data.len());
        a.put_eventfds(data);
        a
    }

    #[test]
    fn irq_set_header_and_fds() {
        let ev = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let b = irq_set(ev, 3, 32, &[5, -1, 9]);
        let h = b.header();
        assert_eq!((b.argsz(), h.index, h.start, h.count), (32, 2, 0, 3));
        assert_eq!(b.eventfds().unwrap(), Some(vec![5, -1, 9]));
        let mut b2 = VfioArg::<vfio_irq_set>::from_bytes(b.as_bytes().to_vec()).unwrap();
        b2.put_eventfds(&[50, -1, 90]);
        assert_eq!(b2.eventfds().unwrap(), Some(vec![50, -1, 90]));
        let header = std::mem::size_of::<vfio_irq_set>();
        assert_eq!(
            &b2.as_bytes()[..header],
            &b.as_bytes()[..header],
            "header untouched"
        );
        // BOOL data is not fds.
        let b = irq_set(
            VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
            1,
            21,
            &[],
        );
        assert_eq!(b.eventfds().unwrap(), None);
    }

    #[test]
    fn irq_set_bad_counts() {
        let ev = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        // count larger than the argument holds.
        let b = irq_set(ev, 4, 32, &[1, 2, 3]);
        assert_eq!(b.eventfds().unwrap_err().errno, Errno::EINVAL);
        // huge count: refused before any arithmetic can overflow.
        let b = irq_set(ev, u32::MAX, 32, &[1, 2, 3]);
        let e = b.eventfds().unwrap_err();
        assert!(e.message.contains("more than 2048"), "{}", e.message);
        // count 0 is fine (no fds).
        let b = irq_set(ev, 0, 20, &[]);
        assert_eq!(b.eventfds().unwrap(), Some(Vec::new()));
    }

    #[test]
    fn hot_reset_info_groups() {
        let mut info = VfioArg::new(
            &vfio_pci_hot_reset_info {
                count: 3,
                ..Default::default()
            },
            12 + 24,
        );
        for (i, (g, bus, devfn)) in [(7u32, 1u8, 8u8), (7, 1, 16), (9, 2, 0)]
            .into_iter()
            .enumerate()
        {
            let d = vfio_pci_dependent_device {
                __bindgen_anon_1: vfio_pci_dependent_device__bindgen_ty_1 { group_id: g },
                segment: 0,
                bus,
                devfn,
            };
            info.write_at(12 + 8 * i, &d).unwrap();
        }
        assert_eq!(info.groups().unwrap(), vec![7, 9]);
        // count larger than the bytes, or absurd: EINVAL, no panic.
        for count in [4, u32::MAX] {
            let mut h = info.header();
            h.count = count;
            info.set_header(&h);
            assert_eq!(info.groups().unwrap_err().errno, Errno::EINVAL);
        }
    }

    #[test]
    fn an_argument_always_holds_its_struct_and_argsz_follows_its_length() {
        let a = VfioArg::new(&vfio_irq_info::default(), 4);
        assert_eq!(a.len(), std::mem::size_of::<vfio_irq_info>());
        assert_eq!(a.argsz(), a.len());
        assert!(VfioArg::<vfio_irq_info>::from_bytes(vec![0; 15]).is_err());
        let mut a = VfioArg::<vfio_irq_info>::from_bytes(vec![0xff; 24]).unwrap();
        assert_eq!(a.for_kernel()[..4], 24u32.to_ne_bytes());
    }

    /// Every wrapper fails with the kernel's errno on a file that is not a
    /// VFIO device, instead of misbehaving.
    #[test]
    fn wrappers_on_a_non_vfio_file_fail_with_the_kernels_errno() {
        let dev = VfioDevice::new(std::fs::File::open("/dev/null").unwrap().into());
        let mut info = VfioArg::new(&vfio_device_info::default(), 64);
        assert_eq!(dev.info(&mut info), Err(Errno::ENOTTY));
        assert_eq!(dev.reset(), Err(Errno::ENOTTY));
        assert_eq!(dev.hot_reset(&[]), Err(Errno::ENOTTY));
        assert_eq!(dev.region(0).unwrap_err().errno, Errno::ENOTTY);
    }
}
