//! Caller access: who sent a request, and reaching into the caller's
//! memory and file descriptor table.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::sys;

/// Whether an INTERRUPT has arrived for one request; shared between the
/// thread that reads requests and the handler's thread.
#[derive(Debug, Default)]
pub(crate) struct InterruptFlag {
    set: Mutex<bool>,
    cv: Condvar,
    /// The server itself makes the caller see a signal (see
    /// [`Request::expect_interrupt`]): an INTERRUPT is then no cancel.
    provoked: AtomicBool,
}

impl InterruptFlag {
    pub(crate) fn provoked(&self) -> bool {
        self.provoked.load(Ordering::SeqCst)
    }

    pub(crate) fn raise(&self) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        *set = true;
        self.cv.notify_all();
    }

    pub(crate) fn is_raised(&self) -> bool {
        *self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait up to `timeout`; true if raised.
    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        while !*set {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            set = match self.cv.wait_timeout(set, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// One request's caller and context, handed to every [`Device`](crate::Device)
/// method except `release`.
///
/// `fuse_in_header.pid` is the calling **thread**; [`Request::pid`] finds its
/// process. Memory and fd access go to that process; they work only while the
/// caller is blocked in its system call, i.e. while the request is being
/// handled.
#[derive(Debug)]
pub struct Request {
    unique: u64,
    tid: u32,
    uid: u32,
    gid: u32,
    tgid: OnceLock<Result<u32, Errno>>,
    interrupt: Arc<InterruptFlag>,
    proc_root: Arc<Path>,
    after_reply: AfterReply,
    reply_instead: Mutex<Option<Errno>>,
}

/// Work a handler leaves to run once its reply is written.
type Continuation = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct AfterReply(Mutex<Option<Continuation>>);

impl std::fmt::Debug for AfterReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.lock().map(|c| c.is_some()).unwrap_or(false);
        f.write_str(if set { "Some(..)" } else { "None" })
    }
}

impl Request {
    pub(crate) fn new(
        unique: u64,
        tid: u32,
        uid: u32,
        gid: u32,
        interrupt: Arc<InterruptFlag>,
        proc_root: Arc<Path>,
    ) -> Self {
        Request {
            unique,
            tid,
            uid,
            gid,
            tgid: OnceLock::new(),
            interrupt,
            proc_root,
            after_reply: AfterReply::default(),
            reply_instead: Mutex::new(None),
        }
    }

    /// A request from thread `tid` that did not come from the kernel: for
    /// unit tests of [`Device`](crate::Device) implementations (use your own
    /// thread id to exercise memory and fd access on yourself) and tools.
    /// Its unique id is 0 and it is never interrupted.
    pub fn for_caller(tid: u32, uid: u32, gid: u32) -> Self {
        Request::new(
            0,
            tid,
            uid,
            gid,
            Arc::new(InterruptFlag::default()),
            Arc::from(Path::new("/proc")),
        )
    }

    /// The kernel's unique id of this request.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// The calling thread's id (`fuse_in_header.pid`), in the server's pid
    /// namespace.
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// The caller's effective user id.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The caller's effective group id.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The calling process's id (the thread group id, `Tgid:` of
    /// `/proc/<tid>/status`), looked up once on first use. `ESRCH` if the
    /// caller is gone.
    pub fn pid(&self) -> Result<u32, Errno> {
        *self.tgid.get_or_init(|| tgid_of(&self.proc_root, self.tid))
    }

    /// Whether an INTERRUPT for this request has arrived (the caller got a
    /// signal). A handler that abandons the request should answer `EINTR`.
    pub fn interrupted(&self) -> bool {
        self.interrupt.is_raised()
    }

    /// Sleep up to `timeout`, waking early when the request is interrupted;
    /// returns true if interrupted.
    pub fn wait_interrupted(&self, timeout: Duration) -> bool {
        self.interrupt.wait(timeout)
    }

    /// Run `work` on this thread right after the reply to this request has
    /// been written (whatever the reply: a value or an error), before the
    /// thread takes another request. The caller's system call has returned
    /// by then, or is returning. This is for work that needs the caller out
    /// of its call but still within reach, such as making it issue a system
    /// call itself (see `syscall-inject`). A later call replaces an earlier
    /// one. The work must be bounded in time (the thread serves nothing
    /// else meanwhile); a panic in it is caught and logged.
    pub fn after_reply(&self, work: impl FnOnce() + Send + 'static) {
        let mut slot = self.after_reply.0.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(Box::new(work));
    }

    /// Answer this request with `errno`, whatever the handler returns: the
    /// caller's provisional answer when work left by
    /// [`Request::after_reply`] is to set the real one (the return value
    /// of the caller's system call, through `syscall-inject`). Should that
    /// work never reach the caller (it died, or did not stop in time), the
    /// caller sees this errno. Outputs the handler wrote into the caller's
    /// memory stay written.
    pub fn reply_instead(&self, errno: Errno) {
        *self.reply_instead.lock().unwrap_or_else(|e| e.into_inner()) = Some(errno);
    }

    pub(crate) fn take_reply_instead(&self) -> Option<Errno> {
        self.reply_instead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub(crate) fn take_after_reply(&self) -> Option<Continuation> {
        self.after_reply
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Declare that the server itself is about to make the caller see a
    /// signal (`PTRACE_INTERRUPT` of the calling thread, which makes FUSE
    /// send an INTERRUPT for this request). From now on an INTERRUPT for
    /// this request is not a cancel: [`Request::interrupted`] stays false
    /// and the request is answered normally.
    ///
    /// The kernel sends at most one INTERRUPT per request, so a real signal
    /// arriving meanwhile is folded into it; that costs nothing, because the
    /// caller waits killably from then on and its signal stays pending,
    /// delivered once the call returns.
    pub fn expect_interrupt(&self) {
        self.interrupt.provoked.store(true, Ordering::SeqCst);
    }

    /// Copy `buf.len()` bytes from the caller's address `addr`.
    ///
    /// Errors: `EFAULT` for a bad address or a short copy, `ESRCH` if the
    /// caller is gone, `EPERM` if the server may not access it.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if buf.is_empty() {
            return Ok(());
        }
        let n = sys::process_vm_read(self.tid, addr, buf)?;
        if n != buf.len() {
            return Err(Errno::EFAULT);
        }
        Ok(())
    }

    /// Copy `data` to the caller's address `addr`. Errors as for
    /// [`Request::read_mem`].
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        if data.is_empty() {
            return Ok(());
        }
        let n = sys::process_vm_write(self.tid, addr, data)?;
        if n != data.len() {
            return Err(Errno::EFAULT);
        }
        Ok(())
    }

    /// Read a `T` from the caller's address `addr` (typically an ioctl
    /// argument): one system call, no extra round trip to the kernel.
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, addr: u64) -> Result<T, Errno> {
        let mut value = T::new_zeroed();
        self.read_mem(addr, value.as_mut_bytes())?;
        Ok(value)
    }

    /// Write `value` to the caller's address `addr`.
    pub fn write_obj<T: IntoBytes + Immutable>(&self, addr: u64, value: &T) -> Result<(), Errno> {
        self.write_mem(addr, value.as_bytes())
    }

    /// A duplicate of file descriptor `fd` of the calling process
    /// (`pidfd_open` + `pidfd_getfd`, Linux 5.6+, needs ptrace access to the
    /// caller). `EBADF` if `fd` is not open in the caller (or negative),
    /// `ESRCH` if the caller is gone.
    pub fn get_fd(&self, fd: i32) -> Result<OwnedFd, Errno> {
        if fd < 0 {
            return Err(Errno::EBADF);
        }
        let pidfd = sys::pidfd_open(self.pid()?)?;
        sys::pidfd_getfd(pidfd.as_fd(), fd)
    }
}

/// The process of thread `tid`: `Tgid:` of `<proc_root>/<tid>/status`.
/// Under the real `/proc`, a thread that leads its process (most callers:
/// single-threaded clients, a program's main thread) is found with two
/// system calls instead: `pidfd_open` without `PIDFD_THREAD` accepts
/// exactly the thread-group leaders (`EINVAL` for other threads, on every
/// kernel), and `tid` cannot be reused while its request is in progress.
pub(crate) fn tgid_of(proc_root: &Path, tid: u32) -> Result<u32, Errno> {
    if proc_root == Path::new("/proc") && sys::pidfd_open(tid).is_ok() {
        return Ok(tid);
    }
    let text = std::fs::read_to_string(proc_root.join(tid.to_string()).join("status"))
        .map_err(|_| Errno::ESRCH)?;
    text.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or(Errno::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    fn me() -> Request {
        Request::for_caller(nix::unistd::gettid().as_raw() as u32, 0, 0)
    }

    #[derive(
        Debug, Default, Clone, Copy, PartialEq, FromBytes, IntoBytes, Immutable, KnownLayout,
    )]
    #[repr(C)]
    struct Pair {
        a: u32,
        b: u32,
        c: u64,
    }

    #[test]
    fn pid_of_a_thread_is_its_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let req = me();
            tx.send((req.tid(), req.pid())).unwrap();
        })
        .join()
        .unwrap();
        let (tid, pid) = rx.recv().unwrap();
        assert_ne!(tid, std::process::id());
        assert_eq!(pid, Ok(std::process::id()));
        // The leading thread, found without /proc.
        let leader = std::process::id();
        assert_eq!(Request::for_caller(leader, 0, 0).pid(), Ok(leader));
        assert_eq!(
            Request::for_caller(0x7fff_fff0, 0, 0).pid(),
            Err(Errno::ESRCH)
        );
    }

    #[test]
    fn read_and_write_own_memory() {
        let req = me();
        let src = Pair {
            a: 1,
            b: 2,
            c: 0x1122_3344_5566_7788,
        };
        let got: Pair = req.read_obj(&src as *const Pair as u64).unwrap();
        assert_eq!(got, src);
        let mut dst = Pair::default();
        req.write_obj(&mut dst as *mut Pair as u64, &Pair { a: 9, b: 8, c: 7 })
            .unwrap();
        // Read through a volatile pointer: the compiler does not know the
        // kernel wrote here.
        // SAFETY: `dst` is a live, aligned local.
        let seen = unsafe { std::ptr::read_volatile(&dst) };
        assert_eq!(seen, Pair { a: 9, b: 8, c: 7 });
    }

    #[test]
    fn bad_addresses_are_efault() {
        let req = me();
        let mut buf = [0u8; 8];
        assert_eq!(req.read_mem(0, &mut buf), Err(Errno::EFAULT));
        assert_eq!(req.write_mem(8, &buf), Err(Errno::EFAULT));
        // A range running off the end of a mapping is a short copy: EFAULT.
        let page = 4096; // x86_64
        let map = unsafe_free_guarded_page(page);
        let mut two = [0u8; 16];
        assert_eq!(
            req.read_mem(map + page as u64 - 8, &mut two),
            Err(Errno::EFAULT)
        );
        // Empty transfers never fail.
        assert_eq!(req.read_mem(0, &mut []), Ok(()));
    }

    /// Address of a readable page followed by an inaccessible one.
    fn unsafe_free_guarded_page(page: usize) -> u64 {
        use nix::sys::mman::{mmap_anonymous, mprotect, MapFlags, ProtFlags};
        use std::num::NonZeroUsize;
        let len = NonZeroUsize::new(2 * page).unwrap();
        // SAFETY: a fresh anonymous mapping aliases nothing of ours; it is
        // leaked on purpose (the test process ends soon).
        let p = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .unwrap();
        // SAFETY: the second page of a mapping we just made and never use.
        let second = unsafe { p.byte_add(page) };
        // SAFETY: changing protection of memory we own and do not reference.
        unsafe { mprotect(second, page, ProtFlags::PROT_NONE) }.unwrap();
        p.as_ptr() as u64
    }

    #[test]
    fn memory_and_fds_of_a_child_process() {
        let mut pattern: Box<[u8; 32]> = Box::new(*b"child memory pattern 0123456789!");
        let addr = pattern.as_mut_ptr() as u64;
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only calls pause(2) (async-signal-safe) until
        // it is killed; it touches no lock or allocator.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => loop {
                nix::unistd::pause();
            },
            nix::unistd::ForkResult::Parent { child } => child,
        };
        let req = Request::for_caller(child.as_raw() as u32, 0, 0);
        assert_eq!(req.pid(), Ok(child.as_raw() as u32));
        // The child's copy of the pattern.
        let mut buf = [0u8; 32];
        req.read_mem(addr, &mut buf).unwrap();
        assert_eq!(&buf, b"child memory pattern 0123456789!");
        // Writing changes the child's copy, not ours.
        req.write_mem(addr, b"CHILD").unwrap();
        req.read_mem(addr, &mut buf).unwrap();
        assert_eq!(&buf[..8], b"CHILD me");
        pattern[0] = pattern[0].wrapping_add(0); // keep ours alive and unchanged
        assert_eq!(&pattern[..5], b"child");
        // The child's copy of the pipe's write end is the same pipe.
        let copy = req.get_fd(w.as_raw_fd()).unwrap();
        drop(w);
        nix::unistd::write(&copy, b"z").unwrap();
        let mut one = [0u8; 1];
        nix::unistd::read(&r, &mut one).unwrap();
        assert_eq!(&one, b"z");
        assert_eq!(req.get_fd(999).unwrap_err(), Errno::EBADF);
        assert_eq!(req.get_fd(-1).unwrap_err(), Errno::EBADF);
        nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL).unwrap();
        nix::sys::wait::waitpid(child, None).unwrap();
        // The caller is gone now.
        assert_eq!(req.read_mem(addr, &mut buf), Err(Errno::ESRCH));
    }

    #[test]
    fn get_fd_copies_the_same_open_file() {
        let req = me();
        let (r, w) = nix::unistd::pipe().unwrap();
        let copy = req.get_fd(w.as_raw_fd()).unwrap();
        assert_ne!(copy.as_raw_fd(), w.as_raw_fd());
        nix::unistd::write(&copy, b"hi").unwrap();
        let mut buf = [0u8; 2];
        nix::unistd::read(&r, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn interrupt_flag_wakes_waiter() {
        let flag = Arc::new(InterruptFlag::default());
        let req = Request::new(2, 1, 0, 0, flag.clone(), Arc::from(Path::new("/proc")));
        assert!(!req.interrupted());
        assert!(!req.wait_interrupted(Duration::from_millis(10)));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            flag.raise();
        });
        let start = Instant::now();
        assert!(req.wait_interrupted(Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(req.interrupted());
        t.join().unwrap();
    }
}
