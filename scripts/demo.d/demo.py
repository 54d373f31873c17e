"""The demo body, run inside the test VM by scripts/demo.

Shows the guest's IOMMU groups, the edu devices handed to vfio-pci and
/dev/cuse, then proves one DMA through the IOMMU with the legacy VFIO
interface, explaining each step. Exits non-zero if anything is not as it
should be.
"""

from __future__ import annotations

import os
import platform
import stat
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from cuse_ioasid import vfio  # noqa: E402
from cuse_ioasid.edu import Edu  # noqa: E402
from cuse_ioasid.topology import discover, group_members  # noqa: E402

IOVA_A = 0x100000
IOVA_B = 0x200000
MESSAGE = b"Hello through the IOMMU! This text went from page A to the device and back into page B."


def say(text: str = "") -> None:
    print(text, flush=True)


def main() -> int:
    say(f"Inside the VM: Linux {platform.release()}, running as root.")
    say()

    say("1. The CUSE device, through which the daemon will create /dev/ioasid:")
    if not stat.S_ISCHR(os.stat("/dev/cuse").st_mode):
        say("   /dev/cuse is missing or not a character device")
        return 1
    say("   /dev/cuse is there (character device).")
    say()

    topo = discover()
    say(f"2. The machine has {len(topo.edus)} 'edu' devices (QEMU's DMA test device), all handed to")
    say("   vfio-pci, and an emulated Intel IOMMU that sorts devices into groups:")
    for group, devs in sorted(topo.by_group.items()):
        members = group_members(group)
        others = [m for m in members if m not in {d.bdf for d in devs}]
        names = ", ".join(f"{d.bdf} (driver {d.driver})" for d in devs)
        extra = f" plus {', '.join(others)} (the PCI bridge in front of them)" if others else ""
        say(f"   IOMMU group {group} -> /dev/vfio/{group}: {names}{extra}")
    say(f"   {len(topo.alone)} devices are alone in their group; "
        f"{sum(len(s) for s in topo.shared)} share one group, so VFIO")
    say("   treats them as one unit: they can only ever use the same address space.")
    if len(topo.edus) != 5 or any(d.driver != "vfio-pci" for d in topo.edus):
        say("   UNEXPECTED: there should be five edu devices bound to vfio-pci")
        return 1
    say()

    dev = topo.alone[0]
    say(f"3. One DMA through the IOMMU with the legacy VFIO interface, on {dev.bdf}:")
    with vfio.Group(dev.group) as group, vfio.DmaBuffer(2 * vfio.PAGE_SIZE) as mem:
        container = vfio.open_container_with([group])
        say(f"   - opened /dev/vfio/{dev.group}, put it in a new container (/dev/vfio/vfio), IOMMU type1v2")
        with container, group.open_device(dev.bdf) as device:
            edu = Edu(device)
            edu.enable_bus_master()
            say(f"   - opened the device; its id register reads {edu.id():#010x} (edu), bus mastering on")
            mem.write(0, MESSAGE)
            say("   - made two pages of shared memory (memfd); page A holds a message, page B is zero")
            container.map_dma(mem.page(0), IOVA_A, vfio.PAGE_SIZE)
            container.map_dma(mem.page(1), IOVA_B, vfio.PAGE_SIZE)
            say(f"   - mapped page A at I/O address {IOVA_A:#x} and page B at {IOVA_B:#x}")
            edu.round_trip(IOVA_A, IOVA_B, len(MESSAGE))
            say(f"   - told the device: copy {len(MESSAGE)} bytes from {IOVA_A:#x} into your buffer, "
                f"then from the buffer to {IOVA_B:#x}")
            got = mem.read(vfio.PAGE_SIZE, len(MESSAGE))
            say(f"   - page B now reads: {got.decode(errors='replace')!r}")
            if got != MESSAGE:
                say("   FAILED: page B does not hold the message")
                return 1
            container.unmap_dma(IOVA_B, vfio.PAGE_SIZE)
            mem.fill(0, vfio.PAGE_SIZE)
            edu.to_memory(IOVA_B, len(MESSAGE))
            blocked = mem.read(vfio.PAGE_SIZE, vfio.PAGE_SIZE) == bytes(vfio.PAGE_SIZE)
            say(f"   - unmapped {IOVA_B:#x} and asked the device to write there again: page B "
                + ("stayed zero, the IOMMU blocked the write." if blocked else "CHANGED (wrong!)"))
            if not blocked:
                return 1
    say()
    say("The device reached this process's memory only where it was mapped. The cuse-ioasid")
    say("daemon will offer the same through /dev/ioasid and /dev/vfio/devices/devN.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
