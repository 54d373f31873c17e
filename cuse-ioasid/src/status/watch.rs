//! Watching a node for `cuse-ioasid status`: [`Watched`] wraps a node's
//! [`Device`], counts its requests per command and its errors per errno
//! (atomics only), and keeps which process opened which file
//! ([`Clients`], a lock held only to insert, remove or copy an entry).
//! Nothing here waits for a request, so a status request never waits for
//! one either.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cuse_server::{Device, Errno, IoctlArgs, IoctlResult, Offset, OpenFlags, PollHandle, Request};
use ioctl_table::Table;

use super::model::Requests;
use super::Inspect;

/// A command's counts.
#[derive(Debug)]
struct Command {
    number: Option<u32>,
    name: &'static str,
    calls: AtomicU64,
    failed: AtomicU64,
}

impl Command {
    fn new(number: Option<u32>, name: &'static str) -> Self {
        Command {
            number,
            name,
            calls: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

const OPEN: usize = 0;
const READ: usize = 1;
const WRITE: usize = 2;
const POLL: usize = 3;
const RELEASE: usize = 4;
const UNKNOWN_IOCTL: usize = 5;
const FILE_OPS: [&str; 6] = ["open", "read", "write", "poll", "release", "unknown ioctl"];

/// Failed requests per errno, for every node.
#[derive(Debug)]
pub struct ErrnoCounters {
    /// Index: the errno; the last slot takes every larger value.
    counts: Vec<AtomicU64>,
}

impl Default for ErrnoCounters {
    fn default() -> Self {
        ErrnoCounters {
            counts: (0..256).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl ErrnoCounters {
    /// Count one failure with `errno`.
    pub fn count(&self, errno: Errno) {
        let i = (errno as usize).min(self.counts.len() - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The non-zero counts by errno name (`ENOENT`).
    pub fn by_name(&self) -> BTreeMap<String, u64> {
        self.counts
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| (errno_name(i as i32), n))
            })
            .collect()
    }
}

/// `ENOENT` for 2; `errno 300` for what nix does not name.
pub fn errno_name(errno: i32) -> String {
    match Errno::from_raw(errno) {
        Errno::UnknownErrno => format!("errno {errno}"),
        e => format!("{e:?}"),
    }
}

/// Requests of one kind of node (all device nodes share one), per
/// command.
#[derive(Debug)]
pub struct NodeCounters {
    kind: &'static str,
    /// The file operations (see the indices above), then one per ioctl row.
    commands: Vec<Command>,
    errors: Arc<ErrnoCounters>,
}

impl NodeCounters {
    /// Counters for nodes of `kind` serving `table`'s ioctls; failures go
    /// to `errors` too.
    pub fn new<Cx>(kind: &'static str, table: &Table<Cx>, errors: Arc<ErrnoCounters>) -> Self {
        let mut commands: Vec<Command> = FILE_OPS.iter().map(|n| Command::new(None, n)).collect();
        commands.extend(
            table
                .ops
                .iter()
                .map(|op| Command::new(Some(op.number), op.name)),
        );
        NodeCounters {
            kind,
            commands,
            errors,
        }
    }

    /// Count one request of command `i`; returns the command's name.
    fn count(&self, i: usize, failed: Option<Errno>) -> &'static str {
        let c = &self.commands[i];
        c.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(errno) = failed {
            c.failed.fetch_add(1, Ordering::Relaxed);
            self.errors.count(errno);
        }
        c.name
    }

    fn count_ioctl(&self, cmd: u32, failed: Option<Errno>) -> &'static str {
        let i = self.commands[FILE_OPS.len()..]
            .iter()
            .position(|c| c.number == Some(cmd))
            .map_or(UNKNOWN_IOCTL, |i| i + FILE_OPS.len());
        self.count(i, failed)
    }

    /// The commands requested at least once.
    pub fn requests(&self) -> Vec<Requests> {
        self.commands
            .iter()
            .filter_map(|c| {
                let calls = c.calls.load(Ordering::Relaxed);
                (calls > 0).then(|| Requests {
                    kind: self.kind.to_string(),
                    command: c.name.to_string(),
                    calls,
                    failed: c.failed.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

/// One open file, as its node saw the open.
#[derive(Clone)]
pub struct Opened {
    /// The node (`/dev/ioasid`).
    pub node: Arc<str>,
    /// The file's handle.
    pub fh: u64,
    /// The process that opened it (`None` if its thread could not be
    /// looked up).
    pub pid: Option<u32>,
    /// The node's front end, which describes the file.
    pub inspect: Arc<dyn Inspect>,
}

/// Every open file of every watched node.
#[derive(Default)]
pub struct Clients {
    files: Mutex<BTreeMap<(Arc<str>, u64), Opened>>,
}

impl Clients {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(Arc<str>, u64), Opened>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record an open.
    pub fn opened(&self, file: Opened) {
        self.lock().insert((file.node.clone(), file.fh), file);
    }

    /// Forget a released file.
    pub fn released(&self, node: &Arc<str>, fh: u64) {
        self.lock().remove(&(node.clone(), fh));
    }

    /// The process that opened file `fh` of `node`, if known.
    pub fn pid(&self, node: &Arc<str>, fh: u64) -> Option<u32> {
        self.lock().get(&(node.clone(), fh)).and_then(|f| f.pid)
    }

    /// The open files now, by node and handle.
    pub fn list(&self) -> Vec<Opened> {
        self.lock().values().cloned().collect()
    }
}

/// The target of the one debug line every request writes once served
/// (`--log info,cuse_ioasid::requests=debug`): node, file handle, the
/// process that opened the file, command and result. Off by default; not
/// charged to a client's log budget, because only the operator turns it on
/// (to see what a program asks of the daemon, e.g. every ioctl QEMU issues).
pub const REQUESTS_TARGET: &str = "cuse_ioasid::requests";

/// A request's outcome, as its debug line shows it: `ok` or the errno.
struct Outcome(Option<Errno>);

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("ok"),
            Some(e) => f.write_str(&errno_name(e as i32)),
        }
    }
}

/// A node's device, watched.
pub struct Watched {
    inner: Arc<dyn Device>,
    node: Arc<str>,
    inspect: Arc<dyn Inspect>,
    counters: Arc<NodeCounters>,
    clients: Arc<Clients>,
}

impl Watched {
    /// `inner`, the device behind node `node` (`/dev/ioasid`), described
    /// by `inspect`, counted in `counters`, its files kept in `clients`.
    pub fn new(
        inner: Arc<dyn Device>,
        node: &str,
        inspect: Arc<dyn Inspect>,
        counters: Arc<NodeCounters>,
        clients: Arc<Clients>,
    ) -> Self {
        Watched {
            inner,
            node: node.into(),
            inspect,
            counters,
            clients,
        }
    }

    /// The request's debug line (see [`REQUESTS_TARGET`]); the pid is
    /// looked up only when the line is written.
    fn trace(&self, fh: u64, command: &str, failed: Option<Errno>) {
        self.trace_ioctl(fh, command, None, failed);
    }

    /// [`Watched::trace`] of an ioctl, with its number (which tells an
    /// unknown ioctl apart).
    fn trace_ioctl(&self, fh: u64, command: &str, number: Option<u32>, failed: Option<Errno>) {
        if tracing::enabled!(target: REQUESTS_TARGET, tracing::Level::DEBUG) {
            let pid = self.clients.pid(&self.node, fh);
            tracing::debug!(
                target: REQUESTS_TARGET,
                node = %self.node,
                fh,
                pid = %pid.map_or("?".to_string(), |p| p.to_string()),
                cmd = %command,
                nr = %number.map_or("-".to_string(), |n| format!("{n:#x}")),
                result = %Outcome(failed),
                "request"
            );
        }
    }
}

impl Device for Watched {
    fn open(&self, req: &Request, flags: OpenFlags) -> Result<u64, Errno> {
        let r = self.inner.open(req, flags);
        let name = self.counters.count(OPEN, r.err());
        if let Ok(fh) = r {
            self.clients.opened(Opened {
                node: self.node.clone(),
                fh,
                pid: req.pid().ok(),
                inspect: self.inspect.clone(),
            });
            self.trace(fh, name, None);
        }
        r
    }

    fn read(&self, req: &Request, fh: u64, size: u32, offset: Offset) -> Result<Vec<u8>, Errno> {
        let r = self.inner.read(req, fh, size, offset);
        let name = self.counters.count(READ, r.as_ref().err().copied());
        self.trace(fh, name, r.as_ref().err().copied());
        r
    }

    fn write(&self, req: &Request, fh: u64, data: &[u8], offset: Offset) -> Result<u32, Errno> {
        let r = self.inner.write(req, fh, data, offset);
        let name = self.counters.count(WRITE, r.as_ref().err().copied());
        self.trace(fh, name, r.as_ref().err().copied());
        r
    }

    fn ioctl_is_quick(&self, cmd: u32) -> bool {
        self.inner.ioctl_is_quick(cmd)
    }

    fn ioctl(&self, req: &Request, fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        let r = self.inner.ioctl(req, fh, args);
        let failed = r.as_ref().err().copied();
        let name = self.counters.count_ioctl(args.cmd, failed);
        self.trace_ioctl(fh, name, Some(args.cmd), failed);
        r
    }

    fn poll(
        &self,
        req: &Request,
        fh: u64,
        events: u32,
        waiter: Option<PollHandle>,
    ) -> Result<u32, Errno> {
        let r = self.inner.poll(req, fh, events, waiter);
        let name = self.counters.count(POLL, r.as_ref().err().copied());
        self.trace(fh, name, r.as_ref().err().copied());
        r
    }

    fn release(&self, fh: u64) {
        self.inner.release(fh);
        let name = self.counters.count(RELEASE, None);
        self.trace(fh, name, None);
        self.clients.released(&self.node, fh);
    }
}
