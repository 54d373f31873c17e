//! The crate's error: an errno captured where the call failed, and a message
//! saying what failed and what the user can do about it.

use ioasid_engine::backend::BackendError;
use nix::errno::Errno;

/// A failed system operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}: {errno}")]
pub struct Error {
    /// The errno the operation failed with (or the one to report).
    pub errno: Errno,
    /// What failed and, where possible, what to do about it.
    pub message: String,
}

impl Error {
    /// An error with `errno` and `message`.
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
        }
    }
}

impl Error {
    /// An error from a failed I/O call, keeping its errno (`EIO` if none).
    pub(crate) fn io(e: &std::io::Error, message: impl Into<String>) -> Self {
        let errno = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
        Error::new(errno, message)
    }

    /// Like [`Error::io`] for a file under `/proc/<pid>`: a missing file means
    /// the process is gone (`ESRCH`).
    pub(crate) fn proc(e: &std::io::Error, message: impl Into<String>) -> Self {
        if e.raw_os_error() == Some(libc::ENOENT) {
            Error::new(Errno::ESRCH, message)
        } else {
            Error::io(e, message)
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for BackendError {
    fn from(e: Error) -> Self {
        BackendError::new(e.errno as i32, e.to_string())
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
