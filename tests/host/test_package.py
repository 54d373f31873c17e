"""Host test: the Debian package scripts/package built (target/debian/):
its metadata and its files, against the sources they come from. The VM
scenario tests/scenarios/test_service.py installs it and runs it.

Run: scripts/package --profile dev && /usr/bin/python3 -m pytest tests/host
"""

import gzip
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deb() -> Path:
    debs = sorted((REPO / "target" / "debian").glob("cuse-ioasid_*.deb"))
    if len(debs) != 1:
        pytest.fail(f"want exactly one target/debian/cuse-ioasid_*.deb, found {debs}: "
                    "run scripts/package --profile dev")
    return debs[0]


@pytest.fixture(scope="module")
def unpacked(deb, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deb")
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(root)], check=True)
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_metadata(deb, unpacked):
    version = subprocess.run([str(unpacked / "usr/sbin/cuse-ioasid"), "--version"],
                             capture_output=True, text=True, check=True).stdout.split()[1]
    assert field(deb, "Package") == "cuse-ioasid"
    assert field(deb, "Version") == version
    assert deb.name == f"cuse-ioasid_{version}_{field(deb, 'Architecture')}.deb"
    depends = field(deb, "Depends")
    assert depends.startswith("libc6 (>= "), depends  # from dpkg-shlibdeps
    assert "passwd" in depends, "postinst runs groupadd"
    assert int(field(deb, "Installed-Size")) > 0
    assert (unpacked / "DEBIAN/conffiles").read_text().split() == ["/etc/default/cuse-ioasid"]


def test_files_are_the_sources(unpacked):
    same = {
        "usr/lib/systemd/system/cuse-ioasid.service": "packaging/cuse-ioasid.service",
        "usr/lib/modules-load.d/cuse-ioasid.conf": "packaging/modules-load.conf",
        "etc/default/cuse-ioasid": "packaging/cuse-ioasid.default",
        "usr/share/doc/cuse-ioasid/copyright": "packaging/copyright",
    }
    for installed, source in same.items():
        assert (unpacked / installed).read_bytes() == (REPO / source).read_bytes(), (
            f"{installed} differs from {source}: rebuild with scripts/package")
    for name in ("cuse-ioasid", "cuse-ioasid-status"):
        page = gzip.decompress((unpacked / f"usr/share/man/man8/{name}.8.gz").read_bytes())
        assert page == (REPO / f"docs/man/{name}.8").read_bytes()
    for script in ("postinst", "prerm", "postrm"):
        assert (unpacked / "DEBIAN" / script).stat().st_mode & 0o111, script


def test_modules_load_names_the_three_modules(unpacked):
    conf = (unpacked / "usr/lib/modules-load.d/cuse-ioasid.conf").read_text()
    modules = [w for w in (line.split("#")[0].strip() for line in conf.splitlines()) if w]
    assert sorted(m.replace("-", "_") for m in modules) == ["cuse", "vfio_iommu_type1", "vfio_pci"]


def test_unit_runs_the_installed_binary_with_the_configuration(unpacked):
    import sys
    sys.path.insert(0, str(REPO / "tests"))
    from harness.unit import Unit

    unit = Unit.read(unpacked / "usr/lib/systemd/system/cuse-ioasid.service")
    assert unit.value("Type") == "notify"
    env = unit.environment(unpacked)
    assert env == {"CUSE_IOASID_ARGS": "--node-group ioasid"}
    assert unit.exec_start(env) == ["/usr/sbin/cuse-ioasid", "--node-group", "ioasid"]
    assert (unpacked / "usr/sbin/cuse-ioasid").stat().st_mode & 0o111
    # No config file at all (EnvironmentFile=-...): the daemon's defaults.
    assert unit.exec_start(unit.environment(unpacked / "nowhere")) == ["/usr/sbin/cuse-ioasid"]
