"""The Debian package, installed for real and run as a systemd service.

The guest's / is the host's, read-only; the module lays an overlay with a
tmpfs upper layer over it, installs target/debian/cuse-ioasid_*.deb there
with `dpkg -i` (built by `scripts/package --profile dev`), and:

- boots systemd in a PID namespace on that root, starts
  cuse-ioasid.service (Type=notify: `systemctl start` returns on READY=1)
  with its capability bounding set and hardening, runs flow 5.1 as root, as
  a member of the group "ioasid" the package created, and as a user outside
  it (EACCES), has the first two pin private memory by their own thread
  (issue 14), asks `cuse-ioasid status` as each of them (the outsider is
  refused), reads the journal (one line per event, its priority), stops
  the unit;
- starts the unit's ExecStart line as systemd would (environment file,
  bounding set, limits: tests/harness/unit.py reads the unit) with
  NOTIFY_SOCKET on a socket of the test: READY=1 only once every node
  exists, STOPPING=1 on SIGTERM;
- drops each capability of the unit (and its LimitMEMLOCK) in turn and
  shows what breaks without it: the set is the smallest that works.

    scripts/package --profile dev && tests/c/build && \\
        scripts/vm -- /usr/bin/python3 -m pytest tests/scenarios/test_service.py -v
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, in_test_vm
from harness.daemon import ALL_EDU, daemon_pids, wait_for
from harness.unit import Unit, cap_mask, setpriv_argv

pytestmark = pytest.mark.skipif(not in_test_vm(), reason="needs the test VM: run under scripts/vm")

# The package is built for Debian 12: its systemd and the capability matrix
# run on Debian 12's kernel (6.1). On sid's kernel the package installs and
# the unit's ExecStart line runs under a test's NOTIFY_SOCKET; the rest is
# left out there to keep the CI run within its time.
debian_12_kernel_only = pytest.mark.skipif(
    not os.uname().release.startswith("6.1."),
    reason="systemd 252 and the capability matrix run on Debian 12's kernel (6.1) only")

UNIT = "cuse-ioasid.service"
UNIT_PATH = Path("usr/lib/systemd/system") / UNIT
FLOW_5_1 = REPO / "target" / "c" / "flow_5_1"
PRIVATE_DMA = REPO / "target" / "c" / "private_dma_ioasid"
# Inside the overlay: not /tmp, which systemd empties at boot.
CLIENT = "/usr/local/bin/flow_5_1"
PRIVATE_CLIENT = "/usr/local/bin/private_dma_ioasid"
SYSTEMCTL_ENV = {"SYSTEMD_IGNORE_CHROOT": "1", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
# flow_5_1's steps that prove DMA crossed the IOMMU (tests/c/flow_5_1.c).
DMA_PROOF = ["page B now holds exactly page A's 3000 bytes", "the MSI arrived", "flow_5_1: PASS"]
NODES = ["/dev/ioasid"] + [f"/dev/vfio/devices/dev{n}" for n in range(1, len(ALL_EDU) + 1)]


def iommufd_nodes() -> list[str]:
    """/dev/iommu and each device's vfioN cdev (N is the kernel's own, from
    sysfs), which the daemon serves besides NODES."""
    cdevs = [f"/dev/vfio/devices/{name}" for bdf in ALL_EDU
             for name in os.listdir(f"/sys/bus/pci/devices/{bdf}/vfio-dev")]
    return ["/dev/iommu", *sorted(cdevs)]


def run(argv, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"`{' '.join(map(str, argv))}` exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def deb_path() -> Path:
    debs = sorted((REPO / "target" / "debian").glob("cuse-ioasid_*.deb"))
    if len(debs) != 1:
        pytest.fail(f"want exactly one target/debian/cuse-ioasid_*.deb, found {debs}: "
                    "run scripts/package --profile dev on the host")
    return debs[0]


@pytest.fixture(scope="module")
def root():
    """An overlay of / with the package installed by dpkg -i; users alice
    (in the group ioasid) and bob (not)."""
    if daemon_pids():
        pytest.fail("a cuse-ioasid daemon is already running: this module starts its own")
    for client in (FLOW_5_1, PRIVATE_DMA):
        if not client.exists():
            pytest.fail(f"{client} missing: run tests/c/build on the host")
    base = Path(tempfile.mkdtemp(prefix="service-", dir="/tmp"))
    top = base / "root"
    for d in ("upper", "work", "root"):
        (base / d).mkdir()
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir=/,upperdir={base}/upper,workdir={base}/work", str(top)])
    try:
        for fs in ("proc", "sys", "dev"):
            run(["mount", "--rbind", f"/{fs}", str(top / fs)])
        for fs in ("tmp", "run"):
            run(["mount", "-t", "tmpfs", "-o", "mode=1777" if fs == "tmp" else "mode=755",
                 "tmpfs", str(top / fs)])
        shutil.copy(deb_path(), top / "tmp" / deb_path().name)
        shutil.copy(FLOW_5_1, top / CLIENT.lstrip("/"))
        shutil.copy(PRIVATE_DMA, top / PRIVATE_CLIENT.lstrip("/"))
        run(["chroot", str(top), "dpkg", "-i", f"/tmp/{deb_path().name}"])
        run(["chroot", str(top), "useradd", "--no-create-home", "--groups", "ioasid", "alice"])
        run(["chroot", str(top), "useradd", "--no-create-home", "bob"])
        yield top
    finally:
        subprocess.run(["umount", "--recursive", "--lazy", str(top)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def as_user(where, user: str | None, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """argv inside the overlay (`where` is its path, or a Systemd to run in
    its namespaces), as root or as `user` with its groups."""
    prefix = where.enter() if isinstance(where, Systemd) else ["chroot", str(where)]
    if user:
        prefix += ["setpriv", "--reuid", user, "--regid", user, "--init-groups"]
    return run(prefix + argv, check=False, **kw)


def flow_5_1(where, user: str | None, node: str) -> subprocess.CompletedProcess:
    return as_user(where, user, [CLIENT, node])


def assert_flow_passes(r: subprocess.CompletedProcess, who: str) -> None:
    assert r.returncode == 0, f"flow 5.1 as {who}:\n{r.stdout}{r.stderr}"
    at = 0
    for step in DMA_PROOF:
        found = r.stdout.find(step, at)
        assert found >= 0, f"flow 5.1 as {who}: missing {step!r}\n{r.stdout}"
        at = found


def nodes_gone() -> bool:
    return not any(os.path.exists(n) for n in NODES)


# ---------------------------------------------------------------------------
# The package
# ---------------------------------------------------------------------------


def test_package_is_installed_with_its_group(root):
    """dpkg -i ran (the fixture); tests/host/test_package.py checks the
    package's contents and its unit on the host."""
    status = run(["chroot", str(root), "dpkg-query", "-W", "-f",
                  "${Status} ${Version}\n${Conffiles}\n", "cuse-ioasid"]).stdout
    assert status.startswith("install ok installed "), status
    assert "/etc/default/cuse-ioasid " in status, "the configuration is a conffile"
    for installed, source in ((UNIT_PATH, "packaging/cuse-ioasid.service"),
                              ("etc/default/cuse-ioasid", "packaging/cuse-ioasid.default")):
        assert (root / installed).read_text() == (REPO / source).read_text(), (
            f"/{installed} differs from {source}: the package is stale, run "
            "scripts/package --profile dev")
    version = run(["chroot", str(root), "cuse-ioasid", "--version"]).stdout
    assert version.startswith("cuse-ioasid "), version
    # postinst made the group the default configuration names.
    assert run(["chroot", str(root), "getent", "group", "ioasid"]).stdout.startswith("ioasid:")
    # The modules the package has loaded at boot are the ones this guest
    # loaded (by the names the kernel knows).
    conf = (root / "usr/lib/modules-load.d/cuse-ioasid.conf").read_text()
    modules = [w for w in (line.split("#")[0].strip() for line in conf.splitlines()) if w]
    for m in modules:
        assert Path(f"/sys/module/{m.replace('-', '_')}").is_dir(), m
    # systemd accepts the installed unit: syntax, directives, the binary,
    # the man page it names.
    r = run(["chroot", str(root), "systemd-analyze", "verify", f"/{UNIT_PATH}"], check=False,
            env={**os.environ, **SYSTEMCTL_ENV})
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------
# Under systemd
# ---------------------------------------------------------------------------


class Systemd:
    """systemd running as PID 1 of a PID namespace on the overlay `root`."""

    def __init__(self, root: Path, pid: int):
        self.root = root
        self.pid = pid  # as this process sees it

    def enter(self) -> list[str]:
        """A command prefix that runs in systemd's PID and mount namespaces
        and root. Clients of the daemon must: FUSE gives the daemon the
        caller's pid in the daemon's own PID namespace (0 from outside);
        and systemd answers a systemctl from outside only sometimes."""
        return ["nsenter", "--target", str(self.pid), "--pid", "--mount", "--root", "--wd"]

    def systemctl(self, *args: str, check=True, timeout=300) -> subprocess.CompletedProcess:
        return run(self.enter() + ["systemctl", *args], check=check, timeout=timeout,
                   env={**os.environ, **SYSTEMCTL_ENV})


def systemctl(sd: Systemd, *args: str, check=True, timeout=300) -> subprocess.CompletedProcess:
    return sd.systemctl(*args, check=check, timeout=timeout)


def unit_properties(sd: Systemd, *names: str) -> dict[str, str]:
    out = systemctl(sd, "show", UNIT, *[f"--property={n}" for n in names]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(root: Path) -> list[dict]:
    out = run(["chroot", str(root), "journalctl", "--unit", UNIT, "--output", "json",
               "--no-pager"], env={**os.environ, **SYSTEMCTL_ENV}).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def daemon_entries(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "cuse-ioasid"]


@pytest.fixture(scope="module")
def systemd(root, scratch_dir):
    """systemd as PID 1 of a PID namespace on the overlay, booted to
    basic.target (the unit is not started)."""
    cgroup = root / "sys/fs/cgroup"
    run(["mount", "-t", "cgroup2", "cgroup2", str(cgroup)])
    log = open(scratch_dir / "systemd.log", "wb")

    def log_text() -> str:
        return (scratch_dir / "systemd.log").read_text(errors="replace")[-4000:]

    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", f"--mount-proc={root}/proc",
         "chroot", str(root), "/lib/systemd/systemd", "--unit=basic.target",
         "--log-target=console", "--show-status=no"],
        env={"container": "cuse-ioasid-test", "PATH": os.environ["PATH"]},
        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        wait_for(lambda: children.read_text().split() or proc.poll() is not None,
                 "unshare started no child", 60)
        sd = Systemd(root, int(children.read_text().split()[0]))

        def booted() -> bool:
            assert proc.poll() is None, f"systemd exited:\n{log_text()}"
            state = sd.systemctl("is-system-running", check=False).stdout.strip()
            return state in ("running", "degraded")

        wait_for(booted, "systemd did not finish booting basic.target", 300)
        yield sd
    finally:
        proc.kill()  # --kill-child: PID 1 of the namespace dies, and every process in it
        proc.wait(timeout=60)
        log.close()
        wait_for(lambda: not daemon_pids(), "daemon still running after systemd was killed", 60)
        subprocess.run(["umount", str(cgroup)], check=False)


@pytest.fixture(scope="module")
def scratch_dir() -> Path:
    return Path(os.environ["VM_SCRATCH"])


@debian_12_kernel_only
def test_unit_starts_once_every_node_exists(systemd):
    systemctl(systemd, "start", UNIT)  # returns when the daemon sends READY=1
    # No wait here: READY=1 came after the last node was made and chowned.
    group = [line for line in (systemd.root / "etc/group").read_text().splitlines()
             if line.startswith("ioasid:")][0]
    gid = int(group.split(":")[2])
    for node in NODES + iommufd_nodes():
        st = os.stat(node)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, gid, 0o660), node
    props = unit_properties(systemd, "ActiveState", "SubState", "Type", "StatusText")
    assert (props["ActiveState"], props["SubState"], props["Type"]) == ("active", "running",
                                                                        "notify"), props
    assert props["StatusText"] == f"serving /dev/ioasid, /dev/iommu and {len(ALL_EDU)} device(s)"
    # The daemon holds exactly the unit's capabilities.
    unit = Unit.read(systemd.root / UNIT_PATH)
    pids = daemon_pids()  # as this process sees them (MainPID is systemd's view)
    assert len(pids) == 1, pids
    status = Path(f"/proc/{pids[0]}/status").read_text()
    caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    want = cap_mask(unit.capabilities())
    assert int(caps["CapBnd"], 16) == want and int(caps["CapEff"], 16) == want, caps
    assert "NoNewPrivs:\t1" in status
    limits = Path(f"/proc/{pids[0]}/limits").read_text()
    assert any(line.startswith("Max locked memory") and "unlimited" in line
               for line in limits.splitlines()), limits


@debian_12_kernel_only
def test_flow_5_1_as_root_as_group_member_and_outsider(systemd):
    assert_flow_passes(flow_5_1(systemd, None, NODES[1]), "root")
    assert_flow_passes(flow_5_1(systemd, "alice", NODES[2]), "alice (group ioasid)")
    r = flow_5_1(systemd, "bob", NODES[3])
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"FAILED: open {NODES[3]} (Permission denied)" in r.stdout, r.stdout
    # Nor can bob open /dev/ioasid.
    r = as_user(systemd, "bob", ["python3", "-c", "import os; os.open('/dev/ioasid', os.O_RDWR)"])
    assert "PermissionError" in r.stderr and f"[Errno {errno.EACCES}]" in r.stderr, r.stderr


@debian_12_kernel_only
def test_private_memory_as_root_and_as_group_member(systemd):
    """Under the unit's hardening the daemon still has a client's own thread
    pin its malloc memory (issue 14): it ptraces the thread
    (CAP_SYS_PTRACE) and hands it the container over an abstract Unix
    socket, which only works in the client's network namespace."""
    for user, node in ((None, NODES[1]), ("alice", NODES[2])):
        r = as_user(systemd, user, ["env", f"PRIVATE_DEVICE={node}", PRIVATE_CLIENT, "malloc",
                                    "0x100000"])
        assert r.returncode == 0 and "PASS malloc" in r.stdout, (
            f"private memory as {user or 'root'}:\n{r.stdout}{r.stderr}")


@debian_12_kernel_only
def test_status_answers_root_and_the_group_only(systemd):
    """The unit's RuntimeDirectory holds the status socket, root:ioasid
    0660 (the package's --node-group ioasid): root and alice get the
    status, bob is refused."""
    socket = "/run/cuse-ioasid/status.sock"
    r = as_user(systemd, None, ["stat", "-c", "%U:%G %a", socket])
    assert r.stdout.split() == ["root:ioasid", "660"], r.stdout + r.stderr
    for user in (None, "alice"):
        r = as_user(systemd, user, ["cuse-ioasid", "status", "--json"])
        assert r.returncode == 0, f"status as {user or 'root'}: {r.stderr}"
        status = json.loads(r.stdout)
        assert [d["node"] for d in status["devices"]] == NODES[1:], status["devices"]
        assert status["processes"] == [], status["processes"]
    r = as_user(systemd, "bob", ["cuse-ioasid", "status"])
    assert r.returncode == 1 and "permission denied" in r.stderr, r.stdout + r.stderr


@debian_12_kernel_only
def test_unit_stops_on_sigterm(systemd):
    systemctl(systemd, "stop", UNIT)
    assert nodes_gone(), [n for n in NODES if os.path.exists(n)]
    props = unit_properties(systemd, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}


@debian_12_kernel_only
def test_journal_has_one_line_per_event_with_its_priority(systemd):
    # A start that fails on a bad option logs an error: change the
    # configuration, start, restore.
    conf = systemd.root / "etc/default/cuse-ioasid"
    saved = conf.read_text()
    conf.write_text('CUSE_IOASID_ARGS="--node-group no-such-group"\n')
    try:
        r = systemctl(systemd, "start", UNIT, check=False)
        assert r.returncode != 0, "the unit started with a group that does not exist"
    finally:
        conf.write_text(saved)
    entries = daemon_entries(journal(systemd.root))
    assert entries, "nothing from the daemon in the journal"
    for e in entries:
        msg = e["MESSAGE"]
        assert isinstance(msg, str) and "\x1b" not in msg and not msg.startswith("<"), e
        assert "\n" not in msg, e
    by_text = {e["MESSAGE"]: e["PRIORITY"] for e in entries}
    serving = [p for m, p in by_text.items() if "serving" in m and "/dev/ioasid" in m]
    assert serving == ["6"], by_text
    stopping = [p for m, p in by_text.items() if "SIGTERM: stopping" in m]
    assert stopping == ["6"], by_text
    errors = [(m, p) for m, p in by_text.items() if "no such group" in m]
    assert errors and all(p == "3" for _, p in errors), by_text


# ---------------------------------------------------------------------------
# The unit's ExecStart, started by hand as systemd would
# ---------------------------------------------------------------------------


class Service:
    """The unit's ExecStart under `root`, with its environment file, its
    capability bounding set (or `caps`), NoNewPrivileges and LimitMEMLOCK
    (unless `memlock_unlimited` says otherwise); NOTIFY_SOCKET is a socket
    of this object."""

    def __init__(self, root: Path, log: Path, caps=None, memlock_unlimited=None):
        unit = Unit.read(root / UNIT_PATH)
        self.root = root
        self.caps = unit.capabilities() if caps is None else caps
        unlimited = unit.memlock_unlimited() if memlock_unlimited is None else memlock_unlimited
        env = unit.environment(root)
        argv = unit.exec_start(env)
        self.notify_path = "/run/test-notify.sock"
        (root / self.notify_path.lstrip("/")).unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(root / self.notify_path.lstrip("/")))
        self.log_path = log
        self.log = open(log, "wb")

        def limits():
            if unlimited:
                inf = resource.RLIM_INFINITY
                resource.setrlimit(resource.RLIMIT_MEMLOCK, (inf, inf))

        self.proc = subprocess.Popen(
            ["chroot", str(root)] + setpriv_argv(self.caps, unit.no_new_privileges()) + argv,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": self.notify_path,
                 **env},
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, preexec_fn=limits)

    def receive(self, timeout: float) -> str | None:
        """The next notification, or None if the daemon exited first or
        nothing came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.2)
            try:
                return self.sock.recv(4096).decode()
            except socket.timeout:
                if self.proc.poll() is not None:
                    return None
        return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.log.close()
        self.sock.close()
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.log.closed:
            self.log.close()
        self.sock.close()


def test_exec_start_notifies_ready_after_every_node_and_stopping_on_sigterm(root, scratch_dir):
    with Service(root, scratch_dir / "service-notify.log") as svc:
        msg = svc.receive(120)
        # Checked the moment READY=1 is read: every node is already there.
        present = [n for n in NODES if os.path.exists(n)]
        assert msg is not None, f"no notification; log:\n{svc.log_text()}"
        assert msg.splitlines()[0] == "READY=1", msg
        assert present == NODES, f"READY=1 before {set(NODES) - set(present)} existed"
        assert svc.proc.poll() is None
        svc.proc.send_signal(signal.SIGTERM)
        msg = svc.receive(60)
        assert msg == "STOPPING=1\n", msg
        assert svc.stop() == 0, svc.log_text()
        assert nodes_gone()
    # No terminal, no JOURNAL_STREAM: plain text without escape codes.
    text = (scratch_dir / "service-notify.log").read_text()
    assert "serving" in text and "\x1b" not in text, text


# Without each capability of the unit, and without LimitMEMLOCK: what
# breaks. The client is root ("root"), or alice of the group ioasid.
WITHOUT = {
    "CAP_SYS_ADMIN": ("root", "FAILED: IOASID_MAP_DMA (Operation not permitted)"),
    "CAP_SYS_PTRACE": ("root", "FAILED: VFIO_BIND_IOASID_FD (Operation not permitted)"),
    "CAP_DAC_READ_SEARCH": ("alice", "FAILED: IOASID_MAP_DMA (Permission denied)"),
    "CAP_SYS_RESOURCE": ("alice", "FAILED: IOASID_MAP_DMA (Operation not permitted)"),
    "CAP_CHOWN": ("daemon", "needs CAP_CHOWN"),
}


def test_every_capability_of_the_unit_is_needed(root):
    assert sorted(WITHOUT) == sorted(Unit.read(root / UNIT_PATH).capabilities())


@debian_12_kernel_only
@pytest.mark.parametrize("cap", sorted(WITHOUT))
def test_without_capability(root, scratch_dir, cap):
    who, failure = WITHOUT[cap]
    caps = [c for c in Unit.read(root / UNIT_PATH).capabilities() if c != cap]
    log = scratch_dir / f"service-without-{cap}.log"
    with Service(root, log, caps=caps) as svc:
        ready = svc.receive(120)
        if who == "daemon":
            assert ready is None and svc.stop() == 1, svc.log_text()
            assert failure in svc.log_text(), svc.log_text()
            return
        assert ready and ready.startswith("READY=1"), svc.log_text()
        r = flow_5_1(root, None if who == "root" else who, NODES[1])
        print(f"without {cap}: {r.stdout.strip().splitlines()[-2:]}\n{svc.log_text()[-2000:]}")
        # With the whole set the same client passes (the tests above).
        assert r.returncode == 1 and failure in r.stdout, r.stdout + r.stderr
        assert svc.stop() == 0, svc.log_text()


@debian_12_kernel_only
def test_without_limit_memlock_a_large_mapping_fails(root, scratch_dir):
    """The kernel charges what the daemon pins to the daemon's own
    RLIMIT_MEMLOCK (8 MiB by default); the unit lifts it, and the daemon
    charges each client's limit instead. Root's client (CAP_IPC_LOCK) maps
    10 MiB: refused with the default limit, accepted with the unit's."""
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from cuse_ioasid import ioasid as io, vfio\n"
        "dev = vfio.Device.open_node(%r); fd = io.IoasidFd()\n"
        "mem = vfio.DmaBuffer(10 << 20)\n"
        "io.bind_ioasid_fd(dev.fd, fd); gpa = fd.alloc(); io.attach_ioasid(dev.fd, gpa)\n"
        "try:\n"
        "    fd.map_dma(gpa, 0x1000000, mem.addr, 10 << 20); print('mapped')\n"
        "except OSError as e:\n"
        "    print('errno', e.errno)\n"
    ) % (str(REPO / "python"), NODES[1])
    outcome = {}
    for unlimited in (False, True):
        log = scratch_dir / f"service-memlock-{unlimited}.log"
        with Service(root, log, memlock_unlimited=unlimited) as svc:
            assert (svc.receive(120) or "").startswith("READY=1"), svc.log_text()
            r = run(["python3", "-c", script])
            outcome[unlimited] = r.stdout.strip()
            assert svc.stop() == 0, svc.log_text()
    assert outcome == {False: f"errno {errno.ENOMEM}", True: "mapped"}, outcome
