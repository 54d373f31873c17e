//! The engine's [`Client`] for a [`Caller`], and how a CUSE request runs
//! work as its own calling thread: seized before the reply
//! (`syscall-inject`), trapped on its way out of the ioctl, the work's
//! result made the ioctl's return value.

use std::sync::OnceLock;
use std::time::Duration;

use cuse_server::Request;
use ioasid_engine::backend::{ClientThread, MmId, Pid};
use ioasid_engine::{Client, ClientWork};
use ioasid_uapi::error::{Error, Result};
use nix::errno::Errno;
use syscall_inject::{Options, Seized, Stopped};

use crate::caller::Caller;

/// A [`Caller`] as the engine sees it: pass `&ClientOf(u.caller)` (or
/// [`Ucmd::client`](crate::Ucmd::client)) to every engine entry point that
/// takes a [`Client`].
pub struct ClientOf<'a>(pub &'a dyn Caller);

impl Client for ClientOf<'_> {
    fn tid(&self) -> Pid {
        self.0.tid()
    }

    fn pid(&self) -> Result<Pid> {
        self.0
            .pid()
            .map_err(|e| Error::new(e, "the calling process is gone"))
    }

    fn defer_as_client(&self, work: ClientWork) -> Result<()> {
        self.0.defer_as_client(work)
    }
}

static OPTIONS: OnceLock<Options> = OnceLock::new();

/// How injections behave in this process (default: 5 s bound, no thread
/// under a seccomp filter); set once, before serving.
pub fn set_inject_options(timeout: Duration, allow_seccomp_filter: bool) {
    let _ = OPTIONS.set(Options {
        timeout,
        allow_seccomp_filter,
    });
}

fn options() -> Options {
    OPTIONS.get().cloned().unwrap_or_default()
}

fn inject_error(e: syscall_inject::Error) -> Error {
    Error::new(e.errno(), e.to_string())
}

/// See [`Caller::defer_as_client`] for [`Request`].
pub(crate) fn run_as_client(req: &Request, work: ClientWork) -> Result<()> {
    let tid = req.tid() as i32;
    req.expect_interrupt();
    let seized = Seized::seize(tid, options()).map_err(|e| {
        // Why matters to the user: traced, Yama, an LSM, seccomp.
        tracing::warn!(tid, "cannot reach the calling thread: {e}");
        inject_error(e)
    })?;
    req.reply_instead(Errno::EFAULT);
    req.after_reply(move || {
        let outcome = match seized.wait_stop(libc::SYS_ioctl) {
            Ok(stopped) => {
                let mut thread = StoppedClient(stopped);
                let r = work(Ok(&mut thread));
                let ret = r.as_ref().map_or_else(|e| -(e.errno as i64), |()| 0);
                let finished = thread.0.finish(ret);
                if let Err(e) = finished {
                    tracing::warn!(tid, "putting the calling thread back: {e}");
                }
                r
            }
            Err(e) => {
                tracing::warn!(
                    tid,
                    "the calling thread was not reached after the reply: {e}"
                );
                work(Err(inject_error(e)))
            }
        };
        if let Err(e) = outcome {
            if e.is_client_mistake() {
                tracing::debug!(tid, errno = %e.errno, "as the client's thread: {}", e.message);
            } else {
                tracing::warn!(tid, errno = %e.errno, "as the client's thread: {}", e.message);
            }
        }
    });
    Ok(())
}

/// The calling thread, stopped on its way out of its ioctl.
pub struct StoppedClient(pub Stopped);

/// `AT_RANDOM` in the auxiliary vector.
const AT_RANDOM: u64 = 25;

impl ClientThread for StoppedClient {
    fn tid(&self) -> Pid {
        self.0.tid()
    }

    /// The process and `AT_RANDOM`'s 16 bytes (new at every `exec`), read
    /// from `/proc/<tid>/auxv` and the thread's memory.
    fn mm(&mut self) -> Result<MmId> {
        let tid = self.0.tid();
        let auxv = std::fs::read(format!("/proc/{tid}/auxv"))
            .map_err(|e| Error::io(&e, format!("reading /proc/{tid}/auxv")))?;
        let addr = auxv
            .chunks_exact(16)
            .map(|p| {
                let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or_default());
                (word(&p[..8]), word(&p[8..]))
            })
            .find(|&(key, _)| key == AT_RANDOM)
            .map(|(_, v)| v)
            .ok_or_else(|| {
                Error::new(
                    Errno::EFAULT,
                    format!("thread {tid} has no AT_RANDOM in its auxiliary vector"),
                )
            })?;
        let mut stamp = [0u8; 16];
        self.0.read(addr, &mut stamp).map_err(inject_error)?;
        Ok(MmId {
            pid: self.0.pid(),
            stamp,
        })
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        &mut self.0
    }
}
