//! The daemon's own memory. A client can make the daemon allocate a lot
//! for a while (20,000 IOASIDs, 16,000 mappings, a large PASID table);
//! when it leaves, that state is freed, but the C allocator keeps freed
//! memory for reuse and gives it back to the system only when asked. So:
//!
//! - [`configure`] keeps the allocator from holding on by itself: by
//!   default glibc raises its thresholds after a large block is freed, up
//!   to 32 MiB to map blocks of their own and 64 MiB of free memory at the
//!   top of a heap before it gives any back, and it gives a thread heap
//!   per thread up to 8 per core, each keeping its own free memory;
//! - [`after_release`] gives it back when the allocator holds
//!   [`GIVE_BACK_OVER`] bytes more of freed memory than at the last time,
//!   after a file is released (the moment a departed client's state is
//!   freed);
//! - [`figures`] is what `cuse-ioasid status` shows of it, so a growth
//!   that stays is visible without a debugger.

use std::sync::atomic::{AtomicU64, Ordering};

/// Freed memory the allocator may keep for reuse before the daemon asks
/// it to give the rest back (the allocator's own default threshold for
/// the top of its main heap is 128 KiB; freed memory elsewhere it never
/// gives back by itself).
pub const GIVE_BACK_OVER: u64 = 1 << 20;

/// The daemon's memory, as `status` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// Resident memory of the daemon (`/proc/self/statm`), including the
    /// client pages it maps (shared memory it aliases).
    pub rss_bytes: u64,
    /// Heap memory in use by the daemon's state.
    pub heap_in_use_bytes: u64,
    /// Heap memory freed but kept by the allocator.
    pub heap_free_bytes: u64,
    /// Times freed memory was given back since the daemon started.
    pub give_backs: u64,
}

/// Blocks of this size or more are mapped on their own, and unmapped when
/// freed (fixed: the allocator no longer raises it).
pub const MMAP_THRESHOLD: i32 = 256 << 10;

/// Free memory at the top of a heap past this goes back at once.
pub const TRIM_THRESHOLD: i32 = 1 << 20;

/// Heaps the allocator may keep for the daemon's threads. The daemon
/// allocates little per request (issue 15's registered path allocates
/// nothing), so threads sharing four heaps should rarely wait for one;
/// that wait was not measured on its own.
pub const ARENA_MAX: i32 = 4;

/// Set the allocator up for a long-lived server: fixed thresholds and a
/// bounded number of heaps (see the module's documentation). Call before
/// the daemon starts threads. A setting the allocator refuses is logged
/// and left at its default.
pub fn configure() {
    for (name, param, value) in [
        ("M_MMAP_THRESHOLD", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("M_TRIM_THRESHOLD", libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        ("M_ARENA_MAX", libc::M_ARENA_MAX, ARENA_MAX),
    ] {
        // SAFETY: mallopt only changes the allocator's parameters, under
        // its own lock; it returns 0 when it refuses a value.
        if unsafe { libc::mallopt(param, value) } == 0 {
            tracing::warn!("the C library refused mallopt({name}, {value}); its default stays");
        }
    }
}

static GIVE_BACKS: AtomicU64 = AtomicU64::new(0);

/// Freed memory the allocator held at the last give-back (it keeps the
/// chunks in its lists after their pages went back to the system).
static FREE_AT_LAST: AtomicU64 = AtomicU64::new(0);

/// The allocator's counts: (in use, free but held).
fn allocator() -> (u64, u64) {
    // SAFETY: mallinfo2 takes no arguments and returns a struct by value;
    // it only reads the allocator's state under its own locks.
    let m = unsafe { libc::mallinfo2() };
    // Chunks in use in the arenas plus blocks mapped on their own.
    let in_use = m.uordblks as u64 + m.hblkhd as u64;
    (in_use, m.fordblks as u64)
}

/// Resident bytes of this process.
fn rss() -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// The daemon's memory now.
pub fn figures() -> Figures {
    let (heap_in_use_bytes, heap_free_bytes) = allocator();
    Figures {
        rss_bytes: rss(),
        heap_in_use_bytes,
        heap_free_bytes,
        give_backs: GIVE_BACKS.load(Ordering::Relaxed),
    }
}

/// Give freed memory back to the system if the allocator holds
/// [`GIVE_BACK_OVER`] more of it than at the last give-back. Called after a
/// file is released. Returns whether it did.
pub fn after_release() -> bool {
    let (_, free) = allocator();
    if free
        < FREE_AT_LAST
            .load(Ordering::Relaxed)
            .saturating_add(GIVE_BACK_OVER)
    {
        return false;
    }
    // SAFETY: malloc_trim only returns free pages of the allocator's
    // arenas to the system (madvise/sbrk); it touches no memory in use.
    unsafe { libc::malloc_trim(0) };
    FREE_AT_LAST.store(allocator().1, Ordering::Relaxed);
    GIVE_BACKS.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(
        freed_held = free,
        "gave freed heap memory back to the system after a release"
    );
    true
}
