//! End-to-end check of the legacy VFIO backend with QEMU's `edu` device
//! (run as root in the test VM: `scripts/vm -- target/debug/examples/alias_dma`).
//!
//! Two separate client processes own memfd memory. The backend aliases
//! their pages, maps them for DMA in the containers of two `edu` devices
//! (each in its own IOMMU group), and drives the devices' DMA engines. Every
//! outcome is checked in the client's own memory:
//!
//! 1. device 1 copies client 1's page A (IOVA A) to its page B (IOVA B):
//!    B then holds A's pattern;
//! 2. after B is unmapped, device 1 cannot write it any more: B keeps the
//!    pattern the client wrote;
//! 3. client 2's page, mapped only in group 2's container, is out of device
//!    1's reach at the same IOVA; device 2 can write it (control).
//!
//! Usage: `alias_dma [--hugetlb] [BDF1 BDF2]` (default: the first two `edu`
//! devices, in distinct IOMMU groups, bound to vfio-pci). With `--hugetlb`,
//! client 1's memory is a 2 MiB hugetlbfs memfd (needs a free huge page:
//! `echo 2 > /proc/sys/vm/nr_hugepages`).

#[path = "../tests/support/client.rs"]
mod client;
#[path = "../tests/support/edu.rs"]
mod edu;

use anyhow::{bail, ensure, Context, Result};
use client::{Client, HUGE_PAGE, PAGE};
use edu::{Edu, COUNT, EDU_DEVICE, EDU_ID, EDU_VENDOR};
use ioasid_engine::backend::{Backend, DmaEntry, GroupId, Prot};
use vfio_legacy::{PciDevice, Sysfs, VfioLegacy};

// IOVAs below the edu's 28-bit DMA mask.
const IOVA_A: u64 = 0x10_0000;
const IOVA_B: u64 = 0x20_0000;
const IOVA_C: u64 = 0x30_0000;

const SEED_A: u8 = 0x11;
const SEED_B: u8 = 0x22;
const SEED_B2: u8 = 0x44;
const SEED_C: u8 = 0x33;

fn expect(client: &mut Client, cmd: &str, what: &str) -> Result<()> {
    let reply = client.cmd(cmd);
    ensure!(
        reply == "ok",
        "{what}: client answered {reply:?} to {cmd:?}"
    );
    println!("ok: {what}");
    Ok(())
}

fn pick_devices() -> Result<(PciDevice, PciDevice)> {
    let sysfs = Sysfs::default();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let devs = if args.is_empty() {
        sysfs.discover()?
    } else {
        sysfs.devices(&args)?
    };
    let edus: Vec<_> = devs
        .into_iter()
        .filter(|d| d.vendor == EDU_VENDOR && d.device == EDU_DEVICE)
        .collect();
    let Some(first) = edus.first().cloned() else {
        bail!("no edu device (1234:11e8) bound to vfio-pci");
    };
    let Some(second) = edus.iter().find(|d| d.group != first.group).cloned() else {
        bail!("need two edu devices in distinct IOMMU groups");
    };
    Ok((first, second))
}

fn in_ranges(ranges: &[(u64, u64)], iova: u64) -> bool {
    ranges
        .iter()
        .any(|&(s, l)| s <= iova && iova + PAGE as u64 - 1 <= l)
}

fn run() -> Result<()> {
    let exe = std::env::current_exe()?;
    let (d1, d2) = pick_devices()?;
    println!(
        "devices: {} (group {}), {} (group {})",
        d1.bdf, d1.group, d2.bdf, d2.group
    );
    let groups: [GroupId; 2] = [d1.group, d2.group];
    let v = VfioLegacy::new(&groups)?;
    // A group can be held by one user only.
    let e = VfioLegacy::new(&[d1.group]).unwrap_err();
    ensure!(
        e.errno == nix::errno::Errno::EBUSY && e.message.contains("another VFIO user"),
        "second user of group {}: {e}",
        d1.group
    );
    println!("ok: a second user of group {} gets EBUSY: {e}", d1.group);
    let e = VfioLegacy::new(&[9999]).unwrap_err();
    ensure!(
        e.errno == nix::errno::Errno::ENOENT && e.message.contains("bound to vfio-pci"),
        "unknown group: {e}"
    );
    println!("ok: a group with no vfio-pci device gets ENOENT: {e}");

    let info = v.domain_info(d1.group).map_err(anyhow::Error::msg)?;
    println!(
        "group {}: pgsizes {:#x}, iova ranges {:x?}, dma_avail {:?}",
        d1.group, info.pgsize_bitmap, info.iova_ranges, info.dma_avail
    );
    ensure!(
        info.pgsize_bitmap & PAGE as u64 != 0,
        "4 KiB pages not supported"
    );
    ensure!(!info.iova_ranges.is_empty(), "no IOVA_RANGE capability");
    for iova in [IOVA_A, IOVA_B, IOVA_C] {
        ensure!(
            in_ranges(&info.iova_ranges, iova),
            "IOVA {iova:#x} not permitted"
        );
    }
    let avail_before = info.dma_avail.context("no DMA_AVAIL capability")?;

    // Client 1: pages A and B. Client 2: page C.
    let hugetlb = std::env::args().any(|a| a == "--hugetlb");
    let kind1 = if hugetlb { "hugetlb" } else { "memfd" };
    let mut c1 = Client::spawn(&exe, kind1, 2, SEED_A);
    expect(
        &mut c1,
        &format!("fill 1 {SEED_B}"),
        "client 1 wrote page B",
    )?;
    let mut c2 = Client::spawn(&exe, "memfd", 1, SEED_C);

    let a1 = v
        .alias(c1.pid(), c1.addr, c1.len)
        .map_err(anyhow::Error::msg)?;
    let a2 = v
        .alias(c2.pid(), c2.addr, c2.len)
        .map_err(anyhow::Error::msg)?;
    ensure!(a1.segments.len() == 1 && a2.segments.len() == 1);
    let daemon_a = a1.segments[0].daemon_vaddr;
    if hugetlb {
        ensure!(
            c1.len == HUGE_PAGE as u64,
            "client 1 has {:#x} bytes",
            c1.len
        );
        ensure!(
            daemon_a % HUGE_PAGE as u64 == 0,
            "hugetlbfs alias at {daemon_a:#x} is not 2 MiB aligned"
        );
        println!("ok: client 1's hugetlbfs memory aliased at a 2 MiB aligned address");
    }
    let daemon_b = daemon_a + PAGE as u64;
    let daemon_c = a2.segments[0].daemon_vaddr;
    let rw = Prot {
        read: true,
        write: true,
    };
    let page = PAGE as u64;
    let g1 = d1.group;
    let g2 = d2.group;
    let map = |g, iova, at| {
        let entry = DmaEntry {
            iova,
            daemon_vaddr: at,
            size: page,
            prot: rw,
        };
        // SAFETY: every range mapped here is a page of the aliases a1 and
        // a2, which stay alive until the end of this function, after the
        // containers are emptied; nothing holds a reference into them.
        unsafe { v.map(g, entry) }
    };
    map(g1, IOVA_A, daemon_a).map_err(anyhow::Error::msg)?;
    map(g1, IOVA_B, daemon_b).map_err(anyhow::Error::msg)?;
    map(g2, IOVA_A, daemon_a).map_err(anyhow::Error::msg)?;
    map(g2, IOVA_C, daemon_c).map_err(anyhow::Error::msg)?;
    let e = map(g1, IOVA_A, daemon_a).unwrap_err();
    ensure!(e.errno == nix::errno::Errno::EEXIST, "overlapping map: {e}");
    println!("ok: overlapping map refused with EEXIST");
    let avail = v.domain_info(g1).map_err(anyhow::Error::msg)?.dma_avail;
    ensure!(
        avail == Some(avail_before - 2),
        "dma_avail {avail:?} after two maps, was {avail_before}"
    );
    println!(
        "ok: dma_avail went from {avail_before} to {}",
        avail_before - 2
    );

    let edu1 = Edu::open(&v, &d1)?;
    let edu2 = Edu::open(&v, &d2)?;
    println!("ok: both devices opened, id {EDU_ID:#x}, bus mastering on");

    // 1. A -> device -> B, through group 1's container.
    edu1.load(IOVA_A)?;
    edu1.store(IOVA_B)?;
    expect(
        &mut c1,
        &format!("check 1 {SEED_A} {COUNT}"),
        "device 1 copied page A to page B (checked in client 1)",
    )?;
    expect(
        &mut c1,
        &format!("check 0 {SEED_A} {PAGE}"),
        "page A unchanged",
    )?;
    expect(
        &mut c2,
        &format!("check 0 {SEED_C} {PAGE}"),
        "client 2 untouched",
    )?;

    // 2. Unmap B: the device can no longer write it.
    let n = v.unmap(g1, IOVA_B, page).map_err(anyhow::Error::msg)?;
    ensure!(n == page, "unmap reported {n:#x} bytes");
    let n = v.unmap(g1, IOVA_B, page).map_err(anyhow::Error::msg)?;
    ensure!(n == 0, "second unmap reported {n:#x} bytes");
    println!("ok: unmap of B reported {page:#x} bytes, a second unmap 0");
    expect(
        &mut c1,
        &format!("fill 1 {SEED_B2}"),
        "client 1 rewrote page B",
    )?;
    edu1.load(IOVA_A)?;
    edu1.store(IOVA_B)?;
    expect(
        &mut c1,
        &format!("check 1 {SEED_B2} {PAGE}"),
        "after unmap, device 1's DMA to B's IOVA left page B alone",
    )?;

    // 3. Client 2's page is mapped at IOVA C only in group 2's container.
    edu1.store(IOVA_C)?;
    expect(
        &mut c2,
        &format!("check 0 {SEED_C} {PAGE}"),
        "device 1 cannot reach client 2's page (mapped only for group 2)",
    )?;
    edu2.load(IOVA_A)?;
    edu2.store(IOVA_C)?;
    expect(
        &mut c2,
        &format!("check 0 {SEED_A} {COUNT}"),
        "device 2 wrote client 2's page through group 2's container (control)",
    )?;
    expect(
        &mut c1,
        &format!("check 1 {SEED_B2} {PAGE}"),
        "page B still alone",
    )?;

    // Clean up in the daemon's order: devices, mappings, aliases.
    drop(edu1);
    drop(edu2);
    v.unmap_all(g1).map_err(anyhow::Error::msg)?;
    v.unmap_all(g2).map_err(anyhow::Error::msg)?;
    let n = v.unmap(g2, IOVA_C, page).map_err(anyhow::Error::msg)?;
    ensure!(n == 0, "unmap after unmap_all reported {n:#x}");
    let avail = v.domain_info(g1).map_err(anyhow::Error::msg)?.dma_avail;
    ensure!(
        avail == Some(avail_before),
        "dma_avail {avail:?} after unmap_all"
    );
    println!("ok: unmap_all emptied both containers");
    v.release_alias(&a1);
    v.release_alias(&a2);
    let (idle, _) = v.client_memory().idle();
    ensure!(
        idle == v.client_memory().mapping_count() && v.client_memory().alias_count() == 0,
        "aliases still in use after release"
    );
    v.trim();
    ensure!(
        v.client_memory().mapping_count() == 0,
        "aliases left mapped after trim"
    );
    c1.quit();
    c2.quit();

    // Dropping the backend closes groups and containers: the groups can be
    // taken again.
    drop(v);
    let again = VfioLegacy::new(&groups)?;
    drop(again);
    println!("ok: groups released on drop and reusable");
    Ok(())
}

fn main() {
    client::serve_if_client();
    match run() {
        Ok(()) => println!("alias_dma: PASS"),
        Err(e) => {
            println!("alias_dma: FAIL: {e:#}");
            std::process::exit(1);
        }
    }
}
