"""Shared pytest set-up: makes ``harness`` (the project's own test helpers)
and ``cuse_ioasid`` (the Python client, python/cuse_ioasid) importable and
offers fixtures for the test VM's devices. Tests that need VFIO skip outside
the VM."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

REPO = TESTS.parent

# The Python client: the installed package when this interpreter has it,
# else the source tree's.
if importlib.util.find_spec("cuse_ioasid") is None:
    sys.path.insert(0, str(REPO / "python"))

from harness import vm_guard  # noqa: E402
from harness.daemon import ALL_EDU, DAEMON, daemon_pids, wait_for  # noqa: E402

# --require-vm: a scenario that skips for lack of the VM or the daemon fails
# (scripts/test's VM stages; tests/harness/vm_guard.py).
pytest_addoption = vm_guard.pytest_addoption
pytest_sessionstart = vm_guard.pytest_sessionstart
pytest_runtest_makereport = vm_guard.pytest_runtest_makereport


def in_test_vm() -> bool:
    return os.path.exists("/dev/vfio/vfio") and "VM_SCRATCH" in os.environ


needs_vm = pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def topology():
    """The edu devices of the VM (cuse_ioasid.topology.Topology)."""
    from cuse_ioasid import topology

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


# ---------------------------------------------------------------------------
# The daemon, for the scenarios that talk to it.
#
# A module that needs the daemon asks for `daemon` (its pid) or `nodes` (PCI
# address -> device node), or says `pytest.mark.usefixtures("daemon")`. If
# scripts/vm --daemon already started one, the fixture uses it; otherwise it
# starts target/debug/cuse-ioasid (or $CUSE_IOASID_DAEMON, as scripts/vm
# does) for the module and, at the end of the module, stops it with SIGTERM
# and asserts that it exited 0. Starting it per module frees the IOMMU
# groups between modules, so the legacy VFIO scenarios (which need the
# groups) run in the same VM boot.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(request):
    """The pid of the running daemon (see the module docstring)."""
    running = daemon_pids()
    if os.path.exists("/dev/ioasid") and running:
        yield running[0]
        return
    if not DAEMON.exists():
        pytest.fail(f"{DAEMON} missing: run `cargo build --workspace --bins` on the host")
    name = Path(request.module.__file__).stem
    log_path = Path(os.environ["VM_SCRATCH"]) / f"daemon-{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(DAEMON)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists("/dev/ioasid"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the daemon did not create /dev/ioasid (status {proc.returncode}); "
                        f"its log: {log_path}")
        time.sleep(0.1)
    try:
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert code == 0, f"the daemon exited with {code} on SIGTERM; its log: {log_path}"


@pytest.fixture(scope="module")
def nodes(daemon) -> dict[str, str]:
    """PCI address -> device node, as `cuse-ioasid --list` prints them; waits
    until every node exists (the daemon registers /dev/ioasid first)."""
    out = subprocess.run([str(DAEMON), "--list"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"(/dev/\S+)\s+([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\s", line)
        if m:
            found[m.group(2)] = m.group(1)
    for bdf in ALL_EDU:
        assert bdf in found, f"{bdf} missing from `cuse-ioasid --list`:\n{out}"
    wait_for(lambda: all(os.path.exists(n) for n in found.values()),
             f"the daemon did not create every node of `cuse-ioasid --list`:\n{out}")
    return found


# ---------------------------------------------------------------------------
# The iommufd front end (issue 12): /dev/iommu and /dev/vfio/devices/vfioN.
#
# Its scenarios (tests/scenarios/test_iommufd_*.py) were written before the
# front end. Until it is *declared* present they run in every scripts/test
# as strict expected failures that may fail for one reason only: the
# `iommufd_nodes` fixture found no node and raised IommufdMissing. Any other
# failure (a harness bug, a wrong errno once nodes exist) is a real failure,
# and a test that passes fails as XPASS(strict): the signal to declare the
# front end. Once declared, a missing node is an ordinary failure.
#
# Declared: IOMMUFD_FRONT_END = True below (the commit that lands the front
# end sets it), or CUSE_IOASID_IOMMUFD=1 in the environment to run the
# scenarios as real tests now (scripts/vm --env CUSE_IOASID_IOMMUFD=1 ...);
# CUSE_IOASID_IOMMUFD=0 forces the undeclared mode.
# ---------------------------------------------------------------------------

IOMMUFD_FRONT_END = False


def iommufd_declared() -> bool:
    env = os.environ.get("CUSE_IOASID_IOMMUFD")
    return IOMMUFD_FRONT_END if env is None else env == "1"


class IommufdMissing(Exception):
    """The daemon serves no /dev/iommu or no /dev/vfio/devices/vfioN node."""


def iommufd_module_marks() -> list:
    """pytestmark of an iommufd scenario module (see above)."""
    marks = [
        pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
        # Every test of the module needs the nodes, so that none can pass
        # (XPASS) or fail for another reason when they are missing.
        pytest.mark.usefixtures("daemon", "iommufd_nodes"),
    ]
    if not iommufd_declared():
        marks.append(pytest.mark.xfail(
            raises=IommufdMissing, strict=True,
            reason="the iommufd front end is not declared (IOMMUFD_FRONT_END in tests/conftest.py)"))
    return marks


@pytest.fixture(scope="module")
def iommufd_nodes(nodes) -> dict[str, str]:
    """PCI address -> /dev/vfio/devices/vfioN of every edu device, N the
    kernel's own index (sysfs vfio-dev/vfioN); checks /dev/iommu too. Waits
    for them once declared; raises IommufdMissing otherwise."""
    from cuse_ioasid.iommufd import cdev_path

    wanted = {bdf: cdev_path(bdf) for bdf in ALL_EDU}
    paths = ["/dev/iommu", *wanted.values()]
    if iommufd_declared():
        wait_for(lambda: all(os.path.exists(p) for p in paths),
                 f"the daemon did not create {[p for p in paths if not os.path.exists(p)]}",
                 timeout=30)
    else:
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise IommufdMissing(f"no {', '.join(missing)}")
    return wanted
