//! The engine against the fake backend: every method and errno path.

mod common;

use std::sync::Arc;

use common::*;
use ioasid_engine::backend::Prot;
use ioasid_engine::fake::{FakeBackend, FakeCall, FakeEntry};
use ioasid_engine::{Attachment, DeviceId, DeviceSpec, DmaMap, Engine, Error};
use nix::errno::Errno::{EBUSY, EEXIST, EFAULT, EINVAL, ENODEV, ENOENT, ENOMEM, ENOSPC};

/// Private memory of PID.
const PRIVATE: u64 = 0x2000_0000;
/// The last 4 KiB page of the 64-bit space.
const TOP_PAGE: u64 = !0xfff;

/// A domain entry mapping `iova` to client address `vaddr`, read-write.
fn e_rw(iova: u64, vaddr: u64, size: u64) -> FakeEntry {
    e(iova, vaddr, size, RW)
}

#[test]
fn ioasid_numbers_start_at_one_and_are_reused() {
    let f = fixture();
    let ctx = f.engine.open_context();
    assert_eq!(f.engine.alloc(ctx).unwrap(), 1);
    assert_eq!(f.engine.alloc(ctx).unwrap(), 2);
    f.engine.free(ctx, 1).unwrap();
    assert_eq!(errno(f.engine.free(ctx, 1)), ENOENT);
    assert_eq!(errno(f.engine.free(ctx, 0)), ENOENT);
    assert_eq!(errno(f.engine.info(ctx, 9)), ENOENT);
    assert_eq!(f.engine.alloc(ctx).unwrap(), 1);
    // Numbers are per context.
    let other = f.engine.open_context();
    assert_eq!(f.engine.alloc(other).unwrap(), 1);
}

#[test]
fn unknown_context_and_device_are_einval() {
    let f = fixture();
    let ctx = f.engine.open_context();
    f.engine.close_context(ctx).unwrap();
    assert_eq!(errno(f.engine.alloc(ctx)), EINVAL);
    assert_eq!(errno(f.engine.close_context(ctx)), EINVAL);
    let ctx = f.engine.open_context();
    assert_eq!(errno(f.engine.bind(DeviceId(99), ctx)), EINVAL);
    let dup = Engine::new(
        f.fake.clone(),
        vec![
            DeviceSpec {
                id: DEV_A,
                name: "a".into(),
                group: 1,
            },
            DeviceSpec {
                id: DEV_A,
                name: "b".into(),
                group: 2,
            },
        ],
    );
    assert_eq!(errno(dup), EINVAL);
}

#[test]
fn never_attached_ioasid_refuses_map_and_unmap_with_enodev() {
    let f = fixture();
    let ctx = f.engine.open_context();
    let io = f.engine.alloc(ctx).unwrap();
    let e = f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap_err();
    assert_eq!(e.errno, ENODEV);
    assert!(e.message.contains("attach"), "{}", e.message);
    assert_eq!(errno(f.engine.unmap_dma(ctx, io, 0, K4)), ENODEV);
    assert_eq!(errno(f.engine.unmap_all_dma(ctx, io)), ENODEV);
    let info = f.engine.info(ctx, io).unwrap();
    assert!(!info.attached);
    assert_eq!(info.pgsize_bitmap, 0);
    assert!(info.iova_ranges.is_empty());
    assert_eq!(info.mappings, 0);
    f.engine.free(ctx, io).unwrap();
    assert!(f.fake.calls().is_empty(), "{:?}", f.fake.calls());
}

#[test]
fn map_realises_in_the_attached_group_and_info_reports_it() {
    let f = fixture();
    let (ctx, io) = f.attached();
    f.engine
        .map_dma(ctx, &PID, io, m(0x10_0000, MEM, 0x4000))
        .unwrap();
    // Spanning the two shared pieces: two domain entries, one mapping.
    f.engine
        .map_dma(ctx, &PID, io, m(0x20_0000, MEM + PIECE - K4, 2 * K4))
        .unwrap();
    assert_eq!(
        f.fake.entries(3),
        vec![
            e_rw(0x10_0000, MEM, 0x4000),
            e_rw(0x20_0000, MEM + PIECE - K4, K4),
            e_rw(0x20_1000, MEM + PIECE, K4),
        ]
    );
    let info = f.engine.info(ctx, io).unwrap();
    assert!(info.attached);
    assert_eq!(info.mappings, 2);
    assert_eq!(info.mapped_bytes, 0x6000);
    assert_eq!(info.pgsize_bitmap, ioasid_engine::fake::FAKE_PGSIZES);
    assert_eq!(
        info.iova_ranges,
        ioasid_engine::fake::FAKE_IOVA_RANGES.to_vec()
    );
    assert_eq!(
        info.devices,
        vec![Attachment {
            device: DEV_A,
            pasid: None
        }]
    );
    assert_eq!(info.dma_avail, Some(65535 - 3));
    assert_eq!(f.engine.pinned_bytes(ctx).unwrap(), 0x6000);
    assert_eq!(f.fake.live_aliases(), 2);
}

#[test]
fn mappings_survive_detach_and_are_replayed_on_reattach() {
    let f = fixture();
    let (ctx, io) = f.attached();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    f.engine.detach(DEV_A, ctx, io, None).unwrap();
    assert!(
        f.fake.entries(3).is_empty(),
        "last detach empties the domain"
    );
    // Still usable in software: validated against the last known domain.
    f.engine
        .map_dma(ctx, &PID, io, m(0x1000, MEM + K4, K4))
        .unwrap();
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(0x800, MEM, K4))),
        EINVAL
    );
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4))),
        EEXIST
    );
    assert!(f.fake.entries(3).is_empty());
    let info = f.engine.info(ctx, io).unwrap();
    assert!(info.attached);
    assert!(info.devices.is_empty());
    assert_eq!(info.mappings, 2);
    // Reattaching (here through another device of another group) replays.
    f.engine.bind(DEV_B, ctx).unwrap();
    f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap();
    assert_eq!(
        f.fake.entries(4),
        vec![e_rw(0, MEM, K4), e_rw(0x1000, MEM + K4, K4)]
    );
    assert!(f.fake.entries(3).is_empty());
    f.engine.attach(DEV_A, ctx, &PID, io, None).unwrap();
    assert_eq!(f.fake.entries(3), f.fake.entries(4));
}

#[test]
fn map_errnos_change_nothing() {
    let f = fixture();
    let (ctx, io) = f.attached();
    f.engine
        .map_dma(ctx, &PID, io, m(0x10_0000, MEM, 0x4000))
        .unwrap();
    let before = (
        f.fake.entries(3),
        f.fake.live_aliases(),
        f.engine.pinned_bytes(ctx).unwrap(),
    );
    let no_access = DmaMap {
        prot: Prot::default(),
        ..m(0, MEM, K4)
    };
    let write_only = DmaMap {
        prot: Prot {
            read: false,
            write: true,
        },
        ..m(0x40_0000, MEM, K4)
    };
    let cases = [
        (no_access, EINVAL),
        (m(0, MEM, 0), EINVAL),
        (m(0x800, MEM, K4), EINVAL),
        (m(0, MEM + 0x800, K4), EINVAL),
        (m(0, MEM, 0x1800), EINVAL),
        (m(u64::MAX - K4 + 1, MEM, K4), EINVAL),
        (m(TOP_PAGE, MEM, 2 * K4), EINVAL),
        (m(0, TOP_PAGE, 2 * K4), EINVAL),
        // The MSI window is not a permitted range, nor is anything past 48 bits.
        (m(0xfee0_0000, MEM, K4), EINVAL),
        (m(0xfedf_f000, MEM, 2 * K4), EINVAL),
        (m(1 << 48, MEM, K4), EINVAL),
        // Overlaps: same start, inside, straddling either end, covering.
        (m(0x10_0000, MEM, K4), EEXIST),
        (m(0x10_1000, MEM, K4), EEXIST),
        (m(0x0f_f000, MEM, 2 * K4), EEXIST),
        (m(0x10_3000, MEM, 2 * K4), EEXIST),
        (m(0x0f_0000, MEM, 0x10_0000), EEXIST),
        // Private memory cannot be aliased.
        (m(0x40_0000, PRIVATE, K4), EFAULT),
        (m(0x40_0000, MEM + 2 * PIECE - K4, 2 * K4), EFAULT),
    ];
    for (req, want) in cases {
        let e = f.engine.map_dma(ctx, &PID, io, req).unwrap_err();
        assert_eq!(e.errno, want, "{req:?}: {e}");
        assert!(!e.message.is_empty());
    }
    let after = (
        f.fake.entries(3),
        f.fake.live_aliases(),
        f.engine.pinned_bytes(ctx).unwrap(),
    );
    assert_eq!(before, after);
    f.engine.map_dma(ctx, &PID, io, write_only).unwrap();
    assert_eq!(f.fake.entries(3).len(), 2);
    // Adjacent mappings on both sides are fine.
    f.engine
        .map_dma(ctx, &PID, io, m(0x0f_f000, MEM, K4))
        .unwrap();
    f.engine
        .map_dma(ctx, &PID, io, m(0x10_4000, MEM, K4))
        .unwrap();
}

#[test]
fn private_memory_error_tells_the_user_to_share() {
    let f = fixture();
    let (ctx, io) = f.attached();
    let e = f
        .engine
        .map_dma(ctx, &PID, io, m(0, PRIVATE, K4))
        .unwrap_err();
    assert_eq!(e.errno, EFAULT);
    assert!(e.message.contains("MAP_SHARED"), "{}", e.message);
    assert_eq!(f.fake.live_aliases(), 0);
}

#[test]
fn domain_full_is_enospc_and_releases_the_alias() {
    let f = fixture();
    f.fake.set_entry_limit(3, 1);
    let (ctx, io) = f.attached();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(K4, MEM, K4))),
        ENOSPC
    );
    assert_eq!(f.fake.live_aliases(), 1);
    assert_eq!(f.engine.info(ctx, io).unwrap().mappings, 1);
    assert_eq!(f.engine.info(ctx, io).unwrap().dma_avail, Some(0));
}

#[test]
fn alignment_follows_the_smallest_page_size_of_the_domains() {
    let f = fixture();
    let mb2 = 2 << 20;
    f.fake
        .set_domain(4, (1 << 21) | (1 << 30), &[(0, (1 << 39) - 1)]);
    let (ctx, io) = f.attached();
    f.engine.bind(DEV_B, ctx).unwrap();
    f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap();
    let info = f.engine.info(ctx, io).unwrap();
    assert_eq!(info.pgsize_bitmap, (1 << 21) | (1 << 30));
    assert_eq!(
        info.iova_ranges,
        vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)]
    );
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4))),
        EINVAL
    );
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(1 << 40, MEM, mb2))),
        EINVAL
    );
    f.engine.map_dma(ctx, &PID, io, m(mb2, MEM, mb2)).unwrap();
    assert_eq!(f.fake.entries(3), vec![e_rw(mb2, MEM, mb2)]);
    assert_eq!(f.fake.entries(4), vec![e_rw(mb2, MEM, mb2)]);
    assert_eq!(errno(f.engine.unmap_dma(ctx, io, mb2, K4)), EINVAL);
    // With B gone, A's 4 KiB pages are enough again.
    f.engine.detach(DEV_B, ctx, io, None).unwrap();
    assert!(f.fake.entries(4).is_empty());
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
}

#[test]
fn attaching_a_group_whose_domain_refuses_a_mapping_fails_cleanly() {
    let f = fixture();
    f.fake.set_domain(4, 1 << 12, &[(0, 0xffff_ffff)]);
    let (ctx, io) = f.attached();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    f.engine
        .map_dma(ctx, &PID, io, m(1 << 40, MEM, K4))
        .unwrap();
    f.engine.bind(DEV_B, ctx).unwrap();
    assert_eq!(errno(f.engine.attach(DEV_B, ctx, &PID, io, None)), EINVAL);
    assert!(f.fake.entries(4).is_empty());
    assert_eq!(f.engine.info(ctx, io).unwrap().devices.len(), 1);
}

#[test]
fn unmap_follows_type1v2() {
    let f = fixture();
    let (ctx, io) = f.attached();
    for i in 0..4 {
        f.engine
            .map_dma(
                ctx,
                &PID,
                io,
                m(0x10_0000 + i * 0x4000, MEM + i * 0x4000, 0x4000),
            )
            .unwrap();
    }
    let before = f.fake.entries(3);
    for (iova, size) in [
        (0x10_1000, 0x1000), // inside one mapping
        (0x10_0000, 0x2000), // a prefix
        (0x0f_f000, 0x2000), // straddling the first start
        (0x10_2000, 0x4000), // straddling two mappings
        (0x10_0000, 0x7000), // whole first, part of second
        (0x10_0000, 0),      // empty
        (0x10_0800, 0x4000), // misaligned
        (0x10_0000, 0x4800), // misaligned size
        (TOP_PAGE, 0x2000),  // overflow
    ] {
        assert_eq!(
            errno(f.engine.unmap_dma(ctx, io, iova, size)),
            EINVAL,
            "{iova:#x}+{size:#x}"
        );
    }
    assert_eq!(f.fake.entries(3), before);
    // Nothing mapped there: success with 0 bytes (iommufd would say ENOENT).
    assert_eq!(
        f.engine.unmap_dma(ctx, io, 0x80_0000, 0x10_0000).unwrap(),
        0
    );
    // A range covering two whole mappings.
    assert_eq!(
        f.engine.unmap_dma(ctx, io, 0x0f_0000, 0x18_000).unwrap(),
        0x8000
    );
    assert_eq!(f.fake.entries(3), before[2..].to_vec());
    assert_eq!(f.fake.live_aliases(), 2);
    assert_eq!(f.engine.pinned_bytes(ctx).unwrap(), 0x8000);
    // Exactly one mapping.
    assert_eq!(
        f.engine.unmap_dma(ctx, io, 0x10_8000, 0x4000).unwrap(),
        0x4000
    );
    assert_eq!(f.engine.unmap_all_dma(ctx, io).unwrap(), 0x4000);
    assert_eq!(f.engine.unmap_all_dma(ctx, io).unwrap(), 0);
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.fake.live_aliases(), 0);
    assert_eq!(f.engine.pinned_bytes(ctx).unwrap(), 0);
    assert_eq!(f.engine.info(ctx, io).unwrap().mappings, 0);
}

#[test]
fn map_and_unmap_apply_to_every_realising_group() {
    let f = fixture();
    let (ctx, io) = f.attached();
    f.engine.bind(DEV_B, ctx).unwrap();
    f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    assert_eq!(f.fake.entries(3), vec![e_rw(0, MEM, K4)]);
    assert_eq!(f.fake.entries(4), vec![e_rw(0, MEM, K4)]);
    // One alias serves both domains.
    assert_eq!(f.fake.live_aliases(), 1);
    assert_eq!(f.engine.unmap_dma(ctx, io, 0, K4).unwrap(), K4);
    assert!(f.fake.entries(3).is_empty() && f.fake.entries(4).is_empty());
}

#[test]
fn failed_map_in_the_second_group_is_undone_in_the_first() {
    let f = fixture();
    let (ctx, io) = f.attached();
    f.engine.bind(DEV_B, ctx).unwrap();
    f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap();
    // Two segments per group; fail the third backend map (group 4's first).
    f.fake.fail_map_after(2, ENOSPC);
    let req = m(0, MEM + PIECE - K4, 2 * K4);
    assert_eq!(errno(f.engine.map_dma(ctx, &PID, io, req)), ENOSPC);
    assert!(f.fake.entries(3).is_empty());
    assert!(f.fake.entries(4).is_empty());
    assert_eq!(f.fake.live_aliases(), 0);
    assert_eq!(f.engine.pinned_bytes(ctx).unwrap(), 0);
    assert_eq!(f.engine.info(ctx, io).unwrap().mappings, 0);
    // Fail a second segment: the first one of the same group is undone too.
    f.fake.fail_map_after(1, ENOSPC);
    assert_eq!(errno(f.engine.map_dma(ctx, &PID, io, req)), ENOSPC);
    assert!(f.fake.entries(3).is_empty());
    f.engine.map_dma(ctx, &PID, io, req).unwrap();
    assert_eq!(f.fake.entries(3).len(), 2);
    assert_eq!(f.fake.entries(4).len(), 2);
}

#[test]
fn replay_failure_rolls_back_and_fails_the_attach() {
    let f = fixture();
    let (ctx, io) = f.b_bound_to_three_mappings();
    f.fake.fail_map_after(1, ENOSPC);
    let e = f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap_err();
    assert_eq!(e.errno, ENOSPC);
    assert!(e.message.contains("0x1000"), "{}", e.message);
    assert!(f.fake.entries(4).is_empty(), "no half-realised domain");
    assert_eq!(f.engine.info(ctx, io).unwrap().devices.len(), 1);
    // Not attached: a detach says so, and a retry works.
    assert_eq!(errno(f.engine.detach(DEV_B, ctx, io, None)), ENOENT);
    f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap();
    assert_eq!(f.fake.entries(4), f.fake.entries(3));
}

#[test]
fn group_rule_refuses_every_command_until_the_group_is_whole() {
    let f = fixture();
    let ctx = f.engine.open_context();
    let io = f.engine.alloc(ctx).unwrap();
    f.engine.bind(DEV_X, ctx).unwrap();
    f.engine.bind(DEV_Y, ctx).unwrap();
    f.engine.attach(DEV_X, ctx, &PID, io, None).unwrap();
    let check = |e: Error| {
        assert_eq!(e.errno, EBUSY);
        assert!(e.message.contains("0000:01:02.0"), "{}", e.message);
        assert!(!e.message.contains("0000:01:01.0"), "{}", e.message);
        assert!(
            e.message.contains("attach them too, or unbind them"),
            "{}",
            e.message
        );
    };
    check(f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap_err());
    check(f.engine.unmap_dma(ctx, io, 0, K4).unwrap_err());
    check(f.engine.unmap_all_dma(ctx, io).unwrap_err());
    check(f.engine.info(ctx, io).unwrap_err());
    check(f.engine.free(ctx, io).unwrap_err());
    // Another IOASID of the context is not affected.
    let other = f.engine.alloc(ctx).unwrap();
    f.engine.info(ctx, other).unwrap();
    // Attaching the other device lifts it.
    f.engine.attach(DEV_Y, ctx, &PID, io, None).unwrap();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    assert_eq!(f.fake.entries(7), vec![e_rw(0, MEM, K4)]);
    assert_eq!(f.engine.info(ctx, io).unwrap().devices.len(), 2);
    // Detaching one of them brings it back...
    f.engine.detach(DEV_Y, ctx, io, None).unwrap();
    assert_eq!(f.fake.entries(7).len(), 1, "group still realised through X");
    check(f.engine.map_dma(ctx, &PID, io, m(K4, MEM, K4)).unwrap_err());
    // ...and unbinding it lifts it too.
    f.engine.unbind(DEV_Y, ctx).unwrap();
    f.engine.map_dma(ctx, &PID, io, m(K4, MEM, K4)).unwrap();
}

#[test]
fn unbound_devices_of_the_group_do_not_count() {
    let f = fixture();
    let ctx = f.engine.open_context();
    let io = f.engine.alloc(ctx).unwrap();
    f.engine.bind(DEV_X, ctx).unwrap();
    f.engine.attach(DEV_X, ctx, &PID, io, None).unwrap();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    // Binding the other device of the group makes the group partial.
    f.engine.bind(DEV_Y, ctx).unwrap();
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(K4, MEM, K4))),
        EBUSY
    );
}

#[test]
fn a_group_has_one_rid_address_space() {
    let f = fixture();
    let ctx = f.engine.open_context();
    let a = f.engine.alloc(ctx).unwrap();
    let b = f.engine.alloc(ctx).unwrap();
    f.engine.bind(DEV_X, ctx).unwrap();
    f.engine.bind(DEV_Y, ctx).unwrap();
    f.engine.attach(DEV_X, ctx, &PID, a, None).unwrap();
    let e = f.engine.attach(DEV_Y, ctx, &PID, b, None).unwrap_err();
    assert_eq!(e.errno, EBUSY);
    assert!(e.message.contains("0000:01:01.0"), "{}", e.message);
    // PASID attachments are not bound by it.
    f.engine.attach(DEV_Y, ctx, &PID, b, Some(5)).unwrap();
}

#[test]
fn group_ownership_spans_contexts() {
    let f = fixture();
    let c1 = f.engine.open_context();
    let c2 = f.engine.open_context();
    f.engine.bind(DEV_X, c1).unwrap();
    assert_eq!(f.engine.bound_context(DEV_X), Some(c1));
    let e = f.engine.bind(DEV_Y, c2).unwrap_err();
    assert_eq!(e.errno, EBUSY);
    assert!(e.message.contains("0000:01:01.0"), "{}", e.message);
    assert_eq!(errno(f.engine.bind(DEV_X, c2)), EBUSY);
    assert_eq!(errno(f.engine.bind(DEV_X, c1)), EBUSY);
    // Other groups are free.
    f.engine.bind(DEV_A, c2).unwrap();
    // Another context cannot touch c1's device.
    let io2 = f.engine.alloc(c2).unwrap();
    assert_eq!(errno(f.engine.attach(DEV_X, c2, &PID, io2, None)), EINVAL);
    assert_eq!(errno(f.engine.unbind(DEV_X, c2)), EINVAL);
    f.engine.unbind(DEV_X, c1).unwrap();
    assert_eq!(f.engine.bound_context(DEV_X), None);
    f.engine.bind(DEV_Y, c2).unwrap();
    assert_eq!(errno(f.engine.bind(DEV_X, c1)), EBUSY);
}

#[test]
fn bind_attach_detach_errnos() {
    let f = fixture();
    let ctx = f.engine.open_context();
    let io = f.engine.alloc(ctx).unwrap();
    let io2 = f.engine.alloc(ctx).unwrap();
    let e = f.engine.attach(DEV_A, ctx, &PID, io, None).unwrap_err();
    assert_eq!(e.errno, EINVAL);
    assert!(e.message.contains("not bound"), "{}", e.message);
    assert_eq!(errno(f.engine.detach(DEV_A, ctx, io, None)), EINVAL);
    assert_eq!(errno(f.engine.unbind(DEV_A, ctx)), EINVAL);
    f.engine.bind(DEV_A, ctx).unwrap();
    assert_eq!(errno(f.engine.attach(DEV_A, ctx, &PID, 77, None)), ENOENT);
    assert_eq!(errno(f.engine.attach(DEV_A, ctx, &PID, 0, None)), ENOENT);
    f.engine.attach(DEV_A, ctx, &PID, io, None).unwrap();
    assert_eq!(errno(f.engine.attach(DEV_A, ctx, &PID, io, None)), EBUSY);
    assert_eq!(errno(f.engine.attach(DEV_A, ctx, &PID, io2, None)), EBUSY);
    assert_eq!(errno(f.engine.detach(DEV_A, ctx, io2, None)), ENOENT);
    assert_eq!(errno(f.engine.detach(DEV_A, ctx, 77, None)), ENOENT);
    let e = f.engine.free(ctx, io).unwrap_err();
    assert_eq!(e.errno, EBUSY);
    assert!(e.message.contains("0000:00:03.0"), "{}", e.message);
    f.engine.detach(DEV_A, ctx, io, None).unwrap();
    assert_eq!(errno(f.engine.detach(DEV_A, ctx, io, None)), ENOENT);
    f.engine.free(ctx, io).unwrap();
}

#[test]
fn pasid_attachments_are_recorded_without_touching_the_domain() {
    let f = fixture();
    let ctx = f.engine.open_context();
    let io = f.engine.alloc(ctx).unwrap();
    f.engine.bind(DEV_A, ctx).unwrap();
    f.engine.attach(DEV_A, ctx, &PID, io, Some(7)).unwrap();
    assert_eq!(errno(f.engine.attach(DEV_A, ctx, &PID, io, Some(7))), EBUSY);
    let io2 = f.engine.alloc(ctx).unwrap();
    assert_eq!(
        errno(f.engine.attach(DEV_A, ctx, &PID, io2, Some(7))),
        EBUSY
    );
    f.engine.attach(DEV_A, ctx, &PID, io, Some(8)).unwrap();
    assert_eq!(
        errno(f.engine.attach(DEV_A, ctx, &PID, io, Some(1 << 20))),
        EINVAL
    );
    f.engine
        .attach(DEV_A, ctx, &PID, io2, Some((1 << 20) - 1))
        .unwrap();
    f.engine
        .detach(DEV_A, ctx, io2, Some((1 << 20) - 1))
        .unwrap();
    // The IOASID now accepts maps, kept in software only.
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    assert!(f.fake.entries(3).is_empty());
    assert!(!f
        .fake
        .calls()
        .iter()
        .any(|c| matches!(c, FakeCall::Map { .. })));
    let info = f.engine.info(ctx, io).unwrap();
    assert!(info.attached);
    assert_eq!(
        info.devices,
        vec![
            Attachment {
                device: DEV_A,
                pasid: Some(7)
            },
            Attachment {
                device: DEV_A,
                pasid: Some(8)
            }
        ]
    );
    assert_eq!(errno(f.engine.free(ctx, io)), EBUSY);
    assert_eq!(errno(f.engine.detach(DEV_A, ctx, io, Some(9))), ENOENT);
    assert_eq!(errno(f.engine.detach(DEV_A, ctx, io, None)), ENOENT);
    f.engine.detach(DEV_A, ctx, io, Some(7)).unwrap();
    f.engine.detach(DEV_A, ctx, io, Some(8)).unwrap();
    f.engine.free(ctx, io).unwrap();
    assert_eq!(f.fake.live_aliases(), 0);
}

#[test]
fn registration_rules() {
    let f = fixture();
    let (ctx, io) = f.attached();
    let r = MEM + 0x10_0000;
    for (v, s, want) in [
        (r, 0, EINVAL),
        (r + 0x800, 0x4000, EINVAL),
        (r, 0x4800, EINVAL),
        (TOP_PAGE, 0x2000, EINVAL),
        (PRIVATE, 0x4000, EFAULT),
    ] {
        assert_eq!(
            errno(f.engine.register_memory(ctx, &PID, v, s)),
            want,
            "{v:#x}+{s:#x}"
        );
    }
    f.engine.register_memory(ctx, &PID, r, 0x10_0000).unwrap();
    assert_eq!(
        errno(f.engine.register_memory(ctx, &PID, r, 0x10_0000)),
        EEXIST
    );
    assert_eq!(
        errno(f.engine.register_memory(ctx, &PID, r - K4, 2 * K4)),
        EEXIST
    );
    assert_eq!(
        errno(f.engine.register_memory(ctx, &PID, r + 0xf_f000, 2 * K4)),
        EEXIST
    );
    assert_eq!(f.fake.live_aliases(), 1);
    // Maps inside reuse the registration's alias.
    f.fake.clear_calls();
    f.engine
        .map_dma(ctx, &PID, io, m(0, r + 0x4000, 0x4000))
        .unwrap();
    assert!(!f
        .fake
        .calls()
        .iter()
        .any(|c| matches!(c, FakeCall::Alias { .. })));
    assert_eq!(f.fake.live_aliases(), 1);
    assert_eq!(f.fake.entries(3), vec![e_rw(0, r + 0x4000, 0x4000)]);
    // Outside every registration: ENOENT, saying why.
    let e = f
        .engine
        .map_dma(ctx, &PID, io, m(0x10_0000, MEM, K4))
        .unwrap_err();
    assert_eq!(e.errno, ENOENT);
    assert!(e.message.contains("regist"), "{}", e.message);
    assert_eq!(
        errno(
            f.engine
                .map_dma(ctx, &PID, io, m(0x10_0000, r + 0xf_f000, 2 * K4))
        ),
        ENOENT
    );
    // Unregister: exact match, not while used.
    assert_eq!(errno(f.engine.unregister_memory(ctx, r, K4)), ENOENT);
    assert_eq!(
        errno(f.engine.unregister_memory(ctx, r + K4, 0x10_0000)),
        ENOENT
    );
    assert_eq!(errno(f.engine.unregister_memory(ctx, r, 0x10_0000)), EBUSY);
    f.engine.unmap_dma(ctx, io, 0, 0x4000).unwrap();
    f.engine.unregister_memory(ctx, r, 0x10_0000).unwrap();
    assert_eq!(f.fake.live_aliases(), 0);
    assert_eq!(f.engine.pinned_bytes(ctx).unwrap(), 0);
    assert_eq!(errno(f.engine.unregister_memory(ctx, r, 0x10_0000)), ENOENT);
    // Without registrations, maps alias on their own again.
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
}

#[test]
fn registration_spanning_pieces_is_sliced_per_map() {
    let f = fixture();
    let (ctx, io) = f.attached();
    f.engine.register_memory(ctx, &PID, MEM, 2 * PIECE).unwrap();
    f.engine
        .map_dma(ctx, &PID, io, m(0x100_0000, MEM + PIECE - K4, 3 * K4))
        .unwrap();
    assert_eq!(
        f.fake.entries(3),
        vec![
            e_rw(0x100_0000, MEM + PIECE - K4, K4),
            e_rw(0x100_1000, MEM + PIECE, 2 * K4),
        ]
    );
}

/// Issue 17, item 2: RLIMIT_MEMLOCK was counted per ioasid file (4 files
/// of one process pinned 4 x the limit) and a page mapped twice counted
/// twice. Type1 charges the process: every file of it, each page once, on
/// top of what the kernel already charges it (VmLck).
#[test]
fn memlock_is_counted_per_process_each_page_once_with_what_it_locked_itself() {
    let f = fixture();
    f.fake.set_memlock(PID, Some(0x10000));
    let (ctx, io) = f.attached();
    let io2 = f.engine.alloc(ctx).unwrap();
    f.engine.bind(DEV_B, ctx).unwrap();
    f.engine.attach(DEV_B, ctx, &PID, io2, None).unwrap();
    // The same pages in two IOASIDs and at two IOVAs: pinned once.
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, 0x8000)).unwrap();
    f.engine.map_dma(ctx, &PID, io2, m(0, MEM, 0x8000)).unwrap();
    f.engine
        .map_dma(ctx, &PID, io2, m(0x10_0000, MEM, 0x8000))
        .unwrap();
    assert_eq!(f.engine.pinned_bytes_of_process(PID), 0x8000);
    f.engine
        .map_dma(ctx, &PID, io, m(0x8000, MEM + 0x8000, 0x8000))
        .unwrap();
    assert_eq!(f.engine.pinned_bytes_of_process(PID), 0x10000);
    let before = (f.fake.entries(3), f.fake.entries(4), f.fake.live_aliases());
    let e = f
        .engine
        .map_dma(ctx, &PID, io, m(0x20000, MEM + 0x10000, K4))
        .unwrap_err();
    assert_eq!(e.errno, ENOMEM);
    assert!(
        e.message.contains("0x10000") && e.message.contains("RLIMIT_MEMLOCK"),
        "{}",
        e.message
    );
    assert_eq!(
        errno(f.engine.register_memory(ctx, &PID, MEM + PIECE, K4)),
        ENOMEM
    );
    assert_eq!(
        before,
        (f.fake.entries(3), f.fake.entries(4), f.fake.live_aliases())
    );
    // At the limit, pages it has pinned already still map anywhere.
    f.engine
        .map_dma(ctx, &PID, io, m(0x40000, MEM + 0x4000, 0x4000))
        .unwrap();
    // A second ioasid file of the same process shares the one limit.
    let ctx2 = f.engine.open_context();
    let io3 = f.engine.alloc(ctx2).unwrap();
    f.engine.bind(DEV_X, ctx2).unwrap();
    f.engine.attach(DEV_X, ctx2, &PID, io3, None).unwrap();
    assert_eq!(
        errno(f.engine.map_dma(ctx2, &PID, io3, m(0, MEM2, K4))),
        ENOMEM
    );
    f.engine.map_dma(ctx2, &PID, io3, m(0, MEM, K4)).unwrap();
    // Another process has its own limit (none).
    f.fake.share(PID + 1, MEM, PIECE);
    let ctx3 = f.engine.open_context();
    f.engine
        .register_memory(ctx3, &(PID + 1), MEM + 0x10000, K4)
        .unwrap();
    assert_eq!(f.engine.pinned_bytes_of_process(PID + 1), K4);
    f.engine.close_context(ctx3).unwrap();
    // Unmapped everywhere, the bytes come back, but what the process
    // locked itself (VmLck) counts: 0x8000 of 0x10000 are left.
    f.engine.unmap_all_dma(ctx, io).unwrap();
    f.engine.unmap_all_dma(ctx, io2).unwrap();
    f.engine.close_context(ctx2).unwrap();
    assert_eq!(f.engine.pinned_bytes_of_process(PID), 0);
    f.fake.set_locked(PID, 0x8000);
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, 0x8000)).unwrap();
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(0x8000, MEM + 0x8000, K4))),
        ENOMEM
    );
    // Registered memory is charged once, and maps inside it are free.
    f.engine.unmap_all_dma(ctx, io).unwrap();
    f.fake.set_locked(PID, 0);
    f.engine.register_memory(ctx, &PID, MEM, 0x10000).unwrap();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, 0x10000)).unwrap();
    f.engine
        .map_dma(ctx, &PID, io2, m(0, MEM, 0x10000))
        .unwrap();
    assert_eq!(f.engine.pinned_bytes_of_process(PID), 0x10000);
    assert_eq!(
        errno(f.engine.register_memory(ctx, &PID, MEM + 0x10000, K4)),
        ENOMEM
    );
    f.engine.close_context(ctx).unwrap();
    assert_eq!(f.engine.pinned_bytes_of_process(PID), 0);
    assert_eq!(f.engine.pinned_bytes_of_process(PID + 1), 0);
}

#[test]
fn unbind_detaches_and_empties_the_domain() {
    let f = fixture();
    let (ctx, io) = f.attached();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    f.engine.attach(DEV_A, ctx, &PID, io, Some(3)).unwrap();
    f.engine.unbind(DEV_A, ctx).unwrap();
    assert!(f.fake.entries(3).is_empty());
    assert!(f.engine.info(ctx, io).unwrap().devices.is_empty());
    assert_eq!(f.engine.bound_context(DEV_A), None);
    f.engine.free(ctx, io).unwrap();
    assert_eq!(f.fake.live_aliases(), 0);
}

#[test]
fn close_context_leaks_nothing() {
    let f = fixture();
    let (ctx, io) = f.attached();
    let io2 = f.engine.alloc(ctx).unwrap();
    f.engine.bind(DEV_X, ctx).unwrap();
    f.engine.bind(DEV_Y, ctx).unwrap();
    f.engine.attach(DEV_X, ctx, &PID, io2, None).unwrap();
    f.engine.attach(DEV_Y, ctx, &PID, io2, None).unwrap();
    f.engine.attach(DEV_A, ctx, &PID, io2, Some(1)).unwrap();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, 0x4000)).unwrap();
    f.engine.map_dma(ctx, &PID, io2, m(0, MEM, 0x4000)).unwrap();
    f.engine
        .register_memory(ctx, &PID, MEM + PIECE, PIECE)
        .unwrap();
    f.engine
        .map_dma(ctx, &PID, io2, m(0x10_0000, MEM + PIECE, K4))
        .unwrap();
    f.engine.alloc(ctx).unwrap();
    assert_eq!(f.fake.live_aliases(), 3);
    assert_eq!(f.fake.trims(), 0);
    let closed = f.engine.close_context(ctx).unwrap();
    assert_eq!(closed.unbound, vec![DEV_A, DEV_X, DEV_Y]);
    assert!(closed.errors.is_empty());
    assert_eq!(f.fake.live_aliases(), 0);
    // The backend was told to drop the idle aliases it may keep.
    assert_eq!(f.fake.trims(), 1);
    assert!(f.fake.entries(3).is_empty());
    assert!(f.fake.entries(7).is_empty());
    for d in [DEV_A, DEV_X, DEV_Y] {
        assert_eq!(f.engine.bound_context(d), None);
    }
    assert_eq!(errno(f.engine.info(ctx, io)), EINVAL);
    let next = f.engine.open_context();
    f.engine.bind(DEV_Y, next).unwrap();
}

#[test]
fn a_group_that_cannot_be_emptied_goes_out_of_service() {
    let f = fixture();
    let (ctx, io) = f.attached();
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    // A failing detach changes nothing.
    f.fake.fail_next_unmap_all(nix::errno::Errno::EIO);
    assert_eq!(
        errno(f.engine.detach(DEV_A, ctx, io, None)),
        nix::errno::Errno::EIO
    );
    assert_eq!(f.engine.info(ctx, io).unwrap().devices.len(), 1);
    f.fake.fail_next_unmap_all(nix::errno::Errno::EIO);
    assert_eq!(errno(f.engine.unbind(DEV_A, ctx)), nix::errno::Errno::EIO);
    assert_eq!(f.engine.bound_context(DEV_A), Some(ctx));
    // On close there is no refusing: the group is fenced off instead.
    f.fake.fail_next_unmap_all(nix::errno::Errno::EIO);
    let closed = f.engine.close_context(ctx).unwrap();
    assert_eq!(closed.unbound, vec![DEV_A]);
    assert_eq!(closed.errors.len(), 1);
    assert_eq!(f.fake.live_aliases(), 0);
    let next = f.engine.open_context();
    assert_eq!(errno(f.engine.bind(DEV_A, next)), EBUSY);
    f.engine.bind(DEV_B, next).unwrap();
}

#[test]
fn two_contexts_map_concurrently() {
    let f = fixture();
    f.fake.share(PID + 1, MEM, 2 * PIECE);
    let mut threads = Vec::new();
    for (dev, group, pid) in [(DEV_A, 3, PID), (DEV_B, 4, PID + 1)] {
        let engine = f.engine.clone();
        threads.push(std::thread::spawn(move || {
            let ctx = engine.open_context();
            let io = engine.alloc(ctx).unwrap();
            engine.bind(dev, ctx).unwrap();
            engine.attach(dev, ctx, &PID, io, None).unwrap();
            for i in 0..300u64 {
                engine
                    .map_dma(ctx, &pid, io, m(i * K4, MEM + i * K4, K4))
                    .unwrap();
            }
            for i in (0..300u64).step_by(2) {
                assert_eq!(engine.unmap_dma(ctx, io, i * K4, K4).unwrap(), K4);
            }
            (ctx, group)
        }));
    }
    let done: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (ctx, group) in done {
        assert_eq!(f.fake.entries(group).len(), 150);
        assert_eq!(f.engine.pinned_bytes(ctx).unwrap(), 150 * K4);
        f.engine.close_context(ctx).unwrap();
        assert!(f.fake.entries(group).is_empty());
    }
    assert_eq!(f.fake.live_aliases(), 0);
}

/// A fake whose next `alias` waits until the test opens the gate.
struct GatedBackend {
    fake: FakeBackend,
    gate: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl ioasid_engine::backend::Backend for GatedBackend {
    fn alias(
        &self,
        pid: i32,
        vaddr: u64,
        size: u64,
    ) -> Result<ioasid_engine::backend::Alias, ioasid_engine::Error> {
        let gate = self.gate.lock().unwrap().take();
        if let Some(rx) = gate {
            rx.recv().unwrap();
        }
        self.fake.alias(pid, vaddr, size)
    }
    fn release_alias(&self, alias: &ioasid_engine::backend::Alias) {
        self.fake.release_alias(alias)
    }
    fn alias_file(
        &self,
        file: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        size: u64,
        write: bool,
    ) -> Result<ioasid_engine::backend::Alias, ioasid_engine::Error> {
        self.fake.alias_file(file, offset, size, write)
    }
    fn share_alias(
        &self,
        alias: &ioasid_engine::backend::Alias,
        offset: u64,
        size: u64,
    ) -> Result<ioasid_engine::backend::Alias, ioasid_engine::Error> {
        self.fake.share_alias(alias, offset, size)
    }
    fn memlock_limit(&self, pid: i32) -> Result<Option<u64>, ioasid_engine::Error> {
        self.fake.memlock_limit(pid)
    }
    fn domain_info(
        &self,
        group: u32,
    ) -> Result<ioasid_engine::backend::DomainInfo, ioasid_engine::Error> {
        self.fake.domain_info(group)
    }
    unsafe fn map(
        &self,
        group: u32,
        entry: ioasid_engine::backend::DmaEntry,
    ) -> Result<(), ioasid_engine::Error> {
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.fake.map(group, entry) }
    }
    fn unmap(&self, group: u32, iova: u64, size: u64) -> Result<u64, ioasid_engine::Error> {
        self.fake.unmap(group, iova, size)
    }
    fn unmap_all(&self, group: u32) -> Result<(), ioasid_engine::Error> {
        self.fake.unmap_all(group)
    }
}

/// Whichever of bind and close gets the context lock first, nothing is
/// left behind. (The order is up to the scheduler, so this is a smoke test
/// of the invariant, not a proof that both orders were exercised.)
#[test]
fn operations_racing_close_leave_nothing_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let backend = Arc::new(GatedBackend {
        fake: FakeBackend::new(),
        gate: std::sync::Mutex::new(Some(rx)),
    });
    backend.fake.share(PID, MEM, PIECE);
    let spec = DeviceSpec {
        id: DEV_A,
        name: "0000:00:03.0".into(),
        group: 3,
    };
    let engine = Engine::new(backend.clone(), vec![spec]).unwrap();
    let ctx = engine.open_context();
    // A holds the context lock, waiting in the backend.
    let a = {
        let e = engine.clone();
        std::thread::spawn(move || e.register_memory(ctx, &PID, MEM, K4))
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    // B has looked the context up and waits for its lock; so does close.
    let b = {
        let e = engine.clone();
        std::thread::spawn(move || e.bind(DEV_A, ctx))
    };
    let c = {
        let e = engine.clone();
        std::thread::spawn(move || e.close_context(ctx))
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    tx.send(()).unwrap();
    a.join().unwrap().unwrap();
    let bound = b.join().unwrap();
    let closed = c.join().unwrap().unwrap();
    match bound {
        Ok(()) => assert_eq!(closed.unbound, vec![DEV_A]),
        Err(e) => assert_eq!(e.errno, EINVAL),
    }
    assert_eq!(engine.bound_context(DEV_A), None);
    assert_eq!(backend.fake.live_aliases(), 0);
    let next = engine.open_context();
    engine.bind(DEV_A, next).unwrap();
}
