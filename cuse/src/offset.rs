//! Recovering the real file offset of a READ or WRITE.
//!
//! CUSE drops file offsets: `cuse_read_iter`/`cuse_write_iter` always pass
//! position 0, and a transfer larger than `max_read`/`max_write` is split
//! into several requests whose own offset is the position *within* the
//! syscall's buffer. But the calling thread is blocked in its syscall while
//! the server handles the request, and `/proc/<tid>/syscall` shows the
//! syscall number and arguments. For the positional calls the real offset is
//! the syscall's position plus the request's offset.

use std::path::Path;

/// Where a READ or WRITE applies, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offset {
    /// A positional transfer (`pread64`, `pwrite64`, `preadv`, `pwritev`,
    /// `preadv2`/`pwritev2` with a position): the absolute file offset of
    /// this request's first byte.
    At(u64),
    /// A stream transfer (`read`, `write`, `readv`, `writev`, or the `*v2`
    /// calls with position -1): no file offset. `within` is the position of
    /// this request's first byte within the syscall's buffer (non-zero for
    /// the later pieces of a split transfer).
    Stream {
        /// Bytes of the same syscall handled by earlier requests.
        within: u64,
    },
    /// The offset could not be recovered; the handler decides (a positional
    /// device should refuse the request, typically with `EINVAL`).
    Unknown {
        /// Position within the syscall's buffer, as for `Stream`.
        within: u64,
        /// Why the offset is unknown.
        reason: OffsetError,
    },
}

impl Offset {
    /// The absolute position, if this is a positional transfer.
    pub fn position(&self) -> Option<u64> {
        match self {
            Offset::At(pos) => Some(*pos),
            _ => None,
        }
    }
}

/// Why the real offset of a transfer is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffsetError {
    /// `/proc/<tid>/syscall` could not be read (the caller is gone, or the
    /// server may not inspect it).
    #[error("cannot read /proc/{tid}/syscall: {errno}")]
    Unreadable {
        /// The caller's thread id.
        tid: u32,
        /// The error reading the file.
        errno: nix::errno::Errno,
    },
    /// The caller is not blocked in a system call ("running" or "-1 ...").
    #[error("caller is not in a system call")]
    NotInSyscall,
    /// A system call that is not a read or write of a file (e.g. `splice`,
    /// `sendfile`, `io_uring`, or a 32-bit caller's numbering).
    #[error("caller is in system call {0}, which is not a known read/write")]
    UnknownSyscall(i64),
    /// The file's text did not parse.
    #[error("unparsable /proc syscall line: {0:?}")]
    Unparsable(String),
    /// Syscall position plus request offset overflows 64 bits.
    #[error("offset overflow")]
    Overflow,
}

/// The direction of the transfer being resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Read,
    Write,
}

// x86_64 system call numbers.
const SYS_READ: i64 = 0;
const SYS_WRITE: i64 = 1;
const SYS_PREAD64: i64 = 17;
const SYS_PWRITE64: i64 = 18;
const SYS_READV: i64 = 19;
const SYS_WRITEV: i64 = 20;
const SYS_PREADV: i64 = 295;
const SYS_PWRITEV: i64 = 296;
const SYS_PREADV2: i64 = 327;
const SYS_PWRITEV2: i64 = 328;

/// Interpret one `/proc/<tid>/syscall` text for a transfer whose request
/// offset is `within`.
///
/// The line is `"NR 0xA0 0xA1 0xA2 0xA3 0xA4 0xA5 0xSP 0xPC"` while blocked
/// in a syscall, `"-1 0xSP 0xPC"` when blocked outside one, `"running"` when
/// running. On x86_64 `preadv`/`pwritev`(2) take the position as `pos_l` in
/// argument 3 (the kernel's `pos_from_hilo` shifts `pos_h` out entirely on
/// 64-bit), like `pread64`/`pwrite64`.
pub(crate) fn offset_from_syscall_line(line: &str, dir: Direction, within: u64) -> Offset {
    let unknown = |reason| Offset::Unknown { within, reason };
    let line = line.trim();
    if line == "running" {
        return unknown(OffsetError::NotInSyscall);
    }
    let mut fields = line.split_ascii_whitespace();
    let nr: i64 = match fields.next().map(str::parse) {
        Some(Ok(nr)) => nr,
        _ => return unknown(OffsetError::Unparsable(line.to_owned())),
    };
    if nr < 0 {
        return unknown(OffsetError::NotInSyscall);
    }
    let mut args = [0u64; 6];
    for arg in args.iter_mut() {
        let parsed = fields
            .next()
            .and_then(|f| f.strip_prefix("0x"))
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        match parsed {
            Some(v) => *arg = v,
            None => return unknown(OffsetError::Unparsable(line.to_owned())),
        }
    }
    let stream = Offset::Stream { within };
    let at = |pos: u64| match pos.checked_add(within) {
        Some(p) => Offset::At(p),
        None => unknown(OffsetError::Overflow),
    };
    match (dir, nr) {
        (Direction::Read, SYS_READ | SYS_READV) | (Direction::Write, SYS_WRITE | SYS_WRITEV) => {
            stream
        }
        (Direction::Read, SYS_PREAD64 | SYS_PREADV)
        | (Direction::Write, SYS_PWRITE64 | SYS_PWRITEV) => at(args[3]),
        (Direction::Read, SYS_PREADV2) | (Direction::Write, SYS_PWRITEV2) => {
            if args[3] == u64::MAX {
                stream
            } else {
                at(args[3])
            }
        }
        _ => unknown(OffsetError::UnknownSyscall(nr)),
    }
}

/// How long [`resolve`] waits for a caller that is still running.
const RUNNING_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Read `/proc/<tid>/syscall` under `proc_root` and interpret it.
///
/// The kernel queues the request before the caller goes to sleep, so a
/// server on another CPU can get here while the caller still runs; the file
/// then says "running". That state lasts microseconds: read again, with a
/// growing pause, for up to [`RUNNING_PATIENCE`].
pub(crate) fn resolve(proc_root: &Path, tid: u32, dir: Direction, within: u64) -> Offset {
    let path = proc_root.join(tid.to_string()).join("syscall");
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                return Offset::Unknown {
                    within,
                    reason: OffsetError::Unreadable {
                        tid,
                        errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                    },
                }
            }
        };
        if text.trim() != "running" || start.elapsed() >= RUNNING_PATIENCE {
            return offset_from_syscall_line(&text, dir, within);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{Read, Write};

    fn line(nr: i64, a3: u64) -> String {
        format!("{nr} 0x3 0x7ffd1000 0x20000 0x{a3:x} 0x0 0x0 0x7ffd0f00 0x7f0012345678\n")
    }

    #[test]
    fn pread_and_pwrite_give_absolute_offsets() {
        assert_eq!(
            offset_from_syscall_line(&line(17, 0x12345), Read, 0),
            Offset::At(0x12345)
        );
        assert_eq!(
            offset_from_syscall_line(&line(17, 0x300_0000_0010), Read, 0x20000),
            Offset::At(0x300_0002_0010)
        );
        assert_eq!(
            offset_from_syscall_line(&line(18, 0x1000), Write, 0x8),
            Offset::At(0x1008)
        );
    }

    #[test]
    fn vector_calls_use_pos_l() {
        assert_eq!(
            offset_from_syscall_line(&line(295, 0x40), Read, 0),
            Offset::At(0x40)
        );
        assert_eq!(
            offset_from_syscall_line(&line(296, 0x50), Write, 4),
            Offset::At(0x54)
        );
        assert_eq!(
            offset_from_syscall_line(&line(327, 0x60), Read, 0),
            Offset::At(0x60)
        );
        assert_eq!(
            offset_from_syscall_line(&line(328, 0x70), Write, 1),
            Offset::At(0x71)
        );
    }

    #[test]
    fn v2_with_minus_one_is_stream() {
        assert_eq!(
            offset_from_syscall_line(&line(327, u64::MAX), Read, 0x20000),
            Offset::Stream { within: 0x20000 }
        );
        assert_eq!(
            offset_from_syscall_line(&line(328, u64::MAX), Write, 0),
            Offset::Stream { within: 0 }
        );
    }

    #[test]
    fn plain_calls_are_streams() {
        for (nr, dir) in [(0, Read), (19, Read), (1, Write), (20, Write)] {
            assert_eq!(
                offset_from_syscall_line(&line(nr, 0xdead), dir, 7),
                Offset::Stream { within: 7 },
                "nr {nr}"
            );
        }
    }

    #[test]
    fn wrong_direction_or_other_syscall_is_unknown() {
        // A WRITE request while the caller is in pread64 makes no sense.
        assert_eq!(
            offset_from_syscall_line(&line(17, 0x10), Write, 0),
            Offset::Unknown {
                within: 0,
                reason: OffsetError::UnknownSyscall(17)
            }
        );
        // sendfile (40)
        assert_eq!(
            offset_from_syscall_line(&line(40, 0x10), Read, 3),
            Offset::Unknown {
                within: 3,
                reason: OffsetError::UnknownSyscall(40)
            }
        );
    }

    #[test]
    fn not_in_syscall_forms() {
        assert_eq!(
            offset_from_syscall_line("running\n", Read, 0),
            Offset::Unknown {
                within: 0,
                reason: OffsetError::NotInSyscall
            }
        );
        assert_eq!(
            offset_from_syscall_line("-1 0x7ffd0f00 0x7f0012345678\n", Read, 0),
            Offset::Unknown {
                within: 0,
                reason: OffsetError::NotInSyscall
            }
        );
    }

    #[test]
    fn garbage_is_unparsable_not_zero() {
        for text in [
            "",
            "17",
            "17 0x1 0x2 0x3",
            "abc 0x1",
            "17 1 2 3 4 5 6 7 8",
            "17 0x1 0x2 0x3 0xzz 0x0 0x0",
        ] {
            match offset_from_syscall_line(text, Read, 0) {
                Offset::Unknown {
                    reason: OffsetError::Unparsable(_),
                    ..
                } => {}
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn overflow_is_reported() {
        assert_eq!(
            offset_from_syscall_line(&line(17, u64::MAX - 1), Read, 2),
            Offset::Unknown {
                within: 2,
                reason: OffsetError::Overflow
            }
        );
    }

    #[test]
    fn resolve_reads_the_proc_file_and_reports_a_vanished_caller() {
        let dir = std::env::temp_dir().join(format!("cuse-offset-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("4242")).unwrap();
        std::fs::write(dir.join("4242/syscall"), line(17, 0x12345)).unwrap();
        assert_eq!(resolve(&dir, 4242, Read, 0x10), Offset::At(0x12355));
        match resolve(&dir, 4243, Read, 0) {
            Offset::Unknown {
                reason: OffsetError::Unreadable { tid: 4243, errno },
                ..
            } => assert_eq!(errno, nix::errno::Errno::ENOENT),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolve_waits_for_a_running_caller_then_gives_up() {
        let dir = std::env::temp_dir().join(format!("cuse-offset-run-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("7")).unwrap();
        let file = dir.join("7/syscall");
        std::fs::write(&file, "running\n").unwrap();
        // The caller goes to sleep in pread64 a little later.
        let writer = {
            let file = file.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(30));
                std::fs::write(&file, line(17, 0x99)).unwrap();
            })
        };
        assert_eq!(resolve(&dir, 7, Read, 1), Offset::At(0x9a));
        writer.join().unwrap();
        // Still running after the patience: NotInSyscall, not a guess.
        std::fs::write(&file, "running\n").unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(
            resolve(&dir, 7, Read, 0),
            Offset::Unknown {
                within: 0,
                reason: OffsetError::NotInSyscall
            }
        );
        assert!(t0.elapsed() >= RUNNING_PATIENCE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolve_on_a_real_blocked_thread() {
        // A thread of ours blocked in read(2) on a pipe: /proc shows nr 0.
        let (r, w) = nix::unistd::pipe().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
            let mut b = [0u8; 1];
            nix::unistd::read(&r, &mut b).unwrap();
        });
        let tid = rx.recv().unwrap();
        let mut seen = None;
        for _ in 0..200 {
            let o = resolve(Path::new("/proc"), tid, Read, 5);
            if o == (Offset::Stream { within: 5 }) {
                seen = Some(o);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        nix::unistd::write(&w, b"x").unwrap();
        t.join().unwrap();
        assert_eq!(seen, Some(Offset::Stream { within: 5 }));
    }
}
