"""A daemon a scenario starts itself, with the options it tests, and whose
log it reads (the conftest `daemon` fixture starts one without options).

    with OwnDaemon(["--max-client-aliases", "100"], "budgets") as d:
        d.nodes[ALONE_1]      # its device node of that edu
        "..." in d.log()      # what it logged so far

It refuses to start while another cuse-ioasid runs (the IOMMU groups would
be taken): run these scenarios without `scripts/vm --daemon`. On leaving,
SIGTERM and an exit status of 0 are checked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.daemon import ALL_EDU, DAEMON, daemon_pids, wait_for


class OwnDaemon:
    def __init__(self, args: list[str], name: str):
        self.args = args
        log_dir = os.environ.get("CUSE_IOASID_LOG_DIR") or os.environ["VM_SCRATCH"]
        self.log_path = Path(log_dir) / f"own-daemon-{name}.log"
        self.proc: subprocess.Popen | None = None
        self.nodes: dict[str, str] = {}

    def __enter__(self) -> "OwnDaemon":
        if daemon_pids():
            pytest.fail("another cuse-ioasid runs (scripts/vm --daemon?): these scenarios start "
                        "their own daemon with the options they test")
        if not DAEMON.exists():
            pytest.fail(f"{DAEMON} missing: run `cargo build --workspace --bins` on the host")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(DAEMON), "--log", "debug", *self.args],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        out = subprocess.run([str(DAEMON), "--list"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        for line in out.splitlines():
            m = re.match(r"(/dev/\S+)\s+([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\s", line)
            if m:
                self.nodes[m.group(2)] = m.group(1)
        for bdf in ALL_EDU:
            assert bdf in self.nodes, f"{bdf} missing from `cuse-ioasid --list`:\n{out}"
        wait_for(lambda: self.proc.poll() is not None or (
            os.path.exists("/dev/ioasid") and all(os.path.exists(n) for n in self.nodes.values())),
            "the daemon's nodes")
        if self.proc.poll() is not None:
            pytest.fail(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, field: str) -> int:
        """A number of /proc/<daemon>/status (kB fields in kB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while os.path.exists("/dev/ioasid") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code == 0, f"the daemon exited with {code} on SIGTERM:\n{self.log()[-4000:]}"
