//! The errno vocabulary of the daemon: the one error type every crate
//! returns, and which errnos report a client's mistake.
//!
//! An [`Error`] is what a request is answered with (`errno`) plus what the
//! log says about it (`message`: what failed and, where the user can act,
//! what to do). It is made where the failure is first seen and passed up
//! unchanged: the backend, the engine, the argument reader and the front
//! ends all speak it, and only the CUSE layer turns it into a reply.

pub use nix::errno::Errno;

/// A refused or failed request: the errno to answer and a message for the
/// log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({errno})")]
pub struct Error {
    /// The errno the client's system call fails with.
    pub errno: Errno,
    /// What failed and, where the user can act, what to do about it.
    pub message: String,
}

impl Error {
    /// An error answering `errno`, logged as `message`.
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
        }
    }

    /// An error from a failed I/O call, keeping its errno (`EIO` if it has
    /// none).
    pub fn io(e: &std::io::Error, message: impl Into<String>) -> Self {
        let errno = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
        Error::new(errno, message)
    }

    /// Whether the error reports something the client did or can fix
    /// (logged at debug level) rather than a failure of the daemon, a
    /// device or the system (logged at warn level); see
    /// [`is_client_mistake`].
    pub fn is_client_mistake(&self) -> bool {
        is_client_mistake(self.errno)
    }
}

/// The result type of the daemon's crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The errnos that report something the client did, or can fix itself: a
/// bad argument (`EINVAL`, `E2BIG`, `EFAULT`, `EBADF`, `ENOTTY`,
/// `ESPIPE`, `EOPNOTSUPP`, `EMSGSIZE`), an object that is missing or in the
/// way (`ENOENT`, `ENODEV`, `EEXIST`, `EBUSY`, `EPERM`), a limit of its own
/// (`ENOSPC`, `ENOMEM`), or a caller that went away or gave up (`ESRCH`,
/// `EINTR`, `EAGAIN`). Failures are logged once, at debug level for these
/// and at warn level for everything else (`EIO` above all: a device or
/// VFIO failed, or an IOMMU group is out of service).
///
/// `ENOMEM` is a client's mistake: the one `ENOMEM` a request meets by
/// design is its own `RLIMIT_MEMLOCK` (the engine accounts pinned memory
/// per process, as type1 does), and every other one (an alias that cannot
/// be mapped, a domain that cannot pin) is sized by what the request asks
/// for. Logging it at warn level would let any client fill the log; a real
/// shortage of the system shows in the kernel's own log.
pub fn is_client_mistake(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::EINVAL
            | Errno::E2BIG
            | Errno::EFAULT
            | Errno::EBADF
            | Errno::ENOTTY
            | Errno::ESPIPE
            | Errno::EOPNOTSUPP
            | Errno::EMSGSIZE
            | Errno::ENOENT
            | Errno::ENODEV
            | Errno::EEXIST
            | Errno::EBUSY
            | Errno::EPERM
            | Errno::ENOSPC
            | Errno::ENOMEM
            | Errno::ESRCH
            | Errno::EINTR
            | Errno::EAGAIN
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_line_has_the_message_and_the_errno() {
        let e = Error::new(Errno::EBUSY, "IOASID 3 is in use");
        assert_eq!(
            e.to_string(),
            "IOASID 3 is in use (EBUSY: Device or resource busy)"
        );
        assert!(e.is_client_mistake());
        assert!(!Error::new(Errno::EIO, "x").is_client_mistake());
        assert!(is_client_mistake(Errno::ENOMEM));
    }
}
