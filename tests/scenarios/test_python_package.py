"""The Python client installs in the test VM, which has no network, and its
pytest plugin (found through its entry point in the installed copy) runs a
user's scenario: it starts the daemon, binds an edu device, checks DMA,
asks the status and stops the daemon.

    scripts/vm -- /usr/bin/python3 -m pytest tests/scenarios/test_python_package.py -v
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO, in_test_vm
from harness.daemon import DAEMON, daemon_pids

pytestmark = [
    pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
    # Installing the package does not depend on the kernel, and under the
    # test VM's emulation it takes minutes: it runs on Debian 12's kernel.
    pytest.mark.skipif(not os.uname().release.startswith("6.1."),
                       reason="the package installs the same on every kernel: "
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


def test_installs_offline_and_the_plugin_runs_a_scenario(tmp_path):
    if daemon_pids():
        pytest.fail("a daemon is running: the user's scenario starts its own")
    # The guest sees the tree read-only; setuptools builds in the tree.
    src = shutil.copytree(REPO / "python", tmp_path / "src")
    venv = tmp_path / "venv"
    # Debian's pip, run by the environment's interpreter, installs there
    # (a pip of the environment's own would take minutes to set up here).
    run(["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", venv])
    run([venv / "bin/python", "-m", "pip", "install", "--no-build-isolation", "--no-index",
         "--no-compile", "--no-cache-dir", "--disable-pip-version-check", src])
    scenario = tmp_path / "test_mine.py"
    scenario.write_text(USER_SCENARIO)
    r = run([venv / "bin/python", "-m", "pytest", "-p", "no:cacheprovider", "-v", scenario,
             f"--cuse-ioasid-daemon={DAEMON}"], cwd=tmp_path)
    assert "test_mine.py::test_installed PASSED" in r.stdout, r.stdout
    assert not daemon_pids(), "the plugin left its daemon running"
