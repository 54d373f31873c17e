//! Session layer: registering device nodes through `/dev/cuse`, serving
//! each with its own threads (each reads requests and handles what it read),
//! and shutting down.

use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tracing::{error, info, warn};

use crate::device::Device;
use crate::session::{init_reply, Channel, InitParams, Session};
use crate::slots::Budget;
use crate::sys;
use crate::wire::{FuseInHeader, FuseWriteIn, FUSE_MIN_READ_BUFFER};
use crate::workers::{PoolConfig, PoolStats, Workers};
use crate::Error;

/// Largest transfer per READ/WRITE request the kernel allows (32 pages).
pub const MAX_TRANSFER: u32 = 128 * 1024;

/// How to register one device node.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    name: String,
    dev_major: u32,
    dev_minor: u32,
    max_read: u32,
    max_write: u32,
    max_workers: usize,
    max_workers_per_client: usize,
    max_idle: usize,
    idle_timeout: Duration,
    keep_thread: Option<fn() -> bool>,
    cuse_path: PathBuf,
    sysfs_dir: PathBuf,
    dev_dir: PathBuf,
}

impl DeviceConfig {
    /// A node named `name` (the `DEVNAME`: `/dev/<name>`; slashes make
    /// subdirectories, e.g. `vfio/devices/dev1`), with a device number
    /// chosen by the kernel, 128 KiB transfers, and up to 32 concurrent
    /// handlers, 8 of them for one client process.
    pub fn new(name: impl Into<String>) -> Self {
        DeviceConfig {
            name: name.into(),
            dev_major: 0,
            dev_minor: 0,
            max_read: MAX_TRANSFER,
            max_write: MAX_TRANSFER,
            max_workers: 32,
            max_workers_per_client: 8,
            max_idle: 4,
            idle_timeout: Duration::from_secs(2),
            keep_thread: None,
            cuse_path: PathBuf::from("/dev/cuse"),
            sysfs_dir: PathBuf::from("/sys/class/cuse"),
            dev_dir: PathBuf::from("/dev"),
        }
    }

    /// Ask for a fixed device number (`major` 0 lets the kernel choose; a
    /// taken number makes [`Server::register`] fail).
    pub fn device_number(mut self, major: u32, minor: u32) -> Self {
        self.dev_major = major;
        self.dev_minor = minor;
        self
    }

    /// Largest READ and WRITE request (at least 4096; the kernel caps the
    /// size of one request at 128 KiB anyway).
    pub fn max_transfer(mut self, max_read: u32, max_write: u32) -> Self {
        self.max_read = max_read.max(4096);
        self.max_write = max_write.max(4096);
        self
    }

    /// How many requests of this node may be handled at once by all
    /// clients together (at least 1, default 32). A client process with no
    /// request running may still start one when all are taken, up to twice
    /// this many: a process making one call at a time never waits for the
    /// calls of others.
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n.max(1);
        self
    }

    /// How many requests of one client process may be handled at once (at
    /// least 1, at most [`DeviceConfig::max_workers`], default 8). Its
    /// further requests wait for one of its own slots, in order, and are
    /// answered `EINTR` if interrupted meanwhile; other clients do not
    /// notice. More than 64 waiting requests of one client are answered
    /// `EAGAIN`. See the crate documentation, "Fairness".
    pub fn max_workers_per_client(mut self, n: usize) -> Self {
        self.max_workers_per_client = n.max(1);
        self
    }

    /// How many threads may wait for requests at once (at least 2, default
    /// 4); a thread that finishes a request while this many others wait
    /// exits, so the threads of a burst go away again. Two keep a client
    /// that issues one request after another from making a thread per
    /// request.
    pub fn max_idle_workers(mut self, n: usize) -> Self {
        self.max_idle = n.max(2);
        self
    }

    /// How long a waiting thread beyond the two an idle node keeps waits
    /// for a request before it exits (default 2 s, at least 1 ms): after a
    /// burst the node returns to two threads.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Ask `keep` on a server thread before it leaves for being idle
    /// (after a burst, or after [`DeviceConfig::idle_timeout`]): a thread
    /// for which it answers true stays, until the node closes, and is woken
    /// at every idle timeout to ask again, even when it is one of the
    /// threads an idle node keeps anyway. It runs on the thread in
    /// question, which may use the moment to finish its own business. For
    /// state that belongs to the thread: a thread that traces a process
    /// (`ptrace`) detaches it when it exits, and one that was tracing with
    /// `PTRACE_O_EXITKILL` kills it.
    pub fn keep_thread_while(mut self, keep: fn() -> bool) -> Self {
        self.keep_thread = Some(keep);
        self
    }

    fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            buffer_size: self.read_buffer_size(),
            budget: Budget::new(self.max_workers, self.max_workers_per_client),
            max_idle: self.max_idle,
            idle_timeout: self.idle_timeout,
            keep_thread: self.keep_thread,
        }
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = self.name.is_empty()
            || self.name.starts_with('/')
            || self.name.ends_with('/')
            || self.name.contains('\0')
            || self.name.contains("//")
            || self.name.split('/').any(|c| c == "." || c == "..")
            || self
                .name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            || self.name.len() > 1024;
        if bad {
            return Err(Error::InvalidName(self.name.clone()));
        }
        Ok(())
    }

    /// sysfs replaces '/' in device names by '!'.
    fn sysfs_name(&self) -> String {
        self.name.replace('/', "!")
    }

    fn read_buffer_size(&self) -> usize {
        let need = std::mem::size_of::<FuseInHeader>()
            + std::mem::size_of::<FuseWriteIn>()
            + self.max_write as usize;
        need.max(FUSE_MIN_READ_BUFFER) + 4096
    }
}

/// A device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceNumber {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DeviceNumber {
    /// As a `dev_t` (compare with `st_rdev` of a file).
    pub fn dev_t(self) -> libc::dev_t {
        libc::makedev(self.major, self.minor)
    }

    /// From a `dev_t` (e.g. `st_rdev`).
    pub fn from_dev_t(dev: libc::dev_t) -> Self {
        DeviceNumber {
            major: libc::major(dev),
            minor: libc::minor(dev),
        }
    }
}

impl std::fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// A registered, serving device node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The `DEVNAME`.
    pub name: String,
    /// Its device number: a file whose `st_rdev` equals it is this node.
    pub dev: DeviceNumber,
    /// `/dev/<name>`.
    pub path: PathBuf,
    /// `/sys/class/cuse/<name with '/' as '!'>`.
    pub sysfs: PathBuf,
}

/// The `/dev/cuse` fd of one node as a reply channel.
pub(crate) struct FdChannel {
    pub(crate) fd: OwnedFd,
}

impl Channel for FdChannel {
    fn send(&self, parts: &[IoSlice<'_>]) -> Result<(), Errno> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        loop {
            match sys::writev(self.fd.as_fd(), parts) {
                Ok(n) if n == total => return Ok(()),
                // /dev/cuse takes a message whole or not at all.
                Ok(_) => return Err(Errno::EIO),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

struct Node {
    info: NodeInfo,
    workers: Arc<Workers>,
}

struct Shared {
    stop: Mutex<bool>,
    stop_cv: Condvar,
    torn_down: AtomicBool,
}

impl Shared {
    fn request_stop(&self) {
        let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        *stop = true;
        self.stop_cv.notify_all();
    }

    fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Asks a [`Server`] to stop; cheap to clone, callable from any thread
/// (e.g. one that waits for SIGTERM with `sigwait`). Not async-signal-safe:
/// do not call it from a signal handler.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").finish_non_exhaustive()
    }
}

impl ShutdownHandle {
    /// Request the shutdown: [`Server::wait`] returns
    /// after tearing everything down.
    pub fn stop(&self) {
        self.0.request_stop();
    }
}

/// Serves any number of CUSE device nodes from this process.
///
/// Each node has its own `/dev/cuse` fd and its own threads, each of which
/// reads a request and handles it (one hand-over less than a reader thread
/// feeding workers). A blocked handler of one node never stops another
/// node, and a slow handler never stops other requests of its node (up to
/// [`DeviceConfig::max_workers`] at once): whenever a thread takes a
/// request and no other is waiting, it starts one.
///
/// At shutdown the threads blocked in `read(2)` are woken by a signal,
/// `SIGRTMIN + 5`, whose handler (installed by [`Server::new`]) does
/// nothing; a program using this crate must not use that signal otherwise.
pub struct Server {
    shared: Arc<Shared>,
    nodes: Mutex<Vec<Node>>,
    grace: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// A server with no nodes yet.
    pub fn new() -> Result<Self, Error> {
        sys::install_wake_handler().map_err(|errno| Error::Io {
            what: "install the SIGRTMIN+5 handler",
            errno,
        })?;
        Ok(Server {
            shared: Arc::new(Shared {
                stop: Mutex::new(false),
                stop_cv: Condvar::new(),
                torn_down: AtomicBool::new(false),
            }),
            nodes: Mutex::new(Vec::new()),
            grace: Duration::from_secs(2),
        })
    }

    /// How long shutdown waits for running handlers (which see their
    /// requests interrupted) before aborting their connections (default 2 s).
    pub fn set_shutdown_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// A handle that stops this server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// Register a node and start serving it. Returns once the kernel has
    /// created the device (so `/dev/<name>` can be opened at once), or an
    /// error if it refused (e.g. [`Error::Refused`] for a name or device
    /// number already in use).
    pub fn register(
        &self,
        config: DeviceConfig,
        device: Arc<dyn Device>,
    ) -> Result<NodeInfo, Error> {
        config.validate()?;
        if self.shared.stopping() {
            return Err(Error::Stopped);
        }
        let fd = sys::open_cuse(&config.cuse_path).map_err(|errno| Error::Open {
            path: config.cuse_path.clone(),
            errno,
        })?;
        let mut buf = vec![0u8; config.read_buffer_size()];
        let n = read_one(&fd, &mut buf, Duration::from_secs(5))?;
        let reply = init_reply(
            &buf[..n],
            &InitParams {
                name: &config.name,
                dev_major: config.dev_major,
                dev_minor: config.dev_minor,
                max_read: config.max_read,
                max_write: config.max_write,
            },
        )?;
        let channel = Arc::new(FdChannel { fd });
        channel
            .send(&[IoSlice::new(&reply)])
            .map_err(|errno| Error::Io {
                what: "write CUSE_INIT reply",
                errno,
            })?;
        // The kernel handles the reply inside our write(): by now the device
        // exists, or the connection was aborted (poll reports an error and
        // the next read would fail with ENODEV).
        let ready = sys::poll_in(&[channel.fd.as_fd()], 0).map_err(|errno| Error::Io {
            what: "poll /dev/cuse",
            errno,
        })?;
        if ready[0].error {
            return Err(Error::Refused {
                name: config.name.clone(),
            });
        }
        let info = node_info(&config)?;
        info!(name = %info.name, dev = %info.dev, "CUSE device registered");
        self.serve(info, channel, device, config.pool_config())
    }

    /// Serve an initialised connection with its first thread.
    fn serve(
        &self,
        info: NodeInfo,
        channel: Arc<FdChannel>,
        device: Arc<dyn Device>,
        pool: PoolConfig,
    ) -> Result<NodeInfo, Error> {
        let session = Arc::new(Session::new(device, channel.clone()));
        let workers = Arc::new(Workers::new(info.name.clone(), session, channel, pool));
        workers.start().map_err(|e| Error::Io {
            what: "spawn a server thread",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
        })?;
        let node = Node {
            info: info.clone(),
            workers,
        };
        {
            let mut nodes = self.lock_nodes();
            if !self.shared.torn_down.load(Ordering::SeqCst) {
                nodes.push(node);
                return Ok(info);
            }
        }
        // The server stopped while this node was being registered.
        shutdown_nodes(vec![node], self.grace);
        Err(Error::Stopped)
    }

    fn lock_nodes(&self) -> MutexGuard<'_, Vec<Node>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The nodes registered so far.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.lock_nodes().iter().map(|n| n.info.clone()).collect()
    }

    /// Threads and requests of every node now, by node name.
    pub fn stats(&self) -> Vec<(String, PoolStats)> {
        self.lock_nodes()
            .iter()
            .map(|n| (n.info.name.clone(), n.workers.stats()))
            .collect()
    }

    /// Block until a [`ShutdownHandle::stop`] (or [`Server::stop`]), then
    /// tear everything down as [`Server::stop`] does.
    pub fn wait(&self) {
        let mut stop = self.shared.stop.lock().unwrap_or_else(|e| e.into_inner());
        while !*stop {
            stop = self
                .shared
                .stop_cv
                .wait(stop)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(stop);
        self.teardown();
    }

    /// Stop serving and remove every node. Readers stop reading; requests
    /// being handled are marked interrupted and get up to the grace period
    /// to answer; a node whose handlers are done is closed at once (its
    /// node disappears; its clients' further operations fail with
    /// `ENOTCONN`/`ENODEV`); a node still busy after the grace period has
    /// its connection aborted (clients waiting get `ECONNABORTED`).
    /// Idempotent.
    pub fn stop(&self) {
        self.shared.request_stop();
        self.teardown();
    }

    fn teardown(&self) {
        let nodes = {
            let mut nodes = self.lock_nodes();
            if self.shared.torn_down.swap(true, Ordering::SeqCst) {
                return;
            }
            std::mem::take(&mut *nodes)
        };
        shutdown_nodes(nodes, self.grace);
    }
}

/// Stop serving `nodes` (their readers have been told to stop) and close
/// them, waiting at most `grace` for running handlers before aborting.
fn shutdown_nodes(mut nodes: Vec<Node>, grace: Duration) {
    for node in &nodes {
        node.workers.close();
    }
    // Close idle nodes first: a handler of one node may be waiting for
    // another node (e.g. an ioctl on the daemon's own device), which
    // closing that node ends.
    let deadline = Instant::now() + grace;
    let mut busy = Vec::new();
    while let Some(node) = nodes.pop() {
        // Long enough for idle threads to see the wake signal and leave.
        if node
            .workers
            .wait_exit(Instant::now() + Duration::from_millis(5))
        {
            close_node(node);
        } else {
            busy.push(node);
        }
        if nodes.is_empty() && !busy.is_empty() && Instant::now() < deadline {
            nodes = std::mem::take(&mut busy);
        }
    }
    for node in busy {
        warn!(
            node = %node.info.name,
            in_flight = node.workers.session.in_flight(),
            "handlers still running after the shutdown grace period; aborting the connection"
        );
        if let Err(e) = std::fs::write(node.info.sysfs.join("abort"), "1") {
            warn!(node = %node.info.name, error = %e, "cannot abort the connection");
        }
        if node.workers.wait_exit(Instant::now() + grace) {
            close_node(node);
        } else {
            error!(
                node = %node.info.name,
                "handlers never returned; leaving their threads behind"
            );
        }
    }
}

fn close_node(node: Node) {
    let name = node.info.name.clone();
    drop(node);
    info!(name = %name, "CUSE device removed");
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Read one message, waiting at most `timeout` (the fd is blocking: read
/// only once poll says there is something).
fn read_one(fd: &OwnedFd, buf: &mut [u8], timeout: Duration) -> Result<usize, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Protocol(
                "no CUSE_INIT request from the kernel".into(),
            ));
        }
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        let ready = sys::poll_in(&[fd.as_fd()], ms).map_err(|errno| Error::Io {
            what: "poll /dev/cuse",
            errno,
        })?;
        if !ready[0].readable && !ready[0].error {
            continue;
        }
        match sys::read(fd.as_fd(), buf) {
            Ok(n) => return Ok(n),
            Err(Errno::EAGAIN) | Err(Errno::EINTR) | Err(Errno::ENOENT) => {}
            Err(errno) => {
                return Err(Error::Io {
                    what: "read CUSE_INIT",
                    errno,
                })
            }
        }
    }
}

/// Find the node's device number: sysfs first (bounded wait), then the
/// node itself.
fn node_info(config: &DeviceConfig) -> Result<NodeInfo, Error> {
    let sysfs = config.sysfs_dir.join(config.sysfs_name());
    let path = config.dev_dir.join(&config.name);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(text) = std::fs::read_to_string(sysfs.join("dev")) {
            if let Some(dev) = parse_dev(&text) {
                check_node(&path, dev);
                return Ok(NodeInfo {
                    name: config.name.clone(),
                    dev,
                    path,
                    sysfs,
                });
            }
        }
        if let Ok(meta) = std::fs::metadata(&path) {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            if meta.file_type().is_char_device() {
                return Ok(NodeInfo {
                    name: config.name.clone(),
                    dev: DeviceNumber::from_dev_t(meta.rdev()),
                    path,
                    sysfs,
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::NotCreated {
                name: config.name.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Warn if `/dev/<name>` is not the character device the kernel registered
/// (devtmpfs creates it synchronously; without devtmpfs, or with a name
/// clashing with an existing file, it may be missing).
fn check_node(path: &Path, dev: DeviceNumber) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_char_device() && DeviceNumber::from_dev_t(m.rdev()) == dev => {}
        Ok(_) => warn!(path = %path.display(), %dev, "node exists but is not this device"),
        Err(e) => {
            warn!(path = %path.display(), %dev, error = %e, "device registered but its node is missing")
        }
    }
}

/// Parse sysfs `dev` text: "MAJOR:MINOR\n".
fn parse_dev(text: &str) -> Option<DeviceNumber> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(DeviceNumber {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for good in ["ioasid", "vfio/devices/dev1", "scratch-1_a.b"] {
            assert!(DeviceConfig::new(good).validate().is_ok(), "{good}");
        }
        for bad in [
            "", "/abs", "trail/", "a//b", "a/../b", ".", "sp ace", "nul\0", "tab\t",
        ] {
            assert!(
                matches!(
                    DeviceConfig::new(bad).validate(),
                    Err(Error::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sysfs_name_and_buffer_size() {
        let c = DeviceConfig::new("vfio/devices/dev3");
        assert_eq!(c.sysfs_name(), "vfio!devices!dev3");
        // The kernel refuses reads into buffers smaller than
        // header + fuse_write_in + max_write.
        assert!(c.read_buffer_size() >= 40 + 40 + 128 * 1024);
        let small = DeviceConfig::new("x").max_transfer(1, 1);
        assert!(small.read_buffer_size() >= FUSE_MIN_READ_BUFFER);
    }

    #[test]
    fn dev_text_parses() {
        assert_eq!(
            parse_dev("234:0\n"),
            Some(DeviceNumber {
                major: 234,
                minor: 0
            })
        );
        assert_eq!(parse_dev("garbage"), None);
        assert_eq!(parse_dev("1:x"), None);
        let d = DeviceNumber {
            major: 511,
            minor: 70000,
        };
        assert_eq!(DeviceNumber::from_dev_t(d.dev_t()), d);
        assert_eq!(d.to_string(), "511:70000");
    }

    #[test]
    fn register_without_dev_cuse_is_a_clear_error() {
        let server = Server::new().unwrap();
        let mut config = DeviceConfig::new("nothing-here");
        config.cuse_path = PathBuf::from("/nonexistent/cuse");
        match server.register(config, Arc::new(Nop)) {
            Err(Error::Open { errno, .. }) => assert_eq!(errno, Errno::ENOENT),
            other => panic!("{other:?}"),
        }
        server.stop();
        assert!(matches!(
            server.register(DeviceConfig::new("late"), Arc::new(Nop)),
            Err(Error::Stopped)
        ));
    }

    #[test]
    fn wait_returns_after_stop_from_another_thread() {
        let server = Server::new().unwrap();
        let handle = server.shutdown_handle();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            handle.stop();
        });
        server.wait();
        t.join().unwrap();
    }

    struct Nop;
    impl Device for Nop {}
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod pool_tests;
