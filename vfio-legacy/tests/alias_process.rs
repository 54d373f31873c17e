//! Aliasing the memory of a separate client process (this binary started
//! again with `--client`), on the host: needs root (map_files), not VFIO.

#[path = "support/client.rs"]
mod client;

use client::{pattern_page, read_self, self_maps_has, write_self, Client, PAGE};
use ioasid_engine::backend::Backend;
use vfio_legacy::{ClientMemory, Paths, VfioLegacy};

fn exe() -> std::path::PathBuf {
    std::env::current_exe().unwrap()
}

/// The daemon writes through its alias; the client sees it in its own page.
fn shared_memory_round_trip(kind: &str) {
    let mut c = Client::spawn(&exe(), kind, 2, 0x11);
    let cm = ClientMemory::new();
    let a = cm.alias(c.pid(), c.addr, c.len).unwrap();
    assert_eq!(a.segments.len(), 1, "{kind}: one area");
    let d = a.segments[0].daemon_vaddr;
    // The alias shows the client's bytes.
    assert_eq!(
        read_self(d, PAGE),
        pattern_page(0x11),
        "{kind}: read through alias"
    );
    // Writing through the alias changes the client's second page.
    write_self(d + PAGE as u64, &pattern_page(0x77));
    assert_eq!(c.cmd(&format!("check 1 {} {PAGE}", 0x77)), "ok", "{kind}");
    assert_eq!(c.cmd(&format!("check 0 {} {PAGE}", 0x11)), "ok", "{kind}");
    // And the client's writes show in the alias.
    assert_eq!(c.cmd(&format!("fill 0 {}", 0x22)), "ok");
    assert_eq!(read_self(d, PAGE), pattern_page(0x22), "{kind}");
    cm.release(&a);
    assert!(self_maps_has(d), "{kind}: release leaves the mapping idle");
    assert_eq!(cm.idle().0, 1, "{kind}");
    // The client aliasing the same memory again gets the idle mapping back.
    let b = cm.alias(c.pid(), c.addr, c.len).unwrap();
    assert_eq!(b.segments[0].daemon_vaddr, d, "{kind}: reused");
    assert_eq!(read_self(d, PAGE), pattern_page(0x22), "{kind}");
    cm.release(&b);
    cm.trim();
    assert!(!self_maps_has(d), "{kind}: trim unmaps");
    c.quit();
}

fn private_memory_is_refused() {
    let c = Client::spawn(&exe(), "private", 1, 0x11);
    let cm = ClientMemory::new();
    let e = cm.alias(c.pid(), c.addr, c.len).unwrap_err();
    assert_eq!(e.errno, nix::errno::Errno::EFAULT);
    assert!(e.message.contains("MAP_SHARED"), "{}", e.message);
    assert!(
        e.message.contains("memory-backend-memfd,share=on"),
        "{}",
        e.message
    );
    assert_eq!(cm.mapping_count(), 0);
    c.quit();
}

/// An alias keeps the pages alive after the client exits, until released.
fn alias_outlives_the_client() {
    let c = Client::spawn(&exe(), "memfd", 1, 0x33);
    let cm = ClientMemory::new();
    let a = cm.alias(c.pid(), c.addr, c.len).unwrap();
    c.quit();
    let d = a.segments[0].daemon_vaddr;
    assert_eq!(read_self(d, PAGE), pattern_page(0x33));
    cm.release(&a);
    // Released, the mapping is idle (kept for reuse) until trimmed.
    assert!(self_maps_has(d));
    cm.trim();
    assert!(!self_maps_has(d));
}

/// Two clients' memory never shares a daemon mapping.
fn two_clients_get_distinct_aliases() {
    let c1 = Client::spawn(&exe(), "memfd", 1, 0x01);
    let c2 = Client::spawn(&exe(), "memfd", 1, 0x02);
    let cm = ClientMemory::new();
    let a1 = cm.alias(c1.pid(), c1.addr, c1.len).unwrap();
    let a2 = cm.alias(c2.pid(), c2.addr, c2.len).unwrap();
    assert_ne!(a1.segments[0].daemon_vaddr, a2.segments[0].daemon_vaddr);
    assert_eq!(cm.mapping_count(), 2);
    assert_eq!(
        read_self(a1.segments[0].daemon_vaddr, PAGE),
        pattern_page(0x01)
    );
    assert_eq!(
        read_self(a2.segments[0].daemon_vaddr, PAGE),
        pattern_page(0x02)
    );
    cm.release(&a1);
    cm.release(&a2);
    c1.quit();
    c2.quit();
}

/// A client that replaces its memory by another file at the same address
/// gets a new alias of the new pages; the old alias keeps the old pages.
fn replaced_memory_gets_a_new_alias() {
    let mut c = Client::spawn(&exe(), "memfd", 1, 0x05);
    let cm = ClientMemory::new();
    let old = cm.alias(c.pid(), c.addr, c.len).unwrap();
    assert_eq!(c.cmd("remap 6"), "ok");
    let new = cm.alias(c.pid(), c.addr, c.len).unwrap();
    assert_ne!(old.segments[0].daemon_vaddr, new.segments[0].daemon_vaddr);
    assert_eq!(cm.mapping_count(), 2);
    assert_eq!(
        read_self(new.segments[0].daemon_vaddr, PAGE),
        pattern_page(6)
    );
    assert_eq!(
        read_self(old.segments[0].daemon_vaddr, PAGE),
        pattern_page(5)
    );
    // The new alias reaches the client's current page.
    write_self(new.segments[0].daemon_vaddr, &pattern_page(7));
    assert_eq!(c.cmd(&format!("check 0 7 {PAGE}")), "ok");
    cm.release(&old);
    cm.release(&new);
    assert_eq!(cm.idle().0, 2);
    cm.trim();
    assert_eq!(cm.mapping_count(), 0);
    c.quit();
}

/// The same through the engine's Backend trait, on a backend with no groups.
fn backend_alias_and_memlock() {
    let c = Client::spawn(&exe(), "memfd", 1, 0x44);
    let v = VfioLegacy::with_paths(&[], &Paths::default()).unwrap();
    let a = Backend::alias(&v, c.pid(), c.addr, c.len).unwrap();
    assert_eq!(
        read_self(a.segments[0].daemon_vaddr, PAGE),
        pattern_page(0x44)
    );
    Backend::release_alias(&v, &a);
    assert_eq!(v.client_memory().idle().0, 1);
    assert!(self_maps_has(a.segments[0].daemon_vaddr));
    Backend::trim(&v);
    assert_eq!(v.client_memory().mapping_count(), 0);
    assert!(!self_maps_has(a.segments[0].daemon_vaddr));
    // Root has CAP_IPC_LOCK: no limit.
    assert_eq!(Backend::memlock_limit(&v, c.pid()).unwrap(), None);
    c.quit();
}

/// A `sleep` started by `setpriv --bounding-set -ipc_lock` (root without
/// CAP_IPC_LOCK), whose memlock limit is then set to `limit` with util-linux
/// `prlimit --pid`.
fn without_ipc_lock(limit: &str) -> std::process::Child {
    let child = std::process::Command::new("setpriv")
        .args(["--bounding-set", "-ipc_lock", "sleep", "30"])
        .spawn()
        .expect("setpriv (util-linux)");
    let comm = format!("/proc/{}/comm", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
        assert!(std::time::Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", child.id()))
        .arg(format!("--memlock={limit}"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    child
}

/// memlock_limit reads the soft limit of a process without CAP_IPC_LOCK,
/// and reports none for unlimited.
fn memlock_limit_of_a_process_without_cap_ipc_lock() {
    let v = VfioLegacy::with_paths(&[], &Paths::default()).unwrap();
    let mut limited = without_ipc_lock("65536:131072");
    let got = Backend::memlock_limit(&v, limited.id() as i32);
    let _ = limited.kill();
    let _ = limited.wait();
    assert_eq!(got.unwrap(), Some(65536));
    // Raising a hard limit to unlimited needs CAP_SYS_RESOURCE (bit 24),
    // which some sandboxes drop even for root.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    if cap_eff & (1 << 24) == 0 {
        println!("  (unlimited case skipped: no CAP_SYS_RESOURCE here)");
        return;
    }
    let mut unlimited = without_ipc_lock("unlimited");
    let got = Backend::memlock_limit(&v, unlimited.id() as i32);
    let _ = unlimited.kill();
    let _ = unlimited.wait();
    assert_eq!(got.unwrap(), None);
}

fn main() {
    client::serve_if_client();
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        println!("alias_process: skipped, needs root (opening /proc/<pid>/map_files)");
        return;
    }
    let tests: &[(&str, fn())] = &[
        ("memfd_round_trip", || shared_memory_round_trip("memfd")),
        ("shared_anonymous_round_trip", || {
            shared_memory_round_trip("shared-anon")
        }),
        ("private_memory_is_refused", private_memory_is_refused),
        ("alias_outlives_the_client", alias_outlives_the_client),
        (
            "two_clients_get_distinct_aliases",
            two_clients_get_distinct_aliases,
        ),
        (
            "replaced_memory_gets_a_new_alias",
            replaced_memory_gets_a_new_alias,
        ),
        ("backend_alias_and_memlock", backend_alias_and_memlock),
        (
            "memlock_limit_of_a_process_without_cap_ipc_lock",
            memlock_limit_of_a_process_without_cap_ipc_lock,
        ),
    ];
    let mut failed = 0;
    for (name, t) in tests {
        match std::panic::catch_unwind(t) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!(
        "alias_process: {} passed, {failed} failed",
        tests.len() - failed
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
