//! Walking a user's `IOASID_PGTABLE_X86_64_4LVL` page table in software.
//!
//! The walker knows nothing of IOASIDs: it is given the root table's
//! address (an IOVA of the parent), an input range to walk, a budget, and a
//! function that reads one 4 KiB table by its address (`None` when the
//! table is not mapped readable in the parent). It returns the leaves it
//! found and what it had to skip.
//!
//! The format (see `uapi/include/linux/ioasid.h`): four levels of 512
//! little-endian 8-byte entries, indexed by input bits 47..39, 38..30,
//! 29..21, 20..12. Bit 0 present (grants read), bit 1 writable (granted
//! when set at every level), bit 7 PS (a leaf at level 3: 1 GiB, at level
//! 2: 2 MiB), bits 12..51 the address. Every other bit is ignored.
//!
//! What the walker treats as malformed (the entry's range stays
//! untranslated and the entry is counted, nothing else happens):
//! - a table that cannot be read (not mapped readable in the parent);
//! - PS set in a level-4 entry (reserved there, as on x86);
//! - an entry pointing to its own table or to an ancestor (a loop);
//! - the budget running out: the rest of the walk is skipped and counted
//!   once.
//!
//! Non-present entries are the normal way to leave a range unmapped and
//! are not counted.

use crate::backend::Prot;

/// Entry bit 0: present (also grants read).
pub const PTE_PRESENT: u64 = 1 << 0;
/// Entry bit 1: writable.
pub const PTE_WRITE: u64 = 1 << 1;
/// Entry bit 7: a leaf at level 3 (1 GiB) or level 2 (2 MiB).
pub const PTE_PS: u64 = 1 << 7;
/// Bits 12..51: the address of the next table or of the page.
pub const PTE_ADDR: u64 = ((1 << 52) - 1) & !0xfff;
/// Input addresses are 48 bits wide.
pub const ADDR_WIDTH: u32 = 48;
/// End (exclusive) of the input address space.
pub const INPUT_END: u64 = 1 << ADDR_WIDTH;
/// Page sizes the format maps: 4 KiB, 2 MiB, 1 GiB.
pub const PGSIZES: u64 = (1 << 12) | (1 << 21) | (1 << 30);
/// Entries per table.
pub const ENTRIES: usize = 512;
/// Bytes per table.
pub const TABLE_BYTES: u64 = 4096;

/// Default budget of one walk (see [`walk`]): about a million entries.
pub const DEFAULT_WALK_LIMIT: u64 = 1 << 20;
/// What reading one table costs from the budget, in entries: reading is
/// the expensive part of a hostile table made of many near-empty tables.
pub const TABLE_READ_COST: u64 = 16;

/// One translation found in a table: an input range (keyed by its start
/// elsewhere) to a range of the parent's IOVA space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Start of the output range (a parent IOVA).
    pub gpa: u64,
    /// Bytes: 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    /// Access granted by the table.
    pub prot: Prot,
}

/// What one walk found besides its leaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Leaves found.
    pub leaves: u64,
    /// Entries skipped as malformed (see the module documentation),
    /// including one for a walk cut short by its budget.
    pub malformed: u64,
    /// The budget ran out before the walk was complete.
    pub truncated: bool,
    /// Tables read.
    pub tables: u64,
}

impl WalkStats {
    /// Add another walk's counts to these.
    pub fn add(&mut self, other: &WalkStats) {
        self.leaves += other.leaves;
        self.malformed += other.malformed;
        self.truncated |= other.truncated;
        self.tables += other.tables;
    }
}

struct Frame {
    level: u32,
    table: u64,
    base: u64,
    write: bool,
    /// Addresses of this table and its ancestors.
    path: [u64; 4],
    depth: usize,
}

/// Bytes an entry of a table at `level` (1..=4) covers.
fn span(level: u32) -> u64 {
    1u64 << (12 + 9 * (level - 1))
}

/// Walk the table rooted at `root` over the input range `[start, end)`
/// (`end <= 2^48`), visiting only entries whose range meets it, and
/// return the leaves (input address, leaf), in no particular order.
///
/// `budget` is shared by the caller's walks: each table read costs
/// [`TABLE_READ_COST`] and each present entry 1; when it runs out the walk
/// stops, and what was found so far is returned with `truncated` set.
pub fn walk(
    read: &mut dyn FnMut(u64) -> Option<[u64; ENTRIES]>,
    root: u64,
    start: u64,
    end: u64,
    budget: &mut u64,
) -> (Vec<(u64, Leaf)>, WalkStats) {
    let mut leaves = Vec::new();
    let mut stats = WalkStats::default();
    let end = end.min(INPUT_END);
    if start >= end {
        return (leaves, stats);
    }
    let mut stack = vec![Frame {
        level: 4,
        table: root,
        base: 0,
        write: true,
        path: [root, 0, 0, 0],
        depth: 1,
    }];
    'walk: while let Some(f) = stack.pop() {
        if *budget < TABLE_READ_COST {
            stats.truncated = true;
            break;
        }
        *budget -= TABLE_READ_COST;
        stats.tables += 1;
        let Some(entries) = read(f.table) else {
            stats.malformed += 1;
            continue;
        };
        let span = span(f.level);
        // Entries whose range [base + i*span, base + (i+1)*span) meets
        // [start, end); frames are only pushed when they meet it.
        let first = start.saturating_sub(f.base) / span;
        let last = (end - f.base).div_ceil(span).min(ENTRIES as u64);
        for i in first..last {
            let e = entries[i as usize];
            if e & PTE_PRESENT == 0 {
                continue;
            }
            if *budget == 0 {
                stats.truncated = true;
                break 'walk;
            }
            *budget -= 1;
            let input = f.base + i * span;
            let write = f.write && e & PTE_WRITE != 0;
            let leaf = f.level == 1 || (f.level <= 3 && e & PTE_PS != 0);
            if leaf {
                leaves.push((
                    input,
                    Leaf {
                        gpa: e & PTE_ADDR & !(span - 1),
                        size: span,
                        prot: Prot { read: true, write },
                    },
                ));
                continue;
            }
            if f.level == 4 && e & PTE_PS != 0 {
                stats.malformed += 1;
                continue;
            }
            let next = e & PTE_ADDR;
            if f.path[..f.depth].contains(&next) {
                stats.malformed += 1;
                continue;
            }
            let mut path = f.path;
            path[f.depth] = next;
            stack.push(Frame {
                level: f.level - 1,
                table: next,
                base: input,
                write,
                path,
                depth: f.depth + 1,
            });
        }
    }
    if stats.truncated {
        stats.malformed += 1;
    }
    stats.leaves = leaves.len() as u64;
    (leaves, stats)
}

/// Decode a 4 KiB table.
pub fn entries_of(bytes: &[u8; TABLE_BYTES as usize]) -> [u64; ENTRIES] {
    let mut out = [0u64; ENTRIES];
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(b);
    }
    out
}

/// `IOASID_PASID_TABLE_FLAT_X86_64` entry bit 0: present.
pub const PASID_PRESENT: u64 = 1;

/// What a PASID-table entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidEntry {
    /// Bit 0 clear: no table for this PASID.
    NotPresent,
    /// Bits other than 0 and 12..51 set: treated as not present, and
    /// counted.
    Malformed,
    /// The root of this PASID's 4-level table (a parent IOVA).
    Root(u64),
}

/// Decode one PASID-table entry.
pub fn pasid_entry(e: u64) -> PasidEntry {
    if e & !(PTE_ADDR | PASID_PRESENT) != 0 {
        PasidEntry::Malformed
    } else if e & PASID_PRESENT == 0 {
        PasidEntry::NotPresent
    } else {
        PasidEntry::Root(e & PTE_ADDR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn reader(
        tables: &HashMap<u64, [u64; ENTRIES]>,
    ) -> impl FnMut(u64) -> Option<[u64; ENTRIES]> + '_ {
        |a| tables.get(&a).copied()
    }

    #[test]
    fn leaves_of_every_size_and_write_needs_every_level() {
        let mut t = HashMap::new();
        let (l4, l3, l2, l1) = (0x1000, 0x2000, 0x3000, 0x4000);
        let mut e4 = [0; ENTRIES];
        e4[0] = l3 | PTE_PRESENT | PTE_WRITE;
        let mut e3 = [0; ENTRIES];
        e3[0] = l2 | PTE_PRESENT | PTE_WRITE;
        e3[1] = 0x4000_0000 | PTE_PRESENT | PTE_PS | PTE_WRITE; // 1 GiB at 1 GiB
        let mut e2 = [0; ENTRIES];
        e2[0] = l1 | PTE_PRESENT; // read-only below
        e2[1] = 0x20_0000 | PTE_PRESENT | PTE_PS | PTE_WRITE | 0x1000; // 2 MiB, low bits ignored
        let mut e1 = [0; ENTRIES];
        e1[3] = 0x9000 | PTE_PRESENT | PTE_WRITE;
        t.insert(l4, e4);
        t.insert(l3, e3);
        t.insert(l2, e2);
        t.insert(l1, e1);
        let mut budget = DEFAULT_WALK_LIMIT;
        let (mut leaves, stats) = walk(&mut reader(&t), l4, 0, INPUT_END, &mut budget);
        leaves.sort_by_key(|l| l.0);
        let rw = Prot {
            read: true,
            write: true,
        };
        let ro = Prot {
            read: true,
            write: false,
        };
        assert_eq!(
            leaves,
            vec![
                (
                    0x3000,
                    Leaf {
                        gpa: 0x9000,
                        size: 0x1000,
                        prot: ro
                    }
                ),
                (
                    0x20_0000,
                    Leaf {
                        gpa: 0x20_0000,
                        size: 0x20_0000,
                        prot: rw
                    }
                ),
                (
                    0x4000_0000,
                    Leaf {
                        gpa: 0x4000_0000,
                        size: 0x4000_0000,
                        prot: rw
                    }
                ),
            ]
        );
        assert_eq!(stats.malformed, 0);
        assert_eq!(stats.tables, 4);
        // A range walk reads only what it needs.
        let (leaves, stats) = walk(&mut reader(&t), l4, 0x4000_0000, 0x4000_1000, &mut budget);
        assert_eq!(leaves.len(), 1);
        assert_eq!(stats.tables, 2);
    }

    #[test]
    fn loops_reserved_bits_and_unreadable_tables_are_counted() {
        let mut t = HashMap::new();
        let (l4, l3) = (0x1000, 0x2000);
        let mut e4 = [0; ENTRIES];
        e4[0] = l4 | PTE_PRESENT; // itself
        e4[1] = l3 | PTE_PRESENT | PTE_PS; // PS at level 4
        e4[2] = l3 | PTE_PRESENT;
        e4[3] = 0x7000 | PTE_PRESENT; // unreadable
        let mut e3 = [0; ENTRIES];
        e3[0] = l4 | PTE_PRESENT; // an ancestor
        e3[1] = l3 | PTE_PRESENT; // itself
        t.insert(l4, e4);
        t.insert(l3, e3);
        let mut budget = DEFAULT_WALK_LIMIT;
        let (leaves, stats) = walk(&mut reader(&t), l4, 0, INPUT_END, &mut budget);
        assert!(leaves.is_empty());
        assert_eq!(stats.malformed, 5);
        assert!(!stats.truncated);
    }

    #[test]
    fn the_budget_bounds_a_fan_out() {
        // Every entry of every level points to the next table: 512^3 leaves.
        let mut t = HashMap::new();
        for (level, addr) in [(4u64, 0x1000u64), (3, 0x2000), (2, 0x3000)] {
            t.insert(addr, [(addr + 0x1000) | PTE_PRESENT; ENTRIES]);
            let _ = level;
        }
        t.insert(0x4000, [0x5000 | PTE_PRESENT; ENTRIES]);
        let mut budget = 10_000;
        let (leaves, stats) = walk(&mut reader(&t), 0x1000, 0, INPUT_END, &mut budget);
        assert!(stats.truncated);
        assert_eq!(stats.malformed, 1);
        assert!(leaves.len() < 10_000);
        assert_eq!(budget, 0);
    }

    #[test]
    fn pasid_entries() {
        assert_eq!(pasid_entry(0), PasidEntry::NotPresent);
        assert_eq!(pasid_entry(0x5000), PasidEntry::NotPresent);
        assert_eq!(pasid_entry(0x5001), PasidEntry::Root(0x5000));
        assert_eq!(pasid_entry(0x5003), PasidEntry::Malformed);
        assert_eq!(pasid_entry(1 << 63 | 1), PasidEntry::Malformed);
    }
}
