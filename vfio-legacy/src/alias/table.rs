//! The table of the daemon's mappings of client memory: reference counts,
//! the idle cache, the tokens of the aliases handed out, and the indices to
//! find a mapping by its key or by a daemon address.
//!
//! A distinct client buffer costs one mapping here, so the table is kept
//! small per mapping (a daemon serving 100,000 of them): the mappings live
//! in a slab (48 bytes each); the index by key holds only their slab
//! numbers (4 bytes a slot, hashed by the key the mapping holds), the index
//! by address a start address and a slab number each.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;

use hashbrown::HashTable;
use ioasid_engine::backend::{Alias, Segments};
use slab::Slab;

use super::IdleLimits;
use crate::maps::Vma;
use crate::sys::SharedMapping;

/// Identity of a daemon mapping: which pages of which file, and whether
/// writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) dev_major: u32,
    pub(super) dev_minor: u32,
    pub(super) inode: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) write: bool,
}

impl Key {
    pub(super) fn of(vma: &Vma) -> Self {
        Key {
            dev_major: vma.dev_major,
            dev_minor: vma.dev_minor,
            inode: vma.inode,
            offset: vma.offset,
            len: vma.end - vma.start,
            write: vma.write,
        }
    }
}

/// A daemon mapping and its key (its length is the mapping's); idle when
/// `refs` is 0.
#[derive(Debug)]
struct Entry {
    mapping: SharedMapping,
    dev_major: u32,
    dev_minor: u32,
    inode: u64,
    offset: u64,
    refs: u32,
    write: bool,
}

impl Entry {
    fn key(&self) -> Key {
        Key {
            dev_major: self.dev_major,
            dev_minor: self.dev_minor,
            inode: self.inode,
            offset: self.offset,
            len: self.mapping.len() as u64,
            write: self.write,
        }
    }
}

/// A slab number (mappings past 4 billion are not expected).
type Index = u32;

#[derive(Debug, Default)]
pub(super) struct Table {
    /// Every daemon mapping, in use or idle.
    entries: Slab<Entry>,
    /// Their slab numbers, hashed by key.
    by_key: HashTable<Index>,
    hasher: std::hash::RandomState,
    /// Their slab numbers by daemon start address: a released alias names
    /// its mappings by the addresses of its segments, so of each alias only
    /// its token is kept (below), not the list of its mappings.
    by_addr: BTreeMap<usize, Index>,
    /// The tokens of the aliases handed out and not yet released (8 bytes
    /// an alias: a second release of one is ignored, not a second put).
    pub(super) live: HashSet<u64>,
    next_token: u64,
    /// The idle entries, least recently released first.
    idle: Vec<Index>,
    /// Bytes of address space of the idle entries.
    idle_bytes: u64,
    limits: IdleLimits,
    /// Mappings taken out of the table and not yet unmapped: the owner
    /// unmaps them once the table is unlocked (see `TableGuard`).
    pub(super) doomed: Vec<SharedMapping>,
}

impl Table {
    pub(super) fn new(limits: IdleLimits) -> Self {
        Table {
            limits,
            ..Table::default()
        }
    }

    /// The slab number of `key`'s mapping.
    fn find(&self, key: &Key) -> Option<Index> {
        let hash = self.hasher.hash_one(key);
        let entries = &self.entries;
        self.by_key
            .find(hash, |&i| entries[i as usize].key() == *key)
            .copied()
    }

    /// Take a reference on mapping `i` (reviving it if idle); its address.
    fn take(&mut self, i: Index) -> usize {
        let entry = &mut self.entries[i as usize];
        if entry.refs == 0 {
            if let Some(at) = self.idle.iter().position(|&k| k == i) {
                self.idle.remove(at);
                self.idle_bytes -= entry.mapping.len() as u64;
            }
        }
        entry.refs += 1;
        entry.mapping.addr()
    }

    /// Take a reference on `key`'s mapping if there is one (reviving it if
    /// idle); its address.
    pub(super) fn get(&mut self, key: &Key) -> Option<usize> {
        let i = self.find(key)?;
        Some(self.take(i))
    }

    /// Add a new mapping with one reference, under a key no mapping has;
    /// its address.
    pub(super) fn insert(&mut self, key: Key, mapping: SharedMapping) -> usize {
        debug_assert_eq!(key.len, mapping.len() as u64);
        debug_assert!(self.find(&key).is_none());
        let addr = mapping.addr();
        let entry = Entry {
            mapping,
            dev_major: key.dev_major,
            dev_minor: key.dev_minor,
            inode: key.inode,
            offset: key.offset,
            refs: 1,
            write: key.write,
        };
        let i = Index::try_from(self.entries.insert(entry)).expect("fewer than 2^32 mappings");
        let Table {
            entries,
            by_key,
            hasher,
            ..
        } = self;
        by_key.insert_unique(hasher.hash_one(key), i, |&j| {
            hasher.hash_one(entries[j as usize].key())
        });
        self.by_addr.insert(addr, i);
        addr
    }

    /// Forget mapping `i`; the owner unmaps it once the table is unlocked.
    fn remove(&mut self, i: Index) {
        let Some(entry) = self.entries.try_remove(i as usize) else {
            return;
        };
        if let Ok(found) = self
            .by_key
            .find_entry(self.hasher.hash_one(entry.key()), |&j| j == i)
        {
            found.remove();
        }
        self.by_addr.remove(&entry.mapping.addr());
        self.doomed.push(entry.mapping);
    }

    /// The slab number of the mapping containing daemon address `addr`.
    fn index_at(&self, addr: u64) -> Option<Index> {
        let addr = usize::try_from(addr).ok()?;
        let (&start, &i) = self.by_addr.range(..=addr).next_back()?;
        (addr < start + self.entries[i as usize].mapping.len()).then_some(i)
    }

    /// Take a reference on the mapping containing daemon address `addr`;
    /// `false` if there is none.
    pub(super) fn get_at(&mut self, addr: u64) -> bool {
        self.index_at(addr).map(|i| self.take(i)).is_some()
    }

    /// Drop a reference on the mapping containing daemon address `addr`;
    /// `false` if there is none.
    pub(super) fn put_at(&mut self, addr: u64) -> bool {
        self.index_at(addr).map(|i| self.put(i)).is_some()
    }

    /// Drop a reference on `key`'s mapping.
    pub(super) fn put_key(&mut self, key: &Key) {
        if let Some(i) = self.find(key) {
            self.put(i);
        }
    }

    /// Whether `[addr, addr + len)` lies inside one mapping; if so,
    /// whether that one is writable.
    pub(super) fn writable(&self, addr: u64, len: u64) -> Option<bool> {
        let entry = &self.entries[self.index_at(addr)? as usize];
        let end = entry.mapping.addr() as u64 + entry.mapping.len() as u64;
        (addr.checked_add(len)? <= end).then_some(entry.write)
    }

    /// Drop a reference on mapping `i`; the last one makes it idle, which
    /// may evict older idle mappings (or this one) to stay within the
    /// limits.
    fn put(&mut self, i: Index) {
        let entry = &mut self.entries[i as usize];
        entry.refs -= 1;
        if entry.refs == 0 {
            let len = entry.mapping.len() as u64;
            if len > self.limits.bytes || self.limits.entries == 0 {
                // It could never stay: unmap it without displacing others.
                self.remove(i);
                return;
            }
            self.idle.push(i);
            self.idle_bytes += len;
            self.evict();
        }
    }

    /// Unmap least recently released idle mappings until within the limits.
    fn evict(&mut self) {
        while !self.idle.is_empty()
            && (self.idle.len() > self.limits.entries || self.idle_bytes > self.limits.bytes)
        {
            let i = self.idle.remove(0);
            self.idle_bytes -= self.entries[i as usize].mapping.len() as u64;
            self.remove(i);
        }
    }

    /// Unmap every idle mapping.
    pub(super) fn trim(&mut self) {
        for i in std::mem::take(&mut self.idle) {
            self.remove(i);
        }
        self.idle_bytes = 0;
    }

    /// Forget every mapping and every alias (outstanding tokens become
    /// unknown); the mappings are unmapped once the table is unlocked.
    pub(super) fn clear(&mut self) {
        self.live.clear();
        self.idle.clear();
        self.idle_bytes = 0;
        self.by_addr.clear();
        self.by_key.clear();
        let all = std::mem::take(&mut self.entries);
        self.doomed.extend(all.into_iter().map(|(_, e)| e.mapping));
    }

    /// A new alias of these segments (each holding one reference).
    pub(super) fn hand_out(&mut self, segments: impl Into<Segments>) -> Alias {
        let token = self.next_token;
        self.next_token += 1;
        self.live.insert(token);
        Alias {
            token,
            segments: segments.into(),
        }
    }

    /// How many mappings exist, in use or idle.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// How many are idle, and the bytes of address space they cover.
    pub(super) fn idle(&self) -> (usize, u64) {
        (self.idle.len(), self.idle_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    const PAGE: u64 = 4096;

    /// A mapping of `pages` pages of a new memfd (no root needed), and its
    /// key.
    fn mapping(pages: u64, inode: u64) -> (Key, SharedMapping) {
        let fd =
            nix::sys::memfd::memfd_create("table-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let file = File::from(fd);
        file.set_len(pages * PAGE).unwrap();
        let m = SharedMapping::new(file.as_fd(), (pages * PAGE) as usize, true, true, 0).unwrap();
        let key = Key {
            dev_major: 0,
            dev_minor: 1,
            inode,
            offset: 0,
            len: pages * PAGE,
            write: true,
        };
        (key, m)
    }

    fn table(entries: usize, bytes: u64) -> Table {
        Table::new(IdleLimits { entries, bytes })
    }

    #[test]
    fn a_mapping_is_found_by_key_and_by_any_address_inside_it() {
        let mut t = table(64, u64::MAX);
        let (k1, m1) = mapping(2, 1);
        let (k2, m2) = mapping(1, 2);
        let a1 = t.insert(k1, m1) as u64;
        let a2 = t.insert(k2, m2) as u64;
        assert_eq!(t.get(&k1), Some(a1 as usize));
        let other = Key { write: false, ..k1 };
        assert_eq!(t.get(&other), None, "the access is part of the key");
        assert_eq!(t.writable(a1, 2 * PAGE), Some(true));
        assert_eq!(t.writable(a1 + PAGE, PAGE), Some(true));
        assert_eq!(t.writable(a1 + PAGE, 2 * PAGE), None, "runs past it");
        assert_eq!(t.writable(a2, PAGE), Some(true));
        assert_eq!(t.writable(a1.min(a2) - 1, 1), None, "below both");
        assert_eq!(t.writable(u64::MAX, 1), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn the_last_put_makes_a_mapping_idle_and_a_get_revives_it() {
        let mut t = table(64, u64::MAX);
        let (k, m) = mapping(1, 1);
        let a = t.insert(k, m) as u64;
        assert!(t.get_at(a + 100));
        assert!(t.put_at(a));
        assert_eq!(t.idle(), (0, 0), "one reference left");
        t.put_key(&k);
        assert_eq!(t.idle(), (1, PAGE));
        assert_eq!(t.get(&k), Some(a as usize));
        assert_eq!(t.idle(), (0, 0));
        assert!(!t.put_at(a + PAGE), "past the mapping");
        t.put_key(&k);
        t.trim();
        assert_eq!((t.len(), t.idle()), (0, (0, 0)));
        assert_eq!(t.doomed.len(), 1);
        assert_eq!(t.get(&k), None);
        assert!(!t.put_at(a));
    }

    #[test]
    fn eviction_goes_oldest_first_and_frees_the_key_and_the_address() {
        let mut t = table(2, u64::MAX);
        let made: Vec<_> = (0..3).map(|i| mapping(1, i)).collect();
        let keys: Vec<Key> = made.iter().map(|(k, _)| *k).collect();
        let addrs: Vec<u64> = made
            .into_iter()
            .map(|(k, m)| t.insert(k, m) as u64)
            .collect();
        for k in &keys {
            t.put_key(k);
        }
        assert_eq!(t.idle(), (2, 2 * PAGE));
        assert_eq!(t.doomed.len(), 1);
        assert_eq!(t.doomed[0].addr() as u64, addrs[0]);
        assert_eq!(t.get(&keys[0]), None);
        assert_eq!(t.writable(addrs[0], PAGE), None);
        // The slab number of the evicted one is reused; the others are still
        // found.
        let (k3, m3) = mapping(1, 3);
        let a3 = t.insert(k3, m3) as u64;
        assert_eq!(t.get(&k3), Some(a3 as usize));
        assert_eq!(t.get(&keys[1]), Some(addrs[1] as usize));
        assert_eq!(t.get(&keys[2]), Some(addrs[2] as usize));
        assert_eq!(t.writable(a3, PAGE), Some(true));
    }

    #[test]
    fn a_mapping_larger_than_the_idle_bytes_goes_at_once() {
        let mut t = table(64, 2 * PAGE);
        let (small, m) = mapping(1, 1);
        t.insert(small, m);
        t.put_key(&small);
        let (large, m) = mapping(3, 2);
        t.insert(large, m);
        t.put_key(&large);
        assert_eq!(t.idle(), (1, PAGE), "the small one stays");
        assert_eq!((t.len(), t.doomed.len()), (1, 1));
    }

    #[test]
    fn clear_forgets_everything() {
        let mut t = table(64, u64::MAX);
        let (k, m) = mapping(1, 1);
        let a = t.insert(k, m) as u64;
        let alias = t.hand_out(vec![]);
        assert!(t.live.contains(&alias.token));
        t.clear();
        assert_eq!((t.len(), t.idle(), t.doomed.len()), (0, (0, 0), 1));
        assert!(t.live.is_empty());
        assert_eq!((t.get(&k), t.writable(a, 1)), (None, None));
    }

    /// The per-mapping entry stays small (a daemon may hold 100,000).
    #[test]
    fn an_entry_takes_48_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 48);
    }
}
