"""Per-client budgets (issue 17, item 7): a client process at its budget of
open ioasid files, IOASIDs, mappings or aliased memory areas gets the
errno itself, with a log line naming the option to raise, and another
client meanwhile notices nothing; what a client held is given back when it
exits. (Handler slots, RELEASE and INTERRUPT are cuse-server's:
tests/scenarios/test_cuse_fairness.py.)

The daemon is started by the module with small budgets.

Run: scripts/vm -- tests/scenarios/run -k test_client_budgets"""

from __future__ import annotations

import errno
import multiprocessing
import traceback

import pytest

from conftest import needs_vm
from cuse_ioasid import ioasid as io
from harness.daemon import ALONE_1, ALONE_2, ALONE_3, LENGTH, Node
from harness.own_daemon import OwnDaemon
from cuse_ioasid.vfio import DmaBuffer

pytestmark = needs_vm

PAGE = 4096
BUDGETS = {"files": 2, "ioasids": 3, "mappings": 6, "aliases": 3}


@pytest.fixture(scope="module")
def daemon():
    args = [a for item, n in BUDGETS.items() for a in (f"--max-client-{item}", str(n))]
    with OwnDaemon(args, "budgets") as d:
        yield d


def exhaust_every_budget(nodes) -> list:
    """Take every budget to its end: each step and its errno (0: it
    worked). Returns what it holds, to be kept open."""
    steps, held = [], []

    def step(what, fn, *args):
        try:
            r = fn(*args)
        except OSError as e:
            steps.append((what, e.errno))
            return None
        steps.append((what, 0))
        return r

    first, second = io.IoasidFd(), io.IoasidFd()
    held += [first, second]
    step("a third ioasid file", io.IoasidFd)
    a, b = Node(nodes[ALONE_1]), Node(nodes[ALONE_2])
    held += [a, b]
    ids = []
    for fd, node in ((first, a), (second, b)):
        io.bind_ioasid_fd(node.fd, fd)
        ids.append(fd.alloc())
        io.attach_ioasid(node.fd, ids[-1])
    ids.append(first.alloc())
    step("a fourth IOASID (over two files)", first.alloc)
    # Aliases: a registration (one area, any number of maps), then two
    # separate buffers in the second file; a third buffer has no area left.
    registered, s1, s2, s3 = (DmaBuffer(8 * PAGE, "reg"), DmaBuffer(PAGE, "s1"),
                              DmaBuffer(PAGE, "s2"), DmaBuffer(PAGE, "s3"))
    held += [registered, s1, s2, s3]
    first.register_memory(registered.addr, registered.size)
    second.map_dma(ids[1], 0x100000, s1.addr, PAGE)
    second.map_dma(ids[1], 0x200000, s2.addr, PAGE)
    step("a third aliased area", second.map_dma, ids[1], 0x300000, s3.addr, PAGE)
    # Mappings: two so far; four more from the registration, then none.
    for i in range(4):
        first.map_dma(ids[0], 0x100000 + i * PAGE, registered.page(i), PAGE)
    step("a seventh mapping", first.map_dma, ids[0], 0x200000, registered.page(5), PAGE)
    return steps, held


def greedy(nodes, q, done):
    """The greedy client, in a child: reports its steps, holds everything
    until `done` is set."""
    try:
        steps, _held = exhaust_every_budget(nodes)
        q.put(steps)
    except BaseException:
        q.put(traceback.format_exc())
        return
    done.wait(240)


def innocent_works(node_path: str):
    """What the other client does: a file, an IOASID, two separate shared
    buffers mapped, and DMA that crossed the IOMMU."""
    node = Node(node_path)
    with io.IoasidFd() as fd, DmaBuffer(2 * PAGE, "in") as src, DmaBuffer(PAGE, "out") as dst:
        io.bind_ioasid_fd(node.fd, fd)
        ioasid = fd.alloc()
        io.attach_ioasid(node.fd, ioasid)
        fd.map_dma(ioasid, 0x100000, src.addr, src.size)
        fd.map_dma(ioasid, 0x400000, dst.addr, dst.size)
        src.write(0, bytes(range(7, 256)) * (LENGTH // 249 + 1))
        node.edu.round_trip(0x100000, 0x400000, LENGTH)
        assert dst.read(0, LENGTH) == src.read(0, LENGTH)
        io.unbind_ioasid_fd(node.fd, fd)
    node.close()


def test_a_client_at_its_budgets_gets_the_errnos_and_another_notices_nothing(daemon):
    ctx = multiprocessing.get_context("fork")
    q, done = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=greedy, args=(daemon.nodes, q, done))
    p.start()
    try:
        steps = q.get(timeout=240)
        assert isinstance(steps, list), steps
        assert [(w, errno.errorcode.get(e, e)) for w, e in steps] == [
            ("a third ioasid file", "EMFILE"),
            ("a fourth IOASID (over two files)", "ENOSPC"),
            ("a third aliased area", "ENOMEM"),
            ("a seventh mapping", "ENOSPC"),
        ]
        log = daemon.log()
        assert f"at its budget of {BUDGETS['files']} open ioasid files" in log
        assert "--max-client-files" in log
        # The greedy client holds all of that: this process is another
        # client, with budgets of its own.
        innocent_works(daemon.nodes[ALONE_3])
    finally:
        done.set()
        p.join(60)
    assert p.exitcode == 0
    # Its exit gave everything back: the same budgets fit again.
    p = ctx.Process(target=greedy, args=(daemon.nodes, q, done))
    p.start()
    steps = q.get(timeout=240)
    p.join(60)
    assert [e for _, e in steps] == [errno.EMFILE, errno.ENOSPC, errno.ENOMEM, errno.ENOSPC], steps
