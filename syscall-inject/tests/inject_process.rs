//! Injection into a real second process (this test binary re-executed with
//! `--tracee <kind>`), on the host: needs root or ptrace rights over a
//! child, nothing else. The tracee's main thread blocks in `read(2)` on its
//! stdin, issued from inline assembly with sentinels in callee-saved
//! registers and in the 4 KiB below `rsp`; its second thread spins and
//! prints ticks. The tracee reports what it saw after the call on stdout.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::Duration;

use syscall_inject::{Error, Options, Seized};

const SENTINEL: u64 = 0x5a5a_1234_dead_beef;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--tracee" {
        tracee::main(&args[2]);
        return;
    }
    if !cfg!(target_arch = "x86_64") {
        println!("x86_64 only: nothing to test");
        return;
    }
    let tests: &[(&str, fn())] = &[
        (
            "inject_and_return_a_chosen_value",
            inject_and_return_a_chosen_value,
        ),
        (
            "finish_with_the_original_value_restarts",
            finish_with_the_original_value_restarts,
        ),
        ("a_second_tracer_is_refused", a_second_tracer_is_refused),
        (
            "seccomp_filter_refused_unless_allowed",
            seccomp_filter_refused_unless_allowed,
        ),
        (
            "a_killed_tracee_is_gone_and_reaped",
            a_killed_tracee_is_gone_and_reaped,
        ),
        (
            "tracer_exit_before_the_stop_leaves_it_untouched",
            tracer_exit_before_the_stop_leaves_it_untouched,
        ),
        (
            "tracer_exit_after_the_stop_kills_it",
            tracer_exit_after_the_stop_kills_it,
        ),
    ];
    let filter = args.get(1).filter(|a| !a.starts_with('-'));
    let mut ran = 0;
    for (name, f) in tests {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        f();
        println!("test {name} ... ok");
        ran += 1;
    }
    println!("{ran} tests passed");
}

struct Tracee {
    child: Child,
    out: BufReader<ChildStdout>,
    err: BufReader<ChildStderr>,
    tid: i32,
}

impl Tracee {
    /// Start a tracee and wait until its main thread is blocked in read.
    fn start(kind: &str) -> Tracee {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--tracee", kind])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let err = BufReader::new(child.stderr.take().unwrap());
        let line = read_line(&mut out);
        let tid: i32 = line.strip_prefix("reading ").expect(&line).parse().unwrap();
        // "reading" is printed just before the read: wait until the
        // thread sleeps in it (state S, wchan of a pipe read).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(format!("/proc/{tid}/syscall"))
            .unwrap_or_default()
            .starts_with("0 ")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "tracee never blocked in read"
            );
            std::thread::yield_now();
        }
        Tracee {
            child,
            out,
            err,
            tid,
        }
    }

    fn report(&mut self) -> String {
        read_line(&mut self.out)
    }
}

fn read_line(r: &mut impl BufRead) -> String {
    let mut s = String::new();
    r.read_line(&mut s).unwrap();
    s.trim_end().to_string()
}

fn field<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name} in {report:?}"))
}

fn inject_and_return_a_chosen_value() {
    let mut t = Tracee::start("plain");
    let seized = Seized::seize(t.tid, Options::default()).unwrap();
    // Nothing answers the read: PTRACE_INTERRUPT makes it return
    // -ERESTARTSYS and the thread traps on the way out.
    let mut stopped = seized.wait_stop(libc::SYS_read).unwrap();
    assert_eq!(
        stopped.regs().rax as i64,
        -512,
        "read interrupted: -ERESTARTSYS"
    );
    assert_eq!(stopped.tid(), t.tid);
    // The calls run as the tracee.
    assert_eq!(
        stopped.syscall(libc::SYS_getpid, &[]).unwrap(),
        t.child.id() as i64
    );
    assert_eq!(
        stopped.syscall(libc::SYS_gettid, &[]).unwrap(),
        t.tid as i64
    );
    // An argument struct on its stack, read by an injected write(2).
    let msg = b"written by the tracee\n";
    let addr = stopped.put(msg).unwrap();
    assert!(addr < stopped.regs().rsp - 128, "below the red zone");
    let n = stopped
        .syscall(libc::SYS_write, &[1, addr, msg.len() as u64])
        .unwrap();
    assert_eq!(n, msg.len() as i64);
    assert_eq!(read_line(&mut t.out), "written by the tracee");
    // A failing call returns its negative errno.
    assert_eq!(
        stopped.syscall(libc::SYS_close, &[9999]).unwrap(),
        -(libc::EBADF as i64)
    );
    // Its other thread runs while this one is stopped: a tick printed now.
    let before = read_line(&mut t.err);
    let after = read_line(&mut t.err);
    assert!(
        before.starts_with("tick ") && after.starts_with("tick "),
        "{before} {after}"
    );
    assert_eq!(
        syscall_inject::state_of(t.tid),
        't',
        "stopped by us meanwhile"
    );
    stopped.finish(42).unwrap();
    let r = t.report();
    assert_eq!(field(&r, "ret"), "42", "{r}");
    assert_eq!(field(&r, "regs"), "ok", "{r}");
    assert_eq!(field(&r, "below_rsp"), "ok", "{r}");
    assert_eq!(field(&r, "errno"), "4242", "{r}");
    assert_eq!(field(&r, "mask"), "same", "{r}");
    assert_eq!(field(&r, "pending"), "SIGUSR2", "{r}");
    // The pending signal is delivered once the tracee unblocks it.
    assert_eq!(field(&r, "delivered"), "1", "{r}");
    t.child.stdin.take();
    assert!(t.child.wait().unwrap().success());
}

fn finish_with_the_original_value_restarts() {
    let mut t = Tracee::start("plain");
    let mut stopped = Seized::seize(t.tid, Options::default())
        .unwrap()
        .wait_stop(libc::SYS_read)
        .unwrap();
    assert_eq!(
        stopped.syscall(libc::SYS_getppid, &[]).unwrap(),
        std::process::id() as i64
    );
    let original = stopped.regs().rax as i64;
    stopped.finish(original).unwrap();
    // The read was restarted: it now returns what we write.
    let mut stdin = t.child.stdin.take().unwrap();
    stdin.write_all(b"hello").unwrap();
    let r = t.report();
    assert_eq!(field(&r, "ret"), "5", "{r}");
    assert_eq!(field(&r, "data"), "hello", "{r}");
    assert_eq!(field(&r, "regs"), "ok", "{r}");
    assert_eq!(field(&r, "below_rsp"), "ok", "{r}");
    drop(stdin);
    assert!(t.child.wait().unwrap().success());
}

fn a_second_tracer_is_refused() {
    let mut t = Tracee::start("plain");
    let first = Seized::seize(t.tid, Options::default()).unwrap();
    let again = Seized::seize(t.tid, Options::default()).unwrap_err();
    assert_eq!(
        again,
        Error::AlreadyTraced {
            tid: t.tid,
            tracer: std::process::id() as i32
        }
    );
    assert_eq!(again.errno(), nix::errno::Errno::EFAULT);
    first
        .wait_stop(libc::SYS_read)
        .unwrap()
        .finish(-512)
        .unwrap();
    t.child.stdin.take().unwrap().write_all(b"x").unwrap();
    assert_eq!(field(&t.report(), "ret"), "1");
    assert!(t.child.wait().unwrap().success());
}

fn seccomp_filter_refused_unless_allowed() {
    let mut t = Tracee::start("seccomp");
    let err = Seized::seize(t.tid, Options::default()).unwrap_err();
    assert_eq!(
        err,
        Error::Seccomp {
            tid: t.tid,
            mode: "filter"
        }
    );
    // Allowed: the filter's verdict shows in the result (it answers EPERM
    // for getppid and lets everything else through).
    let options = Options {
        allow_seccomp_filter: true,
        ..Options::default()
    };
    let mut stopped = Seized::seize(t.tid, options)
        .unwrap()
        .wait_stop(libc::SYS_read)
        .unwrap();
    assert_eq!(
        stopped.syscall(libc::SYS_getppid, &[]).unwrap(),
        -(libc::EPERM as i64)
    );
    assert_eq!(
        stopped.syscall(libc::SYS_getpid, &[]).unwrap(),
        t.child.id() as i64
    );
    stopped.finish(7).unwrap();
    assert_eq!(field(&t.report(), "ret"), "7");
    t.child.stdin.take();
    assert!(t.child.wait().unwrap().success());
}

fn a_killed_tracee_is_gone_and_reaped() {
    let mut t = Tracee::start("plain");
    let seized = Seized::seize(t.tid, Options::default()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        seized.wait_stop(libc::SYS_read).unwrap_err(),
        Error::Gone { tid: t.tid }
    );
    assert_reaped(&mut t);

    // Killed while stopped, between injected calls.
    let mut t = Tracee::start("plain");
    let mut stopped = Seized::seize(t.tid, Options::default())
        .unwrap()
        .wait_stop(libc::SYS_read)
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let err = stopped.syscall(libc::SYS_getpid, &[]).unwrap_err();
    assert_eq!(err, Error::Gone { tid: t.tid });
    assert_reaped(&mut t);
}

/// The killed tracee is gone, not a zombie. Its main thread is the one
/// traced and we are also its parent, so the injector's
/// `waitpid(tid, __WALL)` may have reaped the whole process already.
fn assert_reaped(t: &mut Tracee) {
    use std::os::unix::process::ExitStatusExt;
    match t.child.wait() {
        Ok(status) => assert_eq!(status.signal(), Some(libc::SIGKILL)),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ECHILD)),
    }
    assert!(!std::path::Path::new(&format!("/proc/{}", t.child.id())).exists());
}

fn tracer_exit_before_the_stop_leaves_it_untouched() {
    let mut t = Tracee::start("plain");
    let tid = t.tid;
    // The attaching thread ends before the trap: the thread is detached
    // (no EXITKILL yet) and its interrupted read restarts.
    std::thread::spawn(move || std::mem::forget(Seized::seize(tid, Options::default()).unwrap()))
        .join()
        .unwrap();
    t.child
        .stdin
        .take()
        .unwrap()
        .write_all(b"still here")
        .unwrap();
    let r = t.report();
    assert_eq!(field(&r, "data"), "still", "{r}"); // "still here": first word
    assert!(t.child.wait().unwrap().success());
}

fn tracer_exit_after_the_stop_kills_it() {
    let mut t = Tracee::start("plain");
    let tid = t.tid;
    std::thread::spawn(move || {
        let mut stopped = Seized::seize(tid, Options::default())
            .unwrap()
            .wait_stop(libc::SYS_read)
            .unwrap();
        stopped.syscall(libc::SYS_getpid, &[]).unwrap();
        // A daemon dying mid-injection: EXITKILL.
        std::mem::forget(stopped);
    })
    .join()
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(t.child.wait().unwrap().signal(), Some(libc::SIGKILL));
    let mut rest = String::new();
    t.out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "the tracee never returned from its read");
}

/// The tracee side.
mod tracee {
    use super::SENTINEL;
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};

    static DELIVERED: AtomicU64 = AtomicU64::new(0);

    extern "C" fn on_usr2(_: libc::c_int) {
        DELIVERED.fetch_add(1, Ordering::SeqCst);
    }

    fn sigmask() -> u64 {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `set` is written by the call before it is read.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), set.as_mut_ptr());
            let set = set.assume_init();
            (1..=64).fold(0, |m, s| {
                if libc::sigismember(&set, s) == 1 {
                    m | 1 << (s - 1)
                } else {
                    m
                }
            })
        }
    }

    fn install_seccomp() {
        // Allow everything but getppid, which answers EPERM.
        const RET_ALLOW: u32 = 0x7fff_0000;
        const RET_ERRNO: u32 = 0x0005_0000;
        let filter = [
            libc::sock_filter {
                code: 0x20,
                jt: 0,
                jf: 0,
                k: 0,
            }, // ld [nr]
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 1,
                k: libc::SYS_getppid as u32,
            }, // jeq getppid
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: RET_ERRNO | libc::EPERM as u32,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: RET_ALLOW,
            },
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: plain prctl/seccomp calls; `prog` and `filter` outlive them.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const libc::sock_fprog
                ),
                0
            );
        }
    }

    /// read(0, buf, len) from assembly: r12-r15 hold sentinels and the 4 KiB
    /// below rsp a pattern across the call; returns (result, registers
    /// intact, memory intact).
    #[cfg(target_arch = "x86_64")]
    fn sentinel_read(buf: &mut [u8]) -> (i64, bool, bool) {
        let ret: i64;
        let (r12, r13, r14, r15): (u64, u64, u64, u64);
        let left: u64;
        // SAFETY: the block writes only the 4 KiB below rsp (allowed: no
        // `nostack`, and the main thread's stack is far larger) and `buf`
        // through the read; every register it changes is declared.
        unsafe {
            std::arch::asm!(
                "lea rdi, [rsp - 4096]",
                "mov rcx, 512",
                "mov rax, {pat}",
                "rep stosq",
                "mov r12, {pat}",
                "lea r13, [r12 + 1]",
                "lea r14, [r12 + 2]",
                "lea r15, [r12 + 3]",
                "xor edi, edi",
                "mov rsi, r8",
                "mov rdx, r9",
                "xor eax, eax",
                "syscall",
                "mov r8, rax",
                "lea rdi, [rsp - 4096]",
                "mov rcx, 512",
                "mov rax, {pat}",
                "repe scasq",
                "mov rax, r8",
                pat = in(reg) SENTINEL,
                inout("r8") buf.as_mut_ptr() => _,
                in("r9") buf.len(),
                out("rax") ret,
                out("rcx") left,
                out("rdi") _, out("rsi") _, out("rdx") _, out("r11") _,
                out("r12") r12, out("r13") r13, out("r14") r14, out("r15") r15,
            );
        }
        let regs =
            r12 == SENTINEL && r13 == SENTINEL + 1 && r14 == SENTINEL + 2 && r15 == SENTINEL + 3;
        (ret, regs, left == 0)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn sentinel_read(_buf: &mut [u8]) -> (i64, bool, bool) {
        unreachable!()
    }

    pub fn main(kind: &str) {
        if kind == "seccomp" {
            install_seccomp();
        }
        // SIGUSR2: handled, blocked and pending across the call.
        // SAFETY: installing a handler that only bumps an atomic, and
        // blocking/raising a signal, in this single-threaded moment.
        unsafe {
            libc::signal(
                libc::SIGUSR2,
                on_usr2 as extern "C" fn(libc::c_int) as usize,
            );
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::raise(libc::SIGUSR2);
        }
        // The second thread spins and prints a tick now and then.
        std::thread::spawn(|| {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n + 1);
                if n % (1 << 22) == 0 {
                    let _ = writeln!(std::io::stderr(), "tick {n}");
                }
            }
        });
        let mask_before = sigmask();
        let tid = nix::unistd::gettid();
        println!("reading {tid}");
        std::io::stdout().flush().unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: errno is this thread's int.
        unsafe { *libc::__errno_location() = 4242 };
        let (ret, regs, below) = sentinel_read(&mut buf);
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mask = if sigmask() == mask_before {
            "same"
        } else {
            "changed"
        };
        let mut pending = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: `pending` is written by sigpending before it is read.
        let usr2 = unsafe {
            libc::sigpending(pending.as_mut_ptr());
            libc::sigismember(pending.as_ptr(), libc::SIGUSR2) == 1
        };
        // Unblock: the pending SIGUSR2 is delivered now.
        // SAFETY: as above.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        let data = if ret > 0 {
            String::from_utf8_lossy(&buf[..ret as usize]).into_owned()
        } else {
            String::new()
        };
        let data = data.split_whitespace().next().unwrap_or("").to_string();
        println!(
            "ret={ret} regs={} below_rsp={} errno={errno} mask={mask} pending={} delivered={} data={data}",
            if regs { "ok" } else { "bad" },
            if below { "ok" } else { "bad" },
            if usr2 { "SIGUSR2" } else { "none" },
            DELIVERED.load(Ordering::SeqCst),
        );
        std::io::stdout().flush().unwrap();
        std::process::exit(0);
    }
}
