"""The kernel's VFIO selftests as a peer: run one binary, read its TAP.

The binaries come from scripts/vfio-selftests (built on the host into
.cache/selftests/VERSION/bin). Each takes the device as a trailing PCI
address and kselftest_harness's filters (``-v VARIANT``, ``-t TEST``,
``-f FIXTURE``, ``-r FIXTURE.VARIANT.TEST``), and prints TAP:

    ok 3 vfio_dma_mapping_test.vfio_type1_iommu_anonymous.dma_map_unmap
    ok 7 vfio_pci_irq_test.msix.enable_trigger_disable # SKIP MSI-x: not supported
    not ok 2 vfio_cdev.bind

``run`` returns every case with its result and, for a skip, the reason the
test gave; ``Run.table`` prints them for a report.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness import project_scripts

TAP_LINE = re.compile(r"^(not ok|ok) \d+ (\S+)(?: # (SKIP|XFAIL|XPASS)\b ?(.*))?$")


@dataclass(frozen=True)
class Case:
    name: str  # FIXTURE.VARIANT.TEST (or FIXTURE.TEST without variants)
    result: str  # "pass", "fail" or "skip"
    reason: str = ""  # a skip's reason


@dataclass
class Run:
    binary: str
    args: list[str]
    status: int
    output: str
    cases: list[Case] = field(default_factory=list)

    def count(self, result: str) -> int:
        return sum(c.result == result for c in self.cases)

    def by_name(self) -> dict[str, Case]:
        return {c.name: c for c in self.cases}

    def summary(self) -> str:
        return (f"{self.binary}: pass {self.count('pass')}, fail {self.count('fail')}, "
                f"skip {self.count('skip')} (exit status {self.status})")

    def table(self) -> str:
        lines = [self.summary()]
        for c in self.cases:
            lines.append(f"  {c.result:4}  {c.name}" + (f"  ({c.reason})" if c.reason else ""))
        return "\n".join(lines)


def parse_tap(text: str) -> list[Case]:
    cases = []
    for line in text.splitlines():
        m = TAP_LINE.match(line.strip())
        if not m:
            continue
        ok, name, directive, reason = m.groups()
        if directive == "SKIP":
            cases.append(Case(name, "skip", (reason or "").strip()))
        else:
            cases.append(Case(name, "pass" if ok == "ok" else "fail"))
    return cases


def binaries() -> Path | None:
    """The directory scripts/vfio-selftests built, or None."""
    return project_scripts.load("vfio-selftests").built()


def run(bindir: Path, program: str, bdf: str, filters: list[str] = (),
        timeout: float = 600) -> Run:
    """Run ``program`` on the device ``bdf`` with kselftest filters."""
    args = [*filters, bdf]
    r = subprocess.run([str(bindir / program), *args], capture_output=True, text=True,
                       timeout=timeout)
    output = r.stdout + r.stderr
    return Run(program, args, r.returncode, output, parse_tap(r.stdout))


def report(run: Run, heading: str = "") -> None:
    """Print a run's table and append it to $VM_SCRATCH/vfio-selftests-
    <kernel>.txt (the legacy baseline and the runs through the daemon land
    side by side in that file)."""
    text = heading + run.table()
    print(text)
    scratch = os.environ.get("VM_SCRATCH")
    if scratch:
        kernel = os.environ.get("VM_KERNEL", os.uname().release)
        with open(Path(scratch) / f"vfio-selftests-{kernel}.txt", "a") as f:
            f.write(text + "\n\n")
