"""The CUSE server library (crate cuse-server) against the real kernel.

Runs the crate's `scratchpad` example (built on the host with
`cargo build -p cuse-server --examples`) inside the test VM and drives its
node like any client would: open, ioctls that read and write the caller's
structs, positional and stream I/O, poll, signals, many clients at once,
a refused duplicate, and a shutdown under open files.

    scripts/vm -- python3 -m pytest -v tests/scenarios/test_cuse_scratchpad.py
"""

import ctypes
import errno
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness.daemon import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "target" / "debug" / "examples" / "scratchpad"

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/cuse"),
    reason="needs /dev/cuse: run inside the test VM (scripts/vm)",
)  # with --require-vm this skip fails (tests/harness/vm_guard.py)


def wait_in_syscall(thread: dict, numbers: set[str], what: str) -> None:
    """Until the thread whose native id is thread["tid"] is blocked in one
    of the system calls `numbers` (as /proc shows them: "7" poll, "16"
    ioctl)."""
    def blocked() -> bool:
        if "tid" not in thread:
            return False
        return Path(f"/proc/self/task/{thread['tid']}/syscall").read_text().split()[0] in numbers
    wait_for(blocked, what)


# ---- the example's ABI -------------------------------------------------------

IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2


def ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (ord("S") << 8) | nr


XFORM = struct.Struct("<IIQ16s")  # argsz, flags, value, text
STATS = struct.Struct("<6Q")  # opens, releases, reads, writes, ioctls, polls
WHO = struct.Struct("<4I")  # tid, pid, uid, gid

SCRATCH_TRANSFORM = ioc(IOC_READ | IOC_WRITE, 1, XFORM.size)
SCRATCH_STATS = ioc(IOC_READ, 2, STATS.size)
SCRATCH_SLOW = ioc(IOC_NONE, 3, 0)
SCRATCH_RING = ioc(IOC_NONE, 4, 0)
SCRATCH_ACK = ioc(IOC_NONE, 5, 0)
SCRATCH_GREET = ioc(IOC_NONE, 6, 0)
SCRATCH_WHOAMI = ioc(IOC_READ, 7, WHO.size)
SCRATCH_PEEK = ioc(IOC_WRITE, 13, XFORM.size)

STAT_NAMES = ("opens", "releases", "reads", "writes", "ioctls", "polls")

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
libc.ioctl.restype = ctypes.c_int


def raw_ioctl(fd, cmd, arg):
    """ioctl(2) without Python's retry or copy logic: (ret, errno)."""
    ret = libc.ioctl(fd, cmd, arg)
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def transform(fd, value, text):
    buf = bytearray(XFORM.pack(XFORM.size, 0, value, text))
    assert fcntl_ioctl(fd, SCRATCH_TRANSFORM, buf) == 0
    return XFORM.unpack(buf)


def stats(fd):
    buf = bytearray(STATS.size)
    assert fcntl_ioctl(fd, SCRATCH_STATS, buf) == 0
    return dict(zip(STAT_NAMES, STATS.unpack(buf)))


def fcntl_ioctl(fd, cmd, arg):
    import fcntl

    if isinstance(arg, bytearray):
        return fcntl.ioctl(fd, cmd, arg, True)
    return fcntl.ioctl(fd, cmd, arg)


# ---- the daemon -----------------------------------------------------------------


class Scratchpad:
    """The example daemon serving one node per name; `self.devs[name]` is
    the "MAJOR:MINOR" it reported. The first name is the default node."""

    def __init__(self, *names, workers=16, extra=()):
        if not EXAMPLE.exists():
            pytest.fail(f"{EXAMPLE} missing: run `cargo build -p cuse-server --examples` on the host")
        self.name = names[0]
        self.path = Path("/dev") / self.name
        args = [str(EXAMPLE), "--workers", str(workers), *extra]
        for n in names:
            args += ["--name", n]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.devs = {}
        for _ in names:
            line = read_line(self.proc.stdout, timeout=60)
            if not line.startswith("ready "):
                self.proc.kill()
                _, err = self.proc.communicate(timeout=30)
                pytest.fail(f"scratchpad did not start: {line!r} {err}")
            _, name, dev = line.split()
            self.devs[name] = dev
            assert (Path("/dev") / name).exists(), "the node must exist once registration returned"
        self.dev = self.devs[self.name]

    def open(self, name=None):
        return os.open(Path("/dev") / (name or self.name), os.O_RDWR)

    def stop(self, timeout=30):
        """SIGTERM; returns (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


def read_line(stream, timeout):
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        return ""
    return stream.readline().strip()


@pytest.fixture
def pad(request):
    name = "cusetest/" + request.node.name.replace("test_", "")[:40]
    daemon = Scratchpad(name)
    yield daemon
    status, err = daemon.stop()
    sys.stderr.write(err)
    assert status == 0, f"scratchpad exited {status}"
    assert not daemon.path.exists(), "node must disappear at shutdown"


# ---- tests ------------------------------------------------------------------------


def test_open_identity_from_threads(pad):
    fd = pad.open()
    try:
        seen = {}

        def who(key):
            buf = bytearray(WHO.size)
            assert fcntl_ioctl(fd, SCRATCH_WHOAMI, buf) == 0
            seen[key] = (WHO.unpack(buf), threading.get_native_id())

        who("main")
        t = threading.Thread(target=who, args=("thread",))
        t.start()
        t.join()
        for key, ((tid, pid, uid, gid), native) in seen.items():
            assert tid == native, key
            assert pid == os.getpid(), key
            assert (uid, gid) == (os.geteuid(), os.getegid()), key
        assert seen["main"][0][0] != seen["thread"][0][0]
        # The device number the daemon reported is the node's.
        st = os.stat(pad.path)
        assert f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == pad.dev
    finally:
        os.close(fd)


def test_struct_ioctl_costs_one_request(pad):
    fd = pad.open()
    try:
        before = stats(fd)
        argsz, flags, value, text = transform(fd, 20, b"hello cuse\0\0\0\0\0\0")
        after = stats(fd)
        assert (argsz, flags, value) == (XFORM.size, 1 << 31, 41)
        assert text == b"HELLO CUSE\0\0\0\0\0\0"
        # Between the two STATS calls: exactly the TRANSFORM, plus the second
        # STATS itself. No FUSE_IOCTL_RETRY round trip.
        assert after["ioctls"] - before["ioctls"] == 2
        # A too-small argsz is refused; unknown commands are ENOTTY.
        buf = bytearray(XFORM.pack(8, 0, 1, b""))
        with pytest.raises(OSError) as e:
            fcntl_ioctl(fd, SCRATCH_TRANSFORM, buf)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            fcntl_ioctl(fd, ioc(IOC_NONE, 99, 0), 0)
        assert e.value.errno == errno.ENOTTY
        # A bad pointer is EFAULT, from the daemon's process_vm_readv.
        ret, err = raw_ioctl(fd, SCRATCH_TRANSFORM, 8)
        assert (ret, err) == (-1, errno.EFAULT)
    finally:
        os.close(fd)


def test_peek_reads_the_struct_and_writes_nothing_back(pad):
    fd = pad.open()
    try:
        before = stats(fd)
        packed = XFORM.pack(XFORM.size, 7, 0x12345, b"left as it was\0\0")
        buf = bytearray(packed)
        # The answer comes from the struct the daemon read (value & 0xffff).
        assert fcntl_ioctl(fd, SCRATCH_PEEK, buf) == 0x2345
        assert bytes(buf) == packed, "PEEK must not write the caller's struct"
        assert stats(fd)["ioctls"] - before["ioctls"] == 2, "one request, plus the second STATS"
        buf = bytearray(XFORM.pack(8, 0, 1, b""))
        with pytest.raises(OSError) as e:
            fcntl_ioctl(fd, SCRATCH_PEEK, buf)
        assert e.value.errno == errno.EINVAL
        assert raw_ioctl(fd, SCRATCH_PEEK, 8) == (-1, errno.EFAULT)
    finally:
        os.close(fd)


def test_pread_pwrite_at_real_offsets(pad):
    fd = pad.open()
    try:
        assert os.pwrite(fd, b"small offset", 0x12345) == 12
        assert os.pwrite(fd, b"region three", 0x30000000010) == 12
        assert os.pread(fd, 12, 0x12345) == b"small offset"
        assert os.pread(fd, 12, 0x30000000010) == b"region three"
        # Partial and surrounding reads land exactly.
        assert os.pread(fd, 8, 0x3000000000E) == b"\0\0region"
        assert os.pread(fd, 4, 0x12345 + 6) == b"offs"
        assert os.pread(fd, 16, 0x7000) == bytes(16)
    finally:
        os.close(fd)


def test_transfers_above_128k_are_split_at_the_right_offsets(pad):
    fd = pad.open()
    try:
        base = 0x30000000010 - 5
        data = os.urandom(300 * 1024 + 77)
        before = stats(fd)
        assert os.pwrite(fd, data, base) == len(data)
        mid = stats(fd)
        # 300 KiB in requests of at most 128 KiB: three WRITE requests.
        assert mid["writes"] - before["writes"] == 3
        assert os.pread(fd, len(data), base) == data
        after = stats(fd)
        assert after["reads"] - mid["reads"] == 3
        # Pieces read back from inside the second and third requests.
        for off in (131072 - 3, 200000, 2 * 131072 + 1):
            assert os.pread(fd, 1000, base + off) == data[off : off + 1000]
    finally:
        os.close(fd)


def test_preadv_pwritev(pad):
    fd = pad.open()
    try:
        assert os.pwritev(fd, [b"abc", b"defgh"], 0x5000) == 8
        a, b = bytearray(4), bytearray(4)
        assert os.preadv(fd, [a, b], 0x5000) == 8
        assert (bytes(a), bytes(b)) == (b"abcd", b"efgh")
        assert os.pread(fd, 8, 0x5000) == b"abcdefgh"
    finally:
        os.close(fd)


def test_plain_read_write_stream(pad):
    fd = pad.open()
    try:
        # No file position under CUSE: the example treats plain transfers as
        # starting at 0.
        assert os.write(fd, b"stream data") == 11
        assert os.read(fd, 11) == b"stream data"
        assert os.pread(fd, 6, 0) == b"stream"
        assert os.writev(fd, [b"ab", b"cd"]) == 4
        assert os.readv(fd, [bytearray(4)]) == 4
        assert os.pread(fd, 4, 0) == b"abcd"
    finally:
        os.close(fd)


RING_SCRIPT = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.ioctl(fd, int(sys.argv[2]), 0)
os.close(fd)
"""


def test_poll_wakes_when_another_process_rings(pad):
    fd = pad.open()
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(0) == []  # nothing rung yet
        result = {}

        def waiter():
            result["tid"] = threading.get_native_id()
            result["events"] = p.poll(60_000)

        t = threading.Thread(target=waiter)
        t.start()
        wait_in_syscall(result, {"7"}, "the waiter is asleep in poll")
        assert "events" not in result, "poll returned before the ring"
        subprocess.run([sys.executable, "-c", RING_SCRIPT, str(pad.path), str(SCRATCH_RING)], check=True, timeout=60)
        t.join(timeout=30)
        assert not t.is_alive(), "poll was not woken by the ring"
        assert result["events"] and result["events"][0][0] == fd
        assert result["events"][0][1] & select.POLLIN
        # Acknowledged: not readable any more; still writable.
        assert fcntl_ioctl(fd, SCRATCH_ACK, 0) == 0
        assert p.poll(0) == []
        q = select.poll()
        q.register(fd, select.POLLOUT)
        assert q.poll(0)[0][1] & select.POLLOUT
    finally:
        os.close(fd)


def test_signal_interrupts_a_slow_ioctl(pad):
    fd = pad.open()
    fired = []
    old = signal.signal(signal.SIGALRM, lambda sig, _: fired.append(sig))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        ret, err = raw_ioctl(fd, SCRATCH_SLOW, 30_000)
        # The call ended with EINTR because of the signal (which arrived),
        # not after its 30 s (that would have answered 0). No bound on the
        # time: under a loaded emulator clocks say little.
        assert (ret, err) == (-1, errno.EINTR)
        assert fired == [signal.SIGALRM]
        # The daemon is healthy: a short slow ioctl completes, others work.
        assert raw_ioctl(fd, SCRATCH_SLOW, 100) == (0, 0)
        assert transform(fd, 1, b"x")[2] == 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(fd)


CLIENT_SCRIPT = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
k = int(sys.argv[2])
for i in range(20):
    off = 0x100000000 * (k + 1) + i * 4096
    data = os.urandom(100 + i)
    assert os.pwrite(fd, data, off) == len(data)
    assert os.pread(fd, len(data), off) == data, (k, i)
os.close(fd)
"""


def test_many_clients_at_once_and_a_slow_one_blocks_nobody(pad):
    """A client sits in a 2-minute ioctl while six threads and three
    processes do I/O and ioctls; they all finish while it still waits, and a
    signal to its thread then ends it with EINTR."""
    slow_fd = pad.open()
    slow = {}
    old = signal.signal(signal.SIGUSR1, lambda *_: None)

    def slow_call():
        slow["tid"] = threading.get_native_id()
        slow["ret"] = raw_ioctl(slow_fd, SCRATCH_SLOW, 120_000)

    slow_thread = threading.Thread(target=slow_call)
    slow_thread.start()
    wait_in_syscall(slow, {"16"}, "the slow ioctl is in flight")
    errors = []

    def thread_client(k):
        try:
            fd = pad.open()
            try:
                for i in range(20):
                    off = 0x10000 * (k + 1) + i * 512
                    data = bytes([k]) * (64 + i)
                    assert os.pwrite(fd, data, off) == len(data)
                    assert os.pread(fd, len(data), off) == data
                    assert transform(fd, k, b"t")[2] == 2 * k + 1
            finally:
                os.close(fd)
        except Exception as e:  # collected and asserted below
            errors.append((k, repr(e)))

    try:
        threads = [threading.Thread(target=thread_client, args=(k,)) for k in range(6)]
        procs = [
            subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(pad.path), str(k)]) for k in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=100)
        for p in procs:
            assert p.wait(timeout=100) == 0
        assert errors == []
        assert slow_thread.is_alive(), "the slow ioctl ended early"
        signal.pthread_kill(slow_thread.ident, signal.SIGUSR1)
        slow_thread.join(timeout=30)
        assert not slow_thread.is_alive()
        assert slow["ret"] == (-1, errno.EINTR)
    finally:
        signal.signal(signal.SIGUSR1, old)
        os.close(slow_fd)


def test_fd_of_the_caller_reaches_the_daemon(pad):
    fd = pad.open()
    r, w = os.pipe()
    try:
        assert fcntl_ioctl(fd, SCRATCH_GREET, w) == 22
        assert os.read(r, 100) == b"hello from scratchpad\n"
        with pytest.raises(OSError) as e:
            fcntl_ioctl(fd, SCRATCH_GREET, 999)
        assert e.value.errno == errno.EBADF
    finally:
        for x in (fd, r, w):
            os.close(x)


RELAY = struct.Struct("<iIII4I")  # fd, flags, major, minor, who


def relay(fd, target_fd):
    buf = bytearray(RELAY.pack(target_fd, 0, 0, 0, 0, 0, 0, 0))
    assert fcntl_ioctl(fd, SCRATCH_RELAY, buf) == 0
    _, _, major, minor, tid, pid, uid, gid = RELAY.unpack(buf)
    return f"{major}:{minor}", (tid, pid, uid, gid)


SCRATCH_RELAY = ioc(IOC_READ | IOC_WRITE, 8, RELAY.size)


def test_a_handler_can_use_the_daemons_own_nodes():
    """One process serves two nodes; a handler of node A copies the caller's
    fd of node B, recognises it by device number and issues an ioctl on it:
    node B is served while A's handler waits (the daemon's
    IOASID_DAEMON_IDENTIFY pattern). The same works on A itself."""
    daemon = Scratchpad("cusetest/relay-a", "cusetest/relay-b")
    fd_a, fd_b = daemon.open("cusetest/relay-a"), daemon.open("cusetest/relay-b")
    r, w = os.pipe()
    try:
        dev, (tid, pid, uid, gid) = relay(fd_a, fd_b)
        assert dev == daemon.devs["cusetest/relay-b"]
        assert pid == daemon.proc.pid, "the nested request comes from the daemon itself"
        assert tid != 0 and (uid, gid) == (0, 0)
        dev, (_, pid, _, _) = relay(fd_a, fd_a)
        assert dev == daemon.devs["cusetest/relay-a"] and pid == daemon.proc.pid
        dev, _ = relay(fd_b, fd_a)
        assert dev == daemon.devs["cusetest/relay-a"]
        # Not a node of this daemon: EINVAL; not an fd: EBADF.
        with pytest.raises(OSError) as e:
            relay(fd_a, w)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            relay(fd_a, 9999)
        assert e.value.errno == errno.EBADF
    finally:
        for x in (fd_a, fd_b, r, w):
            os.close(x)
        status, err = daemon.stop()
        sys.stderr.write(err)
    assert status == 0
    assert not Path("/dev/cusetest/relay-a").exists()
    assert not Path("/dev/cusetest/relay-b").exists()


def test_duplicate_name_is_refused_at_registration(pad):
    r = subprocess.run(
        [str(EXAMPLE), "--name", pad.name], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "refused" in r.stderr and pad.name in r.stderr
    assert "ready" not in r.stdout
    # The first daemon is unaffected.
    fd = pad.open()
    try:
        assert transform(fd, 5, b"ok")[2] == 11
    finally:
        os.close(fd)


def test_shutdown_with_clients_holding_the_node_open():
    daemon = Scratchpad("cusetest/shutdown")
    fd_busy, fd_idle = daemon.open(), daemon.open()
    assert os.pwrite(fd_idle, b"x", 0) == 1
    busy = {}

    def slow_call():
        busy["tid"] = threading.get_native_id()
        busy["ret"] = raw_ioctl(fd_busy, SCRATCH_SLOW, 60_000)

    t = threading.Thread(target=slow_call)
    t.start()
    # Stop the daemon once the slow call is in flight: its thread sits in
    # ioctl (system call 16) on the node.
    wait_in_syscall(busy, {"16"}, "the slow ioctl is in flight")
    status, err = daemon.stop(timeout=60)
    sys.stderr.write(err)
    t.join(timeout=30)
    assert not t.is_alive(), "the in-flight ioctl must not hang"
    assert status == 0
    # The request in flight was interrupted by the shutdown, not answered
    # after its 60 s (that would have been 0).
    assert busy["ret"][0] == -1
    assert busy["ret"][1] in (errno.EINTR, errno.ECONNABORTED), busy
    # The idle client's next operation fails; nothing hangs.
    with pytest.raises(OSError) as e:
        os.pread(fd_idle, 1, 0)
    assert e.value.errno in (errno.ENOTCONN, errno.ENODEV, errno.ECONNABORTED)
    ret, err_no = raw_ioctl(fd_idle, SCRATCH_RING, 0)
    assert ret == -1 and err_no in (errno.ENOTCONN, errno.ENODEV)
    os.close(fd_busy)
    os.close(fd_idle)
    # The node is gone and cannot be opened.
    assert not daemon.path.exists()
    with pytest.raises(FileNotFoundError):
        os.open(daemon.path, os.O_RDWR)
