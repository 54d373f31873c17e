"""A systemd unit file read the way systemd reads the parts the scenarios
need, so that a test can start the unit's ExecStart line with its
environment, capabilities and limits as systemd would, without systemd.

Covered: sections, comments, continuation lines, repeated keys,
EnvironmentFile= (with the '-' prefix) and Environment=, `$VAR` (split at
white space) and `${VAR}` (one word) in ExecStart=, CapabilityBoundingSet=
(names, no '~' inversion), NoNewPrivileges=, LimitMEMLOCK=infinity."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

# linux/capability.h
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]


def cap_mask(names) -> int:
    """The bit mask /proc/PID/status shows for these capabilities."""
    return sum(1 << CAPABILITIES.index(n) for n in names)


class Unit:
    def __init__(self, text: str):
        self.sections: dict[str, list[tuple[str, str]]] = {}
        section = None
        pending = ""
        for raw in text.splitlines():
            line = pending + raw.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                self.sections.setdefault(section, [])
                continue
            if section is None or "=" not in line:
                raise ValueError(f"not a unit file line: {raw!r}")
            key, _, value = line.partition("=")
            self.sections[section].append((key.strip(), value.strip()))

    @classmethod
    def read(cls, path: Path) -> Unit:
        return cls(path.read_text())

    def values(self, key: str, section: str = "Service") -> list[str]:
        """Every value of `key`; an empty assignment resets the list, as in
        systemd."""
        out: list[str] = []
        for k, v in self.sections.get(section, []):
            if k == key:
                out = [] if v == "" else out + [v]
        return out

    def value(self, key: str, section: str = "Service") -> str | None:
        vals = self.values(key, section)
        return vals[-1] if vals else None

    def environment(self, root: Path) -> dict[str, str]:
        """Environment= and EnvironmentFile= (files read under `root`)."""
        env: dict[str, str] = {}
        for item in self.values("EnvironmentFile"):
            optional = item.startswith("-")
            path = root / item.lstrip("-").lstrip("/")
            if not path.exists():
                if optional:
                    continue
                raise FileNotFoundError(path)
            env.update(read_environment_file(path.read_text()))
        for item in self.values("Environment"):
            for word in shlex.split(item):
                k, _, v = word.partition("=")
                env[k] = v
        return env

    def exec_start(self, env: dict[str, str]) -> list[str]:
        line = self.value("ExecStart")
        if line is None:
            raise ValueError("no ExecStart=")
        line = line.lstrip("@-:+!")
        argv: list[str] = []
        for word in shlex.split(line):
            whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
            if whole:
                argv += env.get(whole.group(1), "").split()
            else:
                argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                   lambda m: env.get(m.group(1), ""), word))
        return argv

    def capabilities(self) -> list[str]:
        caps: list[str] = []
        for item in self.values("CapabilityBoundingSet"):
            if item.startswith("~"):
                raise ValueError("inverted CapabilityBoundingSet= is not handled")
            caps += item.split()
        for c in caps:
            if c not in CAPABILITIES:
                raise ValueError(f"unknown capability {c}")
        return caps

    def no_new_privileges(self) -> bool:
        return (self.value("NoNewPrivileges") or "no").lower() in ("yes", "true", "1", "on")

    def memlock_unlimited(self) -> bool:
        return self.value("LimitMEMLOCK") == "infinity"


def read_environment_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines, comments, shell-style quotes (systemd.exec(5))."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        words = shlex.split(value) if value else [""]
        env[key.strip()] = " ".join(words)
    return env


def setpriv_argv(caps, no_new_privs: bool) -> list[str]:
    """setpriv options that leave a root process exactly `caps` (bounding,
    hence permitted and effective after exec), as systemd does for a root
    service with CapabilityBoundingSet=."""
    bounding = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])
    argv = ["setpriv", "--bounding-set", bounding, "--inh-caps", "-all"]
    if no_new_privs:
        argv.append("--no-new-privs")
    return argv
