"""RLIMIT_MEMLOCK is one limit per process, as VFIO type1 charges it
(issue 17, item 2): the shared memory the daemon pins for a process counts
once over all its ioasid files, a page mapped twice counts once, and what
the kernel charges the process itself (VmLck: mlock, the private memory
its own thread pinned, issue 14) counts too.

The client is a forked child without CAP_IPC_LOCK under a 256 KiB limit,
with two ioasid files, each holding one edu device. Uses the module's
daemon (tests/conftest.py), so `CUSE_IOASID_DAEMON` can point it at
another build.

Run: scripts/vm -- tests/scenarios/run -k test_memlock_per_process"""

from __future__ import annotations

import ctypes
import errno
import mmap
import multiprocessing
import resource
import traceback
from pathlib import Path

from conftest import needs_vm
from harness import caps
from cuse_ioasid import ioasid as io
from harness.daemon import ALONE_1, ALONE_2, LENGTH, Node, errno_of
from cuse_ioasid.vfio import DmaBuffer

pytestmark = needs_vm

KIB = 1024
PAGE = 4 * KIB
LIMIT = 256 * KIB

libc = ctypes.CDLL(None, use_errno=True)


def vm_lck() -> int:
    """This process's VmLck, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * KIB
    raise KeyError("VmLck")


def private_pages(size: int):
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def client(nodes, q):
    """In the child: each step and its errno (0: it worked), or what went
    wrong."""
    try:
        q.put(steps_of_client(nodes))
    except BaseException:
        q.put(traceback.format_exc())


def steps_of_client(nodes):
    caps.drop_effective(caps.CAP_IPC_LOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (LIMIT, LIMIT))
    steps = []

    def step(what, fn, *args):
        steps.append((what, errno_of(fn, *args)))

    node_a, node_b = Node(nodes[ALONE_1]), Node(nodes[ALONE_2])
    x, y = DmaBuffer(192 * KIB, "x"), DmaBuffer(128 * KIB, "y")
    _locked, locked_addr = private_pages(128 * KIB)
    _private, private_addr = private_pages(64 * KIB)
    with io.IoasidFd() as a, io.IoasidFd() as b:
        ids = {}
        for fd, node in ((a, node_a), (b, node_b)):
            io.bind_ioasid_fd(node.fd, fd)
            ids[fd] = fd.alloc()
            io.attach_ioasid(node.fd, ids[fd])
        ia, ib = ids[a], ids[b]
        step("file A maps X (192 KiB)", a.map_dma, ia, 0x100000, x.addr, x.size)
        step("file B maps Y (128 KiB): 320 KiB for the process", b.map_dma, ib, 0x200000, y.addr,
             y.size)
        step("file B maps X too: the same pages count once", b.map_dma, ib, 0x100000, x.addr, x.size)
        x.write(0, bytes(range(251)) * (LENGTH // 251 + 1))
        node_b.edu.round_trip(0x100000, 0x100000 + PAGE, LENGTH)
        steps.append(("the device behind file B copied X's bytes",
                      0 if x.read(PAGE, LENGTH) == x.read(0, LENGTH) else errno.EIO))
        step("file A unmaps X", a.unmap_dma, ia, 0x100000, x.size)
        step("file B maps Y: X is still pinned through B", b.map_dma, ib, 0x200000, y.addr, y.size)
        step("file B unmaps X", b.unmap_dma, ib, 0x100000, x.size)
        step("file B maps Y: nothing else pinned", b.map_dma, ib, 0x200000, y.addr, y.size)
        step("file B unmaps Y", b.unmap_dma, ib, 0x200000, y.size)
        # What the process locked itself counts.
        steps.append(("mlock 128 KiB", 0 if libc.mlock(ctypes.c_void_p(locked_addr),
                                                       ctypes.c_size_t(128 * KIB)) == 0
                      else ctypes.get_errno()))
        step("file A maps X: 128 KiB locked + 192 KiB", a.map_dma, ia, 0x100000, x.addr, x.size)
        libc.munlock(ctypes.c_void_p(locked_addr), ctypes.c_size_t(128 * KIB))
        step("file A maps X after munlock", a.map_dma, ia, 0x100000, x.addr, x.size)
        # Private memory, pinned by this thread and charged by the kernel to
        # VmLck, counts with the shared memory the daemon pins.
        before = vm_lck()
        step("file A maps 64 KiB of private memory: 256 KiB in all", a.map_dma, ia, 0x300000,
             private_addr, 64 * KIB)
        steps.append(("the kernel charged the private pages to this process",
                      0 if vm_lck() - before == 64 * KIB else errno.EIO))
        step("file B maps Y: over the limit", b.map_dma, ib, 0x200000, y.addr, y.size)
        step("file B maps one more private page: over the limit", b.map_dma, ib, 0x300000,
             private_addr, PAGE)
        for fd, node in ((a, node_a), (b, node_b)):
            io.unbind_ioasid_fd(node.fd, fd)
    steps.append(("VmLck back to 0 after unbind", 0 if vm_lck() == 0 else errno.EIO))
    return steps


EXPECTED = [
    ("file A maps X (192 KiB)", 0),
    ("file B maps Y (128 KiB): 320 KiB for the process", errno.ENOMEM),
    ("file B maps X too: the same pages count once", 0),
    ("the device behind file B copied X's bytes", 0),
    ("file A unmaps X", 0),
    ("file B maps Y: X is still pinned through B", errno.ENOMEM),
    ("file B unmaps X", 0),
    ("file B maps Y: nothing else pinned", 0),
    ("file B unmaps Y", 0),
    ("mlock 128 KiB", 0),
    ("file A maps X: 128 KiB locked + 192 KiB", errno.ENOMEM),
    ("file A maps X after munlock", 0),
    ("file A maps 64 KiB of private memory: 256 KiB in all", 0),
    ("the kernel charged the private pages to this process", 0),
    ("file B maps Y: over the limit", errno.ENOMEM),
    ("file B maps one more private page: over the limit", errno.ENOMEM),
    ("VmLck back to 0 after unbind", 0),
]


def test_two_ioasid_files_of_one_process_share_one_rlimit_memlock(nodes):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=client, args=(nodes, q))
    p.start()
    steps = q.get(timeout=240)
    p.join(60)
    assert isinstance(steps, list), steps
    assert p.exitcode == 0
    assert [(what, errno.errorcode.get(e, e)) for what, e in steps] == [
        (what, errno.errorcode.get(e, e)) for what, e in EXPECTED]
