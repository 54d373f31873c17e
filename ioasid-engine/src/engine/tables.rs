//! PASIDs and tables: binding a user page table or PASID table to a
//! child, walking it, and invalidating what the engine cached of it.

use super::*;

#[derive(Debug)]
pub(super) struct BoundPgtable {
    pub(super) root: u64,
    /// By input address; never overlapping.
    pub(super) leaves: BTreeMap<u64, Leaf>,
    pub(super) last_walk: WalkStats,
    pub(super) malformed: u64,
    pub(super) walks: u64,
}

/// What the engine knows of one PASID-table entry that is not plainly
/// non-present.
#[derive(Debug)]
pub(super) enum PasidState {
    Walked {
        leaves: BTreeMap<u64, Leaf>,
        root: u64,
        stats: WalkStats,
    },
    Bad,
    Unreadable,
}

#[derive(Debug)]
pub(super) struct BoundPasidTable {
    pub(super) table: u64,
    pub(super) entries: u32,
    pub(super) pasids: BTreeMap<u32, PasidState>,
}

impl Engine {
    /// Bind the page table rooted at `root` (an IOVA of the parent) to
    /// child IOASID `ioasid`, walk it and make its translations effective.
    ///
    /// `EINVAL` not a child, `format` not [`PGTABLE_X86_64_4LVL`],
    /// `addr_width` not 48, `root` not 4 KiB aligned; `EBUSY` a table is
    /// bound already, or the child has mappings or a PASID table; `EFAULT`
    /// the root table is not mapped readable in the parent; `ENOENT`,
    /// `EBUSY` (group rule), `ENODEV` as for [`Engine::map_dma`]. Malformed
    /// entries do not fail the bind: they are skipped, counted in
    /// [`PgtableStatus`] and logged.
    pub fn bind_pgtable(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        format: u32,
        addr_width: u32,
        root: u64,
    ) -> Result<WalkReport, Error> {
        self.with_context(ctx, |c| {
            self.usable(c, ioasid)?;
            let parent = child_parent(c, ioasid)?;
            if format != PGTABLE_X86_64_4LVL {
                return Err(err(
                    EINVAL,
                    format!(
                        "page-table format {format} is unknown; use IOASID_PGTABLE_X86_64_4LVL (1)"
                    ),
                ));
            }
            if addr_width != pgtable::ADDR_WIDTH {
                return Err(err(
                    EINVAL,
                    format!("addr_width {addr_width}: IOASID_PGTABLE_X86_64_4LVL takes 48"),
                ));
            }
            if root & (pgtable::TABLE_BYTES - 1) != 0 {
                return Err(err(
                    EINVAL,
                    format!("root table {root:#x} is not 4 KiB aligned"),
                ));
            }
            if let Some(what) = c.ioasid(ioasid)?.protocol_in_use() {
                return Err(err(EBUSY, format!("IOASID {ioasid}: {what}")));
            }
            let view = parent_view(c, parent, &[])?;
            if self.read_table(&view, root).is_none() {
                return Err(err(
                    EFAULT,
                    format!(
                        "the root table at {root:#x} is not mapped readable in the parent IOASID \
                         {parent}"
                    ),
                ));
            }
            let mut budget = self.walk_limit.load(Ordering::Relaxed);
            let (found, stats) = pgtable::walk(
                &mut |a| self.read_table(&view, a),
                root,
                0,
                pgtable::INPUT_END,
                &mut budget,
            );
            let mut report = WalkReport::default();
            report.add(&stats);
            self.board.count_walk(&stats);
            c.ioasid_mut(ioasid)?.pgtable = Some(BoundPgtable {
                root,
                leaves: found.into_iter().collect(),
                last_walk: stats,
                malformed: stats.malformed,
                walks: 1,
            });
            let shadow = child_shadow(c.ioasid(ioasid)?, &view);
            if let Err(e) = self.apply_shadow(c, ioasid, shadow) {
                c.ioasid_mut(ioasid)?.pgtable = None;
                return Err(e);
            }
            Ok(report)
        })
    }

    /// Unbind the page table of child `ioasid`: it translates nothing
    /// until a table is bound or mappings are made. `ENOENT` if no page
    /// table is bound; `EBUSY` (group rule), `ENODEV` as usual.
    pub fn unbind_pgtable(&self, ctx: ContextId, ioasid: IoasidId) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            self.usable(c, ioasid)?;
            let Some(old) = c.ioasid_mut(ioasid)?.pgtable.take() else {
                return Err(err(
                    ENOENT,
                    format!("IOASID {ioasid} has no page table bound"),
                ));
            };
            if let Err(e) = self.apply_shadow(c, ioasid, Shadow::new()) {
                c.ioasid_mut(ioasid)?.pgtable = Some(old);
                return Err(e);
            }
            Ok(())
        })
    }

    /// Bind the flat PASID table at `table` (an IOVA of the parent, with
    /// `entries` entries) to child `ioasid`, read its entries and walk the
    /// page tables they name. PASID DMA is not routed, so nothing is
    /// mapped: what was found is reported by [`Engine::info`].
    ///
    /// `EINVAL` not a child, `format` not [`PASID_TABLE_FLAT_X86_64`],
    /// `entries` 0 or above 2^20, `table` not 4 KiB aligned or the table
    /// overflowing; `EBUSY` a PASID table is bound already, or the child
    /// has mappings or a page table; `EFAULT` the table is not mapped
    /// readable in the parent; the usual `ENOENT`, `EBUSY`, `ENODEV`.
    pub fn bind_pasid_table(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        format: u32,
        table: u64,
        entries: u32,
    ) -> Result<WalkReport, Error> {
        self.with_context(ctx, |c| {
            self.usable(c, ioasid)?;
            let parent = child_parent(c, ioasid)?;
            if format != PASID_TABLE_FLAT_X86_64 {
                return Err(err(
                    EINVAL,
                    format!(
                        "PASID-table format {format} is unknown; use IOASID_PASID_TABLE_FLAT_X86_64 (1)"
                    ),
                ));
            }
            if entries == 0 || entries > PASID_TABLE_MAX_ENTRIES {
                return Err(err(
                    EINVAL,
                    format!("{entries} entries: a PASID table has 1 to 2^20"),
                ));
            }
            if table & (pgtable::TABLE_BYTES - 1) != 0 {
                return Err(err(
                    EINVAL,
                    format!("PASID table {table:#x} is not 4 KiB aligned"),
                ));
            }
            if table.checked_add(8 * u64::from(entries)).is_none() {
                return Err(err(EINVAL, "table + 8 * entries overflows"));
            }
            if let Some(what) = c.ioasid(ioasid)?.protocol_in_use() {
                return Err(err(EBUSY, format!("IOASID {ioasid}: {what}")));
            }
            let view = parent_view(c, parent, &[])?;
            let chunks = (u64::from(entries) * 8).div_ceil(pgtable::TABLE_BYTES);
            for k in 0..chunks {
                let at = table + k * pgtable::TABLE_BYTES;
                if self.read_table(&view, at).is_none() {
                    return Err(err(
                        EFAULT,
                        format!(
                            "the PASID table is not mapped readable in the parent IOASID {parent} \
                             (at {at:#x})"
                        ),
                    ));
                }
            }
            let mut bound = BoundPasidTable {
                table,
                entries,
                pasids: BTreeMap::new(),
            };
            let mut report = WalkReport::default();
            self.reread_pasids(&view, &mut bound, 0..entries, &mut report);
            c.ioasid_mut(ioasid)?.pasid_table = Some(bound);
            Ok(report)
        })
    }

    /// Unbind the PASID table of child `ioasid`. `ENOENT` if none is bound.
    pub fn unbind_pasid_table(&self, ctx: ContextId, ioasid: IoasidId) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            self.usable(c, ioasid)?;
            if c.ioasid_mut(ioasid)?.pasid_table.take().is_none() {
                return Err(err(
                    ENOENT,
                    format!("IOASID {ioasid} has no PASID table bound"),
                ));
            }
            Ok(())
        })
    }

    /// The user changed a table bound to `ioasid`: walk again what `inv`
    /// covers and make the result effective.
    ///
    /// With a page table: `inv.range` `None` walks the whole table and
    /// replaces every cached leaf; `Some((addr, size))` (4 KiB aligned,
    /// size > 0) walks only the entries meeting that input range and
    /// replaces the cached leaves meeting it (or meeting a new leaf). With
    /// a PASID table: `pasid_cache` re-reads the entries (of `inv.pasid`,
    /// or all) and walks the tables they name; without it, the current
    /// tables of those PASIDs are walked again over the range.
    ///
    /// `EINVAL` no table bound; PASID fields on an IOASID without a PASID
    /// table; `range` with `pasid_cache`; misaligned, zero or overflowing
    /// range; a PASID past the table. A backend failure (e.g. `ENOSPC`)
    /// leaves the previous translations in force.
    pub fn invalidate(
        &self,
        ctx: ContextId,
        ioasid: IoasidId,
        inv: Invalidation,
    ) -> Result<WalkReport, Error> {
        self.with_context(ctx, |c| {
            self.usable(c, ioasid)?;
            let (start, end) = match inv.range {
                None => (0, pgtable::INPUT_END),
                Some((addr, size)) => {
                    if size == 0 || (addr | size) & (pgtable::TABLE_BYTES - 1) != 0 {
                        return Err(err(
                            EINVAL,
                            format!(
                                "invalidation range {addr:#x}+{size:#x} must be a non-empty multiple \
                                 of 4 KiB"
                            ),
                        ));
                    }
                    let end = addr
                        .checked_add(size)
                        .ok_or_else(|| err(EINVAL, "addr + size overflows"))?;
                    (addr, end)
                }
            };
            let io = c.ioasid(ioasid)?;
            if inv.pasid.is_some() || inv.pasid_cache {
                let Some(pt) = &io.pasid_table else {
                    return Err(err(
                        EINVAL,
                        format!(
                            "IOASID {ioasid} has no PASID table: PASID invalidation flags do not apply"
                        ),
                    ));
                };
                if inv.pasid_cache && inv.range.is_some() {
                    return Err(err(
                        EINVAL,
                        "a PASID-cache invalidation re-reads whole entries: it takes no address range",
                    ));
                }
                if let Some(p) = inv.pasid {
                    if p >= pt.entries {
                        return Err(err(
                            EINVAL,
                            format!("PASID {p} is past the table ({} entries)", pt.entries),
                        ));
                    }
                }
            }
            let Some(parent) = io.parent else {
                return Err(err(
                    EINVAL,
                    format!("IOASID {ioasid} is not a child: no table is bound"),
                ));
            };
            let view = parent_view(c, parent, &[])?;
            if io.pgtable.is_some() {
                return self.invalidate_pgtable(c, ioasid, &view, start, end);
            }
            let Some(mut pt) = c.ioasid_mut(ioasid)?.pasid_table.take() else {
                return Err(err(EINVAL, format!("IOASID {ioasid} has no table bound")));
            };
            let which = match inv.pasid {
                Some(p) => p..p + 1,
                None => 0..pt.entries,
            };
            let mut report = WalkReport::default();
            if inv.pasid_cache {
                self.reread_pasids(&view, &mut pt, which, &mut report);
            } else {
                let mut budget = self.walk_limit.load(Ordering::Relaxed);
                for state in pt.pasids.range_mut(which).map(|(_, s)| s) {
                    if let PasidState::Walked {
                        leaves,
                        root,
                        stats,
                    } = state
                    {
                        let (found, s) = pgtable::walk(
                            &mut |a| self.read_table(&view, a),
                            *root,
                            start,
                            end,
                            &mut budget,
                        );
                        report.add(&s);
                        self.board.count_walk(&s);
                        *stats = s;
                        merge_leaves(leaves, start, end, found, inv.range.is_none());
                    }
                }
            }
            c.ioasid_mut(ioasid)?.pasid_table = Some(pt);
            Ok(report)
        })
    }

    pub(super) fn invalidate_pgtable(
        &self,
        c: &mut Context,
        ioasid: IoasidId,
        view: &ParentView,
        start: u64,
        end: u64,
    ) -> Result<WalkReport, Error> {
        let root = c.ioasid(ioasid)?.pgtable.as_ref().expect("checked").root;
        let mut budget = self.walk_limit.load(Ordering::Relaxed);
        let (found, stats) = pgtable::walk(
            &mut |a| self.read_table(view, a),
            root,
            start,
            end,
            &mut budget,
        );
        let mut report = WalkReport::default();
        report.add(&stats);
        self.board.count_walk(&stats);
        let whole = start == 0 && end >= pgtable::INPUT_END;
        let ranges = known_ranges(c.ioasid(ioasid)?);
        // Only the shadow of the leaves taken out and put in changes.
        let mut added = Shadow::new();
        for (input, l) in &found {
            compose(view, &ranges, *input, l.gpa, l.size, l.prot, &mut added);
        }
        let new_keys: Vec<u64> = found.iter().map(|(k, _)| *k).collect();
        let t = c.ioasid_mut(ioasid)?.pgtable.as_mut().expect("checked");
        let killed = merge_leaves(&mut t.leaves, start, end, found, whole);
        let io = c.ioasid(ioasid)?;
        let removed: Vec<(u64, ShadowEntry)> = if whole {
            io.shadow.iter().map(|(k, v)| (*k, *v)).collect()
        } else {
            killed
                .iter()
                .flat_map(|(k, l)| shadow_in(&io.shadow, *k, l.size))
                .collect()
        };
        match self.apply_delta(c, ioasid, removed, added) {
            Ok(()) => {
                let t = c.ioasid_mut(ioasid)?.pgtable.as_mut().expect("checked");
                t.last_walk = stats;
                t.malformed += stats.malformed;
                t.walks += 1;
                Ok(report)
            }
            Err(e) => {
                let t = c.ioasid_mut(ioasid)?.pgtable.as_mut().expect("checked");
                for k in new_keys {
                    t.leaves.remove(&k);
                }
                t.leaves.extend(killed);
                Err(e)
            }
        }
    }

    /// Read the entries `which` of a PASID table and walk the tables they
    /// name, with one budget.
    pub(super) fn reread_pasids(
        &self,
        view: &ParentView,
        pt: &mut BoundPasidTable,
        which: std::ops::Range<u32>,
        report: &mut WalkReport,
    ) {
        let mut budget = self.walk_limit.load(Ordering::Relaxed);
        let mut chunk: Option<(u64, Option<[u64; pgtable::ENTRIES]>)> = None;
        for p in which {
            let at = pt.table + 8 * u64::from(p);
            let page = at & !(pgtable::TABLE_BYTES - 1);
            if chunk.as_ref().map(|c| c.0) != Some(page) {
                chunk = Some((page, self.read_table(view, page)));
            }
            let entry = chunk
                .as_ref()
                .and_then(|c| c.1.as_ref())
                .map(|e| e[((at - page) / 8) as usize]);
            let state = match entry.map(pgtable::pasid_entry) {
                None => Some(PasidState::Unreadable),
                Some(PasidEntry::NotPresent) => None,
                Some(PasidEntry::Malformed) => Some(PasidState::Bad),
                Some(PasidEntry::Root(root)) => {
                    let (found, stats) = pgtable::walk(
                        &mut |a| self.read_table(view, a),
                        root,
                        0,
                        pgtable::INPUT_END,
                        &mut budget,
                    );
                    report.add(&stats);
                    self.board.count_walk(&stats);
                    Some(PasidState::Walked {
                        leaves: found.into_iter().collect(),
                        root,
                        stats,
                    })
                }
            };
            match state {
                Some(s) => {
                    if matches!(s, PasidState::Bad | PasidState::Unreadable) {
                        report.bad_entries += 1;
                    }
                    pt.pasids.insert(p, s);
                }
                None => {
                    pt.pasids.remove(&p);
                }
            }
        }
    }

    /// Read the 4 KiB table at parent IOVA `gpa`, if the parent maps it
    /// readable.
    pub(super) fn read_table(
        &self,
        view: &ParentView,
        gpa: u64,
    ) -> Option<[u64; pgtable::ENTRIES]> {
        let (&start, p) = view.range(..=gpa).next_back()?;
        let off = gpa - start;
        if !p.prot.read || off.checked_add(pgtable::TABLE_BYTES)? > p.size {
            return None;
        }
        let seg = p
            .segs
            .iter()
            .find(|s| s.offset <= off && off + pgtable::TABLE_BYTES <= s.offset + s.len)?;
        let mut buf = [0u8; pgtable::TABLE_BYTES as usize];
        self.backend
            .read(seg.daemon_vaddr + (off - seg.offset), &mut buf)
            .ok()?;
        Some(pgtable::entries_of(&buf))
    }
}

/// Replace the cached leaves that meet `[start, end)` (all of them when
/// `whole`), or that overlap a new leaf, with `found`.
///
/// Returns the leaves taken out (all of them when `whole`).
pub(super) fn merge_leaves(
    leaves: &mut BTreeMap<u64, Leaf>,
    start: u64,
    end: u64,
    found: Vec<(u64, Leaf)>,
    whole: bool,
) -> Vec<(u64, Leaf)> {
    if whole {
        let old = std::mem::replace(leaves, found.into_iter().collect());
        return old.into_iter().collect();
    }
    let mut kill = Vec::new();
    let mut meets = |leaves: &BTreeMap<u64, Leaf>, s: u64, e: u64| {
        for (&k, l) in leaves.range(..e).rev() {
            if k + l.size <= s {
                break;
            }
            kill.push(k);
        }
    };
    meets(leaves, start, end);
    for (k, l) in &found {
        meets(leaves, *k, k + l.size);
    }
    let mut killed = Vec::new();
    for k in kill {
        if let Some(l) = leaves.remove(&k) {
            killed.push((k, l));
        }
    }
    leaves.extend(found);
    killed
}

pub(super) fn pasid_status(t: &BoundPasidTable) -> PasidTableStatus {
    let mut s = PasidTableStatus {
        table: t.table,
        entries: t.entries,
        ..PasidTableStatus::default()
    };
    for state in t.pasids.values() {
        match state {
            PasidState::Walked { leaves, stats, .. } => {
                s.valid += 1;
                s.leaves += leaves.len() as u64;
                s.malformed += stats.malformed;
                s.truncated |= stats.truncated;
            }
            PasidState::Bad => s.bad_entries += 1,
            PasidState::Unreadable => s.unreadable_entries += 1,
        }
    }
    s
}
