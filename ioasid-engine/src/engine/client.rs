//! Who asks: the calling thread of a request, as every entry point that
//! pins client memory receives it. A front end passes its caller and gets
//! private memory with no code of its own.

use crate::backend::{ClientThread, Pid};
use crate::error::Error;

/// Work that must run as the client's own thread once its call has been
/// answered. It receives the thread, stopped on its way out of the call,
/// or the reason it could not be reached (gone, not stopped in time); its
/// result becomes the call's return value (0 or `-errno`). It runs in
/// every case, so what the engine reserved for it is always settled.
pub type ClientWork =
    Box<dyn FnOnce(Result<&mut dyn ClientThread, Error>) -> Result<(), Error> + Send>;

/// The thread that issued a request.
pub trait Client {
    /// The calling thread (its `/proc` entry shows the process's memory
    /// map and limits), known without any look-up.
    fn tid(&self) -> Pid;

    /// The calling process (thread-group id); may cost a read of `/proc`.
    fn pid(&self) -> Result<Pid, Error>;

    /// Arrange for `work` to run as this thread after the call is
    /// answered (the front end's answer until then is provisional:
    /// `EFAULT`, what the caller sees if `work` never reaches it). Refused
    /// with `EFAULT` and the reason when the thread cannot be reached that
    /// way (traced by a debugger, Yama, an LSM, a seccomp filter, a front
    /// end that cannot): `work` is then dropped without running.
    fn defer_as_client(&self, work: ClientWork) -> Result<(), Error>;
}

/// A caller known only by its thread id: it cannot be reached for its
/// private memory (tests, tools).
impl Client for Pid {
    fn tid(&self) -> Pid {
        *self
    }

    fn pid(&self) -> Result<Pid, Error> {
        Ok(*self)
    }

    fn defer_as_client(&self, work: ClientWork) -> Result<(), Error> {
        drop(work);
        Err(Error::new(
            nix::errno::Errno::EFAULT,
            format!("thread {self} cannot be reached to pin its own memory"),
        ))
    }
}
