"""rust-vmm's vfio-ioctls (feature vfio_cdev) and iommufd-ioctls through
the daemon: tests/vfio-cdev-client, a VMM-style program written against
those crates as they are, opens /dev/iommu, allocates an IOAS, finds the
device's cdev through sysfs (or takes the node given), binds, attaches,
maps two pages of a memfd (by address, or by fd with IOMMU_IOAS_MAP_FILE),
has the edu copy page A to page B through the IOMMU and compares the bytes
in its own memory, unmaps, detaches, destroys. docs/peers.md lists its
ioctls in order.

    cargo build --locked --manifest-path tests/vfio-cdev-client/Cargo.toml
    cargo build --workspace --bins && scripts/vm -- \
        /usr/bin/python3 -m pytest tests/scenarios/test_vfio_cdev_client.py -v
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import iommufd_module_marks
from harness.daemon import ALONE_1, SHARED_A, REPO, daemon_pids
from cuse_ioasid.iommufd import Iommufd, bind_iommufd

CLIENT = REPO / "tests/vfio-cdev-client/target/debug/vfio-cdev-client"

pytestmark = iommufd_module_marks()


def run_client(*args: str) -> subprocess.CompletedProcess:
    if not CLIENT.exists():
        pytest.fail(f"{CLIENT} missing: cargo build --locked --manifest-path "
                    "tests/vfio-cdev-client/Cargo.toml (a stage of scripts/test)")
    return subprocess.run([str(CLIENT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [
    (ALONE_1,),  # the cdev found through /sys/.../vfio-dev/vfioN, IOMMU_IOAS_MAP
    ("--map-file", ALONE_1),  # IOMMU_IOAS_MAP_FILE of the memfd
    (SHARED_A,),  # a device whose group has a second device, not bound
], ids=["map", "map-file", "shared-group"])
def test_an_edu_round_trip_through_our_nodes(args):
    r = run_client(*args)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "ok: edu copied page A to page B through the IOAS" in r.stdout, out
    assert r.stdout.rstrip().endswith("vfio-cdev-client: PASS"), out


def test_the_node_given_by_name(iommufd_nodes):
    r = run_client(ALONE_1, iommufd_nodes[ALONE_1])
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_device_is_free_after_the_client(iommufd_nodes, daemon):
    """The client's close released everything at once: a new client binds
    the same device, and gets the first object id of its own file."""
    with Iommufd() as iommu, open(iommufd_nodes[ALONE_1], "rb+", buffering=0) as dev:
        assert bind_iommufd(dev, iommu) == 1
    assert daemon_pids() == [daemon]
