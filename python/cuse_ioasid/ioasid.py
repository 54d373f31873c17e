"""Python mirror of the /dev/ioasid ABI (uapi/include/linux/ioasid.h).

Numbers, flags and structs carry the C names (``__reserved`` is spelled
``reserved``); ``tests/host/test_abi_layout.py`` checks all of them against
the header compiled by the C compiler.

The thin client below issues the ioctls the way the RFC's flows read::

    with IoasidFd() as ioasid_fd:
        bind_ioasid_fd(device_fd, ioasid_fd)
        gpa = ioasid_fd.alloc()
        attach_ioasid(device_fd, gpa)
        ioasid_fd.map_dma(gpa, iova=0, vaddr=buf_addr, size=len(buf))

Every failing call raises ``OSError`` carrying the errno (``e.errno``).
Standard library only (ctypes, fcntl), so it runs inside the test VM.
"""

import ctypes
import fcntl
import os
import struct

# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------


def _io(ty, nr):
    """The kernel's _IO(ty, nr) on x86-64 and the other asm-generic layouts."""
    return (ty << 8) | nr


IOASID_TYPE = ord(";")
IOASID_BASE = 0x20
VFIO_TYPE = ord(";")
VFIO_BASE = 100

IOASID_MAX_ID = 0x7FFFFFFF
IOASID_PASID_BITS = 20
IOASID_PASID_TABLE_MAX_ENTRIES = 1 << IOASID_PASID_BITS

# Extension ids for IOASID_CHECK_EXTENSION.
IOASID_EXT_TYPE1V2_DMA = 1
IOASID_EXT_REGISTER_MEMORY = 2
IOASID_EXT_NESTING_SOFTWARE = 3
IOASID_EXT_NESTING_HARDWARE = 4
IOASID_EXT_BIND_PGTABLE_SHADOW = 5
IOASID_EXT_BIND_PASID_TABLE_SHADOW = 6
IOASID_EXT_USER_PASID_TRACKED = 7
IOASID_EXT_PASID_DMA_ROUTING = 8

# Commands on the ioasid file.
IOASID_CHECK_EXTENSION = _io(IOASID_TYPE, IOASID_BASE + 0)
IOASID_REGISTER_MEMORY = _io(IOASID_TYPE, IOASID_BASE + 1)
IOASID_UNREGISTER_MEMORY = _io(IOASID_TYPE, IOASID_BASE + 2)
IOASID_ALLOC = _io(IOASID_TYPE, IOASID_BASE + 3)
IOASID_FREE = _io(IOASID_TYPE, IOASID_BASE + 4)
IOASID_GET_INFO = _io(IOASID_TYPE, IOASID_BASE + 5)
IOASID_MAP_DMA = _io(IOASID_TYPE, IOASID_BASE + 6)
IOASID_UNMAP_DMA = _io(IOASID_TYPE, IOASID_BASE + 7)
IOASID_CREATE_NESTING = _io(IOASID_TYPE, IOASID_BASE + 8)
IOASID_BIND_PGTABLE = _io(IOASID_TYPE, IOASID_BASE + 9)
IOASID_UNBIND_PGTABLE = _io(IOASID_TYPE, IOASID_BASE + 10)
IOASID_BIND_PASID_TABLE = _io(IOASID_TYPE, IOASID_BASE + 11)
IOASID_UNBIND_PASID_TABLE = _io(IOASID_TYPE, IOASID_BASE + 12)
IOASID_INVALIDATE_CACHE = _io(IOASID_TYPE, IOASID_BASE + 13)
# Daemon-private: answered only to the daemon itself (EPERM otherwise).
IOASID_DAEMON_IDENTIFY = _io(IOASID_TYPE, IOASID_BASE + 63)

# Commands on a VFIO device file.
VFIO_BIND_IOASID_FD = _io(VFIO_TYPE, VFIO_BASE + 22)
VFIO_UNBIND_IOASID_FD = _io(VFIO_TYPE, VFIO_BASE + 23)
VFIO_ATTACH_IOASID = _io(VFIO_TYPE, VFIO_BASE + 24)
VFIO_DETACH_IOASID = _io(VFIO_TYPE, VFIO_BASE + 25)

# IOASID_GET_INFO flags.
IOASID_INFO_PGSIZES = 1 << 0
IOASID_INFO_CAPS = 1 << 1
IOASID_INFO_MAP_DMA = 1 << 2
IOASID_INFO_BIND_PGTABLE = 1 << 3
IOASID_INFO_BIND_PASID_TABLE = 1 << 4
IOASID_INFO_NESTED = 1 << 5

# Capability ids and their flags.
IOASID_INFO_CAP_IOVA_RANGES = 1
IOASID_INFO_CAP_NESTING = 2
IOASID_INFO_CAP_PGTABLE_FORMATS = 3
IOASID_INFO_CAP_PASID = 4
IOASID_INFO_CAP_PARENT = 5
IOASID_INFO_CAP_DMA_AVAIL = 6
IOASID_INFO_CAP_SHADOW = 7
IOASID_NESTING_SOFTWARE = 1 << 0
IOASID_NESTING_HARDWARE = 1 << 1
IOASID_PGTABLE_FORMAT_SHADOWED = 1 << 0
IOASID_PASID_ATTACH_TRACKED = 1 << 0
IOASID_PASID_DMA_ROUTED = 1 << 1
IOASID_SHADOW_PGTABLE = 1 << 0
IOASID_SHADOW_PASID_TABLE = 1 << 1
IOASID_SHADOW_TRUNCATED = 1 << 2

# Map / unmap.
IOASID_DMA_MAP_FLAG_READ = 1 << 0
IOASID_DMA_MAP_FLAG_WRITE = 1 << 1
IOASID_DMA_UNMAP_FLAG_ALL = 1 << 1

# Formats.
IOASID_PGTABLE_X86_64_4LVL = 1
IOASID_PASID_TABLE_FLAT_X86_64 = 1

# Invalidation.
IOASID_INVALIDATE_ADDR = 1 << 0
IOASID_INVALIDATE_PASID = 1 << 1
IOASID_INVALIDATE_PASID_CACHE = 1 << 2

# Attach.
IOASID_ATTACH_USER_PASID = 1 << 0

# ---------------------------------------------------------------------------
# Structs
# ---------------------------------------------------------------------------

_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class ioasid_register_memory(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("vaddr", _u64), ("size", _u64)]


class ioasid_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("ioasid", _u32),
        ("cap_offset", _u32),
        ("pgsize_bitmap", _u64),
    ]


class ioasid_info_cap_header(ctypes.Structure):
    _fields_ = [("id", _u16), ("version", _u16), ("next", _u32)]


class ioasid_iova_range(ctypes.Structure):
    _fields_ = [("start", _u64), ("last", _u64)]


class ioasid_info_cap_iova_ranges(ctypes.Structure):
    _fields_ = [("header", ioasid_info_cap_header), ("nr_ranges", _u32), ("reserved", _u32)]


class ioasid_info_cap_nesting(ctypes.Structure):
    _fields_ = [("header", ioasid_info_cap_header), ("flags", _u32), ("levels", _u32)]


class ioasid_pgtable_format_desc(ctypes.Structure):
    _fields_ = [
        ("format", _u32),
        ("flags", _u32),
        ("addr_width", _u32),
        ("reserved", _u32),
        ("pgsize_bitmap", _u64),
    ]


class ioasid_info_cap_pgtable_formats(ctypes.Structure):
    _fields_ = [("header", ioasid_info_cap_header), ("nr_formats", _u32), ("reserved", _u32)]


class ioasid_info_cap_pasid(ctypes.Structure):
    _fields_ = [
        ("header", ioasid_info_cap_header),
        ("flags", _u32),
        ("pasid_bits", _u32),
        ("pasid_table_format", _u32),
        ("reserved", _u32),
    ]


class ioasid_info_cap_parent(ctypes.Structure):
    _fields_ = [("header", ioasid_info_cap_header), ("parent", _u32), ("reserved", _u32)]


class ioasid_info_cap_dma_avail(ctypes.Structure):
    _fields_ = [("header", ioasid_info_cap_header), ("avail", _u32), ("reserved", _u32)]


class ioasid_info_cap_shadow(ctypes.Structure):
    _fields_ = [
        ("header", ioasid_info_cap_header),
        ("flags", _u32),
        ("reserved", _u32),
        ("shadow_entries", _u64),
        ("leaves", _u64),
        ("last_walk_leaves", _u64),
        ("last_walk_malformed", _u64),
        ("last_walk_tables", _u64),
        ("malformed", _u64),
        ("walks", _u64),
        ("pasid_entries", _u32),
        ("pasid_valid", _u32),
        ("pasid_bad", _u32),
        ("pasid_unreadable", _u32),
        ("pasid_leaves", _u64),
        ("pasid_malformed", _u64),
    ]


SHADOW_FIELDS = [n for n, _ in ioasid_info_cap_shadow._fields_ if n not in ("header", "reserved")]


class ioasid_dma_map(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("ioasid", _u32),
        ("reserved", _u32),
        ("vaddr", _u64),
        ("iova", _u64),
        ("size", _u64),
    ]


class ioasid_dma_unmap(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("ioasid", _u32),
        ("reserved", _u32),
        ("iova", _u64),
        ("size", _u64),
    ]


class ioasid_bind_pgtable(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("ioasid", _u32),
        ("format", _u32),
        ("addr_width", _u32),
        ("reserved", _u32),
        ("pgtable", _u64),
    ]


class ioasid_unbind_pgtable(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("ioasid", _u32), ("reserved", _u32)]


class ioasid_bind_pasid_table(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("ioasid", _u32),
        ("format", _u32),
        ("table", _u64),
        ("entries", _u32),
        ("reserved", _u32),
    ]


class ioasid_unbind_pasid_table(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("ioasid", _u32), ("reserved", _u32)]


class ioasid_invalidate_cache(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("ioasid", _u32),
        ("pasid", _u32),
        ("addr", _u64),
        ("size", _u64),
    ]


class vfio_attach_ioasid(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("ioasid", _u32), ("user_pasid", _u32)]


def _new(cls, **fields):
    """An argument struct with argsz set to its size."""
    return cls(argsz=ctypes.sizeof(cls), **fields)


# ---------------------------------------------------------------------------
# Raw calls
# ---------------------------------------------------------------------------


def _fileno(f):
    return f if isinstance(f, int) else f.fileno()


def ioctl_int(fd, request, arg=0):
    """An ioctl whose argument is an integer; returns the ioctl's result."""
    return fcntl.ioctl(_fileno(fd), request, arg)


def ioctl_struct(fd, request, obj, argsz=None, tail=b""):
    """Issues `request` with `obj` (a ctypes struct) as the argument.

    For tests of the extensible-struct rules: `argsz` overrides the argsz
    written into the struct (default: its size plus `tail`), and `tail` is
    appended after it (bytes past the known struct). The struct and the tail
    are passed in one buffer; returns (ioctl result, struct as written back,
    tail as written back).
    """
    size = ctypes.sizeof(obj)
    buf = bytearray(bytes(obj)) + bytearray(tail)
    struct.pack_into("=I", buf, 0, len(buf) if argsz is None else argsz)
    ret = fcntl.ioctl(_fileno(fd), request, buf)
    return ret, type(obj).from_buffer_copy(buf[:size]), bytes(buf[size:])


# ---------------------------------------------------------------------------
# GET_INFO decoding
# ---------------------------------------------------------------------------

CAP_NAMES = {
    IOASID_INFO_CAP_IOVA_RANGES: "iova_ranges",
    IOASID_INFO_CAP_NESTING: "nesting",
    IOASID_INFO_CAP_PGTABLE_FORMATS: "pgtable_formats",
    IOASID_INFO_CAP_PASID: "pasid",
    IOASID_INFO_CAP_PARENT: "parent",
    IOASID_INFO_CAP_DMA_AVAIL: "dma_avail",
    IOASID_INFO_CAP_SHADOW: "shadow",
}


def _read(cls, buf, off):
    end = off + ctypes.sizeof(cls)
    if off < 0 or end > len(buf):
        raise ValueError(f"{cls.__name__} at {off} runs past the {len(buf)}-byte buffer")
    return cls.from_buffer_copy(buf, off), end


def _decode_cap(cap_id, buf, off):
    if cap_id == IOASID_INFO_CAP_IOVA_RANGES:
        cap, pos = _read(ioasid_info_cap_iova_ranges, buf, off)
        ranges = []
        for _ in range(cap.nr_ranges):
            r, pos = _read(ioasid_iova_range, buf, pos)
            ranges.append((r.start, r.last))
        return ranges
    if cap_id == IOASID_INFO_CAP_NESTING:
        cap, _ = _read(ioasid_info_cap_nesting, buf, off)
        return {
            "flags": cap.flags,
            "software": bool(cap.flags & IOASID_NESTING_SOFTWARE),
            "hardware": bool(cap.flags & IOASID_NESTING_HARDWARE),
            "levels": cap.levels,
        }
    if cap_id == IOASID_INFO_CAP_PGTABLE_FORMATS:
        cap, pos = _read(ioasid_info_cap_pgtable_formats, buf, off)
        formats = []
        for _ in range(cap.nr_formats):
            d, pos = _read(ioasid_pgtable_format_desc, buf, pos)
            formats.append(
                {
                    "format": d.format,
                    "flags": d.flags,
                    "shadowed": bool(d.flags & IOASID_PGTABLE_FORMAT_SHADOWED),
                    "addr_width": d.addr_width,
                    "pgsize_bitmap": d.pgsize_bitmap,
                }
            )
        return formats
    if cap_id == IOASID_INFO_CAP_PASID:
        cap, _ = _read(ioasid_info_cap_pasid, buf, off)
        return {
            "flags": cap.flags,
            "tracked": bool(cap.flags & IOASID_PASID_ATTACH_TRACKED),
            "routed": bool(cap.flags & IOASID_PASID_DMA_ROUTED),
            "pasid_bits": cap.pasid_bits,
            "pasid_table_format": cap.pasid_table_format,
        }
    if cap_id == IOASID_INFO_CAP_PARENT:
        return _read(ioasid_info_cap_parent, buf, off)[0].parent
    if cap_id == IOASID_INFO_CAP_DMA_AVAIL:
        return _read(ioasid_info_cap_dma_avail, buf, off)[0].avail
    if cap_id == IOASID_INFO_CAP_SHADOW:
        cap, _ = _read(ioasid_info_cap_shadow, buf, off)
        d = {name: getattr(cap, name) for name in SHADOW_FIELDS}
        d["pgtable"] = bool(cap.flags & IOASID_SHADOW_PGTABLE)
        d["pasid_table"] = bool(cap.flags & IOASID_SHADOW_PASID_TABLE)
        d["truncated"] = bool(cap.flags & IOASID_SHADOW_TRUNCATED)
        return d
    return None


def parse_info(buf):
    """Decodes a GET_INFO result (struct + chain) into a dict.

    Keys: ``flags``, ``pgsize_bitmap``, ``argsz`` (as written back), and
    ``caps``: capability name -> decoded value (``iova_ranges``: list of
    (start, last) inclusive; ``nesting``, ``pasid``: dicts;
    ``pgtable_formats``: list of dicts; ``parent``, ``dma_avail``: ints;
    ``shadow``: dict of the struct's fields by name plus booleans
    ``pgtable``, ``pasid_table``, ``truncated`` decoded from ``flags``;
    unknown ids: raw bytes of the header onwards, keyed by the id).
    Raises ValueError on a malformed chain.
    """
    buf = bytes(buf)
    info, _ = _read(ioasid_info, buf, 0)
    caps = {}
    off = info.cap_offset
    seen = set()
    while off:
        if off in seen:
            raise ValueError(f"capability chain loops at offset {off}")
        if off % 8:
            raise ValueError(f"capability at unaligned offset {off}")
        seen.add(off)
        hdr, _ = _read(ioasid_info_cap_header, buf, off)
        value = _decode_cap(hdr.id, buf, off)
        if value is None:
            caps[hdr.id] = buf[off:]
        else:
            caps[CAP_NAMES[hdr.id]] = value
        off = hdr.next
    return {
        "flags": info.flags,
        "pgsize_bitmap": info.pgsize_bitmap,
        "argsz": info.argsz,
        "caps": caps,
    }


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


class NodeFile:
    """An open device node (or `fd`, taken over), closed by close() or at
    the end of a with block. Base of the clients of each node."""

    PATH = ""

    def __init__(self, path=None, fd=None):
        self.fd = os.open(path or self.PATH, os.O_RDWR | os.O_CLOEXEC) if fd is None else fd

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class IoasidFd(NodeFile):
    """An open /dev/ioasid file with one method per ioctl."""

    PATH = "/dev/ioasid"

    def check_extension(self, ext):
        return ioctl_int(self, IOASID_CHECK_EXTENSION, ext)

    def register_memory(self, vaddr, size, flags=0):
        ioctl_struct(
            self,
            IOASID_REGISTER_MEMORY,
            _new(ioasid_register_memory, flags=flags, vaddr=vaddr, size=size),
        )

    def unregister_memory(self, vaddr, size, flags=0):
        ioctl_struct(
            self,
            IOASID_UNREGISTER_MEMORY,
            _new(ioasid_register_memory, flags=flags, vaddr=vaddr, size=size),
        )

    def alloc(self):
        return ioctl_int(self, IOASID_ALLOC, 0)

    def free(self, ioasid):
        ioctl_int(self, IOASID_FREE, ioasid)

    def get_info(self, ioasid):
        """GET_INFO with the capability chain, growing the buffer as the
        daemon asks (VFIO style); returns parse_info()'s dict."""
        size = ctypes.sizeof(ioasid_info)
        for _ in range(4):
            buf = bytearray(size)
            struct.pack_into("=II", buf, 0, size, 0)
            struct.pack_into("=I", buf, 8, ioasid)
            fcntl.ioctl(self.fd, IOASID_GET_INFO, buf)
            info = ioasid_info.from_buffer_copy(buf)
            if info.flags & IOASID_INFO_CAPS and info.cap_offset == 0 and info.argsz > size:
                size = info.argsz
                continue
            return parse_info(buf)
        raise RuntimeError("GET_INFO kept asking for a bigger buffer")

    def map_dma(self, ioasid, iova, vaddr, size, read=True, write=True, flags=None):
        if flags is None:
            flags = (IOASID_DMA_MAP_FLAG_READ if read else 0) | (
                IOASID_DMA_MAP_FLAG_WRITE if write else 0
            )
        ioctl_struct(
            self,
            IOASID_MAP_DMA,
            _new(ioasid_dma_map, flags=flags, ioasid=ioasid, vaddr=vaddr, iova=iova, size=size),
        )

    def unmap_dma(self, ioasid, iova, size, flags=0):
        """Returns the number of bytes unmapped."""
        _, out, _ = ioctl_struct(
            self,
            IOASID_UNMAP_DMA,
            _new(ioasid_dma_unmap, flags=flags, ioasid=ioasid, iova=iova, size=size),
        )
        return out.size

    def unmap_all(self, ioasid):
        return self.unmap_dma(ioasid, 0, 0, flags=IOASID_DMA_UNMAP_FLAG_ALL)

    def create_nesting(self, parent):
        return ioctl_int(self, IOASID_CREATE_NESTING, parent)

    def bind_pgtable(self, ioasid, pgtable, fmt=IOASID_PGTABLE_X86_64_4LVL, addr_width=48):
        ioctl_struct(
            self,
            IOASID_BIND_PGTABLE,
            _new(
                ioasid_bind_pgtable,
                ioasid=ioasid,
                format=fmt,
                addr_width=addr_width,
                pgtable=pgtable,
            ),
        )

    def unbind_pgtable(self, ioasid):
        ioctl_struct(self, IOASID_UNBIND_PGTABLE, _new(ioasid_unbind_pgtable, ioasid=ioasid))

    def bind_pasid_table(self, ioasid, table, entries, fmt=IOASID_PASID_TABLE_FLAT_X86_64):
        ioctl_struct(
            self,
            IOASID_BIND_PASID_TABLE,
            _new(ioasid_bind_pasid_table, ioasid=ioasid, format=fmt, table=table, entries=entries),
        )

    def unbind_pasid_table(self, ioasid):
        ioctl_struct(
            self, IOASID_UNBIND_PASID_TABLE, _new(ioasid_unbind_pasid_table, ioasid=ioasid)
        )

    def invalidate_cache(self, ioasid, addr=None, size=None, pasid=None, pasid_cache=False):
        """Everything by default; a range with addr/size; one PASID with
        pasid; PASID-table entries with pasid_cache=True."""
        flags = 0
        if addr is not None or size is not None:
            flags |= IOASID_INVALIDATE_ADDR
        if pasid is not None:
            flags |= IOASID_INVALIDATE_PASID
        if pasid_cache:
            flags |= IOASID_INVALIDATE_PASID_CACHE
        ioctl_struct(
            self,
            IOASID_INVALIDATE_CACHE,
            _new(
                ioasid_invalidate_cache,
                flags=flags,
                ioasid=ioasid,
                pasid=pasid or 0,
                addr=addr or 0,
                size=size or 0,
            ),
        )

    def daemon_identify(self):
        """Daemon-private; any other caller gets EPERM."""
        return ioctl_int(self, IOASID_DAEMON_IDENTIFY, 0)


# ---------------------------------------------------------------------------
# Device commands (on /dev/vfio/devices/devN)
# ---------------------------------------------------------------------------


def bind_ioasid_fd(device_fd, ioasid_fd):
    ioctl_int(device_fd, VFIO_BIND_IOASID_FD, _fileno(ioasid_fd))


def unbind_ioasid_fd(device_fd, ioasid_fd):
    ioctl_int(device_fd, VFIO_UNBIND_IOASID_FD, _fileno(ioasid_fd))


def _attach_arg(ioasid, pasid):
    if pasid is None:
        return _new(vfio_attach_ioasid, ioasid=ioasid)
    return _new(vfio_attach_ioasid, flags=IOASID_ATTACH_USER_PASID, ioasid=ioasid, user_pasid=pasid)


def attach_ioasid(device_fd, ioasid, pasid=None):
    """RID attach, or attach under the user PASID `pasid`."""
    ioctl_struct(device_fd, VFIO_ATTACH_IOASID, _attach_arg(ioasid, pasid))


def detach_ioasid(device_fd, ioasid, pasid=None):
    ioctl_struct(device_fd, VFIO_DETACH_IOASID, _attach_arg(ioasid, pasid))
