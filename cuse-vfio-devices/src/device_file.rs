//! The seams between a node and the system: the real VFIO device file
//! ([`DeviceFile`], vfio-legacy's, opened by a [`DeviceOpener`]) and the
//! lookup of the ioasid context behind a file descriptor
//! ([`ContextLookup`]). The real implementations are [`VfioLegacy`] and
//! [`IoasidIdentify`]; unit tests use fakes.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;

use cuse_server::DeviceNumber;
use ioasid_engine::backend::GroupId;
use ioasid_engine::{ContextId, DeviceSpec};
use nix::errno::Errno;
use nix::sys::stat::{fstat, SFlag};
use vfio_legacy::{DeviceFile, VfioLegacy};

use crate::error::{Error, Result};

/// Opens devices at bind time (closing, i.e. dropping, the returned file
/// resets the device) and lends the daemon's group files.
pub trait DeviceOpener: Send + Sync {
    /// Open device `spec`.
    fn open_device(&self, spec: &DeviceSpec) -> Result<Box<dyn DeviceFile>>;
    /// The daemon's open files of IOMMU groups `groups`, in order (for
    /// `VFIO_DEVICE_PCI_HOT_RESET`). `ENOENT` for a group it does not hold.
    fn group_fds(&self, groups: &[GroupId]) -> Result<Vec<BorrowedFd<'_>>>;
}

impl DeviceOpener for VfioLegacy {
    fn open_device(&self, spec: &DeviceSpec) -> Result<Box<dyn DeviceFile>> {
        Ok(Box::new(VfioLegacy::open_device(
            self, spec.group, &spec.name,
        )?))
    }

    fn group_fds(&self, groups: &[GroupId]) -> Result<Vec<BorrowedFd<'_>>> {
        groups.iter().map(|&g| self.group_fd(g)).collect()
    }
}

/// Which ioasid context a file (copied from the caller) is.
pub trait ContextLookup: Send + Sync {
    /// `EINVAL` if `file` is not an ioasid file of this daemon.
    fn context_of(&self, file: BorrowedFd<'_>) -> Result<ContextId>;
}

/// The real lookup: the file must be a character device with the device
/// number of the daemon's `/dev/ioasid` node; it is then asked
/// `IOASID_DAEMON_IDENTIFY`, which travels through the kernel back into
/// the daemon's `/dev/ioasid` node and is answered with the context id
/// (to the daemon's own process only).
///
/// The same lookup finds `/dev/iommu` files (built with
/// [`IoasidIdentify::named`]), which answer the same private ioctl.
#[derive(Debug)]
pub struct IoasidIdentify {
    dev: OnceLock<DeviceNumber>,
    node: &'static str,
}

impl Default for IoasidIdentify {
    fn default() -> Self {
        Self::named("/dev/ioasid")
    }
}

impl IoasidIdentify {
    /// A lookup that knows the `/dev/ioasid` node's number.
    pub fn new(dev: DeviceNumber) -> Self {
        let me = Self::default();
        let _ = me.dev.set(dev);
        me
    }

    /// A lookup of files of the daemon's node `node` (`/dev/iommu`), whose
    /// number is set later.
    pub fn named(node: &'static str) -> Self {
        IoasidIdentify {
            dev: OnceLock::new(),
            node,
        }
    }

    /// Set the `/dev/ioasid` node's number once it is registered. Fails
    /// (returning the number given) if it was set already.
    pub fn set_device(&self, dev: DeviceNumber) -> std::result::Result<(), DeviceNumber> {
        self.dev.set(dev)
    }

    /// The number, once known.
    pub fn device(&self) -> Option<DeviceNumber> {
        self.dev.get().copied()
    }
}

impl ContextLookup for IoasidIdentify {
    fn context_of(&self, file: BorrowedFd<'_>) -> Result<ContextId> {
        let Some(ours) = self.dev.get() else {
            return Err(Error::new(
                Errno::EINVAL,
                format!("the {} node is not registered yet", self.node),
            ));
        };
        let st = fstat(file).map_err(|e| Error::new(e, "fstat of the copied fd failed"))?;
        let is_chr = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFCHR;
        let rdev = DeviceNumber::from_dev_t(st.st_rdev);
        if !is_chr || rdev != *ours {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "the fd is not a {node} file of this daemon (it is {}, {node} is character \
                     device {ours}); pass an fd from open(\"{node}\")",
                    if is_chr {
                        format!("character device {rdev}")
                    } else {
                        "not a character device".to_string()
                    },
                    node = self.node,
                ),
            ));
        }
        match daemon_identify(file) {
            Ok(id) if id >= 0 => Ok(ContextId(id as u64)),
            Ok(id) => Err(Error::new(
                Errno::EINVAL,
                format!("IOASID_DAEMON_IDENTIFY answered {id}"),
            )),
            Err(e) => Err(Error::new(
                Errno::EINVAL,
                format!(
                    "the fd has {}'s device number but IOASID_DAEMON_IDENTIFY failed with {e}: \
                     not a file of this daemon's node (or it is closing)",
                    self.node
                ),
            )),
        }
    }
}

nix::ioctl_none_bad!(
    /// `IOASID_DAEMON_IDENTIFY` on an ioasid file: its context id.
    ioasid_daemon_identify,
    ioasid_uapi::IOASID_DAEMON_IDENTIFY
);

/// Ask `file`, a character device with the `/dev/ioasid` node's number,
/// which context it is.
fn daemon_identify(file: BorrowedFd<'_>) -> std::result::Result<i32, Errno> {
    // SAFETY: the fd is open for the call (borrowed); the command takes no
    // argument, so no memory is handed over; the file is this daemon's own
    // CUSE node (the caller checked its device number), which answers it
    // without side effects; the result is checked by the caller.
    unsafe { ioasid_daemon_identify(file.as_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn rdev_of(path: &str) -> DeviceNumber {
        DeviceNumber::from_dev_t(nix::sys::stat::stat(path).unwrap().st_rdev)
    }

    #[test]
    fn foreign_files_are_einval() {
        let lookup = IoasidIdentify::new(DeviceNumber {
            major: 10,
            minor: 4242,
        });
        let (r, _w) = nix::unistd::pipe().unwrap();
        let e = lookup.context_of(r.as_fd()).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(
            e.message.contains("not a character device"),
            "{}",
            e.message
        );
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = lookup.context_of(null.as_fd()).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.message.contains("character device 1:3"), "{}", e.message);
    }

    #[test]
    fn right_number_but_no_identify_is_einval() {
        // /dev/null posing as /dev/ioasid: passes the number check, then
        // IOASID_DAEMON_IDENTIFY fails (ENOTTY) and the fd is refused.
        let lookup = IoasidIdentify::default();
        let null = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            lookup.context_of(null.as_fd()).unwrap_err().errno,
            Errno::EINVAL
        );
        lookup.set_device(rdev_of("/dev/null")).unwrap();
        assert!(lookup.set_device(rdev_of("/dev/zero")).is_err());
        let e = lookup.context_of(null.as_fd()).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(
            e.message.contains("IOASID_DAEMON_IDENTIFY failed"),
            "{}",
            e.message
        );
    }
}
