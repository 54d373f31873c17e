//! The legacy VFIO (container/group, type1v2) backend of the IOASID engine:
//! the only code that touches VFIO.
//!
//! - [`discovery`]: the PCI devices bound to `vfio-pci` and their IOMMU
//!   groups ([`discover`]).
//! - [`VfioLegacy`]: one type1v2 container per IOMMU group for the object's
//!   whole life; device fds ([`VfioLegacy::open_device`]); the engine's
//!   [`Backend`](ioasid_engine::backend::Backend).
//! - [`client_map`]: a client's own (private) memory mapped by the
//!   client's own thread, made to issue `VFIO_IOMMU_MAP_DMA` by
//!   `syscall-inject`.
//! - [`alias`]: client memory made addressable by the daemon through
//!   `/proc/<pid>/map_files`, cached and reference-counted.
//!
//! Raw system calls live in one private module (`sys`), ioctl numbers in
//! another (`ioctls`).

pub mod alias;
pub mod client_map;
pub mod device;
pub mod discovery;
mod error;
mod ioctls;
pub mod iommu_info;
mod legacy;
pub mod maps;
pub mod region_info;
mod sys;
mod unmapper;

pub use alias::ClientMemory;
pub use device::{Dependent, DeviceFile, VfioArg, VfioDevice};
pub use discovery::{discover, PciDevice, Sysfs};
pub use error::{Error, Result};
pub use legacy::{Paths, VfioLegacy};
/// The `vfio-bindings` structs the device wrappers take and return.
pub use vfio_bindings::bindings::vfio as bindings;
