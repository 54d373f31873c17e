"""Host test: scripts/qemu-iommufd, the launcher that hands QEMU the fds of
/dev/iommu and the VFIO device nodes.

The launcher really execs: a stand-in "QEMU" (a Python script) records its
argv and what each fd it inherited points to, so the test sees what QEMU
would see. Stand-in nodes are ordinary files; the PCI-address lookup runs
against a made-up sysfs tree.

Run: /usr/bin/python3 -m pytest tests/host
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import project_scripts

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "scripts" / "qemu-iommufd"


launcher = project_scripts.load("qemu-iommufd")

FAKE_QEMU = """#!{python}
import json, os, re, sys
fds = {{}}
for word in sys.argv[1:]:
    for m in re.finditer(r"(?:^|,)fd=(\\d+)", word):
        fd = int(m.group(1))
        fds[fd] = os.readlink(f"/proc/self/fd/{{fd}}")
json.dump({{"argv": sys.argv[1:], "fds": fds}}, open(os.environ["FAKE_QEMU_OUT"], "w"))
"""


@pytest.fixture
def fake(tmp_path):
    qemu = tmp_path / "qemu"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable))
    qemu.chmod(0o755)
    iommu = tmp_path / "iommu"
    iommu.write_text("")
    nodes = []
    for n in (3, 7):
        node = tmp_path / f"vfio{n}"
        node.write_text("")
        nodes.append(node)
    return qemu, iommu, nodes, tmp_path / "out.json"


def run_launcher(fake, *args):
    qemu, iommu, _, out = fake
    env = dict(os.environ, FAKE_QEMU_OUT=str(out))
    r = subprocess.run([str(LAUNCHER), "--qemu", str(qemu), "--iommu", str(iommu), *args],
                       capture_output=True, text=True, env=env, timeout=60)
    return r, (json.loads(out.read_text()) if out.exists() else None)


def test_qemu_inherits_iommu_and_device_fds(fake):
    _, iommu, (n3, n7), _ = fake
    r, seen = run_launcher(fake, str(n3), f"{n7},addr=05.0,x-no-mmap=on",
                           "--", "-machine", "q35", "-accel", "tcg")
    assert r.returncode == 0, r.stderr
    argv = seen["argv"]
    obj = argv[argv.index("-object") + 1]
    assert obj.startswith("iommufd,id=iommufd0,fd=")
    devices = [argv[i + 1] for i, w in enumerate(argv) if w == "-device"]
    assert len(devices) == 2
    # Each device has an id, its node's name (QEMU 11.1 crashes on a device
    # passed by fd without one).
    assert devices[0].endswith(",iommufd=iommufd0,id=vfio3")
    assert devices[1].endswith(",iommufd=iommufd0,id=vfio7,addr=05.0,x-no-mmap=on")
    # Each fd= names an open file of the right node, inherited across exec.
    fd_of = {int(k): v for k, v in seen["fds"].items()}
    iommu_fd = int(obj.rsplit("fd=", 1)[1])
    assert fd_of[iommu_fd] == str(iommu)
    dev_fds = [int(d.split("fd=", 1)[1].split(",", 1)[0]) for d in devices]
    assert [fd_of[fd] for fd in dev_fds] == [str(n3), str(n7)]
    assert argv[-4:] == ["-machine", "q35", "-accel", "tcg"]


def test_an_id_given_is_kept_and_ids_made_are_unique_and_valid(fake, tmp_path):
    _, _, (n3, _), _ = fake
    other = tmp_path / "other"
    other.mkdir()
    (other / "vfio3").write_text("")
    (other / "3rd node").write_text("")
    r, seen = run_launcher(fake, f"{n3},id=mine", str(n3), str(other / "vfio3"),
                           str(other / "3rd node"))
    assert r.returncode == 0, r.stderr
    argv = seen["argv"]
    devices = [argv[i + 1] for i, w in enumerate(argv) if w == "-device"]
    assert [d.split("iommufd=iommufd0,", 1)[1] for d in devices] == [
        "id=mine", "id=vfio3", "id=vfio3-2", "id=vfio-3rd_node"]


def test_missing_node_is_an_error_naming_it(fake, tmp_path):
    r, seen = run_launcher(fake, str(tmp_path / "vfio99"))
    assert r.returncode == 1 and seen is None
    assert "vfio99" in r.stderr and "No such file" in r.stderr


def test_missing_iommu_node_says_start_the_daemon(fake, tmp_path):
    if os.path.exists("/dev/iommu"):
        pytest.skip("this machine has /dev/iommu")
    qemu, _, (n3, _), out = fake
    r = subprocess.run([str(LAUNCHER), "--qemu", str(qemu), str(n3)],
                       capture_output=True, text=True,
                       env=dict(os.environ, FAKE_QEMU_OUT=str(out)))
    assert r.returncode == 1
    assert "/dev/iommu" in r.stderr and "daemon" in r.stderr


def test_dry_run_prints_the_command(fake):
    _, _, (n3, _), out = fake
    r, _ = run_launcher(fake, "--dry-run", str(n3), "--", "-m", "256")
    assert r.returncode == 0, r.stderr
    assert "-object iommufd,id=iommufd0,fd=" in r.stdout
    assert "-device vfio-pci,fd=" in r.stdout and r.stdout.rstrip().endswith("-m 256")
    assert not out.exists(), "--dry-run ran QEMU"


def make_sysfs(root: Path, bdf: str, vfio: str | None, driver: str = "vfio-pci") -> None:
    dev = root / bdf
    dev.mkdir(parents=True)
    (root / "drivers" / driver).mkdir(parents=True, exist_ok=True)
    (dev / "driver").symlink_to(root / "drivers" / driver)
    if vfio:
        (dev / "vfio-dev" / vfio).mkdir(parents=True)


def test_pci_address_resolves_to_the_kernels_vfio_index(tmp_path):
    sysfs = tmp_path / "sys"
    make_sysfs(sysfs, "0000:00:0a.0", "vfio5")
    cdev = Path("/dev/vfio/devices")
    for spec in ("0000:00:0a.0", "00:0a.0", "0000:00:0A.0"):
        assert launcher.device_node(spec, sysfs, cdev) == cdev / "vfio5"
    assert launcher.device_node("vfio12", sysfs, cdev) == cdev / "vfio12"
    assert launcher.device_node("/dev/vfio/devices/vfio3", sysfs, cdev) == cdev / "vfio3"


def test_pci_address_not_on_vfio_pci_says_how_to_bind(tmp_path):
    sysfs = tmp_path / "sys"
    make_sysfs(sysfs, "0000:00:0a.0", None, driver="e1000e")
    with pytest.raises(launcher.LaunchError, match="bound to e1000e, not vfio-pci"):
        launcher.device_node("00:0a.0", sysfs)
    with pytest.raises(launcher.LaunchError, match="no PCI device 0000:00:0b.0"):
        launcher.device_node("00:0b.0", sysfs)
    with pytest.raises(launcher.LaunchError, match="neither a PCI address"):
        launcher.device_node("eth0", sysfs)


def test_kvm_is_recognised_in_the_arguments():
    assert launcher.asks_for_kvm(["-enable-kvm"])
    assert launcher.asks_for_kvm(["-accel", "kvm"])
    assert launcher.asks_for_kvm(["-machine", "q35,accel=kvm"])
    assert not launcher.asks_for_kvm(["-accel", "tcg", "-m", "kvm-sized"])
