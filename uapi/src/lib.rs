//! The `/dev/ioasid` uAPI (RFC 2021): ioctl numbers and struct layouts,
//! mirrored from `uapi/include/linux/ioasid.h`.
//!
//! The C header is the reference; this crate mirrors it one to one (same
//! constant names, structs in CamelCase with the same fields) and holds no
//! logic. A test compiles a C program against the header with the system
//! compiler and compares every struct size, field offset and constant with
//! this crate; another pins every ioctl number to a literal.
//!
//! * [`numbers`]: the `_IO` formula ([`io`]), every ioctl number, extension
//!   id, flag, capability id and format.
//! * [`structs`]: the `#[repr(C)]` argument structs, deriving zerocopy's
//!   `FromBytes`, `IntoBytes`, `KnownLayout` and `Immutable`, with
//!   compile-time size and offset checks; [`ArgStruct`] marks every struct
//!   an ioctl takes by pointer (these, and the bindings crates' structs
//!   the daemon reads from callers) as plain bytes.
//! * [`vfio`]: the numbers of the legacy VFIO ioctls (the `vfio-bindings`
//!   crate has the structs but not the numbers).
//!
//! * [`plain`]: byte views of the argument structs.
//! * [`error`]: the errno vocabulary: the one [`Error`] type of the daemon
//!   (an errno to answer and a message to log) and which errnos report a
//!   client's mistake.
//!
//! Which errno answers which failure is documented in the header and in
//! `docs/uapi.md`; the front ends implement it.

pub mod error;
pub mod iommufd;
pub mod numbers;
pub mod plain;
pub mod structs;
pub mod vfio;

pub use error::{is_client_mistake, Error};
pub use numbers::*;
pub use structs::*;
