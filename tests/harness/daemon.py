"""The daemon as the scenarios see it: its binary, its pids, the test VM's
edu devices, an open device node with the edu driver on top, and small
helpers. The fixtures that start and stop the daemon are in
tests/conftest.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness import vfio
from harness.edu import Edu

REPO = Path(__file__).resolve().parents[2]

DAEMON = REPO / os.environ.get("CUSE_IOASID_DAEMON", "target/debug/cuse-ioasid")

# The edu devices of the test VM (scripts/vm --help).
ALONE_1 = "0000:00:0a.0"
ALONE_2 = "0000:00:0b.0"
ALONE_3 = "0000:00:0c.0"
SHARED_A = "0000:01:01.0"  # behind the PCI bridge: one IOMMU group with SHARED_B
SHARED_B = "0000:01:02.0"
ALL_EDU = (ALONE_1, ALONE_2, ALONE_3, SHARED_A, SHARED_B)

LENGTH = 3000  # edu transfers stay below its 4096-byte buffer


def daemon_pids() -> list[int]:
    """Pids of every running cuse-ioasid process."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "cuse-ioasid":
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def daemon_log() -> Path:
    """The log file of the running daemon: $VM_SCRATCH/daemon.log when
    scripts/vm --daemon started it, else the daemon-<module>.log the
    `daemon` fixture writes (the newest one)."""
    scratch = Path(os.environ["VM_SCRATCH"])
    logs = sorted(scratch.glob("daemon*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        pytest.fail(f"no daemon log in {scratch}")
    return logs[-1]


def log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def wait_for(predicate, what: str, timeout: float = 60.0):
    """Polls predicate until it holds; fails the test with `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout}s)")
        time.sleep(0.1)


def errno_of(fn, *args, **kw) -> int:
    """Runs fn; returns the errno it failed with, or 0 if it succeeded."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


class Node:
    """An open device node with the edu driver on top."""

    def __init__(self, path: str):
        self.path = path
        self.device = vfio.Device.open_node(path)
        self.fd = self.device.fd
        self._edu = None

    @property
    def edu(self) -> Edu:
        # Region access needs the device bound (the daemon opens the VFIO
        # device at bind); build the driver on first use.
        if self._edu is None:
            self._edu = Edu(self.device)
            self._edu.enable_bus_master()
        return self._edu

    def close(self):
        self.device.close()
