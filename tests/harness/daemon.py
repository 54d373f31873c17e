"""The daemon as the scenarios see it: its binary, its pids, the test VM's
edu devices, an open device node with the edu driver on top, and small
helpers. The fixture that starts and stops the daemon is the plugin's
``ioasid_daemon`` (python/cuse_ioasid/pytest_plugin.py); tests/conftest.py
names it ``daemon`` and ``nodes``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cuse_ioasid import vfio
from cuse_ioasid.edu import Edu
# The scenarios import these two from here; the plugin has them.
from cuse_ioasid.pytest_plugin import daemon_pids, wait_for

__all__ = ["ALL_EDU", "ALONE_1", "ALONE_2", "ALONE_3", "DAEMON", "LENGTH", "Node", "SHARED_A",
           "SHARED_B", "daemon_log", "daemon_pids", "errno_of", "log_lines", "wait_for"]

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


def daemon_log() -> Path:
    """The log file of the running daemon: $VM_SCRATCH/daemon.log when
    scripts/vm --daemon started it, else the daemon-<module>.log the
    `daemon` fixture writes (the newest one) in $CUSE_IOASID_LOG_DIR
    (tests/scenarios/run: the guest's own /tmp) or $VM_SCRATCH."""
    dirs = {Path(os.environ[v]) for v in ("CUSE_IOASID_LOG_DIR", "VM_SCRATCH") if os.environ.get(v)}
    logs = sorted((p for d in dirs for p in d.glob("daemon*.log")), key=lambda p: p.stat().st_mtime)
    if not logs:
        pytest.fail(f"no daemon log in {sorted(map(str, dirs))}")
    return logs[-1]


def log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


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
