"""A small client for the legacy VFIO interface (Linux uAPI <linux/vfio.h>).

Layers, each usable alone:

- ``Container`` (``/dev/vfio/vfio``): IOMMU model, ``MAP_DMA``/``UNMAP_DMA``.
- ``Group`` (``/dev/vfio/N``): status, joining a container, opening devices.
- ``Device``: the device-level ioctls (info, region info, reset) and region
  access with ``os.pread``/``os.pwrite``. It wraps *any* fd that answers VFIO
  device ioctls — a device fd from a group, or an open
  ``/dev/vfio/devices/devN`` node of the cuse-ioasid daemon.
- ``Region`` / ``PciConfig``: typed reads and writes inside one region.
- ``DmaBuffer``: memfd-backed ``MAP_SHARED`` memory to map for DMA (the kind
  of memory the daemon can alias, see docs/design.md).

Errors surface as ``OSError`` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct

# --- ioctl numbers: _IO(VFIO_TYPE, VFIO_BASE + n), VFIO_TYPE is ';' -------

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _vfio_io(n: int) -> int:
    return (VFIO_TYPE << 8) | (VFIO_BASE + n)


VFIO_GET_API_VERSION = _vfio_io(0)
VFIO_CHECK_EXTENSION = _vfio_io(1)
VFIO_SET_IOMMU = _vfio_io(2)
VFIO_GROUP_GET_STATUS = _vfio_io(3)
VFIO_GROUP_SET_CONTAINER = _vfio_io(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio_io(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio_io(6)
VFIO_DEVICE_GET_INFO = _vfio_io(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio_io(8)
VFIO_DEVICE_GET_IRQ_INFO = _vfio_io(9)
VFIO_DEVICE_SET_IRQS = _vfio_io(10)
VFIO_DEVICE_RESET = _vfio_io(11)
VFIO_IOMMU_GET_INFO = _vfio_io(12)
VFIO_IOMMU_MAP_DMA = _vfio_io(13)
VFIO_IOMMU_UNMAP_DMA = _vfio_io(14)

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_UNMAP_ALL = 9  # extension: VFIO_DMA_UNMAP_FLAG_ALL

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1

# PCI region indexes of vfio-pci.
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7

# PCI configuration space.
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --- ioctl argument structs -----------------------------------------------


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
    ]


class vfio_region_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    ]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


def _struct(cls, **fields):
    obj = cls(argsz=ctypes.sizeof(cls), **fields)
    return obj


def ioctl_struct(fd: int, request: int, obj: ctypes.Structure) -> ctypes.Structure:
    """Issue ``request`` with ``obj`` as its in/out argument (updated in place)."""
    fcntl.ioctl(fd, request, obj, True)
    return obj


# --- Container and group --------------------------------------------------


class Container:
    """A legacy VFIO container (``/dev/vfio/vfio``)."""

    def __init__(self, path: str = "/dev/vfio/vfio"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def api_version(self) -> int:
        return fcntl.ioctl(self.fd, VFIO_GET_API_VERSION)

    def check_extension(self, ext: int) -> int:
        return fcntl.ioctl(self.fd, VFIO_CHECK_EXTENSION, ext)

    def set_iommu(self, model: int = VFIO_TYPE1v2_IOMMU) -> None:
        fcntl.ioctl(self.fd, VFIO_SET_IOMMU, model)

    def map_dma(self, vaddr: int, iova: int, size: int,
                flags: int = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) -> None:
        arg = _struct(vfio_iommu_type1_dma_map, flags=flags, vaddr=vaddr, iova=iova, size=size)
        ioctl_struct(self.fd, VFIO_IOMMU_MAP_DMA, arg)

    def unmap_dma(self, iova: int, size: int, flags: int = 0) -> int:
        """Unmap; returns the number of bytes the kernel reports unmapped."""
        arg = _struct(vfio_iommu_type1_dma_unmap, flags=flags, iova=iova, size=size)
        ioctl_struct(self.fd, VFIO_IOMMU_UNMAP_DMA, arg)
        return arg.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Group:
    """A VFIO group (``/dev/vfio/N``)."""

    def __init__(self, number: int | str):
        self.number = int(number)
        self.fd = os.open(f"/dev/vfio/{self.number}", os.O_RDWR | os.O_CLOEXEC)

    def status(self) -> int:
        return ioctl_struct(self.fd, VFIO_GROUP_GET_STATUS, _struct(vfio_group_status)).flags

    def viable(self) -> bool:
        return bool(self.status() & VFIO_GROUP_FLAGS_VIABLE)

    def set_container(self, container: Container) -> None:
        fcntl.ioctl(self.fd, VFIO_GROUP_SET_CONTAINER, struct.pack("i", container.fd))

    def unset_container(self) -> None:
        fcntl.ioctl(self.fd, VFIO_GROUP_UNSET_CONTAINER)

    def open_device(self, bdf: str) -> "Device":
        """Open the device named ``bdf`` (e.g. ``0000:00:0a.0``)."""
        name = ctypes.create_string_buffer(bdf.encode())
        fd = fcntl.ioctl(self.fd, VFIO_GROUP_GET_DEVICE_FD, name)
        return Device(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- Device level (any fd answering VFIO device ioctls) -------------------


class Device:
    """A VFIO device fd. Owns ``fd`` (closed by ``close()``) unless
    ``owned=False``."""

    def __init__(self, fd: int, owned: bool = True):
        self.fd = fd
        self.owned = owned
        self._regions: dict[int, Region] = {}

    @classmethod
    def open_node(cls, path: str) -> "Device":
        """Open a device node such as ``/dev/vfio/devices/dev0``."""
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def info(self) -> vfio_device_info:
        return ioctl_struct(self.fd, VFIO_DEVICE_GET_INFO, _struct(vfio_device_info))

    def region_info(self, index: int) -> vfio_region_info:
        return ioctl_struct(self.fd, VFIO_DEVICE_GET_REGION_INFO,
                            _struct(vfio_region_info, index=index))

    def region(self, index: int) -> "Region":
        if index not in self._regions:
            info = self.region_info(index)
            self._regions[index] = Region(self.fd, index, info.offset, info.size, info.flags)
        return self._regions[index]

    def bar(self, n: int) -> "Region":
        return self.region(VFIO_PCI_BAR0_REGION_INDEX + n)

    def config(self) -> "PciConfig":
        r = self.region(VFIO_PCI_CONFIG_REGION_INDEX)
        return PciConfig(r.fd, r.index, r.offset, r.size, r.flags)

    def reset(self) -> None:
        fcntl.ioctl(self.fd, VFIO_DEVICE_RESET)

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Region:
    """One region of a VFIO device: offset ``offset`` in the device fd,
    ``size`` bytes. Accesses are bounds-checked here so a test bug shows as a
    Python error, not as an odd errno."""

    def __init__(self, fd: int, index: int, offset: int, size: int, flags: int):
        self.fd = fd
        self.index = index
        self.offset = offset
        self.size = size
        self.flags = flags

    def _check(self, off: int, length: int) -> None:
        if off < 0 or length < 0 or off + length > self.size:
            raise ValueError(f"region {self.index}: [{off:#x}, +{length}) outside {self.size:#x}")

    def read(self, off: int, length: int) -> bytes:
        self._check(off, length)
        data = os.pread(self.fd, length, self.offset + off)
        if len(data) != length:
            raise OSError(f"region {self.index}: short read at {off:#x}: {len(data)}/{length}")
        return data

    def write(self, off: int, data: bytes) -> None:
        self._check(off, len(data))
        n = os.pwrite(self.fd, data, self.offset + off)
        if n != len(data):
            raise OSError(f"region {self.index}: short write at {off:#x}: {n}/{len(data)}")

    def read8(self, off: int) -> int:
        return self.read(off, 1)[0]

    def read16(self, off: int) -> int:
        return struct.unpack("<H", self.read(off, 2))[0]

    def read32(self, off: int) -> int:
        return struct.unpack("<I", self.read(off, 4))[0]

    def read64(self, off: int) -> int:
        return struct.unpack("<Q", self.read(off, 8))[0]

    def write8(self, off: int, val: int) -> None:
        self.write(off, struct.pack("<B", val))

    def write16(self, off: int, val: int) -> None:
        self.write(off, struct.pack("<H", val))

    def write32(self, off: int, val: int) -> None:
        self.write(off, struct.pack("<I", val))

    def write64(self, off: int, val: int) -> None:
        self.write(off, struct.pack("<Q", val))


class PciConfig(Region):
    """The PCI configuration space region."""

    def vendor_device(self) -> tuple[int, int]:
        return self.read16(PCI_VENDOR_ID), self.read16(PCI_DEVICE_ID)

    def command(self) -> int:
        return self.read16(PCI_COMMAND)

    def enable(self, memory: bool = True, bus_master: bool = True) -> int:
        """Set the memory-space and bus-master bits; returns the new command word."""
        cmd = self.command()
        if memory:
            cmd |= PCI_COMMAND_MEMORY
        if bus_master:
            cmd |= PCI_COMMAND_MASTER
        self.write16(PCI_COMMAND, cmd)
        return self.command()


# --- DMA memory -----------------------------------------------------------


class DmaBuffer:
    """``size`` bytes of memfd memory mapped ``MAP_SHARED`` in this process.

    ``addr`` is the virtual address to hand to MAP_DMA. Read and write it
    only through ``read``/``write``/``fill`` (never keep Python views of DMA
    memory across a DMA)."""

    def __init__(self, size: int, name: str = "dma"):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size {size:#x} is not a positive multiple of the page size")
        self.size = size
        self.memfd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, size)
        self.map = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.addr = ctypes.addressof(anchor)
        del anchor  # the address stays valid while the mapping exists

    def page(self, n: int) -> int:
        """Virtual address of page ``n``."""
        return self.addr + n * PAGE_SIZE

    def read(self, off: int, length: int) -> bytes:
        return self.map[off:off + length]

    def write(self, off: int, data: bytes) -> None:
        self.map[off:off + len(data)] = data

    def fill(self, byte: int, off: int = 0, length: int | None = None) -> None:
        length = self.size - off if length is None else length
        self.write(off, bytes([byte]) * length)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
            os.close(self.memfd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_container_with(groups: list[Group], model: int = VFIO_TYPE1v2_IOMMU) -> Container:
    """A new container holding ``groups``, with the IOMMU model set."""
    c = Container()
    try:
        if c.api_version() != VFIO_API_VERSION:
            raise OSError("unexpected VFIO API version")
        for g in groups:
            g.set_container(c)
        c.set_iommu(model)
    except BaseException:
        c.close()
        raise
    return c
