"""Host test: scripts/fetch-qemu --copy-to, the copy of the unpacked QEMU
that the VM scenarios and the demo start from tmpfs. A made-up unpacked
tree stands in for the real one.

Run: /usr/bin/python3 -m pytest tests/host/test_fetch_qemu.py
"""

import os
import subprocess

from harness import project_scripts

fetch_qemu = project_scripts.load("fetch-qemu")


def fake_tree(root):
    qemu = root / "usr" / "bin" / "qemu-system-x86_64"
    qemu.parent.mkdir(parents=True)
    # Like QEMU, it finds its data directory relative to its own path.
    qemu.write_text('#!/bin/sh\ncat "$(dirname "$0")/../share/qemu/version"\n')
    qemu.chmod(0o755)
    (root / "usr" / "share" / "qemu").mkdir(parents=True)
    (root / "usr" / "share" / "qemu" / "version").write_text("10.0.2\n")
    (root / "usr" / "lib").mkdir()
    return qemu


def test_the_copy_runs_from_its_directory_and_finds_the_trees_data(tmp_path):
    qemu = fake_tree(tmp_path / "tree")
    copy = fetch_qemu.copy_to(qemu, tmp_path / "fast")
    assert copy == tmp_path / "fast" / "usr" / "bin" / "qemu-system-x86_64"
    assert not copy.is_symlink() and copy.read_bytes() == qemu.read_bytes()
    assert os.access(copy, os.X_OK)
    assert subprocess.run([copy], capture_output=True, text=True).stdout == "10.0.2\n"
    assert (tmp_path / "fast" / "usr" / "lib").resolve() == tmp_path / "tree" / "usr" / "lib"


def test_a_second_copy_reuses_the_first(tmp_path):
    qemu = fake_tree(tmp_path / "tree")
    first = fetch_qemu.copy_to(qemu, tmp_path / "fast")
    mtime = first.stat().st_mtime_ns
    assert fetch_qemu.copy_to(qemu, tmp_path / "fast") == first
    assert first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == ["qemu-system-x86_64"], "no partial left"
