"""Debian packages fetched for the project's own use, never installed.

``Apt`` runs apt-get/apt-cache either with the machine's configuration or
with a private one for another suite (its own sources list, package lists
and download cache under ``.cache/vm/apt-SUITE``), so a package of sid or
bookworm-backports can be downloaded with ``apt-get download`` without
touching the machine's apt state. ``unpack`` extracts .deb files with
``dpkg-deb -x`` into a cache directory that is marked ready only once
complete.

Used by scripts/vm (the test VM's kernels), scripts/fetch-qemu (a newer
QEMU as a client) and scripts/vfio-selftests (the kernel's VFIO
selftests).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APT_CACHE = REPO / ".cache" / "vm"  # private suites' lists live in apt-SUITE below it


class AptError(Exception):
    """A download, unpack or apt query failed; the message says what to do."""


def log(prog: str, msg: str) -> None:
    print(f"{prog}: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError as e:
        raise AptError(f"{cmd[0]} not found; run scripts/setup") from e
    except subprocess.CalledProcessError as e:
        detail = ""
        if isinstance(e.stderr, (bytes, str)) and e.stderr:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
            detail = ": " + err.strip()[-2000:]
        raise AptError(f"`{shlex.join(cmd)}` failed with status {e.returncode}{detail}") from e


def capture(cmd: list[str]) -> str:
    return run(cmd, capture_output=True, text=True).stdout


class Apt:
    """apt-get/apt-cache with either the machine's configuration
    (``private_suite`` None) or a private one for ``private_suite``."""

    def __init__(self, private_suite: str | None, prog: str = "apt"):
        self.prog = prog
        self.opts = ["-o", "APT::Sandbox::User=root", "-o", "Acquire::Languages=none"]
        self.suite = private_suite
        if private_suite:
            base = APT_CACHE / f"apt-{private_suite}"
            for d in ("lists/partial", "cache/archives/partial", "sources.d"):
                (base / d).mkdir(parents=True, exist_ok=True)
            sources = base / "sources.list"
            keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
            signed = f"[signed-by={keyring}] " if os.path.exists(keyring) else ""
            sources.write_text(f"deb {signed}{debian_mirror()} {private_suite} main\n")
            self.opts += [
                "-o", f"Dir::Etc::SourceList={sources}",
                "-o", f"Dir::Etc::SourceParts={base / 'sources.d'}",
                "-o", f"Dir::State::Lists={base / 'lists'}",
                "-o", f"Dir::Cache={base / 'cache'}",
            ]
            self.lists = base / "lists"

    def update(self) -> None:
        log(self.prog, f"fetching the package lists of Debian {self.suite}")
        run(["apt-get", *self.opts, "-q", "update"], capture_output=True)

    def has_lists(self) -> bool:
        return any(self.lists.glob("*_Packages*"))

    def ensure_lists(self) -> None:
        if self.suite and not self.has_lists():
            self.update()

    def depends(self, pkg: str) -> list[str]:
        out = capture(["apt-cache", *self.opts, "depends", "--no-recommends",
                       "--no-suggests", "--no-conflicts", "--no-breaks",
                       "--no-replaces", "--no-enhances", pkg])
        return re.findall(r"^\s*\|?(?:Pre)?Depends:\s*(\S+)", out, re.M)

    def versions(self, pkg: str) -> list[str]:
        """Versions of ``pkg`` the lists offer; [] if none."""
        try:
            out = capture(["apt-cache", *self.opts, "madison", pkg])
        except AptError:
            return []
        found = []
        for line in out.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) >= 3 and fields[0] == pkg:
                found.append(fields[1])
        return found

    def download(self, pkg: str, dest: Path, version: str | None = None) -> Path:
        """``pkg`` (at ``version`` if given) as a .deb in ``dest``; a .deb
        already there is reused. With a version, keep one version per
        ``dest``."""
        return self.download_all([(pkg, version)], dest)[0]

    def download_all(self, wanted: list[tuple[str, str | None]], dest: Path) -> list[Path]:
        """Each (package, version or None) of ``wanted`` as ``download``
        gives it, in order. The packages not in ``dest`` yet are fetched by
        one ``apt-get download``: a call per package costs apt's start-up
        each time (18.6 s against 1.7 s for 12 of sid's packages)."""
        dest.mkdir(parents=True, exist_ok=True)
        specs = [f"{p}={v}" if v else p for p, v in wanted if not _debs_of(dest, p)]
        if specs:
            for spec in specs:
                log(self.prog, f"downloading {spec}")
            run(["apt-get", *self.opts, "-q", "download", *specs], cwd=dest, capture_output=True)
        debs = []
        for p, v in wanted:
            found = _debs_of(dest, p)
            if not found:
                spec = f"{p}={v}" if v else p
                raise AptError(f"apt-get download {spec} left no .deb")
            debs.append(found[0])
        return debs


def _debs_of(dest: Path, pkg: str) -> list[Path]:
    return list(dest.glob(f"{glob.escape(pkg)}_*.deb"))


def debian_mirror() -> str:
    """The Debian archive URI the machine's apt configuration uses."""
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
             *sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    for f in files:
        try:
            text = Path(f).read_text()
        except OSError:
            continue
        if f.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([\w-]+):\s*(.*)$", stanza, re.M))
                if "deb" not in fields.get("Types", "").split():
                    continue
                suites = fields.get("Suites", "").split()
                if fields.get("Enabled", "yes") == "no":
                    continue
                for uri in fields.get("URIs", "").split():
                    if any(s and "security" not in s for s in suites) and "security" not in uri:
                        return uri.rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and "security" not in m.group(1) and "security" not in m.group(2):
                    return m.group(1).rstrip("/")
    raise AptError("no Debian mirror found in /etc/apt/sources.list*")


def unpack(debs: list[Path], dest: Path, members: list[str] | None = None) -> Path:
    """Extract ``debs`` into ``dest`` (``dpkg-deb -x``) unless ``dest/.ready``
    says it was done; a half-done extraction is started over. ``members``
    limits the extraction to those paths of the data archives (tar
    patterns, e.g. ``./usr/include``)."""
    if (dest / ".ready").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.mkdir(parents=True)
    for deb in debs:
        if members is None:
            run(["dpkg-deb", "-x", str(deb), str(tmp)])
        else:
            fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                    stdout=subprocess.PIPE)
            tar = subprocess.run(["tar", "-x", "-C", str(tmp), "--wildcards", *members],
                                 stdin=fsys.stdout, capture_output=True)
            assert fsys.stdout
            fsys.stdout.close()
            if fsys.wait() != 0 or tar.returncode != 0:
                raise AptError(f"unpacking {deb.name} failed: {tar.stderr.decode()[-500:]}")
    tmp.rename(dest)
    (dest / ".ready").touch()
    return dest


@contextlib.contextmanager
def lock(path: Path, prog: str):
    """Hold an exclusive lock on ``path`` (serialises concurrent fetches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(prog, f"waiting for another run holding {path.name}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
