"""The project's scripts (Python files without a .py suffix under scripts/)
loaded as modules, so a test asks them where they put things instead of
repeating their paths, and without starting a second interpreter."""

from __future__ import annotations

import importlib.machinery
import importlib.util
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
