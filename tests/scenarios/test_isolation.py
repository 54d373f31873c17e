"""Isolation under attack: what a hostile client that is not root can and
cannot make the daemon do, in the test VM.

    cargo build --workspace && tests/c/build && scripts/vm -- \
        /usr/bin/python3 -m pytest tests/scenarios/test_isolation.py -v
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import re
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, in_test_vm
from cuse_ioasid import ioasid as io
from cuse_ioasid import vfio
from harness.daemon import ALONE_3, daemon_log, errno_of, log_lines, wait_for

pytestmark = [
    pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
    pytest.mark.usefixtures("daemon"),
]

NOBODY = 65534
PAGE = vfio.PAGE_SIZE
PAGES = 256  # as in tests/c/race_map_files.c
RACE_MS = 20000


@contextmanager
def fresh_tmpfs(path: Path):
    """A tmpfs of its own at `path`: its first file gets the same inode
    number as the first file of any other fresh tmpfs."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "none", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def open_to_everyone(paths):
    """Nodes opened to every user, as `--node-mode 0666` would; restored."""
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in paths}
    try:
        for p in paths:
            os.chmod(p, 0o666)
        yield
    finally:
        for p, m in modes.items():
            os.chmod(p, m)


def as_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def public_dir():
    """A directory under /tmp that every user may enter (pytest's own
    tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="isolation-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for sub in path.iterdir():
        sub.rmdir()
    path.rmdir()


def test_a_raced_map_never_gives_the_device_a_file_the_client_may_only_read(nodes, public_dir):
    """A client that is not root swaps, under the address it maps, its own
    writable file for a root-owned file it may only read, which lives on
    another tmpfs with the same inode number. However the swaps interleave
    with the daemon's look-ups, no DMA of the client reads the victim's
    bytes, and the victim's bytes never change."""
    node = nodes[ALONE_3]
    with fresh_tmpfs(public_dir / "own") as own_fs, fresh_tmpfs(public_dir / "victim") as victim_fs:
        own = own_fs / "buffer"
        victim = victim_fs / "root-only"
        own.write_bytes(b"O" * (PAGES * 4096))
        os.chown(own, NOBODY, NOBODY)
        os.chmod(own, 0o600)
        victim.write_bytes(hashlib.sha256(b"victim").digest() * (PAGES * 4096 // 32))
        os.chmod(victim, 0o644)
        before = hashlib.sha256(victim.read_bytes()).hexdigest()
        o, v = os.stat(own), os.stat(victim)
        assert o.st_ino == v.st_ino and o.st_dev != v.st_dev, (
            "the attack needs two files with one inode number on two file systems: "
            f"own {o.st_dev:#x}:{o.st_ino}, victim {v.st_dev:#x}:{v.st_ino}")

        with open_to_everyone(["/dev/ioasid", node]):
            run = subprocess.run(
                [str(REPO / "target/c/race_map_files"), node, str(own), str(victim),
                 str(RACE_MS)],
                preexec_fn=as_nobody, capture_output=True, text=True,
                timeout=RACE_MS / 1000 + 120)
        print(run.stdout, run.stderr)
        after = hashlib.sha256(victim.read_bytes()).hexdigest()
        assert after == before, "a DMA write of the client changed the root-owned file"
        assert run.returncode == 0, f"the hostile client reports:\n{run.stdout}{run.stderr}"
        m = re.search(r"maps (\d+), refused EFAULT (\d+), EAGAIN (\d+)", run.stdout)
        assert m, run.stdout
        # The race ran: maps through the client's own file went through and
        # were written to by the device, others were refused.
        assert int(m.group(1)) > 0, run.stdout


def test_a_loop_of_refused_calls_stays_within_the_clients_log_budget(nodes):
    """Issue 17, item 3: every refused map of memory the daemon cannot use
    wrote a warning. Now a client's refusals are logged within its budget
    (20 lines at once, 2 a second), and a later line says how many were
    dropped."""
    dev = vfio.Device.open_node(nodes[ALONE_3])
    fd = io.IoasidFd()
    # Shared memory the client itself may not touch: refused with EFAULT.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    prot_none = 0
    addr = libc.mmap(None, PAGE, prot_none, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        io.bind_ioasid_fd(dev.fd, fd)
        ioasid = fd.alloc()
        io.attach_ioasid(dev.fd, ioasid)
        log = daemon_log()
        before = len(log_lines(log))
        started = time.monotonic()
        calls = 300
        for _ in range(calls):
            assert errno_of(fd.map_dma, ioasid, 0x100000, addr, PAGE) == errno.EFAULT
        elapsed = time.monotonic() - started
        written = log_lines(log)[before:]
        assert written, "a refusal is logged"
        assert len(written) <= 20 + 2 * elapsed + 2, f"{len(written)} lines for {calls} calls"

        def told():
            errno_of(fd.map_dma, ioasid, 0x100000, addr, PAGE)
            return any("earlier lines of this client dropped" in line
                       for line in log_lines(log)[before:])
        wait_for(told, "a line saying how many lines were dropped", timeout=30)
    finally:
        dev.close()
        fd.close()
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(PAGE))
