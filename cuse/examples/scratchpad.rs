//! A scratchpad character device over CUSE, exercising every feature of
//! `cuse-server`; the VM test `tests/scenarios/test_cuse_scratchpad.py`
//! drives it.
//!
//! ```text
//! scratchpad [--name NAME]... [--workers N] [--workers-per-client N]
//!            [--idle-timeout-ms MS]
//! ```
//!
//! Serves one node per `--name` (default `scratchpad`), each with its own
//! store. Prints `ready NAME MAJOR:MINOR` on stdout per node once
//! `/dev/NAME` exists;
//! SIGTERM or SIGINT removes the node and exits 0. A refused registration
//! (name in use) exits 2 with the reason on stderr.
//!
//! - `pread`/`pwrite` (and `preadv`/`pwritev`) address a sparse in-memory
//!   store by the **real** file offset (any 64-bit offset). Plain
//!   `read`/`write` have no offset under CUSE; they use the store from 0.
//!   Unwritten bytes read as zero; the device has no end.
//! - ioctls, magic `'S'` (all read or write the caller's struct directly):
//!   - `SCRATCH_TRANSFORM` `_IOWR('S', 1, struct xform)`: `value = value * 2
//!     + 1`, `text` upper-cased, flag bit 31 set.
//!   - `SCRATCH_STATS` `_IOR('S', 2, struct stats)`: requests handled so far
//!     by kind (this call included).
//!   - `SCRATCH_SLOW` `_IO('S', 3)`, arg = milliseconds: sleeps, `EINTR` as
//!     soon as the request is interrupted.
//!   - `SCRATCH_RING` `_IO('S', 4)`: makes every open file readable (poll).
//!   - `SCRATCH_ACK` `_IO('S', 5)`: this file has seen all rings.
//!   - `SCRATCH_GREET` `_IO('S', 6)`, arg = an fd of the caller: writes
//!     "hello from scratchpad\n" to it; returns the bytes written.
//!   - `SCRATCH_WHOAMI` `_IOR('S', 7, struct who { u32 tid, pid, uid, gid })`.
//!   - `SCRATCH_RELAY` `_IOWR('S', 8, struct relay { i32 fd; u32 flags;
//!     u32 major, minor; struct who who; })`: copies the caller's `fd`,
//!     checks it is a node of this daemon (`EINVAL` otherwise), issues
//!     `SCRATCH_WHOAMI` on it from inside the handler, and returns the
//!     node's device number and the answer (whose pid is the daemon's):
//!     the pattern of a daemon asking its own node who a file is.
//!   - `SCRATCH_NOP` `_IO('S', 9)`: does nothing and returns 0 (a null
//!     ioctl: `scripts/bench` times the bare round trip with it).
//!   - `SCRATCH_HOLD` `_IO('S', 10)`: blocks until the gate is opened
//!     (`SCRATCH_LETGO`), `EINTR` as soon as the request is interrupted; a
//!     slow call that ends when the test says so.
//!   - `SCRATCH_LETGO` `_IO('S', 11)`: opens the gate for good; returns the
//!     number of calls it released.
//!   - `SCRATCH_HELD` `_IOR('S', 12, struct held { u64 holding, started; })`:
//!     HOLD calls in progress now, and started so far.
//!   - `SCRATCH_PEEK` `_IOW('S', 13, struct xform)`: reads the caller's
//!     struct and writes nothing back; returns `value & 0xffff` (`EINVAL`
//!     if `argsz` is below 32). One round trip plus one `process_vm_readv`:
//!     `scripts/bench` times the floor of a map call with it.
//!
//! `struct xform { u32 argsz; u32 flags; u64 value; u8 text[16]; }` (32
//! bytes); `struct stats { u64 opens, releases, reads, writes, ioctls,
//! polls; }`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use cuse_server::{
    Device, DeviceConfig, DeviceNumber, Errno, IoctlArgs, IoctlResult, Offset, OpenFlags,
    PollHandle, Request, Server,
};
use nix::sys::signal::{SigSet, Signal};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'S' as u32) << 8) | nr
}
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const SCRATCH_TRANSFORM: u32 = ioc(IOC_READ | IOC_WRITE, 1, std::mem::size_of::<Xform>());
const SCRATCH_STATS: u32 = ioc(IOC_READ, 2, std::mem::size_of::<Stats>());
const SCRATCH_SLOW: u32 = ioc(IOC_NONE, 3, 0);
const SCRATCH_RING: u32 = ioc(IOC_NONE, 4, 0);
const SCRATCH_ACK: u32 = ioc(IOC_NONE, 5, 0);
const SCRATCH_GREET: u32 = ioc(IOC_NONE, 6, 0);
const SCRATCH_WHOAMI: u32 = ioc(IOC_READ, 7, std::mem::size_of::<Who>());
const SCRATCH_RELAY: u32 = ioc(IOC_READ | IOC_WRITE, 8, std::mem::size_of::<Relay>());
const SCRATCH_NOP: u32 = ioc(IOC_NONE, 9, 0);
const SCRATCH_HOLD: u32 = ioc(IOC_NONE, 10, 0);
const SCRATCH_LETGO: u32 = ioc(IOC_NONE, 11, 0);
const SCRATCH_HELD: u32 = ioc(IOC_READ, 12, std::mem::size_of::<Held>());
const SCRATCH_PEEK: u32 = ioc(IOC_WRITE, 13, std::mem::size_of::<Xform>());

nix::ioctl_read!(scratch_whoami, b'S', 7, Who);

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Relay {
    fd: i32,
    flags: u32,
    major: u32,
    minor: u32,
    who: Who,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Xform {
    argsz: u32,
    flags: u32,
    value: u64,
    text: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Stats {
    opens: u64,
    releases: u64,
    reads: u64,
    writes: u64,
    ioctls: u64,
    polls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Held {
    holding: u64,
    started: u64,
}

/// The gate of `SCRATCH_HOLD`.
#[derive(Default)]
struct Gate {
    open: bool,
    holding: u64,
    started: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Who {
    tid: u32,
    pid: u32,
    uid: u32,
    gid: u32,
}

const PAGE: u64 = 4096;

#[derive(Default)]
struct Counters {
    opens: AtomicU64,
    releases: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    ioctls: AtomicU64,
    polls: AtomicU64,
}

#[derive(Default)]
struct Rings {
    generation: u64,
    /// fh -> generation it has acknowledged.
    seen: HashMap<u64, u64>,
    waiters: Vec<PollHandle>,
}

#[derive(Default)]
struct Scratchpad {
    /// Device numbers of every node of this daemon.
    nodes: Arc<Mutex<Vec<DeviceNumber>>>,
    pages: Mutex<BTreeMap<u64, Box<[u8; PAGE as usize]>>>,
    counters: Counters,
    rings: Mutex<Rings>,
    next_fh: AtomicU64,
    gate: Mutex<Gate>,
}

impl Scratchpad {
    fn store(&self, pos: u64, data: &[u8]) -> Result<(), Errno> {
        pos.checked_add(data.len() as u64).ok_or(Errno::EINVAL)?;
        let mut pages = self.pages.lock().unwrap();
        let mut done = 0usize;
        while done < data.len() {
            let at = pos + done as u64;
            let (index, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - within).min(data.len() - done);
            let page = pages
                .entry(index)
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            page[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn load(&self, pos: u64, size: usize) -> Result<Vec<u8>, Errno> {
        pos.checked_add(size as u64).ok_or(Errno::EINVAL)?;
        let pages = self.pages.lock().unwrap();
        let mut out = vec![0u8; size];
        let mut done = 0usize;
        while done < size {
            let at = pos + done as u64;
            let (index, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - within).min(size - done);
            if let Some(page) = pages.get(&index) {
                out[done..done + n].copy_from_slice(&page[within..within + n]);
            }
            done += n;
        }
        Ok(out)
    }

    fn position(offset: &Offset) -> Result<u64, Errno> {
        match offset {
            Offset::At(pos) => Ok(*pos),
            Offset::Stream { within } => Ok(*within),
            Offset::Unknown { reason, .. } => {
                tracing::debug!(%reason, "transfer with unknown offset refused");
                Err(Errno::EINVAL)
            }
        }
    }

    /// `SCRATCH_HOLD`: wait for the gate, or for an interrupt.
    fn hold(&self, req: &Request) -> Result<IoctlResult, Errno> {
        {
            let mut gate = self.gate.lock().unwrap();
            gate.started += 1;
            gate.holding += 1;
        }
        let outcome = loop {
            if self.gate.lock().unwrap().open {
                break Ok(IoctlResult::value(0));
            }
            if req.wait_interrupted(Duration::from_millis(20)) {
                break Err(Errno::EINTR);
            }
        };
        self.gate.lock().unwrap().holding -= 1;
        outcome
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            opens: c.opens.load(Ordering::SeqCst),
            releases: c.releases.load(Ordering::SeqCst),
            reads: c.reads.load(Ordering::SeqCst),
            writes: c.writes.load(Ordering::SeqCst),
            ioctls: c.ioctls.load(Ordering::SeqCst),
            polls: c.polls.load(Ordering::SeqCst),
        }
    }
}

impl Device for Scratchpad {
    fn open(&self, _req: &Request, _flags: OpenFlags) -> Result<u64, Errno> {
        self.counters.opens.fetch_add(1, Ordering::SeqCst);
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rings = self.rings.lock().unwrap();
        let generation = rings.generation;
        rings.seen.insert(fh, generation);
        Ok(fh)
    }

    fn read(&self, _req: &Request, _fh: u64, size: u32, offset: Offset) -> Result<Vec<u8>, Errno> {
        self.counters.reads.fetch_add(1, Ordering::SeqCst);
        self.load(Self::position(&offset)?, size as usize)
    }

    fn write(&self, _req: &Request, _fh: u64, data: &[u8], offset: Offset) -> Result<u32, Errno> {
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        self.store(Self::position(&offset)?, data)?;
        Ok(data.len() as u32)
    }

    fn ioctl(&self, req: &Request, fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        self.counters.ioctls.fetch_add(1, Ordering::SeqCst);
        match args.cmd {
            SCRATCH_TRANSFORM => {
                let mut x: Xform = req.read_obj(args.arg)?;
                if (x.argsz as usize) < std::mem::size_of::<Xform>() {
                    return Err(Errno::EINVAL);
                }
                x.value = x.value.wrapping_mul(2).wrapping_add(1);
                x.text.make_ascii_uppercase();
                x.flags |= 1 << 31;
                req.write_obj(args.arg, &x)?;
                Ok(IoctlResult::value(0))
            }
            SCRATCH_STATS => {
                req.write_obj(args.arg, &self.stats())?;
                Ok(IoctlResult::value(0))
            }
            SCRATCH_SLOW => {
                let ms = args.arg.min(60_000);
                let step = Duration::from_millis(50);
                let mut left = Duration::from_millis(ms);
                while !left.is_zero() {
                    let now = step.min(left);
                    if req.wait_interrupted(now) {
                        tracing::info!(unique = req.unique(), "slow ioctl interrupted");
                        return Err(Errno::EINTR);
                    }
                    left -= now;
                }
                Ok(IoctlResult::value(0))
            }
            SCRATCH_RING => {
                let waiters = {
                    let mut rings = self.rings.lock().unwrap();
                    rings.generation += 1;
                    std::mem::take(&mut rings.waiters)
                };
                for w in waiters {
                    if let Err(e) = w.notify() {
                        tracing::debug!(kh = w.kh(), error = %e, "poll notify failed");
                    }
                }
                Ok(IoctlResult::value(0))
            }
            SCRATCH_ACK => {
                let mut rings = self.rings.lock().unwrap();
                let generation = rings.generation;
                rings.seen.insert(fh, generation);
                Ok(IoctlResult::value(0))
            }
            SCRATCH_GREET => {
                let fd = i32::try_from(args.arg).map_err(|_| Errno::EBADF)?;
                let file = req.get_fd(fd)?;
                let n = nix::unistd::write(&file, b"hello from scratchpad\n")?;
                Ok(IoctlResult::value(n as i32))
            }
            SCRATCH_WHOAMI => {
                let who = Who {
                    tid: req.tid(),
                    pid: req.pid()?,
                    uid: req.uid(),
                    gid: req.gid(),
                };
                req.write_obj(args.arg, &who)?;
                Ok(IoctlResult::value(0))
            }
            SCRATCH_RELAY => {
                let mut relay: Relay = req.read_obj(args.arg)?;
                let file = req.get_fd(relay.fd)?;
                let st = nix::sys::stat::fstat(&file)?;
                let dev = DeviceNumber::from_dev_t(st.st_rdev);
                let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
                if !is_char || !self.nodes.lock().unwrap().contains(&dev) {
                    return Err(Errno::EINVAL);
                }
                let mut who = Who::default();
                // SAFETY: `file` is an open fd for the duration of the call;
                // `who` is a live, writable `Who`, the size encoded in the
                // command; the result is checked.
                unsafe { scratch_whoami(file.as_raw_fd(), &mut who) }?;
                relay.major = dev.major;
                relay.minor = dev.minor;
                relay.who = who;
                req.write_obj(args.arg, &relay)?;
                Ok(IoctlResult::value(0))
            }
            SCRATCH_NOP => Ok(IoctlResult::value(0)),
            SCRATCH_HOLD => self.hold(req),
            SCRATCH_LETGO => {
                let mut gate = self.gate.lock().unwrap();
                gate.open = true;
                Ok(IoctlResult::value(gate.holding as i32))
            }
            SCRATCH_HELD => {
                let held = {
                    let gate = self.gate.lock().unwrap();
                    Held {
                        holding: gate.holding,
                        started: gate.started,
                    }
                };
                req.write_obj(args.arg, &held)?;
                Ok(IoctlResult::value(0))
            }
            SCRATCH_PEEK => {
                let x: Xform = req.read_obj(args.arg)?;
                if (x.argsz as usize) < std::mem::size_of::<Xform>() {
                    return Err(Errno::EINVAL);
                }
                Ok(IoctlResult::value((x.value & 0xffff) as i32))
            }
            _ => Err(Errno::ENOTTY),
        }
    }

    fn poll(
        &self,
        _req: &Request,
        fh: u64,
        _events: u32,
        waiter: Option<PollHandle>,
    ) -> Result<u32, Errno> {
        self.counters.polls.fetch_add(1, Ordering::SeqCst);
        let mut rings = self.rings.lock().unwrap();
        let seen = rings.seen.get(&fh).copied().unwrap_or(0);
        let mut revents = (libc::POLLOUT | libc::POLLWRNORM) as u32;
        if seen < rings.generation {
            revents |= (libc::POLLIN | libc::POLLRDNORM) as u32;
        } else if let Some(w) = waiter {
            rings.waiters.push(w);
        }
        Ok(revents)
    }

    fn release(&self, fh: u64) {
        self.counters.releases.fetch_add(1, Ordering::SeqCst);
        self.rings.lock().unwrap().seen.remove(&fh);
    }
}

#[derive(Parser)]
#[command(about = "A scratchpad character device served over CUSE")]
struct Args {
    /// Device name: the node is /dev/NAME (slashes allowed); repeat for
    /// several nodes.
    #[arg(long = "name", default_value = "scratchpad")]
    names: Vec<String>,
    /// Requests handled at once.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Requests of one client process handled at once.
    #[arg(long, default_value_t = 8)]
    workers_per_client: usize,
    /// Milliseconds a spare server thread waits for a request before it
    /// exits.
    #[arg(long, default_value_t = 2000)]
    idle_timeout_ms: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    // Block the shutdown signals in every thread (inherited by the server's
    // threads); one thread waits for them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        eprintln!("scratchpad: cannot block signals: {e}");
        std::process::exit(1);
    }

    let server = match Server::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("scratchpad: {e}");
            std::process::exit(1);
        }
    };
    let ours = Arc::new(Mutex::new(Vec::new()));
    for name in &args.names {
        let config = DeviceConfig::new(name)
            .max_workers(args.workers)
            .max_workers_per_client(args.workers_per_client)
            .idle_timeout(Duration::from_millis(args.idle_timeout_ms));
        let device = Scratchpad {
            nodes: ours.clone(),
            ..Default::default()
        };
        match server.register(config, Arc::new(device)) {
            Ok(node) => {
                ours.lock().unwrap().push(node.dev);
                println!("ready {} {}", node.name, node.dev);
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                eprintln!("scratchpad: {e}");
                std::process::exit(2);
            }
        }
    }

    let stop = server.shutdown_handle();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            tracing::info!(?sig, "shutting down");
        }
        stop.stop();
    });
    server.wait();
    tracing::info!("stopped");
}
