"""/dev/ioasid through the real CUSE node, with no device involved.

Every test is a client of the daemon (this process, and child processes
where the point is another process): extensions, IOASID numbering, the
never-attached state, the extensible-struct rules on the real node
(iommufd's TEST_LENGTH pattern), errnos for bad pointers, unknown ioctls and
the daemon-private command, memory registration, per-file isolation, and
that the daemon is still the same healthy process at the end.

    tests/c/build && scripts/vm --daemon -- \
        /usr/bin/python3 -m pytest tests/scenarios/test_ioasid_node.py -v

Without --daemon the module starts the daemon itself (target/debug/
cuse-ioasid, or $CUSE_IOASID_DAEMON) and checks that it exits 0 on SIGTERM
at the end; that way one VM boot can also run the legacy VFIO scenarios,
which need the IOMMU groups the daemon would otherwise hold.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import multiprocessing
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, in_test_vm
from cuse_ioasid import ioasid as io
from harness.daemon import daemon_pids, errno_of
from cuse_ioasid.vfio import DmaBuffer

PAGE = mmap.PAGESIZE
C_BASIC = REPO / "target" / "c" / "ioasid_basic"

pytestmark = [
    pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm"),
    pytest.mark.usefixtures("daemon"),
]

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
libc.ioctl.restype = ctypes.c_int


# ---------------------------------------------------------------------------
# The daemon: the one scripts/vm --daemon started, or one of our own.
# ---------------------------------------------------------------------------


@pytest.fixture
def fd():
    with io.IoasidFd() as f:
        yield f


def raw_ioctl(fd, request: int, arg: int) -> int:
    """ioctl with an arbitrary pointer-sized argument; returns 0 or the errno."""
    ret = libc.ioctl(io._fileno(fd), request, arg)
    return ctypes.get_errno() if ret < 0 else 0


# ---------------------------------------------------------------------------
# Extensions
# ---------------------------------------------------------------------------

# The commands of each extension (the header's table).
EXTENSION_COMMANDS = {
    io.IOASID_EXT_NESTING_SOFTWARE: [io.IOASID_CREATE_NESTING],
    io.IOASID_EXT_BIND_PGTABLE_SHADOW: [
        io.IOASID_BIND_PGTABLE,
        io.IOASID_UNBIND_PGTABLE,
        io.IOASID_INVALIDATE_CACHE,
    ],
    io.IOASID_EXT_BIND_PASID_TABLE_SHADOW: [
        io.IOASID_BIND_PASID_TABLE,
        io.IOASID_UNBIND_PASID_TABLE,
    ],
}


def test_extensions_the_daemon_provides_and_those_it_cannot(fd):
    assert fd.check_extension(io.IOASID_EXT_TYPE1V2_DMA) == 1
    assert fd.check_extension(io.IOASID_EXT_REGISTER_MEMORY) == 1
    assert fd.check_extension(io.IOASID_EXT_USER_PASID_TRACKED) == 1
    # Legacy VFIO can never do these two.
    assert fd.check_extension(io.IOASID_EXT_NESTING_HARDWARE) == 0
    assert fd.check_extension(io.IOASID_EXT_PASID_DMA_ROUTING) == 0
    # Nesting and page-table binding: answered 0 or 1 (their commands are
    # checked against the answer below).
    for ext in EXTENSION_COMMANDS:
        assert fd.check_extension(ext) in (0, 1), f"extension {ext}"
    for ext in (0, 9, 1000, 0xFFFFFFFF, (1 << 32) | io.IOASID_EXT_TYPE1V2_DMA):
        assert libc.ioctl(fd.fileno(), io.IOASID_CHECK_EXTENSION, ext) == 0, (
            f"unknown extension {ext:#x}"
        )


@pytest.mark.parametrize(
    "ext,cmd",
    [(ext, cmd) for ext, cmds in EXTENSION_COMMANDS.items() for cmd in cmds],
    ids=lambda v: f"{v:#x}",
)
def test_commands_follow_their_extension(fd, ext, cmd):
    """A command of an extension answered 0 is ENOTTY, as if unknown; one
    answered 1 is served (it fails here for other reasons: the IOASID has
    no device)."""
    provided = fd.check_extension(ext)
    gpa = fd.alloc()
    arg = bytearray(64)
    arg[0:4] = (32).to_bytes(4, "little")
    arg[8:12] = gpa.to_bytes(4, "little")
    buf = (ctypes.c_char * len(arg)).from_buffer(arg)
    for argument in (ctypes.addressof(buf), gpa):  # a struct, or an integer
        got = raw_ioctl(fd, cmd, argument)
        if provided:
            assert got not in (0, errno.ENOTTY), f"{cmd:#x} answered {got}"
        else:
            assert got == errno.ENOTTY, f"{cmd:#x} answered {got}, extension {ext} is 0"
    del buf


# ---------------------------------------------------------------------------
# ALLOC, FREE, GET_INFO and the never-attached state
# ---------------------------------------------------------------------------


def test_alloc_numbers_from_1_and_free(fd):
    assert [fd.alloc() for _ in range(3)] == [1, 2, 3]
    fd.free(2)
    assert errno_of(fd.free, 2) == errno.ENOENT, "second FREE of the same IOASID"
    for never in (0, 4, 99, io.IOASID_MAX_ID):
        assert errno_of(fd.free, never) == errno.ENOENT, f"FREE({never})"
    # The others are untouched by the failed FREEs.
    assert fd.get_info(1)["flags"] == 0
    assert fd.get_info(3)["flags"] == 0
    assert errno_of(fd.get_info, 2) == errno.ENOENT
    # ALLOC with garbage in the ignored third argument still allocates.
    assert raw_ioctl(fd, io.IOASID_ALLOC, 0xDEADBEEF) == 0
    fd.free(1)
    fd.free(3)


def test_get_info_of_a_never_attached_ioasid_is_empty(fd):
    gpa = fd.alloc()
    arg = io.ioasid_info(argsz=ctypes.sizeof(io.ioasid_info), flags=0xFFFFFFFF, ioasid=gpa,
                         cap_offset=0x1234, pgsize_bitmap=0xFFFF)
    ret, out, tail = io.ioctl_struct(fd, io.IOASID_GET_INFO, arg, tail=b"\xaa" * 64)
    assert ret == 0
    assert (out.flags, out.cap_offset, out.pgsize_bitmap) == (0, 0, 0)
    assert out.argsz == ctypes.sizeof(io.ioasid_info) + 64, "argsz must be left alone"
    assert out.ioasid == gpa
    assert tail == b"\xaa" * 64, "nothing may be written past the struct"
    assert errno_of(fd.get_info, gpa + 1) == errno.ENOENT


def test_map_and_unmap_before_any_attach_are_enodev(fd):
    gpa = fd.alloc()
    with DmaBuffer(4 * PAGE) as mem:
        assert errno_of(fd.map_dma, gpa, iova=0x100000, vaddr=mem.addr, size=PAGE) == errno.ENODEV
        assert errno_of(fd.unmap_dma, gpa, 0x100000, PAGE) == errno.ENODEV
        assert errno_of(fd.unmap_all, gpa) == errno.ENODEV
        # An unknown IOASID is ENOENT, not ENODEV.
        assert errno_of(fd.map_dma, gpa + 7, iova=0, vaddr=mem.addr, size=PAGE) == errno.ENOENT
    # FREE is allowed before an attach.
    fd.free(gpa)


# ---------------------------------------------------------------------------
# The extensible-struct rules on the real node (TEST_LENGTH)
# ---------------------------------------------------------------------------


def _cases(fd, mem, gpa):
    """(name, request, struct, errno of the exact call) for every struct
    command the daemon serves."""
    return {
        "REGISTER_MEMORY": (
            io.IOASID_REGISTER_MEMORY,
            io.ioasid_register_memory(vaddr=mem.addr, size=2 * PAGE),
            0,
        ),
        "UNREGISTER_MEMORY": (
            io.IOASID_UNREGISTER_MEMORY,
            io.ioasid_register_memory(vaddr=mem.addr + 2 * PAGE, size=PAGE),
            errno.ENOENT,  # nothing registered there: the struct was accepted
        ),
        "GET_INFO": (io.IOASID_GET_INFO, io.ioasid_info(ioasid=gpa), 0),
        "MAP_DMA": (
            io.IOASID_MAP_DMA,
            io.ioasid_dma_map(flags=io.IOASID_DMA_MAP_FLAG_READ, ioasid=gpa,
                              vaddr=mem.addr, iova=0x100000, size=PAGE),
            errno.ENODEV,  # never attached: the struct was accepted
        ),
        "UNMAP_DMA": (
            io.IOASID_UNMAP_DMA,
            io.ioasid_dma_unmap(ioasid=gpa, iova=0x100000, size=PAGE),
            errno.ENODEV,
        ),
    }


STRUCT_COMMANDS = ["REGISTER_MEMORY", "UNREGISTER_MEMORY", "GET_INFO", "MAP_DMA", "UNMAP_DMA"]


def _call(fd, req, obj, argsz=None, tail=b""):
    try:
        io.ioctl_struct(fd, req, obj, argsz=argsz, tail=tail)
    except OSError as e:
        return e.errno
    return 0


@pytest.mark.parametrize("name", STRUCT_COMMANDS)
def test_length_rules(fd, name):
    gpa = fd.alloc()
    with DmaBuffer(4 * PAGE) as mem:
        req, obj, exact = _cases(fd, mem, gpa)[name]
        size = ctypes.sizeof(obj)

        def undo():
            if name == "REGISTER_MEMORY":
                fd.unregister_memory(mem.addr, 2 * PAGE)

        for short in (0, 4, size - 1):
            assert _call(fd, req, obj, argsz=short) == errno.EINVAL, f"argsz {short}"
        assert _call(fd, req, obj) == exact, "argsz exact"
        undo()
        assert _call(fd, req, obj, tail=bytes(8)) == exact, "8 zero bytes past the struct"
        undo()
        assert _call(fd, req, obj, tail=bytes(3000)) == exact, "3000 zero bytes past the struct"
        undo()
        tail = bytearray(64)
        tail[63] = 1
        if name == "GET_INFO":
            # The bytes past ioasid_info are its output buffer, never E2BIG.
            assert _call(fd, req, obj, tail=bytes(tail)) == 0
        else:
            assert _call(fd, req, obj, tail=bytes(tail)) == errno.E2BIG, "non-zero tail"
            assert _call(fd, req, obj, tail=bytes(64 * 1024 + 8)) == errno.E2BIG, (
                "a tail over 64 KiB is refused unread"
            )
        # Nothing happened on the way: no registration was left behind.
        assert errno_of(fd.unregister_memory, mem.addr, 2 * PAGE) == errno.ENOENT


def test_unknown_flags_and_nonzero_reserved_are_einval(fd):
    gpa = fd.alloc()
    with DmaBuffer(2 * PAGE) as mem:
        # register_memory defines no flag.
        for flags in (1, 1 << 31):
            assert errno_of(fd.register_memory, mem.addr, PAGE, flags=flags) == errno.EINVAL
        # map_dma defines READ and WRITE only.
        for flags in (1 << 2, 1 << 31):
            assert errno_of(fd.map_dma, gpa, 0x100000, mem.addr, PAGE, flags=flags) == errno.EINVAL
        # unmap_dma defines FLAG_ALL (1 << 1) only.
        for flags in (1 << 0, 1 << 2):
            assert errno_of(fd.unmap_dma, gpa, 0x100000, PAGE, flags=flags) == errno.EINVAL
        m = io.ioasid_dma_map(flags=io.IOASID_DMA_MAP_FLAG_READ, ioasid=gpa, reserved=1,
                              vaddr=mem.addr, iova=0x100000, size=PAGE)
        assert _call(fd, io.IOASID_MAP_DMA, m) == errno.EINVAL
        u = io.ioasid_dma_unmap(ioasid=gpa, reserved=0x80000000, iova=0x100000, size=PAGE)
        assert _call(fd, io.IOASID_UNMAP_DMA, u) == errno.EINVAL
    # None of it registered anything.
    assert errno_of(fd.unregister_memory, mem.addr, PAGE) == errno.ENOENT


# ---------------------------------------------------------------------------
# Bad pointers, unknown ioctls, the daemon-private command
# ---------------------------------------------------------------------------


def _unmapped_page() -> int:
    """The address of a page that is certainly not mapped any more."""
    m = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    # from_buffer pins the export; drop it before closing.
    import gc

    gc.collect()
    m.close()
    return addr


@pytest.mark.parametrize("name", STRUCT_COMMANDS)
def test_bad_pointer_is_efault(fd, name):
    gpa = fd.alloc()
    req = {
        "REGISTER_MEMORY": io.IOASID_REGISTER_MEMORY,
        "UNREGISTER_MEMORY": io.IOASID_UNREGISTER_MEMORY,
        "GET_INFO": io.IOASID_GET_INFO,
        "MAP_DMA": io.IOASID_MAP_DMA,
        "UNMAP_DMA": io.IOASID_UNMAP_DMA,
    }[name]
    assert raw_ioctl(fd, req, 0) == errno.EFAULT, "NULL"
    assert raw_ioctl(fd, req, 8) == errno.EFAULT, "address 8"
    assert raw_ioctl(fd, req, _unmapped_page()) == errno.EFAULT, "an unmapped page"
    # A struct whose argsz is readable but whose body runs into an
    # unmapped page.
    two = mmap.mmap(-1, 2 * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(two))
    libc.munmap.argtypes = [ctypes.c_ulong, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_ulong, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + PAGE, PAGE, 0) == 0  # PROT_NONE
    at = base + PAGE - 8
    ctypes.memmove(at, (40).to_bytes(4, "little") + bytes(4), 8)
    assert raw_ioctl(fd, req, at) == errno.EFAULT, "struct straddling into PROT_NONE"
    assert libc.mprotect(base + PAGE, PAGE, 3) == 0
    # The IOASID is untouched.
    assert fd.get_info(gpa)["flags"] == 0


@pytest.mark.parametrize(
    "request_",
    [
        io._io(io.IOASID_TYPE, io.IOASID_BASE + 14),  # first free number after the RFC's
        io._io(io.IOASID_TYPE, io.IOASID_BASE + 62),
        io._io(io.IOASID_TYPE, 0x64),  # VFIO_GET_API_VERSION: a container command
        io._io(io.IOASID_TYPE, 0x80),  # IOMMU_DESTROY: an iommufd command
        io.VFIO_BIND_IOASID_FD,  # a device command on the ioasid file
        io.VFIO_ATTACH_IOASID,
        io._io(ord("X"), 1),
        0xC0185A01,  # with size and direction bits
    ],
    ids=lambda v: f"{v:#x}",
)
def test_unknown_ioctl_is_enotty(fd, request_):
    buf = ctypes.create_string_buffer(64)
    assert raw_ioctl(fd, request_, ctypes.addressof(buf)) == errno.ENOTTY


def _identify_in_child(q):
    try:
        with io.IoasidFd() as f:
            f.daemon_identify()
        q.put(0)
    except OSError as e:
        q.put(e.errno)


def test_daemon_identify_is_eperm_for_clients(fd):
    assert errno_of(fd.daemon_identify) == errno.EPERM
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_identify_in_child, args=(q,))
    p.start()
    assert q.get(timeout=60) == errno.EPERM
    p.join(60)
    assert p.exitcode == 0


# ---------------------------------------------------------------------------
# Memory registration
# ---------------------------------------------------------------------------


def test_register_and_unregister_memfd_memory(fd):
    with DmaBuffer(8 * PAGE) as mem:
        fd.register_memory(mem.addr, 4 * PAGE)
        fd.register_memory(mem.page(4), 2 * PAGE)  # adjacent: no overlap
        assert errno_of(fd.register_memory, mem.page(3), 2 * PAGE) == errno.EEXIST
        assert errno_of(fd.register_memory, mem.addr, 4 * PAGE) == errno.EEXIST
        # Unregister names a registration exactly.
        assert errno_of(fd.unregister_memory, mem.addr, 2 * PAGE) == errno.ENOENT
        assert errno_of(fd.unregister_memory, mem.page(1), 3 * PAGE) == errno.ENOENT
        assert errno_of(fd.unregister_memory, mem.page(6), 2 * PAGE) == errno.ENOENT
        fd.unregister_memory(mem.addr, 4 * PAGE)
        assert errno_of(fd.unregister_memory, mem.addr, 4 * PAGE) == errno.ENOENT
        fd.unregister_memory(mem.page(4), 2 * PAGE)
        # Malformed ranges.
        assert errno_of(fd.register_memory, mem.addr + 8, PAGE) == errno.EINVAL
        assert errno_of(fd.register_memory, mem.addr, PAGE + 8) == errno.EINVAL
        assert errno_of(fd.register_memory, mem.addr, 0) == errno.EINVAL
        assert errno_of(fd.register_memory, 0xFFFFFFFFFFFFF000, 2 * PAGE) == errno.EINVAL
        # The whole range is free again.
        fd.register_memory(mem.addr, 8 * PAGE)
        fd.unregister_memory(mem.addr, 8 * PAGE)


def _mapping(flags: int, size: int, fileno: int = -1):
    m = mmap.mmap(fileno, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:1] = b"x"  # populate
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_private_memory_registers_and_unmapped_memory_is_efault(fd):
    """Private memory registers (its maps are pinned by this process's own
    thread, tests/scenarios/test_private_memory.py; with
    --no-private-memory it is EFAULT, test_private_memory_off.py); memory
    that is not mapped at all is EFAULT and registers nothing."""
    # Ordinary anonymous memory (what malloc gives).
    _anon, addr = _mapping(mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, 2 * PAGE)
    fd.register_memory(addr, 2 * PAGE)
    assert errno_of(fd.register_memory, addr + PAGE, PAGE) == errno.EEXIST
    # A private mapping of a memfd: copy-on-write pages, not the file's.
    memfd = os.memfd_create("private", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 2 * PAGE)
    _priv, addr2 = _mapping(mmap.MAP_PRIVATE, 2 * PAGE, memfd)
    fd.register_memory(addr2, 2 * PAGE)
    os.close(memfd)
    # Memory not mapped at all.
    unmapped = _unmapped_page()
    assert errno_of(fd.register_memory, unmapped, PAGE) == errno.EFAULT
    assert errno_of(fd.unregister_memory, unmapped, PAGE) == errno.ENOENT
    fd.unregister_memory(addr, 2 * PAGE)
    fd.unregister_memory(addr2, 2 * PAGE)
    assert errno_of(fd.unregister_memory, addr, 2 * PAGE) == errno.ENOENT


def test_shared_anonymous_memory_can_be_registered(fd):
    _m, addr = _mapping(mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, 4 * PAGE)
    fd.register_memory(addr, 4 * PAGE)
    fd.unregister_memory(addr, 4 * PAGE)


# ---------------------------------------------------------------------------
# IOASIDs belong to the open file
# ---------------------------------------------------------------------------


def _other_process(q, inherited_fd):
    """Runs in a child: what it sees through the inherited file and through
    a file of its own."""
    out = {}
    inherited = io.IoasidFd(fd=inherited_fd)
    out["inherited_info_1"] = errno_of(inherited.get_info, 1)
    with io.IoasidFd() as own:
        out["own_free_1"] = errno_of(own.free, 1)
        out["own_info_1"] = errno_of(own.get_info, 1)
        out["own_info_2"] = errno_of(own.get_info, 2)
        out["own_alloc"] = own.alloc()
        out["own_info_after"] = own.get_info(1)["flags"]
        own.free(1)
        out["own_free_again"] = errno_of(own.free, 1)
    q.put(out)


def test_ioasids_are_per_open_file(fd):
    assert fd.alloc() == 1 and fd.alloc() == 2
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_other_process, args=(q, fd.fileno()))
    p.start()
    seen = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    # The same open file, inherited by the child, is the same context.
    assert seen["inherited_info_1"] == 0
    # A file of its own knows nothing of ours...
    assert seen["own_free_1"] == errno.ENOENT
    assert seen["own_info_1"] == errno.ENOENT
    assert seen["own_info_2"] == errno.ENOENT
    # ...numbers its own IOASIDs from 1 and uses them.
    assert seen["own_alloc"] == 1
    assert seen["own_info_after"] == 0
    assert seen["own_free_again"] == errno.ENOENT
    # Our IOASIDs survived the other file's FREE(1).
    assert fd.get_info(1)["flags"] == 0 and fd.get_info(2)["flags"] == 0
    assert fd.alloc() == 3


def test_two_files_in_one_process_are_separate():
    with io.IoasidFd() as a, io.IoasidFd() as b:
        assert a.alloc() == 1
        assert errno_of(b.get_info, 1) == errno.ENOENT
        assert b.alloc() == 1
        a.free(1)
        assert b.get_info(1)["flags"] == 0, "b's IOASID 1 survives a's FREE(1)"


def test_closing_a_file_drops_its_ioasids():
    with io.IoasidFd() as a:
        a.alloc(), a.alloc()
        with DmaBuffer(2 * PAGE) as mem:
            a.register_memory(mem.addr, 2 * PAGE)
    # A new file starts from scratch.
    with io.IoasidFd() as b:
        assert b.alloc() == 1
        assert errno_of(b.get_info, 2) == errno.ENOENT


def test_a_killed_client_leaves_the_daemon_serving(daemon):
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "from cuse_ioasid import ioasid as io; from cuse_ioasid.vfio import DmaBuffer;"
        "f = io.IoasidFd(); [f.alloc() for _ in range(5)];"
        "m = DmaBuffer(4 * 4096); f.register_memory(m.addr, 4 * 4096);"
        "print('ready', flush=True); os.kill(os.getpid(), 9)"
    )
    r = subprocess.run(["/usr/bin/python3", "-c", code, str(REPO / "python")],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ready", r.stderr
    assert r.returncode == -signal.SIGKILL
    assert daemon in daemon_pids()
    with io.IoasidFd() as f:
        assert f.alloc() == 1


# ---------------------------------------------------------------------------
# The same from C, and the daemon at the end
# ---------------------------------------------------------------------------


def test_c_client_compiled_against_the_header():
    if not C_BASIC.exists():
        pytest.fail(f"{C_BASIC} missing: run tests/c/build on the host")
    r = subprocess.run([str(C_BASIC)], capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    assert r.stdout.rstrip().endswith("ioasid_basic: PASS")
    assert r.stdout.count("ok: ") >= 20


def test_daemon_survived_everything(daemon):
    """Last in the file: the same daemon process still serves new files."""
    assert daemon_pids() == [daemon]
    status = Path(f"/proc/{daemon}/status").read_text()
    assert "State:\tZ" not in status
    with io.IoasidFd() as f:
        assert f.check_extension(io.IOASID_EXT_TYPE1V2_DMA) == 1
        assert f.alloc() == 1
        assert f.get_info(1)["flags"] == 0
