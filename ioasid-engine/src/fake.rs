//! An in-memory [`Backend`] for unit tests.
//!
//! Each IOMMU group has a domain that enforces VFIO type1v2's rules
//! (alignment to its smallest page size, `EEXIST` on overlap, `EINVAL` for an
//! unmap that would split a mapping, 0 bytes for an empty range, an entry
//! limit answering `ENOSPC`, permitted IOVA ranges). Client memory is
//! aliasable only where a test declared it shared; the daemon address of
//! client address `v` is always `FAKE_DAEMON_BASE + v`, so tests can predict
//! what the domains hold. Every call is logged, live aliases are counted,
//! and the next map, unmap or unmap-all can be made to fail (an undo too).
//!
//! Client memory holds real bytes (zero until written with
//! [`FakeBackend::write_memory`]), which [`Backend::read`] returns when
//! the address lies inside a live alias, as the real backend's does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;

use std::os::fd::BorrowedFd;

use crate::backend::{
    slice_alias, Alias, Backend, ClientEntry, ClientThread, DmaEntry, DomainInfo, Error, GroupId,
    MmId, Pid, ProcessMemory, Resolved, Segment, Segments,
};
use crate::engine::{Client, ClientWork};

/// A domain entry made by a client's own thread records its client address
/// with this bit set in place of a daemon address.
pub const FAKE_CLIENT_TAG: u64 = 1 << 62;

/// The daemon address of client address `v` is `FAKE_DAEMON_BASE + v`.
pub const FAKE_DAEMON_BASE: u64 = 0x7000_0000_0000;

/// Default page sizes of a fake domain: 4 KiB, 2 MiB and 1 GiB.
pub const FAKE_PGSIZES: u64 = (1 << 12) | (1 << 21) | (1 << 30);

/// Default entry limit of a fake domain (type1's `dma_entry_limit` default).
pub const FAKE_ENTRY_LIMIT: usize = 65535;

/// Default permitted IOVA ranges: 48 bits, minus the x86 MSI window.
pub const FAKE_IOVA_RANGES: [(u64, u64); 2] = [(0, 0xfedf_ffff), (0xfef0_0000, (1u64 << 48) - 1)];

/// One call the fake received, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeCall {
    /// `alias(pid, vaddr, size)`, successful or not.
    Alias { pid: Pid, vaddr: u64, size: u64 },
    /// `release_alias` of the alias with this token.
    Release { token: u64 },
    /// `map_as_client(group, thread, ...)`, successful or not.
    MapAsClient {
        group: GroupId,
        tid: Pid,
        iova: u64,
        client_vaddr: u64,
        size: u64,
    },
    /// `map(group, iova, daemon_vaddr, size, _)`, successful or not.
    Map {
        group: GroupId,
        iova: u64,
        daemon_vaddr: u64,
        size: u64,
    },
    /// `unmap(group, iova, size)`, successful or not.
    Unmap {
        group: GroupId,
        iova: u64,
        size: u64,
    },
    /// `unmap_all(group)`, successful or not.
    UnmapAll { group: GroupId },
    /// `read(daemon_vaddr, len)`, successful or not.
    Read { daemon_vaddr: u64, len: usize },
    /// `alias_file` of the file with inode `inode`, successful or not.
    AliasFile { inode: u64, offset: u64, size: u64 },
    /// `share_alias(token, offset, size)`, successful or not.
    Share { token: u64, offset: u64, size: u64 },
}

/// The daemon address of byte `o` of a fake file with inode `i` is
/// `FAKE_FILE_BASE + (i << 32) + o`.
pub const FAKE_FILE_BASE: u64 = 0x6000_0000_0000;

/// One entry of a fake domain.
pub type FakeEntry = DmaEntry;

#[derive(Clone, Debug)]
struct FakeDomain {
    pgsize_bitmap: u64,
    iova_ranges: Vec<(u64, u64)>,
    entry_limit: usize,
    entries: BTreeMap<u64, FakeEntry>,
}

impl Default for FakeDomain {
    fn default() -> Self {
        FakeDomain {
            pgsize_bitmap: FAKE_PGSIZES,
            iova_ranges: FAKE_IOVA_RANGES.to_vec(),
            entry_limit: FAKE_ENTRY_LIMIT,
            entries: BTreeMap::new(),
        }
    }
}

#[derive(Default)]
struct FakeState {
    domains: HashMap<GroupId, FakeDomain>,
    shared: HashMap<Pid, Vec<(u64, u64)>>,
    private: HashMap<Pid, Vec<(u64, u64)>>,
    memlock: HashMap<Pid, u64>,
    /// `VmLck` by process: what a test set plus what client maps charged.
    locked: HashMap<Pid, u64>,
    /// Who each client-made entry is charged to: (group, iova) -> (pid, bytes).
    charged: HashMap<(GroupId, u64), (Pid, u64)>,
    live: HashMap<u64, Alias>,
    next_token: u64,
    calls: Vec<FakeCall>,
    /// Maps to let through before failing one with this errno.
    map_failure: Option<(usize, Errno)>,
    unmap_all_failure: Option<Errno>,
    /// Unmaps to let through before failing one with this errno.
    unmap_failure: Option<(usize, Errno)>,
    /// Client memory by 4 KiB page of daemon address.
    pages: HashMap<u64, Box<[u8; 4096]>>,
    /// How many times `trim` was called.
    trims: usize,
    /// Run inside the next `map_as_client`, before it maps.
    during_client_map: Option<Box<dyn FnOnce() + Send>>,
    /// Memory files (by inode) and their sizes.
    files: HashMap<u64, u64>,
}

/// The fake backend. Cheap to create; share it as `Arc<FakeBackend>`.
#[derive(Default)]
pub struct FakeBackend {
    state: Mutex<FakeState>,
}

impl FakeBackend {
    /// A fake where no memory is shared, memlock is unlimited and every
    /// domain has the default page sizes, ranges and entry limit.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Declare `[vaddr, vaddr + size)` of `pid` shared (aliasable).
    /// Adjacent declarations stay separate pieces, so an alias spanning
    /// them has several segments.
    pub fn share(&self, pid: Pid, vaddr: u64, size: u64) {
        let mut s = self.state();
        let v = s.shared.entry(pid).or_default();
        v.push((vaddr, size));
        v.sort_unstable();
    }

    /// Declare `[vaddr, vaddr + size)` of `pid` private memory: not
    /// aliasable, but mappable by the client's own thread.
    pub fn private(&self, pid: Pid, vaddr: u64, size: u64) {
        let mut s = self.state();
        s.private.entry(pid).or_default().push((vaddr, size));
    }

    /// Set what the kernel charges `pid` besides the fake's client maps
    /// (`VmLck`: what it `mlock`ed).
    pub fn set_locked(&self, pid: Pid, bytes: u64) {
        *self.state().locked.entry(pid).or_default() = bytes;
    }

    /// `pid`'s `VmLck` now.
    pub fn locked(&self, pid: Pid) -> u64 {
        self.state().locked.get(&pid).copied().unwrap_or(0)
    }

    /// Declare the file with inode `inode` a memory file of `size` bytes
    /// (`alias_file` refuses every other file with `EINVAL`).
    pub fn add_file(&self, inode: u64, size: u64) {
        self.state().files.insert(inode, size);
    }

    /// Set `pid`'s `RLIMIT_MEMLOCK` (`None`: unlimited, the default).
    pub fn set_memlock(&self, pid: Pid, limit: Option<u64>) {
        let mut s = self.state();
        match limit {
            Some(l) => s.memlock.insert(pid, l),
            None => s.memlock.remove(&pid),
        };
    }

    /// Configure group `group`'s domain (page sizes and permitted ranges).
    pub fn set_domain(&self, group: GroupId, pgsize_bitmap: u64, iova_ranges: &[(u64, u64)]) {
        let mut s = self.state();
        let d = s.domains.entry(group).or_default();
        d.pgsize_bitmap = pgsize_bitmap;
        d.iova_ranges = iova_ranges.to_vec();
    }

    /// Configure how many entries group `group`'s domain accepts.
    pub fn set_entry_limit(&self, group: GroupId, limit: usize) {
        self.state().domains.entry(group).or_default().entry_limit = limit;
    }

    /// Run `f` inside the next `map_as_client`, before it maps: what a
    /// client's other thread (or another client) does while the client's
    /// thread is stopped and the engine holds no lock.
    pub fn during_next_client_map(&self, f: impl FnOnce() + Send + 'static) {
        self.state().during_client_map = Some(Box::new(f));
    }

    /// Let `after` more maps succeed, then fail one with `errno`.
    pub fn fail_map_after(&self, after: usize, errno: Errno) {
        self.state().map_failure = Some((after, errno));
    }

    /// Let `after` more unmaps succeed, then fail one with `errno` (an undo
    /// that fails, when the engine is rolling a change back).
    pub fn fail_unmap_after(&self, after: usize, errno: Errno) {
        self.state().unmap_failure = Some((after, errno));
    }

    /// Fail the next `unmap_all` with `errno`.
    pub fn fail_next_unmap_all(&self, errno: Errno) {
        self.state().unmap_all_failure = Some(errno);
    }

    /// The entries of group `group`'s domain, by IOVA.
    pub fn entries(&self, group: GroupId) -> Vec<FakeEntry> {
        self.state()
            .domains
            .get(&group)
            .map(|d| d.entries.values().copied().collect())
            .unwrap_or_default()
    }

    /// Write `bytes` at client address `vaddr` (the same bytes for every
    /// process: the daemon address of `v` is `FAKE_DAEMON_BASE + v`).
    pub fn write_memory(&self, vaddr: u64, bytes: &[u8]) {
        let mut s = self.state();
        let mut done = 0;
        while done < bytes.len() {
            let at = FAKE_DAEMON_BASE + vaddr + done as u64;
            let in_page = (at & 0xfff) as usize;
            let n = (4096 - in_page).min(bytes.len() - done);
            let page = s
                .pages
                .entry(at & !0xfff)
                .or_insert_with(|| Box::new([0; 4096]));
            page[in_page..in_page + n].copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
    }

    /// Write the little-endian `value` at client address `vaddr`.
    pub fn write_u64(&self, vaddr: u64, value: u64) {
        self.write_memory(vaddr, &value.to_le_bytes());
    }

    /// How many times the engine asked the backend to trim its idle cache.
    pub fn trims(&self) -> usize {
        self.state().trims
    }

    /// How many aliases are handed out and not released.
    pub fn live_aliases(&self) -> usize {
        self.state().live.len()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.state().calls.clone()
    }

    /// Forget the calls logged so far.
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }
}

/// Count one call down on an injected failure (`after` calls to let
/// through, then the errno); the errno when it is this call's turn.
fn injected(failure: &mut Option<(usize, Errno)>) -> Option<Errno> {
    let (after, errno) = (*failure)?;
    *failure = (after > 0).then(|| (after - 1, errno));
    (after == 0).then_some(errno)
}

fn einval(msg: String) -> Error {
    Error::new(Errno::EINVAL, msg)
}

fn min_pgsize(bitmap: u64) -> u64 {
    if bitmap == 0 {
        4096
    } else {
        (1u64 << bitmap.trailing_zeros()).max(4096)
    }
}

impl FakeState {
    /// Type1 uncharges what a client's map charged when it goes.
    fn uncharge(&mut self, group: GroupId, iova: u64) {
        if let Some((pid, bytes)) = self.charged.remove(&(group, iova)) {
            if let Some(l) = self.locked.get_mut(&pid) {
                *l -= bytes;
            }
        }
    }

    fn in_live_alias(&self, daemon_vaddr: u64, len: u64) -> bool {
        let Some(end) = daemon_vaddr.checked_add(len) else {
            return false;
        };
        self.live.values().any(|a| {
            a.segments
                .iter()
                .any(|s| s.daemon_vaddr <= daemon_vaddr && end <= s.daemon_vaddr + s.len)
        })
    }
}

impl FakeState {
    /// Check `entry` like type1v2 and put it into `group`'s domain.
    fn insert_entry(&mut self, group: GroupId, entry: DmaEntry) -> Result<(), Error> {
        let DmaEntry {
            iova,
            daemon_vaddr,
            size,
            ..
        } = entry;
        let s = self;
        if let Some(errno) = injected(&mut s.map_failure) {
            return Err(Error::new(errno, "injected map failure"));
        }
        let d = s.domains.entry(group).or_default();
        let pg = min_pgsize(d.pgsize_bitmap);
        if size == 0 || (iova | daemon_vaddr | size) & (pg - 1) != 0 {
            return Err(einval(format!(
                "map {iova:#x}+{size:#x}: not {pg:#x}-aligned"
            )));
        }
        let last = iova
            .checked_add(size - 1)
            .ok_or_else(|| einval(format!("map {iova:#x}+{size:#x} wraps")))?;
        if !d.iova_ranges.iter().any(|&(a, b)| a <= iova && last <= b) {
            return Err(einval(format!("map {iova:#x}+{size:#x}: outside ranges")));
        }
        if let Some((_, e)) = d.entries.range(..=last).next_back() {
            if e.iova + e.size > iova {
                return Err(Error::new(Errno::EEXIST, "overlapping mapping"));
            }
        }
        if d.entries.len() >= d.entry_limit {
            return Err(Error::new(Errno::ENOSPC, "domain entry limit reached"));
        }
        d.entries.insert(iova, entry);
        Ok(())
    }
}

impl Backend for FakeBackend {
    fn alias(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Alias, Error> {
        let mut s = self.state();
        s.calls.push(FakeCall::Alias { pid, vaddr, size });
        let end = vaddr.checked_add(size).ok_or_else(|| {
            Error::new(Errno::EFAULT, format!("range {vaddr:#x}+{size:#x} wraps"))
        })?;
        let pieces = s.shared.get(&pid).cloned().unwrap_or_default();
        let mut segments = Vec::new();
        let mut at = vaddr;
        for (start, len) in pieces {
            if at >= end {
                break;
            }
            if start <= at && at < start + len {
                let piece_end = (start + len).min(end);
                segments.push(Segment {
                    offset: at - vaddr,
                    daemon_vaddr: FAKE_DAEMON_BASE + at,
                    len: piece_end - at,
                });
                at = piece_end;
            }
        }
        if at < end || size == 0 {
            return Err(Error::new(
                Errno::EFAULT,
                format!(
                    "process {pid}: {at:#x} is not in shared memory; use MAP_SHARED memory \
                     (memfd, shm, hugetlbfs, a shared file)"
                ),
            ));
        }
        s.next_token += 1;
        let alias = Alias {
            token: s.next_token,
            segments: segments.into_iter().collect(),
        };
        s.live.insert(alias.token, alias.clone());
        Ok(alias)
    }

    fn resolve(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Resolved, Error> {
        let private = self.state().private.get(&pid).is_some_and(|v| {
            v.iter()
                .any(|&(s, l)| s <= vaddr && vaddr.saturating_add(size) <= s + l)
        });
        if private {
            return Ok(Resolved::Private {
                why: format!("memory {vaddr:#x}+{size:#x} of process {pid} is private"),
            });
        }
        self.alias(pid, vaddr, size).map(Resolved::Shared)
    }

    /// As type1 for a map issued by the client: the range must be the
    /// client's (shared or private), its `RLIMIT_MEMLOCK` is checked
    /// against its `VmLck` alone, which is then charged.
    fn map_as_client(
        &self,
        group: GroupId,
        thread: &mut dyn ClientThread,
        entry: ClientEntry,
    ) -> Result<(), Error> {
        let tid = thread.tid();
        let pid = thread.mm()?.pid;
        let during = self.state().during_client_map.take();
        if let Some(f) = during {
            f();
        }
        let mut s = self.state();
        s.calls.push(FakeCall::MapAsClient {
            group,
            tid,
            iova: entry.iova,
            client_vaddr: entry.client_vaddr,
            size: entry.size,
        });
        if let Some(errno) = injected(&mut s.map_failure) {
            return Err(Error::new(errno, "injected map failure"));
        }
        let end = entry.client_vaddr.saturating_add(entry.size);
        let mine = s
            .private
            .get(&pid)
            .into_iter()
            .chain(s.shared.get(&pid))
            .flatten()
            .any(|&(a, l)| a <= entry.client_vaddr && end <= a + l);
        if !mine {
            return Err(Error::new(Errno::EFAULT, "not mapped in the client"));
        }
        let locked = s.locked.get(&pid).copied().unwrap_or(0);
        if let Some(&limit) = s.memlock.get(&pid) {
            if locked + entry.size > limit {
                return Err(Error::new(Errno::ENOMEM, "over RLIMIT_MEMLOCK (kernel)"));
            }
        }
        s.insert_entry(
            group,
            DmaEntry {
                iova: entry.iova,
                daemon_vaddr: FAKE_CLIENT_TAG | entry.client_vaddr,
                size: entry.size,
                prot: entry.prot,
            },
        )?;
        *s.locked.entry(pid).or_default() += entry.size;
        s.charged.insert((group, entry.iova), (pid, entry.size));
        Ok(())
    }

    fn process_memory(&self, pid: Pid) -> Result<ProcessMemory, Error> {
        Ok(ProcessMemory {
            pid,
            locked: self.locked(pid),
        })
    }

    fn release_alias(&self, alias: &Alias) {
        let mut s = self.state();
        s.calls.push(FakeCall::Release { token: alias.token });
        let known = s.live.remove(&alias.token);
        assert!(known.is_some(), "alias {} released twice", alias.token);
    }

    fn trim(&self) {
        self.state().trims += 1;
    }

    fn alias_file(
        &self,
        file: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        _write: bool,
    ) -> Result<Alias, Error> {
        let inode = nix::sys::stat::fstat(file)
            .map_err(|e| Error::new(e, "fstat of the file failed"))?
            .st_ino;
        let mut s = self.state();
        s.calls.push(FakeCall::AliasFile {
            inode,
            offset,
            size,
        });
        let Some(&len) = s.files.get(&inode) else {
            return Err(einval(format!("inode {inode} is not a memory file")));
        };
        if size == 0 || offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(einval(format!(
                "{offset:#x}+{size:#x} is past the end of the file ({len:#x} bytes)"
            )));
        }
        s.next_token += 1;
        let alias = Alias {
            token: s.next_token,
            segments: Segments::from_elem(
                Segment {
                    offset: 0,
                    daemon_vaddr: FAKE_FILE_BASE + (inode << 32) + offset,
                    len: size,
                },
                1,
            ),
        };
        s.live.insert(alias.token, alias.clone());
        Ok(alias)
    }

    fn share_alias(&self, alias: &Alias, offset: u64, size: u64) -> Result<Alias, Error> {
        let mut s = self.state();
        s.calls.push(FakeCall::Share {
            token: alias.token,
            offset,
            size,
        });
        assert!(
            s.live.contains_key(&alias.token),
            "sharing a released alias"
        );
        let segments = slice_alias(&alias.segments, offset, size)
            .ok_or_else(|| einval(format!("{offset:#x}+{size:#x} is not inside the alias")))?;
        s.next_token += 1;
        let shared = Alias {
            token: s.next_token,
            segments,
        };
        s.live.insert(shared.token, shared.clone());
        Ok(shared)
    }

    fn memlock_limit(&self, pid: Pid) -> Result<Option<u64>, Error> {
        Ok(self.state().memlock.get(&pid).copied())
    }

    fn domain_info(&self, group: GroupId) -> Result<DomainInfo, Error> {
        let mut s = self.state();
        let d = s.domains.entry(group).or_default();
        Ok(DomainInfo {
            pgsize_bitmap: d.pgsize_bitmap,
            iova_ranges: d.iova_ranges.clone(),
            dma_avail: Some(d.entry_limit.saturating_sub(d.entries.len()) as u32),
        })
    }

    /// Checks the range like type1v2 and records it; nothing is read or
    /// written at `daemon_vaddr`.
    unsafe fn map(&self, group: GroupId, entry: DmaEntry) -> Result<(), Error> {
        let DmaEntry {
            iova,
            daemon_vaddr,
            size,
            ..
        } = entry;
        let mut s = self.state();
        s.calls.push(FakeCall::Map {
            group,
            iova,
            daemon_vaddr,
            size,
        });
        s.insert_entry(group, entry)
    }

    fn unmap(&self, group: GroupId, iova: u64, size: u64) -> Result<u64, Error> {
        let mut s = self.state();
        s.calls.push(FakeCall::Unmap { group, iova, size });
        if let Some(errno) = injected(&mut s.unmap_failure) {
            return Err(Error::new(errno, "injected unmap failure"));
        }
        let d = s.domains.entry(group).or_default();
        let pg = min_pgsize(d.pgsize_bitmap);
        if size == 0 || (iova | size) & (pg - 1) != 0 {
            return Err(einval(format!("unmap {iova:#x}+{size:#x}: misaligned")));
        }
        let end = iova
            .checked_add(size)
            .ok_or_else(|| einval(format!("unmap {iova:#x}+{size:#x} wraps")))?;
        if let Some((_, e)) = d.entries.range(..iova).next_back() {
            if e.iova + e.size > iova {
                return Err(einval("unmap would split a mapping".into()));
            }
        }
        if let Some((_, e)) = d.entries.range(iova..end).next_back() {
            if e.iova + e.size > end {
                return Err(einval("unmap would split a mapping".into()));
            }
        }
        let gone: Vec<u64> = d.entries.range(iova..end).map(|(k, _)| *k).collect();
        let mut bytes = 0;
        for &k in &gone {
            bytes += d.entries.remove(&k).map_or(0, |e| e.size);
        }
        for k in gone {
            s.uncharge(group, k);
        }
        Ok(bytes)
    }

    fn unmap_all(&self, group: GroupId) -> Result<(), Error> {
        let mut s = self.state();
        s.calls.push(FakeCall::UnmapAll { group });
        if let Some(errno) = s.unmap_all_failure.take() {
            return Err(Error::new(errno, "injected unmap-all failure"));
        }
        let gone: Vec<u64> = s
            .domains
            .entry(group)
            .or_default()
            .entries
            .keys()
            .copied()
            .collect();
        for k in gone {
            s.uncharge(group, k);
        }
        s.domains.entry(group).or_default().entries.clear();
        Ok(())
    }

    fn read(&self, daemon_vaddr: u64, buf: &mut [u8]) -> Result<(), Error> {
        let mut s = self.state();
        s.calls.push(FakeCall::Read {
            daemon_vaddr,
            len: buf.len(),
        });
        if !s.in_live_alias(daemon_vaddr, buf.len() as u64) {
            return Err(Error::new(
                Errno::EFAULT,
                format!(
                    "read {daemon_vaddr:#x}+{:#x}: not in a live alias",
                    buf.len()
                ),
            ));
        }
        let mut done = 0;
        while done < buf.len() {
            let at = daemon_vaddr + done as u64;
            let in_page = (at & 0xfff) as usize;
            let n = (4096 - in_page).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match s.pages.get(&(at & !0xfff)) {
                Some(p) => out.copy_from_slice(&p[in_page..in_page + n]),
                None => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

/// A client thread of the fake: process `pid` (its own thread id too),
/// address space stamp `stamp`.
#[derive(Clone, Copy, Debug)]
pub struct FakeThread {
    /// The process and thread.
    pub pid: Pid,
    /// Its address space's stamp (another after an `exec`).
    pub stamp: u8,
}

impl ClientThread for FakeThread {
    fn tid(&self) -> Pid {
        self.pid
    }

    fn mm(&mut self) -> Result<MmId, Error> {
        Ok(MmId {
            pid: self.pid,
            stamp: [self.stamp; 16],
        })
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A caller of the fake: thread (and process) `pid`. Work it is asked to
/// run as itself waits until the test runs it ([`FakeClient::run_deferred`]),
/// as the real one runs after the reply; or it refuses, as a traced client.
#[derive(Default)]
pub struct FakeClient {
    /// The process (and its one thread).
    pub pid: Pid,
    /// Address space stamp its work sees.
    pub stamp: u8,
    /// Refuse to run work (like a client under a debugger) with this errno.
    pub refuse: Option<Errno>,
    deferred: Mutex<Vec<ClientWork>>,
}

impl FakeClient {
    /// A caller that accepts work.
    pub fn new(pid: Pid) -> Self {
        FakeClient {
            pid,
            ..FakeClient::default()
        }
    }

    /// Run the work left so far as this client's thread; their results.
    pub fn run_deferred(&self) -> Vec<Result<(), Error>> {
        let works = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        let mut thread = FakeThread {
            pid: self.pid,
            stamp: self.stamp,
        };
        works
            .into_iter()
            .map(|w| w(Ok(&mut thread as &mut dyn ClientThread)))
            .collect()
    }

    /// Run the work left so far as if the thread could not be reached
    /// (it died, or did not stop in time).
    pub fn fail_deferred(&self, errno: Errno) -> Vec<Result<(), Error>> {
        let works = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        works
            .into_iter()
            .map(|w| w(Err(Error::new(errno, "the client thread was not reached"))))
            .collect()
    }

    /// This client with address space stamp `stamp` (as after an `exec`).
    pub fn with_stamp(mut self, stamp: u8) -> Self {
        self.stamp = stamp;
        self
    }

    /// This client refusing work with `errno` (as one under a debugger).
    pub fn refusing(mut self, errno: Errno) -> Self {
        self.refuse = Some(errno);
        self
    }

    /// How much work waits.
    pub fn pending(&self) -> usize {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Client for FakeClient {
    fn tid(&self) -> Pid {
        self.pid
    }

    fn pid(&self) -> Result<Pid, Error> {
        Ok(self.pid)
    }

    fn defer_as_client(&self, work: ClientWork) -> Result<(), Error> {
        if let Some(errno) = self.refuse {
            return Err(Error::new(errno, "refused (the fake client is traced)"));
        }
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(work);
        Ok(())
    }
}
