//! Failed undos: a change of a domain that fails is undone; when the undo
//! fails too, the group goes out of service (commands on it answer EIO),
//! the aliases its domain may still map are held, and emptying the domain
//! (the last detach or unbind, or closing the context) puts it back.

mod common;

use common::*;
use ioasid_engine::ContextId;
use nix::errno::Errno::{EBUSY, EIO, ENOSPC};

/// A context with device A (group 3) and B (group 4) both attached to one
/// IOASID.
fn two_groups(f: &Fixture) -> (ContextId, u32) {
    let (ctx, io) = f.attached();
    f.engine.bind(DEV_B, ctx).unwrap();
    f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap();
    (ctx, io)
}

#[test]
fn a_failed_undo_of_a_map_takes_the_group_out_of_service_and_holds_the_alias() {
    let f = fixture();
    let (ctx, io) = two_groups(&f);
    // Group 3 maps the page, group 4 refuses it, and taking it out of
    // group 3 again fails: group 3 may still map the alias.
    f.fake.fail_map_after(1, ENOSPC);
    f.fake.fail_unmap_after(0, EIO);
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4))),
        ENOSPC
    );
    assert_eq!(f.fake.entries(3).len(), 1, "the stray entry the undo left");
    assert_eq!(f.fake.live_aliases(), 1, "held while group 3 may map it");
    assert_eq!(f.engine.pinned_bytes(ctx).unwrap(), 0);
    // Every command on what group 3 realises answers EIO, with advice.
    let e = f
        .engine
        .map_dma(ctx, &PID, io, m(K4, MEM + K4, K4))
        .unwrap_err();
    assert_eq!(e.errno, EIO);
    assert!(
        e.message.contains("IOMMU group 3 is out of service"),
        "{}",
        e.message
    );
    assert!(e.message.contains("detach or unbind"), "{}", e.message);
    assert_eq!(errno(f.engine.unmap_dma(ctx, io, 0, K4)), EIO);
    assert_eq!(errno(f.engine.info(ctx, io)), EIO);
    // Nothing reached the backend for them.
    assert_eq!(f.fake.entries(3).len(), 1);
    assert!(f.fake.entries(4).is_empty());
    f.engine.unbind(DEV_A, ctx).unwrap();
    // Unbinding A detached it, which emptied group 3's domain: back in
    // service, and the held alias is released.
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.fake.live_aliases(), 0);
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    assert_eq!(f.fake.entries(4).len(), 1);
    f.engine.bind(DEV_A, ctx).unwrap();
    f.engine.attach(DEV_A, ctx, &PID, io, None).unwrap();
    assert_eq!(f.fake.entries(3), f.fake.entries(4));
}

#[test]
fn a_failed_undo_of_an_unmap_takes_the_group_out_of_service_until_it_is_emptied() {
    let f = fixture();
    let (ctx, io) = two_groups(&f);
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
    // Group 3 unmaps, group 4 refuses, and mapping group 3 back fails.
    f.fake.fail_unmap_after(1, EIO);
    f.fake.fail_map_after(0, ENOSPC);
    assert_eq!(errno(f.engine.unmap_dma(ctx, io, 0, K4)), EIO);
    assert!(
        f.fake.entries(3).is_empty(),
        "the entry the undo could not restore"
    );
    assert_eq!(f.engine.pinned_bytes(ctx).unwrap(), K4, "the mapping stays");
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(K4, MEM + K4, K4))),
        EIO
    );
    // Detaching A, the last device of group 3, empties its domain.
    f.engine.detach(DEV_A, ctx, io, None).unwrap();
    assert_eq!(f.engine.unmap_dma(ctx, io, 0, K4).unwrap(), K4);
    assert_eq!(f.fake.live_aliases(), 0);
}

/// A context with device A attached to an IOASID of three mappings, B
/// bound, and a replay into B's group 4 that failed and could not be
/// undone.
fn broken_replay(f: &Fixture) -> (ContextId, u32) {
    let (ctx, io) = f.b_bound_to_three_mappings();
    f.fake.fail_map_after(1, ENOSPC);
    f.fake.fail_next_unmap_all(EIO);
    assert_eq!(errno(f.engine.attach(DEV_B, ctx, &PID, io, None)), ENOSPC);
    assert_eq!(f.fake.entries(4).len(), 1, "half a replay left behind");
    (ctx, io)
}

#[test]
fn a_failed_undo_of_a_replay_is_recovered_by_the_unbind() {
    let f = fixture();
    let (ctx, io) = broken_replay(&f);
    // Group 4 realises nothing: the IOASID is fine, the group is not.
    f.engine
        .map_dma(ctx, &PID, io, m(8 * K4, MEM + 8 * K4, K4))
        .unwrap();
    let e = f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap_err();
    assert_eq!(e.errno, EIO);
    assert!(e.message.contains("IOMMU group 4"), "{}", e.message);
    // Unbinding B, the only device of group 4, empties the domain.
    f.engine.unbind(DEV_B, ctx).unwrap();
    assert!(f.fake.entries(4).is_empty());
    f.engine.bind(DEV_B, ctx).unwrap();
    f.engine.attach(DEV_B, ctx, &PID, io, None).unwrap();
    assert_eq!(f.fake.entries(4), f.fake.entries(3));
}

#[test]
fn a_group_that_stays_out_of_service_is_fenced_until_its_context_closes() {
    let f = fixture();
    let (ctx, _io) = broken_replay(&f);
    // The unbind is not refused, but emptying the domain fails again.
    f.fake.fail_next_unmap_all(EIO);
    f.engine.unbind(DEV_B, ctx).unwrap();
    assert_eq!(f.fake.entries(4).len(), 1);
    let other = f.engine.open_context();
    let e = f.engine.bind(DEV_B, other).unwrap_err();
    assert_eq!(e.errno, EBUSY);
    assert!(e.message.contains("out of service"), "{}", e.message);
    assert_eq!(errno(f.engine.bind(DEV_B, ctx)), EBUSY);
    // Closing the context empties it.
    let closed = f.engine.close_context(ctx).unwrap();
    assert!(closed.errors.is_empty());
    assert!(f.fake.entries(4).is_empty());
    f.engine.bind(DEV_B, other).unwrap();
}

#[test]
fn closing_the_context_empties_a_group_out_of_service() {
    let f = fixture();
    let (ctx, io) = two_groups(&f);
    f.fake.fail_map_after(1, ENOSPC);
    f.fake.fail_unmap_after(0, EIO);
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4))),
        ENOSPC
    );
    assert_eq!(f.fake.live_aliases(), 1);
    let closed = f.engine.close_context(ctx).unwrap();
    assert!(closed.errors.is_empty());
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.fake.live_aliases(), 0);
    let next = f.engine.open_context();
    f.engine.bind(DEV_A, next).unwrap();
}
