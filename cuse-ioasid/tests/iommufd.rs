//! `/dev/iommu`'s table on the host, against the engine's fake backend and
//! a fake caller: TEST_LENGTH over every row (the kernel selftests'
//! pattern), garbage ids and wrong object types, and the values written
//! back.

use std::collections::BTreeSet;
use std::sync::Arc;

use cuse_ioasid::iommufd::ioctl::{dispatch, IOMMUFD_TABLE};
use cuse_ioasid::iommufd::IommufdNode;
use ioasid_engine::fake::FakeBackend;
use ioasid_engine::{ContextId, DeviceId, DeviceSpec, Engine};
use ioasid_uapi::iommufd::*;
use ioasid_uapi::plain::bytes_of;
use ioasid_uapi::ArgStruct;
use ioctl_table::fake::FakeCaller;
use ioctl_table::MAX_TAIL;
use nix::errno::Errno;

const PID: i32 = 4242;
const MEM: u64 = 0x4000_0000;
const K4: u64 = 4096;
const BASE: u64 = 0x10_0000;
const ARG: u64 = BASE + 0x100;
const DEV: DeviceId = DeviceId(1);
const RW: u32 = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;

struct Fixture {
    node: IommufdNode,
    ctx: ContextId,
    memfd: std::os::fd::OwnedFd,
}

impl Fixture {
    fn new() -> Self {
        let fake = Arc::new(FakeBackend::new());
        fake.share(PID, MEM, 16 << 20);
        let memfd =
            nix::sys::memfd::memfd_create(c"iommufd-test", nix::sys::memfd::MFdFlags::empty())
                .unwrap();
        fake.add_file(nix::sys::stat::fstat(&memfd).unwrap().st_ino, 16 * K4);
        let engine = Engine::new(
            fake,
            vec![DeviceSpec {
                id: DEV,
                name: "0000:00:03.0".into(),
                group: 3,
            }],
        )
        .unwrap();
        let ctx = engine.open_context();
        let node = IommufdNode::new(engine, BTreeSet::new(), Box::new(|_| ()));
        Fixture { node, ctx, memfd }
    }

    /// Run `cmd` with `arg` at ARG, its size field set to `size`, and
    /// `tail` right after the struct; the result and the memory after.
    fn run(&self, cmd: u32, arg: &[u8], size: u32, tail: &[u8]) -> (Result<i32, Errno>, Vec<u8>) {
        let mut mem = vec![0u8; 0x100 + arg.len() + tail.len().max(MAX_TAIL + 0x1000)];
        mem[0x100..0x100 + arg.len()].copy_from_slice(arg);
        mem[0x100..0x104].copy_from_slice(&size.to_ne_bytes());
        mem[0x100 + arg.len()..0x100 + arg.len() + tail.len()].copy_from_slice(tail);
        let mut c = FakeCaller::new(BASE, mem, PID);
        c.hold(7, &self.memfd);
        let r = dispatch(&self.node, self.ctx, &c, cmd, ARG);
        let out = c.get(ARG, arg.len());
        (r, out)
    }

    fn call<T: ArgStruct>(&self, cmd: u32, v: &T) -> (Result<i32, Errno>, Vec<u8>) {
        let b = bytes_of(v);
        self.run(cmd, b, b.len() as u32, &[])
    }

    fn ioas(&self) -> u32 {
        let a = iommu_ioas_alloc {
            size: 12,
            ..Default::default()
        };
        let (r, out) = self.call(IOMMU_IOAS_ALLOC, &a);
        r.unwrap();
        u32::from_ne_bytes(out[8..12].try_into().unwrap())
    }
}

fn arg<T: ArgStruct>(v: T) -> Vec<u8> {
    bytes_of(&v).to_vec()
}

/// Each command with a valid argument (up to one definite refusal) and
/// the result of the exact-size call, as `tests/scenarios/
/// test_iommufd_ioas.py`'s length cases.
fn cases(f: &Fixture) -> Vec<(u32, Vec<u8>, Result<i32, Errno>)> {
    let ioas = f.ioas();
    vec![
        (
            IOMMU_DESTROY,
            arg(iommu_destroy { size: 0, id: 0 }),
            Err(Errno::ENOENT),
        ),
        (IOMMU_IOAS_ALLOC, arg(iommu_ioas_alloc::default()), Ok(0)),
        (
            IOMMU_IOAS_ALLOW_IOVAS,
            arg(iommu_ioas_allow_iovas {
                ioas_id: ioas,
                ..Default::default()
            }),
            Ok(0),
        ),
        (
            IOMMU_IOAS_COPY,
            arg(iommu_ioas_copy {
                flags: RW,
                dst_ioas_id: ioas,
                src_ioas_id: ioas,
                length: K4,
                src_iova: 0x10_0000,
                ..Default::default()
            }),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_IOAS_IOVA_RANGES,
            arg(iommu_ioas_iova_ranges {
                ioas_id: ioas,
                ..Default::default()
            }),
            Err(Errno::EMSGSIZE),
        ),
        (
            IOMMU_IOAS_MAP,
            arg(iommu_ioas_map {
                flags: RW,
                ioas_id: 0,
                user_va: MEM,
                length: K4,
                ..Default::default()
            }),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_IOAS_UNMAP,
            arg(iommu_ioas_unmap {
                ioas_id: ioas,
                iova: 0,
                length: u64::MAX,
                ..Default::default()
            }),
            Ok(0),
        ),
        (
            IOMMU_OPTION,
            arg(iommu_option {
                option_id: IOMMU_OPTION_RLIMIT_MODE,
                op: IOMMU_OPTION_OP_GET,
                ..Default::default()
            }),
            Ok(0),
        ),
        (
            IOMMU_VFIO_IOAS,
            arg(iommu_vfio_ioas {
                op: IOMMU_VFIO_IOAS_GET,
                ..Default::default()
            }),
            Err(Errno::ENODEV),
        ),
        (
            IOMMU_HWPT_ALLOC,
            arg(iommu_hwpt_alloc {
                pt_id: ioas,
                ..Default::default()
            }),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_GET_HW_INFO,
            arg(iommu_hw_info::default()),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_HWPT_SET_DIRTY_TRACKING,
            arg(iommu_hwpt_set_dirty_tracking::default()),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_HWPT_GET_DIRTY_BITMAP,
            arg(iommu_hwpt_get_dirty_bitmap {
                length: K4,
                page_size: K4,
                ..Default::default()
            }),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_HWPT_INVALIDATE,
            arg(iommu_hwpt_invalidate::default()),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_FAULT_QUEUE_ALLOC,
            arg(iommu_fault_alloc::default()),
            Err(Errno::EOPNOTSUPP),
        ),
        (
            IOMMU_IOAS_MAP_FILE,
            arg(iommu_ioas_map_file {
                flags: RW,
                ioas_id: 0,
                fd: 7,
                length: K4,
                ..Default::default()
            }),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_VIOMMU_ALLOC,
            arg(iommu_viommu_alloc::default()),
            Err(Errno::EOPNOTSUPP),
        ),
        (
            IOMMU_VDEVICE_ALLOC,
            arg(iommu_vdevice_alloc::default()),
            Err(Errno::ENOENT),
        ),
        (
            IOMMU_IOAS_CHANGE_PROCESS,
            arg(iommu_ioas_change_process::default()),
            Ok(0),
        ),
        (
            IOMMU_VEVENTQ_ALLOC,
            arg(iommu_veventq_alloc {
                veventq_depth: 1,
                ..Default::default()
            }),
            Err(Errno::EOPNOTSUPP),
        ),
        (
            IOMMU_HW_QUEUE_ALLOC,
            arg(iommu_hw_queue_alloc::default()),
            Err(Errno::EOPNOTSUPP),
        ),
    ]
}

#[test]
fn the_table_is_the_kernels() {
    assert_eq!(IOMMUFD_TABLE.unknown_flags, Errno::EOPNOTSUPP);
    assert_eq!(IOMMUFD_TABLE.ops.len(), ALL.len());
    for (op, (name, number)) in IOMMUFD_TABLE.ops.iter().zip(ALL) {
        assert_eq!((op.name, op.number), (*name, *number));
    }
    let f = Fixture::new();
    let covered: BTreeSet<u32> = cases(&f).iter().map(|c| c.0).collect();
    assert_eq!(covered.len(), ALL.len(), "a length case per command");
}

/// TEST_LENGTH: every row at sizes 0, 4, min-1 (`EINVAL`), exact and
/// min (the handler's answer), one non-zero byte past and a non-zero byte
/// at +64 (`E2BIG`), a zero byte and a page of zeros past (accepted), and
/// a tail past the reader's cap (`E2BIG`, unread).
#[test]
fn test_length_every_row() {
    let f = Fixture::new();
    for (cmd, a, exact) in cases(&f) {
        let op = IOMMUFD_TABLE.find(cmd).unwrap();
        let rules = op.rules().unwrap();
        let name = op.name;
        let size = a.len() as u32;
        assert_eq!(size as usize, rules.size, "{name}");
        for short in [0, 4, rules.min_size as u32 - 1] {
            assert_eq!(
                f.run(cmd, &a, short, &[]).0,
                Err(Errno::EINVAL),
                "{name} {short}"
            );
        }
        assert_eq!(
            f.run(cmd, &a, size + 1, &[0xff]).0,
            Err(Errno::E2BIG),
            "{name}"
        );
        let mut at64 = vec![0u8; 64];
        at64[63] = 1;
        assert_eq!(
            f.run(cmd, &a, size + 64, &at64).0,
            Err(Errno::E2BIG),
            "{name}"
        );
        assert_eq!(f.run(cmd, &a, size, &[]).0, exact, "{name} exact");
        assert_eq!(f.run(cmd, &a, size + 1, &[0]).0, exact, "{name} +1 zero");
        assert_eq!(
            f.run(cmd, &a, size + 4096, &[0; 4096]).0,
            exact,
            "{name} +page"
        );
        assert_eq!(
            f.run(cmd, &a, size + MAX_TAIL as u32 + 1, &[]).0,
            Err(Errno::E2BIG),
            "{name} past the cap"
        );
        assert_eq!(
            f.run(cmd, &a, rules.min_size as u32, &[]).0,
            exact,
            "{name} min"
        );
    }
}

#[test]
fn garbage_ids_and_wrong_object_types() {
    let f = Fixture::new();
    let ioas = f.ioas();
    for id in [0, 2, 0x7fff_ffff, u32::MAX] {
        let d = iommu_destroy { size: 8, id };
        assert_eq!(f.call(IOMMU_DESTROY, &d).0, Err(Errno::ENOENT), "{id:#x}");
    }
    let map = iommu_ioas_map {
        size: 40,
        flags: RW | IOMMU_IOAS_MAP_FIXED_IOVA,
        ioas_id: ioas,
        user_va: MEM,
        length: 2 * K4,
        iova: 0x20_0000,
        ..Default::default()
    };
    assert_eq!(f.call(IOMMU_IOAS_MAP, &map).0, Ok(0));
    // An IOAS where a device or a HWPT is expected.
    let hw = iommu_hw_info {
        size: 40,
        dev_id: ioas,
        ..Default::default()
    };
    assert_eq!(f.call(IOMMU_GET_HW_INFO, &hw).0, Err(Errno::ENOENT));
    let sdt = iommu_hwpt_set_dirty_tracking {
        size: 16,
        hwpt_id: ioas,
        ..Default::default()
    };
    assert_eq!(
        f.call(IOMMU_HWPT_SET_DIRTY_TRACKING, &sdt).0,
        Err(Errno::ENOENT)
    );
    let inv = iommu_hwpt_invalidate {
        size: 32,
        hwpt_id: ioas,
        ..Default::default()
    };
    assert_eq!(f.call(IOMMU_HWPT_INVALIDATE, &inv).0, Err(Errno::EINVAL));
    // The map is intact after all of that; UNMAP writes the length back.
    let unmap = iommu_ioas_unmap {
        size: 24,
        ioas_id: ioas,
        iova: 0x20_0000,
        length: 2 * K4,
    };
    let (r, out) = f.call(IOMMU_IOAS_UNMAP, &unmap);
    assert_eq!(r, Ok(0));
    assert_eq!(u64::from_ne_bytes(out[16..24].try_into().unwrap()), 2 * K4);
    let (r, out) = f.call(IOMMU_IOAS_UNMAP, &unmap);
    assert_eq!(r, Err(Errno::ENOENT));
    assert_eq!(out, bytes_of(&unmap), "not written on failure");
}

#[test]
fn iova_ranges_writes_the_count_and_alignment_with_emsgsize() {
    let f = Fixture::new();
    let ioas = f.ioas();
    let r = iommu_ioas_iova_ranges {
        size: 32,
        ioas_id: ioas,
        ..Default::default()
    };
    let (res, out) = f.call(IOMMU_IOAS_IOVA_RANGES, &r);
    assert_eq!(res, Err(Errno::EMSGSIZE));
    assert_eq!(u32::from_ne_bytes(out[8..12].try_into().unwrap()), 1);
    assert_eq!(u64::from_ne_bytes(out[24..32].try_into().unwrap()), 1);
    // A map with the IOVA chosen, then MAP_FILE through the caller's fd 7.
    let map = iommu_ioas_map {
        size: 40,
        flags: RW,
        ioas_id: ioas,
        user_va: MEM,
        length: 2 * K4,
        ..Default::default()
    };
    let (res, out) = f.call(IOMMU_IOAS_MAP, &map);
    assert_eq!(res, Ok(0));
    assert_eq!(u64::from_ne_bytes(out[32..40].try_into().unwrap()), 0x2000);
    let mf = iommu_ioas_map_file {
        size: 40,
        flags: RW,
        ioas_id: ioas,
        fd: 7,
        start: K4,
        length: K4,
        ..Default::default()
    };
    assert_eq!(f.call(IOMMU_IOAS_MAP_FILE, &mf).0, Ok(0));
    let bad_fd = iommu_ioas_map_file { fd: 8, ..mf };
    assert_eq!(f.call(IOMMU_IOAS_MAP_FILE, &bad_fd).0, Err(Errno::EBADF));
}
