"""The daemon as the scenarios see it: its binary, its pids, the test VM's
edu devices, and a polling helper. The fixtures that start and stop it are
in tests/scenarios/conftest.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DAEMON = REPO / os.environ.get("CUSE_IOASID_DAEMON", "target/debug/cuse-ioasid")

# The edu devices of the test VM (scripts/vm --help).
ALONE_1 = "0000:00:0a.0"
ALONE_2 = "0000:00:0b.0"
ALONE_3 = "0000:00:0c.0"
SHARED_A = "0000:01:01.0"  # behind the PCI bridge: one IOMMU group with SHARED_B
SHARED_B = "0000:01:02.0"
ALL_EDU = (ALONE_1, ALONE_2, ALONE_3, SHARED_A, SHARED_B)


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


def wait_for(predicate, what: str, timeout: float = 60.0):
    """Polls predicate until it holds; fails the test with `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout}s)")
        time.sleep(0.1)


