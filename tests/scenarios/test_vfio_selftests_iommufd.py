"""The kernel's VFIO selftests (Debian's linux-source 7.2) in the iommufd
mode, through the daemon's /dev/iommu and /dev/vfio/devices/vfioN: the
programs are unmodified and find the device by its vfio-dev/vfioN name.
The legacy baseline (the vfio_type1* variants on VFIO directly) is
tests/scenarios/test_vfio_selftests.py; it cannot run in this module, whose
daemon holds every IOMMU group. Each run's table is printed and appended to
$VM_SCRATCH/vfio-selftests-<kernel>.txt next to the baseline's.

- vfio_iommufd_setup_test: all 6 pass.
- vfio_pci_device_test: 3 pass, 2 skip for what the edu lacks (no
  VFIO_DEVICE_FLAGS_RESET: the edu has no reset method; no MSI-X).
- vfio_dma_mapping_test's iommufd variants: all pass. They map a
  MAP_PRIVATE|MAP_ANONYMOUS buffer (hugetlb or not), which the daemon has
  the test's own thread pin (issue 14; before it, IOMMU_IOAS_MAP answered
  EFAULT and only `overflow` passed); their page-table check through the
  IOMMU's debugfs is left out inside a passing test, as in the baseline
  (docs/peers.md). The 1 GiB hugetlb variant skips for want of a 1 GiB
  page, as in the baseline.

    cargo build --workspace --bins && scripts/vfio-selftests && scripts/vm -- \
        /usr/bin/python3 -m pytest tests/scenarios/test_vfio_selftests_iommufd.py -v
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import iommufd_module_marks
from harness import kselftest
from harness.daemon import ALONE_1

pytestmark = iommufd_module_marks()

BACKINGS = ["anonymous", "anonymous_hugetlb_2mb", "anonymous_hugetlb_1gb"]
PRIVATE_MEMORY = "[errno: 14 - Bad address]"  # what IOMMU_IOAS_MAP of private memory was


@pytest.fixture(scope="module")
def bindir() -> Path:
    found = kselftest.binaries()
    if found is None:
        pytest.fail("the VFIO selftests are not built: run scripts/vfio-selftests on the host")
    return found


@pytest.fixture(scope="module")
def huge_pages():
    """One 2 MiB and one 1 GiB huge page asked for (the 1 GiB one cannot
    be had in the 2 GiB VM); given back after. {size directory: pages}."""
    sizes = ["/sys/kernel/mm/hugepages/hugepages-2048kB",
             "/sys/kernel/mm/hugepages/hugepages-1048576kB"]
    before = {d: Path(d, "nr_hugepages").read_text() for d in sizes if os.path.isdir(d)}
    got = {}
    for d in before:
        Path(d, "nr_hugepages").write_text("1\n")
        got[d] = int(Path(d, "nr_hugepages").read_text())
    yield got
    for d, value in before.items():
        Path(d, "nr_hugepages").write_text(value)


def report(run: kselftest.Run) -> None:
    kselftest.report(run, "through the daemon (iommufd): ")


def results(run: kselftest.Run) -> dict[str, str]:
    return {c.name: c.result for c in run.cases}


def test_iommufd_setup_test(bindir, iommufd_nodes):
    """bind, GET_INFO before bind, a bad iommufd, a repeated bind, attach
    and detach, attach to an invalid id: every fixture opens, binds and
    closes again, so it also checks that a release unbinds at once."""
    run = kselftest.run(bindir, "vfio_iommufd_setup_test", ALONE_1)
    report(run)
    assert results(run) == {f"vfio_cdev.{t}": "pass" for t in (
        "bind", "get_info_without_bind_fails", "bind_bad_iommufd_fails", "repeated_bind_fails",
        "attach_detatch_pt", "attach_invalid_pt_fails")}, run.output
    assert run.status == 0, run.output


def test_pci_device_test(bindir, iommufd_nodes):
    """Config space, BARs and MSI through the cdev; what the edu lacks skips."""
    run = kselftest.run(bindir, "vfio_pci_device_test", ALONE_1)
    report(run)
    assert results(run) == {
        "vfio_pci_device_test.config_space_read_write": "pass",
        "vfio_pci_device_test.validate_bars": "pass",
        "vfio_pci_device_test.reset": "skip",
        "vfio_pci_irq_test.msi.enable_trigger_disable": "pass",
        "vfio_pci_irq_test.msix.enable_trigger_disable": "skip",
    }, run.output
    reasons = {c.name: c.reason for c in run.cases if c.result == "skip"}
    assert reasons == {
        "vfio_pci_device_test.reset": "Device does not support reset",
        "vfio_pci_irq_test.msix.enable_trigger_disable": "MSI-x: not supported",
    }, run.output
    assert run.status == 0, run.output


def test_dma_mapping_iommufd_variants(bindir, iommufd_nodes, huge_pages):
    """Private anonymous buffers, plain and hugetlb, mapped and unmapped
    through IOMMU_IOAS_MAP; the map limits of the IOVA space."""
    filters = [a for b in BACKINGS for a in ("-v", f"iommufd_{b}")] + ["-v", "iommufd"]
    run = kselftest.run(bindir, "vfio_dma_mapping_test", ALONE_1, filters)
    report(run)
    got = results(run)
    two_mb = huge_pages.get("/sys/kernel/mm/hugepages/hugepages-2048kB", 0) > 0
    one_gb = huge_pages.get("/sys/kernel/mm/hugepages/hugepages-1048576kB", 0) > 0
    expected = {
        "vfio_dma_mapping_test.iommufd_anonymous.dma_map_unmap": "pass",
        "vfio_dma_mapping_test.iommufd_anonymous_hugetlb_2mb.dma_map_unmap":
            "pass" if two_mb else "skip",
        "vfio_dma_mapping_test.iommufd_anonymous_hugetlb_1gb.dma_map_unmap":
            "pass" if one_gb else "skip",
        "vfio_dma_map_limit_test.iommufd.unmap_range": "pass",
        "vfio_dma_map_limit_test.iommufd.unmap_all": "pass",
        "vfio_dma_map_limit_test.iommufd.overflow": "pass",
    }
    assert got == expected, run.output
    assert PRIVATE_MEMORY not in run.output, run.output
    for c in run.cases:
        if c.result == "skip":
            assert c.reason.startswith("mmap() failed"), (c.name, c.reason)
