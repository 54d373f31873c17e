"""Private memory pinned by the client's own thread (issue 14), proven with
edu DMA in the test VM.

The daemon is the example `vfio-legacy/examples/inject_dma.rs` (build it
with `cargo build -p vfio-legacy --examples`): a CUSE node whose map ioctl
makes the calling thread issue VFIO_IOMMU_MAP_DMA itself (syscall-inject),
on a container holding one edu device's group. The client is
`tests/c/private_dma.c` (`tests/c/build`), one check per run; its adapter
`tests/c/private_map.h` says how to ask for a map, so the same checks can
later target /dev/ioasid or an iommufd node.

Run: scripts/vm -- /usr/bin/python3 -m pytest tests/scenarios/test_private_memory.py -v
(and with --kernel new)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
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


@pytest.mark.parametrize("kind", ["malloc", "stack", "anon", "file", "after"])
def test_dma_through_private_buffers(daemon, kind):
    """Bytes copied by the device from page 0 to page 1 of a private buffer
    (malloc, the stack, anonymous MAP_PRIVATE, a MAP_PRIVATE file, written
    after the map) appear in the client's own pages."""
    assert_pass(client(kind), kind, daemon)


def test_registers_stack_errno_and_signals_are_untouched(daemon):
    """Callee-saved and argument registers, the 4 KiB below rsp, errno, the
    signal mask and a pending blocked SIGUSR2 survive the injected map."""
    assert_pass(client("regs"), "regs", daemon)


def test_a_busy_thread_taking_signals_keeps_running(daemon):
    r = client("threads")
    assert_pass(r, "threads", daemon)


def test_pins_are_charged_to_the_client_memlock(daemon):
    """Without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK the client gets
    ENOMEM for 1 MiB, and an 8 KiB map raises its own VmLck by 8 kB."""
    r = client("memlock")
    assert_pass(r, "memlock", daemon)
    assert "RLIMIT_MEMLOCK" in daemon.text() or "ENOMEM" in daemon.text()


def test_fork_after_map_keeps_the_parents_pages(daemon):
    assert_pass(client("fork"), "fork", daemon)


def test_a_traced_client_is_refused_with_efault(daemon):
    """Under strace the seize fails with EPERM: the map answers EFAULT at
    once, the daemon says why, and serves the next client."""
    start = time.monotonic()
    r = client("refused", "strace", "-f", "-o", "/dev/null")
    assert_pass(r, "refused", daemon)
    assert time.monotonic() - start < 60
    assert "already traced by process" in daemon.text()
    assert_pass(client("malloc"), "malloc", daemon)


def thread_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def start_held(iova: int, node: str) -> subprocess.Popen:
    """A client whose map the daemon holds (it stays stopped, state t)."""
    p = subprocess.Popen(
        [str(CLIENT), "held", hex(iova)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "INJECT_NODE": node},
    )
    wait_for(lambda: thread_state(p.pid) == "t", "the held client stopped by the daemon")
    return p


def test_sigkill_of_the_client_mid_injection_leaks_nothing(daemon):
    iova = 0x400000
    p = start_held(iova, daemon.node)
    p.kill()
    daemon.release_hold()
    assert p.wait(timeout=60) == -signal.SIGKILL
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
        p = start_held(0x500000, d.node)
        d.proc.kill()
        d.proc.wait(timeout=30)
        assert p.wait(timeout=60) == -signal.SIGKILL
        assert p.stdout.read() == ""
    finally:
        d.log.close()
        d.fifo.unlink()
