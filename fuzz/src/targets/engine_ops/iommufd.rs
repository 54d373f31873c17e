//! The operations of an iommufd (`/dev/iommu`) context, and what each
//! success means for the model.

use std::os::fd::AsFd;

use ioasid_engine::fake::{FAKE_DAEMON_BASE, FAKE_FILE_BASE};
use ioasid_engine::{ContextId, DeviceId, IoasMap, MapSource};

use super::model::{self, Ctx, Map, Obj, Space};
use super::*;

/// The same for an iommufd context: an IOAS, a bound device, a mapping,
/// an attachment.
pub(super) fn iommufd_build(c: &Ctx) -> Option<u64> {
    if c.spaces.is_empty() {
        Some(0)
    } else if c.bound.is_empty() {
        Some(10)
    } else if c.spaces.values().all(|s| s.maps.is_empty()) {
        Some(3)
    } else if c.attached.is_empty() {
        Some(13)
    } else {
        None
    }
}

impl Ops {
    pub(super) fn iommufd_op(&self, rng: &mut Rng, r: &mut Run, ctx: ContextId) -> String {
        let en = &r.engine;
        let c = r.model.get_mut(&ctx).expect("modelled");
        let ioases: Vec<u32> = c.spaces.keys().copied().collect();
        let all: Vec<u32> = c.objects.keys().copied().collect();
        let from = if rng.chance(7, 8) { &ioases } else { &all };
        let id = pick_id(rng, from);
        let op = match iommufd_build(c) {
            Some(op) if rng.chance(1, 2) => op,
            _ => rng.below(16),
        };
        match op {
            0 | 1 => {
                let want = c.free_id();
                let got = en.ioas_alloc(ctx);
                if let Ok(n) = got {
                    assert_eq!(n, want, "the lowest free id");
                    c.objects.insert(n, Obj::Ioas);
                    c.spaces.insert(n, Space::new(None));
                }
                format!("ioas alloc: {got:?}")
            }
            2 => {
                let any = pick_id(rng, &all);
                let got = en.destroy(ctx, any);
                if got.is_ok() {
                    match c.objects.remove(&any).expect("destroyed a modelled object") {
                        Obj::Ioas => {
                            let busy = c
                                .objects
                                .values()
                                .any(|o| matches!(o, Obj::Hwpt { ioas, .. } if *ioas == any));
                            assert!(!busy, "destroyed IOAS {any} with a HWPT");
                            c.spaces.remove(&any);
                        }
                        Obj::Hwpt { .. } => {
                            assert!(
                                !c.attached.values().any(|&h| h == any),
                                "destroyed attached HWPT {any}"
                            );
                        }
                        Obj::Device(d) => panic!("destroyed device {d:?}"),
                    }
                }
                format!("destroy {any}: {got:?}")
            }
            3..=5 => {
                let length = length(rng);
                let fixed = rng.chance(1, 2).then(|| iova(rng));
                let p = prot(rng);
                let file = rng.chance(1, 4);
                let addr = if file {
                    rng.below(FILE_LEN / K4) * K4
                } else {
                    vaddr(rng)
                };
                let source = if file {
                    MapSource::File {
                        file: self.file.as_fd(),
                        offset: addr,
                        client: &PID,
                    }
                } else {
                    MapSource::User {
                        client: &PID,
                        vaddr: addr,
                    }
                };
                let map = IoasMap {
                    length,
                    iova: fixed,
                    prot: p,
                };
                let got = en.ioas_map(ctx, id, source, map);
                if let Ok(at) = got {
                    assert!(fixed.is_none_or(|f| f == at), "a fixed IOVA moved");
                    let s = c.spaces.get_mut(&id).expect("mapped into a modelled IOAS");
                    assert!(
                        fixed.is_some() || s.allocatable(at, length),
                        "allocated {at:#x}+{length:#x} outside {:x?}",
                        s.allowed
                    );
                    assert!(
                        !s.overlaps(at, length),
                        "map at {at:#x}+{length:#x} overlaps"
                    );
                    let daemon = if file {
                        FAKE_FILE_BASE + (self.inode << 32) + addr
                    } else {
                        FAKE_DAEMON_BASE + addr
                    };
                    s.maps.insert(
                        at,
                        Map {
                            size: length,
                            prot: p,
                            target: model::Target::Daemon(daemon),
                            own: true,
                            reg: None,
                        },
                    );
                }
                format!(
                    "ioas map {id} {} {addr:#x}+{length:#x} fixed {fixed:x?} {p:?}: {got:x?}",
                    if file { "file" } else { "user" }
                )
            }
            6 => {
                let src = pick_id(rng, &ioases);
                let (src_iova, length) = match some_mapping(rng, c.spaces.get(&src)) {
                    Some((s, l)) if rng.chance(3, 4) => {
                        let off = rng.below((l / K4).max(1)) * K4;
                        (s + off, (l - off).min(length(rng)).max(1))
                    }
                    _ => (iova(rng), length(rng)),
                };
                let fixed = rng.chance(1, 2).then(|| iova(rng));
                let p = prot(rng);
                let map = IoasMap {
                    length,
                    iova: fixed,
                    prot: p,
                };
                let got = en.ioas_copy(ctx, &PID, id, src, src_iova, map);
                if let Ok(at) = got {
                    assert!(fixed.is_none_or(|f| f == at), "a fixed IOVA moved");
                    let s = c.spaces.get(&id).expect("a modelled IOAS");
                    assert!(
                        fixed.is_some() || s.allocatable(at, length),
                        "allocated {at:#x}+{length:#x} outside {:x?}",
                        s.allowed
                    );
                    // The source's pieces over the range, each a mapping.
                    let s = &c.spaces[&src];
                    let last = src_iova + (length - 1);
                    let mut pieces = Vec::new();
                    for (&k, m) in s.maps.range(..=last) {
                        let end = k + (m.size - 1);
                        if end < src_iova {
                            continue;
                        }
                        let (lo, hi) = (k.max(src_iova), end.min(last));
                        let model::Target::Daemon(d) = m.target else {
                            panic!("an IOAS child")
                        };
                        pieces.push((lo - src_iova, d + (lo - k), hi - lo + 1));
                    }
                    let covered: u64 = pieces.iter().map(|p| p.2).sum();
                    assert_eq!(covered, length, "a copy of a range not wholly mapped");
                    let dst = c.spaces.get_mut(&id).expect("copied into a modelled IOAS");
                    assert!(
                        !dst.overlaps(at, length),
                        "copy at {at:#x}+{length:#x} overlaps"
                    );
                    for (off, d, n) in pieces {
                        dst.maps.insert(
                            at + off,
                            Map {
                                size: n,
                                prot: p,
                                target: model::Target::Daemon(d),
                                own: true,
                                reg: None,
                            },
                        );
                    }
                }
                format!(
                    "copy {src}:{src_iova:#x}+{length:#x} -> {id} fixed {fixed:x?} {p:?}: {got:x?}"
                )
            }
            7 | 8 => {
                let (iova, length) = match some_mapping(rng, c.spaces.get(&id)) {
                    Some((s, l)) if rng.chance(2, 3) => match rng.below(5) {
                        0 => (s, l + K4),
                        1 => (s + 1, l),
                        2 => (0, u64::MAX),
                        _ => (s, l),
                    },
                    _ => (iova(rng), length(rng)),
                };
                let got = en.ioas_unmap(ctx, id, iova, length);
                if let Ok(bytes) = got {
                    let s = c
                        .spaces
                        .get_mut(&id)
                        .expect("unmapped from a modelled IOAS");
                    let gone: Vec<u64> = if iova == 0 && length == u64::MAX {
                        s.maps.keys().copied().collect()
                    } else {
                        let g = s
                            .inside(iova, iova + (length - 1))
                            .expect("an unmap that splits succeeded");
                        assert!(!g.is_empty(), "an unmap of nothing succeeded");
                        g
                    };
                    let sum: u64 = gone
                        .iter()
                        .map(|k| s.maps.remove(k).expect("listed").size)
                        .sum();
                    assert_eq!(bytes, sum, "bytes unmapped");
                }
                format!("ioas unmap {id} {iova:#x}+{length:#x}: {got:?}")
            }
            9 if rng.chance(1, 3) => {
                // Huge pages only change the IOAS's alignment.
                let set = rng.chance(2, 3).then(|| rng.chance(1, 2));
                let got = en.ioas_huge_pages(ctx, id, set);
                format!("huge pages {id} {set:?}: {got:?}")
            }
            9 => {
                let ranges: Vec<(u64, u64)> = (0..rng.below(3))
                    .map(|_| {
                        let s = iova(rng);
                        (s, s.saturating_add(length(rng)))
                    })
                    .collect();
                let got = en.ioas_allow_iovas(ctx, id, &ranges);
                if got.is_ok() {
                    c.spaces.get_mut(&id).expect("a modelled IOAS").allowed = ranges.clone();
                }
                format!("allow {id} {ranges:x?}: {got:?}")
            }
            10 => {
                let dev = pick_dev(rng, en, ctx, false);
                let want = c.free_id();
                let got = en.iommufd_bind(dev, ctx);
                if let Ok(n) = got {
                    assert_eq!(n, want, "the lowest free id");
                    c.objects.insert(n, Obj::Device(dev));
                    c.bound.insert(dev);
                }
                format!("bind {dev:?}: {got:?}")
            }
            11 => {
                let dev = pick_dev(rng, en, ctx, true);
                let got = en.iommufd_unbind(dev, ctx);
                if got.is_ok() {
                    assert!(c.bound.remove(&dev), "unbind of {dev:?}, not bound");
                    c.objects.retain(|_, o| *o != Obj::Device(dev));
                    detach_model(c, dev);
                }
                format!("unbind {dev:?}: {got:?}")
            }
            12 => {
                let devs: Vec<u32> = c
                    .objects
                    .iter()
                    .filter(|(_, o)| matches!(o, Obj::Device(_)))
                    .map(|(k, _)| *k)
                    .collect();
                let devid = pick_id(rng, &devs);
                let want = c.free_id();
                let got = en.hwpt_alloc(ctx, devid, id, 0, false);
                if let Ok(n) = got {
                    assert_eq!(n, want, "the lowest free id");
                    assert_eq!(c.objects.get(&id), Some(&Obj::Ioas), "a HWPT on {id}");
                    c.objects.insert(
                        n,
                        Obj::Hwpt {
                            ioas: id,
                            auto: false,
                        },
                    );
                }
                format!("hwpt alloc dev {devid} on {id}: {got:?}")
            }
            13 | 14 => {
                let dev = pick_dev(rng, en, ctx, true);
                let pt = pick_id(rng, &all);
                let want = c.free_id();
                let got = en.attach_pt(dev, ctx, &PID, pt);
                if let Ok(h) = got {
                    assert!(c.bound.contains(&dev), "attach of {dev:?}, not bound");
                    let ioas = match c.objects.get(&pt) {
                        Some(Obj::Ioas) => pt,
                        Some(Obj::Hwpt { ioas, .. }) => {
                            assert_eq!(h, pt, "attach to a HWPT gave another");
                            *ioas
                        }
                        o => panic!("attach to {pt}, {o:?}"),
                    };
                    match c.objects.get(&h) {
                        None => {
                            assert_eq!(h, want, "the lowest free id");
                            c.objects.insert(h, Obj::Hwpt { ioas, auto: true });
                        }
                        Some(Obj::Hwpt { ioas: on, .. }) => {
                            assert_eq!(*on, ioas, "HWPT {h}'s IOAS")
                        }
                        Some(o) => panic!("attach gave {h}, {o:?}"),
                    }
                    let old = c.attached.get(&dev).copied();
                    let group = self
                        .groups
                        .iter()
                        .find(|(_, m)| m.contains(&dev))
                        .expect("grouped")
                        .1;
                    let movers: Vec<DeviceId> = group
                        .iter()
                        .filter(|d| {
                            **d == dev || (old.is_some() && c.attached.get(d).copied() == old)
                        })
                        .copied()
                        .collect();
                    for d in movers {
                        c.attached.insert(d, h);
                    }
                    if let Some(o) = old {
                        drop_auto(c, o);
                    }
                }
                format!("attach {dev:?} to {pt}: {got:?}")
            }
            _ => {
                let dev = pick_dev(rng, en, ctx, true);
                let got = en.detach_pt(dev, ctx);
                if got.is_ok() {
                    detach_model(c, dev);
                }
                format!("detach {dev:?}: {got:?}")
            }
        }
    }
}

/// `dev` leaves its HWPT; an automatic HWPT goes with its last device.
fn detach_model(c: &mut Ctx, dev: DeviceId) {
    if let Some(h) = c.attached.remove(&dev) {
        drop_auto(c, h);
    }
}

fn drop_auto(c: &mut Ctx, h: u32) {
    let auto = matches!(c.objects.get(&h), Some(Obj::Hwpt { auto: true, .. }));
    if auto && !c.attached.values().any(|&x| x == h) {
        c.objects.remove(&h);
    }
}
