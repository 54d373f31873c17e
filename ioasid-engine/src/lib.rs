//! The IOASID engine: contexts, I/O address spaces, mappings, registrations,
//! the group rule, and one level of software nesting (child IOASIDs whose
//! mappings or bound page tables are shadowed through their parent's
//! mappings; PASID tables read and tracked) — pure logic over the
//! [`backend::Backend`] trait, unit-tested without root against
//! [`fake::FakeBackend`]. [`pgtable`] walks user page tables.
//!
//! The front ends (`/dev/ioasid`, `/dev/vfio/devices/devN`) decode ioctls
//! and call [`Engine`]; every failure is an [`Error`] carrying the
//! errno to answer and a message to log.

pub mod backend;
mod engine;
mod error;
pub mod fake;
pub mod pgtable;

pub use engine::{
    Attachment, BoundDeviceSnapshot, Budgets, Client, ClientWork, ClosedContext, ContextId,
    ContextSnapshot, ContextView, DeviceId, DeviceSpec, DmaMap, Engine, EngineCounters,
    Invalidation, IoasMap, IoasidId, IoasidInfo, IoasidSnapshot, MapSource, ObjectId, ObjectKind,
    PasidTableStatus, PgtableStatus, WalkReport, PASID_BITS, PASID_TABLE_FLAT_X86_64,
    PASID_TABLE_MAX_ENTRIES, PGTABLE_X86_64_4LVL,
};
pub use error::{Error, Result};
