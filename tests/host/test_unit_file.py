"""Host test: tests/harness/unit.py reads a unit as systemd would (the VM
scenario tests/scenarios/test_service.py starts the unit's ExecStart by
hand with it), and the packaged unit asks for the capabilities the README
lists.

Run: /usr/bin/python3 -m pytest tests/host
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from harness.unit import Unit, cap_mask, read_environment_file, setpriv_argv  # noqa: E402

SAMPLE = """
# comment
[Unit]
Description=x

[Service]
EnvironmentFile=-/etc/default/missing
EnvironmentFile=/etc/default/present
Environment="ONE=a b" TWO=c
ExecStart=/usr/sbin/d $ARGS --name=${ONE} \\
    $TWO
CapabilityBoundingSet=CAP_CHOWN
CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SYS_PTRACE
NoNewPrivileges=yes
LimitMEMLOCK=infinity
"""


def test_exec_start_expands_like_systemd(tmp_path):
    (tmp_path / "etc/default").mkdir(parents=True)
    (tmp_path / "etc/default/present").write_text('# opts\nARGS="--a  --b"\nONE=ignored\n')
    unit = Unit(SAMPLE)
    env = unit.environment(tmp_path)
    # Environment= comes after the file and wins.
    assert env == {"ARGS": "--a  --b", "ONE": "a b", "TWO": "c"}
    # $VAR splits at white space, ${VAR} stays one word.
    assert unit.exec_start(env) == ["/usr/sbin/d", "--a", "--b", "--name=a b", "c"]
    assert unit.capabilities() == ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]
    assert unit.no_new_privileges() and unit.memlock_unlimited()
    with pytest.raises(FileNotFoundError):
        Unit("[Service]\nEnvironmentFile=/nope\n").environment(tmp_path)


def test_empty_assignment_resets_a_list():
    unit = Unit("[Service]\nCapabilityBoundingSet=CAP_CHOWN\nCapabilityBoundingSet=\n"
                "CapabilityBoundingSet=CAP_KILL\n")
    assert unit.capabilities() == ["CAP_KILL"]


def test_capability_masks_and_setpriv():
    assert cap_mask(["CAP_CHOWN", "CAP_SYS_ADMIN"]) == (1 << 0) | (1 << 21)
    assert setpriv_argv(["CAP_SYS_ADMIN", "CAP_CHOWN"], True) == [
        "setpriv", "--bounding-set", "-all,+sys_admin,+chown", "--inh-caps", "-all",
        "--no-new-privs"]
    with pytest.raises(ValueError):
        Unit("[Service]\nCapabilityBoundingSet=CAP_NOPE\n").capabilities()


def test_environment_file_quotes():
    assert read_environment_file("A='x y'\nB=\"p\"q\n; c\n") == {"A": "x y", "B": "pq"}


def test_packaged_unit_has_the_readme_capabilities():
    unit = Unit.read(REPO / "packaging/cuse-ioasid.service")
    caps = unit.capabilities()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Capabilities.**"):]
    listed = [c for c in (line.split("`")[1] for line in section.splitlines()
                          if line.startswith("| `CAP_"))]
    assert sorted(caps) == sorted(listed)
    assert unit.value("Type") == "notify"
    assert unit.memlock_unlimited() and unit.no_new_privileges()
