//! The CUSE wire layer (crate `cuse-server`): request messages as the
//! kernel could send them, mutated, through `Session` and an in-memory
//! `Channel`; and `wire::Cursor` over arbitrary bytes.

use std::io::IoSlice;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cuse_server::wire::*;
use cuse_server::{
    Channel, Device, Errno, IoctlArgs, IoctlResult, Offset, OpenFlags, PollHandle, Request, Session,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::Target;
use crate::gen::{mutate, Rng};

/// `Session::accept`/`run`/`handle` on generated requests.
pub const SESSION: Target = Target {
    name: "cuse-session",
    about: "CUSE requests (every opcode, valid then mutated) through Session and an in-memory \
            channel: at most one reply per request, each well formed and for that request, \
            exactly one for a valid one, nothing left in flight",
    cap: None,
    make: || {
        let mut target = SessionTarget::new();
        Box::new(move |rng| target.one(rng))
    },
};

/// `wire::Cursor` on arbitrary bytes.
pub const CURSOR: Target = Target {
    name: "cuse-cursor",
    about: "wire::Cursor over arbitrary bytes, random takes of every wire struct: a take \
            succeeds exactly when enough bytes remain, copies them, and consumes them",
    cap: None,
    make: || Box::new(cursor_one),
};

/// Collects what the session sends.
#[derive(Default)]
struct Sink(Mutex<Vec<Vec<u8>>>);

impl Channel for Sink {
    fn send(&self, parts: &[IoSlice<'_>]) -> Result<(), Errno> {
        let msg = parts.iter().flat_map(|p| p.iter().copied()).collect();
        self.0.lock().unwrap().push(msg);
        Ok(())
    }
}

impl Sink {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A device whose answers depend on the request only, including the
/// wrong ones the session must catch: too long a read, too many bytes
/// written, too much ioctl output, invalid errnos, panics. It never touches
/// a caller's memory or fds (the caller ids are random).
struct Canned;

impl Device for Canned {
    fn open(&self, _req: &Request, flags: OpenFlags) -> Result<u64, Errno> {
        match flags.0 % 5 {
            0 => Err(Errno::EACCES),
            _ => Ok(u64::from(flags.0)),
        }
    }

    fn read(&self, _req: &Request, fh: u64, size: u32, _offset: Offset) -> Result<Vec<u8>, Errno> {
        // fh % 7 == 0: one byte more than asked (the session answers EIO).
        let n = (size as usize).min(256) + usize::from(fh % 7 == 0);
        Ok(vec![0xA5; n])
    }

    fn write(&self, _req: &Request, fh: u64, data: &[u8], _off: Offset) -> Result<u32, Errno> {
        Ok(data.len() as u32 + u32::from(fh % 7 == 0))
    }

    fn ioctl(&self, _req: &Request, _fh: u64, args: IoctlArgs<'_>) -> Result<IoctlResult, Errno> {
        match args.cmd % 6 {
            0 => Ok(IoctlResult::value(args.cmd as i32)),
            1 => Ok(IoctlResult {
                result: 0,
                out: vec![1; (args.out_size as usize).min(4096)],
            }),
            2 => Ok(IoctlResult {
                result: 0,
                out: vec![2; (args.out_size as usize).min(4096) + 1],
            }),
            3 => Err(Errno::from_raw((args.cmd >> 8) as i32 % 1024 - 8)),
            4 if args.cmd & 0x100 != 0 => panic!("a handler panics"),
            _ => Ok(IoctlResult::value(args.input.len() as i32)),
        }
    }

    fn poll(
        &self,
        _req: &Request,
        _fh: u64,
        events: u32,
        _waiter: Option<PollHandle>,
    ) -> Result<u32, Errno> {
        Ok(events)
    }

    fn release(&self, _fh: u64) {}
}

struct SessionTarget {
    sink: Arc<Sink>,
    session: Session,
}

const OPCODES: [u32; 13] = [
    Opcode::Open as u32,
    Opcode::Read as u32,
    Opcode::Write as u32,
    Opcode::Release as u32,
    Opcode::Ioctl as u32,
    Opcode::Poll as u32,
    Opcode::Interrupt as u32,
    Opcode::Forget as u32,
    Opcode::BatchForget as u32,
    Opcode::Flush as u32,
    Opcode::Destroy as u32,
    Opcode::CuseInit as u32,
    1, // FUSE_LOOKUP: not a CUSE opcode
];

impl SessionTarget {
    fn new() -> Self {
        let sink = Arc::new(Sink::default());
        // No caller exists: the offset lookup of READ/WRITE finds nothing
        // under this root and answers "unknown offset".
        let session = Session::new(Arc::new(Canned), sink.clone())
            .with_proc_root(Path::new("/nonexistent/fuzz-proc"));
        SessionTarget { sink, session }
    }

    /// One input: a single message, or an accepted request, an INTERRUPT
    /// (perhaps for it) and then the request's run.
    fn one(&mut self, rng: &mut Rng) {
        if rng.chance(1, 4) {
            self.interrupted(rng);
            return;
        }
        let opcode = *rng.pick(&OPCODES);
        let unique = rng.next_u64() | 1;
        let valid = valid_request(rng, opcode, unique);
        let mutated = rng.chance(3, 4);
        let mut msg = valid.clone();
        if mutated {
            mutate(rng, &mut msg);
            if rng.chance(2, 3) && msg.len() >= 4 {
                // Mostly keep the length consistent, to get past the first
                // check into the bodies.
                let len = (msg.len() as u32).to_le_bytes();
                msg[..4].copy_from_slice(&len);
            }
        }
        self.session.handle(&msg);
        let replies = self.sink.take();
        check_replies(&msg, &replies);
        if !mutated || msg == valid {
            let expect = usize::from(!matches!(
                Opcode::try_from(opcode),
                Ok(Opcode::Forget | Opcode::BatchForget)
            ));
            assert_eq!(
                replies.len(),
                expect,
                "a valid request answered {} times",
                replies.len()
            );
        }
        assert_eq!(self.session.in_flight(), 0, "a request left in flight");
    }

    fn interrupted(&mut self, rng: &mut Rng) {
        let opcode = *rng.pick(&[
            Opcode::Ioctl as u32,
            Opcode::Read as u32,
            Opcode::Poll as u32,
        ]);
        let unique = rng.next_u64() | 1;
        let msg = valid_request(rng, opcode, unique);
        let work = self
            .session
            .accept(&msg)
            .expect("a valid request is accepted");
        assert_eq!(self.session.in_flight(), 1);
        let target = if rng.chance(1, 2) {
            unique
        } else {
            rng.next_u64()
        };
        let mut intr = request(
            rng,
            Opcode::Interrupt as u32,
            unique.wrapping_add(1),
            FuseInterruptIn { unique: target }.as_bytes(),
        );
        if rng.chance(1, 2) {
            mutate(rng, &mut intr);
        }
        self.session.handle(&intr);
        let replies = self.sink.take();
        check_replies(&intr, &replies);
        if rng.chance(1, 4) {
            self.session.refuse(work, Errno::EINTR);
        } else {
            self.session.run(work, &msg);
        }
        let replies = self.sink.take();
        check_replies(&msg, &replies);
        assert_eq!(
            replies.len(),
            1,
            "an accepted request answered {} times",
            replies.len()
        );
        assert_eq!(self.session.in_flight(), 0, "a request left in flight");
    }
}

/// A fuse_in_header + `body` message.
fn request(rng: &mut Rng, opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
    let header = FuseInHeader {
        len: (std::mem::size_of::<FuseInHeader>() + body.len()) as u32,
        opcode,
        unique,
        nodeid: rng.below(3),
        uid: rng.interesting() as u32,
        gid: rng.interesting() as u32,
        pid: rng.interesting() as u32,
        total_extlen: 0,
        padding: 0,
    };
    let mut m = header.as_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

/// A well-formed request of `opcode` with random field values.
fn valid_request(rng: &mut Rng, opcode: u32, unique: u64) -> Vec<u8> {
    let fh = rng.interesting();
    let mut body = match Opcode::try_from(opcode) {
        Ok(Opcode::Open) => FuseOpenIn {
            flags: rng.interesting() as u32,
            open_flags: 0,
        }
        .as_bytes()
        .to_vec(),
        Ok(Opcode::Read) => FuseReadIn {
            fh,
            offset: rng.interesting(),
            size: rng.below(1 << 17) as u32,
            ..Default::default()
        }
        .as_bytes()
        .to_vec(),
        Ok(Opcode::Write) => {
            let data = rng.some_bytes(300);
            let mut b = FuseWriteIn {
                fh,
                offset: rng.interesting(),
                size: data.len() as u32,
                ..Default::default()
            }
            .as_bytes()
            .to_vec();
            b.extend(data);
            b
        }
        Ok(Opcode::Release) => FuseReleaseIn {
            fh,
            ..Default::default()
        }
        .as_bytes()
        .to_vec(),
        Ok(Opcode::Ioctl) => {
            let input = rng.some_bytes(64);
            let flags = if rng.chance(1, 8) {
                rng.interesting() as u32
            } else {
                2 // FUSE_IOCTL_UNRESTRICTED
            };
            let mut b = FuseIoctlIn {
                fh,
                flags,
                cmd: rng.interesting() as u32,
                arg: rng.interesting(),
                in_size: input.len() as u32,
                out_size: rng.below(8192) as u32,
            }
            .as_bytes()
            .to_vec();
            b.extend(input);
            b
        }
        Ok(Opcode::Poll) => FusePollIn {
            fh,
            kh: rng.next_u64(),
            flags: rng.below(2) as u32,
            events: rng.interesting() as u32,
        }
        .as_bytes()
        .to_vec(),
        Ok(Opcode::Interrupt) => FuseInterruptIn {
            unique: rng.next_u64(),
        }
        .as_bytes()
        .to_vec(),
        Ok(Opcode::CuseInit) => CuseInitIn {
            major: 7,
            minor: 38,
            unused: 0,
            flags: rng.interesting() as u32,
        }
        .as_bytes()
        .to_vec(),
        _ => rng.some_bytes(16),
    };
    if body.is_empty() && rng.chance(1, 2) {
        body = rng.bytes(8);
    }
    request(rng, opcode, unique, &body)
}

/// Every reply is a whole fuse_out_header message for the request sent,
/// with an errno in range and no body after an error.
fn check_replies(sent: &[u8], replies: &[Vec<u8>]) {
    assert!(
        replies.len() <= 1,
        "{} replies to one message",
        replies.len()
    );
    let Some(reply) = replies.first() else { return };
    let (header, _) = FuseOutHeader::read_from_prefix(reply).expect("a reply holds its header");
    assert_eq!(header.len as usize, reply.len(), "reply length field");
    let sent_unique = FuseInHeader::read_from_prefix(sent)
        .map(|(h, _)| h.unique)
        .expect("a message without a header is not answered");
    assert_eq!(header.unique, sent_unique, "reply for another request");
    assert!((-511..=0).contains(&header.error), "errno {}", header.error);
    if header.error != 0 {
        assert_eq!(
            reply.len(),
            std::mem::size_of::<FuseOutHeader>(),
            "body after an error"
        );
    } else {
        check_answer(sent, &reply[std::mem::size_of::<FuseOutHeader>()..]);
    }
}

/// A successful answer fits the request: never more data than the kernel
/// asked for (it would fail the reply, or worse).
fn check_answer(sent: &[u8], body: &[u8]) {
    let Ok((header, rest)) = FuseInHeader::read_from_prefix(sent) else {
        return;
    };
    match Opcode::try_from(header.opcode) {
        Ok(Opcode::Open) => assert_eq!(body.len(), std::mem::size_of::<FuseOpenOut>()),
        Ok(Opcode::Read) => {
            let (read, _) = FuseReadIn::read_from_prefix(rest).expect("a READ answered");
            assert!(
                body.len() <= read.size as usize,
                "{} bytes read for {}",
                body.len(),
                read.size
            );
        }
        Ok(Opcode::Write) => {
            let (write, _) = FuseWriteIn::read_from_prefix(rest).expect("a WRITE answered");
            let (out, _) = FuseWriteOut::read_from_prefix(body).expect("fuse_write_out");
            assert_eq!(body.len(), std::mem::size_of::<FuseWriteOut>());
            assert!(
                out.size <= write.size,
                "{} bytes written of {}",
                out.size,
                write.size
            );
        }
        Ok(Opcode::Ioctl) => {
            let (ioctl, _) = FuseIoctlIn::read_from_prefix(rest).expect("an IOCTL answered");
            let out = body.len() - std::mem::size_of::<FuseIoctlOut>();
            assert!(
                out <= ioctl.out_size as usize,
                "{out} output bytes for {}",
                ioctl.out_size
            );
        }
        Ok(Opcode::Poll) => assert_eq!(body.len(), std::mem::size_of::<FusePollOut>()),
        Ok(Opcode::Release) => assert!(body.is_empty()),
        other => panic!("{other:?} answered with success"),
    }
}

fn take_checked<T: FromBytes + IntoBytes + KnownLayout + Immutable>(
    input: &[u8],
    cur: &mut Cursor<'_>,
) {
    let before = cur.remaining();
    let at = input.len() - before;
    match cur.take::<T>("fuzzed") {
        Ok(v) => {
            let size = std::mem::size_of::<T>();
            assert!(before >= size);
            assert_eq!(cur.remaining(), before - size);
            assert_eq!(v.as_bytes(), &input[at..at + size]);
        }
        Err(_) => {
            assert!(before < std::mem::size_of::<T>());
            assert_eq!(cur.remaining(), before, "a failed take consumed bytes");
        }
    }
}

fn cursor_one(rng: &mut Rng) {
    let len = rng.below(256) as usize;
    let input = rng.bytes(len);
    let mut cur = Cursor::new(&input);
    for _ in 0..rng.below(12) {
        match rng.below(8) {
            0 => take_checked::<FuseInHeader>(&input, &mut cur),
            1 => take_checked::<FuseIoctlIn>(&input, &mut cur),
            2 => take_checked::<FuseWriteIn>(&input, &mut cur),
            3 => take_checked::<FuseInterruptIn>(&input, &mut cur),
            4 => take_checked::<CuseInitIn>(&input, &mut cur),
            5 => take_checked::<FusePollIn>(&input, &mut cur),
            _ => {
                let before = cur.remaining();
                let n = rng.interesting() as usize % 300;
                match cur.take_bytes(n, "fuzzed bytes") {
                    Ok(b) => {
                        assert_eq!(b.len(), n);
                        assert_eq!(cur.remaining(), before - n);
                    }
                    Err(_) => {
                        assert!(n > before);
                        assert_eq!(cur.remaining(), before);
                    }
                }
            }
        }
    }
}
