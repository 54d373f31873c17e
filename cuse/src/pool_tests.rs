//! The node's threads over a real file descriptor: one end of a SEQPACKET
//! socket pair stands for `/dev/cuse`, the test plays the kernel on the
//! other end.

use super::*;
use crate::{IoctlArgs, IoctlResult, Request};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// A node served over one end of a SEQPACKET socket pair with up to
/// `workers` handlers; the test plays the kernel on the other end.
fn fake_node(server: &Server, device: Arc<dyn Device>, workers: usize) -> OwnedFd {
    fake_node_with(
        server,
        device,
        DeviceConfig::new("fake").max_workers(workers),
    )
}

fn fake_node_idle(
    server: &Server,
    device: Arc<dyn Device>,
    workers: usize,
    max_idle: usize,
) -> OwnedFd {
    let config = DeviceConfig::new("fake")
        .max_workers(workers)
        .max_idle_workers(max_idle);
    fake_node_with(server, device, config)
}

fn fake_node_with(server: &Server, device: Arc<dyn Device>, config: DeviceConfig) -> OwnedFd {
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
        .serve(info, channel, device, config.pool_config())
        .unwrap();
    kernel
}

fn ioctl_request(unique: u64, cmd: u32) -> Vec<u8> {
    ioctl_from(unique, cmd, 0)
}

/// An ioctl `cmd` from thread `tid`.
fn ioctl_from(unique: u64, cmd: u32, tid: u32) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(72u32.to_le_bytes());
    m.extend(39u32.to_le_bytes()); // FUSE_IOCTL
    m.extend(unique.to_le_bytes());
    m.extend([0u8; 8 + 4 + 4]); // nodeid uid gid
    m.extend(tid.to_le_bytes());
    m.extend([0u8; 4]); // extlen+pad
    m.extend(1u64.to_le_bytes()); // fh
    m.extend(2u32.to_le_bytes()); // flags: UNRESTRICTED
    m.extend(cmd.to_le_bytes());
    m.extend([0u8; 16]); // arg, in_size, out_size
    m
}

/// A RELEASE of `fh`: the kernel sends it with pid 0.
fn release_request(unique: u64, fh: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(64u32.to_le_bytes());
    m.extend(18u32.to_le_bytes()); // FUSE_RELEASE
    m.extend(unique.to_le_bytes());
    m.extend([0u8; 24]); // nodeid uid gid pid extlen+pad
    m.extend(fh.to_le_bytes());
    m.extend([0u8; 16]); // flags, release_flags, lock_owner
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
/// answers 7 at once; cmd 3: sleeps 1.5 s ignoring interrupts; cmd 4: a
/// quick ioctl ([`Device::ioctl_is_quick`]), answers 8.
struct Waiter;
impl Device for Waiter {
    fn ioctl_is_quick(&self, cmd: u32) -> bool {
        cmd == 4
    }

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
            4 => Ok(IoctlResult::value(8)),
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
    let threads = |s: &Server| s.lock_nodes()[0].workers.stats().threads;
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
    let spawned = server.lock_nodes()[0].workers.stats().spawned;
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

/// Poll `cond` until it holds; fail after [`T`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stats(server: &Server) -> PoolStats {
    server.lock_nodes()[0].workers.stats()
}

/// Child processes standing for client processes: their pids are what
/// the fake kernel puts in `fuse_in_header.pid`, and the server finds
/// their processes in /proc like those of real callers.
struct Clients(Vec<std::process::Child>);

impl Clients {
    fn spawn(n: usize) -> Self {
        Clients(
            (0..n)
                .map(|_| {
                    std::process::Command::new("sleep")
                        .arg("600")
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }

    fn pid(&self, i: usize) -> u32 {
        self.0[i].id()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Issue 17, item 5: after a burst the node went back to `max_idle` (4)
/// threads and stayed there. Threads beyond two now leave once they have
/// waited the idle timeout for a request, and the node still serves.
#[test]
fn idle_threads_return_to_two_after_a_burst() {
    let server = Server::new().unwrap();
    let config = DeviceConfig::new("fake")
        .max_workers(8)
        .idle_timeout(Duration::from_millis(50));
    let kernel = fake_node_with(&server, Arc::new(Waiter), config);
    for round in 0..2u64 {
        let base = 100 * round;
        for u in [2, 4, 6] {
            send(&kernel, &ioctl_request(base + u, 1));
        }
        wait_until("three handlers and a reader", || {
            let s = stats(&server);
            s.running == 3 && s.threads == 4
        });
        for u in [2u64, 4, 6] {
            send(&kernel, &interrupt_request(base + u + 1, base + u));
        }
        for _ in 0..3 {
            assert_eq!(recv(&kernel, T).map(|r| r.1), Some(-libc::EINTR));
        }
        wait_until("the idle node back to two threads", || {
            stats(&server).threads == 2
        });
        send(&kernel, &ioctl_request(base + 50, 2));
        assert_eq!(recv(&kernel, T), Some((base + 50, 0, Some(7))));
    }
    server.stop();
}

/// A thread that still traces a process (issue 14: a thread that exits
/// while tracing kills its tracee) must not leave when idle: the keep
/// predicate holds the burst's threads; once it lets go, they leave.
#[test]
fn threads_the_keep_predicate_holds_do_not_leave_when_idle() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    static KEEP: AtomicBool = AtomicBool::new(true);
    static ASKED: AtomicUsize = AtomicUsize::new(0);
    let server = Server::new().unwrap();
    let config = DeviceConfig::new("fake")
        .max_workers(8)
        .idle_timeout(Duration::from_millis(20))
        .keep_thread_while(|| {
            ASKED.fetch_add(1, Ordering::SeqCst);
            KEEP.load(Ordering::SeqCst)
        });
    let kernel = fake_node_with(&server, Arc::new(Waiter), config);
    for u in [2u64, 4, 6] {
        send(&kernel, &ioctl_request(u, 1));
    }
    wait_until("three handlers and a reader", || {
        let s = stats(&server);
        s.running == 3 && s.threads == 4
    });
    for u in [2u64, 4, 6] {
        send(&kernel, &interrupt_request(u + 1, u));
    }
    for _ in 0..3 {
        assert_eq!(recv(&kernel, T).map(|r| r.1), Some(-libc::EINTR));
    }
    // The spare threads asked again and again (every idle timeout) and
    // were told to stay: the four are still there, and serve.
    let asked = ASKED.load(Ordering::SeqCst);
    wait_until("ten more questions", || {
        ASKED.load(Ordering::SeqCst) >= asked + 10
    });
    assert_eq!(stats(&server).threads, 4);
    send(&kernel, &ioctl_request(50, 2));
    assert_eq!(recv(&kernel, T), Some((50, 0, Some(7))));
    KEEP.store(false, Ordering::SeqCst);
    wait_until("the idle node back to two threads", || {
        stats(&server).threads == 2
    });
    // A thread that takes on business during a request is asked again at
    // every idle timeout even when it is one of the two an idle node keeps.
    KEEP.store(true, Ordering::SeqCst);
    send(&kernel, &ioctl_request(60, 2));
    assert_eq!(recv(&kernel, T), Some((60, 0, Some(7))));
    let asked = ASKED.load(Ordering::SeqCst);
    wait_until("ten more questions of the two", || {
        ASKED.load(Ordering::SeqCst) >= asked + 10
    });
    assert_eq!(stats(&server).threads, 2);
    server.stop();
}

/// Issue 17, item 7: a client keeping every handler slot busy made the
/// others wait, and a RELEASE waited for a slot. Now a client at its
/// budget waits for its own slots; others run; an INTERRUPT answers a
/// waiting request at once; RELEASE never waits; shutdown answers every
/// waiting request.
#[test]
fn a_greedy_client_waits_for_its_own_slots_and_nobody_else_does() {
    let clients = Clients::spawn(3);
    let (a, b, c) = (clients.pid(0), clients.pid(1), clients.pid(2));
    let server = Server::new().unwrap();
    let config = DeviceConfig::new("fake")
        .max_workers(4)
        .max_workers_per_client(2);
    let kernel = fake_node_with(&server, Arc::new(Waiter), config);
    // A floods with slow calls: two run, six wait.
    let a_calls: Vec<u64> = (0..8).map(|i| 100 + 2 * i).collect();
    for &u in &a_calls {
        send(&kernel, &ioctl_from(u, 1, a));
    }
    wait_until("A at its budget", || {
        let s = stats(&server);
        (s.running, s.waiting) == (2, 6)
    });
    // B is served at once, call after call, while A's wait.
    for i in 0..5 {
        send(&kernel, &ioctl_from(200 + 2 * i, 2, b));
        assert_eq!(recv(&kernel, T), Some((200 + 2 * i, 0, Some(7))));
    }
    // A's waiting call interrupted (its thread got a signal): EINTR now,
    // while A's running calls go on.
    send(&kernel, &interrupt_request(301, a_calls[5]));
    assert_eq!(recv(&kernel, T), Some((a_calls[5], -libc::EINTR, None)));
    assert_eq!(stats(&server).waiting, 5);
    // B takes the other two shared slots with slow calls; C, with nothing
    // running, still starts one (the reserve).
    send(&kernel, &ioctl_from(220, 1, b));
    send(&kernel, &ioctl_from(222, 1, b));
    wait_until("B's slow calls running", || stats(&server).running == 4);
    send(&kernel, &ioctl_from(400, 2, c));
    assert_eq!(recv(&kernel, T), Some((400, 0, Some(7))));
    // A RELEASE (pid 0) is answered although every shared slot is busy.
    send(&kernel, &release_request(500, 1));
    assert_eq!(recv(&kernel, T), Some((500, 0, None)));
    // One of A's running calls ends: A's oldest waiting call takes the slot.
    send(&kernel, &interrupt_request(303, a_calls[0]));
    assert_eq!(recv(&kernel, T), Some((a_calls[0], -libc::EINTR, None)));
    wait_until("A's next call running", || {
        let s = stats(&server);
        (s.running, s.waiting) == (4, 4)
    });
    // Shutdown answers everything: running calls are interrupted, waiting
    // ones answered EINTR without running.
    server.stop();
    let mut answered = Vec::new();
    while let Some((u, err, _)) = recv(&kernel, T) {
        assert_eq!(err, -libc::EINTR, "{u}");
        answered.push(u);
    }
    answered.sort();
    let mut expect: Vec<u64> = a_calls
        .iter()
        .copied()
        .filter(|&u| u != a_calls[0] && u != a_calls[5])
        .chain([220, 222])
        .collect();
    expect.sort();
    assert_eq!(answered, expect);
}

/// Issue 17, item 6: an unknown or stateless command never waits, not
/// even behind its own client's calls: a quick ioctl of a client whose
/// slots are all taken, with more calls waiting, is answered at once.
#[test]
fn a_quick_ioctl_never_waits_for_a_slot() {
    let clients = Clients::spawn(1);
    let a = clients.pid(0);
    let server = Server::new().unwrap();
    let config = DeviceConfig::new("fake")
        .max_workers(2)
        .max_workers_per_client(2);
    let kernel = fake_node_with(&server, Arc::new(Waiter), config);
    for i in 0..4 {
        send(&kernel, &ioctl_from(100 + 2 * i, 1, a));
    }
    wait_until("every slot taken, two waiting", || {
        let s = stats(&server);
        (s.running, s.waiting) == (2, 2)
    });
    for i in 0..3 {
        send(&kernel, &ioctl_from(200 + 2 * i, 4, a));
        assert_eq!(recv(&kernel, T), Some((200 + 2 * i, 0, Some(8))));
    }
    let s = stats(&server);
    assert_eq!(
        (s.running, s.waiting),
        (2, 2),
        "the slow calls are untouched"
    );
    server.stop();
    for _ in 0..4 {
        assert_eq!(recv(&kernel, T).map(|r| r.1), Some(-libc::EINTR));
    }
}

/// A client with more than `waiting_per_client` calls waiting gets
/// EAGAIN for the extra ones; others are served.
#[test]
fn a_client_with_too_many_calls_waiting_gets_eagain() {
    let clients = Clients::spawn(2);
    let (a, b) = (clients.pid(0), clients.pid(1));
    let server = Server::new().unwrap();
    let config = DeviceConfig::new("fake")
        .max_workers(2)
        .max_workers_per_client(1);
    let kernel = fake_node_with(&server, Arc::new(Waiter), config);
    for i in 0..66u64 {
        send(&kernel, &ioctl_from(1000 + 2 * i, 1, a));
    }
    // One runs, 64 wait, the 66th is refused.
    assert_eq!(recv(&kernel, T), Some((1130, -libc::EAGAIN, None)));
    let s = stats(&server);
    assert_eq!((s.running, s.waiting, s.refused), (1, 64, 1));
    send(&kernel, &ioctl_from(2000, 2, b));
    assert_eq!(recv(&kernel, T), Some((2000, 0, Some(7))));
    server.stop();
    let mut n = 0;
    while let Some((_, err, _)) = recv(&kernel, T) {
        assert_eq!(err, -libc::EINTR);
        n += 1;
    }
    assert_eq!(n, 65);
}
