"""The demo body for the RFC's flow 5.1, run inside the test VM, either with
the daemon already started (scripts/vm --daemon) or without: then it starts
the daemon itself and stops it at the end (so the same boot can first run
demo.py, which needs the VFIO groups the daemon would hold).

Explains what the daemon is and which node is which device, then runs the
C program target/c/flow_5_1 (tests/c/flow_5_1.c, built on the host by
tests/c/build) on the first device node and narrates its result: the bytes
that crossed the IOMMU and the device's interrupt. Exits non-zero if the
flow fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAEMON = REPO / os.environ.get("CUSE_IOASID_DAEMON", "target/debug/cuse-ioasid")
FLOW = REPO / "target" / "c" / "flow_5_1"


def say(text: str = "") -> None:
    print(text, flush=True)


def start_daemon() -> subprocess.Popen | None:
    """Starts the daemon unless it runs; waits (bounded) for /dev/ioasid."""
    if os.path.exists("/dev/ioasid"):
        return None
    log = open(Path(os.environ.get("VM_SCRATCH", "/tmp")) / "daemon-flow-demo.log", "wb")
    proc = subprocess.Popen([str(DAEMON)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 60
    while not os.path.exists("/dev/ioasid") and proc.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    say(f"(started the daemon, process {proc.pid})")
    return proc


def stop_daemon(proc: subprocess.Popen | None) -> bool:
    if proc is None:
        return True
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    say(f"(stopped the daemon: exit status {code})")
    return code == 0


def main() -> int:
    proc = start_daemon()
    try:
        status = flow()
    finally:
        clean = stop_daemon(proc)
    return status if clean else 1


def wait_for_nodes(nodes: list[str]) -> bool:
    """The daemon creates the device nodes just after /dev/ioasid."""
    deadline = time.monotonic() + 30
    while not all(os.path.exists(n) for n in nodes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def flow() -> int:
    say("What runs here: cuse-ioasid, a root daemon in user space. Through CUSE (character")
    say("devices served by a process) it creates /dev/ioasid, the I/O address space file")
    say("proposed for Linux in 2021, and one /dev/vfio/devices/devN per device it manages.")
    say("Underneath it uses the VFIO interface this kernel really has (containers and")
    say("groups), so applications can be written against the proposal today.")
    say()
    if not os.path.exists("/dev/ioasid"):
        say(f"FAILED: /dev/ioasid is missing: the daemon ({DAEMON}) did not start.")
        return 1
    listing = subprocess.run([str(DAEMON), "--list"], capture_output=True, text=True)
    if listing.returncode != 0:
        say(f"FAILED: cuse-ioasid --list: {listing.stderr.strip()}")
        return 1
    say("Which node is which device (cuse-ioasid --list; 1234:11e8 is QEMU's 'edu' test")
    say("device, a small DMA engine; devices with the same group number can only be")
    say("isolated from each other together):")
    for line in listing.stdout.splitlines():
        say(f"   {line}")
    nodes = re.findall(r"^(/dev/\S+)", listing.stdout, re.M)
    if not nodes or not wait_for_nodes(nodes):
        say("FAILED: the daemon serves no device node (/dev/vfio/devices/devN).")
        return 1
    node = nodes[0]
    say()
    say(f"Now an ordinary C program (tests/c/flow_5_1.c) follows the proposal's flow 5.1 on {node}:")
    say("bind the device to an ioasid file, create an I/O address space, attach the device,")
    say("map two pages of the program's memory at I/O addresses of its choosing, then let the")
    say("device copy bytes from page A into its own buffer and back into page B - through the")
    say("IOMMU, which translates each I/O address - and raise an interrupt when done.")
    say()
    if not FLOW.exists():
        say(f"FAILED: {FLOW} is missing: run tests/c/build on the host.")
        return 1
    r = subprocess.run([str(FLOW), node], capture_output=True, text=True, timeout=300)
    for line in r.stdout.splitlines():
        say(f"   | {line}")
    for line in r.stderr.splitlines():
        say(f"   ! {line}")
    say()
    if r.returncode != 0:
        say(f"FAILED: flow_5_1 exited with status {r.returncode}.")
        return 1
    say("The device found page A's bytes at the I/O addresses the program chose and wrote")
    say("them into page B: the daemon set up the IOMMU for a process it does not belong to,")
    say("and the device's interrupt reached the program through an eventfd. Flow 5.1 works.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
