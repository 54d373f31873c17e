//! The daemon gives freed heap memory back (`cuse_ioasid::heap`). In a
//! test binary of its own: it reads the whole process's memory, which
//! other tests running beside it would change.

use cuse_ioasid::heap::{after_release, figures, GIVE_BACK_OVER};

#[test]
fn freed_memory_between_live_blocks_goes_back_to_the_system() {
    // 40 MB in small blocks (on the heap, not mapped one by one), of
    // which every 16th stays: the allocator cannot shrink its heap
    // past them by itself, and keeps the holes until asked.
    let mut blocks: Vec<Option<Vec<u8>>> = (0..40_000).map(|i| Some(vec![i as u8; 1000])).collect();
    for (i, b) in blocks.iter_mut().enumerate() {
        if i % 16 != 0 {
            *b = None;
        }
    }
    let before = figures();
    assert!(before.heap_free_bytes > GIVE_BACK_OVER, "{before:?}");
    assert!(after_release(), "{before:?}");
    let after = figures();
    assert!(
        after.rss_bytes + (16 << 20) < before.rss_bytes,
        "before {before:?} after {after:?}"
    );
    assert!(after.give_backs > before.give_backs);
    // Nothing freed since: nothing to give back.
    assert!(!after_release(), "{:?}", figures());
    drop(blocks);
}
