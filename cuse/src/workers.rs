//! The request-serving threads of one node, libfuse style: every thread
//! reads `/dev/cuse` itself and handles the request it read, so a request
//! costs the kernel's two wake-ups (caller to server, server to caller) and
//! no hand-over between threads.
//!
//! - Idle threads block in `read(2)`, where the kernel wakes exactly one of
//!   them per request.
//! - A thread that takes a request while no other thread is waiting (or
//!   about to: just started, or just done with a request) spawns one, so a
//!   slow handler never stops the node from reading (other requests,
//!   INTERRUPTs), and a client issuing one request after another is served
//!   by the same two or three threads.
//! - Handler slots are budgeted per client ([`crate::slots`]): a client at
//!   its budget waits for its own slots, others do not notice. A request
//!   that must wait is kept with its bytes, and the thread that read it goes
//!   back to reading; a thread whose handler returns starts the next
//!   request that may run. An INTERRUPT for a waiting request answers it
//!   `EINTR` at once.
//! - RELEASE never waits: it runs at once on the thread that read it (its
//!   caller is in `close(2)` and cannot be interrupted, and a client killed
//!   while others hog the node must still be able to exit). INTERRUPT is
//!   answered by the reader itself. So is an ioctl the device calls quick
//!   (`Device::ioctl_is_quick`): it needs no state another call holds.
//! - A thread that finishes a request leaves if `max_idle` others are
//!   already waiting, and a thread that waited `idle_timeout` for a request
//!   while [`MIN_IDLE`] others waited too leaves then (a per-thread timer
//!   wakes it), so a burst's threads go away again and an idle node keeps
//!   two. A thread that still has business of its own (it traces a
//!   process, say: see [`DeviceConfig::keep_thread_while`](crate::DeviceConfig::keep_thread_while))
//!   stays.
//! - Shutdown sets `closed`, answers the waiting requests `EINTR`, and sends
//!   [`sys::wake_signal`] to the threads blocked in `read` until all have
//!   left.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use slab::Slab;
use tracing::{debug, warn};

use crate::server::FdChannel;
use crate::session::{Session, Work};
use crate::slots::{Admission, Budget, Client, Slots};
use crate::sys;

/// Threads of an idle node: one blocked in `read`, and one more so that a
/// client issuing one request after another does not make a thread per
/// request.
pub(crate) const MIN_IDLE: usize = 2;

/// How a node's threads behave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolConfig {
    /// Bytes of one `read` buffer.
    pub buffer_size: usize,
    /// Handler slots.
    pub budget: Budget,
    /// Most threads waiting for requests at once.
    pub max_idle: usize,
    /// How long a thread beyond [`MIN_IDLE`] waits for a request before it
    /// leaves.
    pub idle_timeout: Duration,
    /// Asked before a thread leaves for being idle: true keeps it.
    pub keep_thread: Option<fn() -> bool>,
}

/// Counts of one node's threads and requests, from [`Server::stats`](crate::Server::stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Server threads of the node alive now.
    pub threads: usize,
    /// Threads started so far.
    pub spawned: u64,
    /// Requests being handled (RELEASEs included).
    pub running: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    /// Requests refused because their client had too many waiting.
    pub refused: u64,
}

pub(crate) struct Workers {
    pub(crate) name: String,
    pub(crate) session: Arc<Session>,
    channel: Arc<FdChannel>,
    config: PoolConfig,
    state: Mutex<WorkState>,
    done_cv: Condvar,
}

/// A request waiting for a slot, with its bytes.
type Waiting = (Work, Vec<u8>);

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
    /// Handler slots: requests running and waiting.
    slots: Slots<Waiting>,
    /// Requests being handled that take no slot: RELEASEs and quick ioctls
    /// ([`Session::is_slotless`]).
    slotless: usize,
    /// Threads whose handler has returned and that are on their way back
    /// to `read` (or to the next request, or out): the caller may already
    /// have sent its next request, which they will pick up.
    finishing: usize,
    /// Requests refused because their client had too many waiting, and
    /// when that was last logged.
    refused: u64,
    refusal_logged: Option<Instant>,
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

/// Which slot a running request holds.
#[derive(Clone, Copy)]
enum Held {
    /// A handler slot, by the request's unique id.
    Slot(u64),
    /// None: a RELEASE or a quick ioctl.
    Slotless,
}

impl Workers {
    /// The pool of a node whose connection is `channel`; no thread yet
    /// ([`Workers::spawn`] starts the first).
    pub(crate) fn new(
        name: String,
        session: Arc<Session>,
        channel: Arc<FdChannel>,
        config: PoolConfig,
    ) -> Self {
        Workers {
            name,
            session,
            channel,
            config,
            state: Mutex::new(WorkState {
                threads: 0,
                spawned: 0,
                starting: 0,
                readers: Slab::new(),
                slots: Slots::new(config.budget),
                slotless: 0,
                finishing: 0,
                refused: 0,
                refusal_logged: None,
                closed: false,
                handles: Vec::new(),
            }),
            done_cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WorkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            threads: st.threads,
            spawned: st.spawned,
            running: st.slots.running() + st.slotless,
            waiting: st.slots.waiting(),
            refused: st.refused,
        }
    }

    /// Start the first thread.
    pub(crate) fn start(self: &Arc<Self>) -> Result<(), std::io::Error> {
        let mut st = self.lock();
        self.spawn(&mut st)
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

    /// Start a thread if nobody would otherwise read the next request.
    fn keep_reading(self: &Arc<Self>, st: &mut WorkState) {
        if st.readers.is_empty() && st.starting == 0 && st.finishing == 0 && !st.closed {
            if let Err(e) = self.spawn(st) {
                // The request in hand is still answered, by this thread;
                // the node reads again when it is done.
                warn!(node = %self.name, error = %e, "cannot spawn a server thread");
            }
        }
    }

    /// The loop of every thread: wait for a request, handle it, repeat.
    fn serve(self: Arc<Self>) {
        sys::unblock_wake_signal();
        let me = sys::this_thread();
        let timer = match sys::WakeTimer::for_this_thread() {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(node = %self.name, error = %e, "no idle timer: this thread stays until shutdown");
                None
            }
        };
        let mut buf = vec![0u8; self.config.buffer_size];
        let mut st = self.lock();
        st.starting -= 1;
        loop {
            if st.closed && st.slots.waiting() > 0 {
                let left = st.slots.take_waiting(|_| true);
                drop(st);
                self.refuse_all(left, Errno::EINTR);
                st = self.lock();
            }
            if let Some((unique, (work, msg))) = st.slots.next() {
                // Another may be able to start too (a freed slot of the
                // total and one of its client): let a new thread look.
                if st.slots.any_ready() && st.starting == 0 {
                    let _ = self.spawn(&mut st);
                }
                drop(st);
                st = self.run(Held::Slot(unique), work, &msg);
                continue;
            }
            if st.closed {
                break;
            }
            // Asked before every wait: cheap, and a thread that took on
            // business of its own during its last request is woken at every
            // idle timeout to look after it, even when it is one of the
            // threads an idle node keeps anyway.
            let holding = self.must_stay();
            if st.readers.len() >= self.config.max_idle && !holding {
                break;
            }
            // A thread beyond the idle minimum leaves if no request comes
            // within the idle timeout.
            let spare = timer
                .as_ref()
                .filter(|_| holding || st.readers.len() >= MIN_IDLE);
            let key = st.readers.insert(me);
            drop(st);
            // The clock only for a thread that may leave: reading it is a
            // system call where the clock source has no vDSO path (an
            // emulated HPET), and every request would pay it.
            let since = spare.map(|_| Instant::now());
            if let Some(t) = spare {
                if let Err(e) = t.arm(self.config.idle_timeout) {
                    debug!(node = %self.name, error = %e, "cannot arm the idle timer");
                }
            }
            let received = self.receive(&mut buf);
            if let Some(t) = spare {
                let _ = t.disarm();
            }
            st = self.lock();
            st.readers.remove(key);
            let n = match received {
                Received::Message(n) => n,
                Received::Nothing => {
                    let idle = since.is_some_and(|t| t.elapsed() >= self.config.idle_timeout);
                    if idle && !st.closed && st.readers.len() >= MIN_IDLE && !self.must_stay() {
                        debug!(node = %self.name, threads = st.threads - 1, "idle server thread leaves");
                        break;
                    }
                    continue;
                }
                Received::Gone => {
                    st.closed = true;
                    break;
                }
            };
            drop(st);
            st = self.take(&buf[..n]);
        }
        st.threads -= 1;
        self.done_cv.notify_all();
    }

    /// Whether this thread must not leave although idle
    /// ([`PoolConfig::keep_thread`]).
    fn must_stay(&self) -> bool {
        self.config.keep_thread.is_some_and(|keep| keep())
    }

    /// Deal with one message read from `/dev/cuse`: answer it, run it, or
    /// keep it waiting. The state locked again afterwards.
    fn take(self: &Arc<Self>, msg: &[u8]) -> MutexGuard<'_, WorkState> {
        let Some(work) = self.session.accept(msg) else {
            // Perhaps an INTERRUPT for a waiting request: answer it now.
            let mut st = self.lock();
            if st.slots.waiting() > 0 {
                let hit = st.slots.take_waiting(|(w, _)| w.interrupted());
                if !hit.is_empty() {
                    drop(st);
                    self.refuse_all(hit, Errno::EINTR);
                    st = self.lock();
                }
            }
            return st;
        };
        if self.session.is_slotless(&work) {
            let mut st = self.lock();
            st.slotless += 1;
            self.keep_reading(&mut st);
            drop(st);
            return self.run(Held::Slotless, work, msg);
        }
        let (unique, tid) = (work.unique(), work.tid());
        let mut st = self.lock();
        if st.slots.start_unnamed(unique, tid) {
            self.keep_reading(&mut st);
            drop(st);
            return self.run(Held::Slot(unique), work, msg);
        }
        // Budgets matter now: name this caller's process and those of the
        // running requests not named yet (outside the lock: /proc reads).
        drop(st);
        let client = self.client_of(tid);
        st = self.lock();
        for _ in 0..3 {
            let unnamed = st.slots.unnamed();
            if unnamed.is_empty() {
                break;
            }
            drop(st);
            let named: Vec<(u64, Client)> = unnamed
                .into_iter()
                .map(|(u, t)| (u, self.client_of(t)))
                .collect();
            st = self.lock();
            for (u, c) in named {
                st.slots.name(u, c);
            }
        }
        if work.interrupted() {
            drop(st);
            self.session.refuse(work, Errno::EINTR);
            return self.lock();
        }
        match st.slots.admit(unique, tid, client) {
            Admission::Run => {
                self.keep_reading(&mut st);
                drop(st);
                self.run(Held::Slot(unique), work, msg)
            }
            Admission::Wait => {
                debug!(node = %self.name, unique, ?client, "request waits for a handler slot of its client");
                st.slots.wait(unique, tid, client, (work, msg.to_vec()));
                st
            }
            Admission::Refuse => {
                st.refused += 1;
                let log = match st.refusal_logged {
                    Some(t) => t.elapsed() >= Duration::from_secs(10),
                    None => true,
                };
                if log {
                    st.refusal_logged = Some(Instant::now());
                    warn!(
                        node = %self.name,
                        ?client,
                        refused_so_far = st.refused,
                        "a client has too many requests waiting for its handler slots; \
                         answering EAGAIN (make fewer calls at once on this device)"
                    );
                }
                drop(st);
                self.session.refuse(work, Errno::EAGAIN);
                self.lock()
            }
        }
    }

    /// The client a calling thread belongs to.
    fn client_of(&self, tid: u32) -> Client {
        match self.session.caller_process(tid) {
            Ok(pid) => Client::Process(pid),
            Err(_) => Client::Thread(tid),
        }
    }

    fn refuse_all(&self, waiting: Vec<Waiting>, errno: Errno) {
        for (work, _) in waiting {
            debug!(node = %self.name, unique = work.unique(), %errno, "waiting request answered without running");
            self.session.refuse(work, errno);
        }
    }

    /// Handle one request holding `held` (the state unlocked); the state
    /// locked again afterwards.
    fn run(&self, held: Held, work: Work, msg: &[u8]) -> MutexGuard<'_, WorkState> {
        // Once the handler has returned the slot is free and the thread
        // counts as about to read again: the caller may issue its next
        // request before this thread is back in `read`.
        self.session.run_then(work, msg, || {
            let mut st = self.lock();
            match held {
                Held::Slot(unique) => st.slots.finish(unique),
                Held::Slotless => st.slotless -= 1,
            }
            st.finishing += 1;
        });
        let mut st = self.lock();
        st.finishing -= 1;
        st
    }

    /// One `read` on `/dev/cuse`.
    fn receive(&self, buf: &mut [u8]) -> Received {
        let fd = std::os::fd::AsFd::as_fd(&self.channel.fd);
        match sys::read(fd, buf) {
            Ok(0) => {
                self.gone("end of file on /dev/cuse");
                Received::Gone
            }
            Ok(n) => Received::Message(n),
            // The wake signal (idle timer or shutdown), or the request went
            // away before we got it (ENOENT).
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
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }

    /// Wait until every thread left or `deadline` passed; true if all did.
    /// Requests still in flight are marked interrupted, and the threads
    /// blocked in `read` are woken, until then.
    pub(crate) fn wait_exit(&self, deadline: Instant) -> bool {
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
