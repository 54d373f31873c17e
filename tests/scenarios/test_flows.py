"""The RFC's flows through the daemon's device nodes, proved by DMA.

- Flow 5.1 (one device, one address space): the C program tests/c/flow_5_1.c,
  written like an ordinary VFIO application, run on a device node.
- Flow 5.2 (two devices, then one of them moved to an address space of its
  own with a shadow mapping), in Python: every claim is checked by making
  the edu devices copy bytes and looking at this process's memory.
- The RFC's IOMMU group rule with the two devices that share a group.
- A client killed with SIGKILL while holding mappings: the daemon's locked
  memory returns to where it was and the device serves the next client.

    tests/c/build && scripts/vm --daemon -- \
        /usr/bin/python3 -m pytest tests/scenarios/test_flows.py -v

Without --daemon the module starts the daemon itself (target/debug/
cuse-ioasid, or $CUSE_IOASID_DAEMON) and checks that it exits 0 on SIGTERM
at the end; that way one VM boot can also run the legacy VFIO scenarios,
which need the IOMMU groups the daemon would otherwise hold.
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, in_test_vm
from cuse_ioasid import ioasid as io
from cuse_ioasid import vfio
from harness.daemon import (ALONE_1, ALONE_2, ALONE_3, LENGTH, SHARED_A, SHARED_B, Node,
                            daemon_pids, errno_of, wait_for)
from cuse_ioasid.edu import Edu

PAGE = vfio.PAGE_SIZE
FLOW_5_1 = REPO / "target" / "c" / "flow_5_1"



pytestmark = [
    pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
    pytest.mark.usefixtures("daemon"),
]


# ---------------------------------------------------------------------------
# The daemon and its nodes
# ---------------------------------------------------------------------------


def locked_kib(pid: int) -> dict[str, int]:
    """VmLck and VmPin of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmLck", "VmPin"):
            out[key] = int(value.split()[0])
    return out


def copy_and_check(edu: Edu, mem: vfio.DmaBuffer, src_iova: int, src_off: int,
                   dst_iova: int, dst_off: int) -> bytes:
    """Random bytes at mem[src_off] (IOVA src_iova) are copied by the device
    to IOVA dst_iova; asserts they land at mem[dst_off]. Returns them."""
    pattern = os.urandom(LENGTH)
    mem.write(src_off, pattern)
    mem.fill(0, dst_off, LENGTH)
    edu.round_trip(src_iova, dst_iova, LENGTH)
    assert mem.read(dst_off, LENGTH) == pattern, (
        f"IOVA {src_iova:#x} -> {dst_iova:#x} did not land at offset {dst_off:#x}"
    )
    return pattern


# ---------------------------------------------------------------------------
# Flow 5.1: the C program
# ---------------------------------------------------------------------------

FLOW_5_1_STEPS = [
    "opened the device node",
    "opened /dev/ioasid",
    "VFIO_BIND_IOASID_FD",
    "IOASID_ALLOC: got I/O address space 1",
    "VFIO_ATTACH_IOASID",
    "IOASID_MAP_DMA",
    "enabled bus mastering",
    "VFIO_DEVICE_SET_IRQS",
    "the device read 3000 bytes",
    "the device wrote its buffer",
    "page B now holds exactly page A's 3000 bytes",
    "the MSI arrived",
    "cleaned up",
    "flow_5_1: PASS",
]


@pytest.mark.parametrize("bdf", [ALONE_1, SHARED_A])
def test_flow_5_1_c_program(nodes, bdf):
    if not FLOW_5_1.exists():
        pytest.fail(f"{FLOW_5_1} missing: run tests/c/build on the host")
    r = subprocess.run([str(FLOW_5_1), nodes[bdf]], capture_output=True, text=True,
                       timeout=300)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    at = 0
    for step in FLOW_5_1_STEPS:
        found = r.stdout.find(step, at)
        assert found >= 0, f"missing (or out of order): {step!r}\n{r.stdout}"
        at = found
    assert "FAIL" not in r.stdout


def test_flow_5_1_reports_a_failing_step_and_exits_non_zero(nodes):
    """While another client holds the device, the program stops at the bind,
    says so, and fails."""
    holder, holder_fd = Node(nodes[ALONE_1]), io.IoasidFd()
    try:
        io.bind_ioasid_fd(holder.fd, holder_fd)
        r = subprocess.run([str(FLOW_5_1), nodes[ALONE_1]], capture_output=True, text=True,
                           timeout=300)
    finally:
        holder.close()
        holder_fd.close()
    print(r.stdout, r.stderr)
    assert r.returncode == 1
    assert "FAILED: VFIO_BIND_IOASID_FD (Device or resource busy)" in r.stdout
    assert r.stdout.rstrip().endswith("flow_5_1: FAIL")
    assert "IOASID_ALLOC" not in r.stdout


# ---------------------------------------------------------------------------
# The device node's own rules, and an attached IOASID's address space
# ---------------------------------------------------------------------------


def test_device_node_before_bind_and_bind_errors(nodes):
    dev = Node(nodes[ALONE_2])
    fd, other = io.IoasidFd(), io.IoasidFd()
    null = os.open("/dev/null", os.O_RDWR)
    peer = Node(nodes[ALONE_3])
    try:
        # Unbound: the device answers nothing but the bind.
        assert errno_of(dev.device.info) == errno.EINVAL
        assert errno_of(os.pread, dev.fd, 4, 0) == errno.EINVAL
        assert errno_of(io.attach_ioasid, dev.fd, 1) == errno.EINVAL
        # Bind wants an open /dev/ioasid file of this daemon.
        assert errno_of(io.ioctl_int, dev.fd, io.VFIO_BIND_IOASID_FD, 999) == errno.EBADF
        assert errno_of(io.ioctl_int, dev.fd, io.VFIO_BIND_IOASID_FD, -1) == errno.EBADF
        assert errno_of(io.ioctl_int, dev.fd, io.VFIO_BIND_IOASID_FD, null) == errno.EINVAL
        assert errno_of(io.ioctl_int, dev.fd, io.VFIO_BIND_IOASID_FD, peer.fd) == errno.EINVAL
        io.bind_ioasid_fd(dev.fd, fd)
        assert dev.device.info().flags & vfio.VFIO_DEVICE_FLAGS_PCI
        assert errno_of(io.bind_ioasid_fd, dev.fd, fd) == errno.EBUSY, "second bind"
        assert errno_of(io.bind_ioasid_fd, dev.fd, other) == errno.EBUSY, "bind elsewhere"
        assert errno_of(io.unbind_ioasid_fd, dev.fd, other) == errno.EINVAL, "unbind elsewhere"
        # Attach names an IOASID of the bound file.
        assert errno_of(io.attach_ioasid, dev.fd, 1) == errno.ENOENT
        gpa = fd.alloc()
        assert errno_of(io.detach_ioasid, dev.fd, gpa) == errno.ENOENT, "detach, not attached"
        io.attach_ioasid(dev.fd, gpa)
        assert errno_of(io.attach_ioasid, dev.fd, gpa) == errno.EBUSY, "attached twice"
        assert errno_of(fd.free, gpa) == errno.EBUSY, "FREE with a device attached"
        io.unbind_ioasid_fd(dev.fd, fd)  # detaches first
        fd.free(gpa)
        assert errno_of(dev.device.info) == errno.EINVAL, "unbound again"
    finally:
        os.close(null)
        dev.close()
        peer.close()
        fd.close()
        other.close()


MSI_WINDOW = 0xFEE00000  # x86's interrupt window: never a permitted IOVA


def test_attached_ioasid_address_space(nodes):
    dev = Node(nodes[ALONE_2])
    fd = io.IoasidFd()
    mem = vfio.DmaBuffer(8 * PAGE)
    try:
        io.bind_ioasid_fd(dev.fd, fd)
        gpa = fd.alloc()
        io.attach_ioasid(dev.fd, gpa)

        info = fd.get_info(gpa)
        flags = info["flags"]
        assert flags & io.IOASID_INFO_PGSIZES and flags & io.IOASID_INFO_MAP_DMA
        assert flags & io.IOASID_INFO_CAPS
        assert info["pgsize_bitmap"] & PAGE, "4 KiB pages"
        ranges = info["caps"]["iova_ranges"]
        assert ranges and ranges[0][0] == 0
        assert not any(start <= MSI_WINDOW <= last for start, last in ranges), ranges
        assert info["caps"]["dma_avail"] > 0
        assert info["caps"]["pasid"]["tracked"] and not info["caps"]["pasid"]["routed"]
        # A buffer too small for the chain: success, CAPS, argsz raised.
        _, out, _ = io.ioctl_struct(fd, io.IOASID_GET_INFO, io.ioasid_info(ioasid=gpa))
        assert out.flags & io.IOASID_INFO_CAPS and out.cap_offset == 0
        assert out.argsz > ctypes.sizeof(io.ioasid_info)

        # Type1v2 semantics.
        assert errno_of(fd.map_dma, gpa, MSI_WINDOW, mem.addr, PAGE) == errno.EINVAL
        assert errno_of(fd.map_dma, gpa, 0x100800, mem.addr, PAGE) == errno.EINVAL
        assert errno_of(fd.map_dma, gpa, 0x100000, mem.addr, 0) == errno.EINVAL
        assert errno_of(fd.map_dma, gpa, 0x100000, mem.addr, PAGE, read=False,
                        write=False) == errno.EINVAL
        # Page 0 read-only for the device, pages 1..3 read-write.
        fd.map_dma(gpa, 0x100000, mem.page(0), PAGE, write=False)
        fd.map_dma(gpa, 0x101000, mem.page(1), 3 * PAGE)
        assert errno_of(fd.map_dma, gpa, 0x102000, mem.page(4), PAGE) == errno.EEXIST
        assert errno_of(fd.unmap_dma, gpa, 0x102000, PAGE) == errno.EINVAL, "split"
        assert fd.unmap_dma(gpa, 0x200000, PAGE) == 0, "nothing mapped there"

        pattern = copy_and_check(dev.edu, mem, 0x100000, 0, 0x101000, PAGE)
        # The device may read page 0 but not write it.
        mem.fill(0x55, 0, PAGE)
        dev.edu.to_memory(0x100000, LENGTH)
        assert mem.read(0, PAGE) == b"\x55" * PAGE, "the device wrote a read-only mapping"

        # Detached, the IOASID keeps its mappings; re-attached, they work
        # again without a new MAP_DMA.
        io.detach_ioasid(dev.fd, gpa)
        assert fd.get_info(gpa)["flags"] == flags
        io.attach_ioasid(dev.fd, gpa)
        mem.write(2 * PAGE, pattern)
        mem.fill(0, 3 * PAGE, PAGE)
        dev.edu.round_trip(0x102000, 0x103000, LENGTH)
        assert mem.read(3 * PAGE, LENGTH) == pattern

        assert fd.unmap_all(gpa) == 4 * PAGE
        assert fd.unmap_all(gpa) == 0
        io.detach_ioasid(dev.fd, gpa)
        fd.free(gpa)
        io.unbind_ioasid_fd(dev.fd, fd)
    finally:
        dev.close()
        fd.close()
        mem.close()


# ---------------------------------------------------------------------------
# Flow 5.2: two devices share gpa, then one moves to a shadow address space
# ---------------------------------------------------------------------------

BIG = 64 << 20  # the "guest memory": 64 MiB of one memfd, mapped at IOVA 0
SHADOW = 16 << 20  # offset in that memory of the pages GIOVA maps
GIOVA_SRC = 0x2000
GIOVA_DST = 0x3000
GPA_ONLY = 0x100000  # an IOVA mapped in gpa and not in giova


def test_flow_5_2_two_devices_then_a_shadow_address_space(nodes, daemon):
    before = locked_kib(daemon)
    dev1, dev2 = Node(nodes[ALONE_1]), Node(nodes[ALONE_2])
    ioasid_fd = io.IoasidFd()
    mem = vfio.DmaBuffer(BIG, name="guest-memory")
    try:
        io.bind_ioasid_fd(dev1.fd, ioasid_fd)
        io.bind_ioasid_fd(dev2.fd, ioasid_fd)
        # Register the guest memory once: pinned and accounted once, however
        # many address spaces map it.
        ioasid_fd.register_memory(mem.addr, BIG)

        gpa = ioasid_fd.alloc()
        io.attach_ioasid(dev1.fd, gpa)
        io.attach_ioasid(dev2.fd, gpa)
        ioasid_fd.map_dma(gpa, iova=0, vaddr=mem.addr, size=BIG)
        info = ioasid_fd.get_info(gpa)
        assert info["flags"] & io.IOASID_INFO_MAP_DMA

        # Both devices see gpa: IOVA x is byte x of the memory.
        copy_and_check(dev1.edu, mem, 0x10000, 0x10000, 0x20000, 0x20000)
        copy_and_check(dev2.edu, mem, BIG - 2 * PAGE, BIG - 2 * PAGE, 0x30000, 0x30000)

        # dev2 leaves gpa for an address space of its own: GIOVA 0x2000 and
        # 0x3000 shadow two pages of the same memory, far from their GPA.
        io.detach_ioasid(dev2.fd, gpa)
        giova = ioasid_fd.alloc()
        assert giova != gpa
        io.attach_ioasid(dev2.fd, giova)
        ioasid_fd.map_dma(giova, iova=GIOVA_SRC, vaddr=mem.addr + SHADOW, size=PAGE)
        ioasid_fd.map_dma(giova, iova=GIOVA_DST, vaddr=mem.addr + SHADOW + PAGE, size=PAGE)
        # The file registers memory, so a map of unregistered memory fails.
        with vfio.DmaBuffer(PAGE, name="unregistered") as stray:
            assert errno_of(ioasid_fd.map_dma, giova, iova=0x8000, vaddr=stray.addr,
                            size=PAGE) == errno.ENOENT

        # dev2 translates through giova...
        pattern = copy_and_check(dev2.edu, mem, GIOVA_SRC, SHADOW, GIOVA_DST, SHADOW + PAGE)
        # ...and its buffer now holds `pattern`. A write to an IOVA only gpa
        # maps goes nowhere:
        mem.fill(0x55, GPA_ONLY, PAGE)
        dev2.edu.to_memory(GPA_ONLY, LENGTH)
        assert mem.read(GPA_ONLY, PAGE) == b"\x55" * PAGE, "dev2 reached gpa's mapping"
        # and GIOVA 0x3000 is the shadow page, not byte 0x3000 of the memory.
        mem.fill(0x55, GIOVA_DST, PAGE)
        mem.fill(0, SHADOW + PAGE, PAGE)
        dev2.edu.to_memory(GIOVA_DST, LENGTH)
        assert mem.read(SHADOW + PAGE, LENGTH) == pattern, "dev2's write missed the shadow page"
        assert mem.read(GIOVA_DST, PAGE) == b"\x55" * PAGE, "dev2 wrote gpa's page 0x3000"

        # dev1 still translates through gpa: the same IOVA reaches the page.
        dev1.edu.to_device(0x10000, LENGTH)  # loads its buffer from gpa
        dev1.edu.to_memory(GPA_ONLY, LENGTH)
        assert mem.read(GPA_ONLY, LENGTH) == mem.read(0x10000, LENGTH)
        # and gpa's 0x3000 is byte 0x3000, not the shadow page.
        mem.fill(0, SHADOW + PAGE, PAGE)
        dev1.edu.to_memory(GIOVA_DST, LENGTH)
        assert mem.read(GIOVA_DST, LENGTH) == mem.read(0x10000, LENGTH)
        assert mem.read(SHADOW + PAGE, PAGE) == bytes(PAGE), "dev1 reached giova's page"

        # Clean up in the RFC's order.
        assert ioasid_fd.unmap_all(giova) == 2 * PAGE
        io.detach_ioasid(dev2.fd, giova)
        ioasid_fd.free(giova)
        assert ioasid_fd.unmap_dma(gpa, 0, BIG) == BIG
        io.detach_ioasid(dev1.fd, gpa)
        ioasid_fd.free(gpa)
        ioasid_fd.unregister_memory(mem.addr, BIG)
        io.unbind_ioasid_fd(dev1.fd, ioasid_fd)
        io.unbind_ioasid_fd(dev2.fd, ioasid_fd)
    finally:
        dev1.close()
        dev2.close()
        ioasid_fd.close()
        mem.close()
    # Unmapped and unregistered: the daemon holds no pinned page any more.
    wait_for(lambda: locked_kib(daemon) == before,
              f"the daemon's locked memory did not return to {before}: {locked_kib(daemon)}")


# ---------------------------------------------------------------------------
# The IOMMU group rule
# ---------------------------------------------------------------------------


def test_group_rule_with_two_devices_of_one_group(nodes):
    a, b = Node(nodes[SHARED_A]), Node(nodes[SHARED_B])
    fd = io.IoasidFd()
    other = io.IoasidFd()
    mem = vfio.DmaBuffer(4 * PAGE)
    try:
        io.bind_ioasid_fd(a.fd, fd)
        # Group ownership: B cannot go to another ioasid file while A is
        # bound to this one.
        assert errno_of(io.bind_ioasid_fd, b.fd, other) == errno.EBUSY
        io.bind_ioasid_fd(b.fd, fd)

        gpa = fd.alloc()
        io.attach_ioasid(a.fd, gpa)
        # A is attached, B (same group, same file) is not: gpa refuses
        # every command.
        assert errno_of(fd.map_dma, gpa, iova=0x100000, vaddr=mem.addr, size=PAGE) == errno.EBUSY
        assert errno_of(fd.unmap_dma, gpa, 0x100000, PAGE) == errno.EBUSY
        assert errno_of(fd.get_info, gpa) == errno.EBUSY
        assert errno_of(fd.free, gpa) == errno.EBUSY

        # B attached to another IOASID is refused: one RID space per group.
        other_ioasid = fd.alloc()
        assert errno_of(io.attach_ioasid, b.fd, other_ioasid) == errno.EBUSY
        fd.free(other_ioasid)

        io.attach_ioasid(b.fd, gpa)
        # The whole group is attached: gpa works, for both devices.
        fd.map_dma(gpa, iova=0x100000, vaddr=mem.addr, size=4 * PAGE)
        assert fd.get_info(gpa)["flags"] & io.IOASID_INFO_MAP_DMA
        copy_and_check(a.edu, mem, 0x100000, 0, 0x101000, PAGE)
        copy_and_check(b.edu, mem, 0x102000, 2 * PAGE, 0x103000, 3 * PAGE)

        # B detached again: the rule applies again.
        io.detach_ioasid(b.fd, gpa)
        assert errno_of(fd.unmap_dma, gpa, 0x100000, 4 * PAGE) == errno.EBUSY
        # B unbound no longer counts: gpa works with A alone.
        io.unbind_ioasid_fd(b.fd, fd)
        assert fd.get_info(gpa)["flags"] & io.IOASID_INFO_MAP_DMA
        copy_and_check(a.edu, mem, 0x103000, 3 * PAGE, 0x100000, 0)

        assert fd.unmap_all(gpa) == 4 * PAGE
        io.detach_ioasid(a.fd, gpa)
        fd.free(gpa)
        io.unbind_ioasid_fd(a.fd, fd)
    finally:
        a.close()
        b.close()
        fd.close()
        other.close()
        mem.close()


# ---------------------------------------------------------------------------
# A client killed while holding mappings
# ---------------------------------------------------------------------------

HELD = 16 << 20


def _client_then_wait(node_path: str, q) -> None:
    """A client that maps HELD bytes for DMA, proves one DMA, says so and
    waits to be killed."""
    dev = Node(node_path)
    fd = io.IoasidFd()
    mem = vfio.DmaBuffer(HELD, name="held")
    io.bind_ioasid_fd(dev.fd, fd)
    gpa = fd.alloc()
    io.attach_ioasid(dev.fd, gpa)
    fd.map_dma(gpa, iova=0, vaddr=mem.addr, size=HELD)
    copy_and_check(dev.edu, mem, 0x1000, 0x1000, 0x2000, 0x2000)
    q.put("mapped")
    while True:
        time.sleep(60)


def test_killed_client_releases_pinned_memory_and_device(nodes, daemon):
    node = nodes[ALONE_3]
    before = locked_kib(daemon)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_client_then_wait, args=(node, q))
    child.start()
    try:
        assert q.get(timeout=300) == "mapped"
        held = locked_kib(daemon)
        print(f"daemon before {before}, while the client holds {HELD >> 20} MiB: {held}")
        assert held["VmLck"] + held["VmPin"] >= before["VmLck"] + before["VmPin"] + (HELD >> 10), (
            "the client's mapping is not pinned by the daemon"
        )
        # The device is the client's: another client can open the node but
        # not bind it.
        intruder, intruder_fd = Node(node), io.IoasidFd()
        try:
            assert errno_of(io.bind_ioasid_fd, intruder.fd, intruder_fd) == errno.EBUSY
        finally:
            intruder.close()
            intruder_fd.close()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
    assert child.exitcode == -signal.SIGKILL
    wait_for(lambda: locked_kib(daemon) == before,
              f"the daemon's locked memory did not return to {before}: {locked_kib(daemon)}")
    assert daemon in daemon_pids()

    # The device serves the next client.
    dev = Node(node)
    fd = io.IoasidFd()
    mem = vfio.DmaBuffer(2 * PAGE)
    try:
        io.bind_ioasid_fd(dev.fd, fd)
        gpa = fd.alloc()
        io.attach_ioasid(dev.fd, gpa)
        fd.map_dma(gpa, iova=0x100000, vaddr=mem.addr, size=2 * PAGE)
        copy_and_check(dev.edu, mem, 0x100000, 0, 0x101000, PAGE)
        assert fd.unmap_all(gpa) == 2 * PAGE
        io.detach_ioasid(dev.fd, gpa)
        io.unbind_ioasid_fd(dev.fd, fd)
    finally:
        dev.close()
        fd.close()
        mem.close()
    wait_for(lambda: locked_kib(daemon) == before,
              f"locked memory after the second client: {locked_kib(daemon)}, not {before}")
