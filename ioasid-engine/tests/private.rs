//! Private memory (issue 14) and per-client budgets (issue 17, item 7) in
//! the engine, over the fake backend: a private map is reserved with the
//! call and made by the client's own thread after it, every way that can
//! go wrong leaves nothing behind, attach replays it only from the same
//! address space, and one client at its budget gets the errno itself.

mod common;

use common::*;
use ioasid_engine::fake::{FakeClient, FAKE_CLIENT_TAG};
use ioasid_engine::Budgets;
use nix::errno::Errno::{EBUSY, EEXIST, EFAULT, EINVAL, EMFILE, ENOMEM, ENOSPC, ESRCH};

/// Private memory of PID.
const PRIV: u64 = 0x5000_0000;

fn client() -> FakeClient {
    FakeClient::new(PID)
}

fn private_fixture() -> Fixture {
    let f = fixture();
    f.fake.private(PID, PRIV, PIECE);
    f
}

/// The fake's entry for a client-made map.
fn pe(iova: u64, vaddr: u64, size: u64) -> ioasid_engine::fake::FakeEntry {
    ioasid_engine::fake::FakeEntry {
        iova,
        daemon_vaddr: FAKE_CLIENT_TAG | vaddr,
        size,
        prot: RW,
    }
}

#[test]
fn a_private_map_is_made_by_the_clients_thread_after_the_call() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, 2 * K4)).unwrap();
    // Reserved, not mapped yet: the domain is empty, the IOVA is taken.
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(c.pending(), 1);
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4))),
        EEXIST
    );
    assert_eq!(c.run_deferred(), vec![Ok(())]);
    assert_eq!(f.fake.entries(3), vec![pe(0, PRIV, 2 * K4)]);
    // The kernel charged the client; the daemon pins nothing for it.
    assert_eq!(f.fake.locked(PID), 2 * K4);
    assert_eq!(f.engine.pinned_bytes_of_process(PID), 0);
    assert_eq!(f.fake.live_aliases(), 0);
    // Unmapping needs no client thread.
    assert_eq!(f.engine.unmap_dma(ctx, io, 0, 2 * K4).unwrap(), 2 * K4);
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.fake.locked(PID), 0);
}

#[test]
fn a_refused_or_unreached_client_thread_leaves_nothing_reserved() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    // Traced (or Yama, seccomp...): EFAULT at once, nothing reserved.
    let traced = client().refusing(EFAULT);
    let e = f
        .engine
        .map_dma(ctx, &traced, io, m(0, PRIV, K4))
        .unwrap_err();
    assert_eq!(e.errno, EFAULT);
    assert!(
        e.message.contains("only its own thread can pin"),
        "{}",
        e.message
    );
    // A caller that cannot be reached at all (no front end support).
    assert_eq!(
        errno(f.engine.map_dma(ctx, &PID, io, m(0, PRIV, K4))),
        EFAULT
    );
    // The thread died or did not stop in time: the reservation goes.
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4)).unwrap();
    assert_eq!(c.fail_deferred(ESRCH)[0].as_ref().unwrap_err().errno, ESRCH);
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.engine.info(ctx, io).unwrap().mappings, 0);
    // The kernel refuses (over its limit): the reservation goes too.
    f.fake.set_memlock(PID, Some(K4));
    f.fake.set_locked(PID, 0);
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4)).unwrap();
    f.fake.set_locked(PID, K4); // it mlocked a page meanwhile
    assert_eq!(c.run_deferred()[0].as_ref().unwrap_err().errno, ENOMEM);
    assert_eq!(f.engine.info(ctx, io).unwrap().mappings, 0);
    f.fake.set_locked(PID, 0);
    f.fake.set_memlock(PID, None);
    // Free again for a shared map.
    f.engine.map_dma(ctx, &PID, io, m(0, MEM, K4)).unwrap();
}

#[test]
fn a_reservation_unmapped_before_the_thread_runs_is_left_alone() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4)).unwrap();
    assert_eq!(f.engine.unmap_dma(ctx, io, 0, K4).unwrap(), K4);
    assert_eq!(c.run_deferred(), vec![Ok(())]);
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.fake.locked(PID), 0);
}

#[test]
fn no_private_memory_restores_efault() {
    let f = private_fixture();
    f.engine.set_private_memory(false);
    let (ctx, io) = f.attached();
    let c = client();
    let e = f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4)).unwrap_err();
    assert_eq!(e.errno, EFAULT);
    assert!(e.message.contains("--no-private-memory"), "{}", e.message);
    assert_eq!(c.pending(), 0);
    assert_eq!(errno(f.engine.register_memory(ctx, &c, PRIV, K4)), EFAULT);
}

#[test]
fn maps_inside_a_private_registration_are_made_by_the_client() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    let c = client();
    f.engine.register_memory(ctx, &c, PRIV, 4 * K4).unwrap();
    assert_eq!(f.engine.pinned_bytes_of_process(PID), 0);
    f.engine
        .map_dma(ctx, &c, io, m(0x1000, PRIV + K4, K4))
        .unwrap();
    assert_eq!(c.run_deferred(), vec![Ok(())]);
    assert_eq!(f.fake.entries(3), vec![pe(0x1000, PRIV + K4, K4)]);
}

#[test]
fn the_memlock_sum_of_shared_and_private_memory_is_checked() {
    let f = private_fixture();
    f.fake.set_memlock(PID, Some(0x10000));
    let (ctx, io) = f.attached();
    let c = client();
    // 0x8000 of shared memory pinned by the daemon...
    f.engine.map_dma(ctx, &c, io, m(0, MEM, 0x8000)).unwrap();
    // ...and 0x8000 of private memory pinned by the client: the limit.
    f.engine
        .map_dma(ctx, &c, io, m(0x10_0000, PRIV, 0x8000))
        .unwrap();
    assert_eq!(c.run_deferred(), vec![Ok(())]);
    assert_eq!(f.fake.locked(PID), 0x8000);
    // One more page either way is refused by the daemon, which sees both.
    let e = f
        .engine
        .map_dma(ctx, &c, io, m(0x20_0000, PRIV + 0x8000, K4))
        .unwrap_err();
    assert_eq!(e.errno, ENOMEM);
    assert!(e.message.contains("VmLck"), "{}", e.message);
    assert_eq!(c.pending(), 0);
    assert_eq!(
        errno(
            f.engine
                .map_dma(ctx, &c, io, m(0x20_0000, MEM + 0x8000, K4))
        ),
        ENOMEM
    );
}

#[test]
fn attach_replays_private_memory_by_the_same_process_only() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4)).unwrap();
    f.engine
        .map_dma(ctx, &c, io, m(0x10_0000, MEM, K4))
        .unwrap();
    c.run_deferred();
    f.engine.bind(DEV_B, ctx).unwrap();
    // Another process cannot pin this memory: refused, the group empty.
    let other = FakeClient::new(PID + 1);
    let refused = f.engine.attach(DEV_B, ctx, &other, io, None).unwrap_err();
    assert_eq!(refused.errno, EFAULT);
    assert!(
        refused.message.contains(&format!("process {PID}")),
        "{}",
        refused.message
    );
    assert!(f.fake.entries(4).is_empty());
    assert!(f.engine.info(ctx, io).unwrap().devices.len() == 1);
    // The owner's thread replays it after the call.
    f.engine.attach(DEV_B, ctx, &c, io, None).unwrap();
    assert_eq!(f.fake.entries(4), vec![e(0x10_0000, MEM, K4, RW)]);
    assert_eq!(c.run_deferred(), vec![Ok(())]);
    assert_eq!(
        f.fake.entries(4),
        vec![pe(0, PRIV, K4), e(0x10_0000, MEM, K4, RW)]
    );
    // Type1 charges each domain.
    assert_eq!(f.fake.locked(PID), 2 * K4);
    // Detach empties it and uncharges; after an exec the replay fails and
    // the device is detached again.
    f.engine.detach(DEV_B, ctx, io, None).unwrap();
    assert_eq!(f.fake.locked(PID), K4);
    let execed = client().with_stamp(1);
    f.engine.attach(DEV_B, ctx, &execed, io, None).unwrap();
    let r = execed.run_deferred();
    assert_eq!(r[0].as_ref().unwrap_err().errno, EFAULT);
    assert!(f.fake.entries(4).is_empty());
    assert_eq!(f.engine.info(ctx, io).unwrap().devices.len(), 1);
}

#[test]
fn nesting_parents_map_shared_memory_only() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4)).unwrap();
    assert_eq!(errno(f.engine.create_nesting(ctx, io)), EINVAL);
    c.run_deferred();
    assert_eq!(errno(f.engine.create_nesting(ctx, io)), EINVAL);
    f.engine.unmap_all_dma(ctx, io).unwrap();
    f.engine.create_nesting(ctx, io).unwrap();
    assert_eq!(errno(f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4))), EFAULT);
    assert_eq!(c.pending(), 0);
}

#[test]
fn a_client_at_its_budget_gets_the_errno_and_others_do_not_notice() {
    let f = private_fixture();
    f.engine.set_budgets(Budgets {
        files: 2,
        ioasids: 2,
        mappings: 3,
        aliases: 2,
    });
    let greedy = FakeClient::new(PID);
    let other = FakeClient::new(PID + 1);
    f.fake.share(PID + 1, MEM, PIECE);
    let ctx = f.engine.open_context_for(&greedy).unwrap();
    let _ctx2 = f.engine.open_context_for(&greedy).unwrap();
    assert_eq!(errno(f.engine.open_context_for(&greedy)), EMFILE);
    let octx = f.engine.open_context_for(&other).unwrap();
    let io = f.engine.alloc(ctx).unwrap();
    f.engine.alloc(ctx).unwrap();
    assert_eq!(errno(f.engine.alloc(ctx)), ENOSPC);
    let oio = f.engine.alloc(octx).unwrap();
    f.engine.bind(DEV_A, ctx).unwrap();
    f.engine.attach(DEV_A, ctx, &greedy, io, None).unwrap();
    f.engine.bind(DEV_B, octx).unwrap();
    f.engine.attach(DEV_B, octx, &other, oio, None).unwrap();
    // Two areas aliased: the third is ENOMEM (its own), the other's fine.
    f.engine.map_dma(ctx, &greedy, io, m(0, MEM, K4)).unwrap();
    f.engine.map_dma(ctx, &greedy, io, m(K4, MEM2, K4)).unwrap();
    assert_eq!(
        errno(
            f.engine
                .map_dma(ctx, &greedy, io, m(2 * K4, MEM + PIECE, K4))
        ),
        ENOMEM
    );
    for i in 0..2 {
        f.engine
            .map_dma(octx, &other, oio, m(i * K4, MEM + i * K4, K4))
            .unwrap();
    }
    // A third mapping (private: no alias) fits, a fourth does not.
    f.engine
        .map_dma(ctx, &greedy, io, m(2 * K4, PRIV, K4))
        .unwrap();
    assert_eq!(
        errno(f.engine.map_dma(ctx, &greedy, io, m(3 * K4, PRIV + K4, K4))),
        ENOSPC
    );
    // A reservation its thread never made gives its mapping back.
    greedy.fail_deferred(ESRCH);
    f.engine
        .map_dma(ctx, &greedy, io, m(3 * K4, PRIV + K4, K4))
        .unwrap();
    greedy.run_deferred();
    // Freeing gives back: unmap one, map one.
    f.engine.unmap_dma(ctx, io, 0, K4).unwrap();
    f.engine
        .map_dma(ctx, &greedy, io, m(0, MEM + PIECE, K4))
        .unwrap();
    f.engine.close_context(ctx).unwrap();
    f.engine.open_context_for(&greedy).unwrap();
}

// While the client's thread maps, the engine holds no lock (a killed
// client's release needs it): what other threads and clients do meanwhile
// is settled afterwards, and nothing reaches a domain that changed hands.

#[test]
fn a_context_closed_while_the_clients_thread_maps_keeps_nothing() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, 2 * K4)).unwrap();
    let engine = f.engine.clone();
    // The client dies: its release closes the context (this would wait
    // for ever if the map held the context lock).
    f.fake.during_next_client_map(move || {
        engine.close_context(ctx).unwrap();
    });
    c.run_deferred();
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.fake.locked(PID), 0);
    // The device is free for anyone.
    let other = f.engine.open_context();
    f.engine.bind(DEV_A, other).unwrap();
}

#[test]
fn a_group_cannot_change_hands_while_the_clients_thread_maps_into_it() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4)).unwrap();
    let engine = f.engine.clone();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen_in = seen.clone();
    // Another thread of the client lets the device go; another client
    // tries to take it before the map is settled.
    f.fake.during_next_client_map(move || {
        engine.detach(DEV_A, ctx, io, None).unwrap();
        engine.unbind(DEV_A, ctx).unwrap();
        let other = engine.open_context();
        *seen_in.lock().unwrap() = Some((other, engine.bind(DEV_A, other)));
    });
    assert_eq!(c.run_deferred(), vec![Ok(())]);
    let (other, bound) = seen.lock().unwrap().take().unwrap();
    let e = bound.unwrap_err();
    assert_eq!(e.errno, EBUSY);
    assert!(e.message.contains("still pinning"), "{}", e.message);
    // The late map was taken out of the group's domain again; the
    // reservation stays, realised nowhere (its IOASID has no device now).
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.fake.locked(PID), 0);
    assert_eq!(f.engine.info(ctx, io).unwrap().mappings, 1);
    // Settled: the other client may bind it now.
    f.engine.bind(DEV_A, other).unwrap();
}

#[test]
fn a_group_attached_while_the_clients_thread_maps_gets_the_map_too() {
    let f = private_fixture();
    let (ctx, io) = f.attached();
    f.engine.bind(DEV_B, ctx).unwrap();
    let c = client();
    f.engine.map_dma(ctx, &c, io, m(0, PRIV, K4)).unwrap();
    let engine = f.engine.clone();
    f.fake.during_next_client_map(move || {
        // No private mapping is realised yet: nothing to replay, the
        // attach completes at once.
        engine.attach(DEV_B, ctx, &PID, io, None).unwrap();
    });
    assert_eq!(c.run_deferred(), vec![Ok(())]);
    assert_eq!(f.fake.entries(3), vec![pe(0, PRIV, K4)]);
    assert_eq!(f.fake.entries(4), vec![pe(0, PRIV, K4)]);
    assert_eq!(f.fake.locked(PID), 2 * K4);
    f.engine.unmap_dma(ctx, io, 0, K4).unwrap();
    assert!(f.fake.entries(3).is_empty() && f.fake.entries(4).is_empty());
    assert_eq!(f.fake.locked(PID), 0);
}
