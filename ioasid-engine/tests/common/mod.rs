//! What the engine's integration tests share: the fake backend with a
//! client's shared memory, four devices (two alone in their groups, two
//! sharing one), and small constructors.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::sync::Arc;

use ioasid_engine::backend::Prot;
use ioasid_engine::fake::{FakeBackend, FakeEntry, FAKE_DAEMON_BASE};
use ioasid_engine::{ContextId, DeviceId, DeviceSpec, DmaMap, Engine, Error};

pub const PID: i32 = 100;
/// Shared memory of PID: two adjacent 8 MiB pieces at MEM, and a separate
/// 16 MiB at MEM2.
pub const MEM: u64 = 0x1000_0000;
pub const PIECE: u64 = 8 << 20;
pub const MEM2: u64 = 0x3000_0000;
pub const K4: u64 = 4096;
pub const RW: Prot = Prot {
    read: true,
    write: true,
};

pub const DEV_A: DeviceId = DeviceId(1); // group 3
pub const DEV_B: DeviceId = DeviceId(2); // group 4
pub const DEV_X: DeviceId = DeviceId(10); // group 7
pub const DEV_Y: DeviceId = DeviceId(11); // group 7

pub struct Fixture {
    pub fake: Arc<FakeBackend>,
    pub engine: Arc<Engine>,
}

pub fn fixture() -> Fixture {
    let fake = Arc::new(FakeBackend::new());
    fake.share(PID, MEM, PIECE);
    fake.share(PID, MEM + PIECE, PIECE);
    fake.share(PID, MEM2, 2 * PIECE);
    let dev = |id: DeviceId, name: &str, group| DeviceSpec {
        id,
        name: name.to_string(),
        group,
    };
    let engine = Engine::new(
        fake.clone(),
        vec![
            dev(DEV_A, "0000:00:03.0", 3),
            dev(DEV_B, "0000:00:04.0", 4),
            dev(DEV_X, "0000:01:01.0", 7),
            dev(DEV_Y, "0000:01:02.0", 7),
        ],
    )
    .expect("distinct ids");
    Fixture { fake, engine }
}

impl Fixture {
    /// A context with device A bound and RID-attached to a new IOASID.
    pub fn attached(&self) -> (ContextId, u32) {
        let ctx = self.engine.open_context();
        let io = self.engine.alloc(ctx).unwrap();
        self.engine.bind(DEV_A, ctx).unwrap();
        self.engine.attach(DEV_A, ctx, &PID, io, None).unwrap();
        (ctx, io)
    }

    /// [`Fixture::attached`] with three 4 KiB mappings, and device B
    /// (group 4) bound but not attached.
    pub fn b_bound_to_three_mappings(&self) -> (ContextId, u32) {
        let (ctx, io) = self.attached();
        for i in 0..3 {
            self.engine
                .map_dma(ctx, &PID, io, m(i * K4, MEM + i * K4, K4))
                .unwrap();
        }
        self.engine.bind(DEV_B, ctx).unwrap();
        (ctx, io)
    }
}

/// A read-write map request.
pub fn m(iova: u64, vaddr: u64, size: u64) -> DmaMap {
    mp(iova, vaddr, size, RW)
}

pub fn mp(iova: u64, vaddr: u64, size: u64, prot: Prot) -> DmaMap {
    DmaMap {
        iova,
        vaddr,
        size,
        prot,
    }
}

/// A domain entry mapping `iova` to client address `vaddr`.
pub fn e(iova: u64, vaddr: u64, size: u64, prot: Prot) -> FakeEntry {
    FakeEntry {
        iova,
        daemon_vaddr: FAKE_DAEMON_BASE + vaddr,
        size,
        prot,
    }
}

#[track_caller]
pub fn errno<T: std::fmt::Debug>(r: Result<T, Error>) -> nix::errno::Errno {
    r.expect_err("expected an error").errno
}
