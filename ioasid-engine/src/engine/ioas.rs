//! iommufd's objects and IOAS commands (`drivers/iommu/iommufd/main.c`,
//! `ioas.c`, `io_pagetable.c`), on the engine's IOASIDs.
//!
//! An open `/dev/iommu` is a context like an open `/dev/ioasid`. Its
//! objects (IOAS, HWPT, device) share one id space, the kernel's: ids
//! start at 1, the lowest free one is taken, an id is published only once
//! the command succeeded. An IOAS *is* an IOASID of the context (its
//! mappings live there and are realised in the groups attached to it
//! through a HWPT, as the RFC's are), with what iommufd adds: the allowed
//! IOVA ranges, the huge-page option, and where each mapping's memory came
//! from (a user address or a file offset, which steer IOVA allocation and
//! `IOAS_CHANGE_PROCESS`).
//!
//! Unlike an RFC IOASID, an IOAS takes maps with no device attached: its
//! memory is aliased at once (the daemon must reach it), and realised in a
//! group's domain when a device of the group is attached (`hwpt.rs`), by
//! the same replay the RFC's first attach does. The IOVA space follows the
//! kernel's model: with no HWPT, one range `[0, 2^64 - 1]` and alignment 1;
//! with HWPTs, what the realising domains permit and their smallest page.
//! UNMAP is the kernel's strict one (`ENOENT` for nothing mapped and for a
//! range that would split a mapping).

use std::os::fd::BorrowedFd;

use nix::errno::Errno::{EADDRINUSE, EOVERFLOW, EPERM};

use super::iova::{self, PAGE_SIZE};
use super::*;

/// An object id of an iommufd file.
pub type ObjectId = u32;

/// What kind of object an id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// An I/O address space.
    Ioas,
    /// A paging HWPT (user-allocated or automatic).
    Hwpt,
    /// A bound device.
    Device,
}

/// Where the memory of an `IOMMU_IOAS_MAP`/`MAP_FILE` comes from.
#[derive(Clone, Copy)]
pub enum MapSource<'a> {
    /// The calling process's memory at this address: shared memory is
    /// aliased by the daemon, private memory pinned by the caller's own
    /// thread (see `private`).
    User {
        /// The calling thread.
        client: &'a dyn Client,
        /// `user_va`.
        vaddr: u64,
    },
    /// A memory file, from this offset.
    File {
        /// The client's file, copied into the daemon.
        file: BorrowedFd<'a>,
        /// `start`.
        offset: u64,
        /// The caller (whose process is charged, against its limit).
        client: &'a dyn Client,
    },
}

/// One `IOMMU_IOAS_MAP`, `MAP_FILE` or `COPY`, after the front end's checks
/// of flags and ranges.
#[derive(Clone, Copy, Debug)]
pub struct IoasMap {
    /// Bytes to map.
    pub length: u64,
    /// `Some(iova)` with `IOMMU_IOAS_MAP_FIXED_IOVA`, else chosen here.
    pub iova: Option<u64>,
    /// Access granted.
    pub prot: Prot,
}

/// Where a mapping's memory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Origin {
    /// The user address or file offset of the mapping's first byte.
    pub(super) addr: u64,
    /// Made from a file (`MAP_FILE`, or a copy of such a mapping).
    pub(super) file: bool,
}

#[derive(Debug, Default)]
pub(super) struct IoasObject {
    /// The IOASID holding the mappings.
    pub(super) ioasid: IoasidId,
    /// `IOMMU_IOAS_ALLOW_IOVAS`, inclusive; empty: everything.
    pub(super) allowed: Vec<(u64, u64)>,
    /// `IOMMU_OPTION_HUGE_PAGES` is 0.
    pub(super) no_huge_pages: bool,
    /// Per mapping (by IOVA), where its memory came from.
    pub(super) origins: BTreeMap<u64, Origin>,
}

#[derive(Debug)]
pub(super) struct HwptObject {
    /// The IOAS it was made on (kept busy by it).
    pub(super) ioas: ObjectId,
    /// Made by an attach to the IOAS (destroyed with its last device).
    pub(super) auto: bool,
}

#[derive(Debug)]
pub(super) enum Object {
    Ioas(IoasObject),
    Hwpt(HwptObject),
    Device(DeviceId),
}

impl Object {
    pub(super) fn kind(&self) -> ObjectKind {
        match self {
            Object::Ioas(_) => ObjectKind::Ioas,
            Object::Hwpt(_) => ObjectKind::Hwpt,
            Object::Device(_) => ObjectKind::Device,
        }
    }
}

/// The objects of one iommufd file.
#[derive(Debug, Default)]
pub(super) struct Objects {
    pub(super) ids: BTreeMap<ObjectId, Object>,
    /// Which HWPT each attached device is attached to.
    pub(super) attached: BTreeMap<DeviceId, ObjectId>,
    /// `IOMMU_VFIO_IOAS`'s compatibility IOAS.
    pub(super) compat: Option<ObjectId>,
}

impl Objects {
    /// The lowest free id (the kernel's `xa_alloc` over `[1, 2^31 - 1]`).
    pub(super) fn free_id(&self) -> Result<ObjectId, Error> {
        let mut want: ObjectId = 1;
        for &id in self.ids.keys() {
            if id != want {
                break;
            }
            want += 1;
        }
        if want > i32::MAX as u32 {
            return Err(err(ENOSPC, "no object id left in this iommufd"));
        }
        Ok(want)
    }

    pub(super) fn ioas(&self, id: ObjectId) -> Result<&IoasObject, Error> {
        match self.ids.get(&id) {
            Some(Object::Ioas(io)) => Ok(io),
            other => Err(wrong(id, "an IOAS", other)),
        }
    }

    pub(super) fn ioas_mut(&mut self, id: ObjectId) -> Result<&mut IoasObject, Error> {
        match self.ids.get_mut(&id) {
            Some(Object::Ioas(io)) => Ok(io),
            other => Err(wrong(id, "an IOAS", other.map(|o| &*o))),
        }
    }

    pub(super) fn hwpt(&self, id: ObjectId) -> Result<&HwptObject, Error> {
        match self.ids.get(&id) {
            Some(Object::Hwpt(h)) => Ok(h),
            other => Err(wrong(id, "a HWPT", other)),
        }
    }

    pub(super) fn device(&self, id: ObjectId) -> Result<DeviceId, Error> {
        match self.ids.get(&id) {
            Some(Object::Device(d)) => Ok(*d),
            other => Err(wrong(id, "a device", other)),
        }
    }

    /// The HWPTs made on IOAS `ioas`.
    pub(super) fn hwpts_of(&self, ioas: ObjectId) -> impl Iterator<Item = ObjectId> + '_ {
        self.ids.iter().filter_map(move |(&id, o)| match o {
            Object::Hwpt(h) if h.ioas == ioas => Some(id),
            _ => None,
        })
    }

    /// The devices attached to HWPT `hwpt`.
    pub(super) fn users_of(&self, hwpt: ObjectId) -> impl Iterator<Item = DeviceId> + '_ {
        self.attached
            .iter()
            .filter(move |(_, &h)| h == hwpt)
            .map(|(&d, _)| d)
    }
}

/// `ENOENT`: `id` is not an object of the kind wanted.
fn wrong(id: ObjectId, want: &str, found: Option<&Object>) -> Error {
    let what = match found.map(Object::kind) {
        None => "no object".to_string(),
        Some(k) => format!("a {k:?} object"),
    };
    err(
        ENOENT,
        format!("id {id} is {what} of this iommufd, not {want}"),
    )
}

/// The usable ranges and alignment of an IOAS now.
pub(super) struct Geometry {
    pub(super) holes: Vec<(u64, u64)>,
    pub(super) alignment: u64,
}

impl Engine {
    /// The IOVA space of IOAS `id` (an IOAS of `c`).
    pub(super) fn geometry(&self, c: &Context, id: ObjectId) -> Result<Geometry, Error> {
        let io = c.objects.ioas(id)?;
        let groups = c.groups_of(io.ioasid);
        let combined = combine(groups.iter().map(|g| &c.realising[g].info));
        let holes = match &combined {
            Some(info) => info.iova_ranges.clone(),
            None => vec![(0, u64::MAX)],
        };
        let mut alignment = 1;
        if c.objects.hwpts_of(id).next().is_some() {
            let pg = combined.map_or(PAGE_SIZE, |i| min_pgsize(i.pgsize_bitmap));
            alignment = pg.max(PAGE_SIZE);
        }
        if io.no_huge_pages {
            alignment = alignment.max(PAGE_SIZE);
        }
        Ok(Geometry { holes, alignment })
    }

    /// `IOMMU_IOAS_ALLOC`: a new IOAS in iommufd context `ctx`; its id.
    pub fn ioas_alloc(&self, ctx: ContextId) -> Result<ObjectId, Error> {
        self.with_context(ctx, |c| {
            let id = c.objects.free_id()?;
            let entry = c.ioasids.vacant_entry();
            let ioasid =
                u32::try_from(entry.key() + 1).map_err(|_| err(ENOSPC, "too many IOASes"))?;
            // An IOAS is an IOASID of the client's budget.
            self.take_budget(c.owner, Item::Ioasids, 1)?;
            entry.insert(Ioasid::default());
            c.objects.ids.insert(
                id,
                Object::Ioas(IoasObject {
                    ioasid,
                    ..IoasObject::default()
                }),
            );
            Ok(id)
        })
    }

    /// The kind of object `id` of context `ctx`, if it exists.
    pub fn object_kind(&self, ctx: ContextId, id: ObjectId) -> Result<Option<ObjectKind>, Error> {
        self.with_context(ctx, |c| Ok(c.objects.ids.get(&id).map(Object::kind)))
    }

    /// Whether context `ctx` has any object.
    pub fn has_objects(&self, ctx: ContextId) -> Result<bool, Error> {
        self.with_context(ctx, |c| Ok(!c.objects.ids.is_empty()))
    }

    /// `ENOENT` unless `id` is an IOAS of context `ctx`.
    pub fn check_ioas(&self, ctx: ContextId, id: ObjectId) -> Result<(), Error> {
        self.with_context(ctx, |c| c.objects.ioas(id).map(|_| ()))
    }

    /// `IOMMU_DESTROY`: `ENOENT` unknown id; `EBUSY` an IOAS with a HWPT
    /// made on it, a HWPT with a device attached, or a device (its file
    /// holds it until closed). An IOAS's mappings go with it.
    pub fn destroy(&self, ctx: ContextId, id: ObjectId) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            match c.objects.ids.get(&id) {
                None => return Err(err(ENOENT, format!("no object {id} in this iommufd"))),
                Some(Object::Device(d)) => {
                    return Err(err(
                        EBUSY,
                        format!(
                            "object {id} is device {}, bound until its file is closed",
                            self.name(*d)
                        ),
                    ))
                }
                Some(Object::Hwpt(_)) => {
                    if let Some(d) = c.objects.users_of(id).next() {
                        return Err(err(
                            EBUSY,
                            format!("HWPT {id} has device {} attached", self.name(d)),
                        ));
                    }
                }
                Some(Object::Ioas(_)) => {
                    if let Some(h) = c.objects.hwpts_of(id).next() {
                        return Err(err(
                            EBUSY,
                            format!("IOAS {id} is used by HWPT {h}; destroy or detach it first"),
                        ));
                    }
                }
            }
            if let Some(Object::Ioas(io)) = c.objects.ids.remove(&id) {
                if c.objects.compat == Some(id) {
                    c.objects.compat = None;
                }
                let key = ioasid_key(io.ioasid).expect("an IOAS has an IOASID");
                let gone = c.ioasids.remove(key);
                self.give_budget(c.owner, Item::Ioasids, 1);
                self.give_budget(c.owner, Item::Mappings, gone.mappings.len());
                for (_, m) in gone.mappings {
                    self.drop_memory(c, m);
                }
            }
            Ok(())
        })
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: the usable ranges (inclusive, ascending)
    /// and the IOVA alignment of IOAS `id`.
    pub fn ioas_iova_ranges(
        &self,
        ctx: ContextId,
        id: ObjectId,
    ) -> Result<(Vec<(u64, u64)>, u64), Error> {
        self.with_context(ctx, |c| {
            let g = self.geometry(c, id)?;
            Ok((g.holes, g.alignment))
        })
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`: replace the allowed list of IOAS `id`
    /// (inclusive ranges; empty allows everything). `EINVAL` a range with
    /// `start >= last` or overlapping another; `EADDRINUSE` one meeting a
    /// reserved range. On failure the old list stays.
    pub fn ioas_allow_iovas(
        &self,
        ctx: ContextId,
        id: ObjectId,
        ranges: &[(u64, u64)],
    ) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            c.objects.ioas(id)?;
            for (i, &(s, l)) in ranges.iter().enumerate() {
                if s >= l {
                    return Err(err(
                        EINVAL,
                        format!("allowed range {i} {s:#x}..={l:#x}: start must be below last"),
                    ));
                }
                if let Some(j) = ranges[..i].iter().position(|&r| iova::meets(r, (s, l))) {
                    return Err(err(EINVAL, format!("allowed ranges {j} and {i} overlap")));
                }
            }
            let reserved = iova::reserved(&self.geometry(c, id)?.holes);
            for &r in ranges {
                if let Some(&bad) = reserved.iter().find(|&&x| iova::meets(x, r)) {
                    return Err(err(
                        EADDRINUSE,
                        format!(
                            "allowed range {:#x}..={:#x} meets the reserved range {:#x}..={:#x}",
                            r.0, r.1, bad.0, bad.1
                        ),
                    ));
                }
            }
            c.objects.ioas_mut(id)?.allowed = ranges.to_vec();
            Ok(())
        })
    }

    /// Where a map of `length` bytes from `addr` (user address or file
    /// offset) goes in IOAS `id`: the kernel's checks of alignment,
    /// reserved ranges and overlap for `Some(iova)`, else its allocator.
    fn place(
        &self,
        c: &Context,
        id: ObjectId,
        addr: u64,
        length: u64,
        fixed: Option<u64>,
    ) -> Result<u64, Error> {
        let g = self.geometry(c, id)?;
        let a = g.alignment;
        if length % a != 0 {
            return Err(err(
                EINVAL,
                format!("length {length:#x} is not a multiple of the IOAS's IOVA alignment {a:#x}"),
            ));
        }
        let io = c.objects.ioas(id)?;
        let mappings = &c.ioasid(io.ioasid)?.mappings;
        let iova = match fixed {
            Some(iova) => {
                if iova % a != 0 {
                    return Err(err(
                        EINVAL,
                        format!("iova {iova:#x} is not aligned to the IOAS's {a:#x}"),
                    ));
                }
                let last = iova
                    .checked_add(length - 1)
                    .ok_or_else(|| err(EOVERFLOW, "iova + length - 1 overflows"))?;
                if !iova::inside(&g.holes, iova, last) {
                    return Err(err(
                        EINVAL,
                        format!(
                            "IOVA {iova:#x}..={last:#x} meets a reserved range (see \
                             IOMMU_IOAS_IOVA_RANGES)"
                        ),
                    ));
                }
                if let Some((&s, m)) = mappings.range(..=last).next_back() {
                    if s + (m.size - 1) >= iova {
                        return Err(err(
                            EEXIST,
                            format!(
                                "IOVA {iova:#x}..={last:#x} overlaps the mapping at {s:#x} \
                                 ({:#x} bytes); unmap it first",
                                m.size
                            ),
                        ));
                    }
                }
                iova
            }
            None => {
                let used: Vec<(u64, u64)> = mappings
                    .iter()
                    .map(|(&s, m)| (s, s + (m.size - 1)))
                    .collect();
                match iova::alloc_iova(&g.holes, &used, &io.allowed, addr, length, a) {
                    Ok(Some(iova)) => iova,
                    Ok(None) => {
                        return Err(err(
                            ENOSPC,
                            format!("no free IOVA range of {length:#x} bytes in the IOAS"),
                        ))
                    }
                    Err(align) => {
                        return Err(err(
                            EINVAL,
                            format!(
                                "the IOVA alignment a map at {addr:#x} gets ({align:#x}) is \
                                 below the IOAS's ({a:#x})"
                            ),
                        ))
                    }
                }
            }
        };
        if (addr % PAGE_SIZE) % a != 0 {
            return Err(err(
                EINVAL,
                format!("address {addr:#x}: its offset in the page is not aligned to {a:#x}"),
            ));
        }
        Ok(iova)
    }

    /// `IOMMU_IOAS_MAP` and `IOMMU_IOAS_MAP_FILE`: map `map.length` bytes
    /// of `source` into IOAS `id`; the IOVA used. `ENOENT` unknown IOAS;
    /// `EOVERFLOW`, `EINVAL` (length 0, alignment, reserved range),
    /// `EEXIST`, `ENOSPC` by the kernel's rules; `ENOMEM` over
    /// `RLIMIT_MEMLOCK`; `EFAULT` memory the daemon cannot alias; `EINVAL`
    /// a file that is not a memory file. Realised at once in the domains
    /// of the IOAS's attached groups; all or nothing.
    pub fn ioas_map(
        &self,
        ctx: ContextId,
        id: ObjectId,
        source: MapSource<'_>,
        map: IoasMap,
    ) -> Result<u64, Error> {
        self.with_context(ctx, |c| {
            let ioasid = c.objects.ioas(id)?.ioasid;
            let (addr, file) = match source {
                MapSource::User { vaddr, .. } => {
                    vaddr
                        .checked_add(map.length)
                        .ok_or_else(|| err(EOVERFLOW, "user_va + length overflows"))?;
                    (vaddr, false)
                }
                MapSource::File { offset, .. } => {
                    if map.length > 0 {
                        offset
                            .checked_add(map.length - 1)
                            .ok_or_else(|| err(EOVERFLOW, "start + length - 1 overflows"))?;
                    }
                    (offset, true)
                }
            };
            if map.length == 0 || map.length > u64::MAX - PAGE_SIZE {
                return Err(err(EINVAL, format!("cannot map {:#x} bytes", map.length)));
            }
            let iova = self.place(c, id, addr, map.length, map.iova)?;
            let groups = c.groups_of(ioasid);
            self.take_budget(c.owner, Item::Mappings, 1)?;
            let mapped = match source {
                MapSource::User { client, vaddr } => {
                    let dma = DmaMap {
                        iova,
                        vaddr,
                        size: map.length,
                        prot: map.prot,
                    };
                    self.map_user(c, client, ioasid, &groups, dma)
                }
                MapSource::File {
                    file,
                    offset,
                    client,
                } => self
                    .backend
                    .alias_file(file, offset, map.length, map.prot.write)
                    .and_then(|alias| match self.charge_shared(client, &alias) {
                        Ok(charged) => Ok(Mapping {
                            vaddr: offset,
                            size: map.length,
                            prot: map.prot,
                            memory: Memory::Own { alias, charged },
                        }),
                        Err(e) => {
                            self.release(c, alias);
                            Err(e)
                        }
                    })
                    .and_then(|mapping| self.map_memory(c, ioasid, &groups, iova, mapping)),
            };
            if let Err(e) = mapped {
                self.give_budget(c.owner, Item::Mappings, 1);
                return Err(e);
            }
            c.objects
                .ioas_mut(id)?
                .origins
                .insert(iova, Origin { addr, file });
            Ok(iova)
        })
    }

    /// `IOMMU_IOAS_COPY`: map `[src_iova, src_iova + length)` of IOAS
    /// `src` into IOAS `dst` too, sharing its memory (the copy outlives the
    /// source's unmap); the IOVA used in `dst`. `ENOENT` unknown IOAS or a
    /// source range not covered by contiguous mappings; `EPERM` writable
    /// over a read-only source; the rest as [`Engine::ioas_map`].
    pub fn ioas_copy(
        &self,
        ctx: ContextId,
        client: &dyn Client,
        dst: ObjectId,
        src: ObjectId,
        src_iova: u64,
        map: IoasMap,
    ) -> Result<u64, Error> {
        self.with_context(ctx, |c| {
            let src_io = c.objects.ioas(src)?;
            let length = map.length;
            if length == 0 {
                return Err(err(EINVAL, "cannot copy 0 bytes"));
            }
            let last = src_iova
                .checked_add(length - 1)
                .ok_or_else(|| err(EOVERFLOW, "src_iova + length - 1 overflows"))?;
            // The source pieces, contiguous from src_iova to last:
            // (mapping start, offset into it, length).
            let mappings = &c.ioasid(src_io.ioasid)?.mappings;
            let mut pieces = Vec::new();
            let mut at = src_iova;
            let mut lacks_write = false;
            while let Some((&s, m)) = mappings.range(..=at).next_back() {
                if s + (m.size - 1) < at {
                    break;
                }
                let off = at - s;
                let n = (m.size - off).min(last - at + 1);
                lacks_write |= !m.prot.write;
                pieces.push((s, off, n));
                match (at + (n - 1)).checked_add(1) {
                    Some(next) if next <= last => at = next,
                    _ => break,
                }
            }
            let covered: u64 = pieces.iter().map(|p| p.2).sum();
            if covered != length {
                return Err(err(
                    ENOENT,
                    format!(
                        "source IOVA {src_iova:#x}..={last:#x} is not covered by contiguous \
                         mappings of IOAS {src}"
                    ),
                ));
            }
            let first = src_io.origins.get(&pieces[0].0).copied();
            let origin = first.map_or(
                Origin {
                    addr: 0,
                    file: false,
                },
                |o| Origin {
                    addr: o.addr + pieces[0].1,
                    file: o.file,
                },
            );
            // The sources' memory: a share of each piece's alias.
            let src_ioasid = src_io.ioasid;
            let sources: Vec<(Alias, u64, Option<Origin>)> = {
                let mappings = &c.ioasid(src_ioasid)?.mappings;
                let origins = &c.objects.ioas(src)?.origins;
                let mut out = Vec::new();
                for &(s, off, n) in &pieces {
                    let alias = match &mappings[&s].memory {
                        Memory::Own { alias, .. } => alias,
                        Memory::Private { .. } | Memory::Pending(_) => {
                            return Err(err(
                                EINVAL,
                                format!(
                                    "the mapping at IOVA {s:#x} of IOAS {src} is private memory, \
                                     pinned by the client's own thread: the daemon cannot share \
                                     its pages into another IOAS; map the same memory there with \
                                     IOMMU_IOAS_MAP, or use shared memory (memfd, MAP_SHARED)"
                                ),
                            ))
                        }
                        _ => return Err(err(EINVAL, "only iommufd mappings can be copied")),
                    };
                    out.push((
                        alias.clone(),
                        n,
                        origins.get(&s).map(|o| Origin {
                            addr: o.addr + off,
                            file: o.file,
                        }),
                    ));
                }
                out
            };
            let dst_ioasid = c.objects.ioas(dst)?.ioasid;
            if map.prot.write && lacks_write {
                return Err(err(
                    EPERM,
                    "a writeable copy of a mapping that is not writeable",
                ));
            }
            let iova = self.place(c, dst, origin.addr, length, map.iova)?;
            let groups = c.groups_of(dst_ioasid);
            let mut done: Vec<u64> = Vec::new();
            let mut at = iova;
            for ((alias, n, piece_origin), &(_, off, _)) in sources.iter().zip(&pieces) {
                // Each piece is a mapping of the client's budget, and its
                // pages are charged to the caller's process (each page
                // once: the share covers the pages its source pins).
                let budget = self.take_budget(c.owner, Item::Mappings, 1);
                let shared = budget
                    .clone()
                    .and_then(|()| self.backend.share_alias(alias, off, *n))
                    .and_then(|shared| match self.charge_shared(client, &shared) {
                        Ok(charged) => Ok((shared, charged)),
                        Err(e) => {
                            self.release(c, shared);
                            Err(e)
                        }
                    })
                    .and_then(|(shared, charged)| {
                        let mapping = Mapping {
                            vaddr: piece_origin.map_or(0, |o| o.addr),
                            size: *n,
                            prot: map.prot,
                            memory: Memory::Own {
                                alias: shared,
                                charged,
                            },
                        };
                        self.map_memory(c, dst_ioasid, &groups, at, mapping)
                    });
                if shared.is_err() && budget.is_ok() {
                    self.give_budget(c.owner, Item::Mappings, 1);
                }
                if let Err(e) = shared {
                    if !done.is_empty() {
                        let (lo, hi) = (iova, at);
                        self.remove_mappings(c, dst_ioasid, &groups, &done, |b, g| {
                            b.unmap(g, lo, hi - lo).map(|_| ())
                        })?;
                    }
                    return Err(e);
                }
                let io = c.objects.ioas_mut(dst)?;
                io.origins.insert(
                    at,
                    piece_origin.unwrap_or(Origin {
                        addr: 0,
                        file: false,
                    }),
                );
                done.push(at);
                at += n;
            }
            Ok(iova)
        })
    }

    /// `IOMMU_IOAS_UNMAP`: unmap every mapping inside `[iova, iova +
    /// length)` of IOAS `id`; the bytes unmapped. `iova` 0 with `length`
    /// `u64::MAX` unmaps everything (0 bytes is then no error). `ENOENT`
    /// when nothing is mapped in the range or a mapping sticks out of it
    /// (nothing is unmapped then: the kernel may have unmapped the
    /// mappings below the one sticking out); `EINVAL` length 0;
    /// `EOVERFLOW` past the end of the IOVA space.
    pub fn ioas_unmap(
        &self,
        ctx: ContextId,
        id: ObjectId,
        iova: u64,
        length: u64,
    ) -> Result<u64, Error> {
        self.with_context(ctx, |c| {
            let ioasid = c.objects.ioas(id)?.ioasid;
            let groups = c.groups_of(ioasid);
            let mappings = &c.ioasid(ioasid)?.mappings;
            let unmap_all = iova == 0 && length == u64::MAX;
            let gone: Vec<u64> = if unmap_all {
                mappings.keys().copied().collect()
            } else {
                if iova == u64::MAX || length == u64::MAX {
                    return Err(err(EOVERFLOW, "iova or length is ULONG_MAX"));
                }
                if length == 0 {
                    return Err(err(EINVAL, "cannot unmap 0 bytes"));
                }
                let last = iova
                    .checked_add(length - 1)
                    .ok_or_else(|| err(EOVERFLOW, "iova + length - 1 overflows"))?;
                let sticks_out = |s: u64, m: &Mapping| {
                    err(
                        ENOENT,
                        format!(
                            "unmapping {iova:#x}..={last:#x} would split the mapping at {s:#x} \
                             ({:#x} bytes); unmap whole mappings",
                            m.size
                        ),
                    )
                };
                if let Some((&s, m)) = mappings.range(..iova).next_back() {
                    if s + (m.size - 1) >= iova {
                        return Err(sticks_out(s, m));
                    }
                }
                let inside: Vec<(u64, &Mapping)> =
                    mappings.range(iova..=last).map(|(&s, m)| (s, m)).collect();
                if let Some(&(s, m)) = inside.iter().find(|(s, m)| s + (m.size - 1) > last) {
                    return Err(sticks_out(s, m));
                }
                if inside.is_empty() {
                    return Err(err(
                        ENOENT,
                        format!("nothing is mapped in {iova:#x}..={last:#x}"),
                    ));
                }
                inside.iter().map(|(s, _)| *s).collect()
            };
            if gone.is_empty() {
                return Ok(0);
            }
            let lo = gone[0];
            let (&hs, hm) = mappings
                .range(..=gone[gone.len() - 1])
                .next_back()
                .expect("in");
            let hi = hs + hm.size;
            let bytes = self.remove_mappings(c, ioasid, &groups, &gone, |b, g| {
                if unmap_all {
                    b.unmap_all(g)
                } else {
                    b.unmap(g, lo, hi - lo).map(|_| ())
                }
            })?;
            let io = c.objects.ioas_mut(id)?;
            for s in &gone {
                io.origins.remove(s);
            }
            Ok(bytes)
        })
    }

    /// `IOMMU_OPTION_HUGE_PAGES` of IOAS `id`: with `set`, change it
    /// (`EINVAL` disabling with both a HWPT and mappings; `EADDRINUSE` a
    /// mapping not page aligned); the value now.
    pub fn ioas_huge_pages(
        &self,
        ctx: ContextId,
        id: ObjectId,
        set: Option<bool>,
    ) -> Result<bool, Error> {
        self.with_context(ctx, |c| {
            let io = c.objects.ioas(id)?;
            if set == Some(false) && !io.no_huge_pages {
                let mappings = &c.ioasid(io.ioasid)?.mappings;
                if c.objects.hwpts_of(id).next().is_some() && !mappings.is_empty() {
                    return Err(err(
                        EINVAL,
                        "the IOAS has a HWPT and mappings: unmap them before disabling huge pages",
                    ));
                }
                if let Some(s) = misaligned(io, mappings, PAGE_SIZE) {
                    return Err(err(
                        EADDRINUSE,
                        format!("the mapping at {s:#x} is not page aligned"),
                    ));
                }
            }
            let io = c.objects.ioas_mut(id)?;
            if let Some(on) = set {
                io.no_huge_pages = !on;
            }
            Ok(!io.no_huge_pages)
        })
    }

    /// `IOMMU_VFIO_IOAS`: `Some(Some(id))` sets the compatibility IOAS
    /// (`ENOENT` unless an IOAS), `Some(None)` clears it, `None` gets it
    /// (`ENODEV` when unset).
    pub fn vfio_ioas(
        &self,
        ctx: ContextId,
        set: Option<Option<ObjectId>>,
    ) -> Result<ObjectId, Error> {
        self.with_context(ctx, |c| match set {
            None => c
                .objects
                .compat
                .ok_or_else(|| err(ENODEV, "no compatibility IOAS is set")),
            Some(Some(id)) => {
                c.objects.ioas(id)?;
                c.objects.compat = Some(id);
                Ok(id)
            }
            Some(None) => {
                c.objects.compat = None;
                Ok(0)
            }
        })
    }

    /// `IOMMU_IOAS_CHANGE_PROCESS`: `EINVAL` unless every mapping of every
    /// IOAS was made from a file. The daemon charges pinned memory to the
    /// limit of the process that maps, so nothing moves.
    pub fn ioas_change_process(&self, ctx: ContextId) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            for (id, o) in &c.objects.ids {
                if let Object::Ioas(io) = o {
                    if let Some((s, _)) = io.origins.iter().find(|(_, o)| !o.file) {
                        return Err(err(
                            EINVAL,
                            format!(
                                "IOAS {id}: the mapping at {s:#x} is of user memory; only \
                                 IOMMU_IOAS_MAP_FILE mappings can change process"
                            ),
                        ));
                    }
                }
            }
            Ok(())
        })
    }

    /// For `IOMMU_HWPT_GET_DIRTY_BITMAP`: `ENOENT` unless `hwpt` is a HWPT,
    /// `EOVERFLOW` past the IOVA space, `EINVAL` a range not aligned to
    /// its IOAS, `page_size` 0, or a range not entirely mapped; else Ok
    /// (the front end then answers that dirty tracking is not offered).
    pub fn hwpt_check_dirty_range(
        &self,
        ctx: ContextId,
        hwpt: ObjectId,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            let ioas = c.objects.hwpt(hwpt)?.ioas;
            let last = iova
                .checked_add(length.wrapping_sub(1))
                .filter(|_| length > 0)
                .ok_or_else(|| err(EOVERFLOW, "iova + length - 1 overflows"))?;
            let a = self.geometry(c, ioas)?.alignment;
            if iova % a != 0 || length % a != 0 || page_size == 0 {
                return Err(err(EINVAL, "range not aligned, or page_size 0"));
            }
            let mappings = &c.ioasid(c.objects.ioas(ioas)?.ioasid)?.mappings;
            let mut at = iova;
            while at <= last {
                let Some((&s, m)) = mappings.range(..=at).next_back() else {
                    break;
                };
                if s + (m.size - 1) < at {
                    break;
                }
                match (s + (m.size - 1)).checked_add(1) {
                    Some(n) => at = n,
                    None => return Ok(()),
                }
            }
            if at <= last {
                return Err(err(EINVAL, "the range is not entirely mapped"));
            }
            Ok(())
        })
    }
}

/// The first mapping of `io` (IOVA, length or address offset in the page)
/// not aligned to `align`.
pub(super) fn misaligned(
    io: &IoasObject,
    mappings: &BTreeMap<u64, Mapping>,
    align: u64,
) -> Option<u64> {
    mappings
        .iter()
        .find(|(&s, m)| {
            let addr = io.origins.get(&s).map_or(0, |o| o.addr);
            s % align != 0 || m.size % align != 0 || (addr % PAGE_SIZE) % align != 0
        })
        .map(|(&s, _)| s)
}
