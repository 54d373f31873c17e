//! A separate client process for tests and the `alias_dma` example: it owns
//! some memory, fills it with known patterns, and answers commands on stdin
//! so the test can check what happened to that memory *from the client's
//! side*.
//!
//! Started as `<exe> --client <memfd|hugetlb|shared-anon|private> <pages>
//! <seed>` (hugetlb: a 2 MiB hugetlbfs memfd, length rounded up):
//! maps `pages` pages of the given kind, fills every page with the pattern
//! of `seed`, prints `ready <addr hex> <len>` and then serves one command per
//! line:
//!
//! - `fill <page> <seed>`: fill the page with the pattern of `seed`;
//! - `check <page> <seed> <n>`: are the first `n` bytes of the page the
//!   pattern of `seed`? Prints `ok` or `bad <index> <got> <want>`;
//! - `remap <seed>`: replace the memory by a new mapping of the same kind
//!   (a new file) at the same address, filled with the pattern of `seed`;
//! - `quit`: exit 0.
//!
//! The client reads and writes its own memory through `/proc/self/mem`, so
//! only the `mmap` needs `unsafe`.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Page size of the machines the tests run on.
pub const PAGE: usize = 4096;

/// Byte `i` of the pattern of `seed`.
pub fn pattern(seed: u8, i: usize) -> u8 {
    (seed as usize)
        .wrapping_mul(31)
        .wrapping_add(i.wrapping_mul(13))
        .wrapping_add(i >> 8) as u8
}

/// A page of the pattern of `seed`.
pub fn pattern_page(seed: u8) -> Vec<u8> {
    (0..PAGE).map(|i| pattern(seed, i)).collect()
}

/// Huge page size used by the `hugetlb` kind.
pub const HUGE_PAGE: usize = 2 << 20;

/// Map `len` bytes of memory of `kind`; at `at` (replacing what is there)
/// if given.
fn map(kind: &str, len: usize, at: Option<usize>) -> (usize, Option<OwnedFd>) {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let memfd = |flags: MFdFlags| {
        let fd = memfd_create("alias-client", MFdFlags::MFD_CLOEXEC | flags).expect("memfd_create");
        let f = File::from(fd);
        f.set_len(len as u64).expect("ftruncate");
        Some(OwnedFd::from(f))
    };
    let (mut flags, fd) = match kind {
        "memfd" => (libc::MAP_SHARED, memfd(MFdFlags::empty())),
        "hugetlb" => (
            libc::MAP_SHARED,
            memfd(MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB),
        ),
        "shared-anon" => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, None),
        "private" => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None),
        other => panic!("unknown memory kind {other}"),
    };
    if at.is_some() {
        flags |= libc::MAP_FIXED;
    }
    let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
    // SAFETY: without `at`, a fresh mapping at an address of the kernel's
    // choosing overlaps nothing; with `at`, MAP_FIXED replaces exactly this
    // client's own earlier mapping of `len` bytes there, which no Rust
    // reference points into (the memory is only touched through
    // /proc/self/mem). The fd, if any, is valid; the result is checked.
    let p = unsafe {
        libc::mmap(
            at.map_or(std::ptr::null_mut(), |a| a as *mut libc::c_void),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            raw,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    (p as usize, fd)
}

/// Be the client (never returns).
pub fn serve(kind: &str, pages: usize, seed: u8) -> ! {
    let mut len = pages * PAGE;
    if kind == "hugetlb" {
        len = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    }
    let (addr, mut _fd) = map(kind, len, None);
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .expect("/proc/self/mem");
    for p in 0..pages {
        mem.write_all_at(&pattern_page(seed), (addr + p * PAGE) as u64)
            .expect("fill");
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready {addr:x} {len}").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> usize { w[i].parse().expect("number") };
        let reply = match w.first().copied() {
            Some("fill") => {
                let page_addr = (addr + num(1) * PAGE) as u64;
                mem.write_all_at(&pattern_page(num(2) as u8), page_addr)
                    .expect("fill");
                "ok".to_string()
            }
            Some("check") => {
                let (page, seed, n) = (num(1), num(2) as u8, num(3));
                let mut buf = vec![0u8; n];
                mem.read_exact_at(&mut buf, (addr + page * PAGE) as u64)
                    .expect("read");
                match (0..n).find(|&i| buf[i] != pattern(seed, i)) {
                    None => "ok".to_string(),
                    Some(i) => format!("bad {i} {} {}", buf[i], pattern(seed, i)),
                }
            }
            Some("remap") => {
                // A new file at the same addresses: what a client replacing
                // its memory between two calls does.
                let (_, fd) = map(kind, len, Some(addr));
                _fd = fd;
                for p in 0..pages {
                    mem.write_all_at(&pattern_page(num(1) as u8), (addr + p * PAGE) as u64)
                        .expect("fill");
                }
                "ok".to_string()
            }
            Some("quit") => std::process::exit(0),
            _ => format!("error unknown command {line:?}"),
        };
        writeln!(out, "{reply}").unwrap();
        out.flush().unwrap();
    }
    std::process::exit(0)
}

/// The test's handle on a client process.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Start of the client's memory, in the client.
    pub addr: u64,
    /// Its length.
    pub len: u64,
}

impl Client {
    /// Start `exe --client kind pages seed` and wait for `ready`.
    pub fn spawn(exe: &std::path::Path, kind: &str, pages: usize, seed: u8) -> Self {
        let mut child = Command::new(exe)
            .args(["--client", kind, &pages.to_string(), &seed.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn client");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("client ready line");
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w.first(), Some(&"ready"), "client said {line:?}");
        Client {
            child,
            stdin,
            stdout,
            addr: u64::from_str_radix(w[1], 16).unwrap(),
            len: w[2].parse().unwrap(),
        }
    }

    /// The client's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send one command, return the reply line.
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut reply = String::new();
        self.stdout.read_line(&mut reply).unwrap();
        reply.trim_end().to_string()
    }

    /// Ask the client to exit and wait for it.
    pub fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Our own child: make sure it does not outlive the test.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// If this process was started as a client, be it.
pub fn serve_if_client() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        let pages = args[3].parse().expect("pages");
        let seed = args[4].parse().expect("seed");
        serve(&args[2], pages, seed);
    }
}

/// Read `len` bytes at `addr` of this process.
pub fn read_self(addr: u64, len: usize) -> Vec<u8> {
    let mem = File::open("/proc/self/mem").unwrap();
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr).unwrap();
    buf
}

/// Write `data` at `addr` of this process.
pub fn write_self(addr: u64, data: &[u8]) {
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .unwrap();
    mem.write_all_at(data, addr).unwrap();
}

/// Whether this process has anything mapped at `addr`.
pub fn self_maps_has(addr: u64) -> bool {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    vfio_legacy::maps::parse_maps(&text)
        .unwrap()
        .iter()
        .any(|v| v.start <= addr && addr < v.end)
}
