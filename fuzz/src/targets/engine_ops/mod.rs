//! Random sequences of engine operations on the fake backend, checked
//! after every step against a model ([`model`]) of what the engine
//! promises.
//!
//! One input: a fresh engine over a fresh fake backend (four devices: A
//! alone in group 3, B alone in group 4, X and Y sharing group 7; the
//! client's shared memory in two adjacent pieces and a third one apart; a
//! memory file; now and then a small entry limit, 2 MiB pages in group 4,
//! or an `RLIMIT_MEMLOCK`), then 8 to 40 steps. Now and then the backend
//! is told to fail a map a few maps ahead (in the middle of a replay, a
//! shadow update, a copy), more rarely an unmap. A step opens or closes a
//! context (an RFC `/dev/ioasid` file or an iommufd one), or runs one
//! operation of that context's uAPI on it: alloc and free, register and
//! unregister, map, unmap and unmap-all, bind, attach, detach and unbind,
//! nesting, page-table and PASID-table binds and invalidations over random
//! tables in the client's memory; IOAS alloc and destroy, map (of user
//! memory or of the file), copy, unmap, allowed ranges, huge pages, device
//! bind, HWPT alloc, attach (replace) and detach. Arguments come mostly from what
//! exists, so that most operations get deep.
//!
//! After each step: the model's success-only bookkeeping agrees with the
//! engine's snapshot (address spaces, mappings, attachments, pinned and
//! registered bytes) and with the fake backend (every group's domain holds
//! exactly the translation of the space it should realise — a child's
//! composed with its parent's, a page-table child's never past its
//! parent's —, one live alias per registration and per mapping of its
//! own); bound groups belong to one context; a map or unmap that
//! succeeded had the RFC's group rule hold; a successful pinning stayed
//! within the limit. After the last step every context is closed: nothing
//! is pinned, bound, mapped or aliased any more. When an undo failed too
//! (two failures in one operation) a group is out of service, the
//! documented degraded mode the model does not follow: the sequence stops
//! there, and closing must still leave nothing behind.

mod iommufd;
mod model;
mod rfc;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ioasid_engine::backend::{GroupId, Prot};
use ioasid_engine::fake::FakeBackend;
use ioasid_engine::pgtable::{PTE_PRESENT, PTE_PS, PTE_WRITE};
use ioasid_engine::{ContextId, DeviceId, Engine};
use nix::errno::Errno;

use super::Target;
use crate::gen::Rng;
use model::{Ctx, Kind, Space};

/// The target.
pub const ENGINE_OPS: Target = Target {
    name: "engine-ops",
    about: "random sequences of engine operations (RFC and iommufd contexts, maps, copies, \
            registrations, devices of one- and two-device groups, nesting, page and PASID \
            tables) on the fake backend, checked after every step against a model: the group \
            rule, each domain holding exactly what its space maps, pinned bytes and aliases, \
            nothing left once every context is closed",
    cap: Some(CAP),
    make: || {
        let mut t = Ops::new();
        Box::new(move |rng| t.one(rng))
    },
};

/// Inputs per run: each is a sequence of up to 40 checked steps, about
/// seven times the work of an `ioctl-tables` input (see the crate
/// documentation).
const CAP: u64 = 100_000;

const PID: i32 = 100;
const K4: u64 = 4096;
const M2: u64 = 2 << 20;
/// Shared memory of PID: two adjacent 8 MiB pieces at MEM, 16 MiB at MEM2.
const MEM: u64 = 0x1000_0000;
const PIECE: u64 = 8 << 20;
const MEM2: u64 = 0x3000_0000;
/// The memory file's size.
const FILE_LEN: u64 = 16 << 20;
/// Page tables live in the parent's IOVA space here (mapped by most
/// parents: a parent IOVA `i` is client address `MEM + i` when mapped
/// identically).
const TABLES: u64 = 0x10_0000;
const TABLE_PAGES: u64 = 6;
const RW: Prot = Prot {
    read: true,
    write: true,
};

const DEV_A: DeviceId = DeviceId(1);
const DEV_B: DeviceId = DeviceId(2);
const DEV_X: DeviceId = DeviceId(10);
const DEV_Y: DeviceId = DeviceId(11);
const DEVICES: [DeviceId; 4] = [DEV_A, DEV_B, DEV_X, DEV_Y];

struct Ops {
    file: OwnedFd,
    inode: u64,
    groups: BTreeMap<GroupId, Vec<DeviceId>>,
}

/// One input's state.
struct Run {
    fake: Arc<FakeBackend>,
    engine: std::sync::Arc<Engine>,
    model: BTreeMap<ContextId, Ctx>,
    memlock: Option<u64>,
}

impl Ops {
    fn new() -> Self {
        let file =
            nix::sys::memfd::memfd_create(c"fuzz-engine", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd");
        let inode = nix::sys::stat::fstat(file.as_fd()).expect("fstat").st_ino;
        let groups = [(3, vec![DEV_A]), (4, vec![DEV_B]), (7, vec![DEV_X, DEV_Y])]
            .into_iter()
            .collect();
        Ops {
            file,
            inode,
            groups,
        }
    }

    fn run(&self, rng: &mut Rng) -> Run {
        let fake = Arc::new(FakeBackend::new());
        fake.share(PID, MEM, PIECE);
        fake.share(PID, MEM + PIECE, PIECE);
        fake.share(PID, MEM2, 2 * PIECE);
        fake.add_file(self.inode, FILE_LEN);
        if rng.chance(1, 4) {
            fake.set_domain(4, M2 | 1 << 30, &ioasid_engine::fake::FAKE_IOVA_RANGES);
        }
        if rng.chance(1, 4) {
            fake.set_entry_limit(*rng.pick(&[3, 4, 7]), 2 + rng.below(12) as usize);
        }
        let memlock = rng.chance(1, 5).then(|| (1 + rng.below(8)) << 20);
        fake.set_memlock(PID, memlock);
        let devices = [
            (DEV_A, "0000:00:03.0", 3),
            (DEV_B, "0000:00:04.0", 4),
            (DEV_X, "0000:01:01.0", 7),
            (DEV_Y, "0000:01:02.0", 7),
        ];
        let engine = super::engine(fake.clone(), &devices, 1 << 9);
        Run {
            fake,
            engine,
            model: BTreeMap::new(),
            memlock,
        }
    }

    fn one(&mut self, rng: &mut Rng) {
        let mut r = self.run(rng);
        let steps = 8 + rng.below(33);
        for i in 0..steps {
            if rng.chance(1, 10) {
                // A map of the backend fails, now or a few maps later: in
                // the middle of a replay, a shadow update, a copy...
                let errno = *rng.pick(&[Errno::ENOSPC, Errno::ENOMEM, Errno::EFAULT]);
                r.fake.fail_map_after(rng.below(6) as usize, errno);
            }
            if rng.chance(1, 40) {
                // An unmap fails: an undo may fail with it, and a group
                // goes out of service.
                r.fake.fail_unmap_after(rng.below(4) as usize, Errno::EIO);
            }
            let what = self.step(rng, &mut r);
            let what = format!("step {i}: {what}");
            // An undo that failed too (two failures in one operation) puts
            // a group out of service, the documented degraded mode: the
            // model stops there, and closing must still leave nothing.
            let degraded = r.engine.snapshot().iter().any(|v| {
                v.snapshot
                    .as_ref()
                    .is_some_and(|s| s.groups_out_of_service > 0)
            });
            if degraded {
                break;
            }
            model::check(&r.engine, &r.fake, &r.model, &self.groups, &what);
        }
        for id in r.model.keys().copied().collect::<Vec<_>>() {
            let closed = r.engine.close_context(id).expect("an open context closes");
            assert!(
                closed.errors.is_empty(),
                "closing {id:?}: {:?}",
                closed.errors
            );
        }
        r.model.clear();
        model::check(&r.engine, &r.fake, &r.model, &self.groups, "all closed");
        assert_eq!(
            r.fake.live_aliases(),
            0,
            "aliases left once every context is closed"
        );
    }

    /// One step; returns what it did and how it ended, for messages.
    fn step(&self, rng: &mut Rng, r: &mut Run) -> String {
        if r.model.is_empty() || (r.model.len() < 3 && rng.chance(1, 16)) {
            let kind = if rng.chance(1, 2) {
                Kind::Rfc
            } else {
                Kind::Iommufd
            };
            let id = r.engine.open_context();
            r.model.insert(id, Ctx::new(kind));
            return format!("open {id:?} {kind:?}");
        }
        let ctx = *rng.pick(&r.model.keys().copied().collect::<Vec<_>>());
        if rng.chance(1, 40) {
            let closed = r.engine.close_context(ctx).expect("an open context closes");
            assert!(
                closed.errors.is_empty(),
                "close {ctx:?}: {:?}",
                closed.errors
            );
            let gone = r.model.remove(&ctx).expect("modelled");
            let mut unbound = closed.unbound.clone();
            unbound.sort();
            assert_eq!(
                unbound,
                gone.bound.into_iter().collect::<Vec<_>>(),
                "close {ctx:?}"
            );
            return format!("close {ctx:?}");
        }
        if rng.chance(1, 32) {
            self.write_tables(rng, r);
            return "tables written".into();
        }
        // The limit holds over the process's bytes, each counted once
        // however many registrations and mappings hold it.
        let pinned = r.engine.pinned_bytes_of_process(PID);
        let what = match r.model[&ctx].kind {
            Kind::Rfc => self.rfc_op(rng, r, ctx),
            Kind::Iommufd => self.iommufd_op(rng, r, ctx),
        };
        let now = r.engine.pinned_bytes_of_process(PID);
        if let Some(limit) = r.memlock {
            assert!(
                now <= pinned || now <= limit,
                "{what}: pinned {now:#x} over {limit:#x}"
            );
        }
        format!("{ctx:?} {what}")
    }

    /// Random bytes in the page-table pages: pointers to table pages,
    /// leaves into (and past) the parents' usual range, garbage.
    fn write_tables(&self, rng: &mut Rng, r: &Run) {
        for _ in 0..1 + rng.below(64) {
            let at = rng.below(TABLE_PAGES * K4 / 8) * 8;
            let v = match rng.below(8) {
                0..=2 => {
                    (TABLES + rng.below(TABLE_PAGES) * K4) | (rng.next_u64() & 0x8ff) | PTE_PRESENT
                }
                3..=5 => {
                    (rng.below(4 * PIECE) & !0xfff)
                        | (rng.next_u64() & (PTE_WRITE | PTE_PS))
                        | PTE_PRESENT
                }
                6 => 0,
                _ => rng.next_u64(),
            };
            r.fake.write_u64(MEM + TABLES + at, v);
        }
    }
}

/// An id: mostly one that exists in `ids`, sometimes the next or garbage.
fn pick_id(rng: &mut Rng, ids: &[u32]) -> u32 {
    match rng.below(20) {
        0 => rng.interesting() as u32,
        1 => ids.iter().max().map_or(1, |m| m + 1),
        _ if !ids.is_empty() => *rng.pick(ids),
        _ => 1,
    }
}

/// A device: mostly one bound to this context (`bound` true) or one not
/// bound anywhere (`bound` false), sometimes any.
fn pick_dev(rng: &mut Rng, engine: &Engine, ctx: ContextId, bound: bool) -> DeviceId {
    let fit: Vec<DeviceId> = DEVICES
        .into_iter()
        .filter(|d| {
            let owner = engine.bound_context(*d);
            if bound {
                owner == Some(ctx)
            } else {
                owner.is_none()
            }
        })
        .collect();
    if fit.is_empty() || rng.chance(1, 6) {
        *rng.pick(&DEVICES)
    } else {
        *rng.pick(&fit)
    }
}

fn prot(rng: &mut Rng) -> Prot {
    match rng.below(8) {
        0 => Prot {
            read: true,
            write: false,
        },
        1 => Prot {
            read: false,
            write: true,
        },
        2 => Prot::default(),
        _ => RW,
    }
}

/// A length: mostly a few pages, sometimes 2 MiB, a piece, or garbage.
fn length(rng: &mut Rng) -> u64 {
    match rng.below(16) {
        0..=10 => (1 + rng.below(8)) * K4,
        11 => M2,
        12 => PIECE,
        13 => 1 + rng.below(K4),
        14 => 0,
        _ => rng.interesting(),
    }
}

/// An IOVA: mostly page multiples low in the space.
fn iova(rng: &mut Rng) -> u64 {
    match rng.below(16) {
        0..=9 => rng.below(64) * K4,
        10..=12 => rng.below(8) * M2,
        13 => 0xfee0_0000,
        _ => rng.interesting(),
    }
}

/// A client address: mostly page multiples of the shared memory.
fn vaddr(rng: &mut Rng) -> u64 {
    match rng.below(16) {
        0..=9 => MEM + rng.below(2 * PIECE / K4) * K4,
        10 | 11 => MEM2 + rng.below(2 * PIECE / K4) * K4,
        12 => MEM + 2 * PIECE - K4 * rng.below(4),
        13 => 0x7000_0000,
        _ => rng.interesting(),
    }
}

/// `start` of `[start, start + len)` in the mappings of `s` (a helper to
/// pick existing ranges).
fn some_mapping(rng: &mut Rng, s: Option<&Space>) -> Option<(u64, u64)> {
    let s = s?;
    if s.maps.is_empty() {
        return None;
    }
    let keys: Vec<u64> = s.maps.keys().copied().collect();
    let k = *rng.pick(&keys);
    Some((k, s.maps[&k].size))
}
