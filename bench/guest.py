#!/usr/bin/python3
"""The guest half of scripts/bench: runs inside the test VM, as root.

Starts the servers (the CUSE library's scratchpad example, the libfuse
reference device, the cuse-ioasid daemon limited to one edu device), runs
the C clients of target/bench/ against them and against native VFIO, and
prints every figure as one JSON object on the last line of stdout, after
the marker "BENCH-JSON ". Progress goes to stderr.

Measurements of one table are interleaved: each round runs every row once,
so that load changes on the host hit all rows alike; a row's figure is the
median over the rounds.

Device use: the daemon serves only 00:0a.0 (--device), so it holds only
that device's IOMMU group; the direct (legacy VFIO) path uses 00:0b.0's
group, which no one else holds, in the same boot.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "target" / "bench"
RELEASE = REPO / "target" / "release"

DAEMON_BDF = "0000:00:0a.0"
DIRECT_BDF = "0000:00:0b.0"
SCRATCH_NAME = "bench_scratch"
REF_NAME = "bench_ref"

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 900) -> str:
    """Run a client; its stdout, or raise with its stderr."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def wait_for(path: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def group_of(bdf: str) -> str:
    return "/dev/vfio/" + os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))


def parse_kv(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


class Servers:
    """The three servers, started in order and stopped (SIGTERM) in reverse."""

    def __init__(self, scratch: Path) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.scratch = scratch
        self.daemon_pid = 0
        self.device_nodes = False

    def start(self) -> None:
        pad = subprocess.Popen(
            [str(RELEASE / "examples" / "scratchpad"), "--name", SCRATCH_NAME],
            stdout=subprocess.PIPE, stderr=open(self.scratch / "scratchpad.log", "w"), text=True)
        self.procs.append(("scratchpad", pad))
        line = pad.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"scratchpad did not start (said {line!r}); see scratchpad.log")
        ref = subprocess.Popen([str(BIN / "libfuse_ref"), REF_NAME],
                               stdout=subprocess.DEVNULL,
                               stderr=open(self.scratch / "libfuse_ref.log", "w"))
        self.procs.append(("libfuse_ref", ref))
        wait_for(f"/dev/{REF_NAME}", ref, "libfuse_ref")
        daemon = subprocess.Popen(
            [str(RELEASE / "cuse-ioasid"), "--device", DAEMON_BDF, "--log", "warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.scratch / "daemon.log", "w"))
        self.procs.append(("cuse-ioasid", daemon))
        wait_for("/dev/ioasid", daemon, "cuse-ioasid")
        try:
            wait_for("/dev/vfio/devices/dev1", daemon, "cuse-ioasid", timeout=10)
            self.device_nodes = True
        except RuntimeError as e:
            log(f"no device node: {e}; the daemon's map rows are skipped")
            self.device_nodes = False
        self.daemon_pid = daemon.pid

    def stop(self) -> list[str]:
        problems = []
        for name, p in reversed(self.procs):
            if p.poll() is not None:
                problems.append(f"{name} had exited with status {p.returncode}")
                continue
            p.send_signal(signal.SIGTERM)
            try:
                code = p.wait(timeout=15)
                if code != 0:
                    problems.append(f"{name} exited {code} after SIGTERM")
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                problems.append(f"{name} ignored SIGTERM (killed)")
        return problems


IOCTL_ROWS = [
    # key, kind, path
    ("native", "vfio-null", "/dev/vfio/vfio"),
    ("cuse_null", "scratch-null", f"/dev/{SCRATCH_NAME}"),
    ("cuse_struct", "scratch-struct", f"/dev/{SCRATCH_NAME}"),
    ("daemon_null", "ioasid-null", "/dev/ioasid"),
    ("daemon_struct", "ioasid-struct", "/dev/ioasid"),
    ("ref_null", "ref-null", f"/dev/{REF_NAME}"),
    ("ref_struct", "ref-struct", f"/dev/{REF_NAME}"),
]


def pin(pids: list[int], cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of these processes (threads
    they create later inherit it from their creator)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that just exited


def bench_ioctls(seconds: float, rounds: int) -> dict:
    rates: dict[str, list[float]] = {k: [] for k, _, _ in IOCTL_ROWS}
    requests: dict[str, list[str]] = {}
    for r in range(rounds):
        for key, kind, path in IOCTL_ROWS:
            out = run([str(BIN / "ioctl_rate"), kind, path, str(seconds), "1"])
            for line in out.splitlines():
                if line.startswith("result "):
                    rates[key].append(float(parse_kv(line)["median"]))
                elif line.startswith("requests "):
                    kv = parse_kv(line)
                    requests.setdefault(key, []).append(f"{kv['requests']}/{kv['ops']}")
        log(f"ioctl round {r + 1}/{rounds}: " +
            ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()))
    return {
        k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v,
            "requests": sorted(set(requests.get(k, [])))}
        for k, v in rates.items()
    }


def map_client(args: list[str], retries: int = 20) -> str:
    """map_rate; a daemon target may still be bound by the previous client's
    file whose RELEASE is in flight: retry EBUSY briefly."""
    for attempt in range(retries):
        try:
            return run([str(BIN / "map_rate")] + args, timeout=1800)
        except RuntimeError as e:
            if "Device or resource busy" in str(e) and attempt + 1 < retries:
                time.sleep(0.2)
                continue
            raise
    raise AssertionError("unreachable")


def paths(daemon_t: str | None, direct_t: str) -> list[tuple[str, str]]:
    """The (name, target) pairs to measure: the daemon's only if it serves
    a device node."""
    return ([("daemon", daemon_t)] if daemon_t else []) + [("direct", direct_t)]


def bench_pairs(sizes: list[int], seconds: float, rounds: int, daemon_t: str | None,
                direct_t: str) -> dict:
    """Map+unmap pairs through the daemon and directly, alternating pair by
    pair on the same memory, with a bare CUSE round trip (the CUSE
    library's null ioctl) in the same loop, so the daemon's extra cost can
    be counted in round trips. Rates are 1 / the median time of one pair
    (or round trip) in each round; the figure is the median over rounds."""
    res: dict = {}
    for size in sizes:
        row: dict[str, list[float]] = {"direct": []}
        for r in range(rounds):
            if daemon_t:
                out = map_client(["versus", daemon_t, direct_t, f"/dev/{SCRATCH_NAME}",
                                  str(size), str(seconds)])
                kv = next(parse_kv(l) for l in out.splitlines() if l.startswith("result "))
                for key, field in (("daemon", "daemon_us"), ("direct", "direct_us"),
                                   ("round_trip", "round_trip_us")):
                    row.setdefault(key, []).append(1e6 / float(kv[field]))
            else:
                out = map_client(["pairs", direct_t, str(size), str(seconds), "1"])
                row["direct"] += [float(parse_kv(l)["median"]) for l in out.splitlines()
                                  if l.startswith("result ")]
        res[str(size)] = {p: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                          for p, v in row.items()}
        log(f"map+unmap {size} bytes: " + ", ".join(
            f"{p} {v['median']:.1f}/s" for p, v in res[str(size)].items()))
    return res


def bench_scale(levels: list[int], pairs: int, daemon_t: str | None, direct_t: str,
                daemon_pid: int) -> dict:
    res: dict = {}
    for path, target in paths(daemon_t, direct_t):
        pid = daemon_pid if path == "daemon" else 0
        args = ["scale", target, ",".join(map(str, levels)), str(pairs)]
        if pid:
            args.append(str(pid))
        out = map_client(args)
        rows = []
        teardown = {}
        for line in out.splitlines():
            w = line.split()
            if line.startswith("level "):
                kv = parse_kv(line)
                rows.append({"count": int(w[1]), "fill_per_s": float(kv["fill_per_s"]),
                             "pair_per_s": float(kv["pair_per_s"]), "rss_kib": int(kv["rss_kib"])})
            elif line.startswith("teardown "):
                kv = parse_kv(line)
                teardown = {"count": int(w[1]), "seconds": float(kv["seconds"]),
                            "rss_kib": int(kv["rss_kib"])}
        res[path] = {"levels": rows, "teardown": teardown}
        log(f"scale {path}: " + ", ".join(
            f"{r['count']}: pair {r['pair_per_s']:.0f}/s rss {r['rss_kib']} KiB" for r in rows))
    return res


def bench_clients(n: int, seconds: float, daemon_t: str | None, direct_t: str) -> dict:
    res: dict = {}
    for path, target in paths(daemon_t, direct_t):
        out = map_client(["clients", target, str(n), str(seconds)])
        counts = [int(parse_kv(l)["pairs"]) for l in out.splitlines() if l.startswith("client ")]
        res[path] = {"total_per_s": sum(counts) / seconds, "min": min(counts),
                     "max": max(counts), "counts": counts, "seconds": seconds}
        log(f"{n} clients {path}: {res[path]['total_per_s']:.0f} pairs/s, "
            f"min {min(counts)} max {max(counts)} pairs per client")
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-map", action="store_true", help="round trips only")
    ap.add_argument("--pin", action="store_true",
                    help="round trips with clients and servers on vCPU 0 (besides the spread run)")
    args = ap.parse_args()

    scratch = Path(os.environ.get("VM_SCRATCH", "/tmp"))
    if args.quick:
        seconds, rounds = 0.3, 3
        sizes = [4 * KIB, 2 * MIB, 64 * MIB]
        levels, pairs = [0, 10_000], 200
        clients, client_seconds = 8, 1.0
    else:
        seconds, rounds = 1.0, 5
        sizes = [4 * KIB, 2 * MIB, 64 * MIB]
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
        if mem_kib > 2_500_000:
            sizes.append(GIB)
        levels, pairs = [0, 10_000, 100_000], 1000
        clients, client_seconds = 8, 3.0

    result: dict = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_kib": int(Path("/proc/meminfo").read_text().split()[1]),
        "cmdline": Path("/proc/cmdline").read_text().strip(),
        "dma_entry_limit": Path("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
        .read_text().strip(),
        "quick": args.quick,
        "ioctl_seconds": seconds,
        "rounds": rounds,
        "daemon_device": DAEMON_BDF,
        "direct_device": DIRECT_BDF,
    }
    servers = Servers(scratch)
    status = 0
    try:
        servers.start()
        log(f"servers up (daemon pid {servers.daemon_pid}); kernel {result['kernel']}")
        result["ioctl"] = bench_ioctls(seconds, rounds)
        if args.pin:
            everyone = {0}
            servers_pids = [p.pid for _, p in servers.procs]
            pin(servers_pids + [os.getpid()], everyone)
            log("round trips again, every server thread and client on vCPU 0")
            result["ioctl_pinned"] = bench_ioctls(seconds, rounds)
            pin(servers_pids + [os.getpid()], set(range(os.cpu_count() or 1)))
        if not args.no_map:
            daemon_t = "daemon:/dev/vfio/devices/dev1" if servers.device_nodes else None
            result["daemon_device_nodes"] = servers.device_nodes
            direct_t = "direct:" + group_of(DIRECT_BDF)
            # Pairs and scale on vCPU 0, like the pinned round trips: a
            # wake-up across vCPUs under TCG costs more, and more unevenly,
            # than anything the daemon does.
            servers_pids = [p.pid for _, p in servers.procs]
            pin(servers_pids + [os.getpid()], {0})
            result["map_pinned"] = True
            result["pairs"] = bench_pairs(sizes, seconds, rounds, daemon_t, direct_t)
            if max(levels) > 65_000 and int(result["dma_entry_limit"]) <= max(levels):
                log(f"dma_entry_limit is {result['dma_entry_limit']}: scale stops at 10000")
                levels = [x for x in levels if x <= 10_000]
            result["scale"] = bench_scale(levels, pairs, daemon_t, direct_t, servers.daemon_pid)
            # Several clients at once: every vCPU.
            pin(servers_pids + [os.getpid()], set(range(os.cpu_count() or 1)))
            result["clients"] = bench_clients(clients, client_seconds, daemon_t, direct_t)
    except Exception as e:  # report what ran, and why the rest did not
        log(f"FAILED: {e}")
        result["error"] = str(e)
        status = 1
    finally:
        problems = servers.stop()
        if problems:
            log("server problems: " + "; ".join(problems))
            result["server_problems"] = problems
            status = 1
    print("BENCH-JSON " + json.dumps(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
