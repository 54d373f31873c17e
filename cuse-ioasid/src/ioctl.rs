//! Decoding `/dev/ioasid` ioctls: from a command number and an argument to
//! an [`Engine`] call and back, with no CUSE and no system call.
//!
//! [`dispatch`] applies the ABI's rules (`uapi/include/linux/ioasid.h`) in
//! one place, driven by the uapi crate's command table:
//!
//! - unknown numbers, and commands of an extension that
//!   `IOASID_CHECK_EXTENSION` reports as 0, are `ENOTTY`;
//! - a struct argument is read through [`CallerMemory`]: `argsz` first;
//!   below the struct's minimum size is `EINVAL`; `min(argsz, size)` bytes
//!   are read; bytes past the known struct must be zero (`E2BIG`), except
//!   for `IOASID_GET_INFO`, where they are the output buffer; a tail longer
//!   than [`MAX_TAIL`] is refused with `E2BIG` without being read, so a
//!   client cannot make the daemon read gigabytes; unknown flags and
//!   non-zero reserved fields are `EINVAL`; an unreadable or unwritable
//!   argument is `EFAULT`;
//! - only output fields are written back, never past the known struct
//!   (`IOASID_GET_INFO`'s capability chain excepted, which stays in `argsz`).
//!
//! Every failure is logged once, with the errno and the engine's message:
//! at debug level for a client's mistake, at warn level otherwise.

use ioasid_engine::backend::{Pid, Prot};
use ioasid_engine::{ContextId, DmaMap, Engine, Error, Invalidation, IoasidInfo};
use ioasid_uapi::{
    ArgStruct, FlagsCheck, IoasidBindPasidTable, IoasidBindPgtable, IoasidCmd, IoasidDmaMap,
    IoasidDmaUnmap, IoasidInfoCapDmaAvail, IoasidInfoCapHeader, IoasidInfoCapIovaRanges,
    IoasidInfoCapNesting, IoasidInfoCapParent, IoasidInfoCapPasid, IoasidInfoCapPgtableFormats,
    IoasidInfoCapShadow, IoasidInvalidateCache, IoasidIovaRange, IoasidPgtableFormatDesc,
    IoasidRegisterMemory, IoasidUnbindPasidTable, IoasidUnbindPgtable, StructArg,
};
use nix::errno::Errno;
use zerocopy::{FromBytes, IntoBytes};

/// The memory of the process that issued the ioctl.
///
/// The CUSE layer implements it with `process_vm_readv`/`process_vm_writev`
/// on the caller; tests with a byte buffer.
pub trait CallerMemory {
    /// Fill `buf` from the caller's address `addr` (`EFAULT` if unreadable).
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Write `buf` at the caller's address `addr` (`EFAULT` if unwritable).
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), Errno>;
    /// The calling thread's id. Its `/proc` entry shows the process's
    /// memory map and its limits, so the commands that alias client memory
    /// (`IOASID_MAP_DMA`, `IOASID_REGISTER_MEMORY`) hand it to the engine;
    /// known without any look-up.
    fn task(&self) -> Pid;
    /// The calling process's id (its thread-group id; `ESRCH` if it is
    /// gone). Asked only by `IOASID_DAEMON_IDENTIFY`: finding it costs a
    /// read of `/proc`.
    fn pid(&self) -> Result<Pid, Errno>;
}

/// The longest tail past a known struct that is read and checked for
/// zeros; a longer one is refused with `E2BIG` (the kernel would read it
/// all; nothing in this ABI needs more).
pub const MAX_TAIL: usize = 64 * 1024;

/// Chunk in which a tail is read.
const TAIL_CHUNK: usize = 4096;

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

/// Width of a PASID, reported in `IOASID_INFO_CAP_PASID`.
const PASID_BITS: u32 = ioasid_uapi::IOASID_PASID_BITS;

/// Handle ioctl `cmd` with argument `arg` on the `/dev/ioasid` file of
/// context `ctx`, issued by the process `caller` (its memory, and its pid
/// for the commands that need one). Returns the ioctl's return value or
/// the errno.
pub fn dispatch(
    engine: &Engine,
    ctx: ContextId,
    caller: &dyn CallerMemory,
    cmd: u32,
    arg: u64,
) -> Result<i32, Errno> {
    let Ok(command) = IoasidCmd::try_from(cmd) else {
        tracing::debug!(
            cmd = format_args!("{cmd:#x}"),
            "unknown ioctl on /dev/ioasid"
        );
        return Err(Errno::ENOTTY);
    };
    if let Some(ext) = command.extension() {
        if !has_extension(u64::from(ext)) {
            tracing::info!(
                cmd = command.name(),
                "not provided by this daemon (IOASID_CHECK_EXTENSION({ext}) reports 0)"
            );
            return Err(Errno::ENOTTY);
        }
    }
    let result = handle(engine, ctx, caller, command, arg);
    if let Err(f) = &result {
        if f.is_client_mistake() {
            tracing::debug!(cmd = command.name(), errno = %f.errno, "{}", f.message);
        } else {
            tracing::warn!(cmd = command.name(), errno = %f.errno, "{}", f.message);
        }
    }
    result.map_err(|f| f.errno)
}

fn handle(
    engine: &Engine,
    ctx: ContextId,
    caller: &dyn CallerMemory,
    command: IoasidCmd,
    arg: u64,
) -> Result<i32, Error> {
    match command {
        IoasidCmd::CheckExtension => Ok(i32::from(has_extension(arg))),
        IoasidCmd::Alloc => {
            let id = engine.alloc(ctx)?;
            i32::try_from(id).map_err(|_| Error::new(Errno::ENOSPC, "IOASID number too large"))
        }
        IoasidCmd::Free => {
            let id = int_ioasid(arg)?;
            engine.free(ctx, id)?;
            Ok(0)
        }
        IoasidCmd::DaemonIdentify => {
            let pid = caller
                .pid()
                .map_err(|e| Error::new(e, "the calling process is gone"))?;
            if u32::try_from(pid).ok() != Some(std::process::id()) {
                return Err(Error::new(
                    Errno::EPERM,
                    format!(
                        "IOASID_DAEMON_IDENTIFY from process {pid}: it is private to the daemon"
                    ),
                ));
            }
            i32::try_from(ctx.0)
                .map_err(|_| Error::new(Errno::EOVERFLOW, "context id does not fit an int"))
        }
        IoasidCmd::RegisterMemory | IoasidCmd::UnregisterMemory => {
            let (r, _) = read_struct::<IoasidRegisterMemory>(caller, arg)?;
            if command == IoasidCmd::RegisterMemory {
                engine.register_memory(ctx, caller.task(), r.vaddr, r.size)?;
            } else {
                engine.unregister_memory(ctx, r.vaddr, r.size)?;
            }
            Ok(0)
        }
        IoasidCmd::MapDma => {
            let (m, _) = read_struct::<IoasidDmaMap>(caller, arg)?;
            no_reserved(m.reserved)?;
            let prot = Prot {
                read: m.flags & ioasid_uapi::IOASID_DMA_MAP_FLAG_READ != 0,
                write: m.flags & ioasid_uapi::IOASID_DMA_MAP_FLAG_WRITE != 0,
            };
            let map = DmaMap {
                iova: m.iova,
                vaddr: m.vaddr,
                size: m.size,
                prot,
            };
            engine.map_dma(ctx, caller.task(), m.ioasid, map)?;
            Ok(0)
        }
        IoasidCmd::UnmapDma => {
            let (u, _) = read_struct::<IoasidDmaUnmap>(caller, arg)?;
            no_reserved(u.reserved)?;
            let bytes = if u.flags & ioasid_uapi::IOASID_DMA_UNMAP_FLAG_ALL != 0 {
                if u.iova != 0 || u.size != 0 {
                    return Err(Error::new(
                        Errno::EINVAL,
                        "IOASID_DMA_UNMAP_FLAG_ALL needs iova and size 0",
                    ));
                }
                engine.unmap_all_dma(ctx, u.ioasid)?
            } else {
                engine.unmap_dma(ctx, u.ioasid, u.iova, u.size)?
            };
            let at = std::mem::offset_of!(IoasidDmaUnmap, size) as u64;
            write(caller, arg + at, bytes.as_bytes())?;
            Ok(0)
        }
        IoasidCmd::GetInfo => get_info(engine, ctx, caller, arg),
        IoasidCmd::CreateNesting => {
            let parent = int_ioasid(arg)?;
            let id = engine.create_nesting(ctx, parent)?;
            i32::try_from(id).map_err(|_| Error::new(Errno::ENOSPC, "IOASID number too large"))
        }
        IoasidCmd::BindPgtable => {
            let (b, _) = read_struct::<IoasidBindPgtable>(caller, arg)?;
            no_reserved(b.reserved)?;
            engine.bind_pgtable(ctx, b.ioasid, b.format, b.addr_width, b.pgtable)?;
            Ok(0)
        }
        IoasidCmd::UnbindPgtable => {
            let (u, _) = read_struct::<IoasidUnbindPgtable>(caller, arg)?;
            no_reserved(u.reserved)?;
            engine.unbind_pgtable(ctx, u.ioasid)?;
            Ok(0)
        }
        IoasidCmd::BindPasidTable => {
            let (b, _) = read_struct::<IoasidBindPasidTable>(caller, arg)?;
            no_reserved(b.reserved)?;
            engine.bind_pasid_table(ctx, b.ioasid, b.format, b.table, b.entries)?;
            Ok(0)
        }
        IoasidCmd::UnbindPasidTable => {
            let (u, _) = read_struct::<IoasidUnbindPasidTable>(caller, arg)?;
            no_reserved(u.reserved)?;
            engine.unbind_pasid_table(ctx, u.ioasid)?;
            Ok(0)
        }
        IoasidCmd::InvalidateCache => {
            let (i, _) = read_struct::<IoasidInvalidateCache>(caller, arg)?;
            let inv = invalidation(&i)?;
            engine.invalidate(ctx, i.ioasid, inv)?;
            Ok(0)
        }
    }
}

/// The granularity of an `IOASID_INVALIDATE_CACHE`, with the field rules
/// the engine cannot see: fields a flag does not enable must be 0.
fn invalidation(i: &IoasidInvalidateCache) -> Result<Invalidation, Error> {
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

fn int_ioasid(arg: u64) -> Result<u32, Error> {
    u32::try_from(arg)
        .map_err(|_| Error::new(Errno::ENOENT, format!("IOASID {arg} does not exist")))
}

fn no_reserved(reserved: u32) -> Result<(), Error> {
    if reserved != 0 {
        return Err(Error::new(
            Errno::EINVAL,
            format!("__reserved is {reserved:#x}; it must be 0"),
        ));
    }
    Ok(())
}

fn read(caller: &dyn CallerMemory, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
    caller.read(addr, buf).map_err(|e| {
        Error::new(
            e,
            format!(
                "cannot read {} bytes of the argument at {addr:#x}",
                buf.len()
            ),
        )
    })
}

fn write(caller: &dyn CallerMemory, addr: u64, buf: &[u8]) -> Result<(), Error> {
    caller.write(addr, buf).map_err(|e| {
        Error::new(
            e,
            format!(
                "cannot write {} bytes of the argument at {addr:#x}",
                buf.len()
            ),
        )
    })
}

/// Read an extensible struct at `arg` by the ABI's rules; returns it and
/// the caller's `argsz`.
///
/// The whole known struct is read at once (one copy from the caller, the
/// common case); only if that faults, because a shorter struct ends just
/// before an unmapped page, is `argsz` read first and then `argsz` bytes.
/// Bytes past `argsz` are never used: they are zeroed.
fn read_struct<T: ArgStruct>(caller: &dyn CallerMemory, arg: u64) -> Result<(T, u32), Error> {
    let rules = StructArg::of::<T>();
    let mut value = T::new_zeroed();
    let whole = caller.read(arg, value.as_mut_bytes()).is_ok();
    let argsz = if whole {
        u32::read_from_bytes(&value.as_bytes()[..4]).unwrap_or(0)
    } else {
        let mut argsz = [0u8; 4];
        read(caller, arg, &mut argsz)?;
        u32::from_ne_bytes(argsz)
    };
    let given = argsz as usize;
    if given < rules.min_size {
        return Err(Error::new(
            Errno::EINVAL,
            format!(
                "argsz {argsz} is below sizeof(struct {}) = {}",
                rules.c_name, rules.min_size
            ),
        ));
    }
    let known = given.min(rules.size);
    if whole {
        value.as_mut_bytes()[known..].fill(0);
    } else {
        read(caller, arg, &mut value.as_mut_bytes()[..known])?;
    }
    if given > rules.size && !rules.tail_is_output {
        check_zero_tail(caller, arg, rules, given)?;
    }
    if let FlagsCheck::Mask(mask) = rules.flags {
        let flags = u32::read_from_bytes(&value.as_bytes()[4..8]).unwrap_or(0);
        if flags & !mask != 0 {
            return Err(Error::new(
                Errno::EINVAL,
                format!(
                    "unknown flags {:#x} in struct {}",
                    flags & !mask,
                    rules.c_name
                ),
            ));
        }
    }
    Ok((value, argsz))
}

/// The bytes `[size, given)` past the struct must be zero.
fn check_zero_tail(
    caller: &dyn CallerMemory,
    arg: u64,
    rules: StructArg,
    given: usize,
) -> Result<(), Error> {
    let tail = given - rules.size;
    if tail > MAX_TAIL {
        return Err(Error::new(
            Errno::E2BIG,
            format!(
                "argsz {given} is more than {MAX_TAIL} bytes past struct {} ({} bytes)",
                rules.c_name, rules.size
            ),
        ));
    }
    let mut chunk = vec![0u8; tail.min(TAIL_CHUNK)];
    let mut at = rules.size;
    while at < given {
        let n = (given - at).min(TAIL_CHUNK);
        read(caller, arg + at as u64, &mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().position(|&b| b != 0) {
            return Err(Error::new(
                Errno::E2BIG,
                format!(
                    "byte {} of the argument, past struct {} ({} bytes), is not zero",
                    at + i,
                    rules.c_name,
                    rules.size
                ),
            ));
        }
        at += n;
    }
    Ok(())
}

/// Size of `struct ioasid_info`: the capability chain starts there.
const INFO_SIZE: usize = std::mem::size_of::<ioasid_uapi::IoasidInfo>();

fn get_info(
    engine: &Engine,
    ctx: ContextId,
    caller: &dyn CallerMemory,
    arg: u64,
) -> Result<i32, Error> {
    let (mut out, argsz) = read_struct::<ioasid_uapi::IoasidInfo>(caller, arg)?;
    let info = engine.info(ctx, out.ioasid)?;
    out.flags = 0;
    out.cap_offset = 0;
    out.pgsize_bitmap = 0;
    let chain = if info.attached {
        out.flags = ioasid_uapi::IOASID_INFO_PGSIZES | ioasid_uapi::IOASID_INFO_MAP_DMA;
        if info.parent.is_some() {
            // A child takes either protocol (one at a time: the other is
            // EBUSY while one is in use).
            out.flags |= ioasid_uapi::IOASID_INFO_NESTED
                | ioasid_uapi::IOASID_INFO_BIND_PGTABLE
                | ioasid_uapi::IOASID_INFO_BIND_PASID_TABLE;
        }
        out.pgsize_bitmap = info.pgsize_bitmap;
        capability_chain(&info, INFO_SIZE)
    } else {
        Vec::new()
    };
    if !chain.is_empty() {
        out.flags |= ioasid_uapi::IOASID_INFO_CAPS;
        let needed = INFO_SIZE + chain.len();
        if (argsz as usize) >= needed {
            write(caller, arg + INFO_SIZE as u64, &chain)?;
            out.cap_offset = INFO_SIZE as u32;
        } else {
            // VFIO style: succeed, say there are capabilities, ask for room.
            out.argsz = u32::try_from(needed)
                .map_err(|_| Error::new(Errno::EOVERFLOW, "capability chain too large"))?;
        }
    }
    // Output fields only: argsz and flags, then cap_offset and
    // pgsize_bitmap; `ioasid` (input) is left alone.
    let bytes = out.as_bytes();
    let ioasid_at = std::mem::offset_of!(ioasid_uapi::IoasidInfo, ioasid);
    let cap_at = std::mem::offset_of!(ioasid_uapi::IoasidInfo, cap_offset);
    write(caller, arg, &bytes[..ioasid_at])?;
    write(caller, arg + cap_at as u64, &bytes[cap_at..INFO_SIZE])?;
    Ok(0)
}

/// Append one capability (header + body + trailing bytes) to `chain`,
/// linking the previous one to it.
fn push_cap(chain: &mut Vec<u8>, base: usize, last: &mut Option<usize>, bytes: &[u8]) {
    let at = chain.len();
    if let Some(prev) = *last {
        let next = u32::try_from(base + at).unwrap_or(0);
        let field = prev + std::mem::offset_of!(IoasidInfoCapHeader, next);
        chain[field..field + 4].copy_from_slice(&next.to_ne_bytes());
    }
    chain.extend_from_slice(bytes);
    // Capabilities are 8-byte aligned.
    chain.resize(chain.len().next_multiple_of(8), 0);
    *last = Some(at);
}

/// The capability chain of an attached IOASID, as it will sit at offset
/// `base` of the caller's `struct ioasid_info`.
fn capability_chain(info: &IoasidInfo, base: usize) -> Vec<u8> {
    let header = |id| IoasidInfoCapHeader {
        id,
        version: 1,
        next: 0,
    };
    let mut chain = Vec::new();
    let mut last = None;

    let mut ranges = IoasidInfoCapIovaRanges {
        header: header(ioasid_uapi::IOASID_INFO_CAP_IOVA_RANGES),
        nr_ranges: info.iova_ranges.len() as u32,
        reserved: 0,
    }
    .as_bytes()
    .to_vec();
    for &(start, last) in &info.iova_ranges {
        ranges.extend_from_slice(IoasidIovaRange { start, last }.as_bytes());
    }
    push_cap(&mut chain, base, &mut last, &ranges);

    if let Some(avail) = info.dma_avail {
        let cap = IoasidInfoCapDmaAvail {
            header: header(ioasid_uapi::IOASID_INFO_CAP_DMA_AVAIL),
            avail,
            reserved: 0,
        };
        push_cap(&mut chain, base, &mut last, cap.as_bytes());
    }

    let pasid = IoasidInfoCapPasid {
        header: header(ioasid_uapi::IOASID_INFO_CAP_PASID),
        flags: ioasid_uapi::IOASID_PASID_ATTACH_TRACKED,
        pasid_bits: PASID_BITS,
        pasid_table_format: if info.parent.is_some() {
            ioasid_uapi::IOASID_PASID_TABLE_FLAT_X86_64
        } else {
            0
        },
        reserved: 0,
    };
    push_cap(&mut chain, base, &mut last, pasid.as_bytes());

    if info.nesting_levels > 0 {
        let cap = IoasidInfoCapNesting {
            header: header(ioasid_uapi::IOASID_INFO_CAP_NESTING),
            flags: ioasid_uapi::IOASID_NESTING_SOFTWARE,
            levels: info.nesting_levels,
        };
        push_cap(&mut chain, base, &mut last, cap.as_bytes());
    }

    if let Some(parent) = info.parent {
        let cap = IoasidInfoCapParent {
            header: header(ioasid_uapi::IOASID_INFO_CAP_PARENT),
            parent,
            reserved: 0,
        };
        push_cap(&mut chain, base, &mut last, cap.as_bytes());

        let mut formats = IoasidInfoCapPgtableFormats {
            header: header(ioasid_uapi::IOASID_INFO_CAP_PGTABLE_FORMATS),
            nr_formats: 1,
            reserved: 0,
        }
        .as_bytes()
        .to_vec();
        let x86 = IoasidPgtableFormatDesc {
            format: ioasid_uapi::IOASID_PGTABLE_X86_64_4LVL,
            flags: ioasid_uapi::IOASID_PGTABLE_FORMAT_SHADOWED,
            addr_width: ioasid_engine::pgtable::ADDR_WIDTH,
            reserved: 0,
            pgsize_bitmap: ioasid_engine::pgtable::PGSIZES,
        };
        formats.extend_from_slice(x86.as_bytes());
        push_cap(&mut chain, base, &mut last, &formats);

        push_cap(&mut chain, base, &mut last, shadow_cap(info).as_bytes());
    }
    chain
}

/// `IOASID_INFO_CAP_SHADOW` of a child: its shadow and the accounting of
/// the walks of a bound page table or PASID table.
fn shadow_cap(info: &IoasidInfo) -> IoasidInfoCapShadow {
    let mut cap = IoasidInfoCapShadow {
        header: IoasidInfoCapHeader {
            id: ioasid_uapi::IOASID_INFO_CAP_SHADOW,
            version: 1,
            next: 0,
        },
        shadow_entries: info.shadow_entries as u64,
        ..IoasidInfoCapShadow::default()
    };
    if let Some(t) = &info.pgtable {
        cap.flags |= ioasid_uapi::IOASID_SHADOW_PGTABLE;
        if t.last_walk.truncated {
            cap.flags |= ioasid_uapi::IOASID_SHADOW_TRUNCATED;
        }
        cap.leaves = t.leaves;
        cap.last_walk_leaves = t.last_walk.leaves;
        cap.last_walk_malformed = t.last_walk.malformed;
        cap.last_walk_tables = t.last_walk.tables;
        cap.malformed = t.malformed;
        cap.walks = t.walks;
    }
    if let Some(t) = &info.pasid_table {
        cap.flags |= ioasid_uapi::IOASID_SHADOW_PASID_TABLE;
        if t.truncated {
            cap.flags |= ioasid_uapi::IOASID_SHADOW_TRUNCATED;
        }
        cap.pasid_entries = t.entries;
        cap.pasid_valid = t.valid;
        cap.pasid_bad = t.bad_entries;
        cap.pasid_unreadable = t.unreadable_entries;
        cap.pasid_leaves = t.leaves;
        cap.pasid_malformed = t.malformed;
    }
    cap
}
