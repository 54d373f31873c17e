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
use crate::log;

/// Whose line a call's outcome after its reply is, in the daemon's log
/// (within that client's budget, [`crate::log`]): the client and the
/// command's name.
#[derive(Clone, Copy, Debug)]
pub struct LogAs {
    /// The client charged with the line.
    pub client: log::Client,
    /// The command, for the line.
    pub cmd: &'static str,
}

/// A [`Caller`] as the engine sees it: pass it (or
/// [`Ucmd::client`](crate::Ucmd::client)) to every engine entry point that
/// takes a [`Client`].
pub struct ClientOf<'a> {
    caller: &'a dyn Caller,
    log_as: LogAs,
}

impl<'a> ClientOf<'a> {
    /// `caller`, issuing command `cmd` for log client `client`.
    pub fn new(caller: &'a dyn Caller, client: log::Client, cmd: &'static str) -> Self {
        ClientOf {
            caller,
            log_as: LogAs { client, cmd },
        }
    }
}

impl Client for ClientOf<'_> {
    fn tid(&self) -> Pid {
        self.caller.tid()
    }

    fn pid(&self) -> Result<Pid> {
        self.caller
            .pid()
            .map_err(|e| Error::new(e, "the calling process is gone"))
    }

    fn defer_as_client(&self, work: ClientWork) -> Result<()> {
        self.caller.defer_as_client(work, self.log_as)
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

/// See [`Caller::defer_as_client`] for [`Request`]. A refusal to seize is
/// returned (the front end logs it as the call's refusal); what goes wrong
/// after the reply, when the call's real result is known, is the call's
/// one line, within the client's log budget.
pub(crate) fn run_as_client(req: &Request, work: ClientWork, log_as: LogAs) -> Result<()> {
    let tid = req.tid() as i32;
    req.expect_interrupt();
    let seized = Seized::seize(tid, options()).map_err(inject_error)?;
    req.reply_instead(Errno::EFAULT);
    req.after_reply(move || {
        let (outcome, put_back) = match seized.wait_stop(libc::SYS_ioctl) {
            Ok(stopped) => {
                let mut thread = StoppedClient(stopped);
                let r = work(Ok(&mut thread));
                let ret = r.as_ref().map_or_else(|e| -(e.errno as i64), |()| 0);
                (r, thread.0.finish(ret).err())
            }
            Err(e) => {
                let e = inject_error(e);
                let message = format!("the calling thread was not reached after the reply: {}", e.message);
                (work(Err(Error::new(e.errno, message))), None)
            }
        };
        if outcome.is_ok() && put_back.is_none() {
            return;
        }
        let Some(dropped) = log::client_line(log_as.client) else {
            return;
        };
        let put_back = put_back.map_or_else(String::new, |e| {
            format!(" (and putting the thread back failed: {e})")
        });
        match outcome {
            Ok(()) => tracing::warn!(tid, cmd = log_as.cmd, "as the client's thread{put_back}{dropped}"),
            Err(e) if e.is_client_mistake() && put_back.is_empty() => {
                tracing::info!(tid, cmd = log_as.cmd, errno = %e.errno, "as the client's thread: {}{dropped}", e.message)
            }
            Err(e) => {
                tracing::warn!(tid, cmd = log_as.cmd, errno = %e.errno, "as the client's thread: {}{put_back}{dropped}", e.message)
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
