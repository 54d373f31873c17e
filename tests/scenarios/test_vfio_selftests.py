"""The kernel's VFIO selftests (Debian's linux-source 7.2) in the test VM.

Today: the baseline, every variant that runs on legacy VFIO directly
(``vfio_type1_iommu`` and ``vfio_type1v2_iommu`` of vfio_dma_mapping_test
and of its map-limit fixture). The iommufd variants, vfio_iommufd_setup_test
and vfio_pci_device_test need ``/dev/iommu`` and ``/dev/vfio/devices/vfioN``
(their fixtures hard-code the iommufd mode); they go here once the daemon
serves that dialect, with the same ``harness.kselftest.run`` and the counts
side by side. docs/peers.md says what each needs and which ioctls it issues.

Each run's table (pass/fail/skip per case, with the skip reasons) is printed
and written to $VM_SCRATCH/vfio-selftests-<kernel>.txt.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import kselftest

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/vfio/vfio"),
    reason="needs VFIO: run inside the test VM (scripts/vm)",
)

LEGACY_MODES = ["vfio_type1_iommu", "vfio_type1v2_iommu"]
BACKINGS = ["anonymous", "anonymous_hugetlb_2mb", "anonymous_hugetlb_1gb"]
MAPPING_CASES = [f"vfio_dma_mapping_test.{m}_{b}.dma_map_unmap"
                 for m in LEGACY_MODES for b in BACKINGS]
LIMIT_CASES = [f"vfio_dma_map_limit_test.{m}.{t}"
               for m in LEGACY_MODES for t in ("unmap_range", "unmap_all", "overflow")]

HUGEPAGES = {  # sysfs directory -> pages the hugetlb variants need (one map each)
    "/sys/kernel/mm/hugepages/hugepages-2048kB": 1,
    "/sys/kernel/mm/hugepages/hugepages-1048576kB": 1,
}


@pytest.fixture(scope="module")
def bindir() -> Path:
    found = kselftest.binaries()
    if found is None:
        pytest.fail("the VFIO selftests are not built: run scripts/vfio-selftests on the host "
                    "(scripts/test does it before the VM stages)")
    return found


@pytest.fixture(scope="module")
def huge_pages():
    """Reserve the huge pages the hugetlb variants map; give them back after.
    Returns {size directory: pages actually reserved}."""
    before = {d: Path(d, "nr_hugepages").read_text() for d in HUGEPAGES if os.path.isdir(d)}
    got = {}
    for d, n in HUGEPAGES.items():
        if d in before:
            Path(d, "nr_hugepages").write_text(f"{n}\n")
            got[d] = int(Path(d, "nr_hugepages").read_text())
    yield got
    for d, value in before.items():
        Path(d, "nr_hugepages").write_text(value)


def report(run: kselftest.Run) -> None:
    kselftest.report(run, "legacy VFIO directly: ")


def test_dma_mapping_on_legacy_vfio(bindir, topology, huge_pages):
    """Every vfio_type1* variant of vfio_dma_mapping_test, on legacy VFIO
    directly: maps, looks the IOVA up, unmaps, checks the unmapped size;
    the limit fixture maps the last page below the top of the IOVA space
    and checks EOVERFLOW past it."""
    bdf = topology.alone[0].bdf
    filters = [a for m in LEGACY_MODES for b in BACKINGS for a in ("-v", f"{m}_{b}")]
    filters += [a for m in LEGACY_MODES for a in ("-v", m)]
    run = kselftest.run(bindir, "vfio_dma_mapping_test", bdf, filters)
    report(run)
    cases = run.by_name()
    assert sorted(cases) == sorted(MAPPING_CASES + LIMIT_CASES), \
        f"the selftest's cases changed:\n{run.output}"
    failed = sorted(c.name for c in cases.values() if c.result == "fail")
    if os.uname().release.startswith("6.1."):
        # 6.1's type1 answers a map whose IOVA range wraps with EINVAL; the
        # test expects EOVERFLOW, which sid's 7.2 answers (as iommufd does).
        assert failed == [c for c in LIMIT_CASES if c.endswith(".overflow")], run.output
        assert run.output.count("Expected rc (-22) == -EOVERFLOW (-75)") == 2, run.output
    else:
        assert failed == [], run.output
    for case in cases.values():
        if case.result == "skip":
            # The only skip the test knows is a hugetlb mmap that failed for
            # want of a free huge page of that size.
            size = "2048kB" if "2mb" in case.name else "1048576kB"
            reserved = huge_pages.get(f"/sys/kernel/mm/hugepages/hugepages-{size}", 0)
            assert "hugetlb" in case.name and reserved == 0, \
                f"{case.name} skipped ({case.reason}) with {reserved} huge pages reserved"
    assert run.status == (1 if failed else 0), run.output


def test_devices_have_the_vfio_dev_name_the_selftests_look_up(topology):
    """The selftests find a device's cdev only as /dev/vfio/devices/vfioN,
    N from /sys/bus/pci/devices/BDF/vfio-dev/vfioN. The kernel names each
    vfio-pci device there, but makes no node (no VFIO cdev in Debian's
    kernels): the name the daemon's node must take."""
    names = []
    for dev in topology.edus:
        entries = os.listdir(f"/sys/bus/pci/devices/{dev.bdf}/vfio-dev")
        assert len(entries) == 1 and entries[0].startswith("vfio"), (dev.bdf, entries)
        names.append(entries[0])
        assert not os.path.exists(f"/sys/bus/pci/devices/{dev.bdf}/vfio-dev/{entries[0]}/dev"), \
            "the kernel exports a VFIO cdev: this kernel has CONFIG_VFIO_DEVICE_CDEV"
    assert len(set(names)) == len(names), names
