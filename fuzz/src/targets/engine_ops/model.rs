//! What the engine should hold, kept from the operations that succeeded
//! and their documented meaning, and the checks of the engine and the
//! fake backend against it.
//!
//! The model is updated only by successes, so every check after a failure
//! also checks that the failure changed nothing.

use std::collections::{BTreeMap, BTreeSet};

use ioasid_engine::backend::{GroupId, Prot};
use ioasid_engine::fake::{FakeBackend, FakeEntry};
use ioasid_engine::{ContextId, ContextSnapshot, DeviceId, Engine};

/// Which uAPI a context speaks (a real file speaks one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/dev/ioasid`.
    Rfc,
    /// `/dev/iommu`.
    Iommufd,
}

/// Where a mapping translates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A root's: the daemon address of its first byte.
    Daemon(u64),
    /// A child's: the parent IOVA of its first byte.
    Parent(u64),
}

/// One mapping.
#[derive(Clone, Copy, Debug)]
pub struct Map {
    pub size: u64,
    pub prot: Prot,
    pub target: Target,
    /// It holds an alias of its own (pinned and charged); else it is a
    /// slice of the registration starting at `reg`, or a child's.
    pub own: bool,
    pub reg: Option<u64>,
}

/// What translates for a child besides its mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    None,
    Pgtable,
    Pasid,
}

/// An RFC IOASID or an iommufd IOAS.
#[derive(Clone, Debug)]
pub struct Space {
    pub parent: Option<u32>,
    pub maps: BTreeMap<u64, Map>,
    pub table: Table,
    /// An IOAS's allowed ranges (`IOMMU_IOAS_ALLOW_IOVAS`), inclusive.
    pub allowed: Vec<(u64, u64)>,
}

impl Space {
    pub fn new(parent: Option<u32>) -> Self {
        Space {
            parent,
            maps: BTreeMap::new(),
            table: Table::None,
            allowed: Vec::new(),
        }
    }

    /// The mappings starting in `[lo, hi]`, if every mapping meeting that
    /// range lies inside it (else `None`: the range would split one).
    pub fn inside(&self, lo: u64, hi: u64) -> Option<Vec<u64>> {
        let mut starts = Vec::new();
        for (&s, m) in self.maps.range(..=hi) {
            let last = s + (m.size - 1);
            if last < lo {
                continue;
            }
            if s < lo || last > hi {
                return None;
            }
            starts.push(s);
        }
        Some(starts)
    }

    /// Where IOVA allocation may put `length` bytes: inside one allowed
    /// range (anywhere without a list), never at 0.
    pub fn allocatable(&self, iova: u64, length: u64) -> bool {
        let last = iova + (length - 1);
        iova >= 4096
            && (self.allowed.is_empty()
                || self.allowed.iter().any(|&(a, b)| a <= iova && last <= b))
    }

    /// Whether `[iova, iova + size)` meets a mapping.
    pub fn overlaps(&self, iova: u64, size: u64) -> bool {
        let last = iova + (size - 1);
        self.maps
            .range(..=last)
            .next_back()
            .is_some_and(|(&s, m)| s + (m.size - 1) >= iova)
    }
}

/// An iommufd object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Obj {
    Ioas,
    Hwpt { ioas: u32, auto: bool },
    Device(DeviceId),
}

/// One open file.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub kind: Kind,
    /// RFC: by IOASID; iommufd: by IOAS object id.
    pub spaces: BTreeMap<u32, Space>,
    /// Registrations: start → size.
    pub regs: BTreeMap<u64, u64>,
    pub bound: BTreeSet<DeviceId>,
    /// RFC attachments by RID to a root, to a child, and under PASIDs.
    pub rid: BTreeMap<DeviceId, u32>,
    pub child: BTreeMap<DeviceId, u32>,
    pub pasids: BTreeMap<(DeviceId, u32), u32>,
    /// iommufd objects and attachments (device → HWPT).
    pub objects: BTreeMap<u32, Obj>,
    pub attached: BTreeMap<DeviceId, u32>,
}

impl Ctx {
    pub fn new(kind: Kind) -> Self {
        Ctx {
            kind,
            spaces: BTreeMap::new(),
            regs: BTreeMap::new(),
            bound: BTreeSet::new(),
            rid: BTreeMap::new(),
            child: BTreeMap::new(),
            pasids: BTreeMap::new(),
            objects: BTreeMap::new(),
            attached: BTreeMap::new(),
        }
    }

    /// Its roots (`false`) or its children (`true`).
    pub fn ids(&self, children: bool) -> Vec<u32> {
        let spaces = self.spaces.iter();
        spaces
            .filter(|(_, s)| s.parent.is_some() == children)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Bytes pinned: registrations and mappings with an alias of their own.
    pub fn pinned(&self) -> u64 {
        let regs: u64 = self.regs.values().sum();
        regs + self.own_bytes()
    }

    pub fn own_bytes(&self) -> u64 {
        let maps = self.spaces.values().flat_map(|s| s.maps.values());
        maps.filter(|m| m.own).map(|m| m.size).sum()
    }

    /// Aliases held: one per registration and per mapping of its own.
    pub fn aliases(&self) -> usize {
        let maps = self.spaces.values().flat_map(|s| s.maps.values());
        self.regs.len() + maps.filter(|m| m.own).count()
    }

    /// The lowest free iommufd object id.
    pub fn free_id(&self) -> u32 {
        (1..).find(|i| !self.objects.contains_key(i)).expect("ids")
    }

    /// The space group `group` (of devices `members`) realises, if any,
    /// and the devices of the group bound here that are not attached the
    /// same way (the RFC's group rule: their space refuses commands).
    pub fn realised(&self, members: &[DeviceId]) -> Option<u32> {
        match self.kind {
            Kind::Rfc => {
                let rids: BTreeSet<u32> = members
                    .iter()
                    .filter_map(|d| self.rid.get(d))
                    .copied()
                    .collect();
                let kids: BTreeSet<u32> = members
                    .iter()
                    .filter_map(|d| self.child.get(d))
                    .copied()
                    .collect();
                assert!(rids.len() <= 1, "a group RID-attached to {rids:?}");
                assert!(kids.len() <= 1, "a group attached to children {kids:?}");
                kids.first().or(rids.first()).copied()
            }
            Kind::Iommufd => {
                let hwpts: BTreeSet<u32> = members
                    .iter()
                    .filter_map(|d| self.attached.get(d))
                    .copied()
                    .collect();
                assert!(hwpts.len() <= 1, "a group attached to HWPTs {hwpts:?}");
                hwpts.first().map(|h| match self.objects[h] {
                    Obj::Hwpt { ioas, .. } => ioas,
                    o => panic!("attached to {o:?}"),
                })
            }
        }
    }

    /// The RFC group rule for root or child `id`: every device of a group
    /// realising it (for a root, also through one of its children) that is
    /// bound here is attached to it by RID.
    pub fn group_rule_holds(&self, id: u32, groups: &BTreeMap<GroupId, Vec<DeviceId>>) -> bool {
        let child = self.spaces.get(&id).is_some_and(|s| s.parent.is_some());
        groups.values().all(|members| {
            let r = self.realised(members);
            let realises = r == Some(id)
                || (!child
                    && r.is_some_and(|r| self.spaces.get(&r).and_then(|s| s.parent) == Some(id)));
            !realises
                || members.iter().filter(|d| self.bound.contains(d)).all(|d| {
                    if child {
                        self.child.get(d) == Some(&id)
                    } else {
                        self.rid.get(d) == Some(&id)
                    }
                })
        })
    }
}

/// One entry of a translation: `size` bytes at `iova` to `daemon`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub iova: u64,
    pub daemon: u64,
    pub size: u64,
    pub prot: Prot,
}

/// Sorted, with neighbours that continue each other merged: two lists
/// that translate every IOVA the same way are equal once normalised.
pub fn normalise(mut runs: Vec<Run>) -> Vec<Run> {
    runs.sort_by_key(|r| r.iova);
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(l)
                if l.iova + l.size == r.iova
                    && l.daemon + l.size == r.daemon
                    && l.prot == r.prot =>
            {
                l.size += r.size;
            }
            _ => out.push(r),
        }
    }
    out
}

fn entries(fake: &FakeBackend, group: GroupId) -> Vec<Run> {
    fake.entries(group)
        .into_iter()
        .map(|e: FakeEntry| Run {
            iova: e.iova,
            daemon: e.daemon_vaddr,
            size: e.size,
            prot: e.prot,
        })
        .collect()
}

/// A root's translation.
fn root_runs(s: &Space) -> Vec<Run> {
    s.maps
        .iter()
        .map(|(&iova, m)| match m.target {
            Target::Daemon(d) => Run {
                iova,
                daemon: d,
                size: m.size,
                prot: m.prot,
            },
            Target::Parent(_) => panic!("a root with a child's mapping"),
        })
        .collect()
}

/// A child's mappings composed with its parent's (the intersection of
/// both permissions; nothing where the parent maps nothing or no access
/// is left).
fn child_runs(child: &Space, parent: &Space) -> Vec<Run> {
    let mut out = Vec::new();
    for (&iova, m) in &child.maps {
        let Target::Parent(gpa) = m.target else {
            panic!("a child with a root's mapping")
        };
        let end = gpa + m.size;
        for (&ps, pm) in parent.maps.range(..end) {
            let pend = ps + pm.size;
            if pend <= gpa {
                continue;
            }
            let (lo, hi) = (gpa.max(ps), end.min(pend));
            let prot = Prot {
                read: m.prot.read && pm.prot.read,
                write: m.prot.write && pm.prot.write,
            };
            if !prot.read && !prot.write {
                continue;
            }
            let Target::Daemon(d) = pm.target else {
                panic!("a parent with a child's mapping")
            };
            out.push(Run {
                iova: iova + (lo - gpa),
                daemon: d + (lo - ps),
                size: hi - lo,
                prot,
            });
        }
    }
    out
}

/// Every invariant the engine promises, checked after each step.
pub fn check(
    engine: &Engine,
    fake: &FakeBackend,
    model: &BTreeMap<ContextId, Ctx>,
    groups: &BTreeMap<GroupId, Vec<DeviceId>>,
    step: &str,
) {
    // The group rule of binding: a group's bound devices are one context's.
    for (g, members) in groups {
        let owners: BTreeSet<ContextId> = members
            .iter()
            .filter_map(|d| engine.bound_context(*d))
            .collect();
        assert!(owners.len() <= 1, "{step}: group {g} bound to {owners:?}");
        for d in members {
            let want = model
                .iter()
                .find(|(_, c)| c.bound.contains(d))
                .map(|(id, _)| *id);
            assert_eq!(engine.bound_context(*d), want, "{step}: device {d:?} bound");
        }
    }
    let snapshots: BTreeMap<ContextId, std::sync::Arc<ContextSnapshot>> = engine
        .snapshot()
        .into_iter()
        .map(|v| {
            (
                v.id,
                v.snapshot.expect("no call runs: every context is free"),
            )
        })
        .collect();
    let open: Vec<ContextId> = model.keys().copied().collect();
    assert_eq!(
        snapshots.keys().copied().collect::<Vec<_>>(),
        open,
        "{step}: open contexts"
    );
    let mut aliases = 0;
    for (id, c) in model {
        let s = &snapshots[id];
        aliases += c.aliases();
        let regs: u64 = c.regs.values().sum();
        assert_eq!(
            (
                s.registrations,
                s.registered_bytes,
                s.own_bytes,
                s.pinned_bytes
            ),
            (c.regs.len(), regs, c.own_bytes(), c.pinned()),
            "{step}: ctx {id:?}: registrations, registered, own and pinned bytes"
        );
        let mut seen: Vec<(usize, u64)> = s
            .ioasids
            .iter()
            .map(|i| (i.mappings, i.mapped_bytes))
            .collect();
        let mut want: Vec<(usize, u64)> = c
            .spaces
            .values()
            .map(|sp| (sp.maps.len(), sp.maps.values().map(|m| m.size).sum()))
            .collect();
        seen.sort_unstable();
        want.sort_unstable();
        assert_eq!(
            seen, want,
            "{step}: ctx {id:?}: mappings and bytes per address space"
        );
        if c.kind == Kind::Rfc {
            let ids: Vec<u32> = s.ioasids.iter().map(|i| i.id).collect();
            assert_eq!(
                ids,
                c.spaces.keys().copied().collect::<Vec<_>>(),
                "{step}: IOASIDs"
            );
            for i in &s.ioasids {
                let sp = &c.spaces[&i.id];
                assert_eq!(i.parent, sp.parent, "{step}: parent of {}", i.id);
                let m: u64 = sp.maps.values().map(|m| m.size).sum();
                assert_eq!(
                    (i.mappings, i.mapped_bytes),
                    (sp.maps.len(), m),
                    "{step}: IOASID {}",
                    i.id
                );
                let realised: Vec<GroupId> = groups
                    .iter()
                    .filter(|(_, members)| {
                        members.iter().any(|d| c.bound.contains(d))
                            && c.realised(members) == Some(i.id)
                    })
                    .map(|(g, _)| *g)
                    .collect();
                assert_eq!(
                    i.realised_in, realised,
                    "{step}: groups realising IOASID {}",
                    i.id
                );
            }
            for d in &s.devices {
                let pasids: Vec<(u32, u32)> = c
                    .pasids
                    .iter()
                    .filter(|((dev, _), _)| *dev == d.device)
                    .map(|((_, p), io)| (*p, *io))
                    .collect();
                assert_eq!(
                    (d.rid, d.child, pasids),
                    (
                        c.rid.get(&d.device).copied(),
                        c.child.get(&d.device).copied(),
                        d.pasids.clone()
                    ),
                    "{step}: attachments of {:?}",
                    d.device
                );
            }
        }
        let bound: BTreeSet<DeviceId> = s.devices.iter().map(|d| d.device).collect();
        assert_eq!(bound, c.bound, "{step}: ctx {id:?}: bound devices");
        if c.kind == Kind::Iommufd {
            check_objects(engine, *id, c, s, step);
        }
    }
    assert_eq!(fake.live_aliases(), aliases, "{step}: aliases held");
    // Each group's domain holds exactly what the space it realises maps.
    for (g, members) in groups {
        let owner = model
            .iter()
            .find(|(_, c)| members.iter().any(|d| c.bound.contains(d)));
        let got = normalise(entries(fake, *g));
        let Some((id, c)) = owner else {
            assert!(
                got.is_empty(),
                "{step}: group {g} maps {got:x?} with no device bound"
            );
            continue;
        };
        let Some(sid) = c.realised(members) else {
            assert!(
                got.is_empty(),
                "{step}: group {g} maps {got:x?} with no device attached"
            );
            continue;
        };
        let space = &c.spaces[&sid];
        let want = match space.parent {
            None => root_runs(space),
            Some(p) => {
                let parent = &c.spaces[&p];
                if space.table == Table::Pgtable {
                    sound_shadow(&got, parent, *g, step);
                    let s = &snapshots[id];
                    let shadow = s
                        .ioasids
                        .iter()
                        .find(|i| i.id == sid)
                        .map(|i| i.shadow_entries);
                    assert_eq!(
                        shadow,
                        Some(fake.entries(*g).len()),
                        "{step}: shadow entries"
                    );
                    continue;
                }
                child_runs(space, parent)
            }
        };
        assert_eq!(
            got,
            normalise(want),
            "{step}: group {g}'s domain (ctx {id:?}, space {sid})"
        );
    }
}

/// An iommufd file's objects are the model's, id for id and kind for kind
/// (automatic HWPTs come and go with their devices), and its devices are
/// attached as the model says: two devices on HWPTs of one IOAS share its
/// address space, devices on different IOASes do not.
fn check_objects(engine: &Engine, id: ContextId, c: &Ctx, s: &ContextSnapshot, step: &str) {
    use ioasid_engine::ObjectKind;
    let top = c.objects.keys().max().copied().unwrap_or(0) + 2;
    for o in 1..=top {
        let want = c.objects.get(&o).map(|o| match o {
            Obj::Ioas => ObjectKind::Ioas,
            Obj::Hwpt { .. } => ObjectKind::Hwpt,
            Obj::Device(_) => ObjectKind::Device,
        });
        let got = engine.object_kind(id, o).expect("an open context");
        assert_eq!(got, want, "{step}: ctx {id:?}: object {o}");
    }
    let ioas_of = |d: &DeviceId| {
        c.attached.get(d).map(|h| match c.objects[h] {
            Obj::Hwpt { ioas, .. } => ioas,
            o => panic!("attached to {o:?}"),
        })
    };
    for a in &s.devices {
        assert_eq!(
            a.rid.is_some(),
            c.attached.contains_key(&a.device),
            "{step}: {:?} attached",
            a.device
        );
        for b in &s.devices {
            if a.rid.is_some() && b.rid.is_some() {
                assert_eq!(
                    a.rid == b.rid,
                    ioas_of(&a.device) == ioas_of(&b.device),
                    "{step}: {:?} and {:?} share an address space",
                    a.device,
                    b.device
                );
            }
        }
    }
}

/// A page-table child's shadow never reaches past its parent: each entry
/// translates to memory the parent maps there, with no more access.
fn sound_shadow(got: &[Run], parent: &Space, g: GroupId, step: &str) {
    let runs = normalise(root_runs(parent));
    for e in got {
        assert!(
            e.iova + e.size <= 1 << 48 && (e.prot.read || e.prot.write),
            "{step}: group {g}: {e:x?}"
        );
        let inside = runs.iter().any(|r| {
            r.daemon <= e.daemon
                && e.daemon + e.size <= r.daemon + r.size
                && (r.prot.read || !e.prot.read)
                && (r.prot.write || !e.prot.write)
        });
        assert!(inside, "{step}: group {g}: {e:x?} reaches past the parent");
    }
}
