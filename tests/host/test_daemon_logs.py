"""Host test: the daemon's log lines as a file and as the journal see them.

A bad --node-group makes the daemon log an error and exit before it touches
CUSE or VFIO, so this runs on the build machine (target/debug/cuse-ioasid,
built by `cargo build` or `scripts/package --profile dev`). Under systemd
the same lines reach the journal with their priority: see
tests/scenarios/test_service.py.

Run: /usr/bin/python3 -m pytest tests/host
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAEMON = REPO / "target" / "debug" / "cuse-ioasid"
BAD_GROUP = "no-such-group-for-cuse-ioasid"


def run_daemon(tmp_path, *args, journal_stream=None, env_extra=None) -> list[str]:
    """Runs the daemon with stderr (and stdout) to a file; returns its lines."""
    if not DAEMON.exists():
        pytest.fail(f"{DAEMON} missing: run `cargo build --workspace --bins`")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as f:
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "RUST_LOG")}
        if journal_stream == "this file":
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        env.update(env_extra or {})
        r = subprocess.run([str(DAEMON), "--node-group", BAD_GROUP, *args], stdout=f, stderr=f,
                           stdin=subprocess.DEVNULL, env=env, timeout=60)
    assert r.returncode == 1
    return log.read_text().splitlines()


def test_log_file_has_no_escape_codes(tmp_path):
    lines = run_daemon(tmp_path)
    text = "\n".join(lines)
    assert "\x1b" not in text, text
    assert "ERROR" in lines[0] and BAD_GROUP in lines[0], lines
    # The error is also printed plainly (it shows even with --log off).
    assert lines[-1].startswith("cuse-ioasid: --node-group"), lines


def test_journal_stream_gives_one_line_with_its_priority(tmp_path):
    lines = run_daemon(tmp_path, journal_stream="this file")
    assert len(lines) == 1, lines
    assert lines[0].startswith("<3>cuse_ioasid: --node-group"), lines
    assert "no such group" in lines[0] and "\x1b" not in lines[0]


def test_journal_stream_of_another_file_is_ignored(tmp_path):
    # Inherited from a parent whose stderr went to the journal, but ours
    # goes to a file: plain text.
    lines = run_daemon(tmp_path, journal_stream="1:1")
    assert not lines[0].startswith("<"), lines
    assert "ERROR" in lines[0]


def test_log_format_flag_forces_journal_lines(tmp_path):
    lines = run_daemon(tmp_path, "--log-format", "journal")
    assert [line[:3] for line in lines] == ["<3>"], lines
    lines = run_daemon(tmp_path, "--log-format", "text", journal_stream="this file")
    assert "ERROR" in lines[0] and not lines[0].startswith("<"), lines
