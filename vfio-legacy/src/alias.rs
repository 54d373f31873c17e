//! Aliasing client memory: making another process's shared, file-backed
//! pages addressable by the daemon, so the daemon can hand its own addresses
//! to `VFIO_IOMMU_MAP_DMA` (which pins the *caller's* memory).
//!
//! For each area (VMA) of the client covering the requested range, the
//! daemon opens `/proc/<pid>/map_files/<start>-<end>` (which needs
//! `CAP_SYS_ADMIN`) and maps that file `MAP_SHARED`, at the area's file
//! offset, with the client's protection. The daemon's mapping then holds the
//! very pages the client sees.
//!
//! **Whole areas.** The daemon maps each client area whole rather than just
//! the pages asked for: the mapping costs address space only (only the
//! pages asked for are populated, by the pin, or just before it with read
//! faults when they are 64 KiB or more: see [`POPULATE_MIN`]); one mapping
//! then serves every later request inside the same area; and an area's
//! start, length and file offset are already aligned to its page size,
//! which hugetlbfs requires (the kernel also picks a huge-page aligned
//! address for a hugetlbfs file when none is given).
//!
//! **Cache key.** A daemon mapping is keyed by the *backing file and
//! range*: (device, inode, file offset, length, writable) as the client's
//! maps report them — not by the client's addresses. The daemon's mapping
//! holds a reference to the file, so the inode number cannot be reused while
//! the entry exists; two areas with the same key are the same pages, whoever
//! maps them, so sharing one daemon mapping between two clients of one memfd
//! is correct. A client that replaces its mapping gets a new key (other file
//! or offset) and so a new alias; the old one lives until released.
//!
//! **Idle cache.** When the last alias using a daemon mapping is released,
//! the mapping is not unmapped at once: it becomes *idle* and stays, keyed
//! as before, for a later alias of the same backing range to reuse (a
//! client that maps and unmaps the same buffer in a loop would otherwise pay
//! for `map_files`, `mmap` and the page-table fill of the pin every time).
//! Reuse changes nothing about who may have what: every alias still starts
//! from the *caller's own* `/proc/<pid>/maps`, and an idle mapping is found
//! only under the key of an area the caller maps itself. An idle mapping
//! pins nothing (VFIO pins only while DMA-mapped) but keeps its file alive,
//! so the cache is bounded ([`IDLE_MAX_ENTRIES`], [`IDLE_MAX_BYTES`] of
//! address space; least recently released goes first, unmapped on a thread
//! of its own after the release that evicted it) and emptied by
//! [`ClientMemory::trim`] (the engine asks for it whenever an IOASID
//! context closes), by [`ClientMemory::clear`] and on drop.
//!
//! **Races.** Between reading the maps and opening `map_files`, the client may
//! unmap or replace the area, for instance by a read-only mapping of a file
//! it may not write, and put its own back before the daemon looks again.
//! So the daemon never trusts a name:
//! - it opens `map_files` with no more access than the client's mapping
//!   had (a read-only mapping is opened `O_RDONLY` and mapped `PROT_READ`,
//!   and [`ClientMemory::check_access`] refuses device writes to it);
//! - it identifies what it opened by the fd (`fstat`: device *and* inode,
//!   as the maps listed them; an inode number alone repeats across file
//!   systems);
//! - after mapping, it asks the maps again, on the descriptor it read them
//!   from first (bound to the client's memory map, not to a pid that could
//!   be reused), and checks that the client still maps that very file at
//!   that place with that access (bounds, offset, device, inode,
//!   protection).
//!
//! Otherwise it starts over (a few times, then `EAGAIN`). Registrations,
//! page-table walks and the reads through `/proc/self/mem` all go through
//! these aliases, so the same checks hold for them.

mod table;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use std::os::fd::BorrowedFd;

use ioasid_engine::backend::{
    slice_alias, Alias, Pid, ProcessMemory, Prot, Resolved, Segment, Segments,
};
use nix::errno::Errno;

use crate::error::{proc_error, Context, Error, Result};
use crate::maps::{areas_covering, Vma};
use crate::sys::SharedMapping;
use crate::unmapper::Unmapper;
use table::{Key, Table};

/// How many times an alias is retried when the client's map changes under it.
const ATTEMPTS: usize = 4;

/// How many idle daemon mappings are kept at most.
pub const IDLE_MAX_ENTRIES: usize = 64;

/// How much address space idle daemon mappings may cover in total; a
/// released mapping larger than this is unmapped at once.
pub const IDLE_MAX_BYTES: u64 = 4 << 30;

/// The bounds of the idle cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleLimits {
    /// At most this many idle mappings.
    pub entries: usize,
    /// At most this many bytes of address space in idle mappings.
    pub bytes: u64,
}

impl Default for IdleLimits {
    fn default() -> Self {
        IdleLimits {
            entries: IDLE_MAX_ENTRIES,
            bytes: IDLE_MAX_BYTES,
        }
    }
}

/// The locked table. Mappings removed while it was held are handed to the
/// unmapping thread after it is unlocked.
struct TableGuard<'a> {
    table: Option<std::sync::MutexGuard<'a, Table>>,
    unmapper: &'a Unmapper,
}

impl std::ops::Deref for TableGuard<'_> {
    type Target = Table;
    fn deref(&self) -> &Table {
        self.table.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for TableGuard<'_> {
    fn deref_mut(&mut self) -> &mut Table {
        self.table.as_mut().expect("held until drop")
    }
}

impl Drop for TableGuard<'_> {
    fn drop(&mut self) {
        let doomed = self.table.as_mut().map(|t| std::mem::take(&mut t.doomed));
        drop(self.table.take());
        if let Some(doomed) = doomed {
            self.unmapper.unmap(doomed);
        }
    }
}

/// Why one attempt at aliasing did not finish.
enum Attempt {
    /// The client's map changed under us: start over.
    Changed,
    /// A real failure.
    Failed(Error),
    /// Private memory, which cannot be aliased (the message says what).
    Private(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

/// The daemon's aliases of client memory, with their reference counts.
#[derive(Debug)]
pub struct ClientMemory {
    proc_root: PathBuf,
    table: Mutex<Table>,
    unmapper: Unmapper,
}

impl Default for ClientMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientMemory {
    /// Aliases made through `/proc`.
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// Aliases made through a procfs mounted at `proc_root`.
    pub fn with_proc_root(proc_root: impl Into<PathBuf>) -> Self {
        Self::with_limits(proc_root, IdleLimits::default())
    }

    /// Aliases made through a procfs mounted at `proc_root`, keeping idle
    /// mappings within `limits`.
    pub fn with_limits(proc_root: impl Into<PathBuf>, limits: IdleLimits) -> Self {
        ClientMemory {
            proc_root: proc_root.into(),
            table: Mutex::new(Table::new(limits)),
            unmapper: Unmapper::default(),
        }
    }

    fn lock(&self) -> TableGuard<'_> {
        // A panic while holding the lock leaves the table consistent (every
        // change is a single insert/remove), so poisoning is ignored.
        TableGuard {
            table: Some(self.table.lock().unwrap_or_else(|p| p.into_inner())),
            unmapper: &self.unmapper,
        }
    }

    /// Open process `pid`'s memory map. The descriptor stays bound to the
    /// memory map (the `mm`) of the process it was opened on, so one open
    /// serves the reads before and after an alias is made.
    fn open_maps(&self, pid: Pid) -> Result<File> {
        let path = format!("{}/{pid}/maps", self.proc_root.display());
        File::open(&path).map_err(|e| proc_error(&e, format!("cannot open {path}")))
    }

    /// Make `[vaddr, vaddr + size)` of process `pid` addressable by this
    /// process. See the module documentation. `pid` may name any thread of
    /// the process: `/proc/<tid>` shows the process's memory map.
    pub fn alias(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Alias> {
        match self.resolve(pid, vaddr, size)? {
            Resolved::Shared(alias) => Ok(alias),
            Resolved::Private { why } => {
                // The design asks for a log line telling the user what to do.
                let e = Error::new(Errno::EFAULT, private_advice(&why));
                tracing::warn!("{}", e.message);
                Err(e)
            }
        }
    }

    /// [`ClientMemory::alias`], or [`Resolved::Private`] when part of the
    /// range is private memory (which only the client's own thread can
    /// have pinned).
    pub fn resolve(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Resolved> {
        if size == 0 {
            return Err(Error::new(Errno::EINVAL, "cannot alias an empty range"));
        }
        let end = vaddr.checked_add(size).ok_or_else(|| {
            Error::new(
                Errno::EFAULT,
                format!("range {vaddr:#x}+{size:#x} wraps around"),
            )
        })?;
        for _ in 0..ATTEMPTS {
            match self.try_alias(pid, vaddr, end) {
                Ok(alias) => return Ok(Resolved::Shared(alias)),
                Err(Attempt::Changed) => continue,
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Private(e)) => return Ok(Resolved::Private { why: e.message }),
            }
        }
        Err(Error::new(
            Errno::EAGAIN,
            format!(
                "the memory map of process {pid} kept changing while \
                 {vaddr:#x}..{end:#x} was being aliased"
            ),
        ))
    }

    /// One attempt. The table is locked only to look mappings up and to
    /// add them: reading the client's map, opening `map_files` and `mmap`
    /// run unlocked, so clients do not wait for each other's `/proc`.
    fn try_alias(&self, pid: Pid, vaddr: u64, end: u64) -> std::result::Result<Alias, Attempt> {
        let maps = self.open_maps(pid)?;
        let areas = areas(&maps, pid, vaddr, end)?;
        for vma in &areas {
            // The message tells the user what to do; the front end logs it,
            // within the client's log budget.
            check_shareable(pid, vma)?;
        }

        // References on the mappings that exist; the others are made below.
        let found: Vec<Option<usize>> = {
            let mut table = self.lock();
            areas.iter().map(|v| table.get(&Key::of(v))).collect()
        };
        let mut made = Vec::new();
        for (vma, addr) in areas.iter().zip(&found) {
            if addr.is_some() {
                continue;
            }
            match self.map_area(pid, &maps, vma) {
                Ok(mapping) => {
                    populate(&mapping, vma, vaddr, end);
                    made.push(mapping)
                }
                Err(e) => {
                    let mut table = self.lock();
                    for (vma, addr) in areas.iter().zip(&found) {
                        if addr.is_some() {
                            table.put_key(&Key::of(vma));
                        }
                    }
                    return Err(e);
                }
            }
        }

        let mut made = made.into_iter();
        let mut duplicates = Vec::new();
        let mut table = self.lock();
        let segments: Segments = areas
            .iter()
            .zip(found)
            .map(|(vma, addr)| {
                let key = Key::of(vma);
                let addr = addr.unwrap_or_else(|| {
                    let mapping = made.next().expect("one mapping per missing area");
                    // Another request may have mapped the same area
                    // meanwhile: share its mapping, drop ours.
                    match table.get(&key) {
                        Some(addr) => {
                            duplicates.push(mapping);
                            addr
                        }
                        None => table.insert(key, mapping),
                    }
                });
                let seg_start = vaddr.max(vma.start);
                let seg_end = end.min(vma.end);
                Segment {
                    offset: seg_start - vaddr,
                    daemon_vaddr: addr as u64 + (seg_start - vma.start),
                    len: seg_end - seg_start,
                }
            })
            .collect();
        let alias = table.hand_out(segments);
        drop(table);
        drop(duplicates); // unmapped outside the lock
        Ok(alias)
    }

    /// Open the area through `map_files` and map it here; `maps` is the
    /// client's memory map, opened by [`ClientMemory::open_maps`].
    fn map_area(
        &self,
        pid: Pid,
        maps: &File,
        vma: &Vma,
    ) -> std::result::Result<SharedMapping, Attempt> {
        let path = self
            .proc_root
            .join(pid.to_string())
            .join("map_files")
            .join(vma.map_files_name());
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(vma.write)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            // The area went away or changed bounds since we read the maps.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(Attempt::Changed),
            Err(e) => {
                let hint = match e.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::EACCES) => {
                        " (opening map_files needs CAP_SYS_ADMIN: run the daemon as root)"
                    }
                    _ => "",
                };
                return Err(Error::io(&e, format!("cannot open {}{hint}", path.display())).into());
            }
        };
        // The file is known by the fd opened, never by the name: the area
        // may have been replaced since the maps were read, by another file
        // the client can only read, even one with the same inode number on
        // another file system. Device and inode of what was opened must be
        // those the maps listed, and the access asked for above is only
        // what the client's own mapping had.
        let meta = file
            .metadata()
            .context(|| format!("cannot stat {}", path.display()))?;
        if !vma.is_file(meta.dev(), meta.ino()) {
            return Err(Attempt::Changed);
        }
        let len = usize::try_from(vma.end - vma.start)
            .map_err(|_| Error::new(Errno::ENOMEM, "area too large"))?;
        let mapping = SharedMapping::new(file.as_fd(), len, vma.read, vma.write, vma.offset)
            .context(|| {
                format!(
                    "cannot map {} ({}) of process {pid}",
                    path.display(),
                    vma.path
                )
            })?;
        drop(file);

        // The area must still be the one we opened and mapped: the client
        // maps this very file, with this access, at this place, now. Asked
        // on the descriptor the areas were first read from: the same memory
        // map, without a second open (and its access check).
        let now = areas(maps, pid, vma.start, vma.end)?;
        if now.as_slice() != std::slice::from_ref(vma) {
            return Err(Attempt::Changed);
        }
        tracing::debug!(
            pid,
            start = vma.start,
            end = vma.end,
            path = %vma.path,
            daemon_addr = mapping.addr(),
            "aliased client memory"
        );
        Ok(mapping)
    }

    /// Make `[offset, offset + size)` of a client's memory file (copied
    /// into the daemon with `pidfd_getfd`) addressable by this process:
    /// `IOMMU_IOAS_MAP_FILE`. As the kernel's `memfd_pin_folios`, only
    /// shmem (memfd, tmpfs) and hugetlbfs files are accepted, and only
    /// inside the file (`EINVAL` otherwise); writable only if the file was
    /// opened for writing (`EPERM`). The mapping covers the range rounded
    /// out to the file's page size and shares the cache of the aliases of
    /// client memory (same key: device, inode, offset, length, writable).
    pub fn alias_file(
        &self,
        file: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        write: bool,
    ) -> Result<Alias> {
        use nix::sys::statfs::{fstatfs, HUGETLBFS_MAGIC, TMPFS_MAGIC};
        let kind = fstatfs(file)
            .map_err(|e| Error::new(e, "fstatfs of the mapped file failed"))?
            .filesystem_type();
        let huge = kind == HUGETLBFS_MAGIC;
        if kind != TMPFS_MAGIC && !huge {
            return Err(Error::new(
                Errno::EINVAL,
                "IOMMU_IOAS_MAP_FILE takes a memfd, tmpfs or hugetlbfs file (the kernel pins \
                 files with memfd_pin_folios, which takes no other)",
            ));
        }
        let st = nix::sys::stat::fstat(file)
            .map_err(|e| Error::new(e, "fstat of the mapped file failed"))?;
        let end = offset
            .checked_add(size)
            .filter(|&e| size > 0 && e <= st.st_size as u64)
            .ok_or_else(|| {
                Error::new(
                    Errno::EINVAL,
                    format!(
                        "file range {offset:#x}+{size:#x} is not inside the file ({:#x} bytes)",
                        st.st_size
                    ),
                )
            })?;
        let mode = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| Error::new(e, "F_GETFL of the mapped file failed"))?;
        if write && mode & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Error::new(
                Errno::EPERM,
                "the file was opened read-only: map it without IOMMU_IOAS_MAP_WRITEABLE, or \
                 pass an fd opened for writing",
            ));
        }
        let page = if huge { st.st_blksize as u64 } else { 4096 }.max(4096);
        let start = offset & !(page - 1);
        let stop = end.div_ceil(page) * page;
        let key = Key {
            dev_major: libc::major(st.st_dev),
            dev_minor: libc::minor(st.st_dev),
            inode: st.st_ino,
            offset: start,
            len: stop - start,
            write,
        };
        let found = self.lock().get(&key);
        let addr = match found {
            Some(addr) => addr,
            None => {
                let len = usize::try_from(stop - start)
                    .map_err(|_| Error::new(Errno::ENOMEM, "file range too large"))?;
                let mapping = SharedMapping::new(file, len, true, write, start)
                    .map_err(|e| Error::new(e, "cannot map the file for DMA"))?;
                let mut table = self.lock();
                match table.get(&key) {
                    Some(addr) => addr, // mapped meanwhile: ours is dropped
                    None => table.insert(key, mapping),
                }
            }
        };
        let segment = Segment {
            offset: 0,
            daemon_vaddr: addr as u64 + (offset - start),
            len: size,
        };
        Ok(self.lock().hand_out(vec![segment]))
    }

    /// A second alias of `[offset, offset + size)` of the live `alias`,
    /// holding its own references on the same daemon mappings.
    pub fn share(&self, alias: &Alias, offset: u64, size: u64) -> Result<Alias> {
        let segments = slice_alias(&alias.segments, offset, size).ok_or_else(|| {
            Error::new(
                Errno::EINVAL,
                format!("{offset:#x}+{size:#x} is not inside the alias"),
            )
        })?;
        let mut table = self.lock();
        if !table.live.contains(&alias.token) {
            return Err(Error::new(Errno::EINVAL, "sharing a released alias"));
        }
        if !segments
            .iter()
            .all(|s| table.writable(s.daemon_vaddr, s.len).is_some())
        {
            return Err(Error::new(Errno::EINVAL, "alias segment in no mapping"));
        }
        for s in &segments {
            table.get_at(s.daemon_vaddr);
        }
        Ok(table.hand_out(segments))
    }

    /// Give back an alias; the daemon mappings it held become idle when no
    /// other alias uses them (see the module documentation).
    pub fn release(&self, alias: &Alias) {
        let mut table = self.lock();
        if !table.live.remove(&alias.token) {
            tracing::warn!(token = alias.token, "release of an unknown alias");
            return;
        }
        for seg in &alias.segments {
            if !table.put_at(seg.daemon_vaddr) {
                tracing::error!(
                    token = alias.token,
                    daemon_vaddr = seg.daemon_vaddr,
                    "released alias segment is in no daemon mapping"
                );
            }
        }
    }

    /// Check that `[addr, addr + len)` lies inside one daemon mapping of
    /// client memory whose access allows `prot`: a device may write only
    /// memory that the client itself mapped writable (`EFAULT` otherwise,
    /// as VFIO answers a write mapping of read-only memory).
    pub fn check_access(&self, addr: u64, len: u64, prot: Prot) -> Result<()> {
        match self.lock().writable(addr, len) {
            None => Err(Error::new(
                Errno::EFAULT,
                format!("{addr:#x}+{len:#x} is not client memory aliased by the daemon"),
            )),
            Some(false) if prot.write => Err(Error::new(
                Errno::EFAULT,
                "the client maps this memory read-only, so a device may only read it: \
                 map it without the WRITE flag, or map it writable in the client first",
            )),
            Some(_) => Ok(()),
        }
    }

    /// Unmap every idle mapping (those in use stay), and wait until the
    /// mappings let go of earlier are unmapped too.
    pub fn trim(&self) {
        self.lock().trim();
        self.settle();
    }

    /// Wait until every mapping the table has let go of (evicted from the
    /// idle cache, or too large to stay in it) is unmapped: that happens on
    /// a thread of its own, after the release that let it go.
    pub fn settle(&self) {
        self.unmapper.settle();
    }

    /// Drop every alias and unmap everything (outstanding tokens become
    /// unknown).
    pub fn clear(&self) {
        self.lock().clear();
        self.settle();
    }

    /// How many daemon mappings exist, in use or idle.
    pub fn mapping_count(&self) -> usize {
        self.lock().len()
    }

    /// How many of them are idle, and how many bytes of address space
    /// those cover.
    pub fn idle(&self) -> (usize, u64) {
        self.lock().idle()
    }

    /// How many aliases are outstanding (not yet released).
    pub fn alias_count(&self) -> usize {
        self.lock().live.len()
    }
}

/// The smallest part of a fresh alias worth populating before its pin: a
/// fault-around window (below it the call costs more than the faults it
/// saves).
const POPULATE_MIN: u64 = 64 << 10;

/// Set once `MADV_POPULATE_READ` answered `EINVAL`: the kernel predates it.
static NO_POPULATE: AtomicBool = AtomicBool::new(false);

/// Fill the page tables of the part of the fresh `mapping` of `vma` that
/// `[vaddr, end)` (a client range) covers, when it is large enough: the
/// pin that follows then finds them filled instead of faulting every page
/// into the new mapping. Best effort: on a kernel without
/// `MADV_POPULATE_READ`, or if it fails, the pin faults the pages in (and
/// reports what is wrong with them).
fn populate(mapping: &SharedMapping, vma: &Vma, vaddr: u64, end: u64) {
    let (start, stop) = (vaddr.max(vma.start), end.min(vma.end));
    if stop - start < POPULATE_MIN || NO_POPULATE.load(Ordering::Relaxed) {
        return;
    }
    let (Ok(offset), Ok(len)) = (
        usize::try_from(start - vma.start),
        usize::try_from(stop - start),
    ) else {
        return;
    };
    match mapping.populate_read(offset, len) {
        Ok(()) => {}
        Err(Errno::EINVAL) => NO_POPULATE.store(true, Ordering::Relaxed),
        Err(errno) => tracing::debug!(%errno, "MADV_POPULATE_READ of a fresh alias failed"),
    }
}

/// The areas covering `[start, end)` of process `pid`, as its memory map
/// `maps` shows them now.
fn areas(maps: &File, pid: Pid, start: u64, end: u64) -> Result<Vec<Vma>> {
    areas_covering(maps, start, end).map_err(|e| {
        Error::new(
            e.errno,
            format!("process {pid}: {}; cannot map it for DMA", e.message),
        )
    })
}

fn check_shareable(pid: Pid, vma: &Vma) -> std::result::Result<(), Attempt> {
    let what = format!(
        "memory {:#x}..{:#x} of process {pid} ({})",
        vma.start,
        vma.end,
        if vma.path.is_empty() {
            "anonymous"
        } else {
            &vma.path
        }
    );
    if !vma.read && !vma.write {
        return Err(Attempt::Failed(Error::new(
            Errno::EFAULT,
            format!("{what} is not accessible (PROT_NONE)"),
        )));
    }
    if !vma.is_shareable() {
        return Err(Attempt::Private(Error::new(
            Errno::EFAULT,
            format!("{what} is private (MAP_PRIVATE or ordinary anonymous memory)"),
        )));
    }
    Ok(())
}

/// The message for private memory where only shared memory will do.
fn private_advice(why: &str) -> String {
    format!(
        "{why}, so the daemon cannot map the same pages for DMA; map it MAP_SHARED from a \
         memfd, POSIX/SysV shm, hugetlbfs or a shared file, or MAP_SHARED|MAP_ANONYMOUS \
         (QEMU: -object memory-backend-memfd,share=on)"
    )
}

/// Thread `pid`'s process (`Tgid:`) and the memory the kernel charges to
/// it (`VmLck:`, kB), from one read of `/proc/<pid>/status`.
pub fn process_memory(pid: Pid) -> Result<ProcessMemory> {
    let path = format!("/proc/{pid}/status");
    let text =
        std::fs::read_to_string(&path).map_err(|e| proc_error(&e, format!("reading {path}")))?;
    parse_status(&text).ok_or_else(|| {
        Error::new(
            Errno::EIO,
            format!("{path} has no Tgid: or VmLck: line (a kernel thread?)"),
        )
    })
}

fn parse_status(text: &str) -> Option<ProcessMemory> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().trim_end_matches("kB").trim().to_string())
    };
    Some(ProcessMemory {
        pid: field("Tgid:")?.parse().ok()?,
        locked: field("VmLck:")?.parse::<u64>().ok()?.checked_mul(1024)?,
    })
}

/// The memory-lock limit of process `pid` (any of its threads): its soft
/// `RLIMIT_MEMLOCK`, or `None` when unlimited or when the task has
/// `CAP_IPC_LOCK`. Two system calls, no `/proc`.
pub fn memlock_limit(pid: Pid) -> Result<Option<u64>> {
    if crate::sys::has_cap_ipc_lock(pid).context(|| format!("capget of process {pid}"))? {
        return Ok(None);
    }
    crate::sys::memlock_soft_limit(pid)
        .context(|| format!("prlimit(RLIMIT_MEMLOCK) of process {pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::parse_maps;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    const PAGE: usize = 4096;

    fn is_root() -> bool {
        use std::os::unix::fs::MetadataExt;
        // /proc/self belongs to the process's effective uid.
        std::fs::metadata("/proc/self").unwrap().uid() == 0
    }

    /// A memfd of `pages` pages mapped MAP_SHARED in this process: the
    /// "client" memory.
    fn client_memfd(pages: usize) -> (File, SharedMapping) {
        let fd = nix::sys::memfd::memfd_create(
            "vfio-legacy-test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .unwrap();
        let file = File::from(fd);
        file.set_len((pages * PAGE) as u64).unwrap();
        let map = SharedMapping::new(file.as_fd(), pages * PAGE, true, true, 0).unwrap();
        (file, map)
    }

    fn mem() -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .unwrap()
    }

    /// Whether this process maps `file` at `addr`. The file is checked
    /// too: other tests run in parallel threads and may map something else
    /// at an address just released.
    fn self_maps_has(addr: u64, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ino = file.metadata().unwrap().ino();
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        parse_maps(&text)
            .unwrap()
            .iter()
            .any(|v| v.start <= addr && addr < v.end && v.inode == ino)
    }

    fn pid() -> Pid {
        std::process::id() as Pid
    }

    #[test]
    fn alias_of_a_memfd_sees_and_changes_the_clients_pages() {
        if !is_root() {
            eprintln!("skipped: needs root (map_files)");
            return;
        }
        let (file, client) = client_memfd(4);
        file.write_all_at(b"written by the client", PAGE as u64)
            .unwrap();
        let cm = ClientMemory::new();
        let a = cm
            .alias(pid(), client.addr() as u64 + PAGE as u64, 2 * PAGE as u64)
            .unwrap();
        assert_eq!(a.segments.len(), 1);
        let seg = a.segments[0];
        assert_eq!((seg.offset, seg.len), (0, 2 * PAGE as u64));
        assert_ne!(seg.daemon_vaddr, client.addr() as u64 + PAGE as u64);

        // Reading through the alias shows the client's bytes...
        let mut buf = [0u8; 21];
        mem().read_exact_at(&mut buf, seg.daemon_vaddr).unwrap();
        assert_eq!(&buf, b"written by the client");
        // ...and writing through it changes the client's page.
        mem()
            .write_all_at(b"written by the daemon", seg.daemon_vaddr + PAGE as u64)
            .unwrap();
        let mut back = [0u8; 21];
        mem()
            .read_exact_at(&mut back, client.addr() as u64 + 2 * PAGE as u64)
            .unwrap();
        assert_eq!(&back, b"written by the daemon");

        // Release makes the mapping idle: still mapped, no alias outstanding.
        cm.release(&a);
        assert_eq!((cm.mapping_count(), cm.alias_count()), (1, 0));
        assert_eq!(cm.idle(), (1, 4 * PAGE as u64));
        assert!(self_maps_has(seg.daemon_vaddr, &file));
        // Trimming unmaps it.
        cm.trim();
        assert_eq!(cm.mapping_count(), 0);
        assert_eq!(cm.idle(), (0, 0));
        assert!(!self_maps_has(seg.daemon_vaddr, &file), "trim must unmap");
    }

    /// The resident pages (`Rss:` of `/proc/self/smaps`, in KiB) of this
    /// process's area starting at `start`.
    fn own_rss_kib(start: u64) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{start:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        assert!(lines.next().is_some(), "no area at {start:#x}");
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .unwrap()
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_fresh_alias_of_64_kib_or_more_is_populated_before_its_pin() {
        if !is_root() {
            eprintln!("skipped: needs root (map_files)");
            return;
        }
        let (file, client) = client_memfd(256);
        for page in 0..256 {
            file.write_all_at(b"p", (page * PAGE) as u64).unwrap();
        }
        let base = client.addr() as u64;
        let cm = ClientMemory::new();
        // 512 KiB from 256 KiB in: those page-table entries are filled, the
        // rest of the area's not beyond a fault-around window (64 KiB,
        // aligned to the daemon's addresses) on either side.
        let a = cm
            .alias(pid(), base + 64 * PAGE as u64, 128 * PAGE as u64)
            .unwrap();
        let area = a.segments[0].daemon_vaddr - 64 * PAGE as u64;
        let rss = own_rss_kib(area);
        assert!((512..=512 + 128).contains(&rss), "{rss} KiB resident");
        cm.release(&a);
        cm.trim();
        // A 4 KiB alias is left to the pin.
        let b = cm.alias(pid(), base, PAGE as u64).unwrap();
        assert_eq!(own_rss_kib(b.segments[0].daemon_vaddr), 0);
        cm.release(&b);
    }

    #[test]
    fn aliases_of_one_area_share_a_mapping_until_the_last_release() {
        if !is_root() {
            eprintln!("skipped: needs root (map_files)");
            return;
        }
        let (file, client) = client_memfd(4);
        let base = client.addr() as u64;
        let cm = ClientMemory::new();
        let a = cm.alias(pid(), base, PAGE as u64).unwrap();
        let b = cm
            .alias(pid(), base + 3 * PAGE as u64, PAGE as u64)
            .unwrap();
        assert_ne!(a.token, b.token);
        assert_eq!(cm.mapping_count(), 1, "one area, one daemon mapping");
        assert_eq!(cm.alias_count(), 2);
        let da = a.segments[0].daemon_vaddr;
        assert_eq!(b.segments[0].daemon_vaddr, da + 3 * PAGE as u64);
        assert_eq!(b.segments[0].offset, 0);

        cm.release(&a);
        assert_eq!(cm.mapping_count(), 1);
        assert!(self_maps_has(da, &file), "still used by b");
        // A second release of the same alias is ignored, not a double put.
        cm.release(&a);
        assert!(self_maps_has(da, &file));
        cm.release(&b);
        assert_eq!((cm.mapping_count(), cm.alias_count()), (1, 0));
        assert_eq!(cm.idle().0, 1, "idle after the last release");
        cm.trim();
        assert_eq!(cm.mapping_count(), 0);
        assert!(!self_maps_has(da, &file));
    }

    #[test]
    fn a_range_over_two_areas_gives_two_segments() {
        if !is_root() {
            eprintln!("skipped: needs root (map_files)");
            return;
        }
        let (file, client) = client_memfd(4);
        // Split the area: pages 2-3 become read-only, a separate VMA.
        client.protect_read_only(2 * PAGE, 2 * PAGE).unwrap();
        file.write_all_at(b"page three", 3 * PAGE as u64).unwrap();
        let base = client.addr() as u64;
        let cm = ClientMemory::new();
        let a = cm
            .alias(pid(), base + PAGE as u64, 3 * PAGE as u64)
            .unwrap();
        assert_eq!(a.segments.len(), 2);
        assert_eq!(a.segments[0].offset, 0);
        assert_eq!(a.segments[0].len, PAGE as u64);
        assert_eq!(a.segments[1].offset, PAGE as u64);
        assert_eq!(a.segments[1].len, 2 * PAGE as u64);
        assert_eq!(cm.mapping_count(), 2);
        // The second segment maps file offset 2 pages: page three is one page in.
        let mut buf = [0u8; 10];
        mem()
            .read_exact_at(&mut buf, a.segments[1].daemon_vaddr + PAGE as u64)
            .unwrap();
        assert_eq!(&buf, b"page three");
        // The read-only part is aliased read-only.
        let line = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(parse_maps_line_pub)
            .find(|v| v.start == a.segments[1].daemon_vaddr)
            .unwrap();
        assert!(line.read && !line.write && line.shared);
        cm.release(&a);
        assert_eq!(cm.idle(), (2, 4 * PAGE as u64));
        cm.trim();
        assert_eq!(cm.mapping_count(), 0);
    }

    #[test]
    fn a_released_alias_is_reused_and_still_checked_against_the_callers_maps() {
        if !is_root() {
            eprintln!("skipped: needs root (map_files)");
            return;
        }
        let (file, client) = client_memfd(2);
        let base = client.addr() as u64;
        let cm = ClientMemory::new();
        let a = cm.alias(pid(), base, 2 * PAGE as u64).unwrap();
        let da = a.segments[0].daemon_vaddr;
        cm.release(&a);
        // The same range again: the idle mapping comes back, not a new one.
        let b = cm.alias(pid(), base + PAGE as u64, PAGE as u64).unwrap();
        assert_eq!(b.segments[0].daemon_vaddr, da + PAGE as u64);
        assert_eq!(cm.mapping_count(), 1);
        assert_eq!(cm.idle(), (0, 0), "in use again, no longer idle");
        file.write_all_at(b"still the client's", PAGE as u64)
            .unwrap();
        let mut buf = [0u8; 18];
        mem()
            .read_exact_at(&mut buf, b.segments[0].daemon_vaddr)
            .unwrap();
        assert_eq!(&buf, b"still the client's");
        cm.release(&b);
        assert_eq!(cm.idle().0, 1);

        // Once the caller no longer maps the memory, the idle mapping of it
        // is not handed out: the caller's own maps decide.
        let addr = client.addr();
        drop(client);
        assert!(!self_maps_has(addr as u64, &file));
        let e = cm.alias(pid(), addr as u64, PAGE as u64);
        // Another test thread may have mapped something at that address
        // since; whatever it is, it is not this memfd's idle mapping.
        if let Ok(other) = &e {
            assert_ne!(other.segments[0].daemon_vaddr, da);
            cm.release(other);
        } else {
            assert_eq!(e.unwrap_err().errno, Errno::EFAULT);
        }
        assert!(self_maps_has(da, &file), "still idle until trimmed");
        drop(cm);
        assert!(!self_maps_has(da, &file), "drop unmaps idle mappings");
    }

    #[test]
    fn the_idle_cache_evicts_the_least_recently_released_beyond_its_count() {
        if !is_root() {
            eprintln!("skipped: needs root (map_files)");
            return;
        }
        let limits = IdleLimits {
            entries: 2,
            bytes: u64::MAX,
        };
        let cm = ClientMemory::with_limits("/proc", limits);
        let clients: Vec<_> = (0..3).map(|_| client_memfd(1)).collect();
        let aliases: Vec<_> = clients
            .iter()
            .map(|(_, m)| cm.alias(pid(), m.addr() as u64, PAGE as u64).unwrap())
            .collect();
        let addr = |i: usize| aliases[i].segments[0].daemon_vaddr;
        let mapped = |i: usize| self_maps_has(addr(i), &clients[i].0);
        cm.release(&aliases[0]);
        cm.release(&aliases[1]);
        assert_eq!(cm.idle(), (2, 2 * PAGE as u64));
        assert!(mapped(0) && mapped(1) && mapped(2));
        // 0 is used again and released again: now 1 is the oldest idle one.
        let again = cm
            .alias(pid(), clients[0].1.addr() as u64, PAGE as u64)
            .unwrap();
        assert_eq!(again.segments[0].daemon_vaddr, addr(0));
        cm.release(&again);
        // The evicted mapping is unmapped by the unmapping thread, after
        // the release returned: held up here, it is still mapped.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        cm.unmapper.run_there(move || {
            let _ = wait.recv();
        });
        cm.release(&aliases[2]);
        assert_eq!(cm.idle(), (2, 2 * PAGE as u64));
        assert_eq!(cm.mapping_count(), 2);
        assert!(mapped(1), "unmapped on the releasing thread");
        drop(go);
        cm.settle();
        assert!(!mapped(1), "the least recently released is unmapped");
        assert!(mapped(0) && mapped(2));
        cm.clear();
        assert!(!mapped(0) && !mapped(2));
        assert_eq!((cm.mapping_count(), cm.idle()), (0, (0, 0)));
    }

    #[test]
    fn the_idle_cache_stays_within_its_bytes() {
        if !is_root() {
            eprintln!("skipped: needs root (map_files)");
            return;
        }
        let limits = IdleLimits {
            entries: 64,
            bytes: 3 * PAGE as u64,
        };
        let cm = ClientMemory::with_limits("/proc", limits);
        let (f1, m1) = client_memfd(2);
        let (f2, m2) = client_memfd(2);
        let (f3, m3) = client_memfd(4);
        let a1 = cm.alias(pid(), m1.addr() as u64, PAGE as u64).unwrap();
        let a2 = cm.alias(pid(), m2.addr() as u64, PAGE as u64).unwrap();
        let a3 = cm.alias(pid(), m3.addr() as u64, PAGE as u64).unwrap();
        let d = |a: &Alias| a.segments[0].daemon_vaddr;
        cm.release(&a1);
        assert_eq!(cm.idle(), (1, 2 * PAGE as u64));
        // Two 2-page areas exceed 3 pages: the older goes.
        cm.release(&a2);
        assert_eq!(cm.idle(), (1, 2 * PAGE as u64));
        cm.settle();
        assert!(!self_maps_has(d(&a1), &f1));
        assert!(self_maps_has(d(&a2), &f2));
        // An area larger than the whole budget is unmapped at once, and
        // displaces nothing.
        cm.release(&a3);
        cm.settle();
        assert!(!self_maps_has(d(&a3), &f3));
        assert_eq!(cm.idle(), (1, 2 * PAGE as u64));
        assert!(self_maps_has(d(&a2), &f2));
        assert_eq!(cm.mapping_count(), 1);
        drop((m1, m2, m3));
    }

    fn parse_maps_line_pub(l: &str) -> Option<Vma> {
        crate::maps::parse_maps_line(l)
    }

    #[test]
    fn status_gives_the_process_and_its_locked_bytes() {
        let text = "Name:\tx\nTgid:\t42\nPid:\t43\nVmLck:\t    8192 kB\nVmPin:\t0 kB\n";
        assert_eq!(
            parse_status(text),
            Some(ProcessMemory {
                pid: 42,
                locked: 8192 * 1024
            })
        );
        assert_eq!(parse_status("Name:\tkthreadd\nTgid:\t2\n"), None);
        let me = process_memory(std::process::id() as i32).unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
    }

    #[test]
    fn private_memory_is_refused_with_efault_and_advice() {
        let heap = vec![7u8; 3 * PAGE];
        let cm = ClientMemory::new();
        let e = cm
            .alias(pid(), heap.as_ptr() as u64, PAGE as u64)
            .unwrap_err();
        assert_eq!(e.errno, Errno::EFAULT);
        assert!(e.message.contains("MAP_SHARED"), "{}", e.message);
        assert!(e.message.contains("memfd"), "{}", e.message);
        assert_eq!(cm.mapping_count(), 0);
    }

    #[test]
    fn unmapped_ranges_and_bad_arguments_are_refused() {
        if !is_root() {
            eprintln!("skipped: needs root (map_files)");
            return;
        }
        let cm = ClientMemory::new();
        // Below vm.mmap_min_addr (64 KiB by default) nothing is ever mapped.
        let e = cm.alias(pid(), 0x1000, 2 * PAGE as u64).unwrap_err();
        assert_eq!(e.errno, Errno::EFAULT);
        assert!(e.message.contains("not mapped"), "{}", e.message);
        // A range whose first area is fine but which runs past the mapped
        // memory fails as a whole and leaves nothing behind.
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        let last = parse_maps(&text).unwrap().last().unwrap().clone();
        let e = cm.alias(pid(), last.start, last.end - last.start + PAGE as u64);
        assert_eq!(e.unwrap_err().errno, Errno::EFAULT);
        assert_eq!(cm.mapping_count(), 0, "nothing leaks from a failed alias");
        assert_eq!(cm.alias(pid(), 0x1000, 0).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(
            cm.alias(pid(), u64::MAX - 10, 100).unwrap_err().errno,
            Errno::EFAULT
        );
        assert_eq!(
            cm.alias(i32::MAX, 0x1000, 0x1000).unwrap_err().errno,
            Errno::ESRCH
        );
    }
}
