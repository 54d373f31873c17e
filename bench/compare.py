#!/usr/bin/python3
"""The guest half of scripts/bench --compare: builds of the daemon and the
scratchpad at several commits, measured in one boot, interleaved.

Usage (inside the test VM, from the repository): bench/compare.py BINDIR
REV[,REV...] ROUNDS SECONDS. BINDIR/REV/ holds each build's cuse-ioasid and
scratchpad. Each round starts every build's scratchpad and daemon in turn
and measures, everything on vCPU 0: the scratchpad's null and 32-byte
struct ioctls, the daemon's null and GET_INFO ioctls, and 4 KiB and 2 MiB
map+unmap pairs through the daemon against the same pairs made directly
(map_rate versus, with the last build's scratchpad as the round-trip
reference). Prints one JSON object after "COMPARE-JSON " with every
figure of every round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guest import (BIN, DAEMON_BDF, DIRECT_BDF, group_of, log, map_client,  # noqa: E402
                   parse_kv, pin, run, wait_for)

SIZES = ["4096", "2097152"]
IOCTLS = [("pad_null", "scratch-null", "/dev/cmp_pad"),
          ("pad_struct", "scratch-struct", "/dev/cmp_pad"),
          ("daemon_null", "ioasid-null", "/dev/ioasid"),
          ("daemon_struct", "ioasid-struct", "/dev/ioasid")]


def start_pad(binary: Path, name: str) -> subprocess.Popen:
    p = subprocess.Popen([str(binary), "--name", name], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    if not p.stdout.readline().startswith("ready"):
        raise RuntimeError(f"{binary} did not start")
    return p


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=15)


def main() -> int:
    bindir, revs, rounds, seconds = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
    pin([os.getpid()], {0})  # every process started from here inherits it
    ref = start_pad(bindir / revs[-1] / "scratchpad", "cmp_ref")
    direct = "direct:" + group_of(DIRECT_BDF)
    res: dict = {r: {} for r in revs}
    try:
        for rnd in range(rounds):
            for rev in revs:
                pad = start_pad(bindir / rev / "scratchpad", "cmp_pad")
                daemon = subprocess.Popen([str(bindir / rev / "cuse-ioasid"), "--device", DAEMON_BDF,
                                           "--log", "warn"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_for("/dev/vfio/devices/dev1", daemon, f"cuse-ioasid {rev}")
                for key, kind, path in IOCTLS:
                    out = run([str(BIN / "ioctl_rate"), kind, path, seconds, "1"])
                    res[rev].setdefault(key, []).append(
                        next(float(parse_kv(l)["median"]) for l in out.splitlines()
                             if l.startswith("result ")))
                for size in SIZES:
                    out = map_client(["versus", "daemon:/dev/vfio/devices/dev1", direct, "/dev/cmp_ref",
                                      size, seconds])
                    kv = next(parse_kv(l) for l in out.splitlines() if l.startswith("result "))
                    for key in ("daemon_us", "direct_us", "round_trip_us"):
                        res[rev].setdefault(f"{key}_{size}", []).append(float(kv[key]))
                stop(daemon)
                stop(pad)
                while os.path.exists("/dev/ioasid") or os.path.exists("/dev/cmp_pad"):
                    time.sleep(0.05)
                log(f"compare round {rnd + 1}/{rounds}: {rev} done")
    finally:
        stop(ref)
    print("COMPARE-JSON " + json.dumps({"kernel": os.uname().release, "revs": revs, "rounds": rounds,
                                        "seconds": float(seconds), "results": res}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
