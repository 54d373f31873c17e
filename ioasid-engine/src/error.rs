//! The engine's errors are the daemon's one [`Error`] type (an errno to
//! answer and a message to log), from the ABI crate.

pub use ioasid_uapi::error::{Error, Result};
use nix::errno::Errno;

/// Shorthand for an [`Error`].
pub(crate) fn err(errno: Errno, message: impl Into<String>) -> Error {
    Error::new(errno, message)
}
