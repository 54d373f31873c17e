"""Where the test VM's edu devices are: BDFs, IOMMU groups, sharing.

Reads sysfs only, so it works in the guest without opening anything. The
VM (scripts/vm) puts three edu devices alone in their groups at 00:0a.0,
00:0b.0, 00:0c.0 and two behind a conventional PCI bridge (01:01.0,
01:02.0) that share one group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .edu import EDU_DEVICE, EDU_VENDOR

PCI_DEVICES = Path("/sys/bus/pci/devices")


@dataclass(frozen=True)
class PciDevice:
    bdf: str  # e.g. "0000:00:0a.0"
    group: int | None  # IOMMU group number, None without an IOMMU
    driver: str | None  # bound driver's name

    @property
    def group_path(self) -> str:
        return f"/dev/vfio/{self.group}"


def _read_id(dev: Path, name: str) -> int:
    return int((dev / name).read_text().strip(), 16)


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def pci_device(bdf: str) -> PciDevice:
    dev = PCI_DEVICES / bdf
    group = _link_name(dev / "iommu_group")
    return PciDevice(bdf=bdf, group=int(group) if group is not None else None,
                     driver=_link_name(dev / "driver"))


def edu_devices() -> list[PciDevice]:
    """Every edu device, sorted by BDF (stable: the VM fixes the addresses)."""
    found = []
    for dev in sorted(PCI_DEVICES.iterdir()):
        if _read_id(dev, "vendor") == EDU_VENDOR and _read_id(dev, "device") == EDU_DEVICE:
            found.append(pci_device(dev.name))
    return found


def group_members(group: int) -> list[str]:
    """BDFs of every device in an IOMMU group (bridges included)."""
    return sorted(os.listdir(f"/sys/kernel/iommu_groups/{group}/devices"))


@dataclass(frozen=True)
class Topology:
    edus: list[PciDevice]

    @property
    def by_group(self) -> dict[int, list[PciDevice]]:
        groups: dict[int, list[PciDevice]] = {}
        for d in self.edus:
            groups.setdefault(d.group, []).append(d)
        return groups

    @property
    def alone(self) -> list[PciDevice]:
        """Edu devices that are the only edu device in their group."""
        return [ds[0] for ds in self.by_group.values() if len(ds) == 1]

    @property
    def shared(self) -> list[list[PciDevice]]:
        """Groups holding more than one edu device."""
        return [ds for ds in self.by_group.values() if len(ds) > 1]


def discover() -> Topology:
    return Topology(edus=edu_devices())
