//! The seam between the engine and the system.
//!
//! The engine decides *what* must be mapped where; a [`Backend`] does it.
//! The real backend (`vfio-legacy`) realises an IOMMU group's I/O page table
//! as a VFIO type1v2 container and client memory as aliases made through
//! `/proc/<pid>/map_files`. The fake in [`crate::fake`] records calls and
//! enforces type1v2's rules in memory, so the engine is unit-tested without
//! root, VFIO or a VM.

use std::os::fd::BorrowedFd;

pub use ioasid_uapi::Error;
use nix::errno::Errno;
use smallvec::SmallVec;

/// An IOMMU group number, as in `/sys/kernel/iommu_groups/<N>`.
pub type GroupId = u32;

/// A client process, named by the id of any of its threads (the front end
/// passes the calling thread's, which needs no look-up): `/proc/<tid>`
/// shows the process's memory map, and its limits apply to every thread.
pub type Pid = i32;

/// Access a mapping grants the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Prot {
    /// The device may read the memory.
    pub read: bool,
    /// The device may write the memory.
    pub write: bool,
}

/// One contiguous piece of client memory as the daemon sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset of this piece from the start of the aliased client range.
    pub offset: u64,
    /// Address of the piece in the daemon's own address space (what the
    /// backend hands to `VFIO_IOMMU_MAP_DMA`).
    pub daemon_vaddr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Client memory made addressable by the daemon: the pieces, in order,
/// that together cover `[client_vaddr, client_vaddr + size)`.
///
/// An alias stays valid until it is handed back to
/// [`Backend::release_alias`]. Aliasing the same client memory twice may
/// return the same daemon addresses (the backend reuses its mappings); each
/// `alias` call must still be matched by one `release_alias`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alias {
    /// The backend's handle, passed back on release.
    pub token: u64,
    /// The pieces covering the range, in ascending `offset`.
    pub segments: Segments,
}

/// The pieces of an [`Alias`]: nearly always one (a range inside one area
/// of client memory), kept inline then, since the engine keeps an alias per
/// mapping and there may be 100,000 of them.
pub type Segments = SmallVec<[Segment; 1]>;

/// One entry of a domain: `size` bytes at daemon address `daemon_vaddr`
/// seen by devices at `iova`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaEntry {
    /// First IOVA.
    pub iova: u64,
    /// Daemon address it translates to.
    pub daemon_vaddr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Access granted.
    pub prot: Prot,
}

/// What a range of client memory is, for the engine's choice of path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// Shared memory the daemon has aliased: mapped by the daemon itself.
    Shared(Alias),
    /// Memory the daemon cannot alias (`MAP_PRIVATE`, ordinary anonymous
    /// memory, the heap, stacks): only the client's own thread can have
    /// it pinned ([`Backend::map_as_client`]). `why` names it for logs.
    Private {
        /// What the memory is, for messages.
        why: String,
    },
}

/// One entry of a domain made of the client's own memory, pinned by the
/// client's thread: `size` bytes at the client's address `client_vaddr`,
/// seen by devices at `iova`. The daemon never dereferences the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientEntry {
    /// First IOVA.
    pub iova: u64,
    /// Address in the client.
    pub client_vaddr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Access granted.
    pub prot: Prot,
}

/// Which address space a client thread runs in: its process and a stamp
/// that changes at every `exec` (the 16 random bytes the kernel gives each
/// new program, `AT_RANDOM`). Pages pinned from one address space cannot
/// be pinned again from another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MmId {
    /// The process (thread-group id).
    pub pid: Pid,
    /// `AT_RANDOM`'s bytes.
    pub stamp: [u8; 16],
}

/// A client thread stopped on its way out of the call it made, able to
/// issue system calls as itself (the real one wraps a
/// `syscall_inject::Stopped`; the backend downcasts it through
/// [`ClientThread::as_any`]).
pub trait ClientThread {
    /// The thread.
    fn tid(&self) -> Pid;
    /// Its address space.
    fn mm(&mut self) -> Result<MmId, Error>;
    /// The concrete thread, for the backend that knows its type.
    fn as_any(&mut self) -> &mut dyn std::any::Any;
}

/// What the kernel says about a client process's locked memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessMemory {
    /// The process (thread-group id).
    pub pid: Pid,
    /// Bytes the kernel charges to its `locked_vm` (`VmLck`): what it
    /// `mlock`ed and what VFIO type1 pinned for it, including the private
    /// memory its own thread mapped for the daemon.
    pub locked: u64,
}

/// What an IOMMU domain (a realising container) supports.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DomainInfo {
    /// Supported IOMMU page sizes, one bit per size (bit n = 2^n bytes).
    pub pgsize_bitmap: u64,
    /// Permitted IOVA ranges, inclusive `(start, last)`, ascending.
    pub iova_ranges: Vec<(u64, u64)>,
    /// How many more mappings the domain accepts, when the kernel says.
    pub dma_avail: Option<u32>,
}

/// Realises the engine's decisions on the system.
///
/// Every IOMMU group the daemon manages has one I/O page table of its own
/// (in the real backend, a type1v2 container) for the daemon's whole life;
/// it starts empty, which blocks all DMA of the group's devices. The engine
/// fills it with the mappings of whichever IOASID the group is attached to
/// and empties it on detach.
pub trait Backend: Send + Sync {
    /// Make `[vaddr, vaddr + size)` of process `pid` addressable by the
    /// daemon. Fails with `EFAULT` when the range is not mapped, or is
    /// private memory that cannot be shared (the message tells the user to
    /// use shared memory).
    fn alias(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Alias, Error>;

    /// Alias `[vaddr, vaddr + size)` of process `pid` if it is shared
    /// memory, or say that it is private ([`Resolved::Private`]) and can
    /// only be pinned by the client's own thread. Unmapped or inaccessible
    /// memory is `EFAULT`. The default knows no private memory.
    fn resolve(&self, pid: Pid, vaddr: u64, size: u64) -> Result<Resolved, Error> {
        self.alias(pid, vaddr, size).map(Resolved::Shared)
    }

    /// Map `entry` into group `group`'s domain by the client's own thread
    /// `thread` (`VFIO_IOMMU_MAP_DMA` issued by it): the kernel pins the
    /// client's pages and charges them to the client. Errors are the
    /// kernel's (`ENOMEM` over the client's `RLIMIT_MEMLOCK`, `EFAULT`
    /// unmapped memory) or a refused injection (`EFAULT`). Not `unsafe`:
    /// the daemon never touches the memory, and the client's own pages stay
    /// pinned whatever it does with its mapping, as for any VFIO user.
    /// Unmapping needs nothing of the client ([`Backend::unmap`]). The
    /// default cannot.
    fn map_as_client(
        &self,
        group: GroupId,
        thread: &mut dyn ClientThread,
        entry: ClientEntry,
    ) -> Result<(), Error> {
        let _ = (group, entry);
        Err(Error::new(
            Errno::EFAULT,
            format!(
                "this backend cannot map private memory of thread {}",
                thread.tid()
            ),
        ))
    }

    /// The process of thread `pid` and its locked memory (`VmLck`), for
    /// the `RLIMIT_MEMLOCK` check. The default: the thread is its own
    /// process and has locked nothing.
    fn process_memory(&self, pid: Pid) -> Result<ProcessMemory, Error> {
        Ok(ProcessMemory { pid, locked: 0 })
    }

    /// Give back an alias returned by [`Backend::alias`],
    /// [`Backend::alias_file`] or [`Backend::share_alias`].
    fn release_alias(&self, alias: &Alias);

    /// Make `[offset, offset + size)` of `file` (a client's file, copied
    /// into the daemon) addressable by the daemon, writable if `write`:
    /// `IOMMU_IOAS_MAP_FILE`. Only memory files qualify, as for the
    /// kernel's `memfd_pin_folios`: `EINVAL` for a file that is neither
    /// shmem (memfd, tmpfs) nor hugetlbfs, or a range past its end; `EPERM`
    /// for `write` on a file opened read-only.
    fn alias_file(
        &self,
        file: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        write: bool,
    ) -> Result<Alias, Error>;

    /// A second alias of `[offset, offset + size)` of the live `alias`: the
    /// same pages, kept until this alias is released too, whatever happens
    /// to the first (`IOMMU_IOAS_COPY` shares a mapping's memory this way).
    /// `EINVAL` if the range is not inside `alias`.
    fn share_alias(&self, alias: &Alias, offset: u64, size: u64) -> Result<Alias, Error>;

    /// Drop whatever the backend keeps of released aliases for reuse (a
    /// cache of idle mappings that keeps client files alive). The engine
    /// calls it whenever a context closes. The default keeps nothing.
    fn trim(&self) {}

    /// The memory-lock limit (`RLIMIT_MEMLOCK`, soft, in bytes) of process
    /// `pid`; `None` when unlimited or when the process has `CAP_IPC_LOCK`.
    fn memlock_limit(&self, pid: Pid) -> Result<Option<u64>, Error>;

    /// What group `group`'s domain supports.
    fn domain_info(&self, group: GroupId) -> Result<DomainInfo, Error>;

    /// Map `entry` into group `group`'s domain (type1v2 rules: `EEXIST` on
    /// overlap, `EINVAL` when misaligned, `ENOSPC` when the domain is full).
    ///
    /// # Safety
    ///
    /// The entry's `[daemon_vaddr, daemon_vaddr + size)` must lie inside a [`Segment`]
    /// of an [`Alias`] this backend returned and that is not released, and
    /// the caller must keep that alias until no domain may map the range
    /// any more (an `unmap` or `unmap_all` covering it succeeded): devices
    /// read and write the memory at any time, behind Rust's back.
    unsafe fn map(&self, group: GroupId, entry: DmaEntry) -> Result<(), Error>;

    /// Unmap `[iova, iova + size)` from group `group`'s domain; returns the
    /// bytes unmapped (type1v2: 0 when nothing was mapped there, `EINVAL`
    /// when the range would split a mapping).
    fn unmap(&self, group: GroupId, iova: u64, size: u64) -> Result<u64, Error>;

    /// Unmap everything from group `group`'s domain.
    fn unmap_all(&self, group: GroupId) -> Result<(), Error>;

    /// Copy `buf.len()` bytes of client memory from daemon address
    /// `daemon_vaddr`, which lies inside a live alias (a [`Segment`] of an
    /// [`Alias`] not yet released). The engine uses it to walk page tables
    /// and PASID tables that a client keeps in memory it mapped for DMA.
    /// The client (or a device) may change the bytes at any time: the copy
    /// is a snapshot, possibly torn, never a reference. `EFAULT` if the
    /// memory cannot be read. The default cannot read anything.
    fn read(&self, daemon_vaddr: u64, buf: &mut [u8]) -> Result<(), Error> {
        let _ = buf;
        Err(Error::new(
            Errno::EFAULT,
            format!("this backend cannot read client memory (at {daemon_vaddr:#x})"),
        ))
    }
}

/// The segments of `[offset, offset + size)` of `segments` (ascending,
/// relative to an alias's start), relative to `offset`; `None` unless the
/// range is covered without a gap.
pub fn slice_alias(segments: &[Segment], offset: u64, size: u64) -> Option<Segments> {
    let end = offset.checked_add(size)?;
    let mut out = Segments::new();
    let mut at = offset;
    for s in segments {
        let (start, stop) = (s.offset.max(at), (s.offset + s.len).min(end));
        if start != at || start >= stop {
            continue;
        }
        out.push(Segment {
            offset: start - offset,
            daemon_vaddr: s.daemon_vaddr + (start - s.offset),
            len: stop - start,
        });
        at = stop;
    }
    (at == end && size > 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_of_an_alias_is_relative_to_its_start() {
        let segs = [
            Segment {
                offset: 0,
                daemon_vaddr: 0x10000,
                len: 0x2000,
            },
            Segment {
                offset: 0x2000,
                daemon_vaddr: 0x50000,
                len: 0x1000,
            },
        ];
        let got = slice_alias(&segs, 0x1000, 0x2000).unwrap();
        assert_eq!(
            &*got,
            &[
                Segment {
                    offset: 0,
                    daemon_vaddr: 0x11000,
                    len: 0x1000
                },
                Segment {
                    offset: 0x1000,
                    daemon_vaddr: 0x50000,
                    len: 0x1000
                }
            ]
        );
        assert!(slice_alias(&segs, 0x2000, 0x2000).is_none(), "past the end");
        assert!(slice_alias(&segs, 0, 0).is_none(), "empty");
    }

    #[test]
    fn one_segment_is_kept_inline_and_every_count_reads_as_a_slice() {
        let seg = |o| Segment {
            offset: o,
            daemon_vaddr: 0x1000 + o,
            len: 0x1000,
        };
        let one = Segments::from(vec![seg(0)]);
        assert!(!one.spilled(), "one segment is kept inline");
        assert_eq!(&*one, &[seg(0)]);
        let two = Segments::from(vec![seg(0), seg(0x1000)]);
        assert_eq!(two.len(), 2);
        assert_eq!(
            two.iter().map(|s| s.offset).collect::<Vec<_>>(),
            [0, 0x1000]
        );
        assert!(Segments::from(Vec::new()).is_empty());
        // As small as the enum it replaced: a segment and a length.
        assert_eq!(std::mem::size_of::<Segments>(), 32);
    }
}
