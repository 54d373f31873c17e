//! The ioctl table of a device node: the RFC's bind and attach commands,
//! and the device's own VFIO commands, forwarded to the real device.
//!
//! A row that `requires` [`NEEDS_BIND`] answers `EINVAL` until the open
//! file has bound the device (`VFIO_BIND_IOASID_FD`), before its argument
//! is read, as the kernel's device cdev does before
//! `VFIO_DEVICE_BIND_IOMMUFD`.

use std::os::fd::AsRawFd;

use ioasid_uapi::error::{Errno, Error, Result};
use ioasid_uapi::vfio::*;
use ioasid_uapi::{
    VfioAttachIoasid, IOASID_ATTACH_USER_PASID, VFIO_ATTACH_IOASID, VFIO_BIND_IOASID_FD,
    VFIO_DETACH_IOASID, VFIO_UNBIND_IOASID_FD,
};
use ioctl_table::{ioctl_op, Table, Ucmd};
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, vfio_pci_hot_reset, vfio_pci_hot_reset_info,
    vfio_region_info, VFIO_REGION_INFO_FLAG_CAPS,
};
use vfio_legacy::region_info::{self, REGION_INFO_SIZE};
use vfio_legacy::{DeviceFile, VfioArg};

use ioasid_engine::ContextId;

use crate::node::{DeviceNode, Opened};

/// The refusal of ioctl `cmd`, which the table of a node (`on`: "a device
/// node", "a VFIO device cdev") does not serve: always `ENOTTY`, with a
/// message that names a VFIO command. `VFIO_DEVICE_FEATURE` is what QEMU
/// probes for migration at every device start; `ENOTTY` is the kernel's
/// answer for a feature the device lacks, so QEMU goes on without
/// migration.
pub(crate) fn not_served(cmd: u32, on: &str) -> Error {
    if cmd == VFIO_DEVICE_FEATURE {
        return Error::new(
            Errno::ENOTTY,
            format!(
                "VFIO_DEVICE_FEATURE is not served on {on}: no migration, DMA logging or \
                 low-power state through the daemon (ENOTTY, as the kernel answers for a \
                 feature the device lacks)"
            ),
        );
    }
    match ALL.iter().find(|(_, n)| *n == cmd) {
        Some((name, _)) => Error::new(Errno::ENOTTY, format!("{name} is not served on {on}")),
        None => Error::new(
            Errno::ENOTTY,
            format!("ioctl {cmd:#x} is not a command of {on}"),
        ),
    }
}

/// A node whose bound open file reaches a device: `devN` (the RFC's
/// dialect) and `vfioN` (iommufd's) share the handlers of the device's own
/// VFIO commands through it.
pub(crate) trait DeviceAccess {
    /// The context and the opened device of open file `fh`, which must
    /// hold the binding (`EINVAL` otherwise).
    fn access(&self, fh: u64) -> Result<(ContextId, Opened)>;
}

impl DeviceAccess for DeviceNode {
    fn access(&self, fh: u64) -> Result<(ContextId, Opened)> {
        DeviceNode::access(self, fh)
    }
}

/// [`ioctl_table::IoctlOp::requires`] of the rows that need the device
/// bound through the calling open file.
pub const NEEDS_BIND: u32 = 1;

/// Every command a device node serves. VFIO's argument structs are read
/// whole (up to 64 KiB) by their `argsz`, at least the end of their last
/// mandatory field, and forwarded.
pub static DEVICE_TABLE: Table<DeviceNode> = Table {
    node: "/dev/vfio/devices/devN",
    unknown_flags: Errno::EINVAL,
    ops: &[
        ioctl_op!(VFIO_DEVICE_GET_INFO, device_info, data vfio_device_info, num_irqs)
            .requires(NEEDS_BIND),
        ioctl_op!(VFIO_DEVICE_GET_REGION_INFO, region_info, data vfio_region_info, offset)
            .requires(NEEDS_BIND),
        ioctl_op!(VFIO_DEVICE_GET_IRQ_INFO, irq_info, data vfio_irq_info, count)
            .requires(NEEDS_BIND),
        ioctl_op!(VFIO_DEVICE_SET_IRQS, set_irqs, data vfio_irq_set, count).requires(NEEDS_BIND),
        ioctl_op!(VFIO_DEVICE_RESET, reset).requires(NEEDS_BIND),
        ioctl_op!(
            VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hot_reset_info, data vfio_pci_hot_reset_info, count
        )
        .requires(NEEDS_BIND),
        ioctl_op!(VFIO_DEVICE_PCI_HOT_RESET, hot_reset, data vfio_pci_hot_reset, count)
            .requires(NEEDS_BIND),
        ioctl_op!(VFIO_BIND_IOASID_FD, bind, int),
        ioctl_op!(VFIO_UNBIND_IOASID_FD, unbind, int),
        ioctl_op!(
            VFIO_ATTACH_IOASID,
            attach,
            VfioAttachIoasid,
            user_pasid,
            flags = IOASID_ATTACH_USER_PASID
        )
        .requires(NEEDS_BIND),
        ioctl_op!(
            VFIO_DETACH_IOASID,
            detach,
            VfioAttachIoasid,
            user_pasid,
            flags = IOASID_ATTACH_USER_PASID
        )
        .requires(NEEDS_BIND),
    ],
};

fn bind(node: &DeviceNode, u: &Ucmd<'_>, fd: u64) -> Result<i32> {
    node.bind(u.caller, u.fh, fd)
}

fn unbind(node: &DeviceNode, u: &Ucmd<'_>, fd: u64) -> Result<i32> {
    node.unbind(u.caller, u.fh, fd)
}

fn attach(node: &DeviceNode, u: &Ucmd<'_>, a: VfioAttachIoasid) -> Result<i32> {
    node.attach(u, a, true)
}

fn detach(node: &DeviceNode, u: &Ucmd<'_>, a: VfioAttachIoasid) -> Result<i32> {
    node.attach(u, a, false)
}

/// The caller's argument as a VFIO argument of struct `T` (the table's
/// minimum size holds a whole `T` for every row below but region info,
/// whose minimum is its whole struct).
fn vfio_arg<T: ioasid_uapi::ArgStruct>(bytes: Vec<u8>) -> Result<VfioArg<T>> {
    VfioArg::from_bytes(bytes)
}

/// Forward a `GET_*` ioctl with the caller's struct and write it back;
/// with `enospc_writeback`, an `ENOSPC` answer is written back too (VFIO's
/// hot-reset info raises `count` and fails with `ENOSPC`).
fn forward<N: DeviceAccess, T: ioasid_uapi::ArgStruct>(
    node: &N,
    u: &Ucmd<'_>,
    arg: Vec<u8>,
    ioctl: impl FnOnce(&dyn DeviceFile, &mut VfioArg<T>) -> std::result::Result<(), Errno>,
    enospc_writeback: bool,
) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    let mut arg = vfio_arg::<T>(arg)?;
    match ioctl(&*opened.device, &mut arg) {
        Ok(()) => {
            u.write_at(0, arg.as_bytes())?;
            Ok(0)
        }
        Err(Errno::ENOSPC) if enospc_writeback => {
            u.write_at(0, arg.as_bytes())?;
            Err(Error::new(
                Errno::ENOSPC,
                format!(
                    "{}: the array is too small; count says how many are needed",
                    u.name
                ),
            ))
        }
        Err(e) => Err(Error::new(e, format!("{} failed on the device", u.name))),
    }
}

pub(crate) fn device_info<N: DeviceAccess>(node: &N, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    // VFIO's minimum (the end of num_irqs) is shorter than the struct: the
    // daemon's copy holds the whole struct, the caller gets its argsz back.
    let given = arg.len();
    let mut full = arg;
    full.resize(given.max(std::mem::size_of::<vfio_device_info>()), 0);
    let mut a: VfioArg<vfio_device_info> = vfio_arg(full)?;
    opened
        .device
        .info(&mut a)
        .map_err(|e| Error::new(e, format!("{} failed on the device", u.name)))?;
    // The argsz the kernel saw is the padded one: give the caller its own
    // back, unless the kernel raised it (capabilities that did not fit).
    let mut h = a.header();
    if h.argsz as usize == a.len() {
        h.argsz = given as u32;
        a.set_header(&h);
    }
    u.write_at(0, &a.as_bytes()[..given])?;
    Ok(0)
}

pub(crate) fn irq_info<N: DeviceAccess>(node: &N, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    forward(
        node,
        u,
        arg,
        |d, a: &mut VfioArg<vfio_irq_info>| d.irq_info(a),
        false,
    )
}

pub(crate) fn hot_reset_info<N: DeviceAccess>(node: &N, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let ask = |d: &dyn DeviceFile, a: &mut VfioArg<vfio_pci_hot_reset_info>| d.hot_reset_info(a);
    forward(node, u, arg, ask, true)
}

/// `VFIO_DEVICE_GET_REGION_INFO`: ask the device with the daemon's own
/// buffer (large enough for the whole chain), strip mmap, answer the caller
/// by VFIO's rules for its argsz.
pub(crate) fn region_info<N: DeviceAccess>(node: &N, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    let dev = &*opened.device;
    let given: VfioArg<vfio_region_info> = vfio_arg(arg)?;
    let ask = |size: usize| -> Result<VfioArg<vfio_region_info>> {
        let mut b = VfioArg::new(&given.header(), size);
        dev.region_info(&mut b)
            .map_err(|e| Error::new(e, format!("{} failed on the device", u.name)))?;
        Ok(b)
    };
    let mut full = ask(REGION_INFO_SIZE)?;
    let mut chain_end = REGION_INFO_SIZE;
    if full.header().flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
        let mut need = full.argsz();
        let mut got = None;
        for _ in 0..3 {
            if need <= REGION_INFO_SIZE || need > ioctl_table::MAX_ARG {
                break;
            }
            let b = ask(need)?;
            if b.header().cap_offset != 0 {
                got = Some(b);
                break;
            }
            need = b.argsz();
        }
        match got {
            Some(b) => {
                chain_end = need;
                full = b;
            }
            None => {
                tracing::warn!(
                    need,
                    "{}: the device's capability chain could not be read; answering without it",
                    u.name
                );
                let mut h = full.header();
                h.flags &= !VFIO_REGION_INFO_FLAG_CAPS;
                h.cap_offset = 0;
                full.set_header(&h);
            }
        }
    }
    let stripped = region_info::strip_mmap(&mut full, chain_end);
    if let Some(why) = &stripped.malformed {
        tracing::warn!(
            "{}: malformed capability chain from the device dropped: {why}",
            u.name
        );
    }
    let out = region_info::reply(&full, given.len(), &stripped);
    u.write_at(0, out.as_bytes())?;
    Ok(0)
}

/// `VFIO_DEVICE_SET_IRQS`: eventfd numbers are the caller's; pass the
/// daemon's copies (the kernel takes its own references, so the copies are
/// closed right after the call). -1 (and any negative number) stays as is:
/// it tears the trigger down.
pub(crate) fn set_irqs<N: DeviceAccess>(node: &N, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    let mut set: VfioArg<vfio_irq_set> = vfio_arg(arg)?;
    let mut copies = Vec::new();
    if let Some(theirs) = set.eventfds()? {
        let mut ours = Vec::with_capacity(theirs.len());
        for fd in theirs {
            if fd < 0 {
                ours.push(fd);
                continue;
            }
            let copy = u.caller.get_fd(fd).map_err(|e| {
                Error::new(
                    e,
                    format!(
                        "{}: eventfd {fd} could not be copied from the caller ({e})",
                        u.name
                    ),
                )
            })?;
            ours.push(copy.as_raw_fd());
            copies.push(copy);
        }
        set.put_eventfds(&ours);
    }
    let r = opened.device.set_irqs(&mut set);
    drop(copies);
    r.map(|()| 0)
        .map_err(|e| Error::new(e, format!("{} failed on the device", u.name)))
}

pub(crate) fn reset<N: DeviceAccess>(node: &N, u: &Ucmd<'_>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    opened
        .device
        .reset()
        .map(|()| 0)
        .map_err(|e| Error::new(e, format!("{} failed on the device", u.name)))
}

fn hot_reset(node: &DeviceNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (ctx, opened) = node.access(u.fh)?;
    node.hot_reset(ctx, &*opened.device, vfio_arg(arg)?)
}
