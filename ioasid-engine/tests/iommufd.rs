//! The engine's iommufd operations against the fake backend: object ids,
//! IOASes that map with no device, the strict unmap, copy, attach through
//! automatic and allocated HWPTs, replace, reserved regions, and what is
//! left after unbind and close.

mod common;

use common::*;
use ioasid_engine::backend::Prot;
use ioasid_engine::fake::FAKE_DAEMON_BASE;
use ioasid_engine::{ContextId, IoasMap, MapSource, ObjectKind};
use nix::errno::Errno;

const ALL: (u64, u64) = (0, u64::MAX);
const RO: Prot = Prot {
    read: true,
    write: false,
};

/// The caller: thread (and process) PID, which the fake cannot reach for
/// private memory.
static CALLER: ioasid_engine::backend::Pid = PID;

fn user(vaddr: u64) -> MapSource<'static> {
    MapSource::User {
        client: &CALLER,
        vaddr,
    }
}

fn fixed(iova: u64, length: u64) -> IoasMap {
    IoasMap {
        length,
        iova: Some(iova),
        prot: RW,
    }
}

fn anywhere(length: u64) -> IoasMap {
    IoasMap {
        length,
        iova: None,
        prot: RW,
    }
}

fn errno<T: std::fmt::Debug>(r: Result<T, ioasid_engine::Error>) -> Errno {
    r.unwrap_err().errno
}

#[test]
fn ids_start_at_1_are_shared_by_every_kind_and_the_lowest_is_reused() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    assert_eq!(e.ioas_alloc(ctx).unwrap(), 1);
    assert_eq!(e.iommufd_bind(DEV_A, ctx).unwrap(), 2);
    assert_eq!(e.ioas_alloc(ctx).unwrap(), 3);
    e.destroy(ctx, 1).unwrap();
    assert_eq!(errno(e.destroy(ctx, 1)), Errno::ENOENT);
    assert_eq!(errno(e.destroy(ctx, 2)), Errno::EBUSY, "a device");
    assert_eq!(e.hwpt_alloc(ctx, 2, 3, 0, false).unwrap(), 1, "lowest free");
    assert_eq!(e.object_kind(ctx, 1).unwrap(), Some(ObjectKind::Hwpt));
    assert_eq!(
        errno(e.destroy(ctx, 3)),
        Errno::EBUSY,
        "an IOAS with a HWPT"
    );
    e.destroy(ctx, 1).unwrap();
    e.destroy(ctx, 3).unwrap();
    e.iommufd_unbind(DEV_A, ctx).unwrap();
    assert!(!e.has_objects(ctx).unwrap());
}

#[test]
fn an_ioas_maps_with_no_device_and_replays_on_attach() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    let ioas = e.ioas_alloc(ctx).unwrap();
    assert_eq!(e.ioas_iova_ranges(ctx, ioas).unwrap(), (vec![ALL], 1));
    // A part of a page: alignment 1 without a HWPT.
    assert_eq!(
        e.ioas_map(ctx, ioas, user(MEM + 16), fixed(0x30_0010, 100))
            .unwrap(),
        0x30_0010
    );
    let dev = e.iommufd_bind(DEV_A, ctx).unwrap();
    assert_eq!(
        errno(e.attach_pt(DEV_A, ctx, &CALLER, ioas)),
        Errno::EADDRINUSE
    );
    assert_eq!(e.ioas_unmap(ctx, ioas, 0x30_0010, 100).unwrap(), 100);
    e.ioas_map(ctx, ioas, user(MEM), fixed(0x20_0000, 2 * K4))
        .unwrap();
    assert!(
        f.fake.entries(3).is_empty(),
        "nothing realised without a device"
    );
    let hwpt = e.attach_pt(DEV_A, ctx, &CALLER, ioas).unwrap();
    assert_eq!(hwpt, dev + 1);
    let entries = f.fake.entries(3);
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (entries[0].iova, entries[0].daemon_vaddr, entries[0].size),
        (0x20_0000, FAKE_DAEMON_BASE + MEM, 2 * K4)
    );
    let (holes, alignment) = e.ioas_iova_ranges(ctx, ioas).unwrap();
    assert_eq!(alignment, K4);
    assert_eq!(
        holes[0],
        (0, 0xfedf_ffff),
        "the fake's MSI window is reserved"
    );
    // A map now goes to the domain too; in the reserved window it is EINVAL.
    e.ioas_map(ctx, ioas, user(MEM + 2 * K4), fixed(0x40_0000, K4))
        .unwrap();
    assert_eq!(f.fake.entries(3).len(), 2);
    assert_eq!(
        errno(e.ioas_map(ctx, ioas, user(MEM), fixed(0xfee0_0000, K4))),
        Errno::EINVAL
    );
    e.detach_pt(DEV_A, ctx).unwrap();
    assert!(
        f.fake.entries(3).is_empty(),
        "the last detach empties the domain"
    );
    assert_eq!(
        e.object_kind(ctx, hwpt).unwrap(),
        None,
        "the auto HWPT went"
    );
    assert_eq!(e.ioas_iova_ranges(ctx, ioas).unwrap(), (vec![ALL], 1));
    e.close_context(ctx).unwrap();
    assert_eq!(f.fake.live_aliases(), 0);
}

#[test]
fn allocated_iovas_follow_the_kernels_rule() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    let ioas = e.ioas_alloc(ctx).unwrap();
    // 2 pages at a 2 MiB-aligned address: aligned to 8 KiB, never IOVA 0.
    assert_eq!(
        e.ioas_map(ctx, ioas, user(MEM), anywhere(2 * K4)).unwrap(),
        0x2000
    );
    assert_eq!(
        e.ioas_map(ctx, ioas, user(MEM), anywhere(K4)).unwrap(),
        0x1000
    );
    assert_eq!(
        e.ioas_map(ctx, ioas, user(MEM), anywhere(4 * K4)).unwrap(),
        0x4000
    );
    e.ioas_allow_iovas(ctx, ioas, &[(0x40_0000, 0x5f_ffff)])
        .unwrap();
    assert_eq!(
        e.ioas_map(ctx, ioas, user(MEM), anywhere(K4)).unwrap(),
        0x40_0000
    );
    assert_eq!(
        errno(e.ioas_allow_iovas(ctx, ioas, &[(5, 5)])),
        Errno::EINVAL,
        "start == last"
    );
    assert_eq!(
        errno(e.ioas_allow_iovas(ctx, ioas, &[(0, 0x1fff), (0x1000, 0x2fff)])),
        Errno::EINVAL
    );
    assert_eq!(
        errno(e.ioas_map(ctx, 99, user(MEM), anywhere(K4))),
        Errno::ENOENT
    );
}

#[test]
fn unmap_is_strict() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    let ioas = e.ioas_alloc(ctx).unwrap();
    assert_eq!(errno(e.ioas_unmap(ctx, ioas, 0x20_0000, K4)), Errno::ENOENT);
    assert_eq!(e.ioas_unmap(ctx, ioas, 0, u64::MAX).unwrap(), 0);
    e.ioas_map(ctx, ioas, user(MEM), fixed(0x20_0000, 2 * K4))
        .unwrap();
    e.ioas_map(ctx, ioas, user(MEM), fixed(0x20_2000, K4))
        .unwrap();
    assert_eq!(errno(e.ioas_unmap(ctx, ioas, 0x20_0000, K4)), Errno::ENOENT);
    assert_eq!(
        errno(e.ioas_unmap(ctx, ioas, 0x20_1000, 2 * K4)),
        Errno::ENOENT
    );
    assert_eq!(errno(e.ioas_unmap(ctx, ioas, 0x20_0000, 0)), Errno::EINVAL);
    assert_eq!(
        errno(e.ioas_unmap(ctx, ioas, u64::MAX - K4 + 1, 2 * K4)),
        Errno::EOVERFLOW
    );
    assert_eq!(e.ioas_unmap(ctx, ioas, 0x1f_f000, 5 * K4).unwrap(), 3 * K4);
    assert_eq!(f.fake.live_aliases(), 0);
}

#[test]
fn a_copy_shares_the_source_memory_and_outlives_its_unmap() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    let (a, b) = (e.ioas_alloc(ctx).unwrap(), e.ioas_alloc(ctx).unwrap());
    e.ioas_map(ctx, a, user(MEM), fixed(0x20_0000, 2 * K4))
        .unwrap();
    e.ioas_map(ctx, a, user(MEM + 2 * K4), fixed(0x20_2000, K4))
        .unwrap();
    e.ioas_map(
        ctx,
        a,
        user(MEM + 4 * K4),
        IoasMap {
            prot: RO,
            ..fixed(0x30_0000, K4)
        },
    )
    .unwrap();
    e.iommufd_bind(DEV_A, ctx).unwrap();
    e.attach_pt(DEV_A, ctx, &CALLER, b).unwrap();
    // Across two adjacent mappings, from the middle of the first.
    assert_eq!(
        e.ioas_copy(ctx, &PID, b, a, 0x20_1000, fixed(0x80_0000, 2 * K4))
            .unwrap(),
        0x80_0000
    );
    assert_eq!(
        errno(e.ioas_copy(ctx, &PID, b, a, 0x20_2000, fixed(0x90_0000, 2 * K4))),
        Errno::ENOENT
    );
    assert_eq!(
        errno(e.ioas_copy(ctx, &PID, b, a, 0x30_0000, fixed(0x90_0000, K4))),
        Errno::EPERM
    );
    assert_eq!(
        errno(e.ioas_copy(ctx, &PID, 99, a, 0x20_0000, fixed(0x90_0000, K4))),
        Errno::ENOENT
    );
    e.ioas_unmap(ctx, a, 0, u64::MAX).unwrap();
    let entries = f.fake.entries(3);
    assert_eq!(
        entries
            .iter()
            .map(|x| (x.iova, x.daemon_vaddr, x.size))
            .collect::<Vec<_>>(),
        vec![
            (0x80_0000, FAKE_DAEMON_BASE + MEM + K4, K4),
            (0x80_1000, FAKE_DAEMON_BASE + MEM + 2 * K4, K4)
        ],
        "the copy still maps the source's pages"
    );
    assert_eq!(e.ioas_unmap(ctx, b, 0x80_0000, 2 * K4).unwrap(), 2 * K4);
    e.close_context(ctx).unwrap();
    assert_eq!(f.fake.live_aliases(), 0);
}

#[test]
fn attach_to_an_ioas_shares_one_auto_hwpt_and_replace_moves_the_group() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    e.iommufd_bind(DEV_A, ctx).unwrap();
    e.iommufd_bind(DEV_B, ctx).unwrap();
    let (x, y) = (e.ioas_alloc(ctx).unwrap(), e.ioas_alloc(ctx).unwrap());
    e.ioas_map(ctx, x, user(MEM), fixed(0x10_0000, K4)).unwrap();
    e.ioas_map(ctx, y, user(MEM2), fixed(0x20_0000, K4))
        .unwrap();
    let hx = e.attach_pt(DEV_A, ctx, &CALLER, x).unwrap();
    assert_eq!(e.attach_pt(DEV_B, ctx, &CALLER, x).unwrap(), hx);
    assert_eq!(e.attach_pt(DEV_A, ctx, &CALLER, x).unwrap(), hx, "no-op");
    let manual = e.hwpt_alloc(ctx, 1, y, 0, false).unwrap();
    assert_eq!(e.attach_pt(DEV_A, ctx, &CALLER, manual).unwrap(), manual);
    assert_eq!(f.fake.entries(3)[0].iova, 0x20_0000, "group 3 now holds y");
    assert_eq!(f.fake.entries(4)[0].iova, 0x10_0000, "group 4 still x");
    let hy = e.attach_pt(DEV_A, ctx, &CALLER, y).unwrap();
    assert_ne!(hy, manual, "attach to an IOAS never picks a user HWPT");
    assert_eq!(e.attach_pt(DEV_A, ctx, &CALLER, manual).unwrap(), manual);
    assert_eq!(
        e.object_kind(ctx, hy).unwrap(),
        None,
        "the replaced auto HWPT went"
    );
    assert_eq!(errno(e.destroy(ctx, hx)), Errno::EBUSY);
    e.iommufd_unbind(DEV_B, ctx).unwrap();
    assert_eq!(e.object_kind(ctx, hx).unwrap(), None);
    assert!(f.fake.entries(4).is_empty());
    assert_eq!(errno(e.attach_pt(DEV_A, ctx, &CALLER, 99)), Errno::ENOENT);
    assert_eq!(
        errno(e.attach_pt(DEV_A, ctx, &CALLER, 1)),
        Errno::EINVAL,
        "a device id"
    );
    e.close_context(ctx).unwrap();
    assert!(f.fake.entries(3).is_empty());
}

#[test]
fn the_devices_of_a_group_share_one_hwpt() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    e.iommufd_bind(DEV_X, ctx).unwrap();
    e.iommufd_bind(DEV_Y, ctx).unwrap();
    let (x, y) = (e.ioas_alloc(ctx).unwrap(), e.ioas_alloc(ctx).unwrap());
    e.attach_pt(DEV_X, ctx, &CALLER, x).unwrap();
    assert_eq!(errno(e.attach_pt(DEV_Y, ctx, &CALLER, y)), Errno::EINVAL);
    let h = e.attach_pt(DEV_Y, ctx, &CALLER, x).unwrap();
    e.detach_pt(DEV_X, ctx).unwrap();
    assert_eq!(e.object_kind(ctx, h).unwrap(), Some(ObjectKind::Hwpt));
    let other = e.open_context();
    assert_eq!(errno(e.iommufd_bind(DEV_X, other)), Errno::EBUSY);
}

#[test]
fn allowed_ranges_and_mappings_in_reserved_regions_refuse_the_attach() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    e.iommufd_bind(DEV_A, ctx).unwrap();
    let ioas = e.ioas_alloc(ctx).unwrap();
    e.ioas_map(ctx, ioas, user(MEM), fixed(0xfee0_0000, K4))
        .unwrap();
    assert_eq!(
        errno(e.attach_pt(DEV_A, ctx, &CALLER, ioas)),
        Errno::EADDRINUSE
    );
    assert_eq!(e.ioas_unmap(ctx, ioas, 0, u64::MAX).unwrap(), K4);
    e.ioas_allow_iovas(ctx, ioas, &[(0xfe00_0000, 0xffff_ffff)])
        .unwrap();
    assert_eq!(
        errno(e.attach_pt(DEV_A, ctx, &CALLER, ioas)),
        Errno::EADDRINUSE
    );
    assert_eq!(e.object_kind(ctx, 3).unwrap(), None, "no HWPT left behind");
    e.ioas_allow_iovas(ctx, ioas, &[]).unwrap();
    e.attach_pt(DEV_A, ctx, &CALLER, ioas).unwrap();
    assert_eq!(
        errno(e.ioas_allow_iovas(ctx, ioas, &[(0xfe00_0000, 0xffff_ffff)])),
        Errno::EADDRINUSE
    );
}

#[test]
fn huge_pages_off_aligns_the_ioas_to_pages() {
    let f = fixture();
    let e = &f.engine;
    let ctx: ContextId = e.open_context();
    let ioas = e.ioas_alloc(ctx).unwrap();
    assert!(e.ioas_huge_pages(ctx, ioas, None).unwrap());
    assert!(!e.ioas_huge_pages(ctx, ioas, Some(false)).unwrap());
    assert_eq!(e.ioas_iova_ranges(ctx, ioas).unwrap().1, K4);
    assert_eq!(
        errno(e.ioas_map(ctx, ioas, user(MEM + 16), fixed(0x30_0010, 100))),
        Errno::EINVAL
    );
    e.ioas_huge_pages(ctx, ioas, Some(true)).unwrap();
    e.ioas_map(ctx, ioas, user(MEM + 16), fixed(0x30_0010, 100))
        .unwrap();
    assert_eq!(
        errno(e.ioas_huge_pages(ctx, ioas, Some(false))),
        Errno::EADDRINUSE
    );
    assert_eq!(
        errno(e.ioas_change_process(ctx)),
        Errno::EINVAL,
        "a user mapping"
    );
}

#[test]
fn map_file_aliases_the_file_and_copies_keep_its_origin() {
    let f = fixture();
    let e = &f.engine;
    let ctx = e.open_context();
    let memfd =
        nix::sys::memfd::memfd_create("engine-test", nix::sys::memfd::MFdFlags::empty()).unwrap();
    let ino = nix::sys::stat::fstat(&memfd).unwrap().st_ino;
    f.fake.add_file(ino, 8 * K4);
    let ioas = e.ioas_alloc(ctx).unwrap();
    let file = |offset| MapSource::File {
        file: std::os::fd::AsFd::as_fd(&memfd),
        offset,
        client: &PID,
    };
    assert_eq!(
        e.ioas_map(ctx, ioas, file(K4), fixed(0x30_0000, 2 * K4))
            .unwrap(),
        0x30_0000
    );
    assert_eq!(
        errno(e.ioas_map(ctx, ioas, file(4 * K4), fixed(0x40_0000, 8 * K4))),
        Errno::EINVAL
    );
    e.ioas_copy(ctx, &PID, ioas, ioas, 0x30_0000, anywhere(K4))
        .unwrap();
    e.ioas_change_process(ctx).unwrap();
    e.close_context(ctx).unwrap();
    assert_eq!(f.fake.live_aliases(), 0);
}
