"""The project's scripts (Python files without a .py suffix under scripts/)
loaded as modules, so a test asks them where they put things instead of
repeating their paths, and without starting a second interpreter."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
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
    # Registered first, as an import would: dataclasses look their module up.
    sys.modules[module_name] = module
    loader.exec_module(module)
    return module


def cached_qemu(sid: bool = False) -> Path | None:
    """What runs the QEMU that scripts/fetch-qemu unpacked (with --sid:
    sid's, a wrapper), or None if it has not run."""
    fetch_qemu = load("fetch-qemu")
    return fetch_qemu.cached(fetch_qemu.SID if sid else fetch_qemu.BACKPORTS)



def qemu_copy(binary: Path, dest: Path) -> Path:
    """``binary`` (or a wrapper's binary) copied under ``dest`` (the test
    VM's tmpfs), where it starts several times faster than over 9p
    (scripts/fetch-qemu --copy-to)."""
    return load("fetch-qemu").copy_to(binary, dest)
