//! What every front end of the daemon is made of, in the shape of the
//! kernel's iommufd (`drivers/iommu/iommufd/main.c`):
//!
//! - [`Caller`]: the process that issued a request: its memory, its file
//!   descriptors (`pidfd_getfd`), its thread and process ids. CUSE's
//!   [`cuse_server::Request`] implements it; tests use [`fake::FakeCaller`].
//! - [`Table`]: one per node kind (or per dialect of a node), a slice of
//!   [`IoctlOp`] rows, one per command, written with [`ioctl_op!`] like the
//!   kernel's `IOCTL_OP(number, handler, struct, last_field)`: the number,
//!   the argument (none, an integer, or a struct with its minimum size, the
//!   size this daemon knows and the flags it accepts) and a handler that
//!   receives the typed value. The errno for unknown flags is the table's
//!   (the RFC's `/dev/ioasid` says `EINVAL`, iommufd `EOPNOTSUPP`).
//! - [`ClientOf`]: a [`Caller`] as the engine's `Client`, through which
//!   the engine pins a caller's private memory by the caller's own thread
//!   (`syscall-inject`, after the reply).
//! - [`read_struct`]: the one reader of extensible structs, the kernel's
//!   `copy_struct_from_user`, used for every struct argument of every node;
//!   [`read_data`] for VFIO's variable-length arguments, forwarded whole.
//!
//! Errors are the daemon's one [`ioasid_uapi::Error`]; a node logs each
//! refusal once ([`log::refusal`]), at info level for a client's mistake
//! ([`ioasid_uapi::is_client_mistake`]) and at warn level otherwise, and
//! every line a client's request writes is within that client's budget
//! ([`log`]).

mod caller;
mod client;
pub mod fake;
pub mod log;
mod reader;
#[doc(hidden)]
pub mod table;

pub use caller::Caller;
pub use client::{set_inject_options, ClientOf, LogAs, StoppedClient};
pub use ioasid_uapi::error::{Error, Result};
pub use ioasid_uapi::ArgStruct;
pub use reader::{read_data, read_struct, Flags, StructRules, Tail, MAX_ARG, MAX_TAIL};
pub use table::{size_of_field, Handler, IoctlOp, Table, Ucmd};

#[cfg(test)]
mod tests;
