//! The crate's errors are the daemon's one [`Error`] type: the errno to
//! answer plus a message for the log. The node logs each once (debug for a
//! client's mistake, warn for a server failure).

pub use ioasid_uapi::error::{Error, Result};
