//! The engine's error: an errno for the client plus a message for the log.

use crate::backend::BackendError;

/// A failed engine operation.
///
/// `errno` is what the ioctl answers; `message` says what went wrong and,
/// where the user can do something about it, what to do. The front ends log
/// the message (the engine itself does not log above debug level).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct EngineError {
    /// The errno to answer (a positive `libc::E*` value).
    pub errno: i32,
    /// What failed and what to do about it.
    pub message: String,
}

impl EngineError {
    /// An error answering `errno` with message `message`.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        EngineError {
            errno,
            message: message.into(),
        }
    }

    /// The errno to answer.
    pub fn errno(&self) -> i32 {
        self.errno
    }
}

impl From<BackendError> for EngineError {
    fn from(e: BackendError) -> Self {
        EngineError {
            errno: e.errno,
            message: e.message,
        }
    }
}

/// Shorthand for an [`EngineError`].
pub(crate) fn err(errno: i32, message: impl Into<String>) -> EngineError {
    EngineError::new(errno, message)
}
