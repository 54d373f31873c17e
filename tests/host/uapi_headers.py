"""Kernel uAPI headers newer than the build machine's, for the host ABI
checks: Debian's `linux-libc-dev` from sid, downloaded with apt-get (the
private sid configuration scripts/vm already keeps under .cache/vm/) and
unpacked under .cache/uapi-headers/<version>/. Debian 12's own
linux-libc-dev (6.1) predates <linux/iommufd.h>.

The first download is kept: later runs reuse it, so the checks do not
change under the project's feet when sid moves; delete
.cache/uapi-headers/ to take sid's current one.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from harness.project_scripts import load

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "uapi-headers"


def linux_libc_dev() -> tuple[str, Path]:
    """(version, include directory) of the cached sid linux-libc-dev,
    downloading and unpacking it the first time."""
    ready = sorted(CACHE.glob("*/.ready"))
    if ready:
        root = ready[-1].parent
        return root.name, root / "usr" / "include"
    vm = load("vm")  # its Apt and the cache lock
    with vm.cache_lock("new"):  # the same lock scripts/vm holds over sid's lists
        apt = vm.Apt("sid")
        if not apt.has_lists():
            apt.update()
        debs = CACHE / "debs"
        deb = apt.download("linux-libc-dev", debs)
        m = re.match(r"linux-libc-dev_([^_]+)_", deb.name)
        version = m.group(1) if m else deb.stem
        root = CACHE / version
        tmp = CACHE / (version + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(root)
        (root / ".ready").touch()
    return version, root / "usr" / "include"
