//! Contexts and IOASIDs: what one open of `/dev/ioasid` owns (its
//! IOASIDs, mappings, registrations, bound devices and the groups that
//! realise its IOASIDs), allocating and freeing IOASIDs, and what
//! `IOASID_GET_INFO` reports.

use super::*;

/// Where a mapping's memory comes from.
#[derive(Debug)]
pub(super) enum Memory {
    /// An alias of its own, released when the mapping goes, charged to
    /// process `charged`.
    Own { alias: Alias, charged: Pid },
    /// A slice of the registration starting at this client address.
    Registered(u64),
    /// None: a child's mapping, whose `vaddr` is a parent IOVA.
    Nested,
    /// The client's own (private) memory of address space `mm`, pinned
    /// by the client's own thread in the domains of `pinned_in`.
    Private {
        mm: MmId,
        pinned_in: SmallVec<[GroupId; 2]>,
    },
    /// Reserved by a private map whose client thread has not made it yet
    /// (the number tells reservations apart).
    Pending(u64),
}

impl Memory {
    /// Private memory, made or about to be: no daemon address behind it.
    pub(super) fn is_private(&self) -> bool {
        matches!(self, Memory::Private { .. } | Memory::Pending(_))
    }
}

#[derive(Debug)]
pub(super) struct Mapping {
    pub(super) vaddr: u64,
    pub(super) size: u64,
    pub(super) prot: Prot,
    pub(super) memory: Memory,
}

/// An I/O address space.
#[derive(Debug, Default)]
pub(super) struct Ioasid {
    /// By IOVA; never overlapping. A child's have [`Memory::Nested`].
    pub(super) mappings: BTreeMap<u64, Mapping>,
    /// Domain constraints, `Some` once a device has been attached.
    pub(super) known: Option<DomainInfo>,
    /// Set for a child.
    pub(super) parent: Option<IoasidId>,
    /// A child's bound page table.
    pub(super) pgtable: Option<BoundPgtable>,
    /// A child's bound PASID table.
    pub(super) pasid_table: Option<BoundPasidTable>,
    /// A child's shadow: what every group realising it holds.
    pub(super) shadow: Shadow,
}

impl Ioasid {
    /// What already translates for this child, if anything: a child uses
    /// one protocol at a time (DMA mappings, a page table or a PASID
    /// table), so binding a table needs none of them in use.
    pub(super) fn protocol_in_use(&self) -> Option<&'static str> {
        if self.pgtable.is_some() {
            Some("a page table is bound; unbind it first")
        } else if self.pasid_table.is_some() {
            Some("a PASID table is bound; unbind it first")
        } else if !self.mappings.is_empty() {
            Some("it has DMA mappings; unmap them first")
        } else {
            None
        }
    }
}

#[derive(Debug)]
pub(super) struct Registration {
    pub(super) size: u64,
    /// The alias of shared memory and the process it is charged to; `None`
    /// for private memory, which each map inside pins by the client's own
    /// thread.
    pub(super) alias: Option<(Alias, Pid)>,
    /// Mappings using it.
    pub(super) users: usize,
}

#[derive(Debug, Default)]
pub(super) struct BoundDevice {
    /// RID attachment to a root IOASID.
    pub(super) rid: Option<IoasidId>,
    /// RID attachment to a child of `rid`.
    pub(super) child: Option<IoasidId>,
    pub(super) pasids: BTreeMap<u32, IoasidId>,
}

/// A group whose domain holds an IOASID's mappings (a root's mappings, or
/// a child's shadow).
#[derive(Debug)]
pub(super) struct Realising {
    pub(super) ioasid: IoasidId,
    pub(super) info: DomainInfo,
}

#[derive(Debug)]
pub(super) struct Context {
    /// Its id.
    pub(super) id: ContextId,
    /// The process that opened it, charged with its IOASIDs and mappings
    /// (`None`: opened without a client, no budget).
    pub(super) owner: Option<Pid>,
    /// Set by `close_context`; every later operation fails.
    pub(super) closed: bool,
    /// Slab key `k` is IOASID `k + 1`.
    pub(super) ioasids: Slab<Ioasid>,
    pub(super) bound: BTreeMap<DeviceId, BoundDevice>,
    /// By client start address; never overlapping.
    pub(super) registrations: BTreeMap<u64, Registration>,
    pub(super) realising: BTreeMap<GroupId, Realising>,
    /// Bytes of registrations.
    pub(super) registered_bytes: u64,
    /// Bytes of mappings holding their own alias.
    pub(super) own_bytes: u64,
    /// How many groups are out of service because an undo failed in this
    /// context (see `service`); read without the registry lock.
    pub(super) broken: AtomicUsize,
    /// Aliases given back while a group was out of service: its domain may
    /// still map them. Released once no group of the context is.
    pub(super) held: Vec<Alias>,
    /// An iommufd file's objects (`ioas`); empty for `/dev/ioasid`.
    pub(super) objects: super::ioas::Objects,
}

impl Context {
    pub(super) fn new(id: ContextId, owner: Option<Pid>) -> Self {
        Context {
            id,
            owner,
            closed: false,
            ioasids: Slab::new(),
            bound: BTreeMap::new(),
            registrations: BTreeMap::new(),
            realising: BTreeMap::new(),
            registered_bytes: 0,
            own_bytes: 0,
            broken: AtomicUsize::new(0),
            held: Vec::new(),
            objects: Default::default(),
        }
    }

    pub(super) fn check_open(&self, ctx: ContextId) -> Result<(), Error> {
        if self.closed {
            return Err(not_open(ctx));
        }
        Ok(())
    }

    pub(super) fn ioasid(&self, id: IoasidId) -> Result<&Ioasid, Error> {
        ioasid_key(id)
            .and_then(|k| self.ioasids.get(k))
            .ok_or_else(|| {
                err(
                    ENOENT,
                    format!("IOASID {id} does not exist in this ioasid fd"),
                )
            })
    }

    pub(super) fn ioasid_mut(&mut self, id: IoasidId) -> Result<&mut Ioasid, Error> {
        ioasid_key(id)
            .and_then(|k| self.ioasids.get_mut(k))
            .ok_or_else(|| {
                err(
                    ENOENT,
                    format!("IOASID {id} does not exist in this ioasid fd"),
                )
            })
    }

    /// The groups realising IOASID `id` (on the stack: every map and
    /// unmap asks).
    pub(super) fn groups_of(&self, id: IoasidId) -> Groups {
        self.realising
            .iter()
            .filter(|(_, r)| r.ioasid == id)
            .map(|(g, _)| *g)
            .collect()
    }

    /// The pieces of client memory behind mapping `m` (nearly always one,
    /// kept inline: no allocation on the map path).
    pub(super) fn segments(&self, m: &Mapping) -> Segments {
        match &m.memory {
            Memory::Own { alias, .. } => alias.segments.clone(),
            Memory::Nested | Memory::Private { .. } | Memory::Pending(_) => Segments::new(),
            Memory::Registered(start) => match &self.registrations[start].alias {
                Some((alias, _)) => slice_segments(&alias.segments, m.vaddr - start, m.size),
                None => Segments::new(),
            },
        }
    }

    /// Mappings over all IOASIDs.
    pub(super) fn mapping_count(&self) -> usize {
        self.ioasids.iter().map(|(_, io)| io.mappings.len()).sum()
    }

    pub(super) fn pinned(&self) -> u64 {
        self.registered_bytes + self.own_bytes
    }

    pub(super) fn parent_of(&self, id: IoasidId) -> Option<IoasidId> {
        self.ioasid(id).ok().and_then(|io| io.parent)
    }

    pub(super) fn has_children(&self, id: IoasidId) -> bool {
        self.ioasids.iter().any(|(_, io)| io.parent == Some(id))
    }

    pub(super) fn children_of(&self, id: IoasidId) -> Vec<IoasidId> {
        self.ioasids
            .iter()
            .filter(|(_, io)| io.parent == Some(id))
            .map(|(k, _)| k as IoasidId + 1)
            .collect()
    }

    /// The groups whose devices are RID-attached to root `id`: those
    /// realising it and those realising one of its children.
    pub(super) fn member_groups(&self, id: IoasidId) -> Vec<GroupId> {
        self.realising
            .iter()
            .filter(|(_, r)| r.ioasid == id || self.parent_of(r.ioasid) == Some(id))
            .map(|(g, _)| *g)
            .collect()
    }
}

impl Engine {
    /// Allocate an IOASID in context `ctx`. It accepts map and unmap only
    /// once a device has been attached.
    pub fn alloc(&self, ctx: ContextId) -> Result<IoasidId, Error> {
        self.with_context(ctx, |c| {
            let entry = c.ioasids.vacant_entry();
            let id = u32::try_from(entry.key() + 1)
                .ok()
                .filter(|&i| i <= i32::MAX as u32)
                .ok_or_else(|| err(ENOSPC, "no IOASID number left in this ioasid fd"))?;
            self.take_budget(c.owner, Item::Ioasids, 1)?;
            entry.insert(Ioasid::default());
            Ok(id)
        })
    }

    /// Free IOASID `ioasid` and its mappings. `ENOENT` if unknown, `EBUSY`
    /// while a device is attached to it (or the group rule holds).
    pub fn free(&self, ctx: ContextId, ioasid: IoasidId) -> Result<(), Error> {
        self.with_context(ctx, |c| {
            c.ioasid(ioasid)?;
            self.check_group_rule(c, ioasid)?;
            let users: Vec<&str> = c
                .bound
                .iter()
                .filter(|(_, b)| {
                    b.rid == Some(ioasid)
                        || b.child == Some(ioasid)
                        || b.pasids.values().any(|&i| i == ioasid)
                })
                .map(|(d, _)| self.name(*d))
                .collect();
            let children = c.children_of(ioasid);
            if !children.is_empty() {
                return Err(err(
                    EBUSY,
                    format!("IOASID {ioasid} has children {children:?}; free them first"),
                ));
            }
            if !users.is_empty() {
                return Err(err(
                    EBUSY,
                    format!(
                        "IOASID {ioasid} is in use by {}; detach them first",
                        users.join(", ")
                    ),
                ));
            }
            let key = ioasid_key(ioasid).expect("checked above");
            let io = c.ioasids.remove(key);
            self.give_budget(c.owner, Item::Ioasids, 1);
            self.give_budget(c.owner, Item::Mappings, io.mappings.len());
            for (_, m) in io.mappings {
                self.drop_memory(c, m);
            }
            Ok(())
        })
    }

    /// Give back what a removed mapping held.
    pub(super) fn drop_memory(&self, c: &mut Context, m: Mapping) {
        match m.memory {
            Memory::Own { alias, charged } => {
                self.uncharge(charged, &alias);
                self.release(c, alias);
                c.own_bytes -= m.size;
            }
            Memory::Registered(start) => {
                if let Some(r) = c.registrations.get_mut(&start) {
                    r.users -= 1;
                }
            }
            // A private mapping's pins went with its domains' unmap.
            Memory::Nested | Memory::Private { .. } | Memory::Pending(_) => {}
        }
    }

    /// Check an IOASID accepts commands; returns its realising groups and
    /// domain constraints.
    pub(super) fn usable<'c>(
        &self,
        c: &'c Context,
        id: IoasidId,
    ) -> Result<(Groups, &'c DomainInfo), Error> {
        let io = c.ioasid(id)?;
        self.check_group_rule(c, id)?;
        let known = io.known.as_ref().ok_or_else(|| {
            err(
                ENODEV,
                format!(
                    "IOASID {id} has never had a device attached; attach a device \
                     (VFIO_ATTACH_IOASID) before mapping"
                ),
            )
        })?;
        Ok((c.groups_of(id), known))
    }

    /// What IOASID `ioasid` is: empty (`attached == false`) until a device
    /// has been attached. `ENOENT` unknown, `EBUSY` group rule.
    pub fn info(&self, ctx: ContextId, ioasid: IoasidId) -> Result<IoasidInfo, Error> {
        self.with_context(ctx, |c| {
            let io = c.ioasid(ioasid)?;
            self.check_group_rule(c, ioasid)?;
            let mut devices: Vec<Attachment> = Vec::new();
            for (&device, b) in &c.bound {
                if b.rid == Some(ioasid) {
                    devices.push(Attachment {
                        device,
                        pasid: None,
                    });
                }
                for (&p, &i) in &b.pasids {
                    if i == ioasid {
                        devices.push(Attachment {
                            device,
                            pasid: Some(p),
                        });
                    }
                }
            }
            for (&device, b) in &c.bound {
                if b.child == Some(ioasid) {
                    devices.push(Attachment {
                        device,
                        pasid: None,
                    });
                }
            }
            devices.sort();
            let children = c.children_of(ioasid);
            let Some(known) = &io.known else {
                return Ok(IoasidInfo {
                    devices,
                    parent: io.parent,
                    children,
                    ..IoasidInfo::default()
                });
            };
            let groups = c.groups_of(ioasid);
            // With no realising group, report what was last known.
            let mut dma_avail = if groups.is_empty() {
                known.dma_avail
            } else {
                None
            };
            for g in groups {
                let now = self.backend.domain_info(g)?.dma_avail;
                dma_avail = match (dma_avail, now) {
                    (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                    (a, b) => a.or(b),
                };
            }
            Ok(IoasidInfo {
                attached: true,
                pgsize_bitmap: known.pgsize_bitmap,
                iova_ranges: known.iova_ranges.clone(),
                mappings: io.mappings.len(),
                mapped_bytes: io.mappings.values().map(|m| m.size).sum(),
                devices,
                dma_avail,
                parent: io.parent,
                children,
                nesting_levels: u32::from(io.parent.is_none()),
                shadow_entries: io.shadow.len(),
                pgtable: io.pgtable.as_ref().map(|t| PgtableStatus {
                    root: t.root,
                    leaves: t.leaves.len() as u64,
                    last_walk: t.last_walk,
                    malformed: t.malformed,
                    walks: t.walks,
                }),
                pasid_table: io.pasid_table.as_ref().map(pasid_status),
            })
        })
    }
}
