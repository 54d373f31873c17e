//! Byte-exact tests of the request/reply layer against an in-memory channel.
//!
//! Requests are built by hand, field by field in little-endian, not with
//! the crate's own structs, so a wrong layout in `wire` would show.

use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;

use crate::session::{init_reply, InitParams, Reply};
use crate::*;

/// Collects every message sent.
#[derive(Default)]
struct Recorder(Mutex<Vec<Vec<u8>>>);

impl Channel for Recorder {
    fn send(&self, parts: &[IoSlice<'_>]) -> Result<(), Errno> {
        self.0
            .lock()
            .unwrap()
            .push(parts.iter().flat_map(|p| p.iter().copied()).collect());
        Ok(())
    }
}

impl Recorder {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const FLUSH: u32 = 25;
const INTERRUPT: u32 = 36;
const IOCTL: u32 = 39;
const POLL: u32 = 40;
const FORGET: u32 = 2;
const CUSE_INIT: u32 = 4096;

const TID: u32 = 4321;
const UID: u32 = 1000;
const GID: u32 = 100;

/// A request: fuse_in_header + body, `len` computed.
fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(((40 + body.len()) as u32).to_le_bytes());
    m.extend(opcode.to_le_bytes());
    m.extend(unique.to_le_bytes());
    m.extend(0u64.to_le_bytes()); // nodeid
    m.extend(UID.to_le_bytes());
    m.extend(GID.to_le_bytes());
    m.extend(TID.to_le_bytes());
    m.extend(0u16.to_le_bytes()); // total_extlen
    m.extend(0u16.to_le_bytes()); // padding
    m.extend_from_slice(body);
    m
}

/// An expected reply: fuse_out_header + body.
fn reply(error: i32, unique: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend(((16 + body.len()) as u32).to_le_bytes());
    m.extend(error.to_le_bytes());
    m.extend(unique.to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn errno_reply(errno: Errno, unique: u64) -> Vec<u8> {
    reply(-(errno as i32), unique, &[])
}

fn le(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    le(&[
        &fh.to_le_bytes(),
        &offset.to_le_bytes(),
        &size.to_le_bytes(),
        &0u32.to_le_bytes(),
        &0u64.to_le_bytes(),
        &0u32.to_le_bytes(),
        &0u32.to_le_bytes(),
    ])
}

fn ioctl_in(fh: u64, flags: u32, cmd: u32, arg: u64, input: &[u8], out_size: u32) -> Vec<u8> {
    le(&[
        &fh.to_le_bytes(),
        &flags.to_le_bytes(),
        &cmd.to_le_bytes(),
        &arg.to_le_bytes(),
        &(input.len() as u32).to_le_bytes(),
        &out_size.to_le_bytes(),
        input,
    ])
}

fn poll_in(fh: u64, kh: u64, flags: u32, events: u32) -> Vec<u8> {
    le(&[
        &fh.to_le_bytes(),
        &kh.to_le_bytes(),
        &flags.to_le_bytes(),
        &events.to_le_bytes(),
    ])
}

/// What the test device saw.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Open(u32, u32, u32, u32),
    Read(u64, u32, Offset),
    Write(u64, Vec<u8>, Offset),
    Ioctl(u64, u32, u64, Vec<u8>, u32),
    Poll(u64, u32, Option<u64>),
    Release(u64),
}

#[derive(Default)]
struct TestDev {
    calls: Mutex<Vec<Call>>,
    waiters: Mutex<Vec<PollHandle>>,
}

impl TestDev {
    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
    fn log(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
}

impl Device for TestDev {
    fn open(&self, req: &Request, flags: OpenFlags) -> Result<u64, Errno> {
        self.log(Call::Open(req.tid(), req.uid(), req.gid(), flags.bits()));
        if flags.writable() {
            return Err(Errno::EACCES);
        }
        Ok(0x1122_3344_5566_7788)
    }

    fn read(&self, _req: &Request, fh: u64, size: u32, offset: Offset) -> Result<Vec<u8>, Errno> {
        self.log(Call::Read(fh, size, offset));
        match size {
            7 => Ok(b"abcdefgh".to_vec()), // one byte too many
            _ => Ok(vec![0xab; size as usize / 2]),
        }
    }

    fn write(&self, _req: &Request, fh: u64, data: &[u8], offset: Offset) -> Result<u32, Errno> {
        self.log(Call::Write(fh, data.to_vec(), offset));
        if data == b"lie" {
            return Ok(100);
        }
        Ok(data.len() as u32 - 1)
    }

    fn ioctl(&self, req: &Request, fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        self.log(Call::Ioctl(
            fh,
            args.cmd,
            args.arg,
            args.input.to_vec(),
            args.out_size,
        ));
        match args.cmd {
            1 => Ok(IoctlResult {
                result: 42,
                out: args.input.iter().rev().copied().collect(),
            }),
            2 => panic!("handler bug"),
            3 => Ok(IoctlResult {
                result: 0,
                out: vec![0; args.out_size as usize + 1],
            }),
            4 => {
                if req.interrupted() {
                    Err(Errno::EINTR)
                } else {
                    Ok(IoctlResult::value(0))
                }
            }
            5 => Err(Errno::UnknownErrno),
            _ => Err(Errno::ENOTTY),
        }
    }

    fn poll(
        &self,
        _req: &Request,
        fh: u64,
        events: u32,
        waiter: Option<PollHandle>,
    ) -> Result<u32, Errno> {
        self.log(Call::Poll(fh, events, waiter.as_ref().map(|w| w.kh())));
        if let Some(w) = waiter {
            self.waiters.lock().unwrap().push(w);
        }
        Ok(libc::POLLOUT as u32)
    }

    fn release(&self, fh: u64) {
        self.log(Call::Release(fh));
    }
}

struct Fixture {
    dev: Arc<TestDev>,
    chan: Arc<Recorder>,
    session: Session,
    proc_root: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let dev = Arc::new(TestDev::default());
        let chan = Arc::new(Recorder::default());
        let proc_root =
            std::env::temp_dir().join(format!("cuse-session-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(proc_root.join(TID.to_string())).unwrap();
        let session = Session::new(dev.clone(), chan.clone()).with_proc_root(&proc_root);
        Fixture {
            dev,
            chan,
            session,
            proc_root,
        }
    }

    /// What `/proc/<TID>/syscall` shows.
    fn caller_in(&self, line: &str) {
        std::fs::write(self.proc_root.join(TID.to_string()).join("syscall"), line).unwrap();
    }

    fn send(&self, msg: &[u8]) -> Vec<Vec<u8>> {
        self.session.handle(msg);
        self.chan.take()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.proc_root);
    }
}

fn init_request(unique: u64, major: u32, minor: u32) -> Vec<u8> {
    request(
        CUSE_INIT,
        unique,
        &le(&[
            &major.to_le_bytes(),
            &minor.to_le_bytes(),
            &0u32.to_le_bytes(),
            &1u32.to_le_bytes(),
        ]),
    )
}

fn params(name: &str) -> InitParams<'_> {
    InitParams {
        name,
        dev_major: 0,
        dev_minor: 0,
        max_read: 131072,
        max_write: 131072,
    }
}

#[test]
fn cuse_init_reply_is_byte_exact() {
    let got = init_reply(&init_request(2, 7, 38), &params("vfio/devices/dev1")).unwrap();
    let info = b"DEVNAME=vfio/devices/dev1\0";
    let mut init_out = le(&[
        &7u32.to_le_bytes(),
        &38u32.to_le_bytes(),
        &0u32.to_le_bytes(),
        &1u32.to_le_bytes(), // CUSE_UNRESTRICTED_IOCTL
        &131072u32.to_le_bytes(),
        &131072u32.to_le_bytes(),
        &0u32.to_le_bytes(),
        &0u32.to_le_bytes(),
    ]);
    init_out.extend([0u8; 40]); // spare[10]
    assert_eq!(init_out.len(), 72);
    let want = reply(0, 2, &le(&[&init_out, info]));
    assert_eq!(got, want);
    assert_eq!(got.len(), 16 + 72 + info.len());
}

#[test]
fn cuse_init_negotiates_minor_and_device_number() {
    let mut p = params("x");
    p.dev_major = 240;
    p.dev_minor = 3;
    let got = init_reply(&init_request(4, 7, 41), &p).unwrap();
    // A newer kernel gets our minor, 38.
    assert_eq!(&got[20..24], &38u32.to_le_bytes());
    // An older one (but >= 11) gets its own.
    let old = init_reply(&init_request(4, 7, 31), &p).unwrap();
    assert_eq!(&old[20..24], &31u32.to_le_bytes());
    assert_eq!(&got[40..44], &240u32.to_le_bytes());
    assert_eq!(&got[44..48], &3u32.to_le_bytes());
    assert!(got.ends_with(b"DEVNAME=x\0"));
}

#[test]
fn cuse_init_refuses_what_it_cannot_speak() {
    let p = params("x");
    for (msg, why) in [
        (init_request(2, 8, 0), "major"),
        (init_request(2, 7, 10), "minor"),
        (init_request(2, 7, 38)[..50].to_vec(), "len"),
        (request(CUSE_INIT, 2, &[0; 8]), "short body"),
        (request(OPEN, 2, &[0; 16]), "opcode"),
        (vec![0; 20], "header"),
    ] {
        assert!(
            matches!(init_reply(&msg, &p), Err(Error::Protocol(_))),
            "{why}"
        );
    }
}

#[test]
fn open_passes_identity_and_returns_fh() {
    let f = Fixture::new("open");
    let got = f.send(&request(
        OPEN,
        10,
        &le(&[&0u32.to_le_bytes(), &0u32.to_le_bytes()]),
    ));
    let want = reply(
        0,
        10,
        &le(&[&0x1122_3344_5566_7788u64.to_le_bytes(), &[0u8; 8]]),
    );
    assert_eq!(got, vec![want]);
    assert_eq!(f.dev.calls(), vec![Call::Open(TID, UID, GID, 0)]);
    // A handler error is the reply's errno.
    let got = f.send(&request(
        OPEN,
        12,
        &le(&[&(libc::O_RDWR as u32).to_le_bytes(), &0u32.to_le_bytes()]),
    ));
    assert_eq!(got, vec![errno_reply(Errno::EACCES, 12)]);
    assert_eq!(f.session.in_flight(), 0);
}

#[test]
fn read_gets_the_real_offset_and_returns_data() {
    let f = Fixture::new("read");
    // Blocked in pread64(fd, buf, 0x40000, 0x30000000010); this request is
    // the second 128 KiB piece.
    f.caller_in("17 0x3 0x7f0000000000 0x40000 0x30000000010 0x0 0x0 0x7ffd0 0x7f1\n");
    let got = f.send(&request(READ, 20, &read_in(9, 0x20000, 16)));
    assert_eq!(got, vec![reply(0, 20, &[0xab; 8])]);
    assert_eq!(
        f.dev.calls(),
        vec![Call::Read(9, 16, Offset::At(0x300_0002_0010))]
    );
    // Plain read(2): a stream.
    f.caller_in("0 0x3 0x7f0000000000 0x40000 0x0 0x0 0x0 0x7ffd0 0x7f1\n");
    f.send(&request(READ, 22, &read_in(9, 0, 4)));
    assert_eq!(
        f.dev.calls(),
        vec![Call::Read(9, 4, Offset::Stream { within: 0 })]
    );
    // A vanished caller: Unknown, never a silent 0.
    std::fs::remove_file(f.proc_root.join(TID.to_string()).join("syscall")).unwrap();
    f.send(&request(READ, 24, &read_in(9, 0, 4)));
    match &f.dev.calls()[..] {
        [Call::Read(9, 4, Offset::Unknown { within: 0, reason })] => {
            assert!(matches!(reason, OffsetError::Unreadable { tid: TID, .. }))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn read_answer_longer_than_asked_is_eio() {
    let f = Fixture::new("readlong");
    f.caller_in("17 0x3 0x0 0x7 0x0 0x0 0x0 0x0 0x0\n");
    let got = f.send(&request(READ, 26, &read_in(1, 0, 7)));
    assert_eq!(got, vec![errno_reply(Errno::EIO, 26)]);
}

#[test]
fn write_passes_data_and_offset() {
    let f = Fixture::new("write");
    f.caller_in("18 0x3 0x7f00 0x5 0x12345 0x0 0x0 0x0 0x0\n");
    let body = le(&[
        &5u64.to_le_bytes(),
        &0u64.to_le_bytes(),
        &5u32.to_le_bytes(),
        &[0u8; 20],
        b"hello",
    ]);
    let got = f.send(&request(WRITE, 30, &body));
    assert_eq!(
        got,
        vec![reply(
            0,
            30,
            &le(&[&4u32.to_le_bytes(), &0u32.to_le_bytes()])
        )]
    );
    assert_eq!(
        f.dev.calls(),
        vec![Call::Write(5, b"hello".to_vec(), Offset::At(0x12345))]
    );
    // Claiming more than given is a server bug: EIO.
    let lie = le(&[
        &5u64.to_le_bytes(),
        &0u64.to_le_bytes(),
        &3u32.to_le_bytes(),
        &[0u8; 20],
        b"lie",
    ]);
    assert_eq!(
        f.send(&request(WRITE, 32, &lie)),
        vec![errno_reply(Errno::EIO, 32)]
    );
    // Fewer data bytes than write_in.size: malformed, handler not called.
    let short = le(&[
        &5u64.to_le_bytes(),
        &0u64.to_le_bytes(),
        &9u32.to_le_bytes(),
        &[0u8; 20],
        b"abc",
    ]);
    f.dev.calls();
    assert_eq!(
        f.send(&request(WRITE, 34, &short)),
        vec![errno_reply(Errno::EIO, 34)]
    );
    assert_eq!(f.dev.calls(), vec![]);
}

#[test]
fn ioctl_result_and_output() {
    let f = Fixture::new("ioctl");
    let got = f.send(&request(
        IOCTL,
        40,
        &ioctl_in(7, 2, 1, 0xdead_beef, b"xyz", 3),
    ));
    let want = reply(0, 40, &le(&[&42i32.to_le_bytes(), &[0u8; 12], b"zyx"]));
    assert_eq!(got, vec![want]);
    assert_eq!(
        f.dev.calls(),
        vec![Call::Ioctl(7, 1, 0xdead_beef, b"xyz".to_vec(), 3)]
    );
    // Unknown command: the handler's ENOTTY.
    assert_eq!(
        f.send(&request(IOCTL, 42, &ioctl_in(7, 2, 99, 0, b"", 0))),
        vec![errno_reply(Errno::ENOTTY, 42)]
    );
    // More output than out_size: EIO.
    assert_eq!(
        f.send(&request(IOCTL, 44, &ioctl_in(7, 2, 3, 0, b"", 4))),
        vec![errno_reply(Errno::EIO, 44)]
    );
    // An invalid errno from the handler becomes EIO.
    assert_eq!(
        f.send(&request(IOCTL, 46, &ioctl_in(7, 2, 5, 0, b"", 0))),
        vec![errno_reply(Errno::EIO, 46)]
    );
}

#[test]
fn compat_ioctls_are_refused_before_the_handler() {
    let f = Fixture::new("compat");
    for (unique, flags) in [(50u64, 1u32 | 2), (52, 2 | 8), (54, 1 | 2 | 8 | 32)] {
        assert_eq!(
            f.send(&request(IOCTL, unique, &ioctl_in(7, flags, 1, 0, b"", 0))),
            vec![errno_reply(Errno::ENOTTY, unique)]
        );
    }
    assert_eq!(f.dev.calls(), vec![]);
}

#[test]
fn a_panicking_handler_is_answered_eio() {
    let f = Fixture::new("panic");
    assert_eq!(
        f.send(&request(IOCTL, 60, &ioctl_in(7, 2, 2, 0, b"", 0))),
        vec![errno_reply(Errno::EIO, 60)]
    );
    assert_eq!(f.session.in_flight(), 0);
    // The session keeps working.
    assert_eq!(
        f.send(&request(IOCTL, 62, &ioctl_in(7, 2, 1, 0, b"", 0)))
            .len(),
        1
    );
}

#[test]
fn poll_with_and_without_notify() {
    let f = Fixture::new("poll");
    let got = f.send(&request(
        POLL,
        70,
        &poll_in(3, 0x77, 1, libc::POLLIN as u32),
    ));
    assert_eq!(
        got,
        vec![reply(
            0,
            70,
            &le(&[&(libc::POLLOUT as u32).to_le_bytes(), &0u32.to_le_bytes()])
        )]
    );
    assert_eq!(
        f.dev.calls(),
        vec![Call::Poll(3, libc::POLLIN as u32, Some(0x77))]
    );
    f.send(&request(
        POLL,
        72,
        &poll_in(3, 0x78, 0, libc::POLLIN as u32),
    ));
    assert_eq!(
        f.dev.calls(),
        vec![Call::Poll(3, libc::POLLIN as u32, None)]
    );

    // The kept handle writes a FUSE_NOTIFY_POLL message.
    let waiter = f.dev.waiters.lock().unwrap().pop().unwrap();
    waiter.notify().unwrap();
    assert_eq!(f.chan.take(), vec![reply(1, 0, &0x77u64.to_le_bytes())]);
    // Once the channel is gone, notify fails cleanly.
    drop(f);
    assert_eq!(waiter.notify(), Err(Errno::ENOTCONN));
}

#[test]
fn default_poll_is_ready_never_enosys() {
    struct Plain;
    impl Device for Plain {}
    let chan = Arc::new(Recorder::default());
    let s = Session::new(Arc::new(Plain), chan.clone());
    s.handle(&request(POLL, 80, &poll_in(0, 1, 1, 0xffff)));
    assert_eq!(
        chan.take(),
        vec![reply(
            0,
            80,
            &le(&[&DEFAULT_POLL_MASK.to_le_bytes(), &0u32.to_le_bytes()])
        )]
    );
    // Other defaults behave like a driver without the method.
    s.handle(&request(READ, 82, &read_in(0, 0, 10)));
    s.handle(&request(IOCTL, 84, &ioctl_in(0, 2, 1, 0, b"", 0)));
    assert_eq!(
        chan.take(),
        vec![
            errno_reply(Errno::EINVAL, 82),
            errno_reply(Errno::ENOTTY, 84)
        ]
    );
}

#[test]
fn release_is_answered_without_body() {
    let f = Fixture::new("release");
    let body = le(&[
        &0xabcu64.to_le_bytes(),
        &0u32.to_le_bytes(),
        &0u32.to_le_bytes(),
        &0u64.to_le_bytes(),
    ]);
    assert_eq!(
        f.send(&request(RELEASE, 90, &body)),
        vec![reply(0, 90, &[])]
    );
    assert_eq!(f.dev.calls(), vec![Call::Release(0xabc)]);
}

#[test]
fn malformed_messages() {
    let f = Fixture::new("malformed");
    // Truncated header: no unique to answer; nothing sent, nothing called.
    assert_eq!(
        f.send(&request(OPEN, 100, &[0; 8])[..30]),
        Vec::<Vec<u8>>::new()
    );
    // Header length disagrees with the bytes read: EIO.
    let mut m = request(OPEN, 102, &[0; 8]);
    m.push(0);
    assert_eq!(f.send(&m), vec![errno_reply(Errno::EIO, 102)]);
    // Truncated bodies: EIO, handler not called.
    assert_eq!(
        f.send(&request(OPEN, 104, &[0; 4])),
        vec![errno_reply(Errno::EIO, 104)]
    );
    assert_eq!(
        f.send(&request(READ, 106, &[0; 39])),
        vec![errno_reply(Errno::EIO, 106)]
    );
    assert_eq!(
        f.send(&request(POLL, 108, &[0; 23])),
        vec![errno_reply(Errno::EIO, 108)]
    );
    assert_eq!(
        f.send(&request(RELEASE, 110, &[])),
        vec![errno_reply(Errno::EIO, 110)]
    );
    let mut short_ioctl = ioctl_in(0, 2, 1, 0, b"abcd", 0);
    short_ioctl.truncate(34); // claims 4 input bytes, has 2
    assert_eq!(
        f.send(&request(IOCTL, 112, &short_ioctl)),
        vec![errno_reply(Errno::EIO, 112)]
    );
    // Unknown opcode (FUSE_LOOKUP): ENOSYS.
    assert_eq!(
        f.send(&request(1, 114, &[])),
        vec![errno_reply(Errno::ENOSYS, 114)]
    );
    // Not served by CUSE: ENOSYS; a second CUSE_INIT too.
    assert_eq!(
        f.send(&request(FLUSH, 116, &[0; 24])),
        vec![errno_reply(Errno::ENOSYS, 116)]
    );
    assert_eq!(
        f.send(&init_request(118, 7, 38)),
        vec![errno_reply(Errno::ENOSYS, 118)]
    );
    // FORGET is never answered.
    assert_eq!(
        f.send(&request(FORGET, 120, &[0; 8])),
        Vec::<Vec<u8>>::new()
    );
    assert_eq!(f.dev.calls(), vec![]);
    assert_eq!(f.session.in_flight(), 0);
}

#[test]
fn interrupt_bookkeeping() {
    let f = Fixture::new("interrupt");
    // A slow ioctl is accepted (in flight) but not yet run.
    let msg = request(IOCTL, 200, &ioctl_in(1, 2, 4, 0, b"", 0));
    let work = f.session.accept(&msg).unwrap();
    assert_eq!(work.unique(), 200);
    assert_eq!(f.session.in_flight(), 1);
    // INTERRUPT naming it (its own unique has FUSE_INT_REQ_BIT): no reply.
    assert!(f
        .session
        .accept(&request(INTERRUPT, 201, &200u64.to_le_bytes()))
        .is_none());
    assert_eq!(f.chan.take(), Vec::<Vec<u8>>::new());
    // The handler sees it and answers EINTR.
    f.session.run(work, &msg);
    assert_eq!(f.chan.take(), vec![errno_reply(Errno::EINTR, 200)]);
    assert_eq!(f.session.in_flight(), 0);
    // An INTERRUPT for a request not in flight: EAGAIN to the interrupt's
    // unique, so the kernel requeues it if the request still exists.
    f.session
        .accept(&request(INTERRUPT, 203, &202u64.to_le_bytes()));
    assert_eq!(f.chan.take(), vec![errno_reply(Errno::EAGAIN, 203)]);
    // A malformed INTERRUPT is ignored.
    f.session.accept(&request(INTERRUPT, 205, &[1, 2]));
    assert_eq!(f.chan.take(), Vec::<Vec<u8>>::new());
    // Without an interrupt the same ioctl succeeds.
    assert_eq!(
        f.send(&request(IOCTL, 206, &ioctl_in(1, 2, 4, 0, b"", 0))),
        vec![reply(0, 206, &[0; 16])]
    );
}

#[test]
fn interrupt_all_reaches_every_request_in_flight() {
    let f = Fixture::new("interruptall");
    let msg_a = request(IOCTL, 300, &ioctl_in(1, 2, 4, 0, b"", 0));
    let msg_b = request(IOCTL, 302, &ioctl_in(1, 2, 4, 0, b"", 0));
    let a = f.session.accept(&msg_a).unwrap();
    let b = f.session.accept(&msg_b).unwrap();
    f.session.interrupt_all();
    f.session.run(b, &msg_b);
    f.session.run(a, &msg_a);
    assert_eq!(
        f.chan.take(),
        vec![
            errno_reply(Errno::EINTR, 302),
            errno_reply(Errno::EINTR, 300)
        ]
    );
}

#[test]
fn a_reply_dropped_unanswered_answers_eio() {
    let f = Fixture::new("drop");
    let work = f.session.accept(&request(OPEN, 400, &[0; 8])).unwrap();
    assert_eq!(f.session.in_flight(), 1);
    {
        let _reply = Reply::new(&f.session, work.unique());
    }
    assert_eq!(f.chan.take(), vec![errno_reply(Errno::EIO, 400)]);
    assert_eq!(f.session.in_flight(), 0);
    // Answered replies send exactly once.
    Reply::new(&f.session, 402).error(Errno::EPERM);
    Reply::new(&f.session, 404).ok(b"ab", b"c");
    assert_eq!(
        f.chan.take(),
        vec![errno_reply(Errno::EPERM, 402), reply(0, 404, b"abc")]
    );
}

#[test]
fn requests_from_other_threads_run_concurrently() {
    // Two accepted requests run on two threads; the second finishes while
    // the first still waits: a slow handler does not hold up the session.
    struct Gate(Mutex<bool>, std::sync::Condvar);
    impl Device for Gate {
        fn ioctl(&self, _r: &Request, _fh: u64, a: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
            if a.cmd == 1 {
                let mut open = self.0.lock().unwrap();
                while !*open {
                    open = self.1.wait(open).unwrap();
                }
            }
            Ok(IoctlResult::value(a.cmd as i32))
        }
    }
    let gate = Arc::new(Gate(Mutex::new(false), std::sync::Condvar::new()));
    let chan = Arc::new(Recorder::default());
    let s = Arc::new(Session::new(gate.clone(), chan.clone()));
    let slow_msg = request(IOCTL, 500, &ioctl_in(0, 2, 1, 0, b"", 0));
    let fast_msg = request(IOCTL, 502, &ioctl_in(0, 2, 2, 0, b"", 0));
    let slow = s.accept(&slow_msg).unwrap();
    let fast = s.accept(&fast_msg).unwrap();
    let s2 = s.clone();
    let t = std::thread::spawn(move || s2.run(slow, &slow_msg));
    s.run(fast, &fast_msg);
    let ioctl_ok = |v: i32| le(&[&v.to_le_bytes(), &[0u8; 12]]);
    assert_eq!(chan.take(), vec![reply(0, 502, &ioctl_ok(2))]);
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    t.join().unwrap();
    assert_eq!(chan.take(), vec![reply(0, 500, &ioctl_ok(1))]);
}

#[test]
fn request_for_caller_is_usable_in_device_tests() {
    // Device implementations can be unit-tested on their own process.
    let req = Request::for_caller(nix::unistd::gettid().as_raw() as u32, 0, 0);
    let value: u64 = 21;
    let dev = TestDev::default();
    let res = dev.ioctl(
        &req,
        0,
        IoctlArgs {
            cmd: 1,
            arg: &value as *const u64 as u64,
            input: b"ab",
            out_size: 2,
        },
    );
    assert_eq!(
        res,
        Ok(IoctlResult {
            result: 42,
            out: b"ba".to_vec()
        })
    );
    assert_eq!(req.read_obj::<u64>(&value as *const u64 as u64), Ok(21));
    assert!(Path::new("/proc/self").exists());
}

#[test]
fn work_after_the_reply_and_an_interrupt_the_server_provoked() {
    // The handler declares the INTERRUPT it is about to provoke, lets the
    // test deliver it, then answers a placeholder error and leaves work
    // that runs once that answer is on the channel.
    use std::sync::mpsc;
    struct Injector {
        chan: Arc<Recorder>,
        reached: Mutex<mpsc::Sender<()>>,
        go: Mutex<mpsc::Receiver<()>>,
        seen: Arc<Mutex<Vec<String>>>,
    }
    impl Device for Injector {
        fn ioctl(&self, req: &Request, _fh: u64, a: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
            if a.cmd == 1 {
                req.expect_interrupt();
            }
            self.reached.lock().unwrap().send(()).unwrap();
            self.go.lock().unwrap().recv().unwrap();
            self.seen
                .lock()
                .unwrap()
                .push(format!("interrupted={}", req.interrupted()));
            let (chan, seen) = (self.chan.clone(), self.seen.clone());
            req.after_reply(move || {
                let replies = chan.0.lock().unwrap().len();
                seen.lock()
                    .unwrap()
                    .push(format!("after, replies={replies}"));
            });
            Err(Errno::EFAULT)
        }
    }
    let chan = Arc::new(Recorder::default());
    let (reached_tx, reached) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let dev = Arc::new(Injector {
        chan: chan.clone(),
        reached: Mutex::new(reached_tx),
        go: Mutex::new(go_rx),
        seen: seen.clone(),
    });
    let s = Arc::new(Session::new(dev, chan.clone()));
    for (cmd, interrupted) in [(1u32, "false"), (2, "true")] {
        let unique = 600 + 10 * cmd as u64;
        let msg = request(IOCTL, unique, &ioctl_in(0, 2, cmd, 0, b"", 0));
        let work = s.accept(&msg).unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.run(work, &msg));
        reached.recv().unwrap();
        assert!(s
            .accept(&request(INTERRUPT, unique + 1, &unique.to_le_bytes()))
            .is_none());
        go.send(()).unwrap();
        t.join().unwrap();
        // No reply to the INTERRUPT itself; the request's one reply.
        assert_eq!(chan.take(), vec![errno_reply(Errno::EFAULT, unique)]);
        assert_eq!(
            std::mem::take(&mut *seen.lock().unwrap()),
            vec![
                format!("interrupted={interrupted}"),
                "after, replies=1".into()
            ]
        );
        assert_eq!(s.in_flight(), 0);
    }
}

#[test]
fn reply_instead_overrides_the_handlers_answer() {
    // A handler that leaves the real answer to work after the reply gives
    // the caller a provisional errno in case that work never reaches it.
    struct Provisional;
    impl Device for Provisional {
        fn ioctl(&self, req: &Request, _fh: u64, a: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
            if a.cmd == 1 {
                req.reply_instead(Errno::EFAULT);
            }
            Ok(IoctlResult::value(5))
        }
    }
    let chan = Arc::new(Recorder::default());
    let s = Session::new(Arc::new(Provisional), chan.clone());
    let msg = request(IOCTL, 700, &ioctl_in(0, 2, 1, 0, b"", 0));
    s.run(s.accept(&msg).unwrap(), &msg);
    assert_eq!(chan.take(), vec![errno_reply(Errno::EFAULT, 700)]);
    // Another request of the same handler is answered as the handler says.
    let msg = request(IOCTL, 701, &ioctl_in(0, 2, 2, 0, b"", 0));
    s.run(s.accept(&msg).unwrap(), &msg);
    let replies = chan.take();
    assert_eq!(replies.len(), 1);
    assert_ne!(replies[0], errno_reply(Errno::EFAULT, 701));
}
