"""The demo's QEMU leg, run inside the test VM by scripts/demo after flow
5.1: an unmodified QEMU 10 assigns an edu device through the daemon's
/dev/iommu and /dev/vfio/devices/vfioN (QEMU's iommufd backend), and the
device's DMA lands in the guest's RAM.

No guest OS runs: QEMU starts with -qtest, and this script plays the
guest's driver over that channel (python/cuse_ioasid/qtest_edu.py). It
starts the daemon (or uses a running one), starts QEMU through
scripts/qemu-iommufd, writes a message into guest RAM, has the device copy
it into its buffer and back into guest RAM at another address, reads it
back, waits for the device's interrupt, and shows what QEMU asked of the
daemon. Exits non-zero if anything is not as it should be.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

from cuse_ioasid.iommufd import cdev_path  # noqa: E402
from cuse_ioasid.qtest import Qemu, QtestError  # noqa: E402
from cuse_ioasid.qtest_edu import QtestEdu  # noqa: E402
from flow_demo import DAEMON, say, start_daemon, stop_daemon, wait_for_nodes  # noqa: E402

DEVICE = "0000:00:0a.0"  # an edu alone in its IOMMU group
SRC = 0x0010_0000  # guest-physical addresses in the guest's RAM
DST = 0x0020_0000
MSI_ADDR = 0x7000  # the interrupt shows up as a write of MSI_DATA here
MSI_DATA = 0x4ED1
RAM_MB = 32
MESSAGE = b"Hello from guest RAM! The edu device read this at 1 MiB and wrote it at 2 MiB."


def qemu_args() -> list[str]:
    """The guest: q35 under TCG, its RAM in a shared memfd."""
    return ["-accel", "tcg",
            "-machine", "q35,memory-backend=ram0,aux-ram-share=on", "-m", str(RAM_MB),
            "-object", f"memory-backend-memfd,id=ram0,size={RAM_MB}M,share=on"]


def status() -> dict:
    r = subprocess.run([str(DAEMON), "status", "--json"], capture_output=True, text=True,
                       timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def main() -> int:
    proc = start_daemon()
    try:
        result = demo()
    finally:
        clean = stop_daemon(proc)
    return result if clean else 1


def demo() -> int:
    say("Last: QEMU itself. QEMU 10 can hand a PCI device to a guest through the kernel's")
    say("iommufd interface (/dev/iommu and /dev/vfio/devices/vfioN). Debian's kernels are")
    say("built without it; the daemon serves both nodes in user space, on top of the same")
    say("legacy VFIO as before, so an unmodified QEMU 10 (Debian bookworm-backports'")
    say("10.0.2, unpacked by scripts/fetch-qemu, not installed) uses it as it is.")
    say()
    node = cdev_path(DEVICE)
    if not wait_for_nodes(["/dev/iommu", node]):
        say(f"FAILED: the daemon serves no /dev/iommu or {node}.")
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="qemu-demo-"))
    # From tmpfs: the VM reads the host's files over 9p, page by page.
    copy = subprocess.run([str(REPO / "scripts" / "fetch-qemu"), "--offline",
                           "--copy-to", str(scratch / "qemu")], capture_output=True, text=True)
    if copy.returncode != 0:
        say(f"FAILED: no QEMU 10 ({copy.stderr.strip()}): run scripts/fetch-qemu on the host.")
        return 1
    binary = copy.stdout.strip()
    launcher = [str(REPO / "scripts" / "qemu-iommufd"), f"{DEVICE},addr=04.0", "--"]
    say(f"The launcher scripts/qemu-iommufd opens /dev/iommu and {node} (the device")
    say(f"{DEVICE}) and starts QEMU with the two file descriptors:")
    say("   qemu-system-x86_64 -object iommufd,id=iommufd0,fd=3 \\")
    say(f"       -device vfio-pci,fd=4,iommufd=iommufd0,id={Path(node).name},addr=04.0 \\")
    say(f"       {shlex.join(qemu_args())}")
    say("   (plus -qtest stdio -S: no guest OS; this script plays the guest's driver)")
    say()
    t0 = time.monotonic()
    qemu = Qemu(binary, qemu_args(), scratch, launcher=launcher)
    try:
        with qemu:
            say(f"QEMU is up ({time.monotonic() - t0:.0f} s; software emulation inside software "
                "emulation). What the daemon")
            say("holds for it now (cuse-ioasid status):")
            client = next((p for p in status().get("processes", [])
                           if p["pid"] == qemu.proc.pid), None)
            if not client:
                say("FAILED: the daemon shows no file of QEMU's.")
                return 1
            for f in client["files"]:
                what = [f"address space {o['id']}: {o['mapped_bytes'] >> 20} MiB of guest RAM "
                        "mapped" for o in f["objects"]]
                what += [f"device {d['pci']} bound to it" for d in f["devices"]]
                if f.get("device"):
                    what.append(f"QEMU's file of device {f['device']}")
                say(f"   {f['node']}: {'; '.join(what)}")
            say()
            edu = QtestEdu.find(qemu)
            edu.enable()
            edu.enable_msi(MSI_ADDR, MSI_DATA)
            say("In the guest, the edu is at 00:04.0. Its driver (this script) gave it an address,")
            say("enabled bus mastering and pointed its interrupt (MSI) at a word of guest RAM.")
            qemu.memwrite(SRC, MESSAGE)
            qemu.memwrite(DST, bytes(len(MESSAGE)))
            say(f"It wrote a message at guest address {SRC:#x} and told the device: copy "
                f"{len(MESSAGE)} bytes from {SRC:#x}")
            say(f"into your buffer, then from the buffer to {DST:#x}, and interrupt when done.")
            edu.to_device(SRC, len(MESSAGE), irq=True)
            edu.to_memory(DST, len(MESSAGE), irq=True)
            got = qemu.memread(DST, len(MESSAGE))
            say(f"   guest RAM at {DST:#x} now reads: {got.decode(errors='replace')!r}")
            say(f"   the interrupt arrived: {MSI_DATA:#x} written at {MSI_ADDR:#x}")
            if got != MESSAGE:
                say("FAILED: the message did not arrive.")
                return 1
            exit_status = qemu.quit()
    except QtestError as e:
        say(f"FAILED: {e}")
        return 1
    say()
    if exit_status != 0:
        say(f"FAILED: QEMU exited with {exit_status}:\n{qemu.log()}")
        return 1
    counts = {(r["kind"], r["command"]): r["calls"]
              for r in status().get("counters", {}).get("requests", [])
              if r["kind"] in ("iommufd", "cdev")}
    say("QEMU quit cleanly. What it asked of the daemon (requests per command):")
    for (kind, command), calls in sorted(counts.items()):
        say(f"   {'/dev/iommu' if kind == 'iommufd' else node:24} {command:36} {calls}")
    say()
    say("The device read the guest's RAM and wrote into it at guest-physical addresses:")
    say("QEMU mapped its RAM into an I/O address space through /dev/iommu, and the daemon")
    say("set the IOMMU up for it with the kernel's legacy VFIO interface. (The unknown ioctl")
    say("on /dev/iommu is the daemon's own, how a bind finds the iommufd; the one on the")
    say("device is QEMU's migration probe, VFIO_DEVICE_FEATURE, which the daemon answers")
    say("with ENOTTY, as the kernel does for a device without migration.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
