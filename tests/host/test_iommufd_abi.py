"""Host test: the Python iommufd client (python/cuse_ioasid/iommufd.py) against
the kernel's own headers, <linux/iommufd.h> and <linux/vfio.h> from Debian
sid's linux-libc-dev (tests/host/uapi_headers.py fetches and caches it), as
the C compiler lays them out; plus the client's pure logic: the IOVA
allocator model and error reporting.

Run: /usr/bin/python3 -m pytest tests/host
"""

import ctypes
import errno
import os
import re
import shutil
import subprocess

import pytest

import uapi_headers
from cuse_ioasid import iommufd as fd_abi

# The commands of Linux 7.1's <linux/iommufd.h> (iommufd-bindings 0.2.0).
COMMANDS_7_1 = range(0x80, 0x95)


def _mirror_structs():
    return {
        name: cls
        for name, cls in vars(fd_abi).items()
        if isinstance(cls, type) and issubclass(cls, ctypes.Structure) and not name.startswith("_")
    }


def _mirror_consts():
    return {
        name: value
        for name, value in vars(fd_abi).items()
        if re.fullmatch(r"(IOMMU|IOMMUFD|VFIO)_[A-Z0-9_]+", name) and isinstance(value, int)
    }


def _fields(cls):
    """(C field name, offset, size) of every field, anonymous unions
    flattened, `reserved*` spelled as the header spells it."""
    out = []
    for name, _ in cls._fields_:
        f = getattr(cls, name)
        if name in getattr(cls, "_anonymous_", ()):
            inner = f.offset
            union = dict(cls._fields_)[name]
            for member, _ in union._fields_:
                m = getattr(union, member)
                out.append((member, inner + m.offset, m.size))
            continue
        c_name = "__" + name if name.startswith("reserved") else name
        out.append((c_name, f.offset, f.size))
    return out


@pytest.fixture(scope="module")
def header():
    version, include = uapi_headers.linux_libc_dev()
    print(f"linux-libc-dev {version}")
    assert (include / "linux" / "iommufd.h").exists(), f"no iommufd.h in linux-libc-dev {version}"
    return version, include


@pytest.fixture(scope="module")
def c_layout(header, tmp_path_factory):
    """sizeof/offsetof/values of everything the mirror has, from the C
    compiler."""
    _, include = header
    cc = shutil.which("cc")
    assert cc, "a C compiler (cc) is needed to check the layout"
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/iommufd.h>",
             "#include <linux/vfio.h>", "int main(void) {"]
    for name, cls in _mirror_structs().items():
        lines.append(f'printf("struct {name} %zu\\n", sizeof(struct {name}));')
        for field, _, _ in _fields(cls):
            lines.append(f'printf("field {name} {field} %zu %zu\\n", '
                         f"offsetof(struct {name}, {field}), "
                         f"sizeof(((struct {name} *)0)->{field}));")
    for name in _mirror_consts():
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
    lines.append("return 0; }")
    work = tmp_path_factory.mktemp("iommufd_layout")
    src = work / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    multiarch = subprocess.run([cc, "-print-multiarch"], capture_output=True, text=True).stdout
    incs = ["-I", str(include)]
    if multiarch.strip():
        incs += ["-I", str(include / multiarch.strip())]
    exe = work / "layout"
    subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", *incs, str(src), "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    structs, fields, consts = {}, {}, {}
    for line in out.splitlines():
        w = line.split()
        if w[0] == "struct":
            structs[w[1]] = int(w[2])
        elif w[0] == "field":
            fields.setdefault(w[1], []).append((w[2], int(w[3]), int(w[4])))
        else:
            consts[w[1]] = int(w[2])
    return structs, fields, consts


def test_struct_sizes_and_fields(c_layout):
    structs, fields, _ = c_layout
    for name, cls in _mirror_structs().items():
        assert ctypes.sizeof(cls) == structs[name], name
        assert _fields(cls) == fields[name], name


def test_constants(c_layout):
    _, _, consts = c_layout
    for name, value in _mirror_consts().items():
        c = consts[name]
        assert c == value or (c < 0 and c & 0xFFFFFFFF == value), f"{name}: C {c}, mirror {value}"


def test_every_command_of_7_1_is_mirrored_with_its_struct(header):
    _, include = header
    text = (include / "linux" / "iommufd.h").read_text()
    in_header = {int(v, 16) for v in re.findall(r"IOMMUFD_CMD_\w+ = (0x[0-9a-f]+)", text)}
    assert set(COMMANDS_7_1) <= in_header | {0x80}
    mirrored = {r & 0xFF for r in fd_abi.MIN_SIZE_FIELD if (r >> 8) == fd_abi.IOMMUFD_TYPE}
    assert {r for r in mirrored if r >= 0x80} == set(COMMANDS_7_1)
    newer = sorted(in_header - set(COMMANDS_7_1) - {0x80})
    if newer:
        print(f"commands newer than 7.1 in this header (not served): {[hex(n) for n in newer]}")
    # Every struct that starts with `__u32 size;` is a command argument.
    commands = set(re.findall(r"^struct (\w+) \{\n\t__u32 size;", text, re.M))
    assert commands <= set(_mirror_structs()), commands - set(_mirror_structs())


def test_minimum_sizes_are_the_kernel_table():
    # main.c's IOCTL_OP rows and the cdev handlers' minsz, spelled out.
    expect = {
        fd_abi.IOMMU_DESTROY: 8, fd_abi.IOMMU_IOAS_ALLOC: 12, fd_abi.IOMMU_IOAS_ALLOW_IOVAS: 24,
        fd_abi.IOMMU_IOAS_COPY: 40, fd_abi.IOMMU_IOAS_IOVA_RANGES: 32, fd_abi.IOMMU_IOAS_MAP: 40,
        fd_abi.IOMMU_IOAS_UNMAP: 24, fd_abi.IOMMU_OPTION: 24, fd_abi.IOMMU_VFIO_IOAS: 12,
        fd_abi.IOMMU_HWPT_ALLOC: 24, fd_abi.IOMMU_GET_HW_INFO: 32,
        fd_abi.IOMMU_HWPT_SET_DIRTY_TRACKING: 16, fd_abi.IOMMU_HWPT_GET_DIRTY_BITMAP: 48,
        fd_abi.IOMMU_HWPT_INVALIDATE: 32, fd_abi.IOMMU_FAULT_QUEUE_ALLOC: 16,
        fd_abi.IOMMU_IOAS_MAP_FILE: 40, fd_abi.IOMMU_VIOMMU_ALLOC: 24,
        fd_abi.IOMMU_VDEVICE_ALLOC: 24, fd_abi.IOMMU_IOAS_CHANGE_PROCESS: 8,
        fd_abi.IOMMU_VEVENTQ_ALLOC: 28, fd_abi.IOMMU_HW_QUEUE_ALLOC: 40,
        fd_abi.VFIO_DEVICE_BIND_IOMMUFD: 16, fd_abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT: 12,
        fd_abi.VFIO_DEVICE_DETACH_IOMMUFD_PT: 8, fd_abi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: 12,
        fd_abi.VFIO_DEVICE_PCI_HOT_RESET: 12,
    }
    assert {r: fd_abi.min_size(r) for r in expect} == expect


def test_numbers_are_pinned():
    assert fd_abi.IOMMU_DESTROY == 0x3B80
    assert fd_abi.IOMMU_IOAS_MAP == 0x3B85
    assert fd_abi.IOMMU_GET_HW_INFO == 0x3B8A
    assert fd_abi.IOMMU_IOAS_MAP_FILE == 0x3B8F
    assert fd_abi.IOMMU_HW_QUEUE_ALLOC == 0x3B94
    assert fd_abi.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76
    assert fd_abi.VFIO_DEVICE_ATTACH_IOMMUFD_PT == 0x3B77
    assert fd_abi.VFIO_DEVICE_DETACH_IOMMUFD_PT == 0x3B78
    assert fd_abi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO == 0x3B70


# ---------------------------------------------------------------------------
# The IOVA allocator model (io_pagetable.c, iopt_alloc_iova)
# ---------------------------------------------------------------------------

PAGE = fd_abi.PAGE_SIZE
VTD_39 = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]  # VT-d 39 bits, MSI window out


def test_alloc_never_gives_iova_0_and_keeps_the_address_alignment():
    # 8 KiB at an address aligned to 8 KiB: aligned to 8 KiB, from PAGE up.
    assert fd_abi.alloc_iova_model(VTD_39, [], 0x7F0000002000, 0x2000) == 0x2000
    # 8 KiB at an address aligned to 4 KiB only: 4 KiB alignment suffices.
    assert fd_abi.alloc_iova_model(VTD_39, [], 0x7F0000001000, 0x2000) == 0x1000
    # address 0 (a file offset): the length's power of two.
    assert fd_abi.alloc_iova_model(VTD_39, [], 0, 0x3000) == 0x4000


def test_alloc_caps_alignment_at_a_huge_page_and_skips_used_ranges():
    assert fd_abi.alloc_iova_model(VTD_39, [], 0x7F0040000000, 1 << 30) == 2 << 20
    used = [(0x2000, 0x3FFF)]
    assert fd_abi.alloc_iova_model(VTD_39, used, 0x7F0000002000, 0x2000) == 0x4000
    # A hole too small is skipped; the allocation lands past the MSI window
    # only when nothing fits below it.
    used = [(PAGE, 0xFEDFFFFF)]
    assert fd_abi.alloc_iova_model(VTD_39, used, 0x7F0000001000, PAGE) == 0xFEF00000


def test_alloc_respects_allowed_ranges_and_reports_no_space():
    allowed = [(0x100000, 0x1FFFFF)]
    assert fd_abi.alloc_iova_model(VTD_39, [], 0x7F0000001000, PAGE, allowed) == 0x100000
    assert fd_abi.alloc_iova_model(VTD_39, [], 0x7F0000001000, 2 << 20, allowed) is None
    assert fd_abi.alloc_iova_model([(0, 0xFFFF)], [], 0x7F0000200000, 0x400000) is None


def test_errors_carry_the_errno():
    # /dev/null answers every ioctl with ENOTTY: the client must surface it.
    null = os.open("/dev/null", os.O_RDWR)
    try:
        f = fd_abi.Iommufd(fd=null)
        for call in (f.ioas_alloc, lambda: f.destroy(1), lambda: f.map(1, 0x1000, PAGE),
                     lambda: fd_abi.bind_iommufd(null, null), lambda: fd_abi.attach_pt(null, 1)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.ENOTTY
    finally:
        os.close(null)
