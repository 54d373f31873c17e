//! Session layer: registering device nodes through `/dev/cuse`, serving
//! each with its own threads (each reads requests and handles what it read),
//! and shutting down.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use slab::Slab;
use tracing::{debug, error, info, warn};

use crate::device::Device;
use crate::session::{init_reply, Channel, InitParams, Session, Work};
use crate::sys;
use crate::wire::{FuseInHeader, FuseWriteIn, FUSE_MIN_READ_BUFFER};
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
    max_idle: usize,
    cuse_path: PathBuf,
    sysfs_dir: PathBuf,
    dev_dir: PathBuf,
}

impl DeviceConfig {
    /// A node named `name` (the `DEVNAME`: `/dev/<name>`; slashes make
    /// subdirectories, e.g. `vfio/devices/dev1`), with a device number
    /// chosen by the kernel, 128 KiB transfers and up to 32 concurrent
    /// handlers.
    pub fn new(name: impl Into<String>) -> Self {
        DeviceConfig {
            name: name.into(),
            dev_major: 0,
            dev_minor: 0,
            max_read: MAX_TRANSFER,
            max_write: MAX_TRANSFER,
            max_workers: 32,
            max_idle: 4,
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

    /// How many requests of this node may be handled at once (at least 1).
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n.max(1);
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
struct FdChannel {
    fd: OwnedFd,
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

/// The request-serving threads of one node, libfuse style: every thread
/// reads `/dev/cuse` itself and handles the request it read, so a request
/// costs the kernel's two wake-ups (caller to server, server to caller) and
/// no hand-over between threads.
///
/// - Idle threads block in `read(2)`, where the kernel wakes exactly one of
///   them per request.
/// - A thread that takes a request while no other thread is waiting (or
///   about to: just started, or just done with a request) spawns one, so a
///   slow handler never stops the node from reading (other requests,
///   INTERRUPTs), and a client issuing one request after another is served
///   by the same two or three threads.
/// - At most `max_handlers` requests are handled at once; a request read
///   while all slots are taken waits in `queue` for the next free one, and
///   the thread that read it goes back to reading. So there are at most
///   `max_handlers + 1` threads, and always one reading.
/// - A thread that finishes a request leaves if `max_idle` others are
///   already waiting, so a burst's threads go away again.
/// - Shutdown sets `closed` and sends [`sys::wake_signal`] to the threads
///   blocked in `read` until all have left.
struct Workers {
    name: String,
    session: Arc<Session>,
    channel: Arc<FdChannel>,
    buffer_size: usize,
    max_handlers: usize,
    max_idle: usize,
    state: Mutex<WorkState>,
    done_cv: Condvar,
}

#[derive(Default)]
struct WorkState {
    /// Threads alive.
    threads: usize,
    /// Threads started so far.
    spawned: u64,
    /// Threads started that have not yet looked for work.
    starting: usize,
    /// The threads waiting for a request (in, or on their way into,
    /// `read`), by pthread id: the ones to signal at shutdown.
    readers: Slab<libc::pthread_t>,
    /// Requests being handled.
    busy: usize,
    /// Threads whose handler has returned and that are on their way back
    /// to `read` (or to the queue, or out): the caller may already have
    /// sent its next request, which they will pick up.
    finishing: usize,
    /// Requests read while every handler slot was taken, with their bytes.
    queue: VecDeque<(Work, Vec<u8>)>,
    /// Shutting down, or the connection is gone: threads leave.
    closed: bool,
    handles: Vec<JoinHandle<()>>,
}

/// What one `read` on `/dev/cuse` gave.
enum Received {
    /// A message of this many bytes.
    Message(usize),
    /// Nothing (interrupted, or taken by another reader): look again.
    Nothing,
    /// The connection is gone: this node stops serving.
    Gone,
}

impl Workers {
    fn lock(&self) -> MutexGuard<'_, WorkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start one more thread; the caller holds the state lock.
    fn spawn(self: &Arc<Self>, st: &mut WorkState) -> Result<(), std::io::Error> {
        st.handles.retain(|h| !h.is_finished());
        let workers = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("cuse:{}", self.name))
            .spawn(move || workers.serve())?;
        st.threads += 1;
        st.spawned += 1;
        st.starting += 1;
        st.handles.push(handle);
        debug!(node = %self.name, threads = st.threads, started = st.spawned, "server thread started");
        Ok(())
    }

    /// The loop of every thread: wait for a request, handle it, repeat.
    fn serve(self: Arc<Self>) {
        sys::unblock_wake_signal();
        let me = sys::this_thread();
        let mut buf = vec![0u8; self.buffer_size];
        let mut st = self.lock();
        st.starting -= 1;
        loop {
            if st.busy < self.max_handlers {
                if let Some((work, msg)) = st.queue.pop_front() {
                    st.busy += 1;
                    drop(st);
                    st = self.run(work, &msg);
                    continue;
                }
            }
            if st.closed || st.readers.len() >= self.max_idle {
                break;
            }
            let key = st.readers.insert(me);
            drop(st);
            let received = self.receive(&mut buf);
            st = self.lock();
            st.readers.remove(key);
            let n = match received {
                Received::Message(n) => n,
                Received::Nothing => continue,
                Received::Gone => {
                    st.closed = true;
                    break;
                }
            };
            drop(st);
            let work = self.session.accept(&buf[..n]);
            st = self.lock();
            let Some(work) = work else { continue };
            if st.busy >= self.max_handlers {
                st.queue.push_back((work, buf[..n].to_vec()));
                continue;
            }
            st.busy += 1;
            if st.readers.is_empty() && st.starting == 0 && st.finishing == 0 && !st.closed {
                if let Err(e) = self.spawn(&mut st) {
                    // This request is still answered, by this thread; the
                    // node reads again when it is done.
                    warn!(node = %self.name, error = %e, "cannot spawn a server thread");
                }
            }
            drop(st);
            st = self.run(work, &buf[..n]);
        }
        st.threads -= 1;
        self.done_cv.notify_all();
    }

    /// Handle one request counted in `busy` (the state unlocked); the state
    /// locked again afterwards.
    fn run(&self, work: Work, msg: &[u8]) -> MutexGuard<'_, WorkState> {
        self.session.run_then(work, msg, || self.handled());
        let mut st = self.lock();
        st.finishing -= 1;
        st
    }

    /// A handler returned: its thread is no longer busy, and will look for
    /// work again as soon as the reply is out.
    fn handled(&self) {
        let mut st = self.lock();
        st.busy -= 1;
        st.finishing += 1;
    }

    /// One `read` on `/dev/cuse`.
    fn receive(&self, buf: &mut [u8]) -> Received {
        let fd = self.channel.fd.as_fd();
        match sys::read(fd, buf) {
            Ok(0) => {
                self.gone("end of file on /dev/cuse");
                Received::Gone
            }
            Ok(n) => Received::Message(n),
            // The wake signal (shutdown), or the request went away before
            // we got it (ENOENT).
            Err(Errno::EINTR) | Err(Errno::ENOENT) => Received::Nothing,
            // A nonblocking fd (tests may hand one in): wait until readable.
            Err(Errno::EAGAIN) => match sys::poll_in(&[fd], -1) {
                Ok(_) => Received::Nothing,
                Err(e) => {
                    self.gone(&format!("poll on /dev/cuse failed: {e}"));
                    Received::Gone
                }
            },
            Err(Errno::ENODEV) => {
                self.gone("CUSE connection aborted");
                Received::Gone
            }
            Err(e) => {
                self.gone(&format!("read on /dev/cuse failed: {e}"));
                Received::Gone
            }
        }
    }

    /// Log, once per node, why it stops serving.
    fn gone(&self, why: &str) {
        let first = !self.lock().closed;
        if first {
            warn!(node = %self.name, "{why}; node stops serving");
        }
    }

    /// Make every thread leave once it has nothing left to do.
    fn close(&self) {
        self.lock().closed = true;
    }

    /// Wait until every thread left or `deadline` passed; true if all did.
    /// Requests still in flight are marked interrupted, and the threads
    /// blocked in `read` are woken, until then.
    fn wait_exit(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        loop {
            if st.threads == 0 {
                for h in st.handles.drain(..) {
                    let _ = h.join();
                }
                return true;
            }
            self.session.interrupt_all();
            for (_, &thread) in st.readers.iter() {
                sys::wake(thread);
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // A signal sent just before its thread entered read() is lost;
            // the next round sends it again.
            let pause = (deadline - now).min(Duration::from_millis(5));
            st = match self.done_cv.wait_timeout(st, pause) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
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
        self.serve(
            info,
            channel,
            config.read_buffer_size(),
            device,
            config.max_workers,
            config.max_idle,
        )
    }

    /// Serve an initialised connection with its first thread.
    fn serve(
        &self,
        info: NodeInfo,
        channel: Arc<FdChannel>,
        buffer_size: usize,
        device: Arc<dyn Device>,
        max_handlers: usize,
        max_idle: usize,
    ) -> Result<NodeInfo, Error> {
        let session = Arc::new(Session::new(device, channel.clone()));
        let workers = Arc::new(Workers {
            name: info.name.clone(),
            session,
            channel,
            buffer_size,
            max_handlers,
            max_idle,
            state: Mutex::new(WorkState::default()),
            done_cv: Condvar::new(),
        });
        workers.spawn(&mut workers.lock()).map_err(|e| Error::Io {
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

    use crate::{IoctlArgs, IoctlResult, Request};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    /// A node served over one end of a SEQPACKET socket pair; the test
    /// plays the kernel on the other end.
    fn fake_node(server: &Server, device: Arc<dyn Device>, workers: usize) -> OwnedFd {
        fake_node_idle(server, device, workers, 4)
    }

    fn fake_node_idle(
        server: &Server,
        device: Arc<dyn Device>,
        workers: usize,
        max_idle: usize,
    ) -> OwnedFd {
        let (ours, kernel) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let info = NodeInfo {
            name: "fake".into(),
            dev: DeviceNumber { major: 0, minor: 0 },
            path: PathBuf::from("/nonexistent/fake"),
            sysfs: PathBuf::from("/nonexistent/sysfs/fake"),
        };
        let channel = Arc::new(FdChannel { fd: ours });
        server
            .serve(info, channel, 1 << 17, device, workers, max_idle)
            .unwrap();
        kernel
    }

    fn ioctl_request(unique: u64, cmd: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(72u32.to_le_bytes());
        m.extend(39u32.to_le_bytes()); // FUSE_IOCTL
        m.extend(unique.to_le_bytes());
        m.extend([0u8; 8 + 4 + 4 + 4 + 4]); // nodeid uid gid pid extlen+pad
        m.extend(1u64.to_le_bytes()); // fh
        m.extend(2u32.to_le_bytes()); // flags: UNRESTRICTED
        m.extend(cmd.to_le_bytes());
        m.extend([0u8; 16]); // arg, in_size, out_size
        m
    }

    fn interrupt_request(unique: u64, target: u64) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(48u32.to_le_bytes());
        m.extend(36u32.to_le_bytes()); // FUSE_INTERRUPT
        m.extend(unique.to_le_bytes());
        m.extend([0u8; 24]);
        m.extend(target.to_le_bytes());
        m
    }

    /// The next message from the server: (unique, error, ioctl result), or
    /// None at end of file or after `timeout`.
    fn recv(kernel: &OwnedFd, timeout: Duration) -> Option<(u64, i32, Option<i32>)> {
        let ms = timeout.as_millis() as i32;
        let ready = sys::poll_in(&[kernel.as_fd()], ms).unwrap();
        if !ready[0].readable && !ready[0].error {
            return None;
        }
        let mut buf = [0u8; 256];
        let n = nix::unistd::read(kernel, &mut buf).unwrap();
        if n == 0 {
            return None;
        }
        let error = i32::from_le_bytes(buf[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        let result = (n >= 20).then(|| i32::from_le_bytes(buf[16..20].try_into().unwrap()));
        Some((unique, error, result))
    }

    fn send(kernel: &OwnedFd, msg: &[u8]) {
        assert_eq!(nix::unistd::write(kernel, msg).unwrap(), msg.len());
    }

    /// cmd 1: waits (up to 20 s) until interrupted, then EINTR; cmd 2:
    /// answers 7 at once; cmd 3: sleeps 1.5 s ignoring interrupts.
    struct Waiter;
    impl Device for Waiter {
        fn ioctl(&self, req: &Request, _fh: u64, a: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
            match a.cmd {
                1 => {
                    if req.wait_interrupted(Duration::from_secs(20)) {
                        Err(Errno::EINTR)
                    } else {
                        Ok(IoctlResult::value(1))
                    }
                }
                2 => Ok(IoctlResult::value(7)),
                3 => {
                    std::thread::sleep(Duration::from_millis(1500));
                    Ok(IoctlResult::value(3))
                }
                _ => Err(Errno::ENOTTY),
            }
        }
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn served_concurrently_interrupted_and_stopped_over_a_real_fd() {
        let server = Server::new().unwrap();
        let kernel = fake_node(&server, Arc::new(Waiter), 4);
        // A slow request does not hold up a fast one.
        send(&kernel, &ioctl_request(2, 1));
        send(&kernel, &ioctl_request(4, 2));
        assert_eq!(recv(&kernel, T), Some((4, 0, Some(7))));
        // INTERRUPT for the slow one: it answers EINTR; the interrupt itself
        // gets no answer.
        send(&kernel, &interrupt_request(3, 2));
        assert_eq!(recv(&kernel, T), Some((2, -libc::EINTR, None)));
        assert_eq!(recv(&kernel, Duration::from_millis(200)), None);
        // An INTERRUPT for an unknown request: EAGAIN (kernel requeues).
        send(&kernel, &interrupt_request(9, 8));
        assert_eq!(recv(&kernel, T), Some((9, -libc::EAGAIN, None)));
        // Stop with a request in flight: it is interrupted and answered,
        // then the fd is closed (end of file for the "kernel").
        send(&kernel, &ioctl_request(6, 1));
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        server.stop();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(recv(&kernel, T), Some((6, -libc::EINTR, None)));
        assert_eq!(recv(&kernel, T), None);
        let mut b = [0u8; 8];
        assert_eq!(
            nix::unistd::read(&kernel, &mut b),
            Ok(0),
            "server end closed"
        );
    }

    #[test]
    fn a_handler_that_ignores_interrupts_does_not_hang_shutdown() {
        let mut server = Server::new().unwrap();
        server.set_shutdown_grace(Duration::from_millis(100));
        let kernel = fake_node(&server, Arc::new(Waiter), 2);
        send(&kernel, &ioctl_request(2, 3));
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        server.stop();
        // Two grace periods (wait, then abort and wait), not the handler's
        // 1.5 s.
        assert!(
            t0.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t0.elapsed()
        );
        // The handler still answers when it is done, and the fd then closes.
        assert_eq!(recv(&kernel, T), Some((2, 0, Some(3))));
        assert_eq!(recv(&kernel, T), None);
    }

    #[test]
    fn the_pool_grows_to_its_limit_and_no_further() {
        let server = Server::new().unwrap();
        let kernel = fake_node(&server, Arc::new(Waiter), 2);
        // Two slow requests take both workers; a fast one must wait.
        send(&kernel, &ioctl_request(2, 1));
        send(&kernel, &ioctl_request(4, 1));
        send(&kernel, &ioctl_request(6, 2));
        assert_eq!(recv(&kernel, Duration::from_millis(300)), None);
        send(&kernel, &interrupt_request(3, 2));
        let mut got = vec![recv(&kernel, T), recv(&kernel, T)];
        got.sort();
        assert_eq!(
            got,
            vec![Some((2, -libc::EINTR, None)), Some((6, 0, Some(7)))]
        );
        server.stop();
        assert_eq!(recv(&kernel, T), Some((4, -libc::EINTR, None)));
    }

    #[test]
    fn threads_of_a_burst_exit_down_to_the_idle_limit() {
        let server = Server::new().unwrap();
        let kernel = fake_node_idle(&server, Arc::new(Waiter), 4, 2);
        let threads = |s: &Server| s.lock_nodes()[0].workers.lock().threads;
        for u in [2, 4, 6] {
            send(&kernel, &ioctl_request(u, 1));
        }
        let deadline = Instant::now() + T;
        while threads(&server) < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            threads(&server),
            4,
            "one thread per request being handled, and one reading"
        );
        for (i, u) in [2u64, 4, 6].iter().enumerate() {
            send(&kernel, &interrupt_request(11 + 2 * i as u64, *u));
        }
        for _ in 0..3 {
            assert_eq!(recv(&kernel, T).map(|r| r.1), Some(-libc::EINTR));
        }
        let deadline = Instant::now() + T;
        while threads(&server) > 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(threads(&server), 2);
        // The remaining threads still serve, and new ones are spawned again.
        send(&kernel, &ioctl_request(20, 2));
        assert_eq!(recv(&kernel, T), Some((20, 0, Some(7))));
        send(&kernel, &ioctl_request(22, 1));
        send(&kernel, &ioctl_request(24, 1));
        send(&kernel, &ioctl_request(26, 2));
        assert_eq!(recv(&kernel, T), Some((26, 0, Some(7))));
        server.stop();
    }

    #[test]
    fn one_request_after_another_reuses_the_same_threads() {
        let server = Server::new().unwrap();
        let kernel = fake_node(&server, Arc::new(Waiter), 8);
        for u in 0..200u64 {
            send(&kernel, &ioctl_request(2 * u + 2, 2));
            assert_eq!(recv(&kernel, T), Some((2 * u + 2, 0, Some(7))));
        }
        let spawned = server.lock_nodes()[0].workers.lock().spawned;
        // The first thread starts a second when it takes the first request
        // (nobody else would be reading). A thread that has just answered
        // may not be reading again when the next request comes, so a third
        // may start; then one handles, one is on its way back and one
        // reads, and no thread is ever started again.
        assert!(
            spawned <= 3,
            "{spawned} threads started for 200 sequential requests"
        );
        server.stop();
    }

    #[test]
    fn the_reader_stops_at_end_of_file() {
        let server = Server::new().unwrap();
        let kernel = fake_node(&server, Arc::new(Waiter), 2);
        drop(kernel);
        // stop() must not hang on a reader that already left.
        let t0 = Instant::now();
        server.stop();
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
