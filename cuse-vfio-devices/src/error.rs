//! The crate's error: the errno to answer plus a message for the log.

use ioasid_engine::EngineError;
use nix::errno::Errno;

/// A refused or failed request.
///
/// `errno` is what the client's system call fails with; `message` says what
/// went wrong and, where the user can act, what to do. The node logs it once
/// (debug for a client's mistake, warn for a server failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({errno})")]
pub struct Error {
    /// The errno to answer.
    pub errno: Errno,
    /// What failed and what to do about it.
    pub message: String,
}

impl Error {
    /// An error answering `errno`.
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
        }
    }

    /// Whether the error reports something the client did (or can fix), as
    /// opposed to a failure of the daemon or the system.
    pub fn is_client_mistake(&self) -> bool {
        matches!(
            self.errno,
            Errno::EINVAL
                | Errno::E2BIG
                | Errno::EFAULT
                | Errno::EBADF
                | Errno::ENOENT
                | Errno::ENODEV
                | Errno::EAGAIN
                | Errno::EEXIST
                | Errno::EBUSY
                | Errno::ENOTTY
                | Errno::ESPIPE
                | Errno::ENOSPC
                | Errno::EPERM
                | Errno::EOPNOTSUPP
                | Errno::ESRCH
                | Errno::EINTR
        )
    }
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        Error::new(Errno::from_raw(e.errno), e.message)
    }
}

impl From<vfio_legacy::Error> for Error {
    fn from(e: vfio_legacy::Error) -> Self {
        Error::new(e.errno, e.message)
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
