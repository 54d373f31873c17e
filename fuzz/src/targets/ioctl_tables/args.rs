//! Arguments for one call: field values a handler gets past its first
//! checks most of the time, sizes below, at and above the struct's minimum
//! and size (up to and past the reader's 64 KiB cap), tails with and
//! without non-zero bytes, byte mutations, and caller memory with holes.

use ioctl_table::fake::FakeCaller;
use ioctl_table::{StructRules, Tail, MAX_ARG, MAX_TAIL};

use super::commands::{Arg, Cmd, Field, K};
use super::{BASE, FD_IOASID, FD_IOMMU, FD_MAP, FD_PIPE, MEM, MEM_LEN, PID};
use crate::gen::{mutate, Rng};

/// Bytes of the caller's scratch area at `BASE`, where pointer fields
/// point; the argument follows it.
pub const SCRATCH: usize = 0x1000;
/// Where a struct argument normally lies.
pub const ARG_AT: u64 = BASE + SCRATCH as u64;

/// A value of kind `k`: most of the time one a handler accepts (each
/// field wrong now and then, so that later checks are reached too).
pub fn value(rng: &mut Rng, k: K) -> u64 {
    const PAGE: u64 = 4096;
    /// Where the preludes map (and IOMMU_IOAS_MAP's allocator starts).
    const STARTS: [u64; 9] = [
        0,
        1 << 20,
        1 << 21,
        2 << 21,
        3 << 21,
        1 << 22,
        2 << 22,
        3 << 22,
        PAGE,
    ];
    match k {
        K::Size | K::Any => rng.interesting(),
        K::Flags(bits) => {
            let mut v = 0;
            for &b in bits {
                if rng.chance(2, 3) {
                    v |= b;
                }
            }
            match rng.below(10) {
                0 => v | 1 << rng.below(32),
                1 => rng.interesting(),
                _ => v,
            }
        }
        K::Id => match rng.below(20) {
            0..=9 => 1,
            10..=14 => 2,
            15 => 3,
            16 => 4 + rng.below(3),
            17 => 0,
            _ => rng.interesting(),
        },
        K::Iova => match rng.below(20) {
            0..=5 => *rng.pick(&STARTS),
            6..=13 => rng.below(4096) * PAGE,
            14 | 15 => rng.below(8) << 21,
            _ => rng.interesting(),
        },
        K::Vaddr => match rng.below(20) {
            0..=14 => MEM + rng.below(MEM_LEN / PAGE) * PAGE,
            15 => MEM + rng.below(MEM_LEN),
            _ => rng.interesting(),
        },
        K::Len => match rng.below(20) {
            0..=5 => 1 << 20,
            6..=13 => (1 + rng.below(16)) * PAGE,
            14 => 2 << 20,
            15 => u64::MAX,
            _ => rng.interesting(),
        },
        K::Ptr => match rng.below(10) {
            0..=7 => BASE + rng.below(SCRATCH as u64 / 8) * 8,
            8 => 0,
            _ => rng.interesting(),
        },
        K::Fd => fd(rng) as i64 as u64,
        K::Count => match rng.below(10) {
            0..=7 => rng.below(8),
            _ => rng.interesting(),
        },
        K::Zero => {
            if rng.chance(1, 20) {
                rng.interesting()
            } else {
                0
            }
        }
        K::Pick(values) => {
            if rng.chance(9, 10) {
                *rng.pick(values)
            } else {
                rng.interesting()
            }
        }
    }
}

/// A file descriptor number: the caller's ioasid, iommufd, memory file or
/// pipe, one it does not hold, or a negative one.
pub fn fd(rng: &mut Rng) -> i32 {
    match rng.below(8) {
        0 => FD_IOASID,
        1 => FD_IOMMU,
        2 => FD_MAP,
        3 => FD_PIPE,
        4 => 77,
        5 => -1,
        6 => rng.interesting() as i32,
        _ => *rng.pick(&[FD_IOASID, FD_IOMMU]),
    }
}

fn put(bytes: &mut [u8], f: &Field, v: u64) {
    bytes[f.at..f.at + f.width].copy_from_slice(&v.to_ne_bytes()[..f.width]);
}

/// The integer argument of a command that takes none or an integer.
pub fn integer(rng: &mut Rng, arg: Arg) -> u64 {
    match arg {
        Arg::Int(k) if rng.chance(7, 8) => value(rng, k),
        _ => rng.interesting(),
    }
}

/// The bytes at the argument's address for a struct command with `rules`
/// (its size, minimum and tail rule): the struct, then as many bytes past
/// it as the size given says (up to the cap plus a little; a larger size
/// is refused unread).
pub fn struct_bytes(rng: &mut Rng, cmd: &Cmd, rules: &StructRules, data: bool) -> Vec<u8> {
    let Arg::Struct(fields, elements) = cmd.arg else {
        unreachable!("a struct row")
    };
    let (min, size) = (rules.min_size, rules.size);
    let mut b = vec![0u8; size];
    for f in fields {
        let v = value(rng, f.kind);
        put(&mut b, f, v);
    }
    // The array after a VFIO struct: `count` elements, mostly.
    let mut extra = Vec::new();
    if let Some(a) = elements {
        let n = rng.below(5) as usize;
        for _ in 0..n * a.elem.div_ceil(8) {
            extra.extend_from_slice(&value(rng, a.kind).to_ne_bytes()[..a.elem.min(8)]);
        }
        if let Some(at) = a.count_at.filter(|_| rng.chance(3, 4)) {
            b[at..at + 4].copy_from_slice(&(n as u32).to_ne_bytes());
        }
    }
    let cap = if data { MAX_ARG } else { size + MAX_TAIL };
    let given: u64 = match rng.below(24) {
        0..=13 => (size + extra.len()) as u64,
        14 => min as u64,
        15 => (min + rng.below((size - min) as u64 + 1) as usize) as u64,
        16 => rng.below(min as u64),
        17 => (size + 8 * rng.below(8) as usize) as u64,
        18 => (cap + rng.below(2) as usize) as u64,
        19 => (cap - rng.below(64) as usize) as u64,
        20 => (size + 1 + rng.below(300) as usize) as u64,
        21 => u32::MAX as u64,
        _ => rng.interesting() as u32 as u64,
    };
    // An output buffer after the struct (a capability chain): any size
    // around what the chain needs, often.
    let given = if rules.tail == Tail::Output && rng.chance(1, 3) {
        (size as u64 + rng.below(320)) as u32
    } else {
        given as u32
    };
    b[..4].copy_from_slice(&given.to_ne_bytes());
    b.extend_from_slice(&extra);
    if rng.chance(1, 6) {
        mutate(rng, &mut b);
    }
    // Lay out as many bytes as the (possibly mutated) size covers, when
    // the reader would read them; the rest of the memory faults.
    let given = b
        .get(..4)
        .map_or(0, |s| u32::from_ne_bytes(s.try_into().unwrap()));
    let want = (given as usize).min(cap + 64);
    if b.len() < want && want <= cap + 64 {
        let at = b.len();
        b.resize(want, 0);
        // A non-zero byte past the struct, sometimes.
        if rng.chance(1, 4) && want > size.max(at) {
            let i = size.max(at) + rng.below((want - size.max(at)) as u64) as usize;
            b[i] = 1 + rng.below(255) as u8;
        }
    }
    b
}

/// The caller: `arg_bytes` at `ARG_AT` after a scratch area (random or
/// zero), sometimes cut short, with a hole, read-only, or with the
/// argument somewhere else entirely; returns it with the argument's
/// address.
pub fn caller(rng: &mut Rng, arg_bytes: &[u8]) -> (FakeCaller, u64) {
    let mut mem = vec![0u8; SCRATCH + arg_bytes.len() + 64];
    if rng.chance(1, 2) {
        for w in mem[..SCRATCH].chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_ne_bytes());
        }
    }
    mem[SCRATCH..SCRATCH + arg_bytes.len()].copy_from_slice(arg_bytes);
    let mut arg = ARG_AT;
    let len = arg_bytes.len().max(1) as u64;
    let mut hole = None;
    let mut writable = true;
    match rng.below(48) {
        0 => arg = 0,
        1 => arg = rng.interesting(),
        2 => arg = BASE - 2,
        3 | 4 => mem.truncate(SCRATCH + rng.below(len + 1) as usize),
        5 => {
            let at = ARG_AT + rng.below(len);
            hole = Some(at..at + 1 + rng.below(8));
        }
        6 => writable = false,
        7 | 8 => {
            let at = BASE + rng.below(SCRATCH as u64);
            hole = Some(at..at + 1 + rng.below(64));
        }
        _ => {}
    }
    let c = FakeCaller::new(BASE, mem, PID);
    c.holes.borrow_mut().extend(hole);
    c.writable.set(writable);
    (c, arg)
}
