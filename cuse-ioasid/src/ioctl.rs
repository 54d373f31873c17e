//! `/dev/ioasid`'s ioctls: one table, a row per command, and the thin
//! handlers that turn a decoded argument into an [`Engine`] call, with no
//! CUSE and no system call.
//!
//! The ABI's rules (`uapi/include/linux/ioasid.h`) are applied by the table
//! and its reader ([`ioctl_table`]):
//!
//! - unknown numbers, and commands of an extension that
//!   `IOASID_CHECK_EXTENSION` reports as 0, are `ENOTTY`;
//! - a struct argument is read by `ioctl_table::read_struct`: `argsz`
//!   below the struct's size is `EINVAL`; bytes past the known struct must
//!   be zero (`E2BIG`), except for `IOASID_GET_INFO`, where they are the
//!   output buffer; a tail longer than [`MAX_TAIL`] is `E2BIG` without
//!   being read; unknown flags are `EINVAL` (this ABI's choice, where
//!   iommufd says `EOPNOTSUPP`), as are non-zero reserved fields; an
//!   unreadable or unwritable argument is `EFAULT`;
//! - only output fields are written back, never past the known struct
//!   (`IOASID_GET_INFO`'s capability chain excepted, which stays in
//!   `argsz`).
//!
//! Every refusal is logged once, with the errno and the engine's message,
//! by the one rule of `ioctl_table::log` (info for a client's mistake,
//! warn otherwise, within the client's log budget); a call that walked a
//! client's tables writes at most one more line, a summary.

use std::mem::offset_of;

use ioasid_engine::backend::Prot;
use ioasid_engine::{ContextId, DmaMap, Engine, Invalidation, WalkReport};
use ioasid_uapi::error::{Errno, Error, Result};
use ioasid_uapi::*;
use ioctl_table::log::{self, Client};
use ioctl_table::{ioctl_op, Caller, Table, Ucmd};
use zerocopy::IntoBytes;

pub use ioctl_table::MAX_TAIL;

use crate::info::get_info;

/// The extensions this daemon provides (`IOASID_CHECK_EXTENSION` says 1).
/// Everything else is 0 and its commands are `ENOTTY`: hardware nesting
/// and PASID DMA routing, which legacy VFIO cannot do.
pub const EXTENSIONS: &[u32] = &[
    ioasid_uapi::IOASID_EXT_TYPE1V2_DMA,
    ioasid_uapi::IOASID_EXT_REGISTER_MEMORY,
    ioasid_uapi::IOASID_EXT_NESTING_SOFTWARE,
    ioasid_uapi::IOASID_EXT_BIND_PGTABLE_SHADOW,
    ioasid_uapi::IOASID_EXT_BIND_PASID_TABLE_SHADOW,
    ioasid_uapi::IOASID_EXT_USER_PASID_TRACKED,
];

/// Whether extension `ext` is provided.
pub fn has_extension(ext: u64) -> bool {
    u32::try_from(ext).is_ok_and(|e| EXTENSIONS.contains(&e))
}

/// Width of a PASID.
const PASID_BITS: u32 = IOASID_PASID_BITS;

/// Every command of the ioasid file, in number order. A row's `requires`
/// is the extension `IOASID_CHECK_EXTENSION` must report for the command
/// to be available (0: always).
pub static IOASID_TABLE: Table<Engine> = Table {
    node: "/dev/ioasid",
    unknown_flags: Errno::EINVAL,
    ops: &[
        ioctl_op!(IOASID_CHECK_EXTENSION, check_extension, int).stateless(),
        ioctl_op!(
            IOASID_REGISTER_MEMORY,
            register_memory,
            IoasidRegisterMemory,
            size,
            flags = 0
        )
        .requires(IOASID_EXT_REGISTER_MEMORY),
        ioctl_op!(
            IOASID_UNREGISTER_MEMORY,
            unregister_memory,
            IoasidRegisterMemory,
            size,
            flags = 0
        )
        .requires(IOASID_EXT_REGISTER_MEMORY),
        ioctl_op!(IOASID_ALLOC, alloc),
        ioctl_op!(IOASID_FREE, free, int),
        ioctl_op!(IOASID_GET_INFO, get_info, IoasidInfo, pgsize_bitmap)
            .output_flags()
            .output_tail(),
        ioctl_op!(
            IOASID_MAP_DMA,
            map_dma,
            IoasidDmaMap,
            size,
            flags = IOASID_DMA_MAP_FLAG_READ | IOASID_DMA_MAP_FLAG_WRITE
        )
        .requires(IOASID_EXT_TYPE1V2_DMA),
        ioctl_op!(
            IOASID_UNMAP_DMA,
            unmap_dma,
            IoasidDmaUnmap,
            size,
            flags = IOASID_DMA_UNMAP_FLAG_ALL
        )
        .requires(IOASID_EXT_TYPE1V2_DMA),
        ioctl_op!(IOASID_CREATE_NESTING, create_nesting, int).requires(IOASID_EXT_NESTING_SOFTWARE),
        ioctl_op!(
            IOASID_BIND_PGTABLE,
            bind_pgtable,
            IoasidBindPgtable,
            pgtable,
            flags = 0
        )
        .requires(IOASID_EXT_BIND_PGTABLE_SHADOW),
        ioctl_op!(
            IOASID_UNBIND_PGTABLE,
            unbind_pgtable,
            IoasidUnbindPgtable,
            reserved,
            flags = 0
        )
        .requires(IOASID_EXT_BIND_PGTABLE_SHADOW),
        ioctl_op!(
            IOASID_BIND_PASID_TABLE,
            bind_pasid_table,
            IoasidBindPasidTable,
            reserved,
            flags = 0
        )
        .requires(IOASID_EXT_BIND_PASID_TABLE_SHADOW),
        ioctl_op!(
            IOASID_UNBIND_PASID_TABLE,
            unbind_pasid_table,
            IoasidUnbindPasidTable,
            reserved,
            flags = 0
        )
        .requires(IOASID_EXT_BIND_PASID_TABLE_SHADOW),
        ioctl_op!(
            IOASID_INVALIDATE_CACHE,
            invalidate_cache,
            IoasidInvalidateCache,
            size,
            flags =
                IOASID_INVALIDATE_ADDR | IOASID_INVALIDATE_PASID | IOASID_INVALIDATE_PASID_CACHE
        )
        .requires(IOASID_EXT_BIND_PGTABLE_SHADOW),
        ioctl_op!(IOASID_DAEMON_IDENTIFY, daemon_identify),
    ],
};

/// Handle ioctl `cmd` with argument `arg` on the `/dev/ioasid` file of
/// context `ctx`, issued by `caller`. Returns the ioctl's return value or
/// the errno.
pub fn dispatch(
    engine: &Engine,
    ctx: ContextId,
    caller: &dyn Caller,
    cmd: u32,
    arg: u64,
) -> std::result::Result<i32, Errno> {
    let table = &IOASID_TABLE;
    let Some(op) = table.find(cmd) else {
        tracing::debug!(
            cmd = format_args!("{cmd:#x}"),
            "unknown ioctl on /dev/ioasid"
        );
        return Err(Errno::ENOTTY);
    };
    if op.requires != 0 && !has_extension(u64::from(op.requires)) {
        tracing::info!(
            cmd = op.name,
            "not provided by this daemon (IOASID_CHECK_EXTENSION({}) reports 0)",
            op.requires
        );
        return Err(Errno::ENOTTY);
    }
    table.call_logged(op, engine, caller, ctx.0, arg)
}

fn ctx(u: &Ucmd<'_>) -> ContextId {
    ContextId(u.fh)
}

fn check_extension(_: &Engine, _: &Ucmd<'_>, ext: u64) -> Result<i32> {
    Ok(i32::from(has_extension(ext)))
}

fn alloc(engine: &Engine, u: &Ucmd<'_>) -> Result<i32> {
    new_id(engine.alloc(ctx(u))?)
}

fn free(engine: &Engine, u: &Ucmd<'_>, arg: u64) -> Result<i32> {
    engine.free(ctx(u), int_ioasid(arg)?)?;
    Ok(0)
}

fn daemon_identify(_: &Engine, u: &Ucmd<'_>) -> Result<i32> {
    let pid = u
        .caller
        .pid()
        .map_err(|e| Error::new(e, "the calling process is gone"))?;
    if u32::try_from(pid).ok() != Some(std::process::id()) {
        return Err(Error::new(
            Errno::EPERM,
            format!("IOASID_DAEMON_IDENTIFY from process {pid}: it is private to the daemon"),
        ));
    }
    i32::try_from(u.fh).map_err(|_| Error::new(Errno::EOVERFLOW, "context id does not fit an int"))
}

fn register_memory(engine: &Engine, u: &Ucmd<'_>, r: IoasidRegisterMemory) -> Result<i32> {
    engine.register_memory(ctx(u), &u.client(), r.vaddr, r.size)?;
    Ok(0)
}

fn unregister_memory(engine: &Engine, u: &Ucmd<'_>, r: IoasidRegisterMemory) -> Result<i32> {
    engine.unregister_memory(ctx(u), r.vaddr, r.size)?;
    Ok(0)
}

fn map_dma(engine: &Engine, u: &Ucmd<'_>, m: IoasidDmaMap) -> Result<i32> {
    no_reserved(m.reserved)?;
    let prot = Prot {
        read: m.flags & IOASID_DMA_MAP_FLAG_READ != 0,
        write: m.flags & IOASID_DMA_MAP_FLAG_WRITE != 0,
    };
    let map = DmaMap {
        iova: m.iova,
        vaddr: m.vaddr,
        size: m.size,
        prot,
    };
    engine.map_dma(ctx(u), &u.client(), m.ioasid, map)?;
    Ok(0)
}

fn unmap_dma(engine: &Engine, u: &Ucmd<'_>, m: IoasidDmaUnmap) -> Result<i32> {
    no_reserved(m.reserved)?;
    let bytes = if m.flags & IOASID_DMA_UNMAP_FLAG_ALL != 0 {
        if m.iova != 0 || m.size != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                "IOASID_DMA_UNMAP_FLAG_ALL needs iova and size 0",
            ));
        }
        engine.unmap_all_dma(ctx(u), m.ioasid)?
    } else {
        engine.unmap_dma(ctx(u), m.ioasid, m.iova, m.size)?
    };
    u.write_at(offset_of!(IoasidDmaUnmap, size), bytes.as_bytes())?;
    Ok(0)
}

fn create_nesting(engine: &Engine, u: &Ucmd<'_>, arg: u64) -> Result<i32> {
    new_id(engine.create_nesting(ctx(u), int_ioasid(arg)?)?)
}

fn bind_pgtable(engine: &Engine, u: &Ucmd<'_>, b: IoasidBindPgtable) -> Result<i32> {
    no_reserved(b.reserved)?;
    let report = engine.bind_pgtable(ctx(u), b.ioasid, b.format, b.addr_width, b.pgtable)?;
    log_walks(u, b.ioasid, &report);
    Ok(0)
}

/// One line for what the walks of one call found wrong, if anything,
/// within the client's log budget (never a line per entry: a hostile table
/// has a million of them).
fn log_walks(u: &Ucmd<'_>, ioasid: u32, report: &WalkReport) {
    if report.is_clean() {
        return;
    }
    if let Some(dropped) = log::client_line(Client::Context(u.fh)) {
        tracing::info!(cmd = u.name, ioasid, "{report}{dropped}");
    }
}

fn unbind_pgtable(engine: &Engine, u: &Ucmd<'_>, b: IoasidUnbindPgtable) -> Result<i32> {
    no_reserved(b.reserved)?;
    engine.unbind_pgtable(ctx(u), b.ioasid)?;
    Ok(0)
}

fn bind_pasid_table(engine: &Engine, u: &Ucmd<'_>, b: IoasidBindPasidTable) -> Result<i32> {
    no_reserved(b.reserved)?;
    let report = engine.bind_pasid_table(ctx(u), b.ioasid, b.format, b.table, b.entries)?;
    log_walks(u, b.ioasid, &report);
    Ok(0)
}

fn unbind_pasid_table(engine: &Engine, u: &Ucmd<'_>, b: IoasidUnbindPasidTable) -> Result<i32> {
    no_reserved(b.reserved)?;
    engine.unbind_pasid_table(ctx(u), b.ioasid)?;
    Ok(0)
}

fn invalidate_cache(engine: &Engine, u: &Ucmd<'_>, i: IoasidInvalidateCache) -> Result<i32> {
    let inv = invalidation(&i)?;
    let report = engine.invalidate(ctx(u), i.ioasid, inv)?;
    log_walks(u, i.ioasid, &report);
    Ok(0)
}

/// The granularity of an `IOASID_INVALIDATE_CACHE`, with the field rules
/// the engine cannot see: fields a flag does not enable must be 0.
fn invalidation(i: &IoasidInvalidateCache) -> Result<Invalidation> {
    let range = if i.flags & ioasid_uapi::IOASID_INVALIDATE_ADDR != 0 {
        Some((i.addr, i.size))
    } else if i.addr != 0 || i.size != 0 {
        return Err(Error::new(
            Errno::EINVAL,
            "addr and size must be 0 without IOASID_INVALIDATE_ADDR",
        ));
    } else {
        None
    };
    let pasid = if i.flags & ioasid_uapi::IOASID_INVALIDATE_PASID != 0 {
        if i.pasid >= 1 << PASID_BITS {
            return Err(Error::new(
                Errno::EINVAL,
                format!("PASID {:#x} does not fit {PASID_BITS} bits", i.pasid),
            ));
        }
        Some(i.pasid)
    } else if i.pasid != 0 {
        return Err(Error::new(
            Errno::EINVAL,
            "pasid must be 0 without IOASID_INVALIDATE_PASID",
        ));
    } else {
        None
    };
    Ok(Invalidation {
        range,
        pasid,
        pasid_cache: i.flags & ioasid_uapi::IOASID_INVALIDATE_PASID_CACHE != 0,
    })
}

fn new_id(id: u32) -> Result<i32> {
    i32::try_from(id).map_err(|_| Error::new(Errno::ENOSPC, "IOASID number too large"))
}

fn int_ioasid(arg: u64) -> Result<u32> {
    u32::try_from(arg)
        .map_err(|_| Error::new(Errno::ENOENT, format!("IOASID {arg} does not exist")))
}

fn no_reserved(reserved: u32) -> Result<()> {
    if reserved != 0 {
        return Err(Error::new(
            Errno::EINVAL,
            format!("__reserved is {reserved:#x}; it must be 0"),
        ));
    }
    Ok(())
}
