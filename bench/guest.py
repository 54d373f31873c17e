#!/usr/bin/python3
"""The guest half of scripts/bench: runs inside the test VM, as root.

Starts the servers (the CUSE library's scratchpad example, the libfuse
reference device, the cuse-ioasid daemon limited to one edu device), runs
the C clients of target/bench/ against them and against native VFIO, and
writes every figure as one JSON object into $VM_SCRATCH/bench-result.json
(see emit). Progress goes to stderr.

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

    def __init__(self, scratch: Path, daemon: Path) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.scratch = scratch
        self.daemon = daemon
        self.daemon_pid = 0
        self.device_nodes = False

    def budget_args(self) -> list[str]:
        """A daemon with per-client budgets (issue 17, item 7) refuses a
        client past 4096 aliases and 65535 mappings by default: the scale
        runs go to 100,000 of each, so raise both past that. A daemon that
        predates the budgets (a --baseline) has no such options."""
        help_text = run([str(self.daemon), "--help"])
        if "--max-client-aliases" not in help_text:
            return []
        return ["--max-client-aliases", str(BUDGET), "--max-client-mappings", str(BUDGET)]

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
            [str(self.daemon), "--device", DAEMON_BDF, "--log", "warn"] + self.budget_args(),
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


def map_client(args: list[str], retries: int = 20, program: str = "map_rate",
               timeout: float = 1800) -> str:
    """map_rate (or map_scale); a daemon target may still be bound by the
    previous client's file whose RELEASE is in flight: retry EBUSY briefly."""
    for attempt in range(retries):
        try:
            return run([str(BIN / program)] + args, timeout=timeout)
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


# The fields of a `map_rate loop` result, in microseconds.
LOOP_FIELDS = ("daemon_map_us", "daemon_unmap_us", "daemon_us", "direct_map_us",
               "direct_unmap_us", "direct_us", "round_trip_us", "peek_us", "transform_us",
               "floor_us")


def loop_rows(sizes: list[int], quick: bool, private: bool = True) -> list[dict]:
    """The rows of the map table: mode and size, how long each round runs
    (seconds, and at least min_n times round the loop), and for the guest
    RAM rows "once": one process runs min_n pairs per path in the first
    round only (their memory is allocated once per process: a minute
    under TCG for 1 GiB), "pinned_only": not repeated with threads free.
    Without `private`, no private rows (a daemon before issue 14 refuses
    private memory)."""
    rows = [{"mode": "warm", "size": s} for s in sizes]
    rows += [{"mode": "cold", "size": s} for s in (4 * KIB, 2 * MIB, 64 * MIB)]
    rows += [{"mode": "registered", "size": s} for s in (4 * KIB, 2 * MIB)]
    # Private memory (issue 14), next to the warm shared rows: the same
    # populated pages every pair, pinned by the client's own thread.
    if private:
        rows += [{"mode": "private", "size": s} for s in (4 * KIB, 2 * MIB)]
    # Guest RAM as a VMM maps it: a new mapping of a memfd populated
    # beforehand (QEMU's prealloc=on), 1 GiB (256 MiB in a quick run); in a
    # full run also a new memfd the pin must allocate (prealloc=off), once.
    rows.append({"mode": "cold", "size": 256 * MIB if quick else GIB, "seconds": 0,
                 "min_n": 2 if quick else 3, "once": True})
    if not quick:
        rows.append({"mode": "lazy", "size": GIB, "seconds": 0, "min_n": 1, "once": True,
                     "pinned_only": True})
    for r in rows:
        r.setdefault("min_n", 3 if r["size"] >= 64 * MIB else 10)
    return rows


def row_key(row: dict) -> str:
    return f"{row['mode']}-{row['size']}"


def bench_loops(rows: list[dict], seconds: float, rounds: int, daemon_t: str,
                direct_t: str) -> dict:
    """Each row is one `map_rate loop`: map+unmap through the daemon and
    directly, a bare CUSE round trip and the floor of a daemon pair,
    alternating in one loop. A round runs every row once, so a change of
    load hits all rows alike; each figure is the median over the rounds."""
    res: dict = {row_key(r): {f: [] for f in LOOP_FIELDS} | {"n": []} for r in rows}
    for rnd in range(rounds):
        for row in rows:
            if rnd and row.get("once"):
                continue
            out = map_client(["loop", row["mode"], daemon_t, direct_t, f"/dev/{SCRATCH_NAME}",
                              str(row["size"]), str(row.get("seconds", seconds)),
                              str(row["min_n"])])
            kv = next(parse_kv(l) for l in out.splitlines() if l.startswith("result "))
            r = res[row_key(row)]
            for f in LOOP_FIELDS:
                r[f].append(float(kv[f]))
            r["n"].append(int(kv["n"]))
        log(f"map loop round {rnd + 1}/{rounds}: " + ", ".join(
            f"{k} {v['daemon_us'][-1]:.0f}/{v['direct_us'][-1]:.0f} us" for k, v in res.items()
            if v["daemon_us"]))
    return {k: {f: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                for f, v in r.items()} for k, r in res.items()}


def bench_scale(kind: str, levels: list[int], pairs: int, budget: float, daemon_t: str | None,
                direct_t: str, daemon_pid: int) -> dict:
    """`map_scale KIND`: fill to each level, one more map+unmap, memory."""
    res: dict = {}
    for path, target in paths(daemon_t, direct_t):
        args = [kind, target, ",".join(map(str, levels)), str(pairs), str(budget)]
        if path == "daemon":
            args.append(str(daemon_pid))
        out = map_client(args, program="map_scale", timeout=budget * 3 + 600)
        rows = []
        teardown = {}
        for line in out.splitlines():
            w = line.split()
            kv = parse_kv(line)
            if line.startswith("level "):
                rows.append({"count": int(w[1])} | {k: float(v) for k, v in kv.items()})
            elif line.startswith("teardown "):
                teardown = {"count": int(w[1])} | {k: float(v) for k, v in kv.items()}
        res[path] = {"levels": rows, "teardown": teardown}
        log(f"scale {kind} {path}: " + ", ".join(
            f"{r['reached']:.0f}: pair {r['pair_per_s']:.0f}/s anon {r['anon_kib']:.0f} KiB"
            for r in rows))
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


def emit(result: dict, scratch: Path) -> None:
    """The result as JSON in $VM_SCRATCH/bench-result.json (a file: the VM's
    output channel does not carry a line of some 32 KiB whole), and the
    marker line "BENCH-RESULT bench-result.json" on stdout."""
    (scratch / "bench-result.json").write_text(json.dumps(result))
    print("BENCH-RESULT bench-result.json", flush=True)


# The per-client alias and mapping budget the daemon is started with: above
# the scale runs' 100,000 levels.
BUDGET = 200_000

PARTS = ("ioctl", "loops", "spread", "scale", "distinct", "clients")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-map", action="store_true", help="round trips only")
    ap.add_argument("--pin", action="store_true",
                    help="round trips with clients and servers on vCPU 0 (besides the spread run)")
    ap.add_argument("--daemon", type=Path, default=RELEASE / "cuse-ioasid",
                    help="the daemon binary (default: the release build)")
    ap.add_argument("--no-private", action="store_true",
                    help="no private-memory rows (a daemon that predates issue 14)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma list of what to measure (default all: {','.join(PARTS)})")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.no_map:
        parts &= {"ioctl"}
    if parts - set(PARTS):
        ap.error(f"unknown parts {sorted(parts - set(PARTS))}")

    scratch = Path(os.environ.get("VM_SCRATCH", "/tmp"))
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    sizes = [4 * KIB, 2 * MIB, 64 * MIB]
    if args.quick:
        seconds, rounds = 0.3, 3
        levels, pairs = [0, 10_000], 200
        distinct_levels, budget = [0, 1000, 3000], 30.0
        distinct_budget = budget
        clients, client_seconds = 8, 1.0
    else:
        seconds, rounds = 1.0, 5
        if mem_kib > 2_500_000:
            sizes.append(GIB)
        levels, pairs = [0, 10_000, 100_000], 1000
        distinct_levels, budget = [0, 1000, 3000, 10_000, 30_000, 100_000], 180.0
        # A cold map costs the daemon a few ms under TCG: 100,000 of them
        # take some 10 minutes, which the shared area's budget cannot hold.
        distinct_budget = 900.0
        clients, client_seconds = 8, 3.0

    result: dict = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_kib": mem_kib,
        "cmdline": Path("/proc/cmdline").read_text().strip(),
        "dma_entry_limit": Path("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
        .read_text().strip(),
        "quick": args.quick,
        "parts": sorted(parts),
        "ioctl_seconds": seconds,
        "rounds": rounds,
        "daemon_device": DAEMON_BDF,
        "direct_device": DIRECT_BDF,
        "daemon": str(args.daemon),
    }
    # One area per distinct buffer, in the client and in the daemon (its
    # alias): 100,000 of them need more than the default 65530 areas.
    max_map = Path("/proc/sys/vm/max_map_count")
    result["max_map_count"] = {"was": int(max_map.read_text())}
    if "distinct" in parts and result["max_map_count"]["was"] < 4 * max(distinct_levels):
        max_map.write_text(str(4 * max(distinct_levels)))
    result["max_map_count"]["now"] = int(max_map.read_text())
    servers = Servers(scratch, args.daemon)
    status = 0
    try:
        servers.start()
        log(f"servers up (daemon pid {servers.daemon_pid}); kernel {result['kernel']}")
        servers_pids = [p.pid for _, p in servers.procs]
        everyone = set(range(os.cpu_count() or 1))
        if "ioctl" in parts:
            result["ioctl"] = bench_ioctls(seconds, rounds)
            if args.pin:
                pin(servers_pids + [os.getpid()], {0})
                log("round trips again, every server thread and client on vCPU 0")
                result["ioctl_pinned"] = bench_ioctls(seconds, rounds)
                pin(servers_pids + [os.getpid()], everyone)
        daemon_t = "daemon:/dev/vfio/devices/dev1" if servers.device_nodes else None
        result["daemon_device_nodes"] = servers.device_nodes
        direct_t = "direct:" + group_of(DIRECT_BDF)
        rows = loop_rows(sizes, args.quick, private=not args.no_private)
        if daemon_t and "loops" in parts:
            # On vCPU 0 first, like the pinned round trips: a wake-up across
            # vCPUs under TCG costs more, and more unevenly, than anything
            # the daemon does; then the same rows with every thread free.
            pin(servers_pids + [os.getpid()], {0})
            log("map loops, every server thread and client on vCPU 0")
            result["maps_pinned"] = bench_loops(rows, seconds, rounds, daemon_t, direct_t)
            pin(servers_pids + [os.getpid()], everyone)
        if daemon_t and "spread" in parts:
            log("map loops, threads free on every vCPU")
            # A quick run repeats only the 4 KiB rows.
            spread = [r for r in rows if not r.get("pinned_only")
                      and (not args.quick or r["size"] == 4 * KIB)]
            result["maps_spread"] = bench_loops(spread, seconds, rounds, daemon_t, direct_t)
        if "scale" in parts or "distinct" in parts:
            pin(servers_pids + [os.getpid()], {0})
            if max(levels) > 65_000 and int(result["dma_entry_limit"]) <= max(levels):
                log(f"dma_entry_limit is {result['dma_entry_limit']}: scale stops at 10000")
                levels = [x for x in levels if x <= 10_000]
                distinct_levels = [x for x in distinct_levels if x <= 10_000]
            if "scale" in parts:
                result["scale"] = bench_scale("shared", levels, pairs, budget, daemon_t,
                                              direct_t, servers.daemon_pid)
            if "distinct" in parts:
                result["scale_distinct"] = bench_scale("distinct", distinct_levels, pairs,
                                                       distinct_budget, daemon_t, direct_t,
                                                       servers.daemon_pid)
            pin(servers_pids + [os.getpid()], everyone)
        if "clients" in parts:
            # Several clients at once: every vCPU.
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
    emit(result, scratch)
    return status


if __name__ == "__main__":
    sys.exit(main())
