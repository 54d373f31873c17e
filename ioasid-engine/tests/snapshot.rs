//! `Engine::snapshot`, what `cuse-ioasid status` shows of the engine: the
//! figures of a known state, a closed context gone, and a context held by
//! a slow call reported busy (with its last figures) instead of waited for.

mod common;

use std::os::fd::BorrowedFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ioasid_engine::backend::{Alias, Backend, DmaEntry, DomainInfo, GroupId, Pid};
use ioasid_engine::fake::FakeBackend;
use ioasid_engine::{BoundDeviceSnapshot, ContextView, DeviceSpec, Engine, Error, IoasidSnapshot};

#[test]
fn a_known_state_is_shown_exactly() {
    let f = fixture();
    let en = &f.engine;
    let (ctx, io) = f.b_bound_to_three_mappings();
    en.register_memory(ctx, &PID, MEM2, 2 * PIECE).unwrap();
    en.map_dma(ctx, &PID, io, m(1 << 30, MEM2, PIECE)).unwrap();
    let spare = en.alloc(ctx).unwrap();
    let other = en.open_context();

    let views = en.snapshot();
    assert_eq!(views.iter().map(|v| v.id).collect::<Vec<_>>(), [ctx, other]);
    let v = &views[0];
    assert!(!v.busy);
    assert_eq!(v.age, Duration::ZERO);
    let s = v.snapshot.as_ref().unwrap();
    assert_eq!(s.id, ctx);
    assert_eq!(
        s.ioasids,
        [
            IoasidSnapshot {
                id: io,
                parent: None,
                attached_once: true,
                mappings: 4,
                mapped_bytes: 3 * K4 + PIECE,
                realised_in: vec![3],
                shadow_entries: 0,
                pgtable: None,
                pasid_table: None,
            },
            IoasidSnapshot {
                id: spare,
                parent: None,
                attached_once: false,
                mappings: 0,
                mapped_bytes: 0,
                realised_in: vec![],
                shadow_entries: 0,
                pgtable: None,
                pasid_table: None,
            },
        ]
    );
    assert_eq!((s.registrations, s.registered_bytes), (1, 2 * PIECE));
    // The mapping inside the registration pins nothing more.
    assert_eq!(s.own_bytes, 3 * K4);
    assert_eq!(s.pinned_bytes, 2 * PIECE + 3 * K4);
    assert_eq!(s.pinned_bytes, en.pinned_bytes(ctx).unwrap());
    assert_eq!(
        s.devices,
        [
            BoundDeviceSnapshot {
                device: DEV_A,
                name: "0000:00:03.0".into(),
                group: 3,
                rid: Some(io),
                child: None,
                pasids: vec![],
            },
            BoundDeviceSnapshot {
                device: DEV_B,
                name: "0000:00:04.0".into(),
                group: 4,
                rid: None,
                child: None,
                pasids: vec![],
            },
        ]
    );
    assert_eq!(s.groups_out_of_service, 0);
    let empty = views[1].snapshot.as_ref().unwrap();
    assert!(empty.ioasids.is_empty() && empty.devices.is_empty());
    assert_eq!(empty.pinned_bytes, 0);

    // Closed, a context is gone from the next snapshot.
    en.close_context(ctx).unwrap();
    let views = en.snapshot();
    assert_eq!(views.iter().map(|v| v.id).collect::<Vec<_>>(), [other]);
}

#[test]
fn nesting_shows_the_parent_and_the_child() {
    let f = fixture();
    let en = &f.engine;
    let (ctx, io) = f.attached();
    en.map_dma(ctx, &PID, io, m(0, MEM, PIECE)).unwrap();
    let child = en.create_nesting(ctx, io).unwrap();
    en.bind(DEV_B, ctx).unwrap();
    en.attach(DEV_B, ctx, &PID, io, None).unwrap();
    en.attach(DEV_B, ctx, &PID, child, None).unwrap();
    en.map_dma(ctx, &PID, child, m(0x10_0000, 0, 2 * K4))
        .unwrap();
    let views = en.snapshot();
    let s = views[0].snapshot.as_ref().unwrap();
    let c = &s.ioasids[1];
    assert_eq!((c.id, c.parent, c.mappings), (child, Some(io), 1));
    assert_eq!(c.mapped_bytes, 2 * K4);
    assert_eq!(c.realised_in, [4]);
    assert_eq!(c.shadow_entries, 1);
    assert_eq!(s.ioasids[0].realised_in, [3]);
    assert_eq!(s.devices[1].child, Some(child));
    assert_eq!(s.devices[1].rid, Some(io));
    // The child's mapping points into the parent: nothing more pinned.
    assert_eq!(s.pinned_bytes, PIECE);
}

/// The fake backend, but a map can be held: it says it started on
/// `entered` and waits for a word on `go`. The test plays the slow call.
struct Gate {
    fake: Arc<FakeBackend>,
    hold: Mutex<Option<(Sender<()>, Receiver<()>)>>,
}

impl Backend for Gate {
    fn alias(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Alias, Error> {
        self.fake.alias(pid, vaddr, size)
    }
    fn alias_file(
        &self,
        file: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        write: bool,
    ) -> Result<Alias, Error> {
        self.fake.alias_file(file, offset, size, write)
    }
    fn share_alias(&self, alias: &Alias, offset: u64, size: u64) -> Result<Alias, Error> {
        self.fake.share_alias(alias, offset, size)
    }
    fn release_alias(&self, alias: &Alias) {
        self.fake.release_alias(alias)
    }
    fn trim(&self) {
        self.fake.trim()
    }
    fn memlock_limit(&self, pid: Pid) -> Result<Option<u64>, Error> {
        self.fake.memlock_limit(pid)
    }
    fn domain_info(&self, group: GroupId) -> Result<DomainInfo, Error> {
        self.fake.domain_info(group)
    }
    unsafe fn map(&self, group: GroupId, entry: DmaEntry) -> Result<(), Error> {
        if let Some((entered, go)) = self.hold.lock().unwrap().take() {
            entered.send(()).unwrap();
            go.recv().unwrap();
        }
        // SAFETY: the engine's contract, passed on unchanged.
        unsafe { self.fake.map(group, entry) }
    }
    fn unmap(&self, group: GroupId, iova: u64, size: u64) -> Result<u64, Error> {
        self.fake.unmap(group, iova, size)
    }
    fn unmap_all(&self, group: GroupId) -> Result<(), Error> {
        self.fake.unmap_all(group)
    }
    fn read(&self, daemon_vaddr: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.fake.read(daemon_vaddr, buf)
    }
}

impl Gate {
    /// Hold the next map; returns (started, release).
    fn hold_next_map(&self) -> (Receiver<()>, Sender<()>) {
        let (entered_tx, entered_rx) = channel();
        let (go_tx, go_rx) = channel();
        *self.hold.lock().unwrap() = Some((entered_tx, go_rx));
        (entered_rx, go_tx)
    }
}

/// A snapshot taken on another thread; a hang fails the test instead of
/// hanging it.
fn snapshot_now(en: &Arc<Engine>) -> Vec<ContextView> {
    let (tx, rx) = channel();
    let en = en.clone();
    std::thread::spawn(move || tx.send(en.snapshot()).unwrap());
    rx.recv_timeout(Duration::from_secs(30))
        .expect("Engine::snapshot waited for a call holding the context")
}

fn mappings(v: &ContextView) -> usize {
    v.snapshot.as_ref().unwrap().ioasids[0].mappings
}

#[test]
fn a_context_held_by_a_slow_call_is_reported_busy_not_waited_for() {
    let fake = Arc::new(FakeBackend::new());
    fake.share(PID, MEM, PIECE);
    let gate = Arc::new(Gate {
        fake,
        hold: Mutex::new(None),
    });
    let spec = DeviceSpec {
        id: DEV_A,
        name: "0000:00:03.0".into(),
        group: 3,
    };
    let en = Engine::new(gate.clone(), vec![spec]).unwrap();
    let ctx = en.open_context();
    let io = en.alloc(ctx).unwrap();
    en.bind(DEV_A, ctx).unwrap();
    en.attach(DEV_A, ctx, &PID, io, None).unwrap();

    // Busy before any snapshot: no figures yet.
    let (entered, go) = gate.hold_next_map();
    let slow = {
        let en = en.clone();
        std::thread::spawn(move || en.map_dma(ctx, &PID, io, m(0, MEM, K4)))
    };
    entered.recv().unwrap();
    let views = snapshot_now(&en);
    assert!(views[0].busy);
    assert!(views[0].snapshot.is_none());
    go.send(()).unwrap();
    slow.join().unwrap().unwrap();

    // The call that was held took the snapshot the request wanted on its
    // way out: held again, the context shows the first map's figures,
    // though no request has found it free since.
    let (entered, go) = gate.hold_next_map();
    let slow = {
        let en = en.clone();
        std::thread::spawn(move || en.map_dma(ctx, &PID, io, m(K4, MEM + K4, K4)))
    };
    entered.recv().unwrap();
    let views = snapshot_now(&en);
    assert!(views[0].busy);
    assert_eq!(mappings(&views[0]), 1);
    go.send(()).unwrap();
    slow.join().unwrap().unwrap();

    // Free again: current figures.
    let views = snapshot_now(&en);
    assert!(!views[0].busy);
    assert_eq!(mappings(&views[0]), 2);
}
