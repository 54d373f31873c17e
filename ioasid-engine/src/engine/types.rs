//! The engine's public vocabulary: ids, requests and reports.

use crate::backend::{GroupId, Prot};
use crate::error::Error;
use crate::pgtable::WalkStats;

/// Width of a PCIe PASID.
pub const PASID_BITS: u32 = 20;

/// `IOASID_PGTABLE_X86_64_4LVL`: the one page-table format
/// [`Engine::bind_pgtable`] accepts.
pub const PGTABLE_X86_64_4LVL: u32 = 1;

/// `IOASID_PASID_TABLE_FLAT_X86_64`: the one PASID-table format
/// [`Engine::bind_pasid_table`] accepts.
pub const PASID_TABLE_FLAT_X86_64: u32 = 1;

/// Most entries of a flat PASID table.
pub const PASID_TABLE_MAX_ENTRIES: u32 = 1 << PASID_BITS;

/// An fd-local IOASID number. The first one allocated is 1; freed numbers
/// may be reused.
pub type IoasidId = u32;

/// A stable number for a device the daemon serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

/// One open of `/dev/ioasid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextId(pub u64);

/// A device the daemon serves, given at construction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its stable id.
    pub id: DeviceId,
    /// Its name, the PCI address (BDF) such as `0000:00:03.0`.
    pub name: String,
    /// Its IOMMU group.
    pub group: GroupId,
}

/// One map request, VFIO type1 style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// First I/O virtual address.
    pub iova: u64,
    /// Address of the memory in the calling process.
    pub vaddr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Access granted to the devices.
    pub prot: Prot,
}

/// One attachment of a device to an IOASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    /// The device.
    pub device: DeviceId,
    /// `None` for the RID attachment, `Some(pasid)` for a PASID one.
    pub pasid: Option<u32>,
}

/// A page table bound to a child IOASID, as last walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PgtableStatus {
    /// The root table (a parent IOVA).
    pub root: u64,
    /// Leaves cached now (what the shadow is made from).
    pub leaves: u64,
    /// The last walk (at bind or at an invalidation; a range
    /// invalidation walks only the range).
    pub last_walk: WalkStats,
    /// Malformed entries met by every walk since the bind.
    pub malformed: u64,
    /// Walks since the bind.
    pub walks: u64,
}

/// What the table walks of one call found wrong, for the one log line a
/// call may write (the same counts reach the client through
/// [`IoasidInfo`]). A client's table may be garbage on purpose: the front
/// end logs this summary, within the client's log budget, rather than a
/// line per entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WalkReport {
    /// Page tables walked.
    pub walks: u64,
    /// Entries skipped as malformed, over all the walks.
    pub malformed: u64,
    /// A walk ran out of its budget.
    pub truncated: bool,
    /// PASID-table entries that were malformed, or unreadable.
    pub bad_entries: u64,
}

impl WalkReport {
    /// Count one walk.
    pub(crate) fn add(&mut self, stats: &crate::pgtable::WalkStats) {
        self.walks += 1;
        self.malformed += stats.malformed;
        self.truncated |= stats.truncated;
    }

    /// Whether nothing was wrong.
    pub fn is_clean(&self) -> bool {
        self.malformed == 0 && self.bad_entries == 0 && !self.truncated
    }
}

impl std::fmt::Display for WalkReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} page-table walk(s) skipped {} malformed entr(ies){}; {} PASID-table entr(ies) \
             malformed or unreadable; what they name stays untranslated",
            self.walks,
            self.malformed,
            if self.truncated {
                " and ran out of their budget"
            } else {
                ""
            },
            self.bad_entries
        )
    }
}

/// A PASID table bound to a child IOASID, as last read. PASID DMA is not
/// routed: these tables are read and walked, not realised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PasidTableStatus {
    /// The table (a parent IOVA).
    pub table: u64,
    /// Its number of entries.
    pub entries: u32,
    /// PASIDs whose entry is present and well formed.
    pub valid: u32,
    /// Entries with bits set besides present and the address: treated as
    /// not present.
    pub bad_entries: u32,
    /// Entries that could not be read (the parent no longer maps them).
    pub unreadable_entries: u32,
    /// Leaves of the valid PASIDs' page tables.
    pub leaves: u64,
    /// Malformed page-table entries met by the last walk of each PASID's
    /// table.
    pub malformed: u64,
    /// Some PASID's last walk ran out of budget.
    pub truncated: bool,
}

/// What an invalidation covers ([`Engine::invalidate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Invalidation {
    /// `Some((addr, size))`: only this input range; `None`: everything.
    pub range: Option<(u64, u64)>,
    /// On a PASID-table IOASID: only this PASID (else every PASID).
    pub pasid: Option<u32>,
    /// On a PASID-table IOASID: re-read the table entries first.
    pub pasid_cache: bool,
}

/// What `IOASID_GET_INFO` reports, before encoding.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct IoasidInfo {
    /// A device has been attached at least once: the IOASID accepts map
    /// and unmap, and the fields below are meaningful.
    pub attached: bool,
    /// Supported page sizes: the AND over the realising domains, or the
    /// last known value when no group realises the IOASID now.
    pub pgsize_bitmap: u64,
    /// Permitted IOVA ranges, inclusive, ascending: the intersection over
    /// the realising domains, or the last known value.
    pub iova_ranges: Vec<(u64, u64)>,
    /// Number of mappings.
    pub mappings: usize,
    /// Bytes mapped.
    pub mapped_bytes: u64,
    /// Devices attached now, by device then PASID (RID first).
    pub devices: Vec<Attachment>,
    /// How many more mappings fit: the minimum over the realising domains,
    /// when they say (the last known value when no group realises it).
    pub dma_avail: Option<u32>,
    /// The parent, for a child IOASID.
    pub parent: Option<IoasidId>,
    /// The children, for a parent.
    pub children: Vec<IoasidId>,
    /// Levels of children that may still be created below this IOASID:
    /// 1 for a root that has had a device attached, else 0.
    pub nesting_levels: u32,
    /// Entries of a child's shadow (what each realising domain holds).
    pub shadow_entries: usize,
    /// The bound page table, if any.
    pub pgtable: Option<PgtableStatus>,
    /// The bound PASID table, if any.
    pub pasid_table: Option<PasidTableStatus>,
}

/// What closing a context did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClosedContext {
    /// The devices that were bound to it and now are not: the device front
    /// end closes their device fds.
    pub unbound: Vec<DeviceId>,
    /// Backend failures met on the way. A group whose domain could not be
    /// emptied is taken out of service (its devices cannot be bound again).
    pub errors: Vec<Error>,
}
