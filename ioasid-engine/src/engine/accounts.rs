//! What each client process holds, across every ioasid file and device it
//! uses: the shared memory the daemon pins for it (charged against its
//! `RLIMIT_MEMLOCK` together with what the kernel charges it, `VmLck`), and
//! its budgets (open files, IOASIDs, mappings, aliases), so that one client
//! at its budget gets the errno itself and the others never notice.

use std::collections::{BTreeMap, HashMap};

use nix::errno::Errno;
use smallvec::SmallVec;

use crate::backend::{Pid, Segment};
use crate::error::Error;

/// How much one client process may hold. See [`crate::Engine::set_budgets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Open `/dev/ioasid` files (`EMFILE` past it).
    pub files: usize,
    /// IOASIDs over all its files (`ENOSPC`).
    pub ioasids: usize,
    /// Mappings over all its IOASIDs (`ENOSPC`, as type1's
    /// `dma_entry_limit`).
    pub mappings: usize,
    /// Pieces of its memory the daemon maps into its own address space
    /// (each costs the daemon a memory area of its `vm.max_map_count`):
    /// `ENOMEM`.
    pub aliases: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            files: 64,
            ioasids: 1024,
            mappings: 65535,
            aliases: 4096,
        }
    }
}

/// Byte ranges held any number of times, measured once: the pieces of
/// daemon address space (each an alias of client pages) a process has
/// pinned, so a page mapped twice counts once.
///
/// Touching pieces with the same number of holders are one piece: the
/// daemon's aliases of distinct buffers tend to lie next to each other in
/// its address space, so 100,000 of them are a few pieces here, not
/// 100,000 (50 bytes each in the tree).
#[derive(Debug, Default)]
pub(super) struct Coverage {
    /// Disjoint pieces: start -> (end, holders); two touching pieces
    /// always have different holders.
    pieces: BTreeMap<u64, (u64, u32)>,
    bytes: u64,
}

impl Coverage {
    /// Split the piece containing `at` (if any) so that a piece starts at
    /// `at`.
    fn split(&mut self, at: u64) {
        if let Some((&s, &(e, n))) = self.pieces.range(..at).next_back() {
            if e > at {
                self.pieces.insert(s, (at, n));
                self.pieces.insert(at, (e, n));
            }
        }
    }

    /// Merge the touching pieces with equal holders from the piece
    /// before `start` to the piece starting at `end`.
    fn coalesce(&mut self, start: u64, end: u64) {
        let from = self
            .pieces
            .range(..start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        let starts: SmallVec<[u64; 4]> = self.pieces.range(from..=end).map(|(&s, _)| s).collect();
        let mut prev: Option<(u64, u64, u32)> = None;
        for s in starts {
            let (e, n) = self.pieces[&s];
            match prev {
                Some((p, pe, pn)) if pe == s && pn == n => {
                    self.pieces.remove(&s);
                    self.pieces.insert(p, (e, n));
                    prev = Some((p, e, n));
                }
                _ => prev = Some((s, e, n)),
            }
        }
    }

    /// Bytes of `[start, end)` not held yet.
    pub(super) fn new_bytes(&self, start: u64, end: u64) -> u64 {
        let mut held = 0;
        if let Some((_, &(e, _))) = self.pieces.range(..start).next_back() {
            held += e.min(end).saturating_sub(start);
        }
        for (&s, &(e, _)) in self.pieces.range(start..end) {
            held += e.min(end) - s;
        }
        (end - start) - held
    }

    /// Hold `[start, end)` once more; returns the bytes newly covered.
    pub(super) fn add(&mut self, start: u64, end: u64) -> u64 {
        self.split(start);
        self.split(end);
        let mut at = start;
        let mut gaps = Vec::new();
        for (&s, p) in self.pieces.range_mut(start..end) {
            if s > at {
                gaps.push((at, s));
            }
            p.1 += 1;
            at = p.0;
        }
        if at < end {
            gaps.push((at, end));
        }
        let mut added = 0;
        for (s, e) in gaps {
            self.pieces.insert(s, (e, 1));
            added += e - s;
        }
        self.coalesce(start, end);
        self.bytes += added;
        added
    }

    /// Let go of `[start, end)` once; returns the bytes no longer covered.
    pub(super) fn remove(&mut self, start: u64, end: u64) -> u64 {
        self.split(start);
        self.split(end);
        let mut freed = Vec::new();
        for (&s, p) in self.pieces.range_mut(start..end) {
            p.1 = p.1.saturating_sub(1);
            if p.1 == 0 {
                freed.push((s, p.0));
            }
        }
        let mut gone = 0;
        for (s, e) in freed {
            self.pieces.remove(&s);
            gone += e - s;
        }
        self.coalesce(start, end);
        self.bytes -= gone;
        gone
    }

    /// Bytes held at least once.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// What one client process holds.
#[derive(Debug, Default)]
pub(super) struct Account {
    pub(super) pinned: Coverage,
    pub(super) files: usize,
    pub(super) ioasids: usize,
    pub(super) mappings: usize,
    pub(super) aliases: usize,
}

impl Account {
    fn is_empty(&self) -> bool {
        self.pinned.bytes() == 0
            && self.files == 0
            && self.ioasids == 0
            && self.mappings == 0
            && self.aliases == 0
    }
}

/// Which budget a request would exceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Item {
    Files,
    Ioasids,
    Mappings,
    Aliases,
}

/// Every client process's account.
#[derive(Debug, Default)]
pub(super) struct Accounts {
    by_process: HashMap<Pid, Account>,
    pub(super) budgets: Budgets,
}

impl Accounts {
    pub(super) fn get(&mut self, pid: Pid) -> &mut Account {
        self.by_process.entry(pid).or_default()
    }

    /// Bytes of shared memory the daemon pins for `pid`.
    pub(super) fn pinned(&self, pid: Pid) -> u64 {
        self.by_process.get(&pid).map_or(0, |a| a.pinned.bytes())
    }

    /// Forget processes that hold nothing any more.
    pub(super) fn tidy(&mut self, pid: Pid) {
        if self.by_process.get(&pid).is_some_and(Account::is_empty) {
            self.by_process.remove(&pid);
        }
    }

    /// Take `n` of `item` for `pid`, or refuse with that budget's errno
    /// and a message saying what to do (the front end logs it, within the
    /// client's log budget).
    pub(super) fn take(&mut self, pid: Pid, item: Item, n: usize) -> Result<(), Error> {
        let budgets = self.budgets;
        let a = self.get(pid);
        let (have, max, errno, what, option) = match item {
            Item::Files => (
                a.files,
                budgets.files,
                Errno::EMFILE,
                "open ioasid files",
                "--max-client-files",
            ),
            Item::Ioasids => (
                a.ioasids,
                budgets.ioasids,
                Errno::ENOSPC,
                "IOASIDs",
                "--max-client-ioasids",
            ),
            Item::Mappings => (
                a.mappings,
                budgets.mappings,
                Errno::ENOSPC,
                "DMA mappings",
                "--max-client-mappings",
            ),
            Item::Aliases => (
                a.aliases,
                budgets.aliases,
                Errno::ENOMEM,
                "aliased memory areas",
                "--max-client-aliases",
            ),
        };
        if have.saturating_add(n) <= max {
            match item {
                Item::Files => a.files += n,
                Item::Ioasids => a.ioasids += n,
                Item::Mappings => a.mappings += n,
                Item::Aliases => a.aliases += n,
            }
            return Ok(());
        }
        Err(Error::new(
            errno,
            format!(
                "process {pid} is at its budget of {max} {what} (it holds {have}); free some, or \
                 start the daemon with a larger {option}{}",
                if item == Item::Aliases {
                    " (or register the memory once, or map larger buffers: each area of memory \
                     mapped costs the daemon one of its vm.max_map_count)"
                } else {
                    ""
                }
            ),
        ))
    }

    /// Give back `n` of `item` taken by `pid`.
    pub(super) fn give(&mut self, pid: Pid, item: Item, n: usize) {
        let a = self.get(pid);
        let c = match item {
            Item::Files => &mut a.files,
            Item::Ioasids => &mut a.ioasids,
            Item::Mappings => &mut a.mappings,
            Item::Aliases => &mut a.aliases,
        };
        *c = c.saturating_sub(n);
        self.tidy(pid);
    }

    /// Charge `segments` to `pid`'s pinned memory (each byte once however
    /// often it is held).
    pub(super) fn charge(&mut self, pid: Pid, segments: &[Segment]) {
        let a = self.get(pid);
        for s in segments {
            a.pinned.add(s.daemon_vaddr, s.daemon_vaddr + s.len);
        }
    }

    /// Undo [`Accounts::charge`].
    pub(super) fn uncharge(&mut self, pid: Pid, segments: &[Segment]) {
        let a = self.get(pid);
        for s in segments {
            a.pinned.remove(s.daemon_vaddr, s.daemon_vaddr + s.len);
        }
        self.tidy(pid);
    }

    /// Bytes of `segments` that `pid` does not hold yet.
    pub(super) fn new_bytes(&self, pid: Pid, segments: &[Segment]) -> u64 {
        let Some(a) = self.by_process.get(&pid) else {
            return segments.iter().map(|s| s.len).sum();
        };
        // Segments of one alias never overlap each other.
        segments
            .iter()
            .map(|s| a.pinned.new_bytes(s.daemon_vaddr, s.daemon_vaddr + s.len))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_counts_each_byte_once() {
        let mut c = Coverage::default();
        assert_eq!(c.add(0x1000, 0x3000), 0x2000);
        assert_eq!(c.new_bytes(0x2000, 0x5000), 0x2000);
        assert_eq!(c.add(0x2000, 0x5000), 0x2000);
        assert_eq!(c.bytes(), 0x4000);
        // The same range again adds nothing, and must be let go twice.
        assert_eq!(c.add(0x1000, 0x3000), 0);
        assert_eq!(c.remove(0x1000, 0x3000), 0);
        assert_eq!(c.bytes(), 0x4000);
        assert_eq!(c.remove(0x1000, 0x3000), 0x1000);
        assert_eq!(c.bytes(), 0x3000);
        assert_eq!(c.remove(0x2000, 0x5000), 0x3000);
        assert_eq!(c.bytes(), 0);
        assert!(c.pieces.is_empty());
    }

    /// Every piece as (start, end, holders).
    fn pieces(c: &Coverage) -> Vec<(u64, u64, u32)> {
        c.pieces.iter().map(|(&s, &(e, n))| (s, e, n)).collect()
    }

    #[test]
    fn touching_ranges_with_equal_holders_are_one_piece() {
        let mut c = Coverage::default();
        // Aliases placed top-down, each below the last, as mmap does.
        for i in (0..1000u64).rev() {
            assert_eq!(c.add(i * 0x1000, (i + 1) * 0x1000), 0x1000);
        }
        assert_eq!(pieces(&c), [(0, 1000 * 0x1000, 1)]);
        // Held twice in the middle: three pieces, and back to one.
        assert_eq!(c.add(0x5000, 0x7000), 0);
        assert_eq!(
            pieces(&c),
            [
                (0, 0x5000, 1),
                (0x5000, 0x7000, 2),
                (0x7000, 1000 * 0x1000, 1)
            ]
        );
        assert_eq!(c.remove(0x5000, 0x7000), 0);
        assert_eq!(pieces(&c), [(0, 1000 * 0x1000, 1)]);
        // A hole splits it; filling the hole joins it again.
        assert_eq!(c.remove(0x3000, 0x4000), 0x1000);
        assert_eq!(pieces(&c), [(0, 0x3000, 1), (0x4000, 1000 * 0x1000, 1)]);
        assert_eq!(c.new_bytes(0x2000, 0x5000), 0x1000);
        assert_eq!(c.add(0x3000, 0x4000), 0x1000);
        assert_eq!(pieces(&c), [(0, 1000 * 0x1000, 1)]);
        assert_eq!(c.bytes(), 1000 * 0x1000);
        // Let go piece by piece, in another order: all gone.
        for i in 0..1000u64 {
            assert_eq!(c.remove(i * 0x1000, (i + 1) * 0x1000), 0x1000);
        }
        assert_eq!(c.bytes(), 0);
        assert!(c.pieces.is_empty());
    }

    #[test]
    fn budgets_refuse_with_their_errno_and_give_back() {
        let mut a = Accounts {
            budgets: Budgets {
                files: 1,
                ioasids: 2,
                mappings: 3,
                aliases: 1,
            },
            ..Accounts::default()
        };
        a.take(7, Item::Files, 1).unwrap();
        assert_eq!(a.take(7, Item::Files, 1).unwrap_err().errno, Errno::EMFILE);
        // Another process is not affected.
        a.take(8, Item::Files, 1).unwrap();
        a.take(7, Item::Ioasids, 2).unwrap();
        assert_eq!(
            a.take(7, Item::Ioasids, 1).unwrap_err().errno,
            Errno::ENOSPC
        );
        a.take(7, Item::Aliases, 1).unwrap();
        let e = a.take(7, Item::Aliases, 1).unwrap_err();
        assert_eq!(e.errno, Errno::ENOMEM);
        assert!(e.message.contains("--max-client-aliases"), "{}", e.message);
        a.give(7, Item::Aliases, 1);
        a.take(7, Item::Aliases, 1).unwrap();
        for item in [Item::Files, Item::Ioasids, Item::Aliases] {
            a.give(7, item, 2);
        }
        a.give(8, Item::Files, 1);
        assert!(a.by_process.is_empty(), "empty accounts are forgotten");
    }
}
