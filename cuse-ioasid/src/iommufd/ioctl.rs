//! `/dev/iommu`'s ioctls: one row per command of Linux 7.1's iommufd
//! (`IOMMU_DESTROY` .. `IOMMU_HW_QUEUE_ALLOC`), the kernel's
//! `IOCTL_OP(number, handler, struct, last_field)` table, read by the one
//! reader (`ioctl_table::read_struct`: size below the minimum `EINVAL`,
//! non-zero bytes past the struct `E2BIG`, unknown flags `EOPNOTSUPP`), and
//! thin handlers in the kernel's check order (docs/iommufd-semantics.md).
//! Every other number is `ENOTTY`, the VFIO container compatibility range
//! included.

use std::mem::offset_of;

use ioasid_engine::backend::Prot;
use ioasid_engine::{ContextId, IoasMap, MapSource, ObjectKind};
use ioasid_uapi::error::{Errno, Error, Result};
use ioasid_uapi::iommufd::*;
use ioasid_uapi::IOASID_DAEMON_IDENTIFY;
use ioctl_table::{ioctl_op, Caller, Table, Ucmd};

use super::IommufdNode;

/// `ULONG_MAX` on the kernel's side (64-bit).
const ULONG_MAX: u64 = u64::MAX;

/// Most ranges an `IOMMU_IOAS_ALLOW_IOVAS` may list (16 bytes each).
const MAX_ALLOWED_RANGES: u32 = 1 << 16;

/// Every command of `/dev/iommu`, in number order.
pub static IOMMUFD_TABLE: Table<IommufdNode> = Table {
    node: "/dev/iommu",
    unknown_flags: Errno::EOPNOTSUPP,
    ops: &[
        ioctl_op!(IOMMU_DESTROY, destroy, iommu_destroy, id),
        ioctl_op!(
            IOMMU_IOAS_ALLOC,
            ioas_alloc,
            iommu_ioas_alloc,
            out_ioas_id,
            flags = 0
        ),
        ioctl_op!(
            IOMMU_IOAS_ALLOW_IOVAS,
            allow_iovas,
            iommu_ioas_allow_iovas,
            allowed_iovas
        ),
        ioctl_op!(
            IOMMU_IOAS_COPY,
            copy,
            iommu_ioas_copy,
            src_iova,
            flags = IOMMU_IOAS_MAP_ALL
        ),
        ioctl_op!(
            IOMMU_IOAS_IOVA_RANGES,
            iova_ranges,
            iommu_ioas_iova_ranges,
            out_iova_alignment
        ),
        ioctl_op!(
            IOMMU_IOAS_MAP,
            map,
            iommu_ioas_map,
            iova,
            flags = IOMMU_IOAS_MAP_ALL
        ),
        ioctl_op!(IOMMU_IOAS_UNMAP, unmap, iommu_ioas_unmap, length),
        ioctl_op!(IOMMU_OPTION, option, iommu_option, val64),
        ioctl_op!(IOMMU_VFIO_IOAS, vfio_ioas, iommu_vfio_ioas, __reserved),
        ioctl_op!(IOMMU_HWPT_ALLOC, hwpt_alloc, iommu_hwpt_alloc, __reserved),
        ioctl_op!(
            IOMMU_GET_HW_INFO,
            get_hw_info,
            iommu_hw_info,
            __reserved,
            flags = IOMMU_HW_INFO_FLAG_INPUT_TYPE
        ),
        ioctl_op!(
            IOMMU_HWPT_SET_DIRTY_TRACKING,
            set_dirty_tracking,
            iommu_hwpt_set_dirty_tracking,
            __reserved,
            flags = IOMMU_HWPT_DIRTY_TRACKING_ENABLE
        ),
        ioctl_op!(
            IOMMU_HWPT_GET_DIRTY_BITMAP,
            get_dirty_bitmap,
            iommu_hwpt_get_dirty_bitmap,
            data,
            flags = IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
        ),
        ioctl_op!(
            IOMMU_HWPT_INVALIDATE,
            invalidate,
            iommu_hwpt_invalidate,
            __reserved
        ),
        ioctl_op!(
            IOMMU_FAULT_QUEUE_ALLOC,
            fault_queue_alloc,
            iommu_fault_alloc,
            out_fault_fd,
            flags = 0
        ),
        ioctl_op!(
            IOMMU_IOAS_MAP_FILE,
            map_file,
            iommu_ioas_map_file,
            iova,
            flags = IOMMU_IOAS_MAP_ALL
        ),
        ioctl_op!(
            IOMMU_VIOMMU_ALLOC,
            viommu_alloc,
            iommu_viommu_alloc,
            out_viommu_id,
            flags = 0
        ),
        ioctl_op!(
            IOMMU_VDEVICE_ALLOC,
            vdevice_alloc,
            iommu_vdevice_alloc,
            virt_id
        ),
        ioctl_op!(
            IOMMU_IOAS_CHANGE_PROCESS,
            change_process,
            iommu_ioas_change_process,
            __reserved
        ),
        ioctl_op!(
            IOMMU_VEVENTQ_ALLOC,
            veventq_alloc,
            iommu_veventq_alloc,
            out_veventq_fd,
            flags = 0
        ),
        ioctl_op!(
            IOMMU_HW_QUEUE_ALLOC,
            hw_queue_alloc,
            iommu_hw_queue_alloc,
            length,
            flags = 0
        ),
    ],
};

/// Handle ioctl `cmd` with argument `arg` on the `/dev/iommu` file of
/// context `ctx`, issued by `caller`: the row's reader and handler, the
/// failure logged once. A number outside the table is `ENOTTY`, except the
/// daemon-private `IOASID_DAEMON_IDENTIFY` from the daemon itself (the
/// device cdev's bind resolves an iommufd to its context with it).
pub fn dispatch(
    node: &IommufdNode,
    ctx: ContextId,
    caller: &dyn Caller,
    cmd: u32,
    arg: u64,
) -> std::result::Result<i32, Errno> {
    let table = &IOMMUFD_TABLE;
    let Some(op) = table.find(cmd) else {
        if cmd == IOASID_DAEMON_IDENTIFY && caller.pid().ok() == Some(std::process::id() as i32) {
            return i32::try_from(ctx.0).map_err(|_| Errno::EOVERFLOW);
        }
        tracing::debug!(
            cmd = format_args!("{cmd:#x}"),
            "unknown ioctl on /dev/iommu (ENOTTY)"
        );
        return Err(Errno::ENOTTY);
    };
    table.call_logged(op, node, caller, ctx.0, arg)
}

fn ctx(u: &Ucmd<'_>) -> ContextId {
    ContextId(u.fh)
}

fn reserved(what: &str, value: u64) -> Result<()> {
    if value != 0 {
        return Err(Error::new(
            Errno::EOPNOTSUPP,
            format!("{what} is {value:#x}; it must be 0"),
        ));
    }
    Ok(())
}

/// The access bits of a map, copy or map-file: `EINVAL` with neither.
fn prot(flags: u32) -> Result<Prot> {
    let p = Prot {
        read: flags & IOMMU_IOAS_MAP_READABLE != 0,
        write: flags & IOMMU_IOAS_MAP_WRITEABLE != 0,
    };
    if !p.read && !p.write {
        return Err(Error::new(
            Errno::EINVAL,
            "a mapping needs IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE or both",
        ));
    }
    Ok(p)
}

fn below_ulong_max(values: &[(&str, u64)]) -> Result<()> {
    for (name, v) in values {
        if *v == ULONG_MAX {
            return Err(Error::new(Errno::EOVERFLOW, format!("{name} is ULONG_MAX")));
        }
    }
    Ok(())
}

fn fixed(flags: u32, iova: u64) -> Option<u64> {
    (flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0).then_some(iova)
}

fn destroy(n: &IommufdNode, u: &Ucmd<'_>, d: iommu_destroy) -> Result<i32> {
    n.engine.destroy(ctx(u), d.id)?;
    Ok(0)
}

fn ioas_alloc(n: &IommufdNode, u: &Ucmd<'_>, mut a: iommu_ioas_alloc) -> Result<i32> {
    a.out_ioas_id = n.engine.ioas_alloc(ctx(u))?;
    if let Err(e) = u.respond(&a) {
        n.engine.destroy(ctx(u), a.out_ioas_id)?;
        return Err(e);
    }
    Ok(0)
}

fn allow_iovas(n: &IommufdNode, u: &Ucmd<'_>, a: iommu_ioas_allow_iovas) -> Result<i32> {
    reserved("__reserved", u64::from(a.__reserved))?;
    n.engine.check_ioas(ctx(u), a.ioas_id)?;
    if a.num_iovas > MAX_ALLOWED_RANGES {
        return Err(Error::new(
            Errno::ENOMEM,
            format!(
                "{} allowed ranges are more than the daemon takes ({MAX_ALLOWED_RANGES})",
                a.num_iovas
            ),
        ));
    }
    let mut raw = vec![0u8; a.num_iovas as usize * 16];
    if !raw.is_empty() {
        u.caller
            .read_mem(a.allowed_iovas, &mut raw)
            .map_err(|e| Error::new(e, "allowed_iovas cannot be read"))?;
    }
    let ranges: Vec<(u64, u64)> = raw
        .chunks_exact(16)
        .map(|c| {
            let w = |i: usize| u64::from_ne_bytes(c[i..i + 8].try_into().expect("8 bytes"));
            (w(0), w(8))
        })
        .collect();
    n.engine.ioas_allow_iovas(ctx(u), a.ioas_id, &ranges)?;
    Ok(0)
}

fn iova_ranges(n: &IommufdNode, u: &Ucmd<'_>, mut r: iommu_ioas_iova_ranges) -> Result<i32> {
    reserved("__reserved", u64::from(r.__reserved))?;
    let (ranges, alignment) = n.engine.ioas_iova_ranges(ctx(u), r.ioas_id)?;
    let room = (r.num_iovas as usize).min(ranges.len());
    if room > 0 {
        let bytes: Vec<u8> = ranges[..room]
            .iter()
            .flat_map(|(s, l)| s.to_ne_bytes().into_iter().chain(l.to_ne_bytes()))
            .collect();
        u.caller
            .write_mem(r.allowed_iovas, &bytes)
            .map_err(|e| Error::new(e, "allowed_iovas cannot be written"))?;
    }
    let wanted = r.num_iovas as usize;
    r.num_iovas = ranges.len() as u32;
    r.out_iova_alignment = alignment;
    u.respond(&r)?;
    if ranges.len() > wanted {
        return Err(Error::new(
            Errno::EMSGSIZE,
            format!(
                "the IOAS has {} IOVA ranges, room for {wanted}: num_iovas says how many",
                ranges.len()
            ),
        ));
    }
    Ok(0)
}

fn map(n: &IommufdNode, u: &Ucmd<'_>, mut m: iommu_ioas_map) -> Result<i32> {
    reserved("__reserved", u64::from(m.__reserved))?;
    below_ulong_max(&[("iova", m.iova), ("length", m.length)])?;
    let prot = prot(m.flags)?;
    let client = u.client();
    let source = MapSource::User {
        client: &client,
        vaddr: m.user_va,
    };
    let map = IoasMap {
        length: m.length,
        iova: fixed(m.flags, m.iova),
        prot,
    };
    m.iova = n.engine.ioas_map(ctx(u), m.ioas_id, source, map)?;
    u.respond(&m)?;
    Ok(0)
}

fn map_file(n: &IommufdNode, u: &Ucmd<'_>, mut m: iommu_ioas_map_file) -> Result<i32> {
    below_ulong_max(&[("iova", m.iova), ("length", m.length)])?;
    let prot = prot(m.flags)?;
    n.engine.check_ioas(ctx(u), m.ioas_id)?;
    if m.length == 0 {
        return Err(Error::new(Errno::EINVAL, "cannot map 0 bytes"));
    }
    if m.start.checked_add(m.length - 1).is_none() {
        return Err(Error::new(Errno::EOVERFLOW, "start + length - 1 overflows"));
    }
    let file = u.caller.get_fd(m.fd).map_err(|e| {
        Error::new(
            e,
            format!("fd {} is not an open file descriptor of the caller", m.fd),
        )
    })?;
    let client = u.client();
    let source = MapSource::File {
        file: std::os::fd::AsFd::as_fd(&file),
        offset: m.start,
        client: &client,
    };
    let map = IoasMap {
        length: m.length,
        iova: fixed(m.flags, m.iova),
        prot,
    };
    m.iova = n.engine.ioas_map(ctx(u), m.ioas_id, source, map)?;
    drop(file);
    u.respond(&m)?;
    Ok(0)
}

fn copy(n: &IommufdNode, u: &Ucmd<'_>, mut c: iommu_ioas_copy) -> Result<i32> {
    below_ulong_max(&[
        ("length", c.length),
        ("src_iova", c.src_iova),
        ("dst_iova", c.dst_iova),
    ])?;
    let prot = prot(c.flags)?;
    let map = IoasMap {
        length: c.length,
        iova: fixed(c.flags, c.dst_iova),
        prot,
    };
    c.dst_iova = n.engine.ioas_copy(
        ctx(u),
        &u.client(),
        c.dst_ioas_id,
        c.src_ioas_id,
        c.src_iova,
        map,
    )?;
    u.respond(&c)?;
    Ok(0)
}

fn unmap(n: &IommufdNode, u: &Ucmd<'_>, mut m: iommu_ioas_unmap) -> Result<i32> {
    m.length = n.engine.ioas_unmap(ctx(u), m.ioas_id, m.iova, m.length)?;
    u.respond(&m)?;
    Ok(0)
}

/// Whether thread `tid` has `CAP_SYS_RESOURCE` in its effective set.
fn has_cap_sys_resource(tid: i32) -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

fn option(n: &IommufdNode, u: &Ucmd<'_>, mut o: iommu_option) -> Result<i32> {
    reserved("__reserved", u64::from(o.__reserved))?;
    let bad_op = || {
        Error::new(
            Errno::EOPNOTSUPP,
            format!("op {} is neither SET nor GET", o.op),
        )
    };
    match o.option_id {
        IOMMU_OPTION_RLIMIT_MODE => {
            if o.object_id != 0 {
                return Err(Error::new(
                    Errno::EOPNOTSUPP,
                    "IOMMU_OPTION_RLIMIT_MODE is per file: object_id must be 0",
                ));
            }
            match o.op {
                IOMMU_OPTION_OP_GET => o.val64 = 1,
                IOMMU_OPTION_OP_SET => {
                    if !has_cap_sys_resource(u.caller.tid()) {
                        return Err(Error::new(
                            Errno::EPERM,
                            "setting IOMMU_OPTION_RLIMIT_MODE needs CAP_SYS_RESOURCE",
                        ));
                    }
                    if n.engine.has_objects(ctx(u))? {
                        return Err(Error::new(
                            Errno::EBUSY,
                            "IOMMU_OPTION_RLIMIT_MODE can only change before any object exists",
                        ));
                    }
                    match o.val64 {
                        1 => {}
                        0 => {
                            return Err(Error::new(
                                Errno::EOPNOTSUPP,
                                "the daemon charges pinned memory per process (mode 1), as VFIO \
                                 type1 does; per-user accounting (0) is not offered",
                            ))
                        }
                        v => {
                            return Err(Error::new(
                                Errno::EINVAL,
                                format!("RLIMIT_MODE {v} is neither 0 nor 1"),
                            ))
                        }
                    }
                }
                _ => return Err(bad_op()),
            }
        }
        IOMMU_OPTION_HUGE_PAGES => {
            n.engine.check_ioas(ctx(u), o.object_id)?;
            let set = match o.op {
                IOMMU_OPTION_OP_GET => None,
                IOMMU_OPTION_OP_SET => match o.val64 {
                    0 => Some(false),
                    1 => Some(true),
                    v => {
                        return Err(Error::new(
                            Errno::EINVAL,
                            format!("HUGE_PAGES {v} is neither 0 nor 1"),
                        ))
                    }
                },
                _ => return Err(bad_op()),
            };
            o.val64 = u64::from(n.engine.ioas_huge_pages(ctx(u), o.object_id, set)?);
        }
        other => {
            return Err(Error::new(
                Errno::EOPNOTSUPP,
                format!("unknown option {other}"),
            ))
        }
    }
    let at = offset_of!(iommu_option, val64);
    u.write_fields(&o, at..at + 8)?;
    Ok(0)
}

fn vfio_ioas(n: &IommufdNode, u: &Ucmd<'_>, mut v: iommu_vfio_ioas) -> Result<i32> {
    reserved("__reserved", u64::from(v.__reserved))?;
    match v.op {
        IOMMU_VFIO_IOAS_GET => {
            v.ioas_id = n.engine.vfio_ioas(ctx(u), None)?;
            u.respond(&v)?;
        }
        IOMMU_VFIO_IOAS_SET => {
            n.engine.vfio_ioas(ctx(u), Some(Some(v.ioas_id)))?;
        }
        IOMMU_VFIO_IOAS_CLEAR => {
            n.engine.vfio_ioas(ctx(u), Some(None))?;
        }
        op => {
            return Err(Error::new(
                Errno::EOPNOTSUPP,
                format!("IOMMU_VFIO_IOAS op {op} is not GET, SET or CLEAR"),
            ))
        }
    }
    Ok(0)
}

fn hwpt_alloc(n: &IommufdNode, u: &Ucmd<'_>, mut h: iommu_hwpt_alloc) -> Result<i32> {
    reserved("__reserved", u64::from(h.__reserved))?;
    let none = h.data_type == IOMMU_HWPT_DATA_NONE;
    if none == (h.data_len != 0) {
        return Err(Error::new(
            Errno::EINVAL,
            "data_len must be 0 for IOMMU_HWPT_DATA_NONE and non-zero for any other data_type",
        ));
    }
    h.out_hwpt_id = n
        .engine
        .hwpt_alloc(ctx(u), h.dev_id, h.pt_id, h.flags, !none)?;
    if let Err(e) = u.respond(&h) {
        n.engine.destroy(ctx(u), h.out_hwpt_id)?;
        return Err(e);
    }
    Ok(0)
}

fn get_hw_info(n: &IommufdNode, u: &Ucmd<'_>, mut h: iommu_hw_info) -> Result<i32> {
    if h.__reserved.iter().any(|&b| b != 0) {
        return Err(Error::new(Errno::EOPNOTSUPP, "__reserved must be 0"));
    }
    let dev = n.engine.device_object(ctx(u), h.dev_id)?;
    // The legacy backend is an IOMMU driver without hw_info: no data, and
    // the caller's buffer is zeroed over its length.
    const CHUNK: usize = 64 * 1024;
    let zeros = vec![0u8; CHUNK];
    let mut done: u64 = 0;
    while done < u64::from(h.data_len) {
        let n = (u64::from(h.data_len) - done).min(CHUNK as u64) as usize;
        u.caller
            .write_mem(h.data_uptr + done, &zeros[..n])
            .map_err(|e| Error::new(e, "data_uptr cannot be written"))?;
        done += n as u64;
    }
    h.data_len = 0;
    h.__bindgen_anon_1.out_data_type = IOMMU_HW_INFO_TYPE_NONE;
    h.out_max_pasid_log2 = 0;
    h.out_capabilities = if n.ats.contains(&dev) {
        0
    } else {
        IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED
    };
    u.respond(&h)?;
    Ok(0)
}

fn not_offered(what: &str) -> Error {
    Error::new(
        Errno::EOPNOTSUPP,
        format!("{what} is not offered: legacy VFIO has no such IOMMU feature"),
    )
}

fn set_dirty_tracking(
    n: &IommufdNode,
    u: &Ucmd<'_>,
    d: iommu_hwpt_set_dirty_tracking,
) -> Result<i32> {
    if n.engine.object_kind(ctx(u), d.hwpt_id)? != Some(ObjectKind::Hwpt) {
        return Err(Error::new(
            Errno::ENOENT,
            format!("hwpt_id {} is not a paging HWPT", d.hwpt_id),
        ));
    }
    Err(not_offered("dirty tracking"))
}

fn get_dirty_bitmap(n: &IommufdNode, u: &Ucmd<'_>, d: iommu_hwpt_get_dirty_bitmap) -> Result<i32> {
    reserved("__reserved", u64::from(d.__reserved))?;
    n.engine
        .hwpt_check_dirty_range(ctx(u), d.hwpt_id, d.iova, d.length, d.page_size)?;
    Err(not_offered("dirty tracking"))
}

fn invalidate(n: &IommufdNode, u: &Ucmd<'_>, mut i: iommu_hwpt_invalidate) -> Result<i32> {
    reserved("__reserved", u64::from(i.__reserved))?;
    if i.entry_num != 0
        && (i.data_uptr == 0 || i.entry_len == 0 || i.entry_len > 4096 || i.entry_num > 1 << 19)
    {
        return Err(Error::new(
            Errno::EINVAL,
            "entry_num without data_uptr, or entry_len 0 or above a page, or too many entries",
        ));
    }
    let kind = n.engine.object_kind(ctx(u), i.hwpt_id)?;
    i.entry_num = 0;
    u.respond(&i)?;
    match kind {
        None => Err(Error::new(
            Errno::ENOENT,
            format!("hwpt_id {}: no such object", i.hwpt_id),
        )),
        Some(k) => Err(Error::new(
            Errno::EINVAL,
            format!(
                "hwpt_id {} is a {k:?}: only nested HWPTs and vIOMMUs take invalidations",
                i.hwpt_id
            ),
        )),
    }
}

fn fault_queue_alloc(_: &IommufdNode, _: &Ucmd<'_>, _: iommu_fault_alloc) -> Result<i32> {
    Err(not_offered("an I/O page fault queue"))
}

fn viommu_alloc(n: &IommufdNode, u: &Ucmd<'_>, v: iommu_viommu_alloc) -> Result<i32> {
    if v.type_ == IOMMU_VIOMMU_TYPE_DEFAULT {
        return Err(Error::new(
            Errno::EOPNOTSUPP,
            "IOMMU_VIOMMU_TYPE_DEFAULT is not a vIOMMU type",
        ));
    }
    n.engine.device_object(ctx(u), v.dev_id)?;
    Err(not_offered("a vIOMMU"))
}

fn no_viommu(id: u32) -> Error {
    Error::new(
        Errno::ENOENT,
        format!("viommu_id {id}: no vIOMMU exists on legacy VFIO"),
    )
}

fn vdevice_alloc(_: &IommufdNode, _: &Ucmd<'_>, v: iommu_vdevice_alloc) -> Result<i32> {
    Err(no_viommu(v.viommu_id))
}

fn veventq_alloc(_: &IommufdNode, _: &Ucmd<'_>, v: iommu_veventq_alloc) -> Result<i32> {
    reserved("__reserved", u64::from(v.__reserved))?;
    if v.type_ == IOMMU_VEVENTQ_TYPE_DEFAULT {
        return Err(Error::new(
            Errno::EOPNOTSUPP,
            "IOMMU_VEVENTQ_TYPE_DEFAULT is not an event queue type",
        ));
    }
    if v.veventq_depth == 0 {
        return Err(Error::new(Errno::EINVAL, "veventq_depth must not be 0"));
    }
    Err(no_viommu(v.viommu_id))
}

fn hw_queue_alloc(_: &IommufdNode, _: &Ucmd<'_>, q: iommu_hw_queue_alloc) -> Result<i32> {
    if q.type_ == IOMMU_HW_QUEUE_TYPE_DEFAULT {
        return Err(Error::new(
            Errno::EOPNOTSUPP,
            "IOMMU_HW_QUEUE_TYPE_DEFAULT is not a queue type",
        ));
    }
    if q.length == 0 {
        return Err(Error::new(Errno::EINVAL, "length must not be 0"));
    }
    if q.nesting_parent_iova.checked_add(q.length - 1).is_none() {
        return Err(Error::new(
            Errno::EOVERFLOW,
            "nesting_parent_iova + length - 1 overflows",
        ));
    }
    Err(no_viommu(q.viommu_id))
}

fn change_process(n: &IommufdNode, u: &Ucmd<'_>, c: iommu_ioas_change_process) -> Result<i32> {
    reserved("__reserved", u64::from(c.__reserved))?;
    n.engine.ioas_change_process(ctx(u))?;
    Ok(0)
}
