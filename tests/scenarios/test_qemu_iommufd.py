"""QEMU 10's iommufd backend, unmodified, through the daemon (issue 13).

Inside the test VM, Debian bookworm-backports' QEMU (scripts/fetch-qemu)
is started by the project's launcher, scripts/qemu-iommufd, which opens the
daemon's /dev/iommu and /dev/vfio/devices/vfioN and execs QEMU with

    -object iommufd,id=iommufd0,fd=3 -device vfio-pci,fd=4,iommufd=iommufd0 ...

(QEMU's own ``host=`` look-up checks the node's device number, which a CUSE
node cannot pass). QEMU runs on TCG with ``-qtest`` and no guest OS; the
qtest driver (``cuse_ioasid.qtest_edu``) plays the guest's driver as in the
legacy baseline (test_qemu_legacy.py). One QEMU gets three edu devices:
one alone in its IOMMU group on the root bus, and the two behind the PCI
bridge, which share a group. For each, the driver writes a pattern into
guest RAM and has the device copy it guest RAM → device → guest RAM at
guest-physical addresses, which QEMU mapped with IOMMU_IOAS_MAP at IOVA =
guest-physical address; the bytes are checked in guest RAM and the MSI is
seen as its write into guest RAM. Then ``system_reset`` (QEMU asks for the
hot-reset info, asserts its DEV_ID flag, and resets the bridge's bus), a
second round trip on the reset devices, a clean exit, and the devices for
the next client.

The daemon runs with a debug line per request
(``--log info,cuse_ioasid::requests=debug``): the test counts QEMU's
requests by command, checks that every command the issue lists was asked
for and that nothing was refused but what the kernel refuses too, and
compares the counts with the daemon's own counters (``cuse-ioasid
status``). The counts are printed (``-rP`` shows them).

Guest RAM is a shared memfd (``memory-backend-memfd,share=on``, and
``aux-ram-share=on`` for the ROMs): the daemon does not pin another
process's private memory yet. The leg with QEMU's default private RAM is a
strict expected failure until it does.

    scripts/vm -- tests/scenarios/run -k qemu_iommufd -rP
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import iommufd_module_marks
from cuse_ioasid import vfio
from cuse_ioasid.edu import EDU_DEVICE, EDU_VENDOR, Edu
from cuse_ioasid.ioasid import IOASID_DAEMON_IDENTIFY
from cuse_ioasid.iommufd import Iommufd, attach_pt, bind_iommufd, cdev_path
from cuse_ioasid.pytest_plugin import Request
from cuse_ioasid.qtest import Qemu, find_functions, machine_args
from cuse_ioasid.qtest_edu import BAR0_ADDR, PCI_BAR0, PCI_COMMAND, PCI_COMMAND_MASTER, \
    PCI_COMMAND_MEMORY, QtestEdu
from harness.daemon import ALONE_1, LENGTH, SHARED_A, SHARED_B
from harness.project_scripts import SCRIPTS

REQUESTS_LOG = "info,cuse_ioasid::requests=debug"

pytestmark = [*iommufd_module_marks(), pytest.mark.cuse_ioasid_args("--log", REQUESTS_LOG)]

SRC = 0x0010_0000  # guest-physical, inside the inner machine's RAM
DST = 0x0020_0000
MSI_ADDR = 0x0000_7000  # a word of guest RAM that receives the MSI data
MSI_DATA = 0x4ED1
BAR0_STRIDE = 0x10_0000  # the edu's BAR0 is 1 MiB
RAM_MB = 32

# What QEMU 10.0 asks of the daemon (issue 13, from QEMU's hw/vfio/ and
# backends/iommufd.c), by node kind. `read` is the pread of config space.
EXPECTED_10 = {
    ("cdev", "VFIO_DEVICE_BIND_IOMMUFD"),
    ("iommufd", "IOMMU_GET_HW_INFO"),
    ("iommufd", "IOMMU_IOAS_ALLOC"),
    ("iommufd", "IOMMU_HWPT_ALLOC"),
    ("cdev", "VFIO_DEVICE_ATTACH_IOMMUFD_PT"),
    ("iommufd", "IOMMU_IOAS_IOVA_RANGES"),
    ("iommufd", "IOMMU_IOAS_MAP"),
    ("cdev", "VFIO_DEVICE_GET_INFO"),
    ("cdev", "VFIO_DEVICE_GET_REGION_INFO"),
    ("cdev", "VFIO_DEVICE_GET_IRQ_INFO"),
    ("cdev", "read"),
    ("cdev", "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"),
}
# QEMU 10.1 and later map RAM that is backed by a file (a memfd here)
# with IOMMU_IOAS_MAP_FILE.
EXPECTED_11 = EXPECTED_10 - {("iommufd", "IOMMU_IOAS_MAP")} | {("iommufd", "IOMMU_IOAS_MAP_FILE")}
EXPECTED = {"10.0": EXPECTED_10, "11.1": EXPECTED_11}

# Refusals QEMU expects, each the kernel's own answer: the first
# IOVA_RANGES has no room and learns the count from EMSGSIZE (per IOAS);
# the error-reporting IRQ of a device that is not PCI Express is EINVAL;
# VFIO_DEVICE_FEATURE (the migration probe) is ENOTTY for a device without
# migration support (per device).
# A hot-reset info is ENODEV for a device whose bus cannot be reset, and
# ENOSPC with the count for a first call with no room for the devices.
PER_DEVICE_REFUSALS = Counter({
    ("cdev", "VFIO_DEVICE_GET_IRQ_INFO", "EINVAL"): 1,
    ("cdev", "unknown ioctl", "ENOTTY"): 1,
})
HOT_RESET_INFO_REFUSALS = {"ENODEV", "ENOSPC"}
PER_IOAS_REFUSALS = Counter({("iommufd", "IOMMU_IOAS_IOVA_RANGES", "EMSGSIZE"): 1})


def shared_ram_args() -> list[str]:
    """The inner machine with its RAM in a shared memfd and its ROMs in
    shared memory, which the daemon can pin for QEMU."""
    args = machine_args(RAM_MB)
    machine = args.index("-machine") + 1
    args[machine] += ",memory-backend=ram0,aux-ram-share=on"
    return ["-accel", "tcg", *args,
            "-object", f"memory-backend-memfd,id=ram0,size={RAM_MB}M,share=on"]


def launch(qemu_binary: Path, bdfs: list[str], args: list[str], workdir: Path) -> Qemu:
    """QEMU through scripts/qemu-iommufd with the edu devices ``bdfs`` at
    slots 4, 5..."""
    devices = [f"{bdf},addr={4 + i:02x}.0" for i, bdf in enumerate(bdfs)]
    launcher = [str(SCRIPTS / "qemu-iommufd"), *devices, "--"]
    return Qemu(qemu_binary, args, workdir, launcher=launcher)


def kind(node: str) -> str:
    return "iommufd" if node == "/dev/iommu" else "cdev"


def request_counts(daemon) -> Counter:
    """The daemon's counters: (node kind, command) -> calls."""
    return Counter({(r["kind"], r["command"]): r["calls"]
                    for r in daemon.status()["counters"]["requests"]})


def assert_qemus_files(daemon, pid: int, bdfs: list[str]) -> None:
    """While QEMU runs, the daemon shows its files: the iommufd file with an
    address space holding guest RAM, the devices bound to it."""
    client = daemon.client(pid)
    files = client["files"] if client else []
    iommufd_file = next((f for f in files if f["kind"] == "iommufd"), None)
    assert iommufd_file, f"QEMU (pid {pid}) has no /dev/iommu file open: {files}"
    mapped = max((o["mapped_bytes"] for o in iommufd_file["objects"]), default=0)
    assert mapped >= RAM_MB << 20, \
        f"QEMU's address spaces map less than its RAM: {iommufd_file['objects']}"
    assert sorted(d["pci"] for d in iommufd_file["devices"]) == sorted(bdfs), \
        iommufd_file["devices"]


def find_edus(qemu: Qemu, count: int) -> list[QtestEdu]:
    """The assigned edu devices, each with a BAR0 of its own."""
    found = find_functions(qemu, EDU_VENDOR, EDU_DEVICE)
    assert len(found) == count, f"expected {count} edu devices on the inner machine: {found}"
    return [QtestEdu(qemu, cfg, bar0=BAR0_ADDR + i * BAR0_STRIDE) for i, cfg in enumerate(found)]


def exercise(qemu: Qemu, edus: list[QtestEdu], msi_data: int) -> None:
    """Enable each device, then a round trip with MSIs through each."""
    for i, edu in enumerate(edus):
        edu.enable()
        edu.enable_msi(MSI_ADDR + 4 * i, msi_data + i)
    for edu in edus:
        edu.round_trip(SRC, DST, LENGTH, irq=True)


def run_leg(qemu_binary: Path, daemon, bdfs: list[str], workdir: Path, request,
            args: list[str] | None = None, version: str = "10.0") -> list[Request]:
    """QEMU with ``bdfs`` (on shared RAM unless ``args`` says otherwise):
    DMA and MSIs, system_reset, again, a clean exit; then the requests it
    made (returned), and the devices free."""
    before = request_counts(daemon)
    t0 = time.monotonic()
    qemu = launch(qemu_binary, bdfs, shared_ram_args() if args is None else args, workdir)
    with qemu:
        pid = qemu.proc.pid
        up = time.monotonic() - t0
        assert_qemus_files(daemon, pid, bdfs)
        edus = find_edus(qemu, len(bdfs))
        exercise(qemu, edus, MSI_DATA)
        qemu.system_reset()
        for edu in edus:
            cmd = edu.cfg.read16(PCI_COMMAND)
            assert not cmd & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER), \
                f"{edu.cfg}: command register {cmd:#x} after system_reset"
            assert edu.cfg.read32(PCI_BAR0) & ~0xF == 0, \
                f"{edu.cfg}: BAR0 kept its address across the reset"
        exercise(qemu, edus, MSI_DATA + 0x10)
        status = qemu.quit()
    print(f"QEMU up after {up:.1f}s, gone after {time.monotonic() - t0:.1f}s; "
          f"its log:\n{qemu.log()}")
    assert status == 0, f"QEMU exited with {status}; its log:\n{qemu.log()}"
    assert daemon.client(pid) is None, "QEMU's files outlived it in the daemon"
    log = assert_requests(daemon, pid, len(bdfs), before, request, EXPECTED[version])
    for bdf in bdfs:
        assert_reusable(daemon, bdf)
    return log


def assert_requests(daemon, pid: int, devices: int, before: Counter, request,
                    expected: set[tuple[str, str]]) -> list[Request]:
    """QEMU asked for every command the issue lists, was refused only what
    the kernel refuses too, opened and closed its files once each, and the
    log's count of each command is the daemon's counters' own. The
    daemon's own IOASID_DAEMON_IDENTIFY on QEMU's iommufd (how a bind finds
    the iommufd's context) is told apart."""
    log = daemon.requests(pid)
    assert log, f"no request of QEMU (pid {pid}) in {daemon.log}"
    own = [r for r in log if r.node == "/dev/iommu" and r.number == IOASID_DAEMON_IDENTIFY]
    assert len(own) == devices and all(r.result == "ok" for r in own), own
    counted = request_counts(daemon) - before
    everything = Counter((kind(r.node), r.command) for r in log)
    assert everything == counted, (f"the debug log and the daemon's counters differ: "
                                   f"log {dict(everything)}, counters {dict(counted)}")
    qemus = [r for r in log if r not in own]
    calls = Counter((kind(r.node), r.command) for r in qemus)
    request.node.user_properties.append(("qemu_requests", sorted(calls.items())))
    print(f"QEMU's requests by command ({len(qemus)}):")
    for (k, c), n in sorted(calls.items()):
        failed = Counter(r.result for r in qemus if (kind(r.node), r.command) == (k, c)
                         and r.result != "ok")
        print(f"  {k:8} {c:40} {n:4}  {dict(failed) or ''}")
    missing = expected - set(calls)
    assert not missing, f"QEMU never asked for {sorted(missing)}; it asked {dict(calls)}"
    refused = Counter((kind(r.node), r.command, r.result) for r in qemus if r.result != "ok"
                      and not (r.command == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
                               and r.result in HOT_RESET_INFO_REFUSALS))
    allowed = PER_IOAS_REFUSALS + Counter({k: v * devices for k, v in PER_DEVICE_REFUSALS.items()})
    unexpected = refused - allowed
    assert not unexpected, f"refused beyond what QEMU expects: {dict(unexpected)}"
    opens = Counter(kind(r.node) for r in qemus if r.command == "open")
    releases = Counter(kind(r.node) for r in qemus if r.command == "release")
    assert opens == releases == Counter({"iommufd": 1, "cdev": devices}), (opens, releases)
    return qemus


def assert_reusable(daemon, bdf: str) -> None:
    """The next client binds the device through the daemon's iommufd nodes
    and its DMA works; the daemon shows the device free again."""
    device = next(d for d in daemon.status()["devices"] if d["pci"] == bdf)
    assert device["bound_to"] is None, f"{bdf} still bound after QEMU exited: {device}"
    fd = os.open(cdev_path(bdf), os.O_RDWR | os.O_CLOEXEC)
    try:
        with Iommufd() as iommu, vfio.DmaBuffer(2 * vfio.PAGE_SIZE) as mem:
            bind_iommufd(fd, iommu)
            ioas = iommu.ioas_alloc()
            attach_pt(fd, ioas)
            iommu.map(ioas, mem.addr, 2 * vfio.PAGE_SIZE, iova=SRC)
            edu = Edu(vfio.Device(fd, owned=False))
            edu.enable_bus_master()
            pattern = os.urandom(LENGTH)
            mem.write(0, pattern)
            edu.round_trip(SRC, SRC + vfio.PAGE_SIZE, LENGTH)
            assert mem.read(vfio.PAGE_SIZE, LENGTH) == pattern, "the next client's DMA did not land"
    finally:
        os.close(fd)


@pytest.fixture(params=["10.0", "11.1"])
def any_qemu(request) -> tuple[Path, str]:
    """QEMU 10.0 (bookworm-backports) and 11.1 (sid, with sid's C library),
    and which it is."""
    binary = request.getfixturevalue("qemu_binary" if request.param == "10.0" else "qemu11_binary")
    return binary, request.param


def test_three_devices_dma_msi_reset_and_clean_exit(any_qemu, ioasid_daemon, tmp_path, request):
    """One QEMU, one IOAS, three edu devices: one alone in its IOMMU group
    on the root bus, and both devices behind the PCI bridge (one group).
    At system_reset QEMU reads each device's hot-reset info: the root bus
    cannot be reset (ENODEV, the kernel's answer; QEMU goes on without a
    reset); for the bridge's bus QEMU asserts the DEV_ID flag (and, owning
    both devices, DEV_ID_OWNED) and resets the bus with the zero-length
    device-id form of VFIO_DEVICE_PCI_HOT_RESET."""
    bdfs = [ALONE_1, SHARED_A, SHARED_B]
    binary, version = any_qemu
    log = run_leg(binary, ioasid_daemon, bdfs, tmp_path, request, version=version)
    root_bus = [r for r in log if r.command == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
                and r.node == cdev_path(ALONE_1)]
    assert root_bus and {r.result for r in root_bus} == {"ENODEV"}, root_bus
    bridged = [r for r in log if r.command == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
               and r.node != cdev_path(ALONE_1)]
    results = Counter(r.result for r in bridged)
    # Each query is two calls: the first, with room for no device, is
    # ENOSPC and says how many there are.
    assert set(results) == {"ok", "ENOSPC"} and results["ok"] == results["ENOSPC"], results
    resets = [r for r in log if r.command == "VFIO_DEVICE_PCI_HOT_RESET"]
    assert resets and {r.result for r in resets} == {"ok"}, resets


def test_default_private_ram(qemu_binary, ioasid_daemon, tmp_path, request):
    """The same leg with QEMU's default memory (private anonymous RAM and
    ROMs), one device: the daemon pins private memory through QEMU's own
    thread (issue 14), so the guest-RAM round trip works without
    share=on, and no map was refused."""
    args = ["-accel", "tcg", *machine_args(RAM_MB)]
    before = sum(1 for r in ioasid_daemon.requests()
                 if r.command == "IOMMU_IOAS_MAP" and r.result == "EFAULT")
    run_leg(qemu_binary, ioasid_daemon, [ALONE_1], tmp_path, request, args)
    refused = [r for r in ioasid_daemon.requests()
               if r.command == "IOMMU_IOAS_MAP" and r.result == "EFAULT"]
    assert len(refused) == before, refused[before:]
