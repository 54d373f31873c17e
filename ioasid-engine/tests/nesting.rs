//! Nesting against the fake backend: software nesting (the shadow of a
//! child composed with its parent), the attach rules, page-table binding
//! with real bytes in the fake's memory, malformed and random tables, PASID
//! tables, and leaks.

mod common;

use common::*;
use ioasid_engine::backend::Prot;
use ioasid_engine::fake::{FakeCall, FakeEntry, FAKE_DAEMON_BASE};
use ioasid_engine::pgtable::{PTE_PRESENT, PTE_PS, PTE_WRITE};
use ioasid_engine::{
    Attachment, ContextId, Invalidation, PASID_TABLE_FLAT_X86_64, PGTABLE_X86_64_4LVL,
};
use nix::errno::Errno::{EBUSY, EEXIST, EFAULT, EINVAL, ENODEV, ENOENT, ENOSPC};

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const RO: Prot = Prot {
    read: true,
    write: false,
};
const WO: Prot = Prot {
    read: false,
    write: true,
};

/// The RFC's flow 5.3 set-up: A and B bound and attached to `gpa`, which
/// maps GPA 0..16 MiB to MEM (one mapping over both pieces), and a child
/// `giova` to which B is attached as well.
struct Nested {
    ctx: ContextId,
    gpa: u32,
    giova: u32,
}

impl Fixture {
    fn nested(&self) -> Nested {
        let en = &self.engine;
        let ctx = en.open_context();
        let gpa = en.alloc(ctx).unwrap();
        en.bind(DEV_A, ctx).unwrap();
        en.bind(DEV_B, ctx).unwrap();
        en.attach(DEV_A, ctx, &PID, gpa, None).unwrap();
        en.attach(DEV_B, ctx, &PID, gpa, None).unwrap();
        en.map_dma(ctx, &PID, gpa, m(0, MEM, 2 * PIECE)).unwrap();
        let giova = en.create_nesting(ctx, gpa).unwrap();
        en.attach(DEV_B, ctx, &PID, giova, None).unwrap();
        Nested { ctx, gpa, giova }
    }
}

#[test]
fn software_nesting_composes_the_child_with_the_parent() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, gpa, giova } = f.nested();
    let parent_entries = vec![e(0, MEM, PIECE, RW), e(PIECE, MEM + PIECE, PIECE, RW)];
    // A (parent only) keeps the parent's table; B's group holds the empty
    // shadow of the child.
    assert_eq!(f.fake.entries(3), parent_entries);
    assert!(f.fake.entries(4).is_empty());
    // The RFC's example: GIOVA 0x2000 -> GPA 0x1000.
    en.map_dma(ctx, &PID, giova, m(0x2000, 0x1000, K4)).unwrap();
    assert_eq!(f.fake.entries(4), vec![e(0x2000, MEM + 0x1000, K4, RW)]);
    // Across the parent's two alias segments: two pieces.
    en.map_dma(ctx, &PID, giova, m(0x100_0000, PIECE - K4, 2 * K4))
        .unwrap();
    // Over GPAs the parent does not map (yet): accepted, nothing mapped.
    en.map_dma(ctx, &PID, giova, m(0x200_0000, 0x4000_0000, 2 * K4))
        .unwrap();
    assert_eq!(
        f.fake.entries(4),
        vec![
            e(0x2000, MEM + 0x1000, K4, RW),
            e(0x100_0000, MEM + PIECE - K4, K4, RW),
            e(0x100_1000, MEM + PIECE, K4, RW),
        ]
    );
    assert_eq!(f.fake.entries(3), parent_entries, "A's table is untouched");
    // The parent maps the missing GPA page read-only: the child's piece
    // appears at once, read-only (the intersection of both levels).
    en.map_dma(ctx, &PID, gpa, mp(0x4000_1000, MEM2, K4, RO))
        .unwrap();
    assert!(f.fake.entries(4).contains(&e(0x200_1000, MEM2, K4, RO)));
    assert_eq!(f.fake.entries(4).len(), 4);
    assert!(f.fake.entries(3).contains(&e(0x4000_1000, MEM2, K4, RO)));
    // A write-only child mapping over a read-only parent page: no access
    // left, nothing mapped.
    en.map_dma(ctx, &PID, giova, mp(0x300_0000, 0x4000_1000, K4, WO))
        .unwrap();
    assert_eq!(f.fake.entries(4).len(), 4);
    // Child permissions narrow too.
    en.map_dma(ctx, &PID, giova, mp(0x400_0000, 0x3000, K4, RO))
        .unwrap();
    assert!(f
        .fake
        .entries(4)
        .contains(&e(0x400_0000, MEM + 0x3000, K4, RO)));
    // The parent unmaps a page the child uses: never refused, the shadow
    // piece goes, and the alias is released.
    let aliases = f.fake.live_aliases();
    assert_eq!(en.unmap_dma(ctx, gpa, 0x4000_1000, K4).unwrap(), K4);
    assert!(!f.fake.entries(4).iter().any(|x| x.iova == 0x200_1000));
    assert_eq!(f.fake.live_aliases(), aliases - 1);
    // Child unmap.
    assert_eq!(en.unmap_dma(ctx, giova, 0x2000, K4).unwrap(), K4);
    assert!(!f.fake.entries(4).iter().any(|x| x.iova == 0x2000));
    // Child unmap must not split a child mapping.
    assert_eq!(errno(en.unmap_dma(ctx, giova, 0x100_0000, K4)), EINVAL);
    // Overlap within the child is EEXIST.
    assert_eq!(
        errno(en.map_dma(ctx, &PID, giova, m(0x100_1000, 0, K4))),
        EEXIST
    );
    let info = en.info(ctx, giova).unwrap();
    assert_eq!(info.parent, Some(gpa));
    assert_eq!(info.nesting_levels, 0);
    assert_eq!(info.mappings, 4);
    assert_eq!(info.shadow_entries, f.fake.entries(4).len());
    assert_eq!(
        info.devices,
        vec![Attachment {
            device: DEV_B,
            pasid: None
        }]
    );
    let pinfo = en.info(ctx, gpa).unwrap();
    assert_eq!(pinfo.children, vec![giova]);
    assert_eq!(pinfo.nesting_levels, 1);
    // Child mappings pin nothing: accounting is the parent's.
    assert_eq!(en.pinned_bytes(ctx).unwrap(), 2 * PIECE);
    // A second group realising the child gets the same shadow, and
    // follows its changes.
    en.bind(DEV_X, ctx).unwrap();
    en.attach(DEV_X, ctx, &PID, gpa, None).unwrap();
    assert_eq!(f.fake.entries(7), f.fake.entries(3));
    en.attach(DEV_X, ctx, &PID, giova, None).unwrap();
    assert_eq!(f.fake.entries(7), f.fake.entries(4));
    en.map_dma(ctx, &PID, giova, m(0x500_0000, 0x5000, K4))
        .unwrap();
    assert!(f
        .fake
        .entries(7)
        .contains(&e(0x500_0000, MEM + 0x5000, K4, RW)));
    assert_eq!(f.fake.entries(7), f.fake.entries(4));
    assert_eq!(en.unmap_dma(ctx, giova, 0x500_0000, K4).unwrap(), K4);
    en.unbind(DEV_X, ctx).unwrap();
    assert!(f.fake.entries(7).is_empty());
    // Detaching B from the child gives its group the parent's table back.
    en.detach(DEV_B, ctx, giova, None).unwrap();
    assert_eq!(f.fake.entries(4), f.fake.entries(3));
    // And attaching again brings the shadow back.
    en.attach(DEV_B, ctx, &PID, giova, None).unwrap();
    assert_eq!(f.fake.entries(4).len(), info.shadow_entries);
    // Unmapping everything in the parent empties the shadow too.
    en.unmap_all_dma(ctx, gpa).unwrap();
    assert!(f.fake.entries(4).is_empty());
    assert!(f.fake.entries(3).is_empty());
    assert_eq!(f.fake.live_aliases(), 0);
    // The child's mappings survive and come back with the parent's.
    en.map_dma(ctx, &PID, gpa, m(0, MEM, PIECE)).unwrap();
    assert_eq!(
        f.fake.entries(4),
        vec![
            e(0x100_0000, MEM + PIECE - K4, K4, RW),
            e(0x400_0000, MEM + 0x3000, K4, RO),
        ]
    );
}

#[test]
fn a_failing_parent_map_changes_nothing_at_either_level() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, gpa, giova } = f.nested();
    en.map_dma(ctx, &PID, giova, m(0, 0x4000_0000, 2 * K4))
        .unwrap();
    let before = (f.fake.entries(3), f.fake.entries(4), f.fake.live_aliases());
    // Group 3 maps the parent's page, then B's shadow (group 4) fails.
    f.fake.fail_map_after(1, ENOSPC);
    assert_eq!(
        errno(en.map_dma(ctx, &PID, gpa, m(0x4000_0000, MEM2, 2 * K4))),
        ENOSPC
    );
    assert_eq!(
        before,
        (f.fake.entries(3), f.fake.entries(4), f.fake.live_aliases())
    );
    assert_eq!(en.info(ctx, gpa).unwrap().mappings, 1);
}

#[test]
fn nesting_attach_rules_and_errnos() {
    let f = fixture();
    let en = &f.engine;
    let ctx = en.open_context();
    let gpa = en.alloc(ctx).unwrap();
    assert_eq!(errno(en.create_nesting(ctx, 99)), ENOENT);
    assert_eq!(errno(en.create_nesting(ctx, gpa)), ENODEV);
    en.bind(DEV_A, ctx).unwrap();
    en.bind(DEV_B, ctx).unwrap();
    en.attach(DEV_A, ctx, &PID, gpa, None).unwrap();
    let child = en.create_nesting(ctx, gpa).unwrap();
    // One level only.
    assert_eq!(errno(en.create_nesting(ctx, child)), EINVAL);
    // Never attached: ENODEV for commands, GET_INFO empty.
    assert_eq!(errno(en.map_dma(ctx, &PID, child, m(0, 0, K4))), ENODEV);
    assert!(!en.info(ctx, child).unwrap().attached);
    // A device must be RID-attached to the parent first, by RID or PASID.
    let e = en.attach(DEV_B, ctx, &PID, child, None).unwrap_err();
    assert_eq!(e.errno, EINVAL);
    assert!(
        e.message.contains(&format!("to IOASID {gpa} by RID first")),
        "{}",
        e.message
    );
    assert_eq!(errno(en.attach(DEV_B, ctx, &PID, child, Some(3))), EINVAL);
    en.attach(DEV_A, ctx, &PID, child, None).unwrap();
    assert_eq!(errno(en.attach(DEV_A, ctx, &PID, child, None)), EBUSY);
    let child2 = en.create_nesting(ctx, gpa).unwrap();
    assert_eq!(errno(en.attach(DEV_A, ctx, &PID, child2, None)), EBUSY);
    // PASID attachments to another child are fine (tracked, not routed).
    en.attach(DEV_A, ctx, &PID, child2, Some(5)).unwrap();
    // The parent cannot be left while a child is in use.
    let e = en.detach(DEV_A, ctx, gpa, None).unwrap_err();
    assert_eq!(e.errno, EBUSY);
    assert!(
        e.message
            .contains(&format!("a child of IOASID {gpa}; detach")),
        "{}",
        e.message
    );
    assert_eq!(errno(en.free(ctx, gpa)), EBUSY);
    assert_eq!(errno(en.free(ctx, child)), EBUSY);
    en.detach(DEV_A, ctx, child, None).unwrap();
    assert_eq!(errno(en.detach(DEV_A, ctx, child, None)), ENOENT);
    assert_eq!(
        errno(en.detach(DEV_A, ctx, gpa, None)),
        EBUSY,
        "PASID on child2"
    );
    en.detach(DEV_A, ctx, child2, Some(5)).unwrap();
    en.free(ctx, child).unwrap();
    en.free(ctx, child2).unwrap();
    en.detach(DEV_A, ctx, gpa, None).unwrap();
    en.free(ctx, gpa).unwrap();
    assert!(f.fake.entries(3).is_empty());
}

#[test]
fn the_devices_of_a_group_share_the_child() {
    let f = fixture();
    let en = &f.engine;
    let ctx = en.open_context();
    let gpa = en.alloc(ctx).unwrap();
    en.bind(DEV_X, ctx).unwrap();
    en.bind(DEV_Y, ctx).unwrap();
    en.attach(DEV_X, ctx, &PID, gpa, None).unwrap();
    en.attach(DEV_Y, ctx, &PID, gpa, None).unwrap();
    en.map_dma(ctx, &PID, gpa, m(0, MEM, K4)).unwrap();
    let child = en.create_nesting(ctx, gpa).unwrap();
    let other = en.create_nesting(ctx, gpa).unwrap();
    en.attach(DEV_X, ctx, &PID, child, None).unwrap();
    // The group's domain holds the child's shadow now; Y has not joined:
    // the child refuses commands (the group rule), the parent does not.
    assert!(f.fake.entries(7).is_empty());
    assert_eq!(errno(en.map_dma(ctx, &PID, child, m(0, 0, K4))), EBUSY);
    assert_eq!(errno(en.info(ctx, child)), EBUSY);
    en.map_dma(ctx, &PID, gpa, m(K4, MEM, K4)).unwrap();
    // Y cannot take another child: one I/O page table per group.
    assert_eq!(errno(en.attach(DEV_Y, ctx, &PID, other, None)), EBUSY);
    en.attach(DEV_Y, ctx, &PID, child, None).unwrap();
    en.map_dma(ctx, &PID, child, m(0x10_0000, K4, K4)).unwrap();
    assert_eq!(f.fake.entries(7), vec![e(0x10_0000, MEM, K4, RW)]);
    // The group goes back to the parent when its last device leaves.
    en.detach(DEV_X, ctx, child, None).unwrap();
    assert_eq!(f.fake.entries(7), vec![e(0x10_0000, MEM, K4, RW)]);
    en.detach(DEV_Y, ctx, child, None).unwrap();
    assert_eq!(
        f.fake.entries(7),
        vec![e(0, MEM, K4, RW), e(K4, MEM, K4, RW)]
    );
    // Unbind of a device on a child detaches from both.
    en.attach(DEV_X, ctx, &PID, child, None).unwrap();
    en.attach(DEV_Y, ctx, &PID, child, None).unwrap();
    en.unbind(DEV_X, ctx).unwrap();
    en.unbind(DEV_Y, ctx).unwrap();
    assert!(f.fake.entries(7).is_empty());
    assert!(en.info(ctx, child).unwrap().devices.is_empty());
}

#[test]
fn one_ioasid_under_different_pasids_and_each_pair_once() {
    let f = fixture();
    let en = &f.engine;
    let ctx = en.open_context();
    let gpa = en.alloc(ctx).unwrap();
    let gva = en.alloc(ctx).unwrap();
    en.bind(DEV_A, ctx).unwrap();
    en.bind(DEV_B, ctx).unwrap();
    en.attach(DEV_A, ctx, &PID, gva, Some(5)).unwrap();
    en.attach(DEV_B, ctx, &PID, gva, Some(6)).unwrap();
    en.attach(DEV_B, ctx, &PID, gva, Some(5)).unwrap();
    assert_eq!(errno(en.attach(DEV_A, ctx, &PID, gpa, Some(5))), EBUSY);
    assert_eq!(errno(en.attach(DEV_B, ctx, &PID, gva, Some(6))), EBUSY);
    let devices = en.info(ctx, gva).unwrap().devices;
    assert_eq!(devices.len(), 3);
    // No domain was touched.
    assert!(f.fake.entries(3).is_empty() && f.fake.entries(4).is_empty());
}

/// Page-table fixture: the parent maps GPA [0, 16 MiB) to MEM, so the
/// bytes of GPA g are the fake's client memory at MEM + g.
const L4: u64 = 0x10_0000;
const L3: u64 = 0x10_1000;
const L2: u64 = 0x10_2000;
const L1: u64 = 0x10_3000;

fn pte(f: &Fixture, table: u64, index: u64, value: u64) {
    f.fake.write_u64(MEM + table + 8 * index, value);
}

/// L4[0] -> L3, L3[0] -> L2 (both writable), L3[1] a 1 GiB leaf at GPA 0,
/// L2[0] -> L1, L2[1] a 2 MiB leaf at GPA 4 MiB, L1[0] a 4 KiB leaf at GPA
/// 2 MiB, read-only.
fn build_table(f: &Fixture) {
    let p = PTE_PRESENT;
    pte(f, L4, 0, L3 | p | PTE_WRITE);
    pte(f, L3, 0, L2 | p | PTE_WRITE);
    pte(f, L3, 1, p | PTE_WRITE | PTE_PS);
    pte(f, L2, 0, L1 | p | PTE_WRITE);
    pte(f, L2, 1, 0x40_0000 | p | PTE_WRITE | PTE_PS);
    pte(f, L1, 0, 0x20_0000 | p);
}

fn expected_table_shadow() -> Vec<FakeEntry> {
    vec![
        e(0, MEM + 0x20_0000, K4, RO),
        e(M2, MEM + 0x40_0000, M2, RW),
        // The 1 GiB leaf: the parent maps only its first 16 MiB, in two
        // alias segments.
        e(G1, MEM, PIECE, RW),
        e(G1 + PIECE, MEM + PIECE, PIECE, RW),
    ]
}

fn inv_all() -> Invalidation {
    Invalidation::default()
}

fn inv_range(addr: u64, size: u64) -> Invalidation {
    Invalidation {
        range: Some((addr, size)),
        ..Invalidation::default()
    }
}

#[test]
fn bound_page_table_is_walked_and_shadowed() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, gpa, giova } = f.nested();
    build_table(&f);
    en.bind_pgtable(ctx, giova, PGTABLE_X86_64_4LVL, 48, L4)
        .unwrap();
    assert_eq!(f.fake.entries(4), expected_table_shadow());
    let st = en.info(ctx, giova).unwrap().pgtable.unwrap();
    assert_eq!((st.root, st.leaves, st.malformed, st.walks), (L4, 3, 0, 1));
    // A bound child takes no map or unmap.
    assert_eq!(
        errno(en.map_dma(ctx, &PID, giova, m(0x9000_0000, 0, K4))),
        EBUSY
    );
    assert_eq!(errno(en.unmap_dma(ctx, giova, 0, K4)), EBUSY);
    assert_eq!(errno(en.unmap_all_dma(ctx, giova)), EBUSY);
    assert_eq!(
        errno(en.bind_pgtable(ctx, giova, PGTABLE_X86_64_4LVL, 48, L4)),
        EBUSY
    );

    // Like an IOTLB: changes are not seen before their invalidation.
    pte(&f, L1, 1, 0x30_0000 | PTE_PRESENT | PTE_WRITE); // input 0x1000
    pte(&f, L1, 2, 0x31_0000 | PTE_PRESENT | PTE_WRITE); // input 0x2000
    assert_eq!(f.fake.entries(4), expected_table_shadow());
    // A range invalidation walks only its range.
    en.invalidate(ctx, giova, inv_range(0x1000, K4)).unwrap();
    let mut want = expected_table_shadow();
    want.insert(1, e(0x1000, MEM + 0x30_0000, K4, RW));
    assert_eq!(f.fake.entries(4), want);
    let st = en.info(ctx, giova).unwrap().pgtable.unwrap();
    assert_eq!((st.leaves, st.walks, st.last_walk.leaves), (4, 2, 1));
    // The rest is seen with a full invalidation, which touches only what
    // changed: no gap in DMA for the rest.
    f.fake.clear_calls();
    en.invalidate(ctx, giova, inv_all()).unwrap();
    want.insert(2, e(0x2000, MEM + 0x31_0000, K4, RW));
    assert_eq!(f.fake.entries(4), want);
    let touched: Vec<FakeCall> = f
        .fake
        .calls()
        .into_iter()
        .filter(|c| !matches!(c, FakeCall::Read { .. }))
        .collect();
    assert_eq!(
        touched,
        vec![FakeCall::Map {
            group: 4,
            iova: 0x2000,
            daemon_vaddr: FAKE_DAEMON_BASE + MEM + 0x31_0000,
            size: K4
        }]
    );
    // Removing the 2 MiB leaf and making L1 read-only at level 2.
    pte(&f, L2, 1, 0);
    pte(&f, L2, 0, L1 | PTE_PRESENT);
    en.invalidate(ctx, giova, inv_range(0, 4 * M2)).unwrap();
    assert_eq!(
        f.fake.entries(4),
        vec![
            e(0, MEM + 0x20_0000, K4, RO),
            e(0x1000, MEM + 0x30_0000, K4, RO),
            e(0x2000, MEM + 0x31_0000, K4, RO),
            e(G1, MEM, PIECE, RW),
            e(G1 + PIECE, MEM + PIECE, PIECE, RW),
        ]
    );

    // Parent changes propagate at once, from the cached leaves.
    en.map_dma(ctx, &PID, gpa, m(2 * PIECE, MEM2, 2 * PIECE))
        .unwrap();
    assert!(f
        .fake
        .entries(4)
        .contains(&e(G1 + 2 * PIECE, MEM2, 2 * PIECE, RW)));
    assert_eq!(
        en.unmap_dma(ctx, gpa, 2 * PIECE, 2 * PIECE).unwrap(),
        2 * PIECE
    );
    assert!(!f.fake.entries(4).iter().any(|x| x.iova == G1 + 2 * PIECE));
    // Even the table's own pages: the cached leaves stay until the next
    // invalidation, which then cannot read the root (counted).
    assert_eq!(en.unmap_dma(ctx, gpa, 0, 2 * PIECE).unwrap(), 2 * PIECE);
    assert!(f.fake.entries(4).is_empty());
    assert_eq!(en.info(ctx, giova).unwrap().pgtable.unwrap().leaves, 4);
    en.map_dma(ctx, &PID, gpa, m(0, MEM, 2 * PIECE)).unwrap();
    assert_eq!(f.fake.entries(4).len(), 5);

    // Unbind removes the shadow.
    en.unbind_pgtable(ctx, giova).unwrap();
    assert!(f.fake.entries(4).is_empty());
    assert!(en.info(ctx, giova).unwrap().pgtable.is_none());
    assert_eq!(errno(en.unbind_pgtable(ctx, giova)), ENOENT);
    // Mapping works again afterwards.
    en.map_dma(ctx, &PID, giova, m(0, 0, K4)).unwrap();
    assert_eq!(f.fake.entries(4), vec![e(0, MEM, K4, RW)]);
    assert_eq!(
        errno(en.bind_pgtable(ctx, giova, PGTABLE_X86_64_4LVL, 48, L4)),
        EBUSY,
        "the child has mappings"
    );
}

#[test]
fn bind_and_invalidate_errnos() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, gpa, giova } = f.nested();
    build_table(&f);
    let bind = |io, format, width, root| en.bind_pgtable(ctx, io, format, width, root);
    assert_eq!(errno(bind(gpa, 1, 48, L4)), EINVAL, "not a child");
    assert_eq!(errno(bind(giova, 2, 48, L4)), EINVAL, "format");
    assert_eq!(errno(bind(giova, 1, 39, L4)), EINVAL, "width");
    assert_eq!(errno(bind(giova, 1, 48, L4 + 8)), EINVAL, "aligned");
    assert_eq!(
        errno(bind(giova, 1, 48, 0x4000_0000)),
        EFAULT,
        "unmapped root"
    );
    assert_eq!(errno(bind(77, 1, 48, L4)), ENOENT);
    // Invalidations: nothing bound yet.
    assert_eq!(errno(en.invalidate(ctx, giova, inv_all())), EINVAL);
    bind(giova, 1, 48, L4).unwrap();
    for inv in [
        inv_range(0x800, K4),
        inv_range(0, 0),
        inv_range(0, 0x1800),
        inv_range(!0xfff, 2 * K4),
        Invalidation {
            pasid: Some(0),
            ..inv_all()
        },
        Invalidation {
            pasid_cache: true,
            ..inv_all()
        },
    ] {
        assert_eq!(errno(en.invalidate(ctx, giova, inv)), EINVAL, "{inv:?}");
    }
    assert_eq!(
        errno(en.bind_pasid_table(ctx, giova, 1, L4, 1)),
        EBUSY,
        "a page table is bound"
    );
    // A parent that cannot read the root at all any more: a root
    // invalidation succeeds, translating nothing, and counts it.
    en.unmap_all_dma(ctx, gpa).unwrap();
    en.invalidate(ctx, giova, inv_all()).unwrap();
    let st = en.info(ctx, giova).unwrap().pgtable.unwrap();
    assert_eq!((st.leaves, st.last_walk.malformed), (0, 1));
}

#[test]
fn malformed_tables_are_skipped_and_counted() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, giova, .. } = f.nested();
    build_table(&f);
    let p = PTE_PRESENT;
    pte(&f, L4, 1, L3 | p | PTE_PS); // PS is reserved at level 4
    pte(&f, L4, 2, L4 | p); // the root itself
    pte(&f, L3, 2, L4 | p); // an ancestor
    pte(&f, L2, 2, L2 | p); // itself
    pte(&f, L2, 3, 0x7000_0000 | p); // a table outside the parent's mappings
    pte(&f, L1, 3, 0x8000_0000 | p); // a page outside: blocked, not malformed
    en.bind_pgtable(ctx, giova, PGTABLE_X86_64_4LVL, 48, L4)
        .unwrap();
    assert_eq!(f.fake.entries(4), expected_table_shadow());
    let st = en.info(ctx, giova).unwrap().pgtable.unwrap();
    assert_eq!(st.last_walk.malformed, 5);
    assert!(!st.last_walk.truncated);
    assert_eq!(st.leaves, 4);
    assert_eq!(st.malformed, 5);
    // The daemon's counters (`cuse-ioasid status`): one malformed table.
    let counted = en.counters();
    assert_eq!(
        (
            counted.walks,
            counted.malformed_walks,
            counted.malformed_entries
        ),
        (1, 1, 5)
    );
    assert_eq!(counted.truncated_walks, 0);
}

#[test]
fn a_huge_fan_out_stops_at_the_default_budget() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, giova, .. } = f.nested();
    let p = PTE_PRESENT;
    pte(&f, L4, 0, L3 | p);
    for i in 0..512 {
        pte(&f, L3, i, L2 | p);
        pte(&f, L2, i, L1 | p);
        // Pages the parent does not map: nothing to shadow, all to visit.
        pte(&f, L1, i, 0x7000_0000 | p);
    }
    let started = std::time::Instant::now();
    en.bind_pgtable(ctx, giova, PGTABLE_X86_64_4LVL, 48, L4)
        .unwrap();
    let st = en.info(ctx, giova).unwrap().pgtable.unwrap();
    assert!(st.last_walk.truncated);
    assert_eq!(st.last_walk.malformed, 1);
    assert!(st.leaves < 1 << 20, "{}", st.leaves);
    assert!(st.leaves > 1 << 19, "{}", st.leaves);
    assert!(f.fake.entries(4).is_empty());
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    // A lower budget is honoured too.
    en.set_walk_limit(1000);
    en.invalidate(ctx, giova, inv_all()).unwrap();
    let st = en.info(ctx, giova).unwrap().pgtable.unwrap();
    assert!(st.last_walk.truncated && st.leaves < 1000);
    let counted = en.counters();
    assert_eq!((counted.walks, counted.truncated_walks), (2, 2));
    assert_eq!((counted.malformed_walks, counted.malformed_entries), (2, 2));
}

/// xorshift64*: a small seeded generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_tables_never_escape_the_parent() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, giova, .. } = f.nested();
    en.set_walk_limit(1 << 11);
    const PAGES: u64 = 6;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let parent_lo = FAKE_DAEMON_BASE + MEM;
    let parent_hi = parent_lo + 2 * PIECE;
    let (mut bound, mut shadowed, mut malformed) = (0, 0, 0);
    for round in 0..800 {
        // Fill the table pages with a random mix.
        let mut bytes = vec![0u8; (PAGES * K4) as usize];
        for slot in bytes.chunks_exact_mut(8) {
            let v = match rng.below(10) {
                0..=4 => 0,
                5 | 6 => {
                    // A pointer to a table page, with random low flags.
                    (L4 + rng.below(PAGES) * K4) | (rng.next() & 0x8ff) | PTE_PRESENT
                }
                7 => {
                    // A leaf-ish pointer into (or past) the parent's range.
                    (rng.below(4 * PIECE) & !0xfff) | (rng.next() & 0x83) | PTE_PRESENT
                }
                _ => rng.next(),
            };
            slot.copy_from_slice(&v.to_le_bytes());
        }
        f.fake.write_memory(MEM + L4, &bytes);
        let root = match rng.below(20) {
            0 => L4 + 8,      // misaligned
            1 => 0x7000_0000, // not mapped in the parent
            _ => L4 + rng.below(PAGES) * K4,
        };
        let r = en.bind_pgtable(ctx, giova, PGTABLE_X86_64_4LVL, 48, root);
        match root {
            0x7000_0000 => assert_eq!(errno(r), EFAULT),
            r0 if r0 & 0xfff != 0 => assert_eq!(errno(r), EINVAL),
            _ => {
                r.unwrap_or_else(|e| panic!("round {round}: {e}"));
                bound += 1;
            }
        }
        if en.info(ctx, giova).unwrap().pgtable.is_some() {
            // Change some bytes and invalidate a random range or all.
            for _ in 0..8 {
                let at = rng.below(PAGES * K4 / 8) * 8;
                f.fake.write_u64(MEM + L4 + at, rng.next());
            }
            let inv = if rng.below(2) == 0 {
                inv_all()
            } else {
                let start = rng.below(1 << 36) & !0xfff;
                inv_range(start, (rng.below(1 << 32) + 1) << 12)
            };
            en.invalidate(ctx, giova, inv)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        for x in f.fake.entries(4) {
            assert!(
                parent_lo <= x.daemon_vaddr && x.daemon_vaddr + x.size <= parent_hi,
                "round {round}: {x:?} escapes the parent"
            );
            assert!(x.iova + x.size <= 1 << 48, "round {round}: {x:?}");
            assert!(x.prot.read, "round {round}: {x:?}");
        }
        let info = en.info(ctx, giova).unwrap();
        assert_eq!(info.shadow_entries, f.fake.entries(4).len());
        shadowed += usize::from(info.shadow_entries > 0);
        malformed += info.pgtable.map_or(0, |t| t.malformed);
        if info.pgtable.is_some() {
            en.unbind_pgtable(ctx, giova).unwrap();
        }
        assert!(f.fake.entries(4).is_empty(), "round {round}");
    }
    // The generator reaches both outcomes.
    assert!(bound > 600, "{bound}");
    assert!(shadowed > 60, "{shadowed}");
    assert!(malformed > 60, "{malformed}");
}

/// A flat PASID table of 16 entries at GPA 0x50_0000.
const PT: u64 = 0x50_0000;

#[test]
fn pasid_tables_are_read_walked_and_reread_on_invalidation() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, gpa, .. } = f.nested();
    // A is attached to the PASID-table child under PASID 3: its RID DMA
    // keeps the parent's table.
    let pt = en.create_nesting(ctx, gpa).unwrap();
    en.attach(DEV_A, ctx, &PID, pt, Some(3)).unwrap();
    build_table(&f);
    let pe = |i: u64, v: u64| f.fake.write_u64(MEM + PT + 8 * i, v);
    pe(0, L4 | PTE_PRESENT);
    pe(1, L4); // not present
    pe(2, L4 | PTE_PRESENT | 1 << 5); // another bit: not present, counted
    pe(3, 0x7000_0000 | PTE_PRESENT); // a root the parent does not map
    pe(15, L2 | PTE_PRESENT); // a level-2 table read as a root
    let bind = |format, table, entries| en.bind_pasid_table(ctx, pt, format, table, entries);
    assert_eq!(errno(bind(2, PT, 16)), EINVAL);
    assert_eq!(errno(bind(1, PT, 0)), EINVAL);
    assert_eq!(errno(bind(1, PT, (1 << 20) + 1)), EINVAL);
    assert_eq!(errno(bind(1, PT + 8, 16)), EINVAL);
    assert_eq!(errno(bind(1, !0xfff, 1 << 20)), EINVAL, "overflow");
    assert_eq!(errno(bind(1, 0x7000_0000, 16)), EFAULT);
    assert_eq!(
        errno(bind(1, 2 * PIECE - K4, 1024)),
        EFAULT,
        "runs past the parent"
    );
    assert_eq!(errno(en.bind_pasid_table(ctx, gpa, 1, PT, 16)), EINVAL);
    let parent_entries = f.fake.entries(3);
    bind(1, PT, 16).unwrap();
    assert_eq!(f.fake.entries(3), parent_entries, "no RID effect");
    let st = en.info(ctx, pt).unwrap().pasid_table.unwrap();
    assert_eq!((st.table, st.entries), (PT, 16));
    assert_eq!((st.valid, st.bad_entries, st.unreadable_entries), (3, 1, 0));
    // PASID 0: the three leaves; PASID 15: L2 read as a root finds L1 as a
    // level-3 table, and L1's leaf entry as a level-2 table (unreadable);
    // PASID 3: an unreadable root.
    assert_eq!(st.leaves, 3);
    assert_eq!(st.malformed, 2);
    assert_eq!(errno(bind(1, PT, 16)), EBUSY);
    assert_eq!(
        errno(en.bind_pgtable(ctx, pt, PGTABLE_X86_64_4LVL, 48, L4)),
        EBUSY
    );
    assert_eq!(errno(en.map_dma(ctx, &PID, pt, m(0, 0, K4))), EBUSY);

    // Entry 1 becomes valid: seen after a PASID-cache invalidation of it.
    pe(1, L4 | PTE_PRESENT);
    pe(2, 0);
    let pasid_cache = |pasid| Invalidation {
        pasid,
        pasid_cache: true,
        range: None,
    };
    assert_eq!(en.info(ctx, pt).unwrap().pasid_table.unwrap().valid, 3);
    en.invalidate(ctx, pt, pasid_cache(Some(1))).unwrap();
    let st = en.info(ctx, pt).unwrap().pasid_table.unwrap();
    assert_eq!((st.valid, st.bad_entries, st.leaves), (4, 1, 6));
    en.invalidate(ctx, pt, pasid_cache(None)).unwrap();
    let st = en.info(ctx, pt).unwrap().pasid_table.unwrap();
    assert_eq!((st.valid, st.bad_entries), (4, 0));
    // A page-table change of PASID 0's (and 1's) table: an IOTLB
    // invalidation of PASID 0 only sees it there.
    pte(&f, L1, 5, 0x60_0000 | PTE_PRESENT);
    en.invalidate(
        ctx,
        pt,
        Invalidation {
            pasid: Some(0),
            range: Some((0x5000, K4)),
            pasid_cache: false,
        },
    )
    .unwrap();
    assert_eq!(en.info(ctx, pt).unwrap().pasid_table.unwrap().leaves, 7);
    en.invalidate(ctx, pt, inv_all()).unwrap();
    assert_eq!(en.info(ctx, pt).unwrap().pasid_table.unwrap().leaves, 8);
    // Errors.
    for inv in [
        pasid_cache(Some(16)),
        Invalidation {
            pasid: Some(1),
            range: Some((0, K4)),
            pasid_cache: true,
        },
    ] {
        assert_eq!(errno(en.invalidate(ctx, pt, inv)), EINVAL, "{inv:?}");
    }
    assert_eq!(f.fake.entries(3), parent_entries);
    en.unbind_pasid_table(ctx, pt).unwrap();
    assert!(en.info(ctx, pt).unwrap().pasid_table.is_none());
    assert_eq!(errno(en.unbind_pasid_table(ctx, pt)), ENOENT);
    assert_eq!(errno(en.invalidate(ctx, pt, pasid_cache(None))), EINVAL);
}

#[test]
fn close_context_with_nested_ioasids_leaks_nothing() {
    let f = fixture();
    let en = &f.engine;
    let Nested { ctx, gpa, giova } = f.nested();
    en.map_dma(ctx, &PID, giova, m(0, 0, PIECE)).unwrap();
    build_table(&f);
    let bound = en.create_nesting(ctx, gpa).unwrap();
    en.bind(DEV_X, ctx).unwrap();
    en.attach(DEV_X, ctx, &PID, gpa, None).unwrap();
    en.attach(DEV_X, ctx, &PID, bound, None).unwrap();
    en.bind_pgtable(ctx, bound, PGTABLE_X86_64_4LVL, 48, L4)
        .unwrap();
    let pt = en.create_nesting(ctx, gpa).unwrap();
    en.attach(DEV_A, ctx, &PID, pt, Some(9)).unwrap();
    f.fake.write_u64(MEM + PT, L4 | PTE_PRESENT);
    en.bind_pasid_table(ctx, pt, PASID_TABLE_FLAT_X86_64, PT, 4)
        .unwrap();
    en.register_memory(ctx, &PID, MEM2, PIECE).unwrap();
    en.map_dma(ctx, &PID, gpa, m(0x4000_0000, MEM2, K4))
        .unwrap();
    assert!(!f.fake.entries(4).is_empty() && !f.fake.entries(7).is_empty());
    let closed = en.close_context(ctx).unwrap();
    assert!(closed.errors.is_empty());
    assert_eq!(closed.unbound, vec![DEV_A, DEV_B, DEV_X]);
    assert_eq!(f.fake.live_aliases(), 0);
    for g in [3, 4, 7] {
        assert!(f.fake.entries(g).is_empty(), "group {g}");
    }
    let next = en.open_context();
    en.bind(DEV_B, next).unwrap();
}
