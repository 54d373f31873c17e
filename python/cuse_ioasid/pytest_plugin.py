"""pytest plugin for scenarios that use cuse-ioasid (registered through the
``pytest11`` entry point: installing the package is enough).

A scenario for your own program, run inside the test VM (``scripts/vm``)
or on any machine with the daemon's requirements::

    def test_my_program(ioasid_daemon, bound_edu, edu_dma_check):
        edu_dma_check(bound_edu)            # DMA crossed the IOMMU
        assert ioasid_daemon.client(os.getpid())["files"]

Fixtures:

- ``ioasid_daemon`` (per module): the running daemon (``Daemon``): its
  pid, nodes (PCI address -> node) and ``status()``. Uses a daemon that
  already serves ``/dev/ioasid``; otherwise starts one and, at the end of
  the module, stops it with SIGTERM and checks that it exited 0.
- ``ioasid_file``: an open ``/dev/ioasid`` (``ioasid.IoasidFd``).
- ``bound_edu``: an edu device alone in its IOMMU group, bound to
  ``ioasid_file`` and attached to a new IOASID (``BoundEdu``), bus
  master enabled.
- ``edu_dma_check``: a function that sends bytes from memory to the edu
  device and back into other memory through a ``BoundEdu``'s IOASID and
  checks they arrived; returns them.
- ``test_vm`` (per session, on the host): runs a command in the test VM
  (``TestVm.run``), through the project's ``scripts/vm``.

A module may add arguments for a daemon the plugin starts for it with the
marker ``cuse_ioasid_args``, e.g. ``pytestmark =
pytest.mark.cuse_ioasid_args("--log", "info,cuse_ioasid::requests=debug")``
(a debug line per request in ``Daemon.log``); a daemon that was already
running keeps its own.

Options (command line, or the ini file without the leading dashes and with
underscores): ``--cuse-ioasid-daemon PATH`` (default ``$CUSE_IOASID_DAEMON``,
else ``cuse-ioasid`` on the PATH), ``--cuse-ioasid-args "ARGS"``,
``--cuse-ioasid-vm PATH`` (``scripts/vm``; default ``$CUSE_IOASID_VM``,
else the source tree's when the package runs from one),
``--cuse-ioasid-log-dir DIR`` (where a daemon the plugin starts writes
``daemon-<module>.log``; default ``$CUSE_IOASID_LOG_DIR``, else
``$VM_SCRATCH``, else a new temporary directory). Paths in the ini file
are relative to it.

Without ``/dev/cuse`` and VFIO the daemon fixtures skip, saying "needs the
test VM".
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import ioasid, topology, vfio
from .edu import Edu

START_TIMEOUT = 60.0  # seconds for the daemon to create its nodes
STOP_TIMEOUT = 60.0  # seconds for it to exit after SIGTERM
NEEDS_VM = "needs /dev/cuse and VFIO: run in the test VM (scripts/vm)"


def pytest_addoption(parser):
    group = parser.getgroup("cuse-ioasid")
    for name, help_text in (
        ("daemon", "the cuse-ioasid binary (default: $CUSE_IOASID_DAEMON, else cuse-ioasid on the PATH)"),
        ("args", "arguments for a daemon the plugin starts"),
        ("vm", "scripts/vm of a cuse-ioasid source tree (default: $CUSE_IOASID_VM, else the tree the "
               "plugin runs from)"),
        ("log_dir", "where a daemon the plugin starts writes its log (default: $CUSE_IOASID_LOG_DIR, "
                    "else $VM_SCRATCH, else a new temporary directory)"),
    ):
        option = f"cuse_ioasid_{name}"
        group.addoption(f"--cuse-ioasid-{name.replace('_', '-')}", dest=option, default=None,
                        help=help_text)
        parser.addini(option, help=help_text, default=None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuse_ioasid_args(*args): more arguments for the daemon the cuse_ioasid "
                   "plugin starts for this module")


def _setting(config, name: str, env: str | None = None) -> str | None:
    """An option from the command line, the environment or the ini file
    (a path there relative to the ini file)."""
    option = f"cuse_ioasid_{name}"
    value = config.getoption(option)
    if value is not None:
        return value
    if env and os.environ.get(env):
        return os.environ[env]
    value = config.getini(option)
    if value and name in ("daemon", "vm", "log_dir") and config.inipath is not None:
        return str(Path(config.inipath).parent / value)
    return value or None


def has_vfio_and_cuse() -> bool:
    return os.path.exists("/dev/cuse") and os.path.exists("/dev/vfio/vfio")


def daemon_pids(name: str = "cuse-ioasid") -> list[int]:
    """Pids of every process whose command name is ``name``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def wait_for(predicate, what: str, timeout: float = 60.0):
    """Polls ``predicate`` until it holds; fails the test with ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout}s)")
        time.sleep(0.1)


def list_nodes(binary: str) -> dict[str, str]:
    """PCI address -> device node, as ``cuse-ioasid --list`` prints them."""
    out = subprocess.run([binary, "--list"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"(/dev/\S+)\s+([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\s", line)
        if m:
            found[m.group(2)] = m.group(1)
    return found


# The daemon's debug line for one request (target cuse_ioasid::requests).
REQUEST_LINE = re.compile(r"cuse_ioasid::requests: request node=(?P<node>\S+) fh=(?P<fh>\d+) "
                          r"pid=(?P<pid>\S+) cmd=(?P<cmd>.+?) nr=(?P<nr>\S+) result=(?P<result>\S+)$")


@dataclass(frozen=True)
class Request:
    """One request in the daemon's debug log."""

    node: str  # /dev/iommu, /dev/vfio/devices/vfio3...
    fh: int
    pid: str  # "?" when the daemon could not tell
    command: str  # IOMMU_IOAS_MAP, open, read, release, unknown ioctl...
    number: int | None  # an ioctl's number
    result: str  # ok, or the errno's name


@dataclass
class Daemon:
    """The daemon a scenario talks to."""

    pid: int
    binary: str
    nodes: dict[str, str]  # PCI address -> /dev/vfio/devices/devN
    log: Path | None = None  # its log, when the plugin started it
    socket: str | None = None  # --status-socket, when not the default

    def status(self) -> dict:
        """``cuse-ioasid status --json``: what the daemon holds now."""
        argv = [self.binary, "status", "--json"]
        if self.socket:
            argv += ["--status-socket", self.socket]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` exited {r.returncode}: {r.stderr}")
        return json.loads(r.stdout)

    def status_text(self) -> str:
        """``cuse-ioasid status``, as a user reads it."""
        argv = [self.binary, "status"] + (["--status-socket", self.socket] if self.socket else [])
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout

    def requests(self, pid: int | None = None) -> list[Request]:
        """Every request the log shows (of process ``pid`` only, if given),
        in order. Needs a log with the per-request debug lines: a daemon
        this plugin started with ``--log info,cuse_ioasid::requests=debug``
        (the marker ``cuse_ioasid_args``)."""
        if self.log is None:
            pytest.fail("the daemon was started elsewhere: its log is not at hand "
                        "(run the module without scripts/vm --daemon)")
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = REQUEST_LINE.search(line)
            if m and (pid is None or m["pid"] == str(pid)):
                found.append(Request(node=m["node"], fh=int(m["fh"]), pid=m["pid"],
                                     command=m["cmd"],
                                     number=None if m["nr"] == "-" else int(m["nr"], 16),
                                     result=m["result"]))
        return found

    def client(self, pid: int) -> dict | None:
        """The status's entry of client process ``pid`` (None if it has no
        file open)."""
        return next((p for p in self.status()["processes"] if p["pid"] == pid), None)


def _daemon_binary(config) -> str:
    binary = _setting(config, "daemon", "CUSE_IOASID_DAEMON") or shutil.which("cuse-ioasid")
    if not binary:
        pytest.fail("no cuse-ioasid binary: give --cuse-ioasid-daemon PATH, set "
                    "CUSE_IOASID_DAEMON, or put cuse-ioasid on the PATH")
    if not os.path.exists(binary):
        pytest.fail(f"{binary} missing (build it: cargo build --bins)")
    return os.path.abspath(binary)


@pytest.fixture(scope="module")
def ioasid_daemon(request):
    """The running daemon (see the module docstring)."""
    if not has_vfio_and_cuse():
        pytest.skip(NEEDS_VM)
    config = request.config
    binary = _daemon_binary(config)
    args = shlex.split(_setting(config, "args") or "")
    for mark in request.node.iter_markers("cuse_ioasid_args"):
        args += [str(a) for a in mark.args]
    socket = next((a.split("=", 1)[1] for a in args if a.startswith("--status-socket=")), None)
    if "--status-socket" in args:
        socket = args[args.index("--status-socket") + 1]
    running = daemon_pids()
    if os.path.exists("/dev/ioasid") and running:
        # Started by someone else (scripts/vm --daemon, a service), which
        # may have waited for /dev/ioasid only.
        nodes = list_nodes(binary)
        wait_for(lambda: all(os.path.exists(n) for n in nodes.values()),
                 f"the running daemon did not create every node of `cuse-ioasid --list`: {nodes}")
        yield Daemon(pid=running[0], binary=binary, nodes=nodes, socket=socket)
        return
    log_dir = Path(_setting(config, "log_dir", "CUSE_IOASID_LOG_DIR") or os.environ.get("VM_SCRATCH")
                   or tempfile.mkdtemp(prefix="cuse-ioasid-"))
    log_path = log_dir / f"daemon-{Path(request.module.__file__).stem}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    nodes = list_nodes(binary)
    wanted = ["/dev/ioasid", *nodes.values()]
    deadline = time.monotonic() + START_TIMEOUT
    while not all(os.path.exists(n) for n in wanted):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the daemon did not create {[n for n in wanted if not os.path.exists(n)]} "
                        f"(status {proc.returncode}); its log: {log_path}")
        time.sleep(0.1)
    try:
        yield Daemon(pid=proc.pid, binary=binary, nodes=nodes, log=log_path, socket=socket)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_TIMEOUT)
        assert code == 0, f"the daemon exited with {code} on SIGTERM; its log: {log_path}"


@pytest.fixture
def ioasid_file(ioasid_daemon):
    """An open /dev/ioasid, closed after the test."""
    with ioasid.IoasidFd() as f:
        yield f


@dataclass
class BoundEdu:
    """An edu device bound to an ioasid file and attached to an IOASID."""

    bdf: str
    node: str
    device: vfio.Device  # the open device node
    ioasid_fd: ioasid.IoasidFd
    ioasid: int  # the IOASID it is attached to
    edu: Edu = field(repr=False)


def free_edu(daemon: Daemon) -> str:
    """An edu device alone in its IOMMU group whose node no one has open."""
    alone = [d.bdf for d in topology.discover().alone if d.bdf in daemon.nodes]
    if not alone:
        pytest.skip("needs an edu device alone in its IOMMU group, served by the daemon "
                    "(the test VM has three)")
    return alone[0]


@pytest.fixture
def bound_edu(ioasid_daemon, ioasid_file):
    """An edu device (alone in its group) bound to ``ioasid_file`` and
    attached to a new IOASID; closed after the test."""
    bdf = free_edu(ioasid_daemon)
    node = ioasid_daemon.nodes[bdf]
    device = vfio.Device.open_node(node)
    try:
        ioasid.bind_ioasid_fd(device.fd, ioasid_file)
        ioasid_id = ioasid_file.alloc()
        ioasid.attach_ioasid(device.fd, ioasid_id)
        edu = Edu(device)
        edu.enable_bus_master()
        yield BoundEdu(bdf=bdf, node=node, device=device, ioasid_fd=ioasid_file,
                       ioasid=ioasid_id, edu=edu)
    finally:
        device.close()


@pytest.fixture
def edu_dma_check():
    """``check(bound, length=3000, iova=0x100000) -> bytes``: maps two
    pages of fresh shared memory at ``iova`` and ``iova + 4096`` in the
    bound IOASID, fills the first with a pattern, has the edu device copy
    it into its buffer and out into the second page, checks the second
    page holds exactly the pattern, and unmaps."""

    def check(bound: BoundEdu, length: int = 3000, iova: int = 0x100000) -> bytes:
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(length))
        with vfio.DmaBuffer(2 * vfio.PAGE_SIZE) as mem:
            mem.fill(0)
            mem.write(0, pattern)
            bound.ioasid_fd.map_dma(bound.ioasid, iova, mem.addr, 2 * vfio.PAGE_SIZE)
            try:
                bound.edu.round_trip(iova, iova + vfio.PAGE_SIZE, length)
                got = mem.read(vfio.PAGE_SIZE, length)
            finally:
                bound.ioasid_fd.unmap_dma(bound.ioasid, iova, 2 * vfio.PAGE_SIZE)
        assert got == pattern, "the bytes the edu device wrote through the IOMMU differ"
        return got

    return check


class TestVm:
    """``scripts/vm`` of a cuse-ioasid source tree, from the host."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, script: Path):
        self.script = script

    def run(self, argv: list[str], kernel: str = "6.1", daemon: bool = False,
            daemon_args: str = "", timeout: int = 600, cwd: str | None = None,
            extra: list[str] | None = None) -> subprocess.CompletedProcess:
        """Runs ``argv`` as root in the test VM (in ``cwd``, default the
        current directory; the guest sees the host's / read-only) and
        returns its exit status and output. ``daemon``: with the daemon
        started around it (``--daemon``)."""
        vm = [str(self.script), "--kernel", kernel, "--timeout", str(timeout), *(extra or [])]
        if daemon:
            vm.append("--daemon")
            if daemon_args:
                vm += ["--daemon-args", daemon_args]
        return subprocess.run([*vm, "--", *argv], capture_output=True, text=True, cwd=cwd,
                              timeout=timeout + 120)


def _source_tree_vm() -> Path | None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "vm"
    return script if script.is_file() else None


@pytest.fixture(scope="session")
def test_vm(request):
    """Runs commands in the test VM (see ``TestVm``); on the host only."""
    if "VM_SCRATCH" in os.environ:
        pytest.skip("already inside the test VM: no VM in the VM")
    setting = _setting(request.config, "vm", "CUSE_IOASID_VM")
    script = Path(setting) if setting else _source_tree_vm()
    if script is None or not script.is_file():
        pytest.skip("no scripts/vm: give --cuse-ioasid-vm PATH (a cuse-ioasid source tree's)")
    return TestVm(script)
