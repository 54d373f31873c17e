"""Private memory through the daemon (issue 14), proven with edu DMA in the
test VM: /dev/ioasid and a device node, the client's malloc, stack,
anonymous and private-file memory mapped with IOASID_MAP_DMA, pinned by the
client's own thread (the daemon stops it on its way out of the ioctl).

The C client is `tests/c/private_dma_ioasid.c` (`tests/c/build`): one check
per run, with the adapter `tests/c/private_map_ioasid.h`. The Python checks
use this very process as the client. The daemon is started by the module,
with debug logs, so that refusals can be checked in its log. What only the
example daemon can show (a client held stopped, then killed; the daemon
killed meanwhile) is in tests/scenarios/test_private_memory_example.py.

Run: scripts/vm -- tests/scenarios/run -k test_private_memory (and with
--kernel new)."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, needs_vm
from cuse_ioasid import ioasid as io
from cuse_ioasid import vfio
from harness.daemon import ALONE_1, ALONE_2, ALONE_3, LENGTH, Node, errno_of, wait_for
from harness.own_daemon import OwnDaemon

pytestmark = needs_vm

CLIENT = REPO / "target" / "c" / "private_dma_ioasid"
PAGE = 4096


@pytest.fixture(scope="module")
def daemon():
    if not CLIENT.exists():
        pytest.fail(f"{CLIENT} missing: run tests/c/build on the host")
    with OwnDaemon([], "private-memory") as d:
        yield d


def client(daemon, kind: str, *wrap: str, bdf: str = ALONE_1, iova: int = 0x100000):
    return subprocess.run(
        [*wrap, str(CLIENT), kind, hex(iova)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PRIVATE_DEVICE": daemon.nodes[bdf]},
    )


def assert_pass(r, kind: str, daemon):
    assert r.returncode == 0 and f"PASS {kind}" in r.stdout, (
        f"client {kind}: status {r.returncode}\n{r.stdout}{r.stderr}\n"
        f"--- daemon log (end)\n{daemon.log()[-6000:]}"
    )


@pytest.mark.parametrize("kind", ["malloc", "stack", "anon", "file", "after"])
def test_dma_through_private_buffers(daemon, kind):
    """Bytes the device copies from page 0 to page 1 of a private buffer
    (malloc, the stack, anonymous MAP_PRIVATE, a MAP_PRIVATE file, written
    after the map) appear in the client's own pages."""
    assert_pass(client(daemon, kind), kind, daemon)


def test_registers_stack_errno_and_signals_are_untouched(daemon):
    """Callee-saved and argument registers, the 4 KiB below rsp, errno, the
    signal mask and a pending blocked SIGUSR2 survive IOASID_MAP_DMA."""
    assert_pass(client(daemon, "regs"), "regs", daemon)


def test_a_busy_thread_taking_signals_keeps_running(daemon):
    assert_pass(client(daemon, "threads"), "threads", daemon)


def test_pins_are_charged_to_the_client_memlock(daemon):
    """Without CAP_IPC_LOCK, under a 64 KiB RLIMIT_MEMLOCK: 1 MiB is ENOMEM,
    and an 8 KiB map raises the client's own VmLck by 8 kB (type1 charges
    the client, not the daemon)."""
    vmlck = daemon.status("VmLck")
    assert_pass(client(daemon, "memlock"), "memlock", daemon)
    assert daemon.status("VmLck") == vmlck


def test_fork_after_map_keeps_the_parents_pages(daemon):
    assert_pass(client(daemon, "fork"), "fork", daemon)


def test_a_traced_client_is_refused_with_efault_and_the_reason(daemon):
    """Under strace the daemon cannot seize the thread: EFAULT at once, the
    log says why, and the next client is served."""
    start = time.monotonic()
    r = client(daemon, "refused", "strace", "-f", "-o", "/dev/null")
    assert_pass(r, "refused", daemon)
    assert time.monotonic() - start < 60
    assert "already traced by process" in daemon.log()
    assert_pass(client(daemon, "malloc"), "malloc", daemon)


def test_a_client_under_a_seccomp_filter_is_refused_with_efault(daemon):
    """Even an allow-everything filter: an injected call could meet a
    filter that kills; the daemon does not inject, and says so."""
    assert_pass(client(daemon, "seccomp"), "seccomp", daemon)
    assert "runs under seccomp (filter)" in daemon.log()


def test_a_client_in_another_network_namespace_is_refused_with_efault(daemon):
    """Its thread cannot reach the daemon's abstract socket to receive the
    container: EFAULT, and the log says why (a daemon in a systemd unit
    with PrivateNetwork= would refuse every client so)."""
    assert_pass(client(daemon, "refused", "unshare", "--net"), "refused", daemon)
    assert "another network namespace" in daemon.log()
    assert_pass(client(daemon, "malloc"), "malloc", daemon)


def daemon_threads_state(pid: int) -> list[str]:
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((task / "status").read_text())
        except OSError:
            pass
    return states


def test_sigkill_of_a_client_in_the_middle_leaks_nothing(daemon):
    """A client mapping, DMAing and unmapping private memory in a loop is
    killed at random moments, ten times: the daemon serves on, traces
    nothing, keeps no zombie, its locked memory is back, and the device
    serves the next client."""
    vmlck = daemon.status("VmLck")
    rng = random.Random(14)
    for _ in range(10):
        p = subprocess.Popen([str(CLIENT), "loop", "0x100000"], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PRIVATE_DEVICE": daemon.nodes[ALONE_2]})
        assert p.stdout.readline().strip() == "looping"
        time.sleep(rng.uniform(0.0, 0.3))
        p.kill()
        try:
            status = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            where = Path(f"/proc/{p.pid}/status").read_text()
            pytest.fail(f"the killed client did not exit:\n{where}\n--- daemon log (end)\n"
                        f"{daemon.log()[-6000:]}")
        assert status == -signal.SIGKILL
    wait_for(lambda: all("TracerPid:\t0" in s for s in daemon_threads_state(daemon.pid)),
             "no daemon thread traced")
    assert daemon.proc.poll() is None
    for s in daemon_threads_state(daemon.pid):
        assert "State:\tZ" not in s and "State:\tt" not in s
    assert_pass(client(daemon, "malloc", bdf=ALONE_2), "malloc", daemon)
    assert daemon.status("VmLck") == vmlck


def private_pages(n: int) -> tuple[mmap.mmap, int]:
    """n anonymous MAP_PRIVATE pages of this process and their address."""
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def container_fds() -> list[int]:
    """This process's fds that are a VFIO container."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/vfio/vfio":
                found.append(int(fd))
        except OSError:
            pass
    return found


def test_attach_replays_private_memory_from_its_process_only(daemon):
    """An IOASID holding private memory of this process: a device attached
    by another process (which holds the same ioasid fd) is refused with
    EFAULT and a log line that says why; attached by this process, the
    device reaches the memory (its domain got the pages from this thread)."""
    mem, addr = private_pages(2)
    mem[:LENGTH] = bytes(random.Random(1).randrange(256) for _ in range(LENGTH))
    first, second = Node(daemon.nodes[ALONE_1]), Node(daemon.nodes[ALONE_2])
    with io.IoasidFd() as fd:
        io.bind_ioasid_fd(first.fd, fd)
        gpa = fd.alloc()
        io.attach_ioasid(first.fd, gpa)
        fd.map_dma(gpa, iova=0x100000, vaddr=addr, size=2 * PAGE)
        first.edu.round_trip(0x100000, 0x100000 + PAGE, LENGTH)
        assert mem[PAGE:PAGE + LENGTH] == mem[:LENGTH]
        io.bind_ioasid_fd(second.fd, fd)
        other = subprocess.run(
            ["/usr/bin/python3", "-c",
             "import sys; sys.path.insert(0, sys.argv[1]); from cuse_ioasid import ioasid as io;\n"
             "try:\n io.attach_ioasid(int(sys.argv[2]), int(sys.argv[3]))\n"
             "except OSError as e:\n print(e.errno)\nelse:\n print(0)",
             str(REPO / "python"), str(second.fd), str(gpa)],
            capture_output=True, text=True, pass_fds=[second.fd], timeout=120)
        assert other.stdout.strip() == str(14), other.stdout + other.stderr  # EFAULT
        assert "only that process's own threads can pin" in daemon.log()
        io.attach_ioasid(second.fd, gpa)
        mem[PAGE:2 * PAGE] = bytes(PAGE)
        second.edu.round_trip(0x100000, 0x100000 + PAGE, LENGTH)
        assert mem[PAGE:PAGE + LENGTH] == mem[:LENGTH]
        io.unbind_ioasid_fd(second.fd, fd)
        io.unbind_ioasid_fd(first.fd, fd)
    first.close()
    second.close()


def test_a_kept_container_fd_reaches_nothing_once_the_device_is_bound_again(daemon):
    """The container this process was given to map its private memory stays
    in its fd table. After its binding ends and another client binds the
    device, that container holds no device: mapping through it fails, and
    the daemon says it moved the group to a fresh container."""
    mem, addr = private_pages(2)
    node = Node(daemon.nodes[ALONE_3])
    before = set(container_fds())
    with io.IoasidFd() as fd:
        io.bind_ioasid_fd(node.fd, fd)
        gpa = fd.alloc()
        io.attach_ioasid(node.fd, gpa)
        fd.map_dma(gpa, iova=0x100000, vaddr=addr, size=2 * PAGE)
        kept = sorted(set(container_fds()) - before)
        assert len(kept) == 1, f"expected one container brought in, found {kept}"
        io.unbind_ioasid_fd(node.fd, fd)
    node.close()
    # Another client binds the device: the group moves to a fresh container.
    assert_pass(client(daemon, "malloc", bdf=ALONE_3), "malloc", daemon)
    assert "moved to a fresh container" in daemon.log()
    leaked = vfio.Container.__new__(vfio.Container)
    leaked.fd = kept[0]
    assert errno_of(leaked.map_dma, addr, 0x200000, PAGE) != 0
    assert_pass(client(daemon, "anon", bdf=ALONE_3), "anon", daemon)
    os.close(kept[0])
