"""Thin ctypes wrappers for the Linux calls Python 3.11's os module lacks.

prctl, capget/capset, setns, unshare and mount: the launcher needs them in the child it forks, and adding
a compiled dependency (python-prctl, libcap bindings) for a dozen lines of ctypes is not worth it.
Every wrapper raises OSError with the real errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <sched.h>, <sys/mount.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

# <linux/capability.h>: version 3 uses two 32-bit words per set, enough for caps 0..63.
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_WORDS = 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
# Looked up now: ctypes finds a function on its first use and keeps it on _libc, and a process forked from one
# that already did (the warm daemon's launchers) then does not pay for it on a launch's path.
for _name in ("prctl", "setns", "unshare", "mount", "capget", "capset"):
    getattr(_libc, _name)


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _call(what: str, func: Any, *args: Any) -> int:
    result: int = func(*args)
    return _check(result, what)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _call(f"prctl({option})", _libc.prctl, ctypes.c_int(option), *args)


def setns(fd: int, nstype: int) -> None:
    _call("setns", _libc.setns, ctypes.c_int(fd), ctypes.c_int(nstype))


def unshare(flags: int) -> None:
    _call("unshare", _libc.unshare, ctypes.c_int(flags))


MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    enc = [None if x is None else x.encode() for x in (source, target, fstype, data)]
    _call(f"mount {target}", _libc.mount, enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3])


def make_mounts_private() -> None:
    """Stop mounts made in this mount namespace from propagating back to the host's, and vice versa."""
    _call("mount / private", _libc.mount, None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None)


def capget() -> tuple[int, int, int]:
    """This process's (effective, permitted, inheritable) capability sets as bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * _CAP_WORDS)()
    _call("capget", _libc.capget, ctypes.byref(header), data)
    return (
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def capset_empty() -> None:
    """Clear the effective, permitted and inheritable sets of this process."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * _CAP_WORDS)()  # zero-initialised
    _call("capset", _libc.capset, ctypes.byref(header), data)


def cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        return int(f.read())
