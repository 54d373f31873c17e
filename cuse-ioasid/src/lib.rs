//! The cuse-ioasid daemon: /dev/ioasid and the device nodes, served from user space over CUSE.

mod info;
pub mod ioctl;
pub mod node;
pub mod status;
