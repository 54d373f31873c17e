//! The process that issued a request.

use std::os::fd::OwnedFd;

use cuse_server::Request;
use ioasid_engine::ClientWork;
use ioasid_uapi::error::Error;
use nix::errno::Errno;

use crate::client::{run_as_client, LogAs};

/// The caller of an ioctl, read or write: its memory and file descriptors,
/// read and written by the daemon on its behalf.
pub trait Caller {
    /// Fill `buf` from the caller's address `addr` (`EFAULT` if unreadable).
    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Write `data` at the caller's address `addr` (`EFAULT` if
    /// unwritable).
    fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), Errno>;
    /// A copy of the caller's file descriptor `fd` (`EBADF` if it is not
    /// open).
    fn get_fd(&self, fd: i32) -> Result<OwnedFd, Errno>;
    /// The calling thread's id. Its `/proc` entry shows the process's
    /// memory map and its limits, so the commands that alias client memory
    /// hand it to the engine; known without any look-up.
    fn tid(&self) -> i32;
    /// The calling process's id (its thread-group id; `ESRCH` if it is
    /// gone). Finding it costs a read of `/proc`: only the commands that
    /// need it ask.
    fn pid(&self) -> Result<i32, Errno>;
    /// Have `work` run as the calling thread once the request is answered
    /// (see [`ioasid_engine::Client::defer_as_client`]): how the engine
    /// pins a client's private memory. What goes wrong after the reply is
    /// logged as `log_as`'s line of the call. The default cannot
    /// (`EFAULT`).
    fn defer_as_client(&self, work: ClientWork, log_as: LogAs) -> Result<(), Error> {
        drop((work, log_as));
        Err(Error::new(
            Errno::EFAULT,
            format!(
                "thread {} cannot be reached to pin its own memory",
                self.tid()
            ),
        ))
    }
}

impl Caller for Request {
    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        Request::read_mem(self, addr, buf)
    }

    fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        Request::write_mem(self, addr, data)
    }

    fn get_fd(&self, fd: i32) -> Result<OwnedFd, Errno> {
        Request::get_fd(self, fd)
    }

    /// `fuse_in_header.pid`: the calling thread, blocked in its system call
    /// for as long as the request is served.
    fn tid(&self) -> i32 {
        // Thread ids fit an int (pid_max is at most 2^22).
        Request::tid(self) as i32
    }

    /// `Request::pid` reads `/proc/<tid>/status` once per request.
    fn pid(&self) -> Result<i32, Errno> {
        let pid = Request::pid(self).inspect_err(|_| {
            tracing::debug!(
                tid = Request::tid(self),
                "caller vanished before its request was served"
            );
        })?;
        i32::try_from(pid).map_err(|_| Errno::ESRCH)
    }

    /// Seize the calling thread now (`syscall-inject`; refusals answer
    /// `EFAULT` with the reason), answer `EFAULT` for now, and run `work`
    /// on this thread right after the reply, the caller stopped on its way
    /// out of its ioctl; `work`'s result becomes the ioctl's.
    fn defer_as_client(&self, work: ClientWork, log_as: LogAs) -> Result<(), Error> {
        run_as_client(self, work, log_as)
    }
}
