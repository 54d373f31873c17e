//! The cuse-ioasid daemon: /dev/ioasid, /dev/iommu and the device nodes, served from user space over CUSE.

pub mod heap;
mod info;
pub mod ioctl;
pub mod iommufd;
pub mod node;
pub mod status;
