"""The legacy VFIO backend (crate vfio-legacy) against real VFIO in the guest.

Runs the crate's `alias_dma` example, which is built on the host with
`cargo build -p vfio-legacy --examples`: two separate client processes own
memfd memory; the backend aliases it through /proc/<pid>/map_files, maps it
for DMA in the type1v2 containers of two edu devices, and every outcome is
checked in the clients' own memory.
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "target" / "debug" / "examples" / "alias_dma"

# Lines the example prints after each check passed, in order.
CHECKS = [
    "ok: a second user of group",
    "ok: a group with no vfio-pci device gets ENOENT",
    "ok: overlapping map refused with EEXIST",
    "ok: dma_avail went from",
    "ok: both devices opened",
    "ok: device 1 copied page A to page B (checked in client 1)",
    "ok: page A unchanged",
    "ok: client 2 untouched",
    "ok: unmap of B reported 0x1000 bytes, a second unmap 0",
    "ok: after unmap, device 1's DMA to B's IOVA left page B alone",
    "ok: device 1 cannot reach client 2's page (mapped only for group 2)",
    "ok: device 2 wrote client 2's page through group 2's container (control)",
    "ok: page B still alone",
    "ok: unmap_all emptied both containers",
    "ok: groups released on drop and reusable",
    "alias_dma: PASS",
]

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/vfio/vfio"),
    reason="needs VFIO: run inside the test VM (scripts/vm)",
)


def run_example(*bdfs):
    if not EXAMPLE.exists():
        pytest.fail(f"{EXAMPLE} missing: run `cargo build -p vfio-legacy --examples` on the host")
    r = subprocess.run([str(EXAMPLE), *bdfs], capture_output=True, text=True, timeout=300)
    print(r.stdout)
    print(r.stderr)
    return r


def assert_all_checks(r):
    assert r.returncode == 0, f"alias_dma failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    at = 0
    for check in CHECKS:
        found = r.stdout.find(check, at)
        assert found >= 0, f"missing (or out of order): {check!r}\n{r.stdout}"
        at = found


def test_dma_through_aliased_client_memory_discovered_devices():
    r = run_example()
    assert_all_checks(r)
    assert "devices: 0000:00:0a.0" in r.stdout


def test_dma_with_a_device_of_the_shared_group():
    # 01:01.0 shares its IOMMU group with 01:02.0 behind the PCI bridge.
    r = run_example("0000:01:01.0", "0000:00:0c.0")
    assert_all_checks(r)
    assert "devices: 0000:00:0c.0" in r.stdout and "0000:01:01.0" in r.stdout


def test_dma_through_aliased_hugetlbfs_memory():
    nr = Path("/proc/sys/vm/nr_hugepages")
    before = nr.read_text()
    nr.write_text("2\n")
    try:
        r = run_example("--hugetlb")
    finally:
        nr.write_text(before)
    assert_all_checks(r)
    assert "ok: client 1's hugetlbfs memory aliased at a 2 MiB aligned address" in r.stdout


def test_device_not_bound_to_vfio_pci_is_refused_with_advice():
    r = run_example("0000:00:05.0", "0000:00:0a.0")  # the virtio-serial device
    assert r.returncode == 1
    assert "not vfio-pci" in r.stdout and "driver_override" in r.stdout, r.stdout
