"""``--require-vm``: the VM scenarios may not pass by skipping.

Outside the test VM every scenario skips, and pytest reports success:
issue 17 saw a CI stage go green with "91 skipped" when the in-VM check
misfired. With ``--require-vm`` (which ``tests/scenarios/run``, the
command of scripts/test's VM stages, always passes):

- the session stops at once, with a failure, unless this is the test VM
  (VFIO's container device, ``/dev/cuse`` and ``VM_SCRATCH`` all present);
- a test that skips anyway for lack of the VM, VFIO, ``/dev/cuse``, the
  scratch directory or the daemon fails instead.

A skip for another, stated reason (a kernel feature that this kernel
lacks, say) stays a skip; ``-rs`` lists every one in the summary.

The hooks are imported by ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import re

import pytest

OPTION = "--require-vm"

# Skip reasons that mean "this is not (all of) the test VM".
ENVIRONMENT = re.compile(r"test VM|scripts/vm|VM_SCRATCH|/dev/cuse|/dev/vfio|VFIO|daemon", re.IGNORECASE)


def missing_vm() -> list[str]:
    """What of the test VM this machine lacks (empty inside it)."""
    checks = {
        "/dev/vfio/vfio (VFIO)": os.path.exists("/dev/vfio/vfio"),
        "/dev/cuse (the cuse module)": os.path.exists("/dev/cuse"),
        "VM_SCRATCH (set by scripts/vm)": "VM_SCRATCH" in os.environ,
    }
    return [what for what, present in checks.items() if not present]


def is_environment_skip(reason: str) -> bool:
    """Whether a skip reason says the VM (or something only it has) is
    missing."""
    return bool(ENVIRONMENT.search(reason))


def pytest_addoption(parser):
    parser.addoption(
        OPTION,
        action="store_true",
        default=False,
        help="fail instead of skipping when the test VM, VFIO, /dev/cuse or the daemon is missing "
        "(scripts/test's VM stages)",
    )


def pytest_sessionstart(session):
    if not session.config.getoption(OPTION):
        return
    missing = missing_vm()
    if missing:
        pytest.exit(
            f"{OPTION}: this is not the test VM (missing: {', '.join(missing)}); "
            "run the scenarios with scripts/vm, as scripts/test does",
            returncode=3,
        )


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not item.config.getoption(OPTION):
        return
    reason = _skip_reason(report)
    if is_environment_skip(reason):
        report.outcome = "failed"
        report.longrepr = f"{OPTION}: skipped for lack of the test VM or the daemon: {reason}"
