"""The mechanism of issue 14 where the daemon cannot show it: a client
*stopped by the injection* (its map held by the daemon) killed with SIGKILL,
and a daemon killed while it holds a client stopped (EXITKILL kills the
client with it). The daemon's own path has no way to hold a map; the
example `vfio-legacy/examples/inject_dma.rs` does (`--hold-fifo`). Every
other private-memory scenario runs against the daemon itself:
tests/scenarios/test_private_memory.py.

The client is `tests/c/private_dma.c` with the example's adapter
`tests/c/private_map.h` (`tests/c/build`); build the example with
`cargo build -p vfio-legacy --examples`.

Run: scripts/vm -- /usr/bin/python3 -m pytest tests/scenarios/test_private_memory_example.py -v
(and with --kernel new)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, needs_vm
from harness.daemon import ALONE_2, ALONE_3, wait_for

pytestmark = needs_vm

EXAMPLE = REPO / "target" / "debug" / "examples" / "inject_dma"
CLIENT = REPO / "target" / "c" / "private_dma"


class Daemon:
    """One inject_dma process with its log and hold FIFO."""

    def __init__(self, scratch: Path, name: str, bdf: str = ALONE_3):
        self.log_path = scratch / f"inject-dma-{name}.log"
        self.fifo = Path("/tmp") / f"inject-hold-{name}"
        if self.fifo.exists():
            self.fifo.unlink()
        os.mkfifo(self.fifo)
        self.log = open(self.log_path, "w")
        self.node = f"/dev/inject-dma-{name}"
        self.proc = subprocess.Popen(
            [str(EXAMPLE), "--bdf", bdf, "--name", f"inject-dma-{name}", "--hold-fifo", str(self.fifo)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("ready "), f"inject_dma did not start: {self.text()}"

    def text(self) -> str:
        return self.log_path.read_text()

    def release_hold(self):
        with open(self.fifo, "w") as f:
            f.write("x")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0, self.text()
        self.log.close()


@pytest.fixture(scope="module")
def daemon(scratch_dir):
    for path, build in ((EXAMPLE, "cargo build -p vfio-legacy --examples"), (CLIENT, "tests/c/build")):
        if not path.exists():
            pytest.fail(f"{path} missing: run `{build}` on the host")
    d = Daemon(scratch_dir, "module")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def scratch_dir() -> Path:
    return Path(os.environ["VM_SCRATCH"])


def client(kind: str, *args: str, iova: int = 0x100000, node: str = "/dev/inject-dma-module"):
    return subprocess.run(
        [*args, str(CLIENT), kind, hex(iova)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "INJECT_NODE": node},
    )


def assert_pass(r, kind: str, daemon: Daemon):
    assert r.returncode == 0 and f"PASS {kind}" in r.stdout, (
        f"client {kind}: status {r.returncode}\n{r.stdout}{r.stderr}\n--- daemon log\n{daemon.text()}"
    )


def thread_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def start_held(iova: int, daemon: Daemon) -> subprocess.Popen:
    """A client whose map the daemon made and now holds: the client stays
    stopped with the daemon's registers until the hold FIFO is written. (Its
    state shows t as soon as the injection begins, before the map is made:
    the daemon's log line is the moment.)"""
    p = subprocess.Popen(
        [str(CLIENT), "held", hex(iova)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "INJECT_NODE": daemon.node},
    )
    def held() -> bool:
        return any("holding the caller stopped" in line and str(p.pid) in line
                   for line in daemon.text().splitlines())

    wait_for(held, "the daemon holding the client stopped after its map")
    assert thread_state(p.pid) == "t"
    return p


def test_sigkill_of_the_client_mid_injection_leaks_nothing(daemon):
    iova = 0x400000
    p = start_held(iova, daemon)
    p.kill()
    daemon.release_hold()
    try:
        status = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        where = Path(f"/proc/{p.pid}/status").read_text()
        pytest.fail(f"the killed client did not exit:\n{where}\n--- daemon log\n{daemon.text()}")
    assert status == -signal.SIGKILL
    # Its mapping went with its file: the same IOVA maps again, the daemon
    # serves on and is no longer tracing anything.
    wait_for(lambda: "unmapped at release" in daemon.text(), "the killed client's unmap")
    assert_pass(client("malloc", iova=iova), "malloc", daemon)
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    assert daemon.proc.poll() is None
    for task in Path(f"/proc/{daemon.proc.pid}/task").iterdir():
        assert "State:\tZ" not in (task / "status").read_text()
    assert "TracerPid:\t0" in status


def test_a_daemon_killed_mid_injection_kills_the_client(scratch_dir):
    """EXITKILL: the client, stopped with injected registers, dies with its
    daemon rather than run on with them."""
    d = Daemon(scratch_dir, "killed", bdf=ALONE_2)
    try:
        p = start_held(0x500000, d)
        d.proc.kill()
        d.proc.wait(timeout=30)
        assert p.wait(timeout=60) == -signal.SIGKILL
        assert p.stdout.read() == ""
    finally:
        d.log.close()
        d.fifo.unlink()
