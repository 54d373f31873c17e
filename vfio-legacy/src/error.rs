//! The crate's errors are the daemon's one [`Error`] type (an errno
//! captured where the call failed, and a message saying what failed and
//! what the user can do about it); this module adds the conversions the
//! crate needs.

pub use ioasid_uapi::error::{Error, Result};
use nix::errno::Errno;

/// Like [`Error::io`] for a file under `/proc/<pid>`: a missing file means
/// the process is gone (`ESRCH`).
pub(crate) fn proc_error(e: &std::io::Error, message: impl Into<String>) -> Error {
    if e.raw_os_error() == Some(libc::ENOENT) {
        Error::new(Errno::ESRCH, message)
    } else {
        Error::io(e, message)
    }
}

/// Attach a message to a bare errno or I/O error.
pub(crate) trait Context<T> {
    fn context(self, message: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, Errno> {
    fn context(self, message: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| Error::new(errno, message()))
    }
}

impl<T> Context<T> for std::io::Result<T> {
    fn context(self, message: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(&e, message()))
    }
}
