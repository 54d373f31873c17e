"""The project's scripts (Python files without a .py suffix under scripts/)
loaded as modules, so a test asks them where they put things instead of
repeating their paths, and without starting a second interpreter."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load(name: str) -> ModuleType:
    """scripts/NAME as a module (its main() is not run)."""
    module_name = name.replace("-", "_")
    loader = importlib.machinery.SourceFileLoader(module_name, str(SCRIPTS / name))
    spec = importlib.util.spec_from_loader(module_name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def cached_qemu() -> Path | None:
    """The QEMU that scripts/fetch-qemu unpacked, or None if it has not run."""
    return load("fetch-qemu").cached()


def qemu_copy(binary: Path, dest: Path) -> Path:
    """A copy of the unpacked QEMU's binary under ``dest`` (the test VM's
    tmpfs), beside links to the unpacked tree's firmware and modules, so it
    finds them relative to itself as the original does.

    Why: the test VM reads the host's files over 9p without a page cache,
    so every start of QEMU faults its 28 MB binary in page by page (the
    dynamic loader touches most of it); from tmpfs a start is several times
    faster (20-35 s against 6-10 s on a loaded host)."""
    root = binary.parents[2]  # .../VERSION/usr/bin/qemu-system-x86_64
    usr = dest / "usr"
    (usr / "bin").mkdir(parents=True, exist_ok=True)
    for sub in ("share", "lib"):
        link = usr / sub
        if not link.is_symlink():
            link.symlink_to(root / "usr" / sub)
    copy = usr / "bin" / binary.name
    if not copy.exists():
        shutil.copy2(binary, copy)
    return copy
