//! Proof daemon for pinning a client's private memory (issue 14): a CUSE
//! node whose "map my buffer at IOVA x" ioctl makes the calling thread
//! itself issue `VFIO_IOMMU_MAP_DMA` (crate `syscall-inject`,
//! `vfio_legacy::client_map`) on a container holding one `edu` device's
//! group, and whose "DMA" ioctl drives that edu through the daemon's own
//! device fd. Run as root in the test VM; the scenarios are
//! `tests/scenarios/test_private_memory.py`, the client `tests/c/private_dma.c`.
//!
//! Usage: `inject_dma [--bdf BDF] [--name NAME] [--hold-fifo PATH]
//! [--timeout-ms N] [--allow-seccomp]`
//!
//! Ioctls (structs in the caller's memory, `tests/c/private_map.h`):
//!
//! - `INJ_MAP` `{iova, vaddr, size, flags}`: mapped by the caller's own
//!   thread, read and write. The result is the kernel's. Flag 1 (`HOLD`,
//!   only with `--hold-fifo`): after the map, keep the caller stopped until
//!   a byte is written to the FIFO (for kill tests).
//! - `INJ_UNMAP` `{iova, size}`: unmapped by the daemon (type1 unpins from
//!   any holder of the container).
//! - `INJ_DMA` `{src, dst, len}`: edu copies `len` bytes from IOVA `src` to
//!   IOVA `dst` through its buffer.
//!
//! Everything a file mapped is unmapped at its release, so a killed client
//! leaves no pinned memory behind. This example serves one client at a
//! time: all clients share the one container.

#[path = "../tests/support/edu.rs"]
mod edu;

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cuse_server::{Device, DeviceConfig, Errno, IoctlArgs, IoctlResult, Request, Server};
use ioasid_engine::backend::Prot;
use syscall_inject::{Options, Seized};
use tracing::{info, warn};
use vfio_legacy::client_map::{map_dma_as_client, ClientAddr, ClientDmaMap, ClientFd};
use vfio_legacy::{Sysfs, VfioLegacy};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

#[derive(Parser, Debug)]
struct Args {
    /// The edu device (default: the first one bound to vfio-pci).
    #[arg(long)]
    bdf: Option<String>,
    /// The CUSE device name.
    #[arg(long, default_value = "inject-dma")]
    name: String,
    /// A FIFO that releases a map made with the HOLD flag.
    #[arg(long)]
    hold_fifo: Option<PathBuf>,
    /// The bound of one injection, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Inject into clients that run under a seccomp filter.
    #[arg(long)]
    allow_seccomp: bool,
}

const fn iow(nr: u32, size: usize) -> u32 {
    (1 << 30) | ((size as u32) << 16) | ((b'J' as u32) << 8) | nr
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct InjMap {
    iova: u64,
    vaddr: u64,
    size: u64,
    flags: u32,
    pad: u32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct InjUnmap {
    iova: u64,
    size: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct InjDma {
    src: u64,
    dst: u64,
    len: u32,
    pad: u32,
}

const INJ_MAP: u32 = iow(1, std::mem::size_of::<InjMap>());
const INJ_UNMAP: u32 = iow(2, std::mem::size_of::<InjUnmap>());
const INJ_DMA: u32 = iow(3, std::mem::size_of::<InjDma>());
const HOLD: u32 = 1;

/// Per open file: where the container sits in its process, what it mapped.
#[derive(Default)]
struct OpenFile {
    container_in_client: Option<ClientFd>,
    mappings: Vec<(u64, u64)>,
}

struct InjectDma {
    vfio: VfioLegacy,
    group: u32,
    edu: edu::Edu,
    files: Mutex<HashMap<u64, OpenFile>>,
    next_fh: Mutex<u64>,
    options: Options,
    hold_fifo: Option<PathBuf>,
}

impl InjectDma {
    fn map(self: &Arc<Self>, req: &Request, fh: u64, m: InjMap) -> Result<(), Errno> {
        if m.flags & !HOLD != 0 || (m.flags & HOLD != 0 && self.hold_fifo.is_none()) {
            return Err(Errno::EINVAL);
        }
        // Seize last: nothing after it may fail before the reply.
        req.expect_interrupt();
        let seized = Seized::seize(req.tid() as i32, self.options.clone()).map_err(|e| {
            warn!("INJ_MAP refused: {e}");
            e.errno()
        })?;
        let me = self.clone();
        req.after_reply(move || me.map_as_client(seized, fh, m));
        // A placeholder: the real result replaces it in the caller's rax.
        Err(Errno::EFAULT)
    }

    /// Runs right after the placeholder reply: the caller traps on its way
    /// out of the ioctl.
    fn map_as_client(&self, seized: Seized, fh: u64, m: InjMap) {
        let mut stopped = match seized.wait_stop(libc::SYS_ioctl) {
            Ok(s) => s,
            Err(e) => {
                warn!("INJ_MAP: {e}");
                return;
            }
        };
        let known = self.files().get(&fh).and_then(|f| f.container_in_client);
        let container = match self.vfio.container_fd(self.group) {
            Ok(c) => c,
            Err(e) => {
                warn!("INJ_MAP: {e}");
                let _ = stopped.finish(-(e.errno as i64));
                return;
            }
        };
        let map = ClientDmaMap {
            iova: m.iova,
            vaddr: ClientAddr(m.vaddr),
            size: m.size,
            prot: Prot {
                read: true,
                write: true,
            },
        };
        let result = match map_dma_as_client(&mut stopped, container.as_fd(), known, &map) {
            Ok(at) => {
                let mut files = self.files();
                let f = files.entry(fh).or_default();
                f.container_in_client = Some(at);
                f.mappings.push((m.iova, m.size));
                info!(
                    pid = at.pid,
                    fd = at.fd,
                    iova = m.iova,
                    size = m.size,
                    "mapped by the client"
                );
                0
            }
            Err(e) => {
                warn!("INJ_MAP: {e}");
                -(e.errno as i64)
            }
        };
        if m.flags & HOLD != 0 {
            self.hold(stopped.tid());
        }
        if let Err(e) = stopped.finish(result) {
            warn!("INJ_MAP: {e}");
        }
    }

    /// Keep the caller stopped until a byte arrives on the hold FIFO
    /// (bounded by the FIFO's writer: the test).
    fn hold(&self, tid: i32) {
        let Some(path) = &self.hold_fifo else { return };
        info!(
            tid,
            "holding the caller stopped until {} is written",
            path.display()
        );
        match std::fs::File::open(path) {
            Ok(mut f) => {
                let mut b = [0u8; 1];
                let _ = f.read(&mut b);
            }
            Err(e) => warn!("hold FIFO {}: {e}", path.display()),
        }
        info!(tid, "released");
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenFile>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Node(Arc<InjectDma>);

impl Device for Node {
    fn open(&self, _req: &Request, _flags: cuse_server::OpenFlags) -> Result<u64, Errno> {
        let mut next = self.0.next_fh.lock().unwrap_or_else(|e| e.into_inner());
        *next += 1;
        self.0.files().insert(*next, OpenFile::default());
        Ok(*next)
    }

    fn ioctl(&self, req: &Request, fh: u64, a: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        let d = &self.0;
        match a.cmd {
            INJ_MAP => {
                let m: InjMap = req.read_obj(a.arg)?;
                d.map(req, fh, m).map(|()| IoctlResult::value(0))
            }
            INJ_UNMAP => {
                let u: InjUnmap = req.read_obj(a.arg)?;
                let n = d.vfio.unmap_dma(d.group, u.iova, u.size).map_err(|e| {
                    warn!("INJ_UNMAP: {e}");
                    e.errno
                })?;
                if let Some(f) = d.files().get_mut(&fh) {
                    f.mappings
                        .retain(|&(iova, _)| iova < u.iova || iova >= u.iova + u.size);
                }
                Ok(IoctlResult::value(i32::from(n > 0)))
            }
            INJ_DMA => {
                let x: InjDma = req.read_obj(a.arg)?;
                d.edu.copy(x.src, x.dst, x.len).map_err(|e| {
                    warn!("INJ_DMA: {e:#}");
                    Errno::EIO
                })?;
                Ok(IoctlResult::value(0))
            }
            _ => Err(Errno::ENOTTY),
        }
    }

    fn release(&self, fh: u64) {
        let d = &self.0;
        let gone = d.files().remove(&fh).unwrap_or_default();
        for (iova, size) in gone.mappings {
            match d.vfio.unmap_dma(d.group, iova, size) {
                Ok(n) => info!(iova, size, unmapped = n, "unmapped at release"),
                Err(e) => warn!("unmap at release: {e}"),
            }
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let sysfs = Sysfs::default();
    let devs = match &args.bdf {
        Some(b) => sysfs.devices(&[b])?,
        None => sysfs.discover()?,
    };
    let Some(dev) = devs
        .into_iter()
        .find(|d| d.vendor == edu::EDU_VENDOR && d.device == edu::EDU_DEVICE)
    else {
        bail!("no edu device (1234:11e8) bound to vfio-pci");
    };
    let vfio = VfioLegacy::new(&[dev.group])?;
    let edu = edu::Edu::open(&vfio, &dev)?;
    let state = Arc::new(InjectDma {
        group: dev.group,
        edu,
        vfio,
        files: Mutex::new(HashMap::new()),
        next_fh: Mutex::new(0),
        options: Options {
            timeout: Duration::from_millis(args.timeout_ms),
            allow_seccomp_filter: args.allow_seccomp,
        },
        hold_fifo: args.hold_fifo,
    });
    // SIGTERM/SIGINT end the daemon: blocked in every thread (inherited),
    // taken by one.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block()?;
    let server = Server::new()?;
    let node = server
        .register(DeviceConfig::new(args.name), Arc::new(Node(state)))
        .context("registering the CUSE node")?;
    info!(path = %node.path.display(), bdf = %dev.bdf, group = dev.group, "serving");
    println!("ready {}", node.path.display());
    let stop = server.shutdown_handle();
    std::thread::spawn(move || {
        let _ = signals.wait();
        stop.stop();
    });
    server.wait();
    Ok(())
}
