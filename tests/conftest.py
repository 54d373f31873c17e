"""Shared pytest set-up: makes ``harness`` (the project's own test helpers)
and ``cuse_ioasid`` (the Python client, python/cuse_ioasid) importable and
offers fixtures for the test VM's devices. Tests that need VFIO skip outside
the VM."""

from __future__ import annotations

import faulthandler
import importlib.metadata
import importlib.util
import os
import sys
import threading
from pathlib import Path

import pytest
from _pytest.faulthandler import fault_handler_stderr_key

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

REPO = TESTS.parent


def _plugin_installed() -> bool:
    return any(ep.value == "cuse_ioasid.pytest_plugin"
               for ep in importlib.metadata.entry_points(group="pytest11"))


# The Python client and its pytest plugin: installed (scripts/python-client;
# pytest loaded the plugin through its entry point), or else the source
# tree's, registered here (`/usr/bin/python3 -m pytest ...`).
if not _plugin_installed():
    if importlib.util.find_spec("cuse_ioasid") is None:
        sys.path.insert(0, str(REPO / "python"))
    pytest_plugins = ["cuse_ioasid.pytest_plugin"]

from harness import vm_guard  # noqa: E402
from harness.daemon import ALL_EDU, wait_for  # noqa: E402

# --require-vm: a scenario that skips for lack of the VM or the daemon fails
# (scripts/test's VM stages; tests/harness/vm_guard.py).
pytest_addoption = vm_guard.pytest_addoption
pytest_sessionstart = vm_guard.pytest_sessionstart
pytest_runtest_makereport = vm_guard.pytest_runtest_makereport


# A scenario that hangs must fail the stage with the place it hangs, not
# run into scripts/vm's timeout with nothing said: past this many seconds
# for one test (its set-up, call and tear-down), every thread's Python
# traceback goes to the terminal, then a line naming the test, and pytest
# exits with status 1.
TEST_WATCHDOG_SECONDS = float(os.environ.get("TEST_WATCHDOG_SECONDS", "900"))


def _watchdog_fired(out, nodeid: str) -> None:
    faulthandler.dump_traceback(file=out, all_threads=True)
    out.write(f"\nWATCHDOG: {nodeid} ran past {TEST_WATCHDOG_SECONDS:.0f} s "
              "(TEST_WATCHDOG_SECONDS); the tracebacks above show where it hangs\n")
    out.flush()
    os._exit(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # The terminal's stderr, which pytest's own faulthandler plugin keeps
    # (fd 2 itself is captured while a test runs).
    out = item.config.stash.get(fault_handler_stderr_key, None) or sys.__stderr__
    timer = threading.Timer(TEST_WATCHDOG_SECONDS, _watchdog_fired, (out, item.nodeid))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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


@pytest.fixture(scope="session")
def qemu_binary(tmp_path_factory) -> Path:
    """The QEMU 10 that scripts/fetch-qemu unpacked, copied into the test
    VM's tmpfs (harness.project_scripts.qemu_copy); a failure, not a skip,
    when it was not fetched."""
    from harness.project_scripts import cached_qemu, qemu_copy

    binary = cached_qemu()
    if binary is None:
        pytest.fail("QEMU 10 is not in .cache/qemu: run scripts/fetch-qemu on the host "
                    "(scripts/test does it before the VM stages)")
    return qemu_copy(binary, tmp_path_factory.mktemp("qemu"))


@pytest.fixture(scope="session")
def qemu11_binary(tmp_path_factory) -> Path:
    """Debian sid's QEMU 11 with sid's C library (scripts/fetch-qemu --sid),
    its binary copied into the test VM's tmpfs; a failure when it was not
    fetched."""
    from harness.project_scripts import cached_qemu, qemu_copy

    wrapper = cached_qemu(sid=True)
    if wrapper is None:
        pytest.fail("QEMU 11 is not in .cache/qemu-sid: run scripts/fetch-qemu --sid on the host "
                    "(scripts/test does it before the VM stages)")
    return qemu_copy(wrapper, tmp_path_factory.mktemp("qemu11"))


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
# address -> device node), or says `pytest.mark.usefixtures("daemon")`; both
# come from the plugin's `ioasid_daemon` (python/cuse_ioasid/pytest_plugin.py).
# If scripts/vm --daemon already started one, it is used; otherwise
# target/debug/cuse-ioasid (tests/pytest.ini; $CUSE_IOASID_DAEMON, as
# scripts/vm takes it, overrides) is started for the module and, at the end
# of the module, stopped with SIGTERM, and must exit 0. Starting it per module frees the IOMMU
# groups between modules, so the legacy VFIO scenarios (which need the
# groups) run in the same VM boot.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(ioasid_daemon) -> int:
    """The pid of the running daemon (the plugin's ``ioasid_daemon``)."""
    return ioasid_daemon.pid


@pytest.fixture(scope="module")
def nodes(ioasid_daemon) -> dict[str, str]:
    """PCI address -> device node, as `cuse-ioasid --list` prints them
    (every node exists)."""
    for bdf in ALL_EDU:
        assert bdf in ioasid_daemon.nodes, f"{bdf} missing from `cuse-ioasid --list`"
    return ioasid_daemon.nodes


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

IOMMUFD_FRONT_END = True


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
