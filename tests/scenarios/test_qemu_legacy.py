"""QEMU 10 as a client of legacy VFIO: the baseline for the iommufd scenario.

Inside the test VM, Debian bookworm-backports' QEMU (fetched on the host by
scripts/fetch-qemu, which scripts/test runs before the VM stages) gets an
edu device of the test VM the legacy way (``-device vfio-pci,host=BDF``:
container and group). It runs with ``-qtest`` and no guest OS; the qtest
driver (``cuse_ioasid.qtest_edu``) plays the guest's driver: it enables the
device, writes a pattern into guest RAM, and has the edu copy it guest RAM
→ device → guest RAM at guest-physical addresses, with an MSI after each
transfer. Then a machine reset (QMP ``system_reset``), a second round trip
on the reset device, a clean exit, and the device free for the next client
(a plain legacy VFIO container and a DMA through it).

The iommufd scenario is this one with ``-object iommufd,fd=N -device
vfio-pci,fd=M,iommufd=...`` on the daemon's nodes instead of ``host=``.
"""

from __future__ import annotations

import os

import pytest

from cuse_ioasid import vfio
from cuse_ioasid.edu import Edu
from cuse_ioasid.qtest import Qemu, machine_args
from cuse_ioasid.qtest_edu import PCI_BAR0, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, \
    QtestEdu

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/vfio/vfio"),
    reason="needs VFIO: run inside the test VM (scripts/vm)",
)

SRC = 0x0010_0000  # guest-physical, inside the inner machine's RAM
DST = 0x0020_0000
MSI_ADDR = 0x0000_7000  # a word of guest RAM that receives the MSI data
MSI_DATA = 0x4ED1
LENGTH = 3000  # below the edu's 4096-byte buffer


def legacy_args(bdf: str) -> list[str]:
    # Guest RAM stays private (QEMU's default): legacy VFIO pins it itself.
    return [*machine_args(), "-device", f"vfio-pci,host={bdf},addr=04.0"]


def test_dma_msi_reset_and_clean_exit(qemu_binary, topology, tmp_path):
    bdf = topology.alone[0].bdf
    qemu = Qemu(qemu_binary, legacy_args(bdf), tmp_path)
    with qemu:
        edu = QtestEdu.find(qemu)
        edu.enable()
        edu.enable_msi(MSI_ADDR, MSI_DATA)
        edu.round_trip(SRC, DST, LENGTH, irq=True)

        qemu.system_reset()
        cmd = edu.cfg.read16(PCI_COMMAND)
        assert not cmd & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER), \
            f"command register {cmd:#x} after system_reset"
        assert edu.cfg.read32(PCI_BAR0) & ~0xF == 0, "BAR0 kept its address across the reset"

        edu.enable()
        edu.enable_msi(MSI_ADDR, MSI_DATA + 1)
        edu.round_trip(SRC, DST, LENGTH, irq=True)
        status = qemu.quit()
    assert status == 0, f"QEMU exited with {status}; its log:\n{qemu.log()}"
    assert_reusable(topology.alone[0])


def assert_reusable(dev) -> None:
    """The next client gets the group and the device, and its DMA works."""
    with vfio.Group(dev.group) as group:
        assert group.viable(), f"group {dev.group} not viable after QEMU exited"
        container = vfio.open_container_with([group])
        try:
            with group.open_device(dev.bdf) as device, vfio.DmaBuffer(2 * vfio.PAGE_SIZE) as mem:
                edu = Edu(device)
                edu.enable_bus_master()
                pattern = os.urandom(LENGTH)
                mem.write(0, pattern)
                container.map_dma(mem.page(0), SRC, vfio.PAGE_SIZE)
                container.map_dma(mem.page(1), DST, vfio.PAGE_SIZE)
                edu.round_trip(SRC, DST, LENGTH)
                assert mem.read(vfio.PAGE_SIZE, LENGTH) == pattern
                container.unmap_dma(SRC, vfio.PAGE_SIZE)
                container.unmap_dma(DST, vfio.PAGE_SIZE)
        finally:
            container.close()


def test_device_of_a_shared_group(qemu_binary, topology, tmp_path):
    """A device whose IOMMU group holds another edu (and the bridge): QEMU
    takes the group, the other device stays unused."""
    bdf = topology.shared[0][0].bdf
    qemu = Qemu(qemu_binary, legacy_args(bdf), tmp_path)
    with qemu:
        edu = QtestEdu.find(qemu)
        edu.enable()
        edu.round_trip(SRC, DST, LENGTH, irq=False)
        status = qemu.quit()
    assert status == 0, f"QEMU exited with {status}; its log:\n{qemu.log()}"
    assert_reusable(topology.shared[0][0])
