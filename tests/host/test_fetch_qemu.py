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


def fake_sid_tree(root):
    """A tree with its own "loader": a script that prints what it was
    asked to run, and the module directory it was given."""
    qemu = fake_tree(root)
    lib = root / "usr" / "lib" / "x86_64-linux-gnu"
    lib.mkdir(parents=True)
    loader = lib / "ld-linux-x86-64.so.2"
    loader.write_text('#!/bin/sh\necho "$QEMU_MODULE_DIR"\nfor a in "$@"; do echo "$a"; done\n')
    loader.chmod(0o755)
    return qemu, lib


def test_sids_qemu_runs_through_its_own_loader_with_its_data(tmp_path):
    root = tmp_path / "sid"
    qemu, lib = fake_sid_tree(root)
    wrapper = fetch_qemu.write_wrapper(root, qemu, root / "qemu-system-x86_64")
    assert wrapper == fetch_qemu.entry(root, fetch_qemu.SID)
    out = subprocess.run([wrapper, "-m", "32", "two words"], capture_output=True, text=True)
    assert out.stdout.splitlines() == [
        str(lib / "qemu"), "--library-path", str(lib), "--argv0", str(wrapper), str(qemu),
        "-L", str(root / "usr" / "share" / "qemu"), "-m", "32", "two words"]
    # Copied for tmpfs: the copy of the binary, still the tree's loader and data.
    copy = fetch_qemu.copy_to(wrapper, tmp_path / "fast")
    assert copy == tmp_path / "fast" / "qemu-system-x86_64"
    out = subprocess.run([copy], capture_output=True, text=True).stdout.splitlines()
    assert out[5] == str(tmp_path / "fast" / "usr" / "bin" / "qemu-system-x86_64")
    assert out[:3] == [str(lib / "qemu"), "--library-path", str(lib)]
    assert out[7] == str(root / "usr" / "share" / "qemu")
