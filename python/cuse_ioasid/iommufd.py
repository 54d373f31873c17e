"""Python client of the upstream iommufd ABI: `/dev/iommu` (Linux
<linux/iommufd.h>) and the VFIO device cdev `/dev/vfio/devices/vfioN`
(the iommufd part of <linux/vfio.h>).

The layouts follow Linux 7.1, the header `iommufd-bindings` 0.2.0 was
generated from (docs/iommufd-semantics.md says why that version);
`tests/host/test_iommufd_abi.py` compiles every struct and constant below
against a Debian `linux-libc-dev` header and compares sizes, offsets and
values. Names are the C names; a field `__reserved` is spelled `reserved`.

    with Iommufd() as iommu:
        dev = open_cdev(bdf)
        dev_id = bind_iommufd(dev, iommu)
        ioas = iommu.ioas_alloc()
        hwpt = attach_pt(dev, ioas)          # the auto domain's id comes back
        iova = iommu.map(ioas, buf.addr, buf.size)   # IOVA chosen by the IOAS

Every failing call raises ``OSError`` carrying the errno (``e.errno``).
Standard library only (ctypes, fcntl), so it runs inside the test VM.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from .ioasid import NodeFile, _fileno, _io, ioctl_struct

# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------

IOMMUFD_TYPE = ord(";")

IOMMUFD_CMD_BASE = 0x80
IOMMUFD_CMD_DESTROY = 0x80
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8B
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8C
IOMMUFD_CMD_HWPT_INVALIDATE = 0x8D
IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8E
IOMMUFD_CMD_IOAS_MAP_FILE = 0x8F
IOMMUFD_CMD_VIOMMU_ALLOC = 0x90
IOMMUFD_CMD_VDEVICE_ALLOC = 0x91
IOMMUFD_CMD_IOAS_CHANGE_PROCESS = 0x92
IOMMUFD_CMD_VEVENTQ_ALLOC = 0x93
IOMMUFD_CMD_HW_QUEUE_ALLOC = 0x94

IOMMU_DESTROY = _io(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)
IOMMU_IOAS_ALLOC = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)
IOMMU_IOAS_ALLOW_IOVAS = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOW_IOVAS)
IOMMU_IOAS_COPY = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_COPY)
IOMMU_IOAS_IOVA_RANGES = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)
IOMMU_IOAS_MAP = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)
IOMMU_IOAS_UNMAP = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)
IOMMU_OPTION = _io(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION)
IOMMU_VFIO_IOAS = _io(IOMMUFD_TYPE, IOMMUFD_CMD_VFIO_IOAS)
IOMMU_HWPT_ALLOC = _io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)
IOMMU_GET_HW_INFO = _io(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)
IOMMU_HWPT_SET_DIRTY_TRACKING = _io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)
IOMMU_HWPT_GET_DIRTY_BITMAP = _io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)
IOMMU_HWPT_INVALIDATE = _io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_INVALIDATE)
IOMMU_FAULT_QUEUE_ALLOC = _io(IOMMUFD_TYPE, IOMMUFD_CMD_FAULT_QUEUE_ALLOC)
IOMMU_IOAS_MAP_FILE = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE)
IOMMU_VIOMMU_ALLOC = _io(IOMMUFD_TYPE, IOMMUFD_CMD_VIOMMU_ALLOC)
IOMMU_VDEVICE_ALLOC = _io(IOMMUFD_TYPE, IOMMUFD_CMD_VDEVICE_ALLOC)
IOMMU_IOAS_CHANGE_PROCESS = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_CHANGE_PROCESS)
IOMMU_VEVENTQ_ALLOC = _io(IOMMUFD_TYPE, IOMMUFD_CMD_VEVENTQ_ALLOC)
IOMMU_HW_QUEUE_ALLOC = _io(IOMMUFD_TYPE, IOMMUFD_CMD_HW_QUEUE_ALLOC)

# enum iommufd_ioas_map_flags
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

# enum iommufd_option, enum iommufd_option_ops
IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1

# enum iommufd_vfio_ioas_op
IOMMU_VFIO_IOAS_GET = 0
IOMMU_VFIO_IOAS_SET = 1
IOMMU_VFIO_IOAS_CLEAR = 2

# enum iommufd_hwpt_alloc_flags, enum iommu_hwpt_data_type
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3
IOMMU_HWPT_DATA_NONE = 0
IOMMU_HWPT_DATA_VTD_S1 = 1
IOMMU_HWPT_DATA_ARM_SMMUV3 = 2
IOMMU_HWPT_DATA_AMD_GUEST = 3

# enum iommu_hw_info_type, enum iommufd_hw_capabilities, enum iommufd_hw_info_flags
IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_DEFAULT = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
IOMMU_HW_INFO_TYPE_ARM_SMMUV3 = 2
IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV = 3
IOMMU_HW_INFO_TYPE_AMD = 4
IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0
IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1
IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2
IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED = 1 << 3
IOMMU_HW_INFO_FLAG_INPUT_TYPE = 1 << 0

# Dirty tracking, invalidation, vIOMMU: refused on legacy VFIO, but their
# flag and type values are part of the ABI the tests speak.
IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1
IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1
IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 = 0
IOMMU_VIOMMU_TYPE_DEFAULT = 0
IOMMU_VIOMMU_TYPE_ARM_SMMUV3 = 1
IOMMU_VEVENTQ_TYPE_DEFAULT = 0
IOMMU_HW_QUEUE_TYPE_DEFAULT = 0

# Commands on the VFIO device cdev (VFIO_TYPE ';', VFIO_BASE 100).
VFIO_BASE = 100
VFIO_DEVICE_GET_INFO = _io(IOMMUFD_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _io(IOMMUFD_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _io(IOMMUFD_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_RESET = _io(IOMMUFD_TYPE, VFIO_BASE + 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _io(IOMMUFD_TYPE, VFIO_BASE + 12)
VFIO_DEVICE_PCI_HOT_RESET = _io(IOMMUFD_TYPE, VFIO_BASE + 13)
VFIO_DEVICE_BIND_IOMMUFD = _io(IOMMUFD_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _io(IOMMUFD_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _io(IOMMUFD_TYPE, VFIO_BASE + 20)

VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID = 1 << 0
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED = 1 << 1
VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = 0xFFFFFFFF  # -1 in a __u32

# ---------------------------------------------------------------------------
# Structs (<linux/iommufd.h>)
# ---------------------------------------------------------------------------

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_s32 = ctypes.c_int32
_u64 = ctypes.c_uint64


class iommu_destroy(ctypes.Structure):
    _fields_ = [("size", _u32), ("id", _u32)]


class iommu_ioas_alloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("out_ioas_id", _u32)]


class iommu_iova_range(ctypes.Structure):
    _fields_ = [("start", _u64), ("last", _u64)]


class iommu_ioas_iova_ranges(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("num_iovas", _u32), ("reserved", _u32),
                ("allowed_iovas", _u64), ("out_iova_alignment", _u64)]


class iommu_ioas_allow_iovas(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("num_iovas", _u32), ("reserved", _u32),
                ("allowed_iovas", _u64)]


class iommu_ioas_map(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("ioas_id", _u32), ("reserved", _u32),
                ("user_va", _u64), ("length", _u64), ("iova", _u64)]


class iommu_ioas_map_file(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("ioas_id", _u32), ("fd", _s32),
                ("start", _u64), ("length", _u64), ("iova", _u64)]


class iommu_ioas_copy(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("dst_ioas_id", _u32), ("src_ioas_id", _u32),
                ("length", _u64), ("dst_iova", _u64), ("src_iova", _u64)]


class iommu_ioas_unmap(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("iova", _u64), ("length", _u64)]


class iommu_option(ctypes.Structure):
    _fields_ = [("size", _u32), ("option_id", _u32), ("op", _u16), ("reserved", _u16),
                ("object_id", _u32), ("val64", _u64)]


class iommu_vfio_ioas(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("op", _u16), ("reserved", _u16)]


class iommu_hwpt_alloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("dev_id", _u32), ("pt_id", _u32),
                ("out_hwpt_id", _u32), ("reserved", _u32), ("data_type", _u32),
                ("data_len", _u32), ("data_uptr", _u64), ("fault_id", _u32),
                ("reserved2", _u32)]


class iommu_hwpt_vtd_s1(ctypes.Structure):
    _fields_ = [("flags", _u64), ("pgtbl_addr", _u64), ("addr_width", _u32), ("reserved", _u32)]


class iommu_hw_info_vtd(ctypes.Structure):
    _fields_ = [("flags", _u32), ("reserved", _u32), ("cap_reg", _u64), ("ecap_reg", _u64)]


class _hw_info_type(ctypes.Union):
    _fields_ = [("in_data_type", _u32), ("out_data_type", _u32)]


class iommu_hw_info(ctypes.Structure):
    _anonymous_ = ("_type",)
    _fields_ = [("size", _u32), ("flags", _u32), ("dev_id", _u32), ("data_len", _u32),
                ("data_uptr", _u64), ("_type", _hw_info_type), ("out_max_pasid_log2", _u8),
                ("reserved", _u8 * 3), ("out_capabilities", _u64)]


class iommu_hwpt_set_dirty_tracking(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("hwpt_id", _u32), ("reserved", _u32)]


class iommu_hwpt_get_dirty_bitmap(ctypes.Structure):
    _fields_ = [("size", _u32), ("hwpt_id", _u32), ("flags", _u32), ("reserved", _u32),
                ("iova", _u64), ("length", _u64), ("page_size", _u64), ("data", _u64)]


class iommu_hwpt_invalidate(ctypes.Structure):
    _fields_ = [("size", _u32), ("hwpt_id", _u32), ("data_uptr", _u64), ("data_type", _u32),
                ("entry_len", _u32), ("entry_num", _u32), ("reserved", _u32)]


class iommu_fault_alloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("out_fault_id", _u32), ("out_fault_fd", _u32)]


class iommu_viommu_alloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("type", _u32), ("dev_id", _u32),
                ("hwpt_id", _u32), ("out_viommu_id", _u32), ("data_len", _u32),
                ("reserved", _u32), ("data_uptr", _u64)]


class iommu_vdevice_alloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("viommu_id", _u32), ("dev_id", _u32), ("out_vdevice_id", _u32),
                ("virt_id", _u64)]


class iommu_ioas_change_process(ctypes.Structure):
    _fields_ = [("size", _u32), ("reserved", _u32)]


class iommu_veventq_alloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("viommu_id", _u32), ("type", _u32),
                ("veventq_depth", _u32), ("out_veventq_id", _u32), ("out_veventq_fd", _u32),
                ("reserved", _u32)]


class iommu_hw_queue_alloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("viommu_id", _u32), ("type", _u32),
                ("index", _u32), ("out_hw_queue_id", _u32), ("nesting_parent_iova", _u64),
                ("length", _u64)]


# ---------------------------------------------------------------------------
# Structs (<linux/vfio.h>, the cdev part)
# ---------------------------------------------------------------------------


class vfio_device_bind_iommufd(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("iommufd", _s32), ("out_devid", _u32),
                ("token_uuid_ptr", _u64)]


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("pt_id", _u32), ("pasid", _u32)]


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("pasid", _u32)]


class _dependent_id(ctypes.Union):
    _fields_ = [("group_id", _u32), ("devid", _u32)]


class vfio_pci_dependent_device(ctypes.Structure):
    _anonymous_ = ("_id",)
    _fields_ = [("_id", _dependent_id), ("segment", _u16), ("bus", _u8), ("devfn", _u8)]


class vfio_pci_hot_reset_info(ctypes.Structure):
    """The header; `count` vfio_pci_dependent_device follow it."""
    _fields_ = [("argsz", _u32), ("flags", _u32), ("count", _u32)]


class vfio_pci_hot_reset(ctypes.Structure):
    """The header; `count` group fds (__s32) follow it."""
    _fields_ = [("argsz", _u32), ("flags", _u32), ("count", _u32)]


# The field each command's minimum size ends at (main.c's IOCTL_OP rows;
# device_cdev.c and vfio_pci_core.c's minsz for the cdev commands).
MIN_SIZE_FIELD = {
    IOMMU_DESTROY: (iommu_destroy, "id"),
    IOMMU_IOAS_ALLOC: (iommu_ioas_alloc, "out_ioas_id"),
    IOMMU_IOAS_ALLOW_IOVAS: (iommu_ioas_allow_iovas, "allowed_iovas"),
    IOMMU_IOAS_COPY: (iommu_ioas_copy, "src_iova"),
    IOMMU_IOAS_IOVA_RANGES: (iommu_ioas_iova_ranges, "out_iova_alignment"),
    IOMMU_IOAS_MAP: (iommu_ioas_map, "iova"),
    IOMMU_IOAS_UNMAP: (iommu_ioas_unmap, "length"),
    IOMMU_OPTION: (iommu_option, "val64"),
    IOMMU_VFIO_IOAS: (iommu_vfio_ioas, "reserved"),
    IOMMU_HWPT_ALLOC: (iommu_hwpt_alloc, "reserved"),
    IOMMU_GET_HW_INFO: (iommu_hw_info, "reserved"),
    IOMMU_HWPT_SET_DIRTY_TRACKING: (iommu_hwpt_set_dirty_tracking, "reserved"),
    IOMMU_HWPT_GET_DIRTY_BITMAP: (iommu_hwpt_get_dirty_bitmap, "data"),
    IOMMU_HWPT_INVALIDATE: (iommu_hwpt_invalidate, "reserved"),
    IOMMU_FAULT_QUEUE_ALLOC: (iommu_fault_alloc, "out_fault_fd"),
    IOMMU_IOAS_MAP_FILE: (iommu_ioas_map_file, "iova"),
    IOMMU_VIOMMU_ALLOC: (iommu_viommu_alloc, "out_viommu_id"),
    IOMMU_VDEVICE_ALLOC: (iommu_vdevice_alloc, "virt_id"),
    IOMMU_IOAS_CHANGE_PROCESS: (iommu_ioas_change_process, "reserved"),
    IOMMU_VEVENTQ_ALLOC: (iommu_veventq_alloc, "out_veventq_fd"),
    IOMMU_HW_QUEUE_ALLOC: (iommu_hw_queue_alloc, "length"),
    VFIO_DEVICE_BIND_IOMMUFD: (vfio_device_bind_iommufd, "out_devid"),
    VFIO_DEVICE_ATTACH_IOMMUFD_PT: (vfio_device_attach_iommufd_pt, "pt_id"),
    VFIO_DEVICE_DETACH_IOMMUFD_PT: (vfio_device_detach_iommufd_pt, "flags"),
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: (vfio_pci_hot_reset_info, "count"),
    VFIO_DEVICE_PCI_HOT_RESET: (vfio_pci_hot_reset, "count"),
}


def min_size(request: int) -> int:
    """offsetofend(struct, last field) of a command: the smallest size
    accepted (one byte less is EINVAL)."""
    cls, field = MIN_SIZE_FIELD[request]
    f = getattr(cls, field)
    return f.offset + f.size


def _new(cls, **fields):
    """An argument struct with its leading size (`size` or `argsz`) set."""
    first = cls._fields_[0][0]
    return cls(**{first: ctypes.sizeof(cls)}, **fields)


def _call(fd, request, obj):
    return ioctl_struct(fd, request, obj)[1]


# ---------------------------------------------------------------------------
# The IOVA allocator of the kernel, as a model the tests compare with
# ---------------------------------------------------------------------------

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HPAGE_SIZE = 2 << 20  # x86-64 with transparent huge pages (Debian's kernels)
ULONG_MAX = (1 << 64) - 1


def _roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def alloc_iova_model(holes, used, addr, length, allowed=(), iopt_alignment=1):
    """The IOVA that io_pagetable.c's iopt_alloc_iova() picks for a map of
    `length` bytes at user address (or file offset) `addr`, or None where it
    fails with ENOSPC.

    `holes`: the IOAS's usable ranges as IOMMU_IOAS_IOVA_RANGES lists them
    (inclusive (start, last)); `used`: the mapped ranges (inclusive);
    `allowed`: the ALLOW_IOVAS ranges, empty for "everything". The first
    fitting place in ascending IOVA order wins; never IOVA 0.
    """
    page_offset = addr % PAGE_SIZE
    if addr == 0:
        align = _roundup_pow_of_two(length)
    else:
        align = min(_roundup_pow_of_two(length), addr & -addr)
    align = min(align, HPAGE_SIZE)
    if align < iopt_alignment:
        raise ValueError("the kernel answers EINVAL: alignment below the IOAS's")

    def fit(start, last):
        aligned = ((start + align - 1) & ~(align - 1)) | page_offset
        if aligned >= last or last - aligned < length - 1:
            return None
        return aligned

    spans = list(allowed) or [(PAGE_SIZE, ULONG_MAX - PAGE_SIZE)]
    for a_start, a_last in sorted(spans):
        a_start, a_last = max(a_start, PAGE_SIZE), min(a_last, ULONG_MAX - PAGE_SIZE)
        if a_start > a_last or fit(a_start, a_last) is None:
            continue
        start = fit(a_start, a_last)
        # Free = inside a hole, outside every used range, within the span.
        for h_start, h_last in sorted(holes):
            lo, hi = max(h_start, start), min(h_last, a_last)
            cursor = lo
            for u_start, u_last in sorted(used) + [(hi + 1, hi + 1)]:
                if u_last < cursor:
                    continue
                gap_last = min(u_start - 1, hi)
                if gap_last >= cursor:
                    got = fit(cursor, gap_last)
                    if got is not None:
                        return got
                cursor = max(cursor, u_last + 1)
                if cursor > hi:
                    break
    return None


# ---------------------------------------------------------------------------
# The client of /dev/iommu
# ---------------------------------------------------------------------------

RW = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE


class Iommufd(NodeFile):
    """An open /dev/iommu file with one method per ioctl."""

    PATH = "/dev/iommu"

    def destroy(self, obj_id):
        _call(self, IOMMU_DESTROY, _new(iommu_destroy, id=obj_id))

    def ioas_alloc(self, flags=0):
        return _call(self, IOMMU_IOAS_ALLOC, _new(iommu_ioas_alloc, flags=flags)).out_ioas_id

    def iova_ranges_raw(self, ioas_id, num_iovas):
        """One IOVA_RANGES call with room for `num_iovas` ranges; returns
        (errno or 0, num_iovas written back, out_iova_alignment, ranges
        filled). EMSGSIZE is returned, not raised: the count comes with it."""
        buf = (iommu_iova_range * max(num_iovas, 1))()
        cmd = _new(iommu_ioas_iova_ranges, ioas_id=ioas_id, num_iovas=num_iovas,
                   allowed_iovas=ctypes.addressof(buf))
        raw = bytearray(bytes(cmd))
        err = 0
        try:
            fcntl.ioctl(self.fd, IOMMU_IOAS_IOVA_RANGES, raw)
        except OSError as e:
            if e.errno != errno.EMSGSIZE:
                raise
            err = e.errno
        out = iommu_ioas_iova_ranges.from_buffer_copy(raw)
        got = min(out.num_iovas, num_iovas)
        return err, out.num_iovas, out.out_iova_alignment, [(r.start, r.last) for r in buf[:got]]

    def iova_ranges(self, ioas_id):
        """The usable ranges and the IOVA alignment, as a client does it:
        first with no room (EMSGSIZE and the count), then with the count."""
        err, count, _, _ = self.iova_ranges_raw(ioas_id, 0)
        if err == 0:
            raise AssertionError(f"IOAS {ioas_id}: IOVA_RANGES with no room succeeded")
        err, count2, alignment, ranges = self.iova_ranges_raw(ioas_id, count)
        if err or count2 != count:
            raise AssertionError(f"IOAS {ioas_id}: {count} ranges, then errno {err} and {count2}")
        return ranges, alignment

    def allow_iovas(self, ioas_id, ranges):
        arr = (iommu_iova_range * max(len(ranges), 1))(*[iommu_iova_range(s, e) for s, e in ranges])
        _call(self, IOMMU_IOAS_ALLOW_IOVAS,
              _new(iommu_ioas_allow_iovas, ioas_id=ioas_id, num_iovas=len(ranges),
                   allowed_iovas=ctypes.addressof(arr)))

    def map(self, ioas_id, user_va, length, iova=None, flags=RW):
        """IOMMU_IOAS_MAP; with `iova` the FIXED_IOVA form. Returns the IOVA."""
        if iova is not None:
            flags |= IOMMU_IOAS_MAP_FIXED_IOVA
        out = _call(self, IOMMU_IOAS_MAP,
                    _new(iommu_ioas_map, flags=flags, ioas_id=ioas_id, user_va=user_va,
                         length=length, iova=iova or 0))
        return out.iova

    def map_file(self, ioas_id, fd, start, length, iova=None, flags=RW):
        if iova is not None:
            flags |= IOMMU_IOAS_MAP_FIXED_IOVA
        out = _call(self, IOMMU_IOAS_MAP_FILE,
                    _new(iommu_ioas_map_file, flags=flags, ioas_id=ioas_id, fd=fd, start=start,
                         length=length, iova=iova or 0))
        return out.iova

    def copy(self, dst_ioas_id, src_ioas_id, src_iova, length, dst_iova=None, flags=RW):
        if dst_iova is not None:
            flags |= IOMMU_IOAS_MAP_FIXED_IOVA
        out = _call(self, IOMMU_IOAS_COPY,
                    _new(iommu_ioas_copy, flags=flags, dst_ioas_id=dst_ioas_id,
                         src_ioas_id=src_ioas_id, length=length, dst_iova=dst_iova or 0,
                         src_iova=src_iova))
        return out.dst_iova

    def unmap(self, ioas_id, iova, length):
        """Returns the number of bytes unmapped (written back in `length`)."""
        return _call(self, IOMMU_IOAS_UNMAP,
                     _new(iommu_ioas_unmap, ioas_id=ioas_id, iova=iova, length=length)).length

    def unmap_all(self, ioas_id):
        return self.unmap(ioas_id, 0, ULONG_MAX)

    def option(self, option_id, op, object_id=0, val64=0):
        """Returns val64 as written back (GET: the value)."""
        return _call(self, IOMMU_OPTION,
                     _new(iommu_option, option_id=option_id, op=op, object_id=object_id,
                          val64=val64)).val64

    def vfio_ioas(self, op, ioas_id=0):
        return _call(self, IOMMU_VFIO_IOAS, _new(iommu_vfio_ioas, op=op, ioas_id=ioas_id)).ioas_id

    def hwpt_alloc(self, dev_id, pt_id, flags=0, data_type=IOMMU_HWPT_DATA_NONE, data=b""):
        buf = ctypes.create_string_buffer(bytes(data), max(len(data), 1))
        out = _call(self, IOMMU_HWPT_ALLOC,
                    _new(iommu_hwpt_alloc, flags=flags, dev_id=dev_id, pt_id=pt_id,
                         data_type=data_type, data_len=len(data),
                         data_uptr=ctypes.addressof(buf) if data else 0))
        return out.out_hwpt_id

    def get_hw_info(self, dev_id, data_len=0, fill=0xAA, flags=0, in_data_type=0):
        """Returns (the struct as written back, the data buffer's bytes);
        the buffer starts filled with `fill`."""
        buf = ctypes.create_string_buffer(bytes([fill]) * max(data_len, 1), max(data_len, 1))
        cmd = _new(iommu_hw_info, flags=flags, dev_id=dev_id, data_len=data_len,
                   data_uptr=ctypes.addressof(buf) if data_len else 0)
        cmd.in_data_type = in_data_type
        out = _call(self, IOMMU_GET_HW_INFO, cmd)
        return out, buf.raw[:data_len]


# ---------------------------------------------------------------------------
# The VFIO device cdev
# ---------------------------------------------------------------------------


def cdev_name(bdf: str) -> str:
    """vfioN, the kernel's own name for the device (its sysfs vfio-dev
    directory, present on Linux 6.1 even without the cdev)."""
    names = os.listdir(f"/sys/bus/pci/devices/{bdf}/vfio-dev")
    if len(names) != 1 or not names[0].startswith("vfio"):
        raise RuntimeError(f"{bdf}: vfio-dev holds {names}, expected one vfioN")
    return names[0]


def cdev_path(bdf: str) -> str:
    return f"/dev/vfio/devices/{cdev_name(bdf)}"


def bind_iommufd(device_fd, iommufd, flags=0, token_uuid_ptr=0):
    """VFIO_DEVICE_BIND_IOMMUFD; returns out_devid."""
    return _call(device_fd, VFIO_DEVICE_BIND_IOMMUFD,
                 _new(vfio_device_bind_iommufd, flags=flags, iommufd=_fileno(iommufd),
                      token_uuid_ptr=token_uuid_ptr)).out_devid


def attach_pt(device_fd, pt_id, pasid=None):
    """VFIO_DEVICE_ATTACH_IOMMUFD_PT; returns pt_id as written back (the
    HWPT id when an IOAS was given)."""
    flags = 0 if pasid is None else VFIO_DEVICE_ATTACH_PASID
    return _call(device_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                 _new(vfio_device_attach_iommufd_pt, flags=flags, pt_id=pt_id,
                      pasid=pasid or 0)).pt_id


def detach_pt(device_fd, pasid=None):
    flags = 0 if pasid is None else VFIO_DEVICE_DETACH_PASID
    _call(device_fd, VFIO_DEVICE_DETACH_IOMMUFD_PT,
          _new(vfio_device_detach_iommufd_pt, flags=flags, pasid=pasid or 0))


def hot_reset_info(device_fd):
    """VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, first with no room (ENOSPC and
    the count), then with room. Returns (flags, [(devid, segment, bus,
    devfn)])."""
    head = ctypes.sizeof(vfio_pci_hot_reset_info)
    entry = ctypes.sizeof(vfio_pci_dependent_device)
    probe = bytearray(struct.pack("=III", head, 0, 0))
    try:
        fcntl.ioctl(_fileno(device_fd), VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, probe)
        count = struct.unpack_from("=I", probe, 8)[0]
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        count = struct.unpack_from("=I", probe, 8)[0]
    buf = bytearray(head + entry * count)
    struct.pack_into("=I", buf, 0, len(buf))
    fcntl.ioctl(_fileno(device_fd), VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, buf)
    hdr = vfio_pci_hot_reset_info.from_buffer_copy(buf)
    devs = [vfio_pci_dependent_device.from_buffer_copy(buf, head + entry * i)
            for i in range(hdr.count)]
    return hdr.flags, [(d.devid, d.segment, d.bus, d.devfn) for d in devs]


def hot_reset(device_fd, group_fds=(), flags=0):
    buf = struct.pack("=III", 12 + 4 * len(group_fds), flags, len(group_fds))
    buf += b"".join(struct.pack("=i", g) for g in group_fds)
    fcntl.ioctl(_fileno(device_fd), VFIO_DEVICE_PCI_HOT_RESET, bytearray(buf))
