"""The daemon's own memory after floods (issue 17, item 4).

Clients that make the daemon allocate a lot and leave must not leave it
bigger. The issue saw the daemon grow 16–37 MB over its starting 4.5 MB
after floods of IOASIDs and maps: glibc kept the freed memory, in one
thread heap per daemon thread and under thresholds it raises by itself.
The daemon now fixes the allocator's thresholds and heaps at start and
gives freed memory back after a release (`cuse-ioasid/src/heap.rs`);
`cuse-ioasid status` shows its memory.

The floods here are the issue's: IOASIDs from several clients at once
(each served by a daemon thread of its own), then 16,384 maps of
distinct 4 KiB pieces of one buffer. The daemon runs with budgets large
enough for them (the default per-client budgets refuse such a flood
earlier, which bounds it too). What is checked is the daemon's anonymous
resident memory (`RssAnon` of /proc/PID/status: its heaps and stacks,
not its binary's pages nor client pages it maps) once every client has
gone, against where it was after a small round of the same calls (which
starts the server threads the floods use; each keeps a stack and
buffers while it lives). Measured on 6.1 (`-rP` prints the figures):
without the fix the daemon kept 8 to 12 MiB more after such floods, with
it about 1 MiB.

It runs on Debian 12's kernel only: what it checks is the C library's,
the same in both guests, and the floods take minutes under emulation.

    scripts/vm -- tests/scenarios/run -k daemon_memory -rP
"""

from __future__ import annotations

import os
import resource

import pytest

from conftest import in_test_vm
from cuse_ioasid import ioasid as io
from cuse_ioasid import vfio
from harness.daemon import ALONE_1

pytestmark = [
    pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
    pytest.mark.skipif(not os.uname().release.startswith("6.1."),
                       reason="the C library's behaviour, the same on every kernel: "
                              "checked on Debian 12's kernel (6.1) only"),
    pytest.mark.cuse_ioasid_args("--max-client-ioasids", "100000",
                                 "--max-client-aliases", "100000"),
]

CLIENTS = 4
IOASIDS = 2500
MAPS = 16384
PAGE = 4096
# What the daemon may keep after the floods: allocator slack.
SLACK = 4 << 20


def rss_anon(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def ioasid_flood(ioasids: int = IOASIDS) -> None:
    """CLIENTS processes at once, ``ioasids`` each, then gone."""
    kids = []
    for _ in range(CLIENTS):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with io.IoasidFd() as fd:
                    for _ in range(ioasids):
                        fd.alloc()
                code = 0
            finally:
                os._exit(code)
        kids.append(pid)
    for pid in kids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a flooding client failed"


def map_flood(node: str, maps: int = MAPS) -> None:
    """``maps`` maps of distinct pages of one shared buffer, in one IOASID
    attached to a device, then everything closed."""
    with vfio.DmaBuffer(maps * PAGE) as mem:
        dev = vfio.Device.open_node(node)
        fd = io.IoasidFd()
        try:
            io.bind_ioasid_fd(dev.fd, fd)
            a = fd.alloc()
            io.attach_ioasid(dev.fd, a)
            for i in range(maps):
                fd.map_dma(a, 0x100000 + i * PAGE, mem.addr + i * PAGE, PAGE)
        finally:
            dev.close()
            fd.close()


def test_memory_returns_after_floods_of_ioasids_and_maps(ioasid_daemon):
    # The maps pin 64 MiB of this process.
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    pid = ioasid_daemon.pid
    node = ioasid_daemon.nodes[ALONE_1]
    ioasid_flood(10)
    map_flood(node, 16)
    start = rss_anon(pid)
    figures = [("after a small round", start, ioasid_daemon.status()["daemon"]["memory"])]
    ioasid_flood()
    figures.append(("after the IOASID flood", rss_anon(pid),
                    ioasid_daemon.status()["daemon"]["memory"]))
    map_flood(node)
    end = rss_anon(pid)
    memory = ioasid_daemon.status()["daemon"]["memory"]
    figures.append(("after the map flood", end, memory))
    for what, anon, m in figures:
        print(f"{what:24} RssAnon {anon >> 10:6} KiB; status: resident {m['rss_bytes'] >> 10} "
              f"KiB, heap {m['heap_in_use_bytes'] >> 10} KiB in use, "
              f"{m['heap_free_bytes'] >> 10} KiB freed but kept, {m['give_backs']} give-backs")
    assert end <= start + SLACK, figures
    # The daemon holds nothing of the clients any more, and says so.
    assert ioasid_daemon.status()["processes"] == []
    assert memory["heap_in_use_bytes"] <= figures[0][2]["heap_in_use_bytes"] + SLACK, figures
    assert memory["rss_bytes"] >= end
