//! Unmapping the daemon mappings the alias cache lets go of on a thread of
//! their own, so that a client's request never waits for a `munmap`.
//!
//! Once the idle cache is full, every release that makes a mapping idle
//! evicts the oldest one; a mapping too large to stay idle goes at once.
//! Unmapping it (tearing down its page tables, flushing the TLBs of the
//! daemon's threads) was paid by the client whose release triggered it,
//! before its reply. Here it is handed to a thread started on first use,
//! which runs at the lowest normal priority (nice 19): woken on the CPU of
//! the request that fed it, it does not preempt that request before its
//! reply is written, and it still gets its share of the CPU when the
//! machine is busy.
//!
//! When that thread cannot be started, or more than [`MAX_BACKLOG`]
//! mappings already wait for it, a mapping is unmapped on the caller's
//! thread as before: the backlog never holds more client files alive than
//! that.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crate::sys::SharedMapping;

/// At most this many mappings wait for the unmapping thread; more are
/// unmapped by the caller.
pub(crate) const MAX_BACKLOG: usize = 1024;

enum Job {
    Unmap(Vec<SharedMapping>),
    /// Answer once everything sent before is unmapped.
    Settle(mpsc::SyncSender<()>),
    /// Run on the thread (tests hold it up with this).
    #[cfg(test)]
    Run(Box<dyn FnOnce() + Send>),
}

struct Worker {
    jobs: Sender<Job>,
    thread: JoinHandle<()>,
}

/// The unmapping thread of one [`ClientMemory`](crate::ClientMemory).
#[derive(Default)]
pub(crate) struct Unmapper {
    /// Started on first use; `None` if it could not be.
    worker: OnceLock<Option<Worker>>,
    /// Mappings handed over and not yet unmapped.
    backlog: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Unmapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unmapper")
            .field("started", &self.worker.get().is_some_and(|w| w.is_some()))
            .field("backlog", &self.backlog.load(Ordering::Relaxed))
            .finish()
    }
}

impl Unmapper {
    fn jobs(&self) -> Option<&Sender<Job>> {
        self.worker
            .get_or_init(|| {
                let (jobs, queue) = mpsc::channel();
                let backlog = Arc::clone(&self.backlog);
                match std::thread::Builder::new()
                    .name("alias-unmap".into())
                    .spawn(move || run(queue, &backlog))
                {
                    Ok(thread) => Some(Worker { jobs, thread }),
                    Err(e) => {
                        tracing::warn!(
                            "cannot start the thread that unmaps released aliases ({e}); \
                             they are unmapped by the request that releases them"
                        );
                        None
                    }
                }
            })
            .as_ref()
            .map(|w| &w.jobs)
    }

    /// Unmap `doomed`, off this thread if possible.
    pub(crate) fn unmap(&self, doomed: Vec<SharedMapping>) {
        let n = doomed.len();
        if n == 0 || self.backlog.load(Ordering::Relaxed) + n > MAX_BACKLOG {
            return drop(doomed);
        }
        let Some(jobs) = self.jobs() else {
            return drop(doomed);
        };
        self.backlog.fetch_add(n, Ordering::Relaxed);
        if let Err(mpsc::SendError(job)) = jobs.send(Job::Unmap(doomed)) {
            self.backlog.fetch_sub(n, Ordering::Relaxed);
            drop(job);
        }
    }

    /// Wait until every mapping handed over so far is unmapped.
    pub(crate) fn settle(&self) {
        let Some(Some(worker)) = self.worker.get() else {
            return; // never started: nothing was handed over
        };
        let (done, wait) = mpsc::sync_channel(1);
        if worker.jobs.send(Job::Settle(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Run `f` on the unmapping thread.
    #[cfg(test)]
    pub(crate) fn run_there(&self, f: impl FnOnce() + Send + 'static) {
        let jobs = self.jobs().expect("the thread started");
        jobs.send(Job::Run(Box::new(f))).unwrap();
    }
}

impl Drop for Unmapper {
    fn drop(&mut self) {
        if let Some(Some(Worker { jobs, thread })) = self.worker.take() {
            drop(jobs); // the thread unmaps what is left and ends
            if thread.join().is_err() {
                tracing::error!("the thread that unmaps released aliases panicked");
            }
        }
    }
}

fn run(queue: Receiver<Job>, backlog: &AtomicUsize) {
    if let Err(errno) = crate::sys::lower_own_priority() {
        tracing::debug!(%errno, "cannot lower the priority of the alias-unmap thread");
    }
    for job in queue {
        match job {
            Job::Unmap(doomed) => {
                let n = doomed.len();
                drop(doomed);
                backlog.fetch_sub(n, Ordering::Relaxed);
            }
            Job::Settle(done) => {
                let _ = done.send(());
            }
            #[cfg(test)]
            Job::Run(f) => f(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    const PAGE: usize = 4096;

    fn mapping() -> (File, SharedMapping) {
        let fd =
            nix::sys::memfd::memfd_create("unmapper-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let file = File::from(fd);
        file.set_len(PAGE as u64).unwrap();
        let map = SharedMapping::new(file.as_fd(), PAGE, true, true, 0).unwrap();
        (file, map)
    }

    /// Whether this process maps a page of `file` at `addr`.
    fn mapped(addr: usize, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ino = file.metadata().unwrap().ino();
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        crate::maps::parse_maps(&text)
            .unwrap()
            .iter()
            .any(|v| v.start == addr as u64 && v.inode == ino)
    }

    /// Hold the thread up until the returned sender is used or dropped.
    fn hold(u: &Unmapper) -> mpsc::Sender<()> {
        let (go, wait) = mpsc::channel::<()>();
        u.run_there(move || {
            let _ = wait.recv();
        });
        go
    }

    #[test]
    fn mappings_are_unmapped_by_the_thread_not_the_caller() {
        let u = Unmapper::default();
        let go = hold(&u);
        let (file, m) = mapping();
        let addr = m.addr();
        let caller = std::thread::current().id();
        u.unmap(vec![m]);
        // The thread is held up: the caller returned with the page mapped.
        assert!(mapped(addr, &file));
        assert_eq!(u.backlog.load(Ordering::Relaxed), 1);
        let (tx, rx) = mpsc::channel();
        u.run_there(move || tx.send(std::thread::current().id()).unwrap());
        drop(go);
        u.settle();
        assert!(!mapped(addr, &file));
        assert_eq!(u.backlog.load(Ordering::Relaxed), 0);
        assert_ne!(rx.recv().unwrap(), caller);
    }

    #[test]
    fn past_the_backlog_the_caller_unmaps() {
        let u = Unmapper::default();
        let go = hold(&u);
        // The files are closed as they are made (their mappings keep them),
        // but the first.
        let (first, m0) = mapping();
        let first_addr = m0.addr();
        let mut maps = vec![m0];
        maps.extend((1..MAX_BACKLOG).map(|_| mapping().1));
        u.unmap(maps);
        let (file, m) = mapping();
        let addr = m.addr();
        u.unmap(vec![m]);
        assert!(
            !mapped(addr, &file),
            "unmapped at once, the backlog being full"
        );
        assert!(mapped(first_addr, &first));
        drop(go);
        u.settle();
        assert!(!mapped(first_addr, &first));
    }

    #[test]
    fn drop_waits_for_everything_handed_over() {
        let u = Unmapper::default();
        let go = hold(&u);
        let (file, m) = mapping();
        let addr = m.addr();
        u.unmap(vec![m]);
        drop(go);
        drop(u);
        assert!(!mapped(addr, &file));
    }
}
