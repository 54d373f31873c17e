//! The `/dev/ioasid` decode layer against the engine's fake backend and a
//! fake caller memory: argument sizes, flags, reserved fields, addresses,
//! and the full happy path with the bytes written back decoded.

use std::sync::Arc;

use cuse_ioasid::ioctl::{dispatch, IOASID_TABLE, MAX_TAIL};
use ioasid_engine::fake::{FakeBackend, FakeCall, FAKE_IOVA_RANGES, FAKE_PGSIZES};
use ioasid_engine::{ContextId, DeviceId, DeviceSpec, Engine};
use ioasid_uapi::*;
use ioctl_table::fake::FakeCaller;
use nix::errno::Errno;
use zerocopy::IntoBytes;

const PID: i32 = 4242;
/// Shared memory of PID, for maps.
const MEM: u64 = 0x4000_0000;
const K4: u64 = 4096;
/// The fake caller memory: `[BASE, BASE + LEN)`.
const BASE: u64 = 0x10_0000;
const LEN: usize = 0x8000;
/// Where the argument struct goes.
const ARG: u64 = BASE + 0x100;
const DEV: DeviceId = DeviceId(1);

/// A caller's memory: one byte buffer of LEN bytes at BASE; everything
/// else faults. The calling thread is PID.
type Caller = FakeCaller;

fn new_caller() -> Caller {
    FakeCaller::new(BASE, vec![0; LEN], PID)
}

struct Fixture {
    fake: Arc<FakeBackend>,
    engine: Arc<Engine>,
    ctx: ContextId,
    mem: Caller,
}

impl Fixture {
    fn new() -> Self {
        let fake = Arc::new(FakeBackend::new());
        fake.share(PID, MEM, 16 << 20);
        let engine = Engine::new(
            fake.clone(),
            vec![DeviceSpec {
                id: DEV,
                name: "0000:00:03.0".into(),
                group: 3,
            }],
        )
        .unwrap();
        let ctx = engine.open_context();
        Fixture {
            fake,
            engine,
            ctx,
            mem: new_caller(),
        }
    }

    /// A fixture with IOASID 1 attached to the device.
    fn attached() -> Self {
        let f = Self::new();
        assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(1));
        f.engine.bind(DEV, f.ctx).unwrap();
        f.engine.attach(DEV, f.ctx, &1, 1, None).unwrap();
        f
    }

    fn ioctl(&self, cmd: u32, arg: u64) -> Result<i32, Errno> {
        dispatch(&self.engine, self.ctx, &self.mem, cmd, arg)
    }

    fn ioctl_struct<T: IntoBytes + zerocopy::Immutable>(
        &self,
        cmd: u32,
        s: &T,
    ) -> Result<i32, Errno> {
        self.mem.put(ARG, s.as_bytes());
        self.ioctl(cmd, ARG)
    }
}

fn map(ioasid: u32, iova: u64, vaddr: u64, size: u64) -> IoasidDmaMap {
    IoasidDmaMap {
        argsz: std::mem::size_of::<IoasidDmaMap>() as u32,
        flags: IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE,
        ioasid,
        reserved: 0,
        vaddr,
        iova,
        size,
    }
}

fn unmap(ioasid: u32, iova: u64, size: u64) -> IoasidDmaUnmap {
    IoasidDmaUnmap {
        argsz: std::mem::size_of::<IoasidDmaUnmap>() as u32,
        flags: 0,
        ioasid,
        reserved: 0,
        iova,
        size,
    }
}

fn reg(vaddr: u64, size: u64) -> IoasidRegisterMemory {
    IoasidRegisterMemory {
        argsz: std::mem::size_of::<IoasidRegisterMemory>() as u32,
        flags: 0,
        vaddr,
        size,
    }
}

/// Set up the RFC's nesting: IOASID 1 (attached) maps GPA [0, 1 MiB) to
/// MEM; IOASID 2 is its child, with the device attached to it too.
fn nest(f: &Fixture) {
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(1, 0, MEM, 1 << 20)),
        Ok(0)
    );
    assert_eq!(f.ioctl(IOASID_CREATE_NESTING, 1), Ok(2));
    f.engine.attach(DEV, f.ctx, &1, 2, None).unwrap();
}

fn bind_pgtable(ioasid: u32, pgtable: u64) -> IoasidBindPgtable {
    IoasidBindPgtable {
        argsz: 32,
        flags: 0,
        ioasid,
        format: IOASID_PGTABLE_X86_64_4LVL,
        addr_width: 48,
        reserved: 0,
        pgtable,
    }
}

fn bind_pasid_table(ioasid: u32, table: u64, entries: u32) -> IoasidBindPasidTable {
    IoasidBindPasidTable {
        argsz: 32,
        flags: 0,
        ioasid,
        format: IOASID_PASID_TABLE_FLAT_X86_64,
        table,
        entries,
        reserved: 0,
    }
}

fn unbind_pgtable(ioasid: u32) -> IoasidUnbindPgtable {
    IoasidUnbindPgtable {
        argsz: 16,
        flags: 0,
        ioasid,
        reserved: 0,
    }
}

fn unbind_pasid_table(ioasid: u32) -> IoasidUnbindPasidTable {
    IoasidUnbindPasidTable {
        argsz: 16,
        flags: 0,
        ioasid,
        reserved: 0,
    }
}

fn invalidate(ioasid: u32, flags: u32, pasid: u32, addr: u64, size: u64) -> IoasidInvalidateCache {
    IoasidInvalidateCache {
        argsz: 32,
        flags,
        ioasid,
        pasid,
        addr,
        size,
    }
}

fn info(ioasid: u32, argsz: u32) -> IoasidInfo {
    IoasidInfo {
        argsz,
        flags: 0,
        ioasid,
        cap_offset: 0,
        pgsize_bitmap: 0,
    }
}

/// A struct command, prepared so that it succeeds on a fresh fixture.
struct Case {
    name: &'static str,
    cmd: u32,
    size: usize,
    /// Sets the fixture up and returns the struct's bytes (argsz excluded:
    /// the test sets it).
    prepare: fn(&Fixture) -> Vec<u8>,
    /// Bytes past the struct are an output buffer, never checked.
    tail_is_output: bool,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "REGISTER_MEMORY",
            cmd: IOASID_REGISTER_MEMORY,
            size: 24,
            prepare: |_| reg(MEM, 0x10000).as_bytes().to_vec(),
            tail_is_output: false,
        },
        Case {
            name: "UNREGISTER_MEMORY",
            cmd: IOASID_UNREGISTER_MEMORY,
            size: 24,
            prepare: |f| {
                f.engine.register_memory(f.ctx, &PID, MEM, 0x10000).unwrap();
                reg(MEM, 0x10000).as_bytes().to_vec()
            },
            tail_is_output: false,
        },
        Case {
            name: "MAP_DMA",
            cmd: IOASID_MAP_DMA,
            size: 40,
            prepare: |_| map(1, 0x10_0000, MEM, 0x4000).as_bytes().to_vec(),
            tail_is_output: false,
        },
        Case {
            name: "UNMAP_DMA",
            cmd: IOASID_UNMAP_DMA,
            size: 32,
            prepare: |f| {
                assert_eq!(
                    f.ioctl_struct(IOASID_MAP_DMA, &map(1, 0x10_0000, MEM, 0x4000)),
                    Ok(0)
                );
                unmap(1, 0x10_0000, 0x4000).as_bytes().to_vec()
            },
            tail_is_output: false,
        },
        Case {
            name: "GET_INFO",
            cmd: IOASID_GET_INFO,
            size: 24,
            prepare: |_| info(1, 0).as_bytes().to_vec(),
            tail_is_output: true,
        },
        Case {
            name: "BIND_PGTABLE",
            cmd: IOASID_BIND_PGTABLE,
            size: 32,
            prepare: |f| {
                nest(f);
                bind_pgtable(2, 0x1000).as_bytes().to_vec()
            },
            tail_is_output: false,
        },
        Case {
            name: "UNBIND_PGTABLE",
            cmd: IOASID_UNBIND_PGTABLE,
            size: 16,
            prepare: |f| {
                nest(f);
                f.engine
                    .bind_pgtable(f.ctx, 2, IOASID_PGTABLE_X86_64_4LVL, 48, 0x1000)
                    .unwrap();
                unbind_pgtable(2).as_bytes().to_vec()
            },
            tail_is_output: false,
        },
        Case {
            name: "BIND_PASID_TABLE",
            cmd: IOASID_BIND_PASID_TABLE,
            size: 32,
            prepare: |f| {
                nest(f);
                bind_pasid_table(2, 0x2000, 4).as_bytes().to_vec()
            },
            tail_is_output: false,
        },
        Case {
            name: "UNBIND_PASID_TABLE",
            cmd: IOASID_UNBIND_PASID_TABLE,
            size: 16,
            prepare: |f| {
                nest(f);
                f.engine
                    .bind_pasid_table(f.ctx, 2, IOASID_PASID_TABLE_FLAT_X86_64, 0x2000, 4)
                    .unwrap();
                unbind_pasid_table(2).as_bytes().to_vec()
            },
            tail_is_output: false,
        },
        Case {
            name: "INVALIDATE_CACHE",
            cmd: IOASID_INVALIDATE_CACHE,
            size: 32,
            prepare: |f| {
                nest(f);
                f.engine
                    .bind_pgtable(f.ctx, 2, IOASID_PGTABLE_X86_64_4LVL, 48, 0x1000)
                    .unwrap();
                invalidate(2, 0, 0, 0, 0).as_bytes().to_vec()
            },
            tail_is_output: false,
        },
    ]
}

/// Run `case` with `argsz` and `tail` (bytes right after the struct).
fn run(case: &Case, argsz: u32, tail: &[u8]) -> Result<i32, Errno> {
    let f = Fixture::attached();
    let mut bytes = (case.prepare)(&f);
    assert_eq!(bytes.len(), case.size, "{}", case.name);
    bytes[..4].copy_from_slice(&argsz.to_ne_bytes());
    f.mem.clear();
    f.mem.put(ARG, &bytes);
    f.mem.put(ARG + case.size as u64, tail);
    f.ioctl(case.cmd, ARG)
}

#[test]
fn struct_sizes_match_the_header() {
    for c in cases() {
        let known = match c.cmd {
            IOASID_REGISTER_MEMORY | IOASID_UNREGISTER_MEMORY => {
                std::mem::size_of::<IoasidRegisterMemory>()
            }
            IOASID_MAP_DMA => std::mem::size_of::<IoasidDmaMap>(),
            IOASID_UNMAP_DMA => std::mem::size_of::<IoasidDmaUnmap>(),
            IOASID_BIND_PGTABLE => std::mem::size_of::<IoasidBindPgtable>(),
            IOASID_UNBIND_PGTABLE => std::mem::size_of::<IoasidUnbindPgtable>(),
            IOASID_BIND_PASID_TABLE => std::mem::size_of::<IoasidBindPasidTable>(),
            IOASID_UNBIND_PASID_TABLE => std::mem::size_of::<IoasidUnbindPasidTable>(),
            IOASID_INVALIDATE_CACHE => std::mem::size_of::<IoasidInvalidateCache>(),
            IOASID_GET_INFO => std::mem::size_of::<IoasidInfo>(),
            other => panic!("no case for {other:#x}"),
        };
        assert_eq!(c.size, known, "{}", c.name);
    }
}

#[test]
fn the_cases_cover_every_struct_row_of_the_table() {
    let cases = cases();
    for op in IOASID_TABLE.ops {
        let Some(rules) = op.rules() else { continue };
        let case = cases.iter().find(|c| c.cmd == op.number);
        let case = case.unwrap_or_else(|| panic!("no length case for {}", op.name));
        assert_eq!(case.size, rules.size, "{}", op.name);
        assert_eq!(
            case.tail_is_output,
            rules.tail == ioctl_table::Tail::Output,
            "{}",
            op.name
        );
    }
}

#[test]
fn test_length_every_struct_command() {
    for c in cases() {
        let size = c.size as u32;
        let name = c.name;
        assert_eq!(run(&c, size - 1, &[]), Err(Errno::EINVAL), "{name} min-1");
        assert_eq!(run(&c, 0, &[]), Err(Errno::EINVAL), "{name} argsz 0");
        assert_eq!(run(&c, 4, &[]), Err(Errno::EINVAL), "{name} argsz 4");
        assert_eq!(run(&c, size, &[]), Ok(0), "{name} exact");
        assert_eq!(
            run(&c, size, &[0xff; 8]),
            Ok(0),
            "{name} exact, garbage after"
        );
        assert_eq!(
            run(&c, size + 8, &[0; 8]),
            Ok(0),
            "{name} oversized, zero tail"
        );
        // A tail longer than one read chunk, zero: still fine.
        assert_eq!(
            run(&c, size + 9000, &[0; 9000]),
            Ok(0),
            "{name} long zero tail"
        );
        let mut tail = vec![0u8; 9000];
        tail[8999] = 1;
        let want = if c.tail_is_output {
            Ok(0)
        } else {
            Err(Errno::E2BIG)
        };
        assert_eq!(
            run(&c, size + 9000, &tail),
            want,
            "{name} non-zero far in the tail"
        );
        assert_eq!(
            run(&c, size + 8, &[0, 0, 0, 0, 0, 0, 0, 1]),
            want,
            "{name} non-zero tail"
        );
        assert_eq!(run(&c, size + 1, &[1]), want, "{name} one odd byte");
        // A tail past the readable memory: EFAULT, or nothing to check.
        let huge = LEN as u32;
        let want_far = if c.tail_is_output {
            Ok(0)
        } else {
            Err(Errno::EFAULT)
        };
        assert_eq!(run(&c, huge, &[]), want_far, "{name} tail past memory");
        // Beyond the cap, refused unread.
        let want_cap = if c.tail_is_output {
            Ok(0)
        } else {
            Err(Errno::E2BIG)
        };
        assert_eq!(
            run(&c, size + MAX_TAIL as u32 + 1, &[]),
            want_cap,
            "{name} tail above the cap"
        );
        assert_eq!(run(&c, u32::MAX, &[]), want_cap, "{name} argsz u32::MAX");
    }
}

#[test]
fn unreadable_arguments_are_efault() {
    for c in cases() {
        let f = Fixture::attached();
        (c.prepare)(&f);
        assert_eq!(f.ioctl(c.cmd, 0), Err(Errno::EFAULT), "{} NULL", c.name);
        assert_eq!(f.ioctl(c.cmd, BASE - 4), Err(Errno::EFAULT), "{}", c.name);
        // argsz readable, the rest not.
        let last = BASE + LEN as u64 - 4;
        f.mem.put(last, &(c.size as u32).to_ne_bytes());
        assert_eq!(
            f.ioctl(c.cmd, last),
            Err(Errno::EFAULT),
            "{} straddling",
            c.name
        );
    }
}

#[test]
fn unknown_flags_and_reserved_fields_are_einval() {
    let f = Fixture::attached();
    let mut m = map(1, 0, MEM, K4);
    m.flags |= 1 << 2;
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &m), Err(Errno::EINVAL));
    m.flags = 1 << 31 | IOASID_DMA_MAP_FLAG_READ;
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &m), Err(Errno::EINVAL));
    let mut m = map(1, 0, MEM, K4);
    m.reserved = 1;
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &m), Err(Errno::EINVAL));
    // Neither read nor write.
    let mut m = map(1, 0, MEM, K4);
    m.flags = 0;
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &m), Err(Errno::EINVAL));
    assert!(f.fake.entries(3).is_empty());

    let mut u = unmap(1, 0, K4);
    u.flags = 1;
    assert_eq!(f.ioctl_struct(IOASID_UNMAP_DMA, &u), Err(Errno::EINVAL));
    let mut u = unmap(1, 0, K4);
    u.reserved = 0x100;
    assert_eq!(f.ioctl_struct(IOASID_UNMAP_DMA, &u), Err(Errno::EINVAL));
    // FLAG_ALL wants iova and size 0.
    let mut u = unmap(1, 0, K4);
    u.flags = IOASID_DMA_UNMAP_FLAG_ALL;
    assert_eq!(f.ioctl_struct(IOASID_UNMAP_DMA, &u), Err(Errno::EINVAL));
    let mut u = unmap(1, K4, 0);
    u.flags = IOASID_DMA_UNMAP_FLAG_ALL;
    assert_eq!(f.ioctl_struct(IOASID_UNMAP_DMA, &u), Err(Errno::EINVAL));

    for cmd in [IOASID_REGISTER_MEMORY, IOASID_UNREGISTER_MEMORY] {
        let mut r = reg(MEM, K4);
        r.flags = 1;
        assert_eq!(f.ioctl_struct(cmd, &r), Err(Errno::EINVAL));
    }
    assert_eq!(f.fake.live_aliases(), 0);

    // GET_INFO's flags are output only: garbage in is ignored.
    let mut i = info(1, 24);
    i.flags = 0xffff_ffff;
    assert_eq!(f.ioctl_struct(IOASID_GET_INFO, &i), Ok(0));
}

#[test]
fn unknown_and_unimplemented_commands_are_enotty() {
    let f = Fixture::attached();
    for cmd in [
        0,
        0x1234,
        io(IOASID_TYPE, IOASID_BASE + 14),
        io(IOASID_TYPE, IOASID_BASE + 62),
        VFIO_ATTACH_IOASID,
        vfio::VFIO_GET_API_VERSION,
    ] {
        assert_eq!(f.ioctl(cmd, 0), Err(Errno::ENOTTY), "{cmd:#x}");
    }
    // The nesting and binding commands: their extensions report 1 and
    // they answer (here: an unreadable argument, or an unattached parent).
    for cmd in [
        IOASID_CREATE_NESTING,
        IOASID_BIND_PGTABLE,
        IOASID_UNBIND_PGTABLE,
        IOASID_BIND_PASID_TABLE,
        IOASID_UNBIND_PASID_TABLE,
        IOASID_INVALIDATE_CACHE,
    ] {
        assert_ne!(f.ioctl(cmd, 1), Err(Errno::ENOTTY), "{cmd:#x}");
        let cmd = IOASID_TABLE.find(cmd).unwrap();
        let ext = cmd.requires;
        assert_ne!(ext, 0, "{}", cmd.name);
        assert_eq!(
            f.ioctl(IOASID_CHECK_EXTENSION, ext.into()),
            Ok(1),
            "{}",
            cmd.name
        );
    }
    // Every command of an extension reported 0 is ENOTTY: none is left.
    for cmd in IOASID_TABLE.ops {
        if cmd.requires != 0 {
            assert_eq!(f.ioctl(IOASID_CHECK_EXTENSION, cmd.requires.into()), Ok(1));
        }
    }
}

#[test]
fn check_extension_reports_what_is_implemented() {
    let f = Fixture::new();
    let ext = |e: u64| f.ioctl(IOASID_CHECK_EXTENSION, e).unwrap();
    for e in [
        IOASID_EXT_TYPE1V2_DMA,
        IOASID_EXT_REGISTER_MEMORY,
        IOASID_EXT_NESTING_SOFTWARE,
        IOASID_EXT_BIND_PGTABLE_SHADOW,
        IOASID_EXT_BIND_PASID_TABLE_SHADOW,
        IOASID_EXT_USER_PASID_TRACKED,
    ] {
        assert_eq!(ext(e.into()), 1, "extension {e}");
    }
    // What legacy VFIO cannot do, and unknown ids.
    for e in [
        0,
        IOASID_EXT_NESTING_HARDWARE,
        IOASID_EXT_PASID_DMA_ROUTING,
        99,
    ] {
        assert_eq!(ext(e.into()), 0, "extension {e}");
    }
    assert_eq!(ext((1 << 32) | 1), 0, "high bits are not ignored");
}

#[test]
fn alloc_free_and_identify_take_integers() {
    let f = Fixture::new();
    // ALLOC ignores its argument (whatever a two-argument call left there).
    assert_eq!(f.ioctl(IOASID_ALLOC, 0xdead_beef), Ok(1));
    assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(2));
    assert_eq!(f.ioctl(IOASID_FREE, 1), Ok(0));
    assert_eq!(f.ioctl(IOASID_FREE, 1), Err(Errno::ENOENT));
    assert_eq!(f.ioctl(IOASID_FREE, 0), Err(Errno::ENOENT));
    assert_eq!(f.ioctl(IOASID_FREE, (1 << 32) | 2), Err(Errno::ENOENT));
    assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(1));
    // IDENTIFY answers the daemon only.
    assert_eq!(f.ioctl(IOASID_DAEMON_IDENTIFY, 0), Err(Errno::EPERM));
    f.mem.pid.set(Ok(std::process::id() as i32));
    let id = dispatch(&f.engine, f.ctx, &f.mem, IOASID_DAEMON_IDENTIFY, 7);
    assert_eq!(id, Ok(f.ctx.0 as i32));
    let other = f.engine.open_context();
    assert_eq!(
        dispatch(&f.engine, other, &f.mem, IOASID_DAEMON_IDENTIFY, 0),
        Ok(other.0 as i32)
    );
    assert!(f.mem.writes.borrow().is_empty());
}

#[test]
fn engine_errnos_come_through() {
    let f = Fixture::new();
    assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(1));
    let m = map(1, 0, MEM, K4);
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &m), Err(Errno::ENODEV));
    assert_eq!(
        f.ioctl_struct(IOASID_UNMAP_DMA, &unmap(1, 0, K4)),
        Err(Errno::ENODEV)
    );
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(2, 0, MEM, K4)),
        Err(Errno::ENOENT)
    );
    assert_eq!(
        f.ioctl_struct(IOASID_GET_INFO, &info(2, 24)),
        Err(Errno::ENOENT)
    );
    f.engine.bind(DEV, f.ctx).unwrap();
    f.engine.attach(DEV, f.ctx, &1, 1, None).unwrap();
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &m), Ok(0));
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &m), Err(Errno::EEXIST));
    assert_eq!(f.ioctl(IOASID_FREE, 1), Err(Errno::EBUSY));
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(1, K4, 0x9000_0000, K4)),
        Err(Errno::EFAULT)
    );
    f.fake.set_memlock(PID, Some(K4));
    // The page mapped already is pinned once; one more is over the limit.
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(1, K4, MEM + K4, K4)),
        Err(Errno::ENOMEM)
    );
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &map(1, K4, MEM, K4)), Ok(0));
    assert_eq!(
        f.ioctl_struct(IOASID_UNREGISTER_MEMORY, &reg(MEM, K4)),
        Err(Errno::ENOENT)
    );
}

#[test]
fn get_info_of_a_never_attached_ioasid_is_empty() {
    let f = Fixture::new();
    assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(1));
    let mut i = info(1, 256);
    i.cap_offset = 77;
    i.pgsize_bitmap = 0x1234;
    i.flags = 5;
    f.mem.put(ARG + 24, &[0xaa; 232]);
    assert_eq!(f.ioctl_struct(IOASID_GET_INFO, &i), Ok(0));
    let out: IoasidInfo = f.mem.struct_at(ARG);
    assert_eq!(out, info(1, 256));
    assert_eq!(
        f.mem.get(ARG + 24, 232),
        vec![0xaa; 232],
        "no capability written"
    );
}

/// Walk a capability chain in the caller's buffer at `ARG`; returns
/// (id, offset) in chain order.
fn walk_chain(mem: &Caller, first: u32) -> Vec<(u16, u64)> {
    let mut out = Vec::new();
    let mut at = first;
    while at != 0 {
        assert_eq!(at % 8, 0, "capabilities are 8-byte aligned");
        let h: IoasidInfoCapHeader = mem.struct_at(ARG + u64::from(at));
        assert_eq!(h.version, 1);
        out.push((h.id, ARG + u64::from(at)));
        assert!(out.len() < 16, "chain loops");
        at = h.next;
    }
    out
}

#[test]
fn happy_path_with_get_info_decoded() {
    let f = Fixture::new();
    assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(1));
    f.engine.bind(DEV, f.ctx).unwrap();
    f.engine.attach(DEV, f.ctx, &1, 1, None).unwrap();
    f.engine.attach(DEV, f.ctx, &1, 1, Some(5)).unwrap();
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(1, 0x10_0000, MEM, 0x4000)),
        Ok(0)
    );
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(1, 0x20_0000, MEM, K4)),
        Ok(0)
    );
    assert!(
        f.mem.writes.borrow().is_empty(),
        "MAP_DMA writes nothing back"
    );
    assert_eq!(f.fake.entries(3).len(), 2);

    // GET_INFO with only the struct: told the size needed, nothing past it.
    f.mem.put(ARG + 24, &[0xaa; 512]);
    assert_eq!(f.ioctl_struct(IOASID_GET_INFO, &info(1, 24)), Ok(0));
    let out: IoasidInfo = f.mem.struct_at(ARG);
    assert_eq!(
        out.flags,
        IOASID_INFO_PGSIZES | IOASID_INFO_MAP_DMA | IOASID_INFO_CAPS
    );
    assert_eq!(out.cap_offset, 0);
    assert_eq!(out.pgsize_bitmap, FAKE_PGSIZES);
    assert_eq!(out.ioasid, 1);
    // Ranges cap 16 + 2 ranges * 16, dma_avail 16, pasid 24, nesting 16.
    let needed = 24 + 16 + 32 + 16 + 24 + 16;
    assert_eq!(out.argsz, needed);
    assert_eq!(f.mem.get(ARG + 24, 512), vec![0xaa; 512]);
    for &(addr, len) in f.mem.writes.borrow().iter() {
        assert!(
            addr >= ARG && addr + len as u64 <= ARG + 24,
            "wrote {addr:#x}+{len}"
        );
    }

    // Again with the size asked for (the same struct passed back as is).
    f.mem.writes.borrow_mut().clear();
    assert_eq!(f.ioctl(IOASID_GET_INFO, ARG), Ok(0));
    let out: IoasidInfo = f.mem.struct_at(ARG);
    assert_eq!(out.argsz, needed);
    assert_eq!(out.cap_offset, 24);
    assert_eq!(
        out.flags,
        IOASID_INFO_PGSIZES | IOASID_INFO_MAP_DMA | IOASID_INFO_CAPS
    );
    let chain = walk_chain(&f.mem, out.cap_offset);
    let ids: Vec<u16> = chain.iter().map(|c| c.0).collect();
    assert_eq!(
        ids,
        vec![
            IOASID_INFO_CAP_IOVA_RANGES,
            IOASID_INFO_CAP_DMA_AVAIL,
            IOASID_INFO_CAP_PASID,
            IOASID_INFO_CAP_NESTING,
        ]
    );
    let ranges: IoasidInfoCapIovaRanges = f.mem.struct_at(chain[0].1);
    assert_eq!(ranges.nr_ranges as usize, FAKE_IOVA_RANGES.len());
    assert_eq!(ranges.reserved, 0);
    for (i, &(start, last)) in FAKE_IOVA_RANGES.iter().enumerate() {
        let r: IoasidIovaRange = f.mem.struct_at(chain[0].1 + 16 + 16 * i as u64);
        assert_eq!((r.start, r.last), (start, last));
    }
    let avail: IoasidInfoCapDmaAvail = f.mem.struct_at(chain[1].1);
    assert_eq!(avail.avail, 65535 - 2);
    let pasid: IoasidInfoCapPasid = f.mem.struct_at(chain[2].1);
    assert_eq!(pasid.flags, IOASID_PASID_ATTACH_TRACKED);
    assert_eq!(pasid.pasid_bits, 20);
    assert_eq!(pasid.pasid_table_format, 0);
    let nesting: IoasidInfoCapNesting = f.mem.struct_at(chain[3].1);
    assert_eq!(
        (nesting.flags, nesting.levels),
        (IOASID_NESTING_SOFTWARE, 1)
    );
    let end = chain[3].1 + 16;
    assert_eq!(end, ARG + u64::from(needed));
    assert_eq!(f.mem.get(end, 64), vec![0xaa; 64], "nothing past the chain");
    assert!(
        !f.mem
            .writes
            .borrow()
            .iter()
            .any(|&(a, l)| a <= ARG + 8 && a + l as u64 > ARG + 8),
        "ioasid (input) not written"
    );

    // A larger buffer: same answer, argsz left as given.
    assert_eq!(f.ioctl_struct(IOASID_GET_INFO, &info(1, 400)), Ok(0));
    let out: IoasidInfo = f.mem.struct_at(ARG);
    assert_eq!((out.argsz, out.cap_offset), (400, 24));

    // Unmap reports the bytes, writing only the size field.
    f.mem.writes.borrow_mut().clear();
    assert_eq!(
        f.ioctl_struct(IOASID_UNMAP_DMA, &unmap(1, 0, 0x18_0000)),
        Ok(0)
    );
    let out: IoasidDmaUnmap = f.mem.struct_at(ARG);
    assert_eq!(out.size, 0x4000);
    assert_eq!(out.iova, 0);
    assert_eq!(*f.mem.writes.borrow(), vec![(ARG + 24, 8)]);
    // Nothing there any more: type1v2 says 0 bytes.
    assert_eq!(
        f.ioctl_struct(IOASID_UNMAP_DMA, &unmap(1, 0, 0x18_0000)),
        Ok(0)
    );
    assert_eq!(f.mem.struct_at::<IoasidDmaUnmap>(ARG).size, 0);
    // Unmap all.
    let mut all = unmap(1, 0, 0);
    all.flags = IOASID_DMA_UNMAP_FLAG_ALL;
    assert_eq!(f.ioctl_struct(IOASID_UNMAP_DMA, &all), Ok(0));
    assert_eq!(f.mem.struct_at::<IoasidDmaUnmap>(ARG).size, K4);
    assert!(f.fake.entries(3).is_empty());

    // Registration through the ioctls.
    assert_eq!(
        f.ioctl_struct(IOASID_REGISTER_MEMORY, &reg(MEM, 0x10000)),
        Ok(0)
    );
    assert_eq!(f.engine.pinned_bytes(f.ctx).unwrap(), 0x10000);
    assert_eq!(
        f.ioctl_struct(IOASID_REGISTER_MEMORY, &reg(MEM, 0x10000)),
        Err(Errno::EEXIST)
    );
    assert_eq!(
        f.ioctl_struct(IOASID_UNREGISTER_MEMORY, &reg(MEM, 0x10000)),
        Ok(0)
    );

    f.engine.detach(DEV, f.ctx, 1, None).unwrap();
    f.engine.detach(DEV, f.ctx, 1, Some(5)).unwrap();
    assert_eq!(f.ioctl(IOASID_FREE, 1), Ok(0));
    assert_eq!(
        f.ioctl_struct(IOASID_GET_INFO, &info(1, 24)),
        Err(Errno::ENOENT)
    );
    assert_eq!(f.fake.live_aliases(), 0);
}

#[test]
fn unwritable_results_are_efault() {
    let f = Fixture::attached();
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &map(1, 0, MEM, K4)), Ok(0));
    f.mem.writable.set(false);
    assert_eq!(
        f.ioctl_struct(IOASID_GET_INFO, &info(1, 24)),
        Err(Errno::EFAULT)
    );
    assert_eq!(
        f.ioctl_struct(IOASID_UNMAP_DMA, &unmap(1, 0, K4)),
        Err(Errno::EFAULT)
    );
}

#[test]
fn group_rule_reaches_the_client_as_ebusy() {
    let fake = Arc::new(FakeBackend::new());
    fake.share(PID, MEM, 1 << 20);
    let spec = |id, name: &str| DeviceSpec {
        id: DeviceId(id),
        name: name.into(),
        group: 9,
    };
    let engine = Engine::new(fake, vec![spec(1, "0000:01:00.0"), spec(2, "0000:01:00.1")]).unwrap();
    let ctx = engine.open_context();
    let mem = new_caller();
    let call = |cmd, arg| dispatch(&engine, ctx, &mem, cmd, arg);
    assert_eq!(call(IOASID_ALLOC, 0), Ok(1));
    engine.bind(DeviceId(1), ctx).unwrap();
    engine.bind(DeviceId(2), ctx).unwrap();
    engine.attach(DeviceId(1), ctx, &1, 1, None).unwrap();
    mem.put(ARG, map(1, 0, MEM, K4).as_bytes());
    assert_eq!(call(IOASID_MAP_DMA, ARG), Err(Errno::EBUSY));
    mem.put(ARG, info(1, 24).as_bytes());
    assert_eq!(call(IOASID_GET_INFO, ARG), Err(Errno::EBUSY));
    assert_eq!(call(IOASID_FREE, 1), Err(Errno::EBUSY));
    engine.attach(DeviceId(2), ctx, &1, 1, None).unwrap();
    mem.put(ARG, map(1, 0, MEM, K4).as_bytes());
    assert_eq!(call(IOASID_MAP_DMA, ARG), Ok(0));
}

#[test]
fn nesting_and_binding_through_the_ioctls() {
    let f = Fixture::attached();
    assert_eq!(f.ioctl(IOASID_CREATE_NESTING, 9), Err(Errno::ENOENT));
    assert_eq!(
        f.ioctl(IOASID_CREATE_NESTING, (1 << 32) | 1),
        Err(Errno::ENOENT)
    );
    assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(2));
    assert_eq!(f.ioctl(IOASID_CREATE_NESTING, 2), Err(Errno::ENODEV));
    assert_eq!(f.ioctl(IOASID_FREE, 2), Ok(0));
    nest(&f);
    assert_eq!(f.ioctl(IOASID_CREATE_NESTING, 2), Err(Errno::EINVAL));

    // GET_INFO of the child: nested, both protocols, parent and formats.
    assert_eq!(f.ioctl_struct(IOASID_GET_INFO, &info(2, 512)), Ok(0));
    let out: IoasidInfo = f.mem.struct_at(ARG);
    assert_eq!(
        out.flags,
        IOASID_INFO_PGSIZES
            | IOASID_INFO_CAPS
            | IOASID_INFO_MAP_DMA
            | IOASID_INFO_BIND_PGTABLE
            | IOASID_INFO_BIND_PASID_TABLE
            | IOASID_INFO_NESTED
    );
    let chain = walk_chain(&f.mem, out.cap_offset);
    let ids: Vec<u16> = chain.iter().map(|c| c.0).collect();
    assert_eq!(
        ids,
        vec![
            IOASID_INFO_CAP_IOVA_RANGES,
            IOASID_INFO_CAP_DMA_AVAIL,
            IOASID_INFO_CAP_PASID,
            IOASID_INFO_CAP_PARENT,
            IOASID_INFO_CAP_PGTABLE_FORMATS,
            IOASID_INFO_CAP_SHADOW,
        ],
        "no NESTING capability on a child: one level"
    );
    let sh: IoasidInfoCapShadow = f.mem.struct_at(chain[5].1);
    assert_eq!(
        sh,
        IoasidInfoCapShadow {
            header: sh.header,
            ..IoasidInfoCapShadow::default()
        },
        "nothing mapped or bound yet"
    );
    let pasid: IoasidInfoCapPasid = f.mem.struct_at(chain[2].1);
    assert_eq!(pasid.pasid_table_format, IOASID_PASID_TABLE_FLAT_X86_64);
    assert_eq!(
        pasid.flags, IOASID_PASID_ATTACH_TRACKED,
        "tracked, not routed"
    );
    let parent: IoasidInfoCapParent = f.mem.struct_at(chain[3].1);
    assert_eq!((parent.parent, parent.reserved), (1, 0));
    let formats: IoasidInfoCapPgtableFormats = f.mem.struct_at(chain[4].1);
    assert_eq!(formats.nr_formats, 1);
    let desc: IoasidPgtableFormatDesc = f.mem.struct_at(chain[4].1 + 16);
    assert_eq!(
        desc,
        IoasidPgtableFormatDesc {
            format: IOASID_PGTABLE_X86_64_4LVL,
            flags: IOASID_PGTABLE_FORMAT_SHADOWED,
            addr_width: 48,
            reserved: 0,
            pgsize_bitmap: (1 << 12) | (1 << 21) | (1 << 30),
        }
    );

    // Software nesting: the child's vaddr is a GPA, mapped through 1.
    let daemon = |v: u64| ioasid_engine::fake::FAKE_DAEMON_BASE + v;
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(2, 0x2000, 0x1000, K4)),
        Ok(0)
    );
    let entries = f.fake.entries(3);
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (entries[0].iova, entries[0].daemon_vaddr),
        (0x2000, daemon(MEM + 0x1000))
    );
    assert_eq!(shadow(&f, 2).shadow_entries, 1);
    assert_eq!(
        f.ioctl_struct(IOASID_UNMAP_DMA, &unmap(2, 0, 0x10_0000)),
        Ok(0)
    );
    assert_eq!(f.mem.struct_at::<IoasidDmaUnmap>(ARG).size, K4);
    assert!(f.fake.entries(3).is_empty());

    // A page table in the client's memory, at GPA 0x1000 (= MEM + 0x1000).
    let pte = |gpa: u64, index: u64, v: u64| f.fake.write_u64(MEM + gpa + 8 * index, v);
    pte(0x1000, 0, 0x2000 | 3);
    pte(0x2000, 0, 0x3000 | 3);
    pte(0x3000, 0, 0x4000 | 3);
    pte(0x4000, 5, 0x8000 | 3);
    let mut b = bind_pgtable(2, 0x1000);
    b.flags = 1;
    assert_eq!(f.ioctl_struct(IOASID_BIND_PGTABLE, &b), Err(Errno::EINVAL));
    let mut b = bind_pgtable(2, 0x1000);
    b.reserved = 1;
    assert_eq!(f.ioctl_struct(IOASID_BIND_PGTABLE, &b), Err(Errno::EINVAL));
    let mut b = bind_pgtable(2, 0x1000);
    b.format = 2;
    assert_eq!(f.ioctl_struct(IOASID_BIND_PGTABLE, &b), Err(Errno::EINVAL));
    assert_eq!(
        f.ioctl_struct(IOASID_BIND_PGTABLE, &bind_pgtable(2, 0x20_0000)),
        Err(Errno::EFAULT),
        "root not mapped in the parent"
    );
    assert_eq!(
        f.ioctl_struct(IOASID_BIND_PGTABLE, &bind_pgtable(1, 0x1000)),
        Err(Errno::EINVAL),
        "not a child"
    );
    assert_eq!(
        f.ioctl_struct(IOASID_BIND_PGTABLE, &bind_pgtable(2, 0x1000)),
        Ok(0)
    );
    let entries = f.fake.entries(3);
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (entries[0].iova, entries[0].daemon_vaddr, entries[0].size),
        (0x5000, daemon(MEM + 0x8000), K4)
    );
    let sh = shadow(&f, 2);
    assert_eq!(sh.flags, IOASID_SHADOW_PGTABLE);
    assert_eq!(
        (
            sh.shadow_entries,
            sh.leaves,
            sh.last_walk_leaves,
            sh.last_walk_malformed,
            sh.last_walk_tables,
            sh.malformed,
            sh.walks
        ),
        (1, 1, 1, 0, 4, 0, 1),
        "the bind's walk: four tables, one leaf"
    );
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(2, 0x9000, 0, K4)),
        Err(Errno::EBUSY)
    );
    // A change is seen after its invalidation.
    pte(0x4000, 6, 0x9000 | 1);
    assert_eq!(f.fake.entries(3).len(), 1);
    assert_eq!(
        f.ioctl_struct(
            IOASID_INVALIDATE_CACHE,
            &invalidate(2, IOASID_INVALIDATE_ADDR, 0, 0x6000, K4)
        ),
        Ok(0)
    );
    assert_eq!(f.fake.entries(3).len(), 2);
    let sh = shadow(&f, 2);
    assert_eq!(
        (sh.shadow_entries, sh.leaves, sh.last_walk_leaves, sh.walks),
        (2, 2, 1, 2),
        "the range walk found the new leaf only"
    );
    // A malformed entry (PS in a level-4 entry, reserved there) is skipped
    // and counted, in the last walk and in the total.
    pte(0x1000, 1, 0x2000 | 3 | (1 << 7));
    assert_eq!(
        f.ioctl_struct(IOASID_INVALIDATE_CACHE, &invalidate(2, 0, 0, 0, 0)),
        Ok(0)
    );
    let sh = shadow(&f, 2);
    assert_eq!(
        (
            sh.shadow_entries,
            sh.last_walk_leaves,
            sh.last_walk_malformed,
            sh.malformed,
            sh.walks
        ),
        (2, 2, 1, 1, 3)
    );
    assert_eq!(sh.flags, IOASID_SHADOW_PGTABLE, "not truncated");
    pte(0x1000, 1, 0);
    for (inv, why) in [
        (
            invalidate(2, IOASID_INVALIDATE_PASID, 0, 0, 0),
            "no PASID table",
        ),
        (invalidate(2, 0, 0, 0x6000, 0), "addr without ADDR"),
        (invalidate(2, 0, 0, 0, K4), "size without ADDR"),
        (invalidate(2, 0, 3, 0, 0), "pasid without PASID"),
        (invalidate(2, 1 << 3, 0, 0, 0), "unknown flag"),
        (
            invalidate(2, IOASID_INVALIDATE_ADDR, 0, 0x6000, 0),
            "size 0",
        ),
        (invalidate(1, 0, 0, 0, 0), "nothing bound"),
    ] {
        assert_eq!(
            f.ioctl_struct(IOASID_INVALIDATE_CACHE, &inv),
            Err(Errno::EINVAL),
            "{why}"
        );
    }
    assert_eq!(
        f.ioctl_struct(IOASID_UNBIND_PGTABLE, &unbind_pgtable(2)),
        Ok(0)
    );
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(
        f.ioctl_struct(IOASID_UNBIND_PGTABLE, &unbind_pgtable(2)),
        Err(Errno::ENOENT)
    );

    // A PASID table at GPA 0x9000: entry 0 names the table above.
    f.fake.write_u64(MEM + 0x9000, 0x1000 | 1);
    let mut b = bind_pasid_table(2, 0x9000, 4);
    b.reserved = 7;
    assert_eq!(
        f.ioctl_struct(IOASID_BIND_PASID_TABLE, &b),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        f.ioctl_struct(IOASID_BIND_PASID_TABLE, &bind_pasid_table(2, 0x9000, 0)),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        f.ioctl_struct(IOASID_BIND_PASID_TABLE, &bind_pasid_table(2, 0x9000, 4)),
        Ok(0)
    );
    let st = f.engine.info(f.ctx, 2).unwrap().pasid_table.unwrap();
    assert_eq!((st.valid, st.leaves), (1, 2));
    let sh = shadow(&f, 2);
    assert_eq!(sh.flags, IOASID_SHADOW_PASID_TABLE);
    assert_eq!(
        (
            sh.shadow_entries,
            sh.walks,
            sh.pasid_entries,
            sh.pasid_valid,
            sh.pasid_bad,
            sh.pasid_unreadable,
            sh.pasid_leaves,
            sh.pasid_malformed
        ),
        (0, 0, 4, 1, 0, 0, 2, 0)
    );
    assert!(
        f.fake.entries(3).is_empty(),
        "PASID tables route no RID DMA"
    );
    f.fake.write_u64(MEM + 0x9008, 0x1000 | 1);
    let pasid_cache = IOASID_INVALIDATE_PASID | IOASID_INVALIDATE_PASID_CACHE;
    assert_eq!(
        f.ioctl_struct(
            IOASID_INVALIDATE_CACHE,
            &invalidate(2, pasid_cache, 1, 0, 0)
        ),
        Ok(0)
    );
    assert_eq!(
        f.engine.info(f.ctx, 2).unwrap().pasid_table.unwrap().valid,
        2
    );
    assert_eq!(
        (shadow(&f, 2).pasid_valid, shadow(&f, 2).pasid_leaves),
        (2, 4)
    );
    // Entry 2 with a bit besides present and the address: bad, counted.
    f.fake.write_u64(MEM + 0x9010, 0x1000 | 1 | (1 << 3));
    assert_eq!(
        f.ioctl_struct(
            IOASID_INVALIDATE_CACHE,
            &invalidate(2, IOASID_INVALIDATE_PASID_CACHE, 0, 0, 0)
        ),
        Ok(0)
    );
    let sh = shadow(&f, 2);
    assert_eq!((sh.pasid_valid, sh.pasid_bad), (2, 1));
    for inv in [
        invalidate(2, pasid_cache, 4, 0, 0),
        invalidate(2, pasid_cache, 1 << 20, 0, 0),
        invalidate(2, pasid_cache | IOASID_INVALIDATE_ADDR, 1, 0, K4),
    ] {
        assert_eq!(
            f.ioctl_struct(IOASID_INVALIDATE_CACHE, &inv),
            Err(Errno::EINVAL),
            "{inv:?}"
        );
    }
    assert_eq!(
        f.ioctl_struct(IOASID_UNBIND_PASID_TABLE, &unbind_pasid_table(2)),
        Ok(0)
    );
    assert_eq!(
        f.ioctl_struct(IOASID_UNBIND_PASID_TABLE, &unbind_pasid_table(2)),
        Err(Errno::ENOENT)
    );
    assert_eq!(f.ioctl(IOASID_FREE, 1), Err(Errno::EBUSY), "it has a child");
    f.engine.detach(DEV, f.ctx, 2, None).unwrap();
    assert_eq!(f.ioctl(IOASID_FREE, 2), Ok(0));
    f.engine.detach(DEV, f.ctx, 1, None).unwrap();
    assert_eq!(f.ioctl(IOASID_FREE, 1), Ok(0));
    assert_eq!(f.fake.live_aliases(), 0);
}

/// `IOASID_INFO_CAP_SHADOW` of `ioasid`, read through GET_INFO.
fn shadow(f: &Fixture, ioasid: u32) -> IoasidInfoCapShadow {
    assert_eq!(f.ioctl_struct(IOASID_GET_INFO, &info(ioasid, 512)), Ok(0));
    let out: IoasidInfo = f.mem.struct_at(ARG);
    let chain = walk_chain(&f.mem, out.cap_offset);
    let at = chain
        .iter()
        .find(|c| c.0 == IOASID_INFO_CAP_SHADOW)
        .expect("a child carries IOASID_INFO_CAP_SHADOW")
        .1;
    f.mem.struct_at(at)
}

#[test]
fn engine_format_numbers_are_the_headers() {
    assert_eq!(
        ioasid_engine::PGTABLE_X86_64_4LVL,
        IOASID_PGTABLE_X86_64_4LVL
    );
    assert_eq!(
        ioasid_engine::PASID_TABLE_FLAT_X86_64,
        IOASID_PASID_TABLE_FLAT_X86_64
    );
    assert_eq!(
        ioasid_engine::PASID_TABLE_MAX_ENTRIES,
        IOASID_PASID_TABLE_MAX_ENTRIES
    );
    assert_eq!(ioasid_engine::pgtable::PTE_PRESENT, 1);
}

#[test]
fn only_identify_and_a_map_of_new_memory_look_the_pid_up() {
    let f = Fixture::attached();
    let asked = |f: &Fixture| f.mem.pid_asked.replace(0);
    asked(&f);
    assert_eq!(f.ioctl(IOASID_CHECK_EXTENSION, 0), Ok(0));
    assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(2));
    assert_eq!(f.ioctl(IOASID_FREE, 2), Ok(0));
    assert_eq!(f.ioctl_struct(IOASID_GET_INFO, &info(1, 24)), Ok(0));
    assert_eq!(asked(&f), 0);
    // MAP_DMA hands the calling thread to the engine, which aliases the
    // memory that thread sees, and charges it to the thread's process
    // (no limit applies to the fake's callers, so the process is all it
    // needs): one look-up.
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &map(1, 0, MEM, K4)), Ok(0));
    assert!(f.fake.calls().contains(&FakeCall::Alias {
        pid: PID,
        vaddr: MEM,
        size: K4
    }));
    assert_eq!(asked(&f), 1);
    assert_eq!(f.ioctl_struct(IOASID_UNMAP_DMA, &unmap(1, 0, K4)), Ok(0));
    assert_eq!(asked(&f), 0);
    // A registration is charged once; a map inside it charges nothing.
    assert_eq!(f.ioctl_struct(IOASID_REGISTER_MEMORY, &reg(MEM, K4)), Ok(0));
    asked(&f);
    assert_eq!(f.ioctl_struct(IOASID_MAP_DMA, &map(1, 0, MEM, K4)), Ok(0));
    assert_eq!(f.ioctl_struct(IOASID_UNMAP_DMA, &unmap(1, 0, K4)), Ok(0));
    assert_eq!(asked(&f), 0);
    assert_eq!(
        f.ioctl_struct(IOASID_UNREGISTER_MEMORY, &reg(MEM, K4)),
        Ok(0)
    );
    assert_eq!(f.ioctl(IOASID_DAEMON_IDENTIFY, 0), Err(Errno::EPERM));
    assert_eq!(asked(&f), 1);
}

#[test]
fn a_caller_whose_pid_cannot_be_found_maps_nothing() {
    let f = Fixture::attached();
    f.mem.pid.set(Err(Errno::ESRCH));
    assert_eq!(f.ioctl(IOASID_CHECK_EXTENSION, 0), Ok(0));
    assert_eq!(f.ioctl(IOASID_ALLOC, 0), Ok(2));
    assert_eq!(
        f.ioctl_struct(IOASID_MAP_DMA, &map(1, 0, MEM, K4)),
        Err(Errno::ESRCH)
    );
    // The alias made before the charge failed is given back.
    assert_eq!(f.fake.live_aliases(), 0);
    assert_eq!(f.ioctl(IOASID_DAEMON_IDENTIFY, 0), Err(Errno::ESRCH));
    assert_eq!(f.ioctl_struct(IOASID_UNMAP_DMA, &unmap(1, 0, K4)), Ok(0));
    assert_eq!(f.mem.struct_at::<IoasidDmaUnmap>(ARG).size, 0);
}

#[test]
fn a_struct_at_the_end_of_readable_memory_is_judged_by_its_argsz() {
    let f = Fixture::attached();
    let size = std::mem::size_of::<IoasidDmaMap>();
    let m = map(1, 0, MEM, K4);
    // Only size - 1 bytes are readable before the end of the caller's memory.
    let at = BASE + LEN as u64 - (size as u64 - 1);
    let mut bytes = m.as_bytes()[..size - 1].to_vec();
    // An argsz that says "size - 1": too small, EINVAL (not EFAULT, although
    // reading the whole struct would fault).
    bytes[..4].copy_from_slice(&((size - 1) as u32).to_ne_bytes());
    f.mem.put(at, &bytes);
    assert_eq!(f.ioctl(IOASID_MAP_DMA, at), Err(Errno::EINVAL));
    // An argsz that claims the whole struct, which is not all readable.
    bytes[..4].copy_from_slice(&(size as u32).to_ne_bytes());
    f.mem.put(at, &bytes);
    assert_eq!(f.ioctl(IOASID_MAP_DMA, at), Err(Errno::EFAULT));
    assert_eq!(f.fake.live_aliases(), 0);
}

/// Issue 17, item 6: unknown numbers and stateless commands are answered
/// without a handler slot, never behind other calls; everything that
/// touches a context is not.
#[test]
fn only_unknown_and_stateless_commands_are_quick() {
    assert!(IOASID_TABLE.is_quick(IOASID_CHECK_EXTENSION));
    assert!(IOASID_TABLE.is_quick(0x3b7f), "an unknown number");
    assert!(IOASID_TABLE.is_quick(0x5401), "TCGETS");
    for op in IOASID_TABLE.ops {
        if op.number != IOASID_CHECK_EXTENSION {
            assert!(!IOASID_TABLE.is_quick(op.number), "{}", op.name);
        }
    }
}
