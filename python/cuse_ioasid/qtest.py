"""QEMU as a peer: started with ``-qtest`` and no guest OS, driven from here.

QEMU's qtest protocol (``-qtest stdio``, QEMU's ``system/qtest.c``) is a
line protocol in which the test plays the CPU: it reads and writes guest
memory and MMIO (``readl``, ``writel``, ``b64read``, ``b64write``), does
port I/O (``inl``, ``outl``, hence PCI configuration through 0xcf8/0xcfc).
Every request gets one ``OK ...`` or
``FAIL ...`` line; ``IRQ raise N``/``IRQ lower N`` lines may come in
between (after ``irq_intercept_in``) and are collected in ``Qemu.irqs``.

Debian's QEMU packages leave out the qtest accelerator (``-accel qtest``
is "invalid accelerator"; ``clock_step`` is an unknown command), so
``-qtest`` runs on TCG. ``-S`` keeps the CPUs stopped: no firmware runs
and reprograms the devices, and nothing burns CPU time. Guest memory,
MMIO, port I/O, DMA and MSI delivery all work on a stopped machine.

QMP (``-qmp unix:...``) carries what qtest has no command for:
``system_reset`` and ``quit``, and the events that say they happened.

``Qemu`` owns the process: the binary, its arguments, the fds it inherits
(``pass_fds``, for ``-object iommufd,fd=N -device vfio-pci,fd=M``) or the
launcher that opens them and execs QEMU (``scripts/qemu-iommufd``), its
stderr (a log file) and a bounded wait for its exit. ``PciConfig`` reads
and writes one function's configuration space through the I/O ports.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC


class QtestError(Exception):
    """QEMU answered FAIL, died, or did not answer in time."""


class Qmp:
    """A QMP client on a unix socket (capabilities negotiated)."""

    def __init__(self, path: Path, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb", buffering=0)
        self.events: list[dict] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QtestError(f"no QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QtestError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        """Run one command; return its ``return`` value, raise on ``error``.
        Events that arrive meanwhile are kept in ``events``."""
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QtestError(f"QMP {command}: {reply['error']}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict:
        """The first event called ``name`` (already received or coming)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QtestError(f"no QMP event {name} within {timeout}s "
                                 f"(got {[e['event'] for e in self.events]})")
            self.sock.settimeout(remaining)
            try:
                self.events.append(self._read())
            except socket.timeout:
                continue

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Qemu:
    """One QEMU process under qtest control. Use as a context manager: on
    leaving, QEMU is asked to quit (QMP), then killed if it does not."""

    def __init__(self, binary: str | Path, args: list[str], workdir: Path,
                 pass_fds: tuple[int, ...] = (), timeout: float = 60.0,
                 launcher: list[str] | None = None):
        """``launcher``: a command that takes QEMU's options after it and
        replaces itself with ``$QEMU`` (set to ``binary``), such as
        ``[scripts/qemu-iommufd, DEVICE, "--"]``; the process is QEMU's
        own once it has run."""
        self.binary = str(binary)
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.qmp_path = self.workdir / "qmp.sock"
        self.log_path = self.workdir / "qemu.log"
        self.irqs: list[str] = []
        options = [
            "-nodefaults", "-no-user-config", "-display", "none",
            "-qtest", "stdio", "-qtest-log", "/dev/null", "-S",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *args,
        ]
        self.argv = [*launcher, *options] if launcher else [self.binary, *options]
        env = {**os.environ, "QEMU": self.binary} if launcher else None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, pass_fds=pass_fds, env=env)
        self.qmp: Qmp | None = None
        self.exit_status: int | None = None

    # -- lifetime -------------------------------------------------------

    def __enter__(self) -> Qemu:
        try:
            # QEMU reads qtest commands once the machine is built, so the
            # first answer also says the QMP socket exists.
            self.readb(0)
            self.qmp = Qmp(self.qmp_path, self.timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                self.quit()
            except (QtestError, OSError):
                self.kill()
        self._log.close()

    def log(self) -> str:
        """What QEMU wrote to stderr so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def quit(self) -> int:
        """QMP ``quit``; wait (bounded) for the exit; return its status."""
        if self.qmp is None:
            raise QtestError("no QMP connection")
        try:
            self.qmp.execute("quit")
        except QtestError as e:
            if "closed" not in str(e):  # QEMU may close before answering
                raise
        self.qmp.close()
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.exit_status = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise QtestError(f"QEMU did not exit within {self.timeout}s of quit") from None
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.exit_status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.exit_status = self.proc.wait()

    def system_reset(self) -> None:
        """QMP ``system_reset``, then wait for the RESET event."""
        assert self.qmp is not None
        self.qmp.execute("system_reset")
        self.qmp.wait_event("RESET", self.timeout)

    # -- the qtest channel ----------------------------------------------

    def command(self, line: str) -> str:
        """Send one request; return the text after ``OK``."""
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise QtestError(f"QEMU is gone ({line!r}); its log:\n{self.log()}") from None
        while True:
            reply = self.proc.stdout.readline().decode().rstrip("\n")
            if not reply:
                status = self.proc.wait(timeout=self.timeout)
                raise QtestError(f"QEMU exited with {status} during {line!r}; "
                                 f"its log:\n{self.log()}")
            if reply.startswith("IRQ "):
                self.irqs.append(reply)
                continue
            if reply == "OK" or reply.startswith("OK "):
                return reply[3:]
            raise QtestError(f"{line!r}: {reply}")

    def readb(self, addr: int) -> int:
        return int(self.command(f"readb {addr:#x}"), 16)

    def readw(self, addr: int) -> int:
        return int(self.command(f"readw {addr:#x}"), 16)

    def readl(self, addr: int) -> int:
        return int(self.command(f"readl {addr:#x}"), 16)

    def readq(self, addr: int) -> int:
        return int(self.command(f"readq {addr:#x}"), 16)

    def writeb(self, addr: int, value: int) -> None:
        self.command(f"writeb {addr:#x} {value:#x}")

    def writew(self, addr: int, value: int) -> None:
        self.command(f"writew {addr:#x} {value:#x}")

    def writel(self, addr: int, value: int) -> None:
        self.command(f"writel {addr:#x} {value:#x}")

    def writeq(self, addr: int, value: int) -> None:
        self.command(f"writeq {addr:#x} {value:#x}")

    def memread(self, addr: int, size: int) -> bytes:
        """``size`` bytes of guest-physical memory (b64read)."""
        return base64.b64decode(self.command(f"b64read {addr:#x} {size:#x}"))

    def memwrite(self, addr: int, data: bytes) -> None:
        """Store ``data`` at guest-physical ``addr`` (b64write)."""
        enc = base64.b64encode(data).decode()
        self.command(f"b64write {addr:#x} {len(data):#x} {enc}")

    def inb(self, port: int) -> int:
        return int(self.command(f"inb {port:#x}"), 16)

    def inw(self, port: int) -> int:
        return int(self.command(f"inw {port:#x}"), 16)

    def inl(self, port: int) -> int:
        return int(self.command(f"inl {port:#x}"), 16)

    def outb(self, port: int, value: int) -> None:
        self.command(f"outb {port:#x} {value:#x}")

    def outw(self, port: int, value: int) -> None:
        self.command(f"outw {port:#x} {value:#x}")

    def outl(self, port: int, value: int) -> None:
        self.command(f"outl {port:#x} {value:#x}")

    def pci(self, bus: int, dev: int, fn: int = 0) -> PciConfig:
        return PciConfig(self, bus, dev, fn)


class PciConfig:
    """Configuration space of one PCI function, through ports 0xcf8/0xcfc
    (configuration mechanism #1, which q35 and i440fx both decode)."""

    def __init__(self, qemu: Qemu, bus: int, dev: int, fn: int):
        self.qemu = qemu
        self.bus, self.dev, self.fn = bus, dev, fn

    def __repr__(self) -> str:
        return f"PciConfig({self.bus:02x}:{self.dev:02x}.{self.fn})"

    def _select(self, offset: int) -> int:
        if not 0 <= offset < 256:
            raise ValueError(f"offset {offset:#x} beyond the 256 bytes of mechanism #1")
        addr = (1 << 31) | (self.bus << 16) | (self.dev << 11) | (self.fn << 8) | (offset & 0xFC)
        self.qemu.outl(PCI_CONFIG_ADDRESS, addr)
        return PCI_CONFIG_DATA + (offset & 3)

    def read8(self, offset: int) -> int:
        return self.qemu.inb(self._select(offset))

    def read16(self, offset: int) -> int:
        return self.qemu.inw(self._select(offset))

    def read32(self, offset: int) -> int:
        return self.qemu.inl(self._select(offset))

    def write8(self, offset: int, value: int) -> None:
        self.qemu.outb(self._select(offset), value)

    def write16(self, offset: int, value: int) -> None:
        self.qemu.outw(self._select(offset), value)

    def write32(self, offset: int, value: int) -> None:
        self.qemu.outl(self._select(offset), value)

    def capability(self, cap_id: int) -> int | None:
        """Offset of the first capability ``cap_id`` in the list, or None."""
        if not self.read16(0x06) & (1 << 4):  # status: capabilities list
            return None
        pos = self.read8(0x34) & 0xFC
        seen = set()
        while pos and pos not in seen:
            seen.add(pos)
            if self.read8(pos) == cap_id:
                return pos
            pos = self.read8(pos + 1) & 0xFC
        return None


def find_functions(qemu: Qemu, vendor: int, device: int, bus: int = 0) -> list[PciConfig]:
    """Every function 0 on ``bus`` whose IDs match (multi-function devices
    are not looked into: the test machines place edu devices at function 0)."""
    found = []
    for dev in range(32):
        cfg = qemu.pci(bus, dev)
        ids = cfg.read32(0x00)
        if ids != 0xFFFFFFFF and ids == (device << 16) | vendor:
            found.append(cfg)
    return found


def wait_until(what: str, predicate, timeout: float, interval: float = 0.01):
    """Poll ``predicate`` (a device register, guest memory) until it returns
    a true value, at most ``timeout`` seconds; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise QtestError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def machine_args(memory_mb: int = 32) -> list[str]:
    """The inner machine: q35 with no guest OS (qtest plays the CPU). Small
    RAM, because legacy VFIO pins all of it at start-up, page by page
    through the test VM's emulated IOMMU."""
    return ["-machine", "q35", "-m", str(memory_mb)]
