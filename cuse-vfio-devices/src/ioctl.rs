//! The ioctl table of a device node: the RFC's bind and attach commands,
//! and the device's own VFIO commands, forwarded to the real device.
//!
//! A row that `requires` [`NEEDS_BIND`] answers `EINVAL` until the open
//! file has bound the device (`VFIO_BIND_IOASID_FD`), before its argument
//! is read, as the kernel's device cdev does before
//! `VFIO_DEVICE_BIND_IOMMUFD`.

use ioasid_uapi::error::{Errno, Result};
use ioasid_uapi::vfio::*;
use ioasid_uapi::{
    VfioAttachIoasid, IOASID_ATTACH_USER_PASID, VFIO_ATTACH_IOASID, VFIO_BIND_IOASID_FD,
    VFIO_DETACH_IOASID, VFIO_UNBIND_IOASID_FD,
};
use ioctl_table::{ioctl_op, Table, Ucmd};
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_irq_set, vfio_pci_hot_reset, vfio_pci_hot_reset_info,
    vfio_region_info,
};

use crate::node::{self, DeviceNode};

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
    node.attach(u.fh, a, true)
}

fn detach(node: &DeviceNode, u: &Ucmd<'_>, a: VfioAttachIoasid) -> Result<i32> {
    node.attach(u.fh, a, false)
}

fn device_info(node: &DeviceNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    node::forward(u, &*opened.device, VFIO_DEVICE_GET_INFO, arg, false)
}

fn region_info(node: &DeviceNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    node::region_info(u, &*opened.device, arg)
}

fn irq_info(node: &DeviceNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    node::forward(u, &*opened.device, VFIO_DEVICE_GET_IRQ_INFO, arg, false)
}

fn set_irqs(node: &DeviceNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    node::set_irqs(u, &*opened.device, arg)
}

fn reset(node: &DeviceNode, u: &Ucmd<'_>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    opened
        .device
        .ioctl_none(VFIO_DEVICE_RESET)
        .map_err(|e| ioasid_uapi::Error::new(e, format!("{} failed on the device", u.name)))
}

fn hot_reset_info(node: &DeviceNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (_, opened) = node.access(u.fh)?;
    node::forward(
        u,
        &*opened.device,
        VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
        arg,
        true,
    )
}

fn hot_reset(node: &DeviceNode, u: &Ucmd<'_>, arg: Vec<u8>) -> Result<i32> {
    let (ctx, opened) = node.access(u.fh)?;
    node.hot_reset(ctx, &*opened.device, arg)
}
