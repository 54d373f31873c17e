"""The daemon's own memory after floods (issue 17, item 4).

Clients that make the daemon allocate a lot and leave must not leave it
bigger. The issue saw the daemon grow 16–37 MB over its starting 4.5 MB
after floods of IOASIDs and maps: glibc kept the freed memory, in one
thread heap per daemon thread and under thresholds it raises by itself.
The daemon now fixes the allocator's thresholds and heaps at start and
gives freed memory back after a release (`cuse-ioasid/src/heap.rs`);
`cuse-ioasid status` shows its memory.

The flood here is the issue's: one client allocates 20,000 IOASIDs in one
file and closes it, twice (the daemon runs with an IOASID budget large
enough: the default per-client budget of 1024 refuses such a flood
earlier, which bounds it too). What is checked is the daemon's anonymous
resident memory (`RssAnon` of /proc/PID/status: its heaps and stacks,
not its binary's pages nor client pages it maps) once the client has
gone, against where it was after a small round of the same calls (which
starts the server threads; each keeps a stack and buffers while it
lives). Measured on 6.1 (`-rP` prints the figures), see the note of
issue 17 and docs/design.md.

It runs on Debian 12's kernel only: what it checks is the C library's,
the same in both guests, and the flood takes a minute under emulation.

    scripts/vm -- tests/scenarios/run -k daemon_memory -rP
"""

from __future__ import annotations

import os

import pytest

from conftest import in_test_vm
from cuse_ioasid import ioasid as io

pytestmark = [
    pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
    pytest.mark.skipif(not os.uname().release.startswith("6.1."),
                       reason="the C library's behaviour, the same on every kernel: "
                              "checked on Debian 12's kernel (6.1) only"),
    pytest.mark.cuse_ioasid_args("--max-client-ioasids", "100000"),
]

IOASIDS = 20000
ROUNDS = 2
# What the daemon may keep after the floods: allocator slack.
SLACK = 3 << 20


def rss_anon(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def ioasid_flood(ioasids: int) -> None:
    """One file with ``ioasids`` IOASIDs, closed."""
    with io.IoasidFd() as fd:
        for _ in range(ioasids):
            fd.alloc()


def test_memory_returns_after_floods_of_ioasids(ioasid_daemon):
    pid = ioasid_daemon.pid
    ioasid_flood(100)
    start = rss_anon(pid)
    figures = [("after a small round", start, ioasid_daemon.status()["daemon"]["memory"])]
    for n in range(ROUNDS):
        ioasid_flood(IOASIDS)
        figures.append((f"after flood {n + 1}", rss_anon(pid),
                        ioasid_daemon.status()["daemon"]["memory"]))
    end = figures[-1][1]
    memory = figures[-1][2]
    for what, anon, m in figures:
        print(f"{what:20} RssAnon {anon >> 10:6} KiB; status: resident {m['rss_bytes'] >> 10} "
              f"KiB, heap {m['heap_in_use_bytes'] >> 10} KiB in use, "
              f"{m['heap_free_bytes'] >> 10} KiB freed but kept, {m['give_backs']} give-backs")
    assert end <= start + SLACK, figures
    # The daemon holds nothing of the client any more, and says so.
    assert ioasid_daemon.status()["processes"] == []
    assert memory["heap_in_use_bytes"] <= figures[0][2]["heap_in_use_bytes"] + SLACK, figures
    assert memory["rss_bytes"] >= end
