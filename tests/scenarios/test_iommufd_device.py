"""The VFIO device cdev /dev/vfio/devices/vfioN through the daemon, with
/dev/iommu: bind and its refusals, every ioctl before bind, attach to an
IOAS (the HWPT id written back) or to an allocated HWPT, objects in use,
reserved IOVA regions, GET_HW_INFO, the hot reset in its device-id form,
one device bound through either dialect but not both, and DMA proof: the
edu device copies bytes through mappings made every way the ABI offers
(fixed and allocated IOVA, MAP_FILE, COPY), compared in this process.

    cargo build --workspace --bins && scripts/vm --env CUSE_IOASID_IOMMUFD=1 -- \
        /usr/bin/python3 -m pytest tests/scenarios/test_iommufd_device.py -v

Until the front end is declared (tests/conftest.py, IOMMUFD_FRONT_END),
these run as strict expected failures that may only fail for want of the
nodes. Expected errnos: docs/iommufd-semantics.md.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from conftest import iommufd_module_marks
from cuse_ioasid import ioasid as rfc
from cuse_ioasid import iommufd as fd_abi
from cuse_ioasid import vfio
from harness.daemon import (ALONE_1, ALONE_2, LENGTH, SHARED_A, SHARED_B, daemon_pids,
                            errno_of)
from cuse_ioasid.edu import DMA_LIMIT, Edu
from cuse_ioasid.ioasid import ioctl_struct
from cuse_ioasid.iommufd import (ULONG_MAX, Iommufd, alloc_iova_model, attach_pt, bind_iommufd,
                             detach_pt, hot_reset, hot_reset_info)

PAGE = vfio.PAGE_SIZE
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)  # reserved by VT-d for interrupts

pytestmark = iommufd_module_marks()


@pytest.fixture
def iommu(iommufd_nodes):
    with Iommufd() as f:
        yield f


class Cdev:
    """An open vfioN node; `device` answers the VFIO device ioctls."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.device = vfio.Device(self.fd, owned=False)

    def fileno(self):
        return self.fd

    def edu(self) -> Edu:
        e = Edu(self.device)
        e.enable_bus_master()
        return e

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture
def cdevs(iommufd_nodes):
    """Opens vfioN nodes by BDF; closes them all at the end."""
    opened = []

    def open_(bdf):
        c = Cdev(iommufd_nodes[bdf])
        opened.append(c)
        return c

    yield open_
    for c in opened:
        c.close()


def rc(fd, request, obj, size=None, tail=b""):
    try:
        ioctl_struct(fd, request, obj, argsz=size, tail=tail)
    except OSError as e:
        return e.errno
    return 0


def attached(cdevs, iommu, bdf=ALONE_1):
    """`bdf`'s cdev bound to `iommu` and attached to a new IOAS: returns
    (cdev, device id, IOAS id, the automatic HWPT's id)."""
    c = cdevs(bdf)
    dev = bind_iommufd(c, iommu)
    ioas = iommu.ioas_alloc()
    return c, dev, ioas, attach_pt(c, ioas)


def round_trip(edu: Edu, mem: vfio.DmaBuffer, src_iova: int, dst_iova: int,
               src_off: int = 0, dst_off: int = PAGE) -> None:
    """The device copies random bytes from src_iova to dst_iova; the bytes
    are checked in this process's memory at the given offsets."""
    pattern = os.urandom(LENGTH)
    mem.write(src_off, pattern)
    mem.fill(0, dst_off, PAGE)
    edu.round_trip(src_iova, dst_iova, LENGTH)
    assert mem.read(dst_off, LENGTH) == pattern, "the DMA did not land"


# ---------------------------------------------------------------------------
# Before bind (vfio_main.c, vfio_device_fops_unl_ioctl)
# ---------------------------------------------------------------------------


def test_every_ioctl_and_region_access_before_bind_is_einval(cdevs):
    c = cdevs(ALONE_1)
    d = c.device
    assert errno_of(d.info) == errno.EINVAL
    assert errno_of(d.region_info, 0) == errno.EINVAL
    assert errno_of(d.reset) == errno.EINVAL
    assert errno_of(attach_pt, c, 1) == errno.EINVAL
    assert errno_of(detach_pt, c) == errno.EINVAL
    assert errno_of(hot_reset_info, c) == errno.EINVAL
    assert errno_of(hot_reset, c) == errno.EINVAL
    # Even commands no VFIO device knows: EINVAL, not ENOTTY, before bind.
    for unknown in (fd_abi._io(ord(";"), 0x30), fd_abi._io(ord("X"), 1), fd_abi.IOMMU_DESTROY):
        assert errno_of(rfc.ioctl_int, c, unknown, 0) == errno.EINVAL, hex(unknown)
    assert errno_of(os.pread, c.fd, 4, 0) == errno.EINVAL
    assert errno_of(os.pwrite, c.fd, b"\0" * 4, 0) == errno.EINVAL


# ---------------------------------------------------------------------------
# VFIO_DEVICE_BIND_IOMMUFD (device_cdev.c, vfio_df_ioctl_bind_iommufd)
# ---------------------------------------------------------------------------


def test_bind_refusals_in_the_kernel_order(cdevs, iommu):
    c = cdevs(ALONE_1)
    a = fd_abi
    bind = a._new(a.vfio_device_bind_iommufd, iommufd=iommu.fd)
    assert rc(c, a.VFIO_DEVICE_BIND_IOMMUFD, bind, size=15) == errno.EINVAL
    assert rc(c, a.VFIO_DEVICE_BIND_IOMMUFD, bind, tail=b"\x01") == errno.E2BIG
    assert errno_of(bind_iommufd, c, iommu, flags=2) == errno.EINVAL
    assert errno_of(bind_iommufd, c, -1) == errno.EINVAL
    closed = os.dup(iommu.fd)
    os.close(closed)
    assert errno_of(bind_iommufd, c, closed) == errno.EBADF
    with open("/dev/null", "rb") as null:
        assert errno_of(bind_iommufd, c, null.fileno()) == errno.EBADFD
    with rfc.IoasidFd() as other_dialect:
        assert errno_of(bind_iommufd, c, other_dialect) == errno.EBADFD
    other = cdevs(ALONE_2)
    assert errno_of(bind_iommufd, c, other) == errno.EBADFD, "a vfioN node is no iommufd"
    # The token (SR-IOV VF token) is checked before the iommufd is looked
    # up; the edu is neither PF nor VF (vfio_pci_core_match_token_uuid).
    uuid = ctypes.create_string_buffer(16)
    assert errno_of(bind_iommufd, c, closed, flags=a.VFIO_DEVICE_BIND_FLAG_TOKEN,
                    token_uuid_ptr=ctypes.addressof(uuid)) == errno.EINVAL
    assert errno_of(bind_iommufd, c, iommu, flags=a.VFIO_DEVICE_BIND_FLAG_TOKEN,
                    token_uuid_ptr=8) == errno.EFAULT
    # Still unbound after all that; a zero tail is accepted.
    assert errno_of(c.device.info) == errno.EINVAL
    assert rc(c, a.VFIO_DEVICE_BIND_IOMMUFD, bind, tail=bytes(8)) == 0
    assert c.device.info().num_regions >= 8


def test_one_bind_per_device(cdevs, iommu):
    c = cdevs(ALONE_1)
    bind_iommufd(c, iommu)
    assert errno_of(bind_iommufd, c, iommu) == errno.EINVAL, "bound twice"
    with Iommufd() as other:
        assert errno_of(bind_iommufd, c, other) == errno.EINVAL
        second = cdevs(ALONE_1)
        # The cdev path opens a device once (vfio_df_open: open_count).
        assert errno_of(bind_iommufd, second, other) == errno.EINVAL
        assert errno_of(second.device.info) == errno.EINVAL
    c.close()
    # Closing the bound file unbinds: a new one binds at once (the release
    # is synchronous, as the kernel's is).
    assert bind_iommufd(cdevs(ALONE_1), iommu) > 0


def test_devid_is_an_object_id_busy_while_bound(cdevs, iommu):
    assert iommu.ioas_alloc() == 1
    c = cdevs(ALONE_1)
    assert bind_iommufd(c, iommu) == 2
    assert errno_of(iommu.destroy, 2) == errno.EBUSY, "the device holds its object"
    assert iommu.ioas_alloc() == 3
    c.close()
    assert errno_of(iommu.destroy, 2) == errno.ENOENT, "unbound with the close"
    assert iommu.ioas_alloc() == 2, "its id is free again"


# ---------------------------------------------------------------------------
# The extensible-struct rules of the cdev commands (VFIO's argsz/minsz)
# ---------------------------------------------------------------------------


def test_cdev_length_rules(cdevs, iommu):
    a = fd_abi
    c = cdevs(SHARED_A)
    assert rc(c, a.VFIO_DEVICE_BIND_IOMMUFD,
              a.vfio_device_bind_iommufd(iommufd=iommu.fd), size=15) == errno.EINVAL
    bind_iommufd(c, iommu)
    ioas = iommu.ioas_alloc()
    att = a.vfio_device_attach_iommufd_pt(pt_id=ioas)
    det = a.vfio_device_detach_iommufd_pt()
    # Below the minimum: EINVAL. At the minimum, exact, or longer with
    # anything at all past the struct: accepted (VFIO ignores the rest).
    assert rc(c, a.VFIO_DEVICE_ATTACH_IOMMUFD_PT, att, size=11) == errno.EINVAL
    assert rc(c, a.VFIO_DEVICE_DETACH_IOMMUFD_PT, det, size=7) == errno.EINVAL
    for size, tail in ((12, b""), (None, b""), (None, b"\xff" * 8)):
        assert rc(c, a.VFIO_DEVICE_ATTACH_IOMMUFD_PT, att, size=size, tail=tail) == 0
    for size, tail in ((8, b""), (None, b""), (None, b"\xff" * 8)):
        assert rc(c, a.VFIO_DEVICE_DETACH_IOMMUFD_PT, det, size=size, tail=tail) == 0
    hdr = a.vfio_pci_hot_reset_info()
    assert rc(c, a.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hdr, size=11) == errno.EINVAL
    assert rc(c, a.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hdr) == errno.ENOSPC
    assert rc(c, a.VFIO_DEVICE_PCI_HOT_RESET, a.vfio_pci_hot_reset(), size=11) == errno.EINVAL
    info = vfio.vfio_device_info()
    assert rc(c, vfio.VFIO_DEVICE_GET_INFO, info, size=15) == errno.EINVAL
    assert rc(c, vfio.VFIO_DEVICE_GET_INFO, info, tail=b"\xff" * 8) == 0


def test_unknown_ioctl_after_bind_is_enotty(cdevs, iommu):
    c = cdevs(ALONE_1)
    bind_iommufd(c, iommu)
    assert errno_of(rfc.ioctl_int, c, fd_abi._io(ord(";"), 0x30), 0) == errno.ENOTTY
    assert errno_of(rfc.ioctl_int, c, rfc.VFIO_BIND_IOASID_FD, iommu.fd) == errno.ENOTTY, (
        "the RFC's bind is not a command of the vfioN node")


# ---------------------------------------------------------------------------
# Attach, HWPTs, objects in use (device.c, hw_pagetable.c, main.c)
# ---------------------------------------------------------------------------


def test_attach_to_an_ioas_writes_back_one_auto_hwpt_for_both_devices(cdevs, iommu):
    c1, c2 = cdevs(ALONE_1), cdevs(ALONE_2)
    assert bind_iommufd(c1, iommu) == 1
    assert bind_iommufd(c2, iommu) == 2
    ioas = iommu.ioas_alloc()
    assert ioas == 3
    hwpt = attach_pt(c1, ioas)
    assert hwpt == 4, "the auto domain's id, not the IOAS's"
    assert attach_pt(c2, ioas) == hwpt, "a compatible auto domain is shared"
    for busy in (ioas, hwpt, 1, 2):
        assert errno_of(iommu.destroy, busy) == errno.EBUSY, busy
    detach_pt(c1)
    assert errno_of(iommu.destroy, hwpt) == errno.EBUSY, "c2 is still attached"
    detach_pt(c2)
    assert errno_of(iommu.destroy, hwpt) == errno.ENOENT, "an auto domain goes with its last device"
    iommu.destroy(ioas)
    detach_pt(c2)  # detaching a detached device is not an error


def test_hwpt_alloc_then_attach(cdevs, iommu):
    c = cdevs(ALONE_1)
    dev = bind_iommufd(c, iommu)
    ioas = iommu.ioas_alloc()
    hwpt = iommu.hwpt_alloc(dev, ioas)
    assert (dev, ioas, hwpt) == (1, 2, 3)
    assert errno_of(iommu.destroy, ioas) == errno.EBUSY, "a HWPT uses the IOAS"
    assert attach_pt(c, hwpt) == hwpt
    assert attach_pt(c, hwpt) == hwpt, "attaching again to the same HWPT"
    assert errno_of(iommu.destroy, hwpt) == errno.EBUSY
    # Attach given the IOAS never picks a HWPT the user allocated.
    auto = attach_pt(c, ioas)
    assert auto == 4
    assert attach_pt(c, hwpt) == hwpt, "replace: back to the manual HWPT"
    assert errno_of(iommu.destroy, auto) == errno.ENOENT, "the replaced auto domain is gone"
    detach_pt(c)
    assert errno_of(iommu.destroy, ioas) == errno.EBUSY, "the manual HWPT lives on"
    iommu.destroy(hwpt)
    iommu.destroy(ioas)


def test_replace_between_two_ioas(cdevs, iommu):
    c = cdevs(ALONE_1)
    bind_iommufd(c, iommu)
    a, b = iommu.ioas_alloc(), iommu.ioas_alloc()
    ha = attach_pt(c, a)
    hb = attach_pt(c, b)
    assert hb != ha
    assert errno_of(iommu.destroy, ha) == errno.ENOENT
    iommu.destroy(a)
    assert errno_of(iommu.destroy, b) == errno.EBUSY


def test_hwpt_alloc_refusals(cdevs, iommu):
    a = fd_abi
    c = cdevs(ALONE_1)
    dev = bind_iommufd(c, iommu)
    ioas = iommu.ioas_alloc()
    hwpt = iommu.hwpt_alloc(dev, ioas)
    vtd = bytes(a.iommu_hwpt_vtd_s1(addr_width=48))
    assert rc(iommu, a.IOMMU_HWPT_ALLOC,
              a.iommu_hwpt_alloc(dev_id=dev, pt_id=ioas, reserved=1)) == errno.EOPNOTSUPP
    assert rc(iommu, a.IOMMU_HWPT_ALLOC,
              a.iommu_hwpt_alloc(dev_id=dev, pt_id=ioas, data_len=8)) == errno.EINVAL
    assert rc(iommu, a.IOMMU_HWPT_ALLOC,
              a.iommu_hwpt_alloc(dev_id=dev, pt_id=ioas,
                                 data_type=a.IOMMU_HWPT_DATA_VTD_S1)) == errno.EINVAL
    assert errno_of(iommu.hwpt_alloc, 99, ioas) == errno.ENOENT
    assert errno_of(iommu.hwpt_alloc, ioas, ioas) == errno.ENOENT, "an IOAS as dev_id"
    assert errno_of(iommu.hwpt_alloc, hwpt, ioas) == errno.ENOENT, "a HWPT as dev_id"
    assert errno_of(iommu.hwpt_alloc, dev, 99) == errno.EINVAL, "unknown pt_id: EINVAL"
    assert errno_of(iommu.hwpt_alloc, dev, dev) == errno.EINVAL, "a device as pt_id"
    for flag in (a.IOMMU_HWPT_ALLOC_NEST_PARENT, a.IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
                 a.IOMMU_HWPT_FAULT_ID_VALID, a.IOMMU_HWPT_ALLOC_PASID, 1 << 4):
        assert errno_of(iommu.hwpt_alloc, dev, ioas, flags=flag) == errno.EOPNOTSUPP, flag
    assert errno_of(iommu.hwpt_alloc, dev, ioas, data_type=a.IOMMU_HWPT_DATA_VTD_S1,
                    data=vtd) == errno.EOPNOTSUPP, "driver data for a paging HWPT"
    # A HWPT as the parent asks for a nested HWPT: not on legacy VFIO.
    assert errno_of(iommu.hwpt_alloc, dev, hwpt) == errno.EOPNOTSUPP
    assert errno_of(iommu.hwpt_alloc, dev, hwpt, data_type=a.IOMMU_HWPT_DATA_VTD_S1,
                    data=vtd) == errno.EOPNOTSUPP
    # None of it took an id.
    assert iommu.ioas_alloc() == 4


def test_a_hwpt_id_where_an_ioas_is_expected_and_back(cdevs, iommu):
    a = fd_abi
    c, dev, ioas, hwpt = attached(cdevs, iommu)
    with vfio.DmaBuffer(PAGE) as mem:
        assert errno_of(iommu.map, hwpt, mem.addr, PAGE, iova=0x100000) == errno.ENOENT
        assert errno_of(iommu.map_file, hwpt, mem.memfd, 0, PAGE) == errno.ENOENT
    assert errno_of(iommu.iova_ranges_raw, hwpt, 0) == errno.ENOENT
    assert errno_of(iommu.allow_iovas, hwpt, []) == errno.ENOENT
    assert errno_of(iommu.unmap_all, hwpt) == errno.ENOENT
    assert errno_of(iommu.copy, ioas, hwpt, 0, PAGE) == errno.ENOENT, "a HWPT as source"
    assert errno_of(iommu.option, a.IOMMU_OPTION_HUGE_PAGES, a.IOMMU_OPTION_OP_GET,
                    object_id=hwpt) == errno.ENOENT
    assert errno_of(iommu.vfio_ioas, a.IOMMU_VFIO_IOAS_SET, hwpt) == errno.ENOENT
    assert errno_of(iommu.vfio_ioas, a.IOMMU_VFIO_IOAS_SET, dev) == errno.ENOENT
    assert errno_of(iommu.get_hw_info, hwpt) == errno.ENOENT
    assert rc(iommu, a.IOMMU_HWPT_SET_DIRTY_TRACKING,
              a.iommu_hwpt_set_dirty_tracking(hwpt_id=ioas)) == errno.ENOENT
    # Attach: an unknown id is ENOENT, a device id the wrong kind: EINVAL.
    assert errno_of(attach_pt, c, 99) == errno.ENOENT
    assert errno_of(attach_pt, c, dev) == errno.EINVAL
    assert errno_of(attach_pt, c, ULONG_MAX & 0xFFFFFFFF) == errno.ENOENT
    assert attach_pt(c, ioas) == hwpt, "nothing changed"


def test_attach_flags_and_pasid(cdevs, iommu):
    a = fd_abi
    c = cdevs(ALONE_1)
    bind_iommufd(c, iommu)
    ioas = iommu.ioas_alloc()
    att = a.vfio_device_attach_iommufd_pt(flags=1 << 1, pt_id=ioas)
    assert rc(c, a.VFIO_DEVICE_ATTACH_IOMMUFD_PT, att) == errno.EINVAL, "unknown flag"
    det = a.vfio_device_detach_iommufd_pt(flags=1 << 1)
    assert rc(c, a.VFIO_DEVICE_DETACH_IOMMUFD_PT, det) == errno.EINVAL, "unknown flag"
    att = a.vfio_device_attach_iommufd_pt(flags=a.VFIO_DEVICE_ATTACH_PASID, pt_id=ioas, pasid=1)
    assert rc(c, a.VFIO_DEVICE_ATTACH_IOMMUFD_PT, att, size=12) == errno.EINVAL, "no room for pasid"
    # No HWPT here is PASID-capable (IOMMU_HWPT_ALLOC_PASID is refused), so
    # a PASID attach fails as the kernel's does for such a domain.
    assert errno_of(attach_pt, c, ioas, pasid=1) == errno.EINVAL
    detach_pt(c, pasid=1)  # nothing attached there: not an error
    assert iommu.ioas_alloc() == ioas + 1, "no HWPT was left behind"


# ---------------------------------------------------------------------------
# Reserved regions, IOVA alignment, allowed IOVAs once a device is attached
# ---------------------------------------------------------------------------


def test_reserved_regions_and_alignment_follow_the_attached_device(cdevs, iommu):
    c = cdevs(ALONE_1)
    bind_iommufd(c, iommu)
    ioas = iommu.ioas_alloc()
    with vfio.DmaBuffer(4 * PAGE) as mem:
        iommu.map(ioas, mem.addr, PAGE, iova=MSI_WINDOW[0])
        assert errno_of(attach_pt, c, ioas) == errno.EADDRINUSE, "a mapping in the MSI window"
        iommu.unmap_all(ioas)
        iommu.map(ioas, mem.addr + 16, 100, iova=0x300010)
        assert errno_of(attach_pt, c, ioas) == errno.EADDRINUSE, "a part-page mapping"
        iommu.unmap_all(ioas)
        iommu.allow_iovas(ioas, [(0xFE000000, 0xFFFFFFFF)])
        assert errno_of(attach_pt, c, ioas) == errno.EADDRINUSE, "allowed over the MSI window"
        iommu.allow_iovas(ioas, [])
        hwpt = attach_pt(c, ioas)
        ranges, alignment = iommu.iova_ranges(ioas)
        assert alignment == PAGE
        assert ranges[0][0] == 0
        assert all(last < MSI_WINDOW[0] or start > MSI_WINDOW[1] for start, last in ranges)
        assert any(last == MSI_WINDOW[0] - 1 for _, last in ranges)
        assert errno_of(iommu.map, ioas, mem.addr, PAGE, iova=MSI_WINDOW[0]) == errno.EINVAL
        assert errno_of(iommu.map, ioas, mem.addr + 16, 100, iova=0x300010) == errno.EINVAL
        assert errno_of(iommu.allow_iovas, ioas, [(0xFE000000, 0xFFFFFFFF)]) == errno.EADDRINUSE
        detach_pt(c)
        assert errno_of(iommu.destroy, hwpt) == errno.ENOENT
        assert iommu.iova_ranges(ioas) == ([(0, ULONG_MAX)], 1), "back to no page table"


# ---------------------------------------------------------------------------
# GET_HW_INFO (device.c, iommufd_get_hw_info)
# ---------------------------------------------------------------------------


def test_get_hw_info_reports_no_driver_data(cdevs, iommu):
    a = fd_abi
    c = cdevs(ALONE_1)
    dev = bind_iommufd(c, iommu)
    info, data = iommu.get_hw_info(dev, data_len=32)
    assert info.out_data_type == a.IOMMU_HW_INFO_TYPE_NONE
    assert info.data_len == 0, "no driver data"
    assert data == bytes(32), "the caller's buffer is zeroed past the data"
    assert info.out_max_pasid_log2 == 0
    # The edu has no ATS capability; nothing else is offered.
    assert info.out_capabilities == a.IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED
    info, _ = iommu.get_hw_info(dev, flags=a.IOMMU_HW_INFO_FLAG_INPUT_TYPE,
                                in_data_type=a.IOMMU_HW_INFO_TYPE_INTEL_VTD)
    assert info.out_data_type == a.IOMMU_HW_INFO_TYPE_NONE
    assert errno_of(iommu.get_hw_info, dev, flags=2) == errno.EOPNOTSUPP
    cmd = a._new(a.iommu_hw_info, dev_id=dev)
    cmd.reserved[1] = 1
    assert rc(iommu, a.IOMMU_GET_HW_INFO, cmd) == errno.EOPNOTSUPP
    cmd = a._new(a.iommu_hw_info, dev_id=dev, data_len=16, data_uptr=8)
    assert rc(iommu, a.IOMMU_GET_HW_INFO, cmd) == errno.EFAULT
    assert errno_of(iommu.get_hw_info, 99) == errno.ENOENT


# ---------------------------------------------------------------------------
# Dirty tracking, invalidation, vIOMMU on a real HWPT: refused as a kernel
# whose IOMMU driver lacks them
# ---------------------------------------------------------------------------


def test_dirty_tracking_invalidate_and_viommu_on_a_paging_hwpt(cdevs, iommu):
    a = fd_abi
    c, dev, ioas, hwpt = attached(cdevs, iommu)
    with vfio.DmaBuffer(2 * PAGE) as mem:
        iommu.map(ioas, mem.addr, 2 * PAGE, iova=0x200000)
        sdt = a.iommu_hwpt_set_dirty_tracking(hwpt_id=hwpt,
                                              flags=a.IOMMU_HWPT_DIRTY_TRACKING_ENABLE)
        assert rc(iommu, a.IOMMU_HWPT_SET_DIRTY_TRACKING, sdt) == errno.EOPNOTSUPP
        sdt.flags = 2
        assert rc(iommu, a.IOMMU_HWPT_SET_DIRTY_TRACKING, sdt) == errno.EOPNOTSUPP
        bitmap = ctypes.create_string_buffer(8)
        gdb = a.iommu_hwpt_get_dirty_bitmap(hwpt_id=hwpt, iova=0x200000, length=2 * PAGE,
                                            page_size=PAGE, data=ctypes.addressof(bitmap))
        assert rc(iommu, a.IOMMU_HWPT_GET_DIRTY_BITMAP, gdb) == errno.EOPNOTSUPP
        gdb.iova = 0x400000
        assert rc(iommu, a.IOMMU_HWPT_GET_DIRTY_BITMAP, gdb) == errno.EINVAL, "not mapped"
    inv = a.iommu_hwpt_invalidate(hwpt_id=hwpt)
    assert rc(iommu, a.IOMMU_HWPT_INVALIDATE, inv) == errno.EINVAL, "a paging HWPT"
    via = a.iommu_viommu_alloc(type=a.IOMMU_VIOMMU_TYPE_ARM_SMMUV3, dev_id=dev, hwpt_id=hwpt)
    assert rc(iommu, a.IOMMU_VIOMMU_ALLOC, via) == errno.EOPNOTSUPP


# ---------------------------------------------------------------------------
# One device, two dialects; the IOMMU group
# ---------------------------------------------------------------------------


def test_a_device_bound_through_one_dialect_is_busy_for_the_other(cdevs, nodes, iommu):
    c = cdevs(ALONE_1)
    rfc_node = vfio.Device.open_node(nodes[ALONE_1])
    ioasid_fd = rfc.IoasidFd()
    try:
        bind_iommufd(c, iommu)
        assert errno_of(rfc.bind_ioasid_fd, rfc_node.fd, ioasid_fd) == errno.EBUSY
        c.close()
        rfc.bind_ioasid_fd(rfc_node.fd, ioasid_fd)
        c2 = cdevs(ALONE_1)
        assert errno_of(bind_iommufd, c2, iommu) == errno.EBUSY
        assert errno_of(c2.device.info) == errno.EINVAL
        rfc.unbind_ioasid_fd(rfc_node.fd, ioasid_fd)
        assert bind_iommufd(c2, iommu) > 0
    finally:
        rfc_node.close()
        ioasid_fd.close()


def test_the_devices_of_a_group_belong_to_one_iommufd(cdevs, nodes, iommu):
    a, b = cdevs(SHARED_A), cdevs(SHARED_B)
    bind_iommufd(a, iommu)
    with Iommufd() as other:
        assert errno_of(bind_iommufd, b, other) == errno.EBUSY
    rfc_b = vfio.Device.open_node(nodes[SHARED_B])
    try:
        with rfc.IoasidFd() as ioasid_fd:
            assert errno_of(rfc.bind_ioasid_fd, rfc_b.fd, ioasid_fd) == errno.EBUSY
    finally:
        rfc_b.close()
    assert bind_iommufd(b, iommu) > 0


# ---------------------------------------------------------------------------
# Hot reset in the device-id form (vfio_pci_core.c)
# ---------------------------------------------------------------------------


def test_hot_reset_info_with_device_ids_and_a_reset_with_no_groups(cdevs, iommu):
    a = fd_abi
    ca, cb = cdevs(SHARED_A), cdevs(SHARED_B)
    dev_a = bind_iommufd(ca, iommu)
    flags, devs = hot_reset_info(ca)
    assert flags == a.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | a.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
    # SHARED_B is not bound, but its group is owned through SHARED_A.
    assert sorted(devs) == sorted([(dev_a, 0, 1, 1 << 3), (a.VFIO_PCI_DEVID_OWNED, 0, 1, 2 << 3)])
    hot_reset(ca)
    dev_b = bind_iommufd(cb, iommu)
    flags, devs = hot_reset_info(cb)
    assert flags == a.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | a.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
    assert sorted(devs) == sorted([(dev_a, 0, 1, 1 << 3), (dev_b, 0, 1, 2 << 3)])
    assert errno_of(hot_reset, ca, group_fds=(ca.fd,)) == errno.EINVAL, "groups: not for a cdev"
    assert errno_of(hot_reset, ca, flags=1) == errno.EINVAL
    hot_reset(cb)
    assert ca.edu().alive() and cb.edu().alive()
    alone = cdevs(ALONE_1)
    bind_iommufd(alone, iommu)
    assert errno_of(hot_reset_info, alone) == errno.ENODEV, "on the root bus: no bus reset"
    assert errno_of(hot_reset, alone) == errno.ENODEV


# ---------------------------------------------------------------------------
# DMA through the IOMMU
# ---------------------------------------------------------------------------


def test_dma_in_qemus_order_with_a_fixed_iova(cdevs):
    """QEMU 10's sequence: bind, GET_HW_INFO, IOAS_ALLOC, HWPT_ALLOC,
    attach, IOVA_RANGES, MAP with FIXED_IOVA."""
    c = cdevs(ALONE_1)
    with Iommufd() as iommu, vfio.DmaBuffer(2 * PAGE) as mem:
        dev = bind_iommufd(c, iommu)
        iommu.get_hw_info(dev)
        ioas = iommu.ioas_alloc()
        hwpt = iommu.hwpt_alloc(dev, ioas)
        assert attach_pt(c, hwpt) == hwpt
        iommu.iova_ranges(ioas)
        iommu.map(ioas, mem.addr, PAGE, iova=0x200000)
        iommu.map(ioas, mem.page(1), PAGE, iova=0x201000)
        edu = c.edu()
        round_trip(edu, mem, 0x200000, 0x201000)
        # After the unmap the device's write is blocked: the page keeps
        # what this process put there.
        assert iommu.unmap(ioas, 0x201000, PAGE) == PAGE
        mem.fill(0x5A, PAGE, PAGE)
        edu.to_device(0x200000, LENGTH)
        edu.to_memory(0x201000, LENGTH)
        assert mem.read(PAGE, LENGTH) == b"\x5a" * LENGTH


def test_dma_with_an_allocated_iova(cdevs, iommu):
    c, _, ioas, _ = attached(cdevs, iommu)
    holes, alignment = iommu.iova_ranges(ioas)
    with vfio.DmaBuffer(4 * PAGE) as mem:
        iova = iommu.map(ioas, mem.addr, 4 * PAGE)
        assert iova == alloc_iova_model(holes, [], mem.addr, 4 * PAGE, iopt_alignment=alignment)
        assert 0 < iova and iova + 4 * PAGE <= DMA_LIMIT
        round_trip(c.edu(), mem, iova, iova + PAGE)


def test_dma_through_map_file(cdevs, iommu):
    c, _, ioas, _ = attached(cdevs, iommu)
    with vfio.DmaBuffer(4 * PAGE) as mem:
        # File pages 2 and 3 at IOVA 0x400000: the device sees mem's pages 2, 3.
        assert iommu.map_file(ioas, mem.memfd, 2 * PAGE, 2 * PAGE, iova=0x400000) == 0x400000
        round_trip(c.edu(), mem, 0x400000, 0x401000, src_off=2 * PAGE, dst_off=3 * PAGE)
        # Past the end of the file, and a file that is no memfd: EINVAL once
        # a page table exists (memfd_pin_folios).
        assert errno_of(iommu.map_file, ioas, mem.memfd, 2 * PAGE, 4 * PAGE,
                        iova=0x600000) == errno.EINVAL
        r, w = os.pipe()
        try:
            assert errno_of(iommu.map_file, ioas, r, 0, PAGE, iova=0x600000) == errno.EINVAL
        finally:
            os.close(r)
            os.close(w)


def test_dma_through_a_copy(cdevs, iommu):
    c = cdevs(ALONE_1)
    bind_iommufd(c, iommu)
    src, dst = iommu.ioas_alloc(), iommu.ioas_alloc()
    attach_pt(c, dst)
    with vfio.DmaBuffer(2 * PAGE) as mem:
        iommu.map(src, mem.addr, 2 * PAGE, iova=0x100000)
        assert iommu.copy(dst, src, 0x100000, 2 * PAGE, dst_iova=0x800000) == 0x800000
        iommu.unmap_all(src)  # the copy holds the pages on its own
        round_trip(c.edu(), mem, 0x800000, 0x801000)


def test_dma_through_private_memory_mapped_before_and_after_attach(cdevs, iommu):
    """Issue 14 through iommufd: anonymous MAP_PRIVATE memory of this
    process, mapped into an IOAS before a device is attached (the attach
    has this thread pin it into the device's domain) and after (the map
    does); the device copies between the two. A COPY of private memory is
    EINVAL (the daemon cannot share pages this thread pinned)."""
    c = cdevs(ALONE_1)
    bind_iommufd(c, iommu)
    ioas, other = iommu.ioas_alloc(), iommu.ioas_alloc()
    private = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(private))
    iommu.map(ioas, addr, PAGE, iova=0x300000)
    attach_pt(c, ioas)
    iommu.map(ioas, addr + PAGE, PAGE, iova=0x301000)
    pattern = os.urandom(LENGTH)
    private[:LENGTH] = pattern
    private[PAGE:2 * PAGE] = bytes(PAGE)
    c.edu().round_trip(0x300000, 0x301000, LENGTH)
    assert private[PAGE:PAGE + LENGTH] == pattern, "the DMA did not land in the private page"
    assert errno_of(iommu.copy, other, ioas, 0x300000, PAGE, dst_iova=0x900000) == errno.EINVAL
    assert iommu.unmap_all(ioas) == 2 * PAGE


def test_closing_dev_iommu_with_a_device_bound_keeps_everything(cdevs):
    """The bound device holds the iommufd (device_cdev.c takes a reference
    on the file): the IOAS, its mappings and the attachment outlive the
    client's /dev/iommu fd until the device is closed."""
    c = cdevs(ALONE_1)
    iommu = Iommufd()
    with vfio.DmaBuffer(2 * PAGE) as mem:
        bind_iommufd(c, iommu)
        ioas = iommu.ioas_alloc()
        attach_pt(c, ioas)
        iommu.map(ioas, mem.addr, 2 * PAGE, iova=0x200000)
        iommu.close()
        round_trip(c.edu(), mem, 0x200000, 0x201000)
        c.close()
    with Iommufd() as fresh:
        assert bind_iommufd(cdevs(ALONE_1), fresh) == 1


def test_daemon_survived_everything(daemon, iommufd_nodes):
    assert daemon_pids() == [daemon]
    with Iommufd() as f:
        c = Cdev(iommufd_nodes[ALONE_1])
        try:
            assert bind_iommufd(c, f) == 1
            assert attach_pt(c, f.ioas_alloc()) == 3
        finally:
            c.close()
