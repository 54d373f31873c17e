"""The Python client as a user installs it (from its wheel, offline, into
an environment of its own: target/python-installed, made on the host by
scripts/python-client; tests/host/test_python_package.py checks the wheel
and the install): its pytest plugin, found through its entry point in the
installed copy, runs a user's scenario in the test VM. It starts the
daemon, binds an edu device, checks DMA, asks the status and stops the
daemon.

    scripts/python-client
    scripts/vm -- /usr/bin/python3 -m pytest tests/scenarios/test_python_package.py -v
"""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO, in_test_vm
from harness.daemon import DAEMON, daemon_pids

INSTALLED = REPO / "target/python-installed"

pytestmark = [
    pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
    # What this checks is the package, the same on every kernel (its
    # fixtures' DMA runs in other scenarios on every kernel); a pytest
    # started inside the VM's emulation takes a minute or more.
    pytest.mark.skipif(not os.uname().release.startswith("6.1."),
                       reason="the installed package is the same on every kernel: "
                              "it is checked on Debian 12's kernel (6.1) only"),
]

USER_SCENARIO = '''
import os

import cuse_ioasid


def test_installed(ioasid_daemon, bound_edu, edu_dma_check, pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("cuse_ioasid")  # the entry point's name
    assert "site-packages" in cuse_ioasid.__file__
    assert edu_dma_check(bound_edu, length=1000)
    [me] = [p for p in ioasid_daemon.status()["processes"] if p["pid"] == os.getpid()]
    assert me["files"][0]["objects"][0]["attached"] == [bound_edu.bdf]
'''


def run(argv, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)
    if r.returncode != 0:
        pytest.fail(f"`{' '.join(map(str, argv))}` exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def test_the_installed_plugin_runs_a_users_scenario(tmp_path):
    if daemon_pids():
        pytest.fail("a daemon is running: the user's scenario starts its own")
    python = INSTALLED / "bin/python"
    if not python.exists():
        pytest.fail(f"{INSTALLED} is missing: run scripts/python-client first")
    scenario = tmp_path / "test_mine.py"
    scenario.write_text(USER_SCENARIO)
    r = run([python, "-m", "pytest", "-p", "no:cacheprovider", "-v", scenario,
             f"--cuse-ioasid-daemon={DAEMON}"], cwd=tmp_path)
    assert "test_mine.py::test_installed PASSED" in r.stdout, r.stdout
    assert not daemon_pids(), "the plugin left its daemon running"
