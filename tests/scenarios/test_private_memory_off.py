"""`--no-private-memory` (issue 14's opt-out): private memory is refused
with EFAULT and a log line that says to use shared memory, as before issue
14; shared memory still reaches the device. The daemon is started by the
module with that option; tests/scenarios/test_private_memory.py has the
default.

Run: scripts/vm -- tests/scenarios/run -k test_private_memory_off"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from conftest import needs_vm
from cuse_ioasid import ioasid as io
from harness.daemon import ALONE_1, LENGTH, Node, errno_of
from harness.own_daemon import OwnDaemon
from cuse_ioasid.vfio import DmaBuffer

pytestmark = needs_vm

PAGE = 4096


@pytest.fixture(scope="module")
def daemon():
    with OwnDaemon(["--no-private-memory"], "no-private-memory") as d:
        yield d


def private_pages(n: int, fileno: int = -1, flags: int = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS):
    m = mmap.mmap(fileno, n * PAGE, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:1] = b"x"  # populate
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_private_memory_is_refused_with_efault_and_advice(daemon):
    node = Node(daemon.nodes[ALONE_1])
    _anon, addr = private_pages(2)
    memfd = os.memfd_create("private", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 2 * PAGE)
    _cow, cow_addr = private_pages(2, memfd, mmap.MAP_PRIVATE)
    with io.IoasidFd() as fd, DmaBuffer(2 * PAGE) as shared:
        io.bind_ioasid_fd(node.fd, fd)
        gpa = fd.alloc()
        io.attach_ioasid(node.fd, gpa)
        for vaddr in (addr, cow_addr):
            assert errno_of(fd.map_dma, gpa, 0x100000, vaddr, 2 * PAGE) == errno.EFAULT
            assert errno_of(fd.register_memory, vaddr, 2 * PAGE) == errno.EFAULT
        assert "--no-private-memory" in daemon.log()
        assert "MAP_SHARED" in daemon.log()
        # Nothing was reserved: the IOVA takes shared memory, which the
        # device reaches.
        shared.write(0, bytes(range(256)) * (LENGTH // 256 + 1))
        fd.map_dma(gpa, 0x100000, shared.addr, 2 * PAGE)
        node.edu.round_trip(0x100000, 0x100000 + PAGE, LENGTH)
        assert shared.read(PAGE, LENGTH) == shared.read(0, LENGTH)
        io.unbind_ioasid_fd(node.fd, fd)
    node.close()
    os.close(memfd)
