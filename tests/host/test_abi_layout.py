"""Host test: the Python ABI mirror (python/cuse_ioasid/ioasid.py) against the C
header, as the C compiler lays it out (uapi/tests/layout.c), plus the
client's decoding and error reporting, which need no daemon.

Run: /usr/bin/python3 -m pytest tests/host
"""

import ctypes
import errno
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEADER_DIR = REPO / "uapi" / "include"
HEADER = HEADER_DIR / "linux" / "ioasid.h"
LAYOUT_C = REPO / "uapi" / "tests" / "layout.c"


def _load_mirror():
    spec = importlib.util.spec_from_file_location(
        "ioasid_mirror", REPO / "python" / "cuse_ioasid" / "ioasid.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ioasid = _load_mirror()


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    cc = shutil.which("cc")
    assert cc, "a C compiler (cc) is needed to check the layout"
    exe = tmp_path_factory.mktemp("layout") / "layout"
    subprocess.run(
        [cc, "-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror",
         "-I", str(HEADER_DIR), str(LAYOUT_C), "-o", str(exe)],
        check=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    structs, fields, consts = {}, {}, {}
    for line in out.splitlines():
        w = line.split()
        if w[0] == "struct":
            structs[w[1]] = int(w[2])
        elif w[0] == "field":
            fields.setdefault(w[1], []).append((w[2].lstrip("_"), int(w[3]), int(w[4])))
        elif w[0] == "const":
            consts[w[1]] = int(w[2])
        else:
            raise AssertionError(f"unexpected line {line!r}")
    return structs, fields, consts


def _mirror_structs():
    return {
        name: obj
        for name, obj in vars(ioasid).items()
        if isinstance(obj, type) and issubclass(obj, ctypes.Structure)
    }


def _mirror_consts():
    return {
        name: value
        for name, value in vars(ioasid).items()
        if re.fullmatch(r"(IOASID|VFIO)_[A-Z0-9_]+", name) and isinstance(value, int)
    }


def test_layout_c_covers_the_header(c_layout):
    structs, _, consts = c_layout
    text = HEADER.read_text()
    in_header = set(re.findall(r"^struct (\w+) \{", text, re.M))
    macros = set(re.findall(r"^#define (\w+)", text, re.M)) - {"_UAPI_LINUX_IOASID_H"}
    assert set(structs) == in_header
    assert set(consts) == macros


def test_same_structs(c_layout):
    structs, _, _ = c_layout
    assert set(_mirror_structs()) == set(structs)


def test_struct_sizes_and_fields(c_layout):
    structs, fields, _ = c_layout
    for name, cls in _mirror_structs().items():
        assert ctypes.sizeof(cls) == structs[name], name
        mine = [
            (f, getattr(cls, f).offset, getattr(cls, f).size) for f, _ in cls._fields_
        ]
        assert mine == fields[name], name


def test_same_constants(c_layout):
    _, _, consts = c_layout
    mine = _mirror_consts()
    assert set(mine) == set(consts)
    for name, value in consts.items():
        assert mine[name] == value, name


def test_numbers_are_pinned():
    assert ioasid.IOASID_CHECK_EXTENSION == 0x3B20
    assert ioasid.IOASID_MAP_DMA == 0x3B26
    assert ioasid.IOASID_INVALIDATE_CACHE == 0x3B2D
    assert ioasid.IOASID_DAEMON_IDENTIFY == 0x3B5F
    assert ioasid.VFIO_BIND_IOASID_FD == 0x3B7A
    assert ioasid.VFIO_DETACH_IOASID == 0x3B7D


def _cap(cls, cap_id, nxt, **fields):
    return bytes(cls(header=ioasid.ioasid_info_cap_header(id=cap_id, version=1, next=nxt), **fields))


def test_parse_info_walks_every_capability():
    base = ctypes.sizeof(ioasid.ioasid_info)
    parts = []
    off = base
    ranges = _cap(ioasid.ioasid_info_cap_iova_ranges, ioasid.IOASID_INFO_CAP_IOVA_RANGES, 0,
                  nr_ranges=2)
    ranges += bytes(ioasid.ioasid_iova_range(0, 0xFEDFFFFF))
    ranges += bytes(ioasid.ioasid_iova_range(0xFEF00000, 0xFFFFFFFFFFFF))
    chunks = [
        ranges,
        _cap(ioasid.ioasid_info_cap_nesting, ioasid.IOASID_INFO_CAP_NESTING, 0,
             flags=ioasid.IOASID_NESTING_SOFTWARE, levels=1),
        _cap(ioasid.ioasid_info_cap_pgtable_formats, ioasid.IOASID_INFO_CAP_PGTABLE_FORMATS, 0,
             nr_formats=1)
        + bytes(ioasid.ioasid_pgtable_format_desc(
            format=ioasid.IOASID_PGTABLE_X86_64_4LVL,
            flags=ioasid.IOASID_PGTABLE_FORMAT_SHADOWED,
            addr_width=48, pgsize_bitmap=0x40201000)),
        _cap(ioasid.ioasid_info_cap_pasid, ioasid.IOASID_INFO_CAP_PASID, 0,
             flags=ioasid.IOASID_PASID_ATTACH_TRACKED, pasid_bits=20,
             pasid_table_format=ioasid.IOASID_PASID_TABLE_FLAT_X86_64),
        _cap(ioasid.ioasid_info_cap_parent, ioasid.IOASID_INFO_CAP_PARENT, 0, parent=3),
        _cap(ioasid.ioasid_info_cap_dma_avail, ioasid.IOASID_INFO_CAP_DMA_AVAIL, 0, avail=65530),
        _cap(ioasid.ioasid_info_cap_shadow, ioasid.IOASID_INFO_CAP_SHADOW, 0,
             flags=ioasid.IOASID_SHADOW_PGTABLE | ioasid.IOASID_SHADOW_TRUNCATED,
             shadow_entries=3, leaves=4, last_walk_leaves=5, last_walk_malformed=6,
             last_walk_tables=7, malformed=8, walks=9, pasid_entries=10, pasid_valid=11,
             pasid_bad=12, pasid_unreadable=13, pasid_leaves=14, pasid_malformed=15),
    ]
    # Link them: each header's next is the offset of the following chunk.
    offsets = []
    for c in chunks:
        offsets.append(off)
        off += len(c)
    for i, c in enumerate(chunks):
        nxt = offsets[i + 1] if i + 1 < len(chunks) else 0
        b = bytearray(c)
        b[4:8] = nxt.to_bytes(4, "little")
        parts.append(bytes(b))
    flags = ioasid.IOASID_INFO_PGSIZES | ioasid.IOASID_INFO_CAPS | ioasid.IOASID_INFO_NESTED
    head = bytes(ioasid.ioasid_info(argsz=off, flags=flags, ioasid=4, cap_offset=base,
                                    pgsize_bitmap=0x40201000))
    info = ioasid.parse_info(head + b"".join(parts))
    assert info["flags"] == flags
    assert info["pgsize_bitmap"] == 0x40201000
    caps = info["caps"]
    assert caps["iova_ranges"] == [(0, 0xFEDFFFFF), (0xFEF00000, 0xFFFFFFFFFFFF)]
    assert caps["nesting"] == {"flags": 1, "software": True, "hardware": False, "levels": 1}
    assert caps["pgtable_formats"] == [{
        "format": 1, "flags": 1, "shadowed": True, "addr_width": 48,
        "pgsize_bitmap": 0x40201000}]
    assert caps["pasid"]["tracked"] and not caps["pasid"]["routed"]
    assert caps["pasid"]["pasid_table_format"] == ioasid.IOASID_PASID_TABLE_FLAT_X86_64
    assert caps["parent"] == 3
    assert caps["dma_avail"] == 65530
    shadow = caps["shadow"]
    assert shadow["pgtable"] and shadow["truncated"] and not shadow["pasid_table"]
    assert [shadow[n] for n in ioasid.SHADOW_FIELDS[1:]] == list(range(3, 16))


def test_parse_info_of_an_empty_ioasid():
    info = ioasid.parse_info(bytes(ioasid.ioasid_info(argsz=24, ioasid=1)))
    assert info == {"flags": 0, "pgsize_bitmap": 0, "argsz": 24, "caps": {}}


@pytest.mark.parametrize("cap_offset,next_", [(24, 24), (25, 0), (4096, 0)])
def test_parse_info_rejects_malformed_chains(cap_offset, next_):
    head = bytes(ioasid.ioasid_info(argsz=40, flags=ioasid.IOASID_INFO_CAPS, cap_offset=cap_offset))
    cap = _cap(ioasid.ioasid_info_cap_parent, ioasid.IOASID_INFO_CAP_PARENT, next_, parent=1)
    with pytest.raises(ValueError):
        ioasid.parse_info(head + cap + bytes(8))


def test_errors_carry_the_errno():
    # /dev/null answers every ioctl with ENOTTY: the client must surface it.
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        f = ioasid.IoasidFd(fd=fd)
        with pytest.raises(OSError) as e:
            f.alloc()
        assert e.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as e:
            f.map_dma(1, iova=0, vaddr=0x1000, size=0x1000)
        assert e.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as e:
            ioasid.attach_ioasid(fd, 1, pasid=5)
        assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


def test_ioctl_struct_builds_the_argument_as_asked():
    m = ioasid._new(ioasid.ioasid_dma_map, ioasid=2, size=4096)
    assert m.argsz == 40
    a = ioasid._attach_arg(3, 7)
    assert (a.argsz, a.flags, a.ioasid, a.user_pasid) == (16, ioasid.IOASID_ATTACH_USER_PASID, 3, 7)
    a = ioasid._attach_arg(3, None)
    assert (a.flags, a.user_pasid) == (0, 0)
