"""Shared pytest set-up: makes ``harness`` importable and offers fixtures
for the test VM's devices. Tests that need VFIO skip outside the VM."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

REPO = TESTS.parent


def in_test_vm() -> bool:
    return os.path.exists("/dev/vfio/vfio") and "VM_SCRATCH" in os.environ


needs_vm = pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def topology():
    """The edu devices of the VM (harness.topology.Topology)."""
    from harness import topology

    if not in_test_vm():
        pytest.skip("needs the test VM: run under scripts/vm")
    return topology.discover()


@pytest.fixture
def scratch() -> Path:
    """The writable directory shared with the host (VM_SCRATCH)."""
    path = os.environ.get("VM_SCRATCH")
    if not path:
        pytest.skip("needs the test VM's scratch directory (VM_SCRATCH)")
    return Path(path)
