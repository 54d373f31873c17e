"""`cuse-ioasid status` against a known state, in the test VM.

A client process opens two ioasid files and an edu device node, binds the
device to the first file, allocates two IOASIDs there (the device attached
to the first), maps two pages into the first, registers 16 KiB in the
second file, and makes one call that fails with ENOENT. The status shows
exactly that (its files, IOASIDs, mappings and bytes, pinned bytes, the
bound device with its node and group, the request and error counts), in
JSON and as text; after the client exits, nothing of it. Only root (and a
--node-group group) may ask. A client mapping and unmapping 256 MiB in a
loop is shown busy: the status answers without waiting for its calls.

    scripts/vm -- /usr/bin/python3 -m pytest tests/scenarios/test_status.py -v
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, in_test_vm
from harness.daemon import ALONE_1, ALONE_2
from cuse_ioasid.topology import pci_device

pytestmark = pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm")

K4 = 4096

KNOWN = r"""
import sys
from cuse_ioasid import ioasid as io, vfio
dev = vfio.Device.open_node(sys.argv[1])
f = io.IoasidFd()
io.bind_ioasid_fd(dev.fd, f)
a, b = f.alloc(), f.alloc()
io.attach_ioasid(dev.fd, a)
mem = vfio.DmaBuffer(2 * 4096)
f.map_dma(a, 0x100000, mem.page(0), 4096)
f.map_dma(a, 0x200000, mem.page(1), 4096)
try:
    f.free(99)
except OSError:
    pass
second = io.IoasidFd()
registered = vfio.DmaBuffer(4 * 4096)
second.register_memory(registered.addr, 4 * 4096)
print("ready", flush=True)
sys.stdin.readline()
"""

BUSY = r"""
import select, sys
from cuse_ioasid import ioasid as io, vfio
dev = vfio.Device.open_node(sys.argv[1])
f = io.IoasidFd()
io.bind_ioasid_fd(dev.fd, f)
a = f.alloc()
io.attach_ioasid(dev.fd, a)
size = 256 << 20
mem = vfio.DmaBuffer(size)
print("ready", flush=True)
rounds = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    f.map_dma(a, 0, mem.addr, size)
    f.unmap_dma(a, 0, size)
    rounds += 1
print(rounds, flush=True)
"""


class Client:
    """A client process running `script` on `node`; it holds its state
    until `stop()`."""

    def __init__(self, script: str, node: str):
        env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
        self.proc = subprocess.Popen([sys.executable, "-c", script, node], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            pytest.fail(f"the client did not get ready: {line!r} {self.proc.stderr.read()}")
        self.pid = self.proc.pid
        self.command = Path(f"/proc/{self.pid}/comm").read_text().strip()

    def stop(self) -> str:
        out, err = self.proc.communicate("stop\n", timeout=300)
        assert self.proc.returncode == 0, err
        return out


def counts(status: dict) -> dict:
    return {(r["kind"], r["command"]): (r["calls"], r["failed"])
            for r in status["counters"]["requests"]}


def delta(before: dict, after: dict) -> dict:
    changed = {}
    for key, (calls, failed) in after.items():
        c0, f0 = before.get(key, (0, 0))
        if (calls, failed) != (c0, f0):
            changed[key] = (calls - c0, failed - f0)
    return changed


def test_status_shows_a_known_state_exactly_then_nothing(ioasid_daemon):
    before = ioasid_daemon.status()
    assert before["processes"] == [], before["processes"]
    node = ioasid_daemon.nodes[ALONE_1]
    group = pci_device(ALONE_1).group
    client = Client(KNOWN, node)
    try:
        status = ioasid_daemon.status()
        text = ioasid_daemon.status_text()
    finally:
        client.stop()

    [proc] = status["processes"]
    ioasid_files = [f for f in proc["files"] if f["node"] == "/dev/ioasid"]
    assert len(ioasid_files) == 2
    handle, second_handle = (f["handle"] for f in ioasid_files)
    [device_file] = [f for f in proc["files"] if f["node"] == node]
    assert proc == {
        "pid": client.pid,
        "command": client.command,
        # Root holds CAP_IPC_LOCK: nothing is charged against a limit.
        "memlock_limit": "unlimited",
        "pinned_bytes": None,
        "files": [
            {
                "node": "/dev/ioasid", "kind": "ioasid", "handle": handle, "device": None,
                "busy": False, "age_ms": 0,
                "memory": {"pinned_bytes": 2 * K4, "registrations": 0, "registered_bytes": 0},
                "objects": [
                    {"kind": "IOASID", "id": 1, "parent": None, "mappings": 2,
                     "mapped_bytes": 2 * K4, "attached": [ALONE_1], "groups": [group], "notes": []},
                    {"kind": "IOASID", "id": 2, "parent": None, "mappings": 0, "mapped_bytes": 0,
                     "attached": [], "groups": [],
                     "notes": ["no device attached yet: map refused"]},
                ],
                "devices": [{"pci": ALONE_1, "node": node, "group": group,
                             "attached": ["IOASID 1"]}],
                "groups_out_of_service": 0,
            },
            {
                "node": "/dev/ioasid", "kind": "ioasid", "handle": second_handle, "device": None,
                "busy": False, "age_ms": 0,
                "memory": {"pinned_bytes": 4 * K4, "registrations": 1, "registered_bytes": 4 * K4},
                "objects": [], "devices": [], "groups_out_of_service": 0,
            },
            {
                "node": node, "kind": "device", "handle": device_file["handle"], "device": ALONE_1,
                "busy": False, "age_ms": 0, "memory": None, "objects": [], "devices": [],
                "groups_out_of_service": 0,
            },
        ],
    }
    owners = {d["pci"]: d["bound_to"] for d in status["devices"]}
    assert owners[ALONE_1] == {"pid": client.pid, "node": "/dev/ioasid", "handle": handle}
    assert all(owner is None for pci, owner in owners.items() if pci != ALONE_1), owners
    assert delta(counts(before), counts(status)) == {
        ("ioasid", "open"): (2, 0),
        ("ioasid", "IOASID_ALLOC"): (2, 0),
        ("ioasid", "IOASID_REGISTER_MEMORY"): (1, 0),
        ("ioasid", "IOASID_MAP_DMA"): (2, 0),
        ("ioasid", "IOASID_FREE"): (1, 1),
        # The daemon asks the ioasid fd given to VFIO_BIND_IOASID_FD who it is.
        ("ioasid", "IOASID_DAEMON_IDENTIFY"): (1, 0),
        ("device", "open"): (1, 0),
        ("device", "VFIO_BIND_IOASID_FD"): (1, 0),
        ("device", "VFIO_ATTACH_IOASID"): (1, 0),
    }
    errors = status["counters"]["errors"]
    assert errors.get("ENOENT", 0) == before["counters"]["errors"].get("ENOENT", 0) + 1, errors
    assert {n["node"] for n in status["cuse"]} >= {"ioasid", node.removeprefix("/dev/")}

    # The text says the same.
    for line in (
        f"client {client.pid} ({client.command}): RLIMIT_MEMLOCK unlimited",
        f"  /dev/ioasid (file {handle}): 8 KiB pinned of unlimited",
        f"    IOASID 1: 2 mappings, 8 KiB; attached: {ALONE_1}; in the domain of group {group}",
        "    IOASID 2: 0 mappings, 0 B",
        f"    device {ALONE_1} ({node}, group {group}): attached to IOASID 1",
        f"  /dev/ioasid (file {second_handle}): 16 KiB pinned of unlimited "
        "(16 KiB registered in 1 registration)",
        f"  {node} (file {device_file['handle']}): device {ALONE_1}",
    ):
        assert line in text.splitlines(), f"{line!r} not in:\n{text}"

    # Gone with the client.
    after = ioasid_daemon.status()
    assert after["processes"] == [], after["processes"]
    assert all(d["bound_to"] is None for d in after["devices"]), after["devices"]
    assert delta(counts(status), counts(after)) == {
        ("ioasid", "release"): (2, 0),
        ("device", "release"): (1, 0),
    }


def test_only_root_may_ask(ioasid_daemon, tmp_path):
    socket = "/run/cuse-ioasid/status.sock"
    st = os.stat(socket)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o600)
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        ioasid_daemon.binary, "status"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{socket}: permission denied" in r.stderr, r.stderr


def test_a_busy_client_is_shown_busy_not_waited_for(ioasid_daemon):
    """While the client maps and unmaps 256 MiB in a loop, its file's lock
    is held nearly all the time; the status answers anyway and says so."""
    client = Client(BUSY, ioasid_daemon.nodes[ALONE_2])
    seen = []
    try:
        for _ in range(30):
            [proc] = ioasid_daemon.status()["processes"]
            [ioasid_file] = [f for f in proc["files"] if f["kind"] == "ioasid"]
            seen.append(ioasid_file["busy"])
            if ioasid_file["busy"]:
                break
    finally:
        rounds = int(client.stop())
    assert rounds > 0
    assert True in seen, f"30 status requests never found the client's file busy: {seen}"
    text_has_busy = "[busy: a call is running;"
    assert text_has_busy not in ioasid_daemon.status_text()
