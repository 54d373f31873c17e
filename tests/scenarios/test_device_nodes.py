"""The device nodes /dev/vfio/devices/devN (crate cuse-vfio-devices) in the VM.

Every test is a client of the daemon: the bind protocol and its errnos, the
device's own VFIO ioctls through the node (region info without mmap, IRQ
info, SET_IRQS with an eventfd that the device's MSI really signals, hot
reset info and a hot reset with the daemon's group fds), the group
ownership rule, region access with pread/pwrite (an edu DMA round trip
proves bind + attach + map), its bounds, and that a closed or SIGKILLed
client leaves a reset device the next client can use.

    cargo build --workspace && scripts/vm --daemon -- \
        /usr/bin/python3 -m pytest tests/scenarios/test_device_nodes.py -v

Without --daemon the module starts the daemon itself (target/debug/
cuse-ioasid) and checks that it exits 0 on SIGTERM at the end.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import time

import pytest

from conftest import in_test_vm
from cuse_ioasid import ioasid as io
from cuse_ioasid import vfio
from harness.daemon import ALONE_1, ALONE_2, LENGTH, SHARED_A, SHARED_B, daemon_pids, errno_of
from cuse_ioasid.edu import (BUFFER_ADDR, DMA_CMD_IRQ, DMA_CMD_START, REG_DMA_CMD, REG_DMA_COUNT,
                         REG_DMA_DST, REG_DMA_SRC, Edu)

PAGE = vfio.PAGE_SIZE

IOVA = 0x200000  # below the edu's 28-bit DMA mask

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
REG_IRQ_STATUS = 0x24
REG_IRQ_ACK = 0x64

pytestmark = [
    pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
    pytest.mark.usefixtures("daemon"),
]


# ---------------------------------------------------------------------------
# The daemon and its nodes
# ---------------------------------------------------------------------------


@pytest.fixture
def node(nodes):
    """ALONE_1's node, opened; closed at the end."""
    dev = vfio.Device.open_node(nodes[ALONE_1])
    try:
        yield dev
    finally:
        dev.close()


def bind_with_retry(dev: vfio.Device, ioasid_fd, timeout: float = 10.0) -> None:
    """Bind; tolerate EBUSY for a moment while a previous client's release
    is still being processed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            io.bind_ioasid_fd(dev.fd, ioasid_fd)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def region_info_raw(fd: int, index: int, argsz: int) -> bytes:
    """VFIO_DEVICE_GET_REGION_INFO with `argsz` bytes of buffer."""
    buf = bytearray(max(argsz, 32))
    struct.pack_into("=III", buf, 0, argsz, 0, index)
    io.fcntl.ioctl(fd, vfio.VFIO_DEVICE_GET_REGION_INFO, buf)
    return bytes(buf)


def cap_ids(info: bytes) -> list[int]:
    """Ids of the capability chain of a region info (bounded walk)."""
    flags, cap_offset = struct.unpack_from("=I", info, 4)[0], struct.unpack_from("=I", info, 12)[0]
    ids = []
    at = cap_offset if flags & vfio.VFIO_REGION_INFO_FLAG_CAPS else 0
    while at and len(ids) < 64:
        assert at + 8 <= len(info), f"capability at {at} outside the {len(info)} bytes"
        cap_id, _version, nxt = struct.unpack_from("=HHI", info, at)
        ids.append(cap_id)
        assert nxt == 0 or nxt > at, "capability chain goes backwards"
        at = nxt
    return ids


class Client:
    """One client: an ioasid fd, a node bound to it, IOASID `gpa` attached,
    2 pages of memfd memory mapped at IOVA."""

    def __init__(self, path: str):
        self.ioasid_fd = io.IoasidFd()
        self.dev = vfio.Device.open_node(path)
        self.mem = vfio.DmaBuffer(2 * PAGE)
        bind_with_retry(self.dev, self.ioasid_fd)
        self.gpa = self.ioasid_fd.alloc()
        io.attach_ioasid(self.dev.fd, self.gpa)
        self.ioasid_fd.map_dma(self.gpa, iova=IOVA, vaddr=self.mem.addr, size=2 * PAGE)
        self.edu = Edu(self.dev)
        self.edu.enable_bus_master()

    def round_trip(self) -> None:
        """The device copies random bytes from page 0 to page 1; compared in
        this process's memory."""
        pattern = os.urandom(LENGTH)
        self.mem.write(0, pattern)
        self.mem.fill(0, PAGE, PAGE)
        self.edu.round_trip(IOVA, IOVA + PAGE, LENGTH)
        assert self.mem.read(PAGE, LENGTH) == pattern, "the DMA round trip did not land"

    def close(self) -> None:
        self.dev.close()
        self.ioasid_fd.close()
        self.mem.close()


# ---------------------------------------------------------------------------
# Before the bind
# ---------------------------------------------------------------------------


def test_device_ioctls_and_region_access_before_bind_are_einval(node):
    assert errno_of(node.info) == errno.EINVAL
    assert errno_of(node.region_info, 0) == errno.EINVAL
    assert errno_of(node.reset) == errno.EINVAL
    assert errno_of(os.pread, node.fd, 4, 0) == errno.EINVAL
    assert errno_of(os.pwrite, node.fd, b"\0" * 4, 0) == errno.EINVAL
    assert errno_of(io.attach_ioasid, node.fd, 1) == errno.EINVAL
    with io.IoasidFd() as fd:
        assert errno_of(io.unbind_ioasid_fd, node.fd, fd) == errno.EINVAL
    # Not a VFIO device command at all.
    assert errno_of(io.ioctl_int, node.fd, (ord(";") << 8) | 0x30, 0) == errno.ENOTTY


def test_bind_with_something_else_than_an_ioasid_fd(node):
    r, w = os.pipe()
    try:
        assert errno_of(io.bind_ioasid_fd, node.fd, r) == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    with open("/dev/null", "rb") as null:
        assert errno_of(io.bind_ioasid_fd, node.fd, null.fileno()) == errno.EINVAL
    # The node itself is not an ioasid fd either.
    assert errno_of(io.bind_ioasid_fd, node.fd, node.fd) == errno.EINVAL
    # Not an open fd.
    bad = os.open("/dev/null", os.O_RDONLY)
    os.close(bad)
    assert errno_of(io.bind_ioasid_fd, node.fd, bad) == errno.EBADF
    assert errno_of(io.bind_ioasid_fd, node.fd, -1) == errno.EBADF
    # Still unbound, and a real bind works afterwards.
    assert errno_of(node.info) == errno.EINVAL
    with io.IoasidFd() as fd:
        io.bind_ioasid_fd(node.fd, fd)
        assert node.info().num_regions >= 8


def test_one_binding_at_a_time(nodes, node):
    other = vfio.Device.open_node(nodes[ALONE_1])
    fd1, fd2 = io.IoasidFd(), io.IoasidFd()
    try:
        io.bind_ioasid_fd(node.fd, fd1)
        assert errno_of(io.bind_ioasid_fd, node.fd, fd1) == errno.EBUSY
        assert errno_of(io.bind_ioasid_fd, node.fd, fd2) == errno.EBUSY
        assert errno_of(io.bind_ioasid_fd, other.fd, fd2) == errno.EBUSY
        # Only the binding open file may use the device.
        assert errno_of(other.info) == errno.EINVAL
        assert errno_of(os.pread, other.fd, 4, 0) == errno.EINVAL
        assert node.info().flags & vfio.VFIO_DEVICE_FLAGS_PCI
        # Unbind names the bound ioasid fd only.
        assert errno_of(io.unbind_ioasid_fd, node.fd, fd2) == errno.EINVAL
        assert errno_of(io.unbind_ioasid_fd, other.fd, fd1) == errno.EINVAL
        io.unbind_ioasid_fd(node.fd, fd1)
        assert errno_of(node.info) == errno.EINVAL
        # Now the other open file may bind, to another ioasid fd.
        io.bind_ioasid_fd(other.fd, fd2)
        assert other.info().num_regions >= 8
    finally:
        other.close()
        fd1.close()
        fd2.close()


def test_devices_of_one_group_bind_to_one_ioasid_fd(nodes):
    a = vfio.Device.open_node(nodes[SHARED_A])
    b = vfio.Device.open_node(nodes[SHARED_B])
    fd1, fd2 = io.IoasidFd(), io.IoasidFd()
    try:
        io.bind_ioasid_fd(a.fd, fd1)
        # SHARED_B's group is owned by fd1's context now.
        assert errno_of(io.bind_ioasid_fd, b.fd, fd2) == errno.EBUSY
        assert errno_of(b.info) == errno.EINVAL, "a refused bind leaves the node unbound"
        io.bind_ioasid_fd(b.fd, fd1)
        assert b.info().num_regions >= 8
    finally:
        a.close()
        b.close()
        fd1.close()
        fd2.close()


# ---------------------------------------------------------------------------
# The device's own ioctls
# ---------------------------------------------------------------------------


def test_region_info_never_advertises_mmap(node):
    with io.IoasidFd() as fd:
        io.bind_ioasid_fd(node.fd, fd)
        info = node.info()
        assert info.flags & vfio.VFIO_DEVICE_FLAGS_PCI
        seen_bar0 = False
        for index in range(info.num_regions):
            try:
                raw = region_info_raw(node.fd, index, 4096)
            except OSError as e:
                assert e.errno == errno.EINVAL, f"region {index}"  # e.g. no VGA
                continue
            flags, size = struct.unpack_from("=I", raw, 4)[0], struct.unpack_from("=Q", raw, 16)[0]
            assert flags & vfio.VFIO_REGION_INFO_FLAG_MMAP == 0, f"region {index} flags {flags:#x}"
            ids = cap_ids(raw)
            assert VFIO_REGION_INFO_CAP_SPARSE_MMAP not in ids, f"region {index}: {ids}"
            assert VFIO_REGION_INFO_CAP_MSIX_MAPPABLE not in ids, f"region {index}: {ids}"
            if index == vfio.VFIO_PCI_BAR0_REGION_INDEX:
                seen_bar0 = True
                # The edu's BAR0: 1 MiB of MMIO, readable and writable.
                assert size == 1 << 20
                rw = vfio.VFIO_REGION_INFO_FLAG_READ | vfio.VFIO_REGION_INFO_FLAG_WRITE
                assert flags & rw == rw
        assert seen_bar0
        # The minimum argsz works too, and a smaller one is refused.
        raw = region_info_raw(node.fd, vfio.VFIO_PCI_CONFIG_REGION_INDEX, 32)
        assert struct.unpack_from("=Q", raw, 24)[0] == vfio.VFIO_PCI_CONFIG_REGION_INDEX << 40
        assert errno_of(region_info_raw, node.fd, 0, 31) == errno.EINVAL


def test_irq_info_and_an_msi_through_an_eventfd(nodes):
    c = Client(nodes[ALONE_1])
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        irq = bytearray(16)
        struct.pack_into("=IIII", irq, 0, 16, 0, VFIO_PCI_MSI_IRQ_INDEX, 0)
        io.fcntl.ioctl(c.dev.fd, vfio.VFIO_DEVICE_GET_IRQ_INFO, irq)
        flags, count = struct.unpack_from("=I", irq, 4)[0], struct.unpack_from("=I", irq, 12)[0]
        assert flags & VFIO_IRQ_INFO_EVENTFD and count >= 1
        # MSI vector 0 -> our eventfd (the daemon passes its copy to VFIO).
        arg = struct.pack("=IIIIIi", 24, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                          VFIO_PCI_MSI_IRQ_INDEX, 0, 1, efd)
        io.fcntl.ioctl(c.dev.fd, vfio.VFIO_DEVICE_SET_IRQS, bytearray(arg))
        # A DMA that raises an interrupt when done.
        c.mem.write(0, b"\x5a" * 64)
        c.edu.wait_idle()
        c.edu.bar0.write32(REG_DMA_SRC, IOVA)
        c.edu.bar0.write32(REG_DMA_DST, BUFFER_ADDR)
        c.edu.bar0.write32(REG_DMA_COUNT, 64)
        c.edu.bar0.write32(REG_DMA_CMD, DMA_CMD_START | DMA_CMD_IRQ)
        c.edu.wait_idle()
        ready, _, _ = select.select([efd], [], [], 10.0)
        assert ready, "no MSI reached the eventfd within 10 s"
        assert os.eventfd_read(efd) >= 1
        status = c.edu.bar0.read32(REG_IRQ_STATUS)
        assert status & 0x100, f"edu irq status {status:#x}: no DMA interrupt"
        c.edu.bar0.write32(REG_IRQ_ACK, status)
        # A bad eventfd is EBADF; tearing down (DATA_NONE, count 0) works.
        bad = struct.pack("=IIIIIi", 24, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                          VFIO_PCI_MSI_IRQ_INDEX, 0, 1, 9999)
        assert errno_of(io.fcntl.ioctl, c.dev.fd, vfio.VFIO_DEVICE_SET_IRQS,
                        bytearray(bad)) == errno.EBADF
        off = struct.pack("=IIIII", 20, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                          VFIO_PCI_MSI_IRQ_INDEX, 0, 0)
        io.fcntl.ioctl(c.dev.fd, vfio.VFIO_DEVICE_SET_IRQS, bytearray(off))
        # VFIO_DEVICE_RESET reaches the device: vfio-pci answers EINVAL when
        # it has no reset method for it.
        if c.dev.info().flags & vfio.VFIO_DEVICE_FLAGS_RESET:
            c.dev.reset()
        else:
            assert errno_of(c.dev.reset) == errno.EINVAL
    finally:
        os.close(efd)
        c.close()


VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = (ord(";") << 8) | (100 + 12)
VFIO_DEVICE_PCI_HOT_RESET = (ord(";") << 8) | (100 + 13)


def hot_reset(fd: int, count: int = 0, flags: int = 0) -> None:
    io.fcntl.ioctl(fd, VFIO_DEVICE_PCI_HOT_RESET,
                   bytearray(struct.pack("=III", 12 + 4 * count, flags, count) + b"\0" * 4 * count))


def test_hot_reset_info_and_hot_reset_of_the_group_behind_the_bridge(nodes):
    """The two edu devices behind the bridge are reset together (a bus
    reset); the device alone on the root bus cannot be (ENODEV). The client
    passes no group fds: the daemon supplies its own, once every device the
    reset touches is bound to the caller's ioasid fd."""
    a = vfio.Device.open_node(nodes[SHARED_A])
    b = vfio.Device.open_node(nodes[SHARED_B])
    alone = vfio.Device.open_node(nodes[ALONE_1])
    fd = io.IoasidFd()
    try:
        io.bind_ioasid_fd(a.fd, fd)
        io.bind_ioasid_fd(alone.fd, fd)
        # No room for the devices: ENOSPC, with count written back.
        small = bytearray(struct.pack("=III", 12, 0, 0))
        assert errno_of(io.fcntl.ioctl, a.fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
                        small) == errno.ENOSPC
        count = struct.unpack_from("=I", small, 8)[0]
        assert count == 2, f"count {count}: both devices behind the bridge"
        # With room: both devices, in the same IOMMU group.
        big = bytearray(12 + 8 * count)
        struct.pack_into("=I", big, 0, len(big))
        io.fcntl.ioctl(a.fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, big)
        devs = [struct.unpack_from("=IHBB", big, 12 + 8 * i) for i in range(count)]
        assert {(bus, devfn) for _g, _seg, bus, devfn in devs} == {(1, 1 << 3), (1, 2 << 3)}
        assert len({g for g, _seg, _bus, _devfn in devs}) == 1
        assert errno_of(io.fcntl.ioctl, alone.fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
                        bytearray(struct.pack("=III", 12, 0, 0))) == errno.ENODEV
        assert errno_of(hot_reset, alone.fd) == errno.ENODEV
        # SHARED_B is not bound: the reset would hit a device we do not own.
        assert errno_of(hot_reset, a.fd) == errno.EPERM
        io.bind_ioasid_fd(b.fd, fd)
        # Group fds from the client are refused (it has none in this model).
        assert errno_of(hot_reset, a.fd, count=1) == errno.EINVAL
        assert errno_of(hot_reset, a.fd, flags=1) == errno.EINVAL
        # The kernel resets the bus (and restores both devices' config
        # space, so there is little to see but success).
        hot_reset(a.fd)
        # And both still work afterwards.
        assert Edu(a).alive() and Edu(b).alive()
    finally:
        a.close()
        b.close()
        alone.close()
        fd.close()


# ---------------------------------------------------------------------------
# DMA and region access
# ---------------------------------------------------------------------------


def test_bind_attach_map_and_an_edu_round_trip(nodes):
    c = Client(nodes[ALONE_1])
    try:
        assert c.edu.alive()
        c.round_trip()
        c.round_trip()
    finally:
        c.close()


def test_region_access_bounds(nodes):
    c = Client(nodes[ALONE_1])
    try:
        bar0 = c.dev.bar(0)
        end = bar0.offset + bar0.size
        assert len(os.pread(c.dev.fd, 4, end - 4)) == 4
        assert errno_of(os.pread, c.dev.fd, 8, end - 4) == errno.EINVAL
        assert errno_of(os.pwrite, c.dev.fd, b"\0" * 8, end - 4) == errno.EINVAL
        assert errno_of(os.pread, c.dev.fd, 4, end) == errno.EINVAL
        # BAR5 does not exist on the edu (size 0); nothing lives at 2^63.
        assert errno_of(os.pread, c.dev.fd, 4, 5 << 40) == errno.EINVAL
        assert errno_of(os.pread, c.dev.fd, 4, 1 << 62) == errno.EINVAL
        # A plain read/write has no position.
        assert errno_of(os.read, c.dev.fd, 4) == errno.ESPIPE
        assert errno_of(os.write, c.dev.fd, b"\0") == errno.ESPIPE
        # A read bigger than CUSE's 128 KiB piece, split by the kernel: the
        # pieces land at their real offsets. The marker is the low word of
        # the edu's DMA source register (0x80): newer kernels read BAR0 in
        # 8-byte accesses, which the edu answers with all ones below 0x80
        # (its id register included), but at 0x80 both 4- and 8-byte reads
        # return the register.
        marker = 0x5A5A1234
        os.pwrite(c.dev.fd, struct.pack("<I", marker), bar0.offset + 0x80)
        big = os.pread(c.dev.fd, 256 << 10, bar0.offset)
        assert len(big) == 256 << 10
        assert struct.unpack_from("<I", big, 0x80)[0] == marker
        # The second piece was read at its own offset, not again at 0.
        second = (128 << 10) + 0x80
        alone = os.pread(c.dev.fd, 4, bar0.offset + second)
        assert big[second:second + 4] == alone != struct.pack("<I", marker)
        # preadv at the config space reads the vendor/device id.
        buf = bytearray(4)
        cfg = c.dev.config()
        assert os.preadv(c.dev.fd, [buf], cfg.offset) == 4
        assert struct.unpack("<HH", buf) == (0x1234, 0x11E8)
    finally:
        c.close()


def test_attach_to_a_freed_ioasid_is_enoent(nodes):
    c = Client(nodes[ALONE_1])
    try:
        spare = c.ioasid_fd.alloc()
        c.ioasid_fd.free(spare)
        assert errno_of(io.attach_ioasid, c.dev.fd, spare) == errno.ENOENT
        assert errno_of(io.attach_ioasid, c.dev.fd, c.gpa) == errno.EBUSY  # attached already
        io.attach_ioasid(c.dev.fd, c.gpa, pasid=5)  # recorded
        io.detach_ioasid(c.dev.fd, c.gpa, pasid=5)
        # Attach struct rules: unknown flag, short argsz.
        arg = io.vfio_attach_ioasid(argsz=16, flags=1 << 1, ioasid=c.gpa)
        assert errno_of(io.ioctl_struct, c.dev.fd, io.VFIO_ATTACH_IOASID, arg) == errno.EINVAL
        arg = io.vfio_attach_ioasid(ioasid=c.gpa)
        assert errno_of(io.ioctl_struct, c.dev.fd, io.VFIO_DETACH_IOASID, arg,
                        argsz=15) == errno.EINVAL
        assert errno_of(io.ioctl_struct, c.dev.fd, io.VFIO_DETACH_IOASID, arg,
                        tail=b"\0" * 7 + b"\1") == errno.E2BIG
        c.round_trip()
    finally:
        c.close()


# ---------------------------------------------------------------------------
# Teardown: close, ioasid fd closed, client killed
# ---------------------------------------------------------------------------


def test_close_and_reopen_gives_a_reusable_device(nodes):
    c = Client(nodes[ALONE_1])
    c.round_trip()
    c.close()
    c = Client(nodes[ALONE_1])
    try:
        c.round_trip()
    finally:
        c.close()


def test_closing_the_ioasid_fd_unbinds_the_device(nodes, node):
    fd = io.IoasidFd()
    io.bind_ioasid_fd(node.fd, fd)
    assert node.info().num_regions >= 8
    fd.close()
    # The daemon closed the device fd: the node is unbound again.
    deadline = time.monotonic() + 10
    while errno_of(node.info) != errno.EINVAL:
        assert time.monotonic() < deadline, "still bound after the ioasid fd was closed"
        time.sleep(0.1)
    with io.IoasidFd() as fd2:
        io.bind_ioasid_fd(node.fd, fd2)
        assert node.info().num_regions >= 8


def test_a_killed_client_leaves_the_device_reusable(nodes):
    path = nodes[ALONE_2]
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the client that dies mid-flow
        try:
            os.close(ready_r)
            c = Client(path)
            c.round_trip()
            os.write(ready_w, b"ok")
            time.sleep(600)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        got = b""
        r, _, _ = select.select([ready_r], [], [], 120)
        if r:
            got = os.read(ready_r, 2)
        assert got == b"ok", "the child client did not get to DMA"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    # The next client binds the same device (after the kernel's releases)
    # and finds it reset: bus mastering is off until it enables it.
    fd = io.IoasidFd()
    dev = vfio.Device.open_node(path)
    try:
        bind_with_retry(dev, fd)
        assert dev.config().command() & vfio.PCI_COMMAND_MASTER == 0, "device not reset"
    finally:
        dev.close()
        fd.close()
    c = Client(path)
    try:
        c.round_trip()
    finally:
        c.close()


def test_the_daemon_survived(daemon):
    assert daemon in daemon_pids()
    with io.IoasidFd() as fd:
        assert fd.check_extension(io.IOASID_EXT_TYPE1V2_DMA) == 1
