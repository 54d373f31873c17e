//! The IOASID engine: contexts, I/O address spaces, mappings, registrations
//! and the group rule — pure logic over the [`backend::Backend`] trait,
//! unit-tested without root against [`fake::FakeBackend`].
//!
//! The front ends (`/dev/ioasid`, `/dev/vfio/devices/devN`) decode ioctls
//! and call [`Engine`]; every failure is an [`EngineError`] carrying the
//! errno to answer and a message to log.

pub mod backend;
mod engine;
mod error;
pub mod fake;

pub use engine::{
    Attachment, ClosedContext, ContextId, DeviceId, DeviceSpec, DmaMap, Engine, IoasidId,
    IoasidInfo, PASID_BITS,
};
pub use error::EngineError;
