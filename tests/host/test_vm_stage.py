"""Host test: the VM stages of scripts/test cannot pass by skipping (issue
17, item 8). Outside the test VM every scenario skips; plain pytest calls
that a success, and so did the VM stage until it ran its scenarios through
tests/scenarios/run, which passes --require-vm (tests/harness/vm_guard.py).

Run: /usr/bin/python3 -m pytest tests/host
"""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "tests" / "scenarios" / "run"

sys.path.insert(0, str(REPO / "tests"))
from harness import vm_guard  # noqa: E402


def host_env():
    """This machine's environment without the VM's marker, as a host shell
    has it."""
    env = dict(os.environ)
    env.pop("VM_SCRATCH", None)
    return env


def run(args):
    return subprocess.run(args, cwd=REPO, env=host_env(), capture_output=True, text=True, timeout=600)


def test_this_is_not_the_vm():
    # The premise of the tests below: the host lacks what the VM has.
    assert vm_guard.missing_vm(), "these host tests must run outside the test VM"


def test_plain_pytest_passes_outside_the_vm_by_skipping_everything():
    """The hazard: the scenarios, run as the VM stage ran them before, exit
    0 on a machine that is not the VM, every one skipped."""
    r = run([sys.executable, "-m", "pytest", "tests/scenarios", "-q", "-p", "no:cacheprovider"])
    last = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.match(r"\d+ skipped\b", last) and "passed" not in last and "failed" not in last, last


def test_the_vm_stage_fails_outside_the_vm():
    """The VM stages' command (scripts/test runs it under scripts/vm) fails
    on a machine that is not the VM, and says why."""
    r = run([str(RUN), "-q"])
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "--require-vm: this is not the test VM" in out, out
    assert "skipped" not in out.splitlines()[-1], out


def test_the_vm_stage_command_is_what_scripts_test_runs():
    script = (REPO / "scripts" / "test").read_text()
    assert "-- tests/scenarios/run " in script
    assert "--require-vm" in RUN.read_text()


def test_environment_skips_are_told_from_other_skips():
    for reason in (
        "needs the test VM: run under scripts/vm",
        "needs the test VM's scratch directory (VM_SCRATCH)",
        "needs /dev/cuse: run inside the test VM (scripts/vm)",
        "needs VFIO: run inside the test VM (scripts/vm)",
        "needs the daemon",
    ):
        assert vm_guard.is_environment_skip(reason), reason
    for reason in (
        "kernel 6.1 lacks PROCMAP_QUERY",
        "the edu device has no MSI-X on this QEMU",
    ):
        assert not vm_guard.is_environment_skip(reason), reason
