"""Capabilities of the calling process, for scenarios that need a client
without one (root's CAP_IPC_LOCK lifts RLIMIT_MEMLOCK, for example)."""

from __future__ import annotations

import ctypes

CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24

_libc = ctypes.CDLL(None, use_errno=True)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_effective(cap: int) -> None:
    """Take capability `cap` (below 32) out of this process's effective set;
    it stays permitted. Call it in a child: the test process keeps its
    capabilities."""
    hdr, data = _Header(_LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~(1 << cap)
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
