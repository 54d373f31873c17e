//! The operations of an RFC (`/dev/ioasid`) context, and what each
//! success means for the model.

use ioasid_engine::fake::FAKE_DAEMON_BASE;
use ioasid_engine::{
    ContextId, DeviceId, DmaMap, Invalidation, PASID_TABLE_FLAT_X86_64, PGTABLE_X86_64_4LVL,
};

use super::model::{self, Ctx, Map, Space, Table};
use super::*;

/// The next step that builds state an RFC context lacks (an IOASID, a
/// bound device, an attachment, a mapping, a child, a child attachment),
/// as an index of [`Ops::rfc_op`]'s operations; `None` once it has all.
pub(super) fn rfc_build(c: &Ctx) -> Option<u64> {
    if c.ids(false).is_empty() {
        Some(0)
    } else if c.bound.is_empty() {
        Some(10)
    } else if c.rid.is_empty() {
        Some(12)
    } else if c.spaces.values().all(|s| s.maps.is_empty()) {
        Some(5)
    } else if c.spaces.values().all(|s| s.parent.is_none()) {
        Some(15)
    } else if c.child.is_empty() && c.pasids.is_empty() {
        Some(12)
    } else if c.spaces.values().all(|s| s.table == Table::None) {
        Some(16 + u64::from(c.spaces.len() % 2 == 0))
    } else {
        None
    }
}

impl Ops {
    pub(super) fn rfc_op(&self, rng: &mut Rng, r: &mut Run, ctx: ContextId) -> String {
        let en = &r.engine;
        let c = r.model.get_mut(&ctx).expect("modelled");
        let op = match rfc_build(c) {
            Some(op) if rng.chance(1, 2) => op,
            _ => rng.below(20),
        };
        let ids: Vec<u32> = c.spaces.keys().copied().collect();
        let id = if op == 15 || op == 5 && rng.chance(1, 2) {
            pick_id(rng, &c.ids(false))
        } else if (op == 12 && !c.rid.is_empty() && rng.chance(1, 2))
            || (op >= 16 && rng.chance(3, 4))
        {
            pick_id(rng, &c.ids(true))
        } else {
            pick_id(rng, &ids)
        };
        match op {
            0 | 1 => {
                let got = en.alloc(ctx);
                if let Ok(n) = got {
                    assert!(n > 0 && !c.spaces.contains_key(&n), "alloc gave {n}");
                    c.spaces.insert(n, Space::new(None));
                }
                format!("alloc: {got:?}")
            }
            2 => {
                let got = en.free(ctx, id);
                if got.is_ok() {
                    let users = c
                        .rid
                        .values()
                        .chain(c.child.values())
                        .chain(c.pasids.values());
                    assert!(
                        !users.clone().any(|&u| u == id),
                        "free {id} with devices attached"
                    );
                    assert!(
                        !c.spaces.values().any(|s| s.parent == Some(id)),
                        "free {id} with children"
                    );
                    c.spaces.remove(&id);
                }
                format!("free {id}: {got:?}")
            }
            3 if rng.chance(1, 2) => {
                let (v, size) = match rng.below(4) {
                    0 => (MEM, PIECE),
                    1 => (MEM + PIECE - M2, 2 * M2),
                    _ => (vaddr(rng), length(rng)),
                };
                let got = en.register_memory(ctx, &PID, v, size);
                if got.is_ok() {
                    let over = c.regs.iter().any(|(&s, &l)| s < v + size && v < s + l);
                    assert!(!over, "register {v:#x}+{size:#x} overlaps");
                    c.regs.insert(v, size);
                }
                format!("register {v:#x}+{size:#x}: {got:?}")
            }
            3 | 4 => {
                let (v, size) = match c.regs.iter().next() {
                    Some((&s, &l)) if rng.chance(3, 4) => (s, l),
                    _ => (vaddr(rng), length(rng)),
                };
                let got = en.unregister_memory(ctx, v, size);
                if got.is_ok() {
                    assert_eq!(c.regs.remove(&v), Some(size), "unregister {v:#x}");
                    let used = c
                        .spaces
                        .values()
                        .flat_map(|s| s.maps.values())
                        .any(|m| m.reg == Some(v));
                    assert!(!used, "unregister {v:#x} while a mapping uses it");
                }
                format!("unregister {v:#x}+{size:#x}: {got:?}")
            }
            5..=7 => {
                let child = c.spaces.get(&id).is_some_and(|s| s.parent.is_some());
                let (iova, va, size) = if !child && rng.chance(1, 4) {
                    // Identity over the page tables' pages: GPA 0 is MEM.
                    (0, MEM, M2 * (1 + rng.below(8)))
                } else if child && rng.chance(3, 4) {
                    // A child maps parent IOVAs (mostly ones the parent maps).
                    let p = c.spaces[&id].parent.and_then(|p| c.spaces.get(&p));
                    let gpa = some_mapping(rng, p)
                        .map_or(iova(rng), |(s, l)| s + rng.below(l / K4 + 1) * K4);
                    (iova(rng), gpa, length(rng))
                } else if let Some((&rs, &rl)) = c.regs.iter().next().filter(|_| rng.chance(3, 4)) {
                    // Inside a registration: the only maps it allows.
                    let off = rng.below(rl / K4) * K4;
                    (iova(rng), rs + off, length(rng).min(rl - off))
                } else {
                    (iova(rng), vaddr(rng), length(rng))
                };
                let p = prot(rng);
                let map = DmaMap {
                    iova,
                    vaddr: va,
                    size,
                    prot: p,
                };
                let got = en.map_dma(ctx, &PID, id, map);
                if got.is_ok() {
                    assert!(
                        c.group_rule_holds(id, &self.groups),
                        "map on {id} despite the group rule"
                    );
                    let s = c.spaces.get(&id).expect("mapped into a modelled IOASID");
                    assert!(!s.overlaps(iova, size), "map {iova:#x}+{size:#x} overlaps");
                    let m = if child {
                        Map {
                            size,
                            prot: p,
                            target: model::Target::Parent(va),
                            own: false,
                            reg: None,
                        }
                    } else {
                        let reg = c
                            .regs
                            .iter()
                            .find(|(&s, &l)| s <= va && va + size <= s + l)
                            .map(|(&s, _)| s);
                        assert!(
                            c.regs.is_empty() || reg.is_some(),
                            "a map outside the registrations"
                        );
                        Map {
                            size,
                            prot: p,
                            target: model::Target::Daemon(FAKE_DAEMON_BASE + va),
                            own: c.regs.is_empty(),
                            reg,
                        }
                    };
                    c.spaces.get_mut(&id).expect("checked").maps.insert(iova, m);
                }
                format!("map {id} {iova:#x}->{va:#x}+{size:#x} {p:?}: {got:?}")
            }
            8 | 9 => {
                let (iova, size) = match some_mapping(rng, c.spaces.get(&id)) {
                    Some((s, l)) if rng.chance(2, 3) => match rng.below(4) {
                        0 => (s, l + K4 * rng.below(3)),
                        1 => (s.saturating_sub(K4), l + K4),
                        2 => (s + K4, l),
                        _ => (s, l),
                    },
                    _ => (iova(rng), length(rng)),
                };
                let all = rng.chance(1, 6);
                let got = if all {
                    en.unmap_all_dma(ctx, id)
                } else {
                    en.unmap_dma(ctx, id, iova, size)
                };
                if let Ok(bytes) = got {
                    assert!(
                        c.group_rule_holds(id, &self.groups),
                        "unmap on {id} despite the group rule"
                    );
                    let s = c
                        .spaces
                        .get_mut(&id)
                        .expect("unmapped from a modelled IOASID");
                    let gone = if all {
                        s.maps.keys().copied().collect()
                    } else {
                        s.inside(iova, iova + (size - 1))
                            .expect("an unmap that splits a mapping succeeded")
                    };
                    let sum: u64 = gone
                        .iter()
                        .map(|k| s.maps.remove(k).expect("listed").size)
                        .sum();
                    assert_eq!(bytes, sum, "bytes unmapped");
                }
                if all {
                    format!("unmap all {id}: {got:?}")
                } else {
                    format!("unmap {id} {iova:#x}+{size:#x}: {got:?}")
                }
            }
            10 => {
                let dev = pick_dev(rng, en, ctx, false);
                let got = en.bind(dev, ctx);
                if got.is_ok() {
                    c.bound.insert(dev);
                }
                format!("bind {dev:?}: {got:?}")
            }
            11 => {
                let dev = pick_dev(rng, en, ctx, true);
                let got = en.unbind(dev, ctx);
                if got.is_ok() {
                    assert!(c.bound.remove(&dev), "unbind of {dev:?}, not bound");
                    c.rid.remove(&dev);
                    c.child.remove(&dev);
                    c.pasids.retain(|(d, _), _| *d != dev);
                }
                format!("unbind {dev:?}: {got:?}")
            }
            12 | 13 => {
                // To a child: mostly a device attached to its parent.
                let parent = c.spaces.get(&id).and_then(|s| s.parent);
                let on_parent: Vec<DeviceId> = c
                    .rid
                    .iter()
                    .filter(|(_, r)| Some(**r) == parent)
                    .map(|(d, _)| *d)
                    .collect();
                let dev = if !on_parent.is_empty() && rng.chance(3, 4) {
                    *rng.pick(&on_parent)
                } else {
                    pick_dev(rng, en, ctx, true)
                };
                let pasid = rng.chance(1, 5).then(|| rng.below(4) as u32);
                let got = en.attach(dev, ctx, &PID, id, pasid);
                if got.is_ok() {
                    assert!(c.bound.contains(&dev), "attach of {dev:?}, not bound");
                    let child = c.spaces[&id].parent.is_some();
                    match pasid {
                        Some(p) => {
                            c.pasids.insert((dev, p), id);
                        }
                        None if child => {
                            c.child.insert(dev, id);
                        }
                        None => {
                            c.rid.insert(dev, id);
                        }
                    }
                }
                format!("attach {dev:?} {id} pasid {pasid:?}: {got:?}")
            }
            14 => {
                let dev = pick_dev(rng, en, ctx, true);
                let pasid = rng.chance(1, 5).then(|| rng.below(4) as u32);
                let got = en.detach(dev, ctx, id, pasid);
                if got.is_ok() {
                    let gone = match pasid {
                        Some(p) => c.pasids.remove(&(dev, p)),
                        None if c.child.get(&dev) == Some(&id) => c.child.remove(&dev),
                        None => c.rid.remove(&dev),
                    };
                    assert_eq!(gone, Some(id), "detach {dev:?} from {id}");
                }
                format!("detach {dev:?} {id} pasid {pasid:?}: {got:?}")
            }
            15 => {
                let got = en.create_nesting(ctx, id);
                if let Ok(n) = got {
                    assert!(n > 0 && !c.spaces.contains_key(&n), "nesting gave {n}");
                    assert_eq!(c.spaces[&id].parent, None, "a child of a child");
                    c.spaces.insert(n, Space::new(Some(id)));
                }
                format!("nest {id}: {got:?}")
            }
            16 => {
                let root = if rng.chance(3, 4) {
                    TABLES + rng.below(TABLE_PAGES) * K4
                } else {
                    iova(rng)
                };
                let unbind = rng.chance(1, 3);
                let got = if unbind {
                    en.unbind_pgtable(ctx, id).map(|_| ())
                } else {
                    en.bind_pgtable(ctx, id, PGTABLE_X86_64_4LVL, 48, root)
                        .map(|_| ())
                };
                if got.is_ok() {
                    let s = c.spaces.get_mut(&id).expect("exists");
                    assert!(s.parent.is_some() && s.maps.is_empty(), "a table on {id}");
                    s.table = if unbind { Table::None } else { Table::Pgtable };
                }
                format!("pgtable {id} root {root:#x} unbind {unbind}: {got:?}")
            }
            17 => {
                let table = if rng.chance(3, 4) {
                    TABLES + rng.below(TABLE_PAGES) * K4
                } else {
                    iova(rng)
                };
                let entries = match rng.below(4) {
                    0 => rng.interesting() as u32,
                    _ => 1 + rng.below(600) as u32,
                };
                let unbind = rng.chance(1, 3);
                let got = if unbind {
                    en.unbind_pasid_table(ctx, id).map(|_| ())
                } else {
                    en.bind_pasid_table(ctx, id, PASID_TABLE_FLAT_X86_64, table, entries)
                        .map(|_| ())
                };
                if got.is_ok() {
                    let s = c.spaces.get_mut(&id).expect("exists");
                    assert!(
                        s.parent.is_some() && s.maps.is_empty(),
                        "a PASID table on {id}"
                    );
                    s.table = if unbind { Table::None } else { Table::Pasid };
                }
                format!("pasid table {id} at {table:#x} x{entries} unbind {unbind}: {got:?}")
            }
            18 | 19 => {
                let inv = Invalidation {
                    range: rng.chance(1, 2).then(|| (iova(rng), length(rng))),
                    pasid: rng.chance(1, 4).then(|| rng.below(8) as u32),
                    pasid_cache: rng.chance(1, 4),
                };
                let got = en.invalidate(ctx, id, inv).map(|_| ());
                format!("invalidate {id} {inv:?}: {got:?}")
            }
            _ => unreachable!("an RFC operation"),
        }
    }
}
