"""Host test: the Python client (python/, package cuse_ioasid) as a user
installs it: built offline with Debian's setuptools into a wheel that
holds every module and depends on nothing, installed into a fresh virtual
environment, where pytest finds its plugin through the pytest11 entry
point. The README's example scenario is the file scenarios run; the
plugin's test_vm fixture boots the test VM.

Run: target/python/bin/python -m pytest tests/host/test_python_package.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = {"__init__", "ioasid", "iommufd", "vfio", "edu", "topology", "qtest", "qtest_edu",
           "pytest_plugin"}


def run(argv, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"`{' '.join(map(str, argv))}` exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the source directory: build a copy.
    src = shutil.copytree(REPO / "python", out / "src")
    run(["/usr/bin/python3", "-m", "pip", "wheel", "--no-build-isolation", "--no-index", "--no-deps",
         "--no-cache-dir", "--disable-pip-version-check", "-w", out, src])
    [built] = out.glob("cuse_ioasid-*.whl")
    return built


def test_the_wheel_holds_every_module_and_needs_nothing(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        modules = {Path(n).stem for n in names if n.startswith("cuse_ioasid/") and n.endswith(".py")}
        assert modules == MODULES, modules
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
        assert "Requires-Dist" not in meta, "the client must need the standard library only"
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(entry_points).decode()
        assert re.search(r"\[pytest11\]\s*\ncuse_ioasid = cuse_ioasid.pytest_plugin", text), text
    # Every module of the tree is in the wheel.
    assert {p.stem for p in (REPO / "python/cuse_ioasid").glob("*.py")} == MODULES


def test_installed_in_a_fresh_environment_pytest_finds_the_plugin(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", venv])
    python = venv / "bin/python"
    run([python, "-m", "pip", "install", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", wheel])
    # The installed copy, away from the tree.
    where = run([python, "-c", "import cuse_ioasid; print(cuse_ioasid.__file__)"], cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout
    scenario = tmp_path / "test_user.py"
    scenario.write_text(
        "def test_plugin(pytestconfig):\n"
        "    assert pytestconfig.pluginmanager.has_plugin('cuse_ioasid')\n"
        "def test_daemon(ioasid_daemon):\n"
        "    pass\n"
    )
    r = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-v", scenario],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "test_user.py::test_plugin PASSED" in r.stdout, r.stdout + r.stderr
    # Outside the VM the daemon fixture skips, and says why.
    assert "test_user.py::test_daemon SKIPPED" in r.stdout, r.stdout
    assert "needs /dev/cuse and VFIO: run in the test VM (scripts/vm)" in r.stdout, r.stdout
    fixtures = run([python, "-m", "pytest", "-p", "no:cacheprovider", "--fixtures", scenario],
                   cwd=tmp_path).stdout
    for name in ("ioasid_daemon", "ioasid_file", "bound_edu", "edu_dma_check", "test_vm"):
        assert re.search(rf"^{name}\b", fixtures, re.M), f"{name} missing:\n{fixtures}"


def test_the_readme_shows_the_example_scenario_as_it_runs():
    readme = (REPO / "README.md").read_text()
    source = (REPO / "tests/scenarios/test_readme_example.py").read_text()
    test = source[source.index("def test_my_program"):]
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert any(test.strip() in b for b in blocks), "README: the example scenario differs from " \
        "tests/scenarios/test_readme_example.py"


def test_the_vm_fixture_runs_a_command_with_the_daemon(test_vm):
    """The plugin's test_vm: scripts/vm with --daemon; inside, `cuse-ioasid
    status --json` answers with every device the VM has."""
    r = test_vm.run(["target/debug/cuse-ioasid", "status", "--json"], daemon=True, timeout=300,
                    cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads(r.stdout)
    assert [d["pci"] for d in status["devices"]] == [
        "0000:00:0a.0", "0000:00:0b.0", "0000:00:0c.0", "0000:01:01.0", "0000:01:02.0"]
    assert status["processes"] == []


def test_the_daemons_request_lines_are_read_back_by_process(tmp_path):
    """Daemon.requests reads the lines `--log info,cuse_ioasid::requests=debug`
    writes (their form is pinned by the daemon's host test
    every_request_writes_one_debug_line_when_asked_and_none_otherwise)."""
    from cuse_ioasid.pytest_plugin import Daemon, Request

    log = tmp_path / "daemon.log"
    prefix = "2026-12-01T16:26:42.197374Z DEBUG cuse_ioasid::requests: request"
    log.write_text(
        "2026-12-01T16:26:11.000000Z  INFO cuse_ioasid: serving node=/dev/iommu dev=243:0\n"
        f"{prefix} node=/dev/iommu fh=1 pid=208 cmd=open nr=- result=ok\n"
        f"{prefix} node=/dev/iommu fh=1 pid=208 cmd=unknown ioctl nr=0x3b5f result=ok\n"
        f"{prefix} node=/dev/vfio/devices/vfio0 fh=2 pid=209 cmd=VFIO_DEVICE_FEATURE "
        "nr=0x3b75 result=ENOTTY\n"
        f"{prefix} node=/dev/iommu fh=1 pid=? cmd=release nr=- result=ok\n")
    daemon = Daemon(pid=1, binary="cuse-ioasid", nodes={}, log=log)
    assert daemon.requests(208) == [
        Request("/dev/iommu", 1, "208", "open", None, "ok"),
        Request("/dev/iommu", 1, "208", "unknown ioctl", 0x3B5F, "ok"),
    ]
    assert [r.command for r in daemon.requests()] == [
        "open", "unknown ioctl", "VFIO_DEVICE_FEATURE", "release"]
    assert daemon.requests()[2].result == "ENOTTY"
    assert daemon.requests()[3].pid == "?"
