"""The CUSE server's threads and handler slots under hostile clients
(issue 17, items 5 and 7), against the real kernel in the test VM.

- After clients are SIGKILLed at random points, slow calls included, a
  node's server threads return to the two an idle node keeps (the
  scratchpad example and the daemon).
- A client flooding a node with slow calls from many threads takes only
  its own handler slots: another client's calls complete while all of the
  first one's are still blocked, and a third client SIGKILLed meanwhile
  (its RELEASE included) leaves at once.
- What CUSE cannot avoid: a client killed while the server is stopped
  (SIGSTOP) stays in D state, in the kernel's request_wait_answer, until
  the server runs again.

Every wait is on a condition with a deadline; the example's HOLD call
blocks until the test opens its gate, so nothing depends on timing.

    scripts/vm -- python3 -m pytest -v tests/scenarios/test_cuse_fairness.py
"""

import os
import random
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import needs_vm
from harness.daemon import wait_for
from test_cuse_scratchpad import (
    IOC_NONE,
    IOC_READ,
    SCRATCH_SLOW,
    Scratchpad,
    fcntl_ioctl,
    ioc,
    read_line,
    stats,
    transform,
)

pytestmark = needs_vm

HELD = struct.Struct("<2Q")  # holding, started
SCRATCH_NOP = ioc(IOC_NONE, 9, 0)
SCRATCH_HOLD = ioc(IOC_NONE, 10, 0)
SCRATCH_LETGO = ioc(IOC_NONE, 11, 0)
SCRATCH_HELD = ioc(IOC_READ, 12, HELD.size)

SYS_IOCTL = 16  # x86_64


def held(fd):
    buf = bytearray(HELD.size)
    assert fcntl_ioctl(fd, SCRATCH_HELD, buf) == 0
    return dict(zip(("holding", "started"), HELD.unpack(buf)))


def tasks(pid):
    try:
        return os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []


def server_threads(pid, prefix="cuse:"):
    """Names of the CUSE server threads of process `pid` (a thread is
    named "cuse:<node>", cut to 15 bytes by the kernel)."""
    names = []
    for tid in tasks(pid):
        try:
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except OSError:
            pass
    return [n for n in names if n.startswith(prefix)]


def threads_in_ioctl(pid):
    """How many threads of `pid` are blocked in ioctl(2) now."""
    n = 0
    for tid in tasks(pid):
        try:
            first = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            continue
        n += first == str(SYS_IOCTL)
    return n


def state(pid):
    """The one-letter state of process `pid` (None once reaped)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return text.rsplit(")", 1)[1].split()[0]


# A client: opens NODE and issues CMD with argument ARG from N threads at
# once; prints "started" once they are going and "done <results>" at the
# end; with "loop", each thread repeats its call until killed.
CLIENT = """
import ctypes, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
node, cmd, arg, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
loop = len(sys.argv) > 5
fd = os.open(node, os.O_RDWR)
results = []
def call():
    while True:
        ret = libc.ioctl(fd, cmd, arg)
        results.append((ret, ctypes.get_errno() if ret < 0 else 0))
        if not loop:
            return
ts = [threading.Thread(target=call) for _ in range(n)]
for t in ts:
    t.start()
print("started", flush=True)
for t in ts:
    t.join()
print("done", sorted(results), flush=True)
"""


def client(node, cmd, arg, n, loop=False):
    args = [sys.executable, "-c", CLIENT, str(node), str(cmd), str(arg), str(n)]
    if loop:
        args.append("loop")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert read_line(proc.stdout, timeout=300) == "started"
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)


@pytest.fixture
def stop_pad():
    pads = []
    yield pads.append
    for pad in pads:
        status, err = pad.stop()
        sys.stderr.write(err)
        assert status == 0, f"scratchpad exited {status}"


def test_threads_return_to_two_after_clients_are_killed(stop_pad):
    """Issue 17, item 5: the daemon's threads went 13 -> 22 after client
    deaths, because a node kept up to four idle threads for ever. Bursts of
    slow calls and busy loops, SIGKILLed at random points; then the node is
    back to two server threads, and serves."""
    pad = Scratchpad("cusetest/threads", extra=("--idle-timeout-ms", "300"))
    stop_pad(pad)
    fd = pad.open()
    try:
        rng = random.Random(17)
        for round_ in range(3):
            before = stats(fd)["ioctls"]
            procs = [
                client(pad.path, SCRATCH_HOLD, 0, rng.randint(2, 5)),
                client(pad.path, SCRATCH_SLOW, rng.randint(1, 300), rng.randint(1, 4), loop=True),
                client(pad.path, SCRATCH_NOP, 0, rng.randint(1, 4), loop=True),
            ]
            # Kill after a random number of calls, with HOLD calls in
            # flight (some of them waiting for a slot).
            goal = before + rng.randint(5, 60)
            wait_for(lambda: stats(fd)["ioctls"] >= goal and held(fd)["holding"] > 0,
                     f"round {round_}: the clients' calls reached the node")
            wait_for(lambda: len(server_threads(pad.proc.pid)) > 2,
                     f"round {round_}: a burst of server threads")
            for p in rng.sample(procs, len(procs)):
                kill(p)
        wait_for(lambda: held(fd)["holding"] == 0, "every HOLD call of a killed client interrupted")
        wait_for(lambda: len(server_threads(pad.proc.pid)) <= 2,
                 "the node back to two server threads after its clients died")
        assert transform(fd, 3, b"ok")[2] == 7
    finally:
        os.close(fd)


def test_a_greedy_client_does_not_starve_others(stop_pad):
    """Issue 17, item 7: client A keeps ten HOLD calls in flight (its
    budget is two slots of four); client B completes twenty calls while all
    of A's are still blocked; client C, SIGKILLed in a HOLD call of its own,
    is gone (its INTERRUPT and RELEASE answered) before A is let go."""
    pad = Scratchpad("cusetest/greedy", workers=4, extra=("--workers-per-client", "2"))
    stop_pad(pad)
    fd = pad.open()
    a = c = None
    try:
        a = client(pad.path, SCRATCH_HOLD, 0, 10)
        wait_for(lambda: threads_in_ioctl(a.pid) == 10, "all of A's calls issued")
        wait_for(lambda: held(fd)["holding"] == 2, "A's two slots holding")

        b_done = []

        def b_calls():
            own = pad.open()
            try:
                for i in range(20):
                    assert transform(own, i, b"b")[2] == 2 * i + 1
                    b_done.append(i)
            finally:
                os.close(own)

        b = threading.Thread(target=b_calls)
        b.start()
        b.join(timeout=300)
        assert not b.is_alive(), f"B finished {len(b_done)} of 20 calls while A held its slots"
        assert len(b_done) == 20
        assert threads_in_ioctl(a.pid) == 10 and a.poll() is None, "A's calls still blocked"
        assert held(fd)["holding"] == 2

        c = client(pad.path, SCRATCH_HOLD, 0, 1)
        wait_for(lambda: held(fd)["holding"] == 3, "C's call running in a slot of its own")
        c.send_signal(signal.SIGKILL)
        assert c.wait(timeout=300) == -signal.SIGKILL
        assert state(c.pid) is None, "C is gone"
        assert threads_in_ioctl(a.pid) == 10 and a.poll() is None, "A still held when C left"
        wait_for(lambda: held(fd)["holding"] == 2, "C's call interrupted")

        # A is let go: its ten calls all complete, two at a time.
        assert fcntl_ioctl(fd, SCRATCH_LETGO, 0) == 2
        out, _ = a.communicate(timeout=300)
        assert a.returncode == 0
        assert out.strip() == "done " + str([(0, 0)] * 10)
        assert held(fd) == {"holding": 0, "started": 11}
    finally:
        for p in (a, c):
            if p is not None and p.poll() is None:
                kill(p)
        os.close(fd)


# A client that opens NODE, says "open", waits for a line on stdin, then
# issues CMD once.
OPEN_THEN_CALL = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
fd = os.open(sys.argv[1], os.O_RDWR)
print("open", flush=True)
sys.stdin.readline()
libc.ioctl(fd, int(sys.argv[2]), 0)
"""


def test_a_client_killed_while_the_server_is_stopped_stays_in_d_state(stop_pad):
    """What CUSE itself cannot avoid: a client blocked on a stopped server
    (SIGSTOP) and then SIGKILLed gives up its pending call, but its close
    sends a RELEASE that the kernel waits for uninterruptibly (FR_FORCE, in
    request_wait_answer): D state until the server runs again."""
    pad = Scratchpad("cusetest/stopped")
    stop_pad(pad)
    fd = pad.open()
    proc = subprocess.Popen([sys.executable, "-c", OPEN_THEN_CALL, str(pad.path), str(SCRATCH_NOP)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(proc.stdout, timeout=300) == "open"
        os.kill(pad.proc.pid, signal.SIGSTOP)
        wait_for(lambda: state(pad.proc.pid) == "T", "the server stopped")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        wait_for(lambda: threads_in_ioctl(proc.pid) == 1, "the client's call pending")
        proc.send_signal(signal.SIGKILL)
        wait_for(lambda: state(proc.pid) == "D", "the killed client in D state")
        stack = Path(f"/proc/{proc.pid}/stack")
        if stack.exists():
            text = stack.read_text()
            assert "request_wait_answer" in text, text
        assert proc.poll() is None, "the client cannot finish exiting while the server is stopped"
        os.kill(pad.proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=300) == -signal.SIGKILL
        assert transform(fd, 1, b"x")[2] == 3
    finally:
        os.kill(pad.proc.pid, signal.SIGCONT)
        if proc.poll() is None:
            kill(proc)
        os.close(fd)


# ---- the daemon ----------------------------------------------------------------

IOASID_CLIENT_THREADS = 6


def test_daemon_threads_return_to_two_per_node_after_clients_are_killed(daemon, nodes):
    """Issue 17, item 5 on the daemon itself: clients hammering /dev/ioasid
    from several threads, SIGKILLed at random points; afterwards every node
    keeps at most two server threads (the daemon's default idle timeout is
    2 s)."""
    from cuse_ioasid import ioasid as io

    rng = random.Random(5)
    # Every CUSE node of the VM is the daemon's here (/dev/ioasid, a node
    # per device, and whatever else it serves).
    n_nodes = len(os.listdir("/sys/class/cuse"))
    assert n_nodes >= 1 + len(nodes)
    for round_ in range(3):
        p = client("/dev/ioasid", io.IOASID_CHECK_EXTENSION, io.IOASID_EXT_REGISTER_MEMORY,
                   IOASID_CLIENT_THREADS, loop=True)
        wait_for(lambda: len(server_threads(daemon, "cuse:ioasid")) > 2,
                 f"round {round_}: a burst of /dev/ioasid server threads")
        in_flight = rng.randint(1, IOASID_CLIENT_THREADS)
        wait_for(lambda: threads_in_ioctl(p.pid) >= in_flight, f"round {round_}: calls in flight")
        kill(p)
    wait_for(lambda: len(server_threads(daemon, "cuse:ioasid")) <= 2,
             "/dev/ioasid back to two server threads after its clients died")
    assert len(server_threads(daemon)) <= 2 * n_nodes, server_threads(daemon)
    with io.IoasidFd() as fd:
        assert fd.check_extension(io.IOASID_EXT_REGISTER_MEMORY) == 1
