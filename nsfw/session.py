"""The user's graphical session, seen from `nsfw run`: the environment COMMAND gets, whether its display can be
reached from inside the sandbox, and whether an unsandboxed copy of the app would take the launch over.

The environment. sudo resets the environment (env_reset) and must not be told to keep arbitrary variables: what
passes through sudo also reaches root's process (LD_PRELOAD, PYTHON*...). So the desktop launcher writes the
session's environment to a private file (a FIFO in $XDG_RUNTIME_DIR) and names it with --environment; nsfw
reads it with the invoking user's permissions and gives it to COMMAND only, which runs as that user anyway, so
nothing in it grants anything. nsfw's own behaviour never depends on it.

The display. A network namespace has its own abstract unix sockets, so an X server reachable only through
@/tmp/.X11-unix/XN cannot be reached from the sandbox, while its socket file /tmp/.X11-unix/XN can (a path
is found through the filesystem, which the sandbox shares). Wayland and the session bus normally are socket
files in $XDG_RUNTIME_DIR, which cross as well.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import NsfwError

X11_DIR = "/tmp/.X11-unix"
ENV_ENTRY_MAX = 1 << 17  # one NAME=VALUE; ARG_MAX-ish limits make larger ones useless to exec anyway

# Programs that run other programs: their name says nothing about which application a process is.
_GENERIC = re.compile(r"^(sh|bash|dash|zsh|fish|ksh|env|sudo|nsfw|nsfw-launch|flatpak|snap|bwrap|gjs|node|nodejs|"
                      r"java|mono|perl|ruby|wine|wine64|python(\d+(\.\d+)?)?|xdg-open|gio|exec)$")
_DISPLAY = re.compile(r"^(?:(?P<proto>[a-z0-9]+)/)?(?P<host>\[[^\]]*\]|[^:]*):(?P<num>\d+)(?:\.\d+)?$")
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]", "ip6-localhost")


class SessionError(NsfwError):
    """COMMAND would not work in the sandbox for a reason of the session, not of the profile; nothing started."""


# ---------------------------------------------------------------------------------------------- environment


def parse_environment(data: bytes, source: str) -> dict[str, str]:
    """NUL-separated NAME=VALUE entries, as in /proc/PID/environ. Bytes that are not UTF-8 survive the round
    trip to exec (surrogateescape), as they would from a shell."""
    env: dict[str, str] = {}
    for number, item in enumerate(data.split(b"\0"), 1):
        if not item:
            continue
        name, sep, value = item.partition(b"=")
        if not sep or not name or len(item) > ENV_ENTRY_MAX:
            raise SessionError(f"--environment {source}: entry {number} is not NAME=VALUE (the file holds "
                               "NUL-separated NAME=VALUE entries, like /proc/PID/environ)")
        env[name.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
    return env


def encode_environment(environ: Mapping[str, str]) -> bytes:
    return b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0" for k, v in environ.items()
                    if k and "=" not in k and "\0" not in k + v)


def read_environment(path: str, read: Callable[[Path], bytes]) -> dict[str, str]:
    """The environment file, read through `read` (launch.read_as_user: the invoking user's permissions)."""
    try:
        data = read(Path(path))
    except OSError as e:
        raise SessionError(f"--environment {path}: cannot be read by you: {e.strerror or e}") from None
    return parse_environment(data, path)


# ---------------------------------------------------------------------------------------------- display


@dataclass(frozen=True)
class Display:
    kind: str  # "local" (:N, its socket in /tmp/.X11-unix), "socket" (a path), "loopback" (TCP to this host), "remote"
    number: int | None
    path: str | None = None


def parse_display(value: str) -> Display | None:
    """What DISPLAY names, as libxcb reads it; None when it is empty or not understood."""
    value = value.strip()
    if value.startswith("/"):  # a socket path, optionally with :N (libxcb >= 1.13)
        path, _, num = value.rpartition(":") if re.search(r":\d+(\.\d+)?$", value) else (value, "", "")
        return Display("socket", int(num.split(".")[0]) if num else None, path)
    m = _DISPLAY.match(value)
    if not m:
        return None
    proto, host, number = m.group("proto"), m.group("host"), int(m.group("num"))
    if (not host or host == "unix" or proto in ("unix", "local")) and proto not in ("tcp", "inet", "inet6"):
        return Display("local", number, f"{X11_DIR}/X{number}")
    if host.lower() in _LOOPBACK_HOSTS:
        return Display("loopback", number)
    return Display("remote", number)


def _can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def abstract_sockets(proc_net_unix: str = "/proc/net/unix") -> set[str]:
    """Names of the abstract unix sockets of this network namespace, without the leading '@'."""
    names = set()
    with contextlib.suppress(OSError), open(proc_net_unix, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("@"):
                names.add(fields[7][1:])
    return names


def display_problem(environ: Mapping[str, str], *, connect: Callable[[str], bool] = _can_connect,
                    abstract: Callable[[], set[str]] = abstract_sockets) -> tuple[str | None, list[str]]:
    """(why COMMAND must not start, warnings) for the session's display and bus, as seen from a sandbox."""
    warnings: list[str] = []
    raw = environ.get("DISPLAY", "")
    d = parse_display(raw) if raw else None
    refusal = None
    if d is not None and d.kind in ("local", "socket") and d.path and not connect(d.path):
        if d.kind == "local" and d.path in abstract():
            refusal = (
                f"the X display DISPLAY={raw} is reachable only through the abstract socket @{d.path}, and abstract "
                "sockets do not cross into the sandbox's network namespace, so the application could not open a "
                f"window: have the X server listen on its socket file {d.path} too (drop `-nolisten unix` from "
                "its command line, or `-listen unix` for Xwayland), or, for a program that needs no display, "
                "start it with DISPLAY unset (`env -u DISPLAY sudo nsfw run ...`)")
        else:
            warnings.append(f"DISPLAY={raw}: no X server answers at {d.path}, so the application cannot open "
                            "X11 windows")
    elif d is not None and d.kind == "loopback":
        warnings.append(f"DISPLAY={raw} is a TCP display on this host's loopback (SSH X11 forwarding?), and the "
                        "sandbox has a loopback of its own: X11 applications will not reach it")
    bus = environ.get("DBUS_SESSION_BUS_ADDRESS", "")
    if "unix:abstract=" in bus and "unix:path=" not in bus:
        warnings.append("the session bus (DBUS_SESSION_BUS_ADDRESS) is an abstract socket, which the sandbox "
                        "cannot reach: the application runs without it (no notifications, portals, ...)")
    return refusal, warnings


# ---------------------------------------------------------------------------------------------- single instance


def _status_uids(pid: str, proc: str) -> tuple[int, int] | None:
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"{proc}/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                real, effective = line.split()[1:3]
                return int(real), int(effective)
    return None


def _cmdline(pid: str, proc: str) -> list[str]:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            return [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _program_name(cmdline: Sequence[str]) -> str:
    """The application a command line runs: its program, or the script an interpreter was given."""
    if not cmdline:
        return ""
    name = os.path.basename(cmdline[0])
    if _GENERIC.match(name):
        script = next((a for a in cmdline[1:] if not a.startswith("-")), "")
        return os.path.basename(script)
    return name


def same_app_outside(argv: Sequence[str], environ: Mapping[str, str], uid: int, *,
                     proc: str = "/proc") -> list[tuple[int, str]]:
    """(pid, name) of the user's processes running the same program as argv outside any sandbox: in this
    process's network namespace, which is the host's (nsfw has not entered the sandbox yet)."""
    name = _program_name(argv)
    if not name:
        return []
    found = shutil.which(argv[0], path=environ.get("PATH", os.defpath)) if argv else None
    target = os.path.realpath(found) if found and not _GENERIC.match(os.path.basename(found)) else None
    try:
        here = os.readlink(f"{proc}/self/ns/net")
    except OSError:
        return []
    me = {str(os.getpid()), str(os.getppid())}
    hits = []
    for pid in os.listdir(proc):
        if not pid.isdigit() or pid in me or _status_uids(pid, proc) != (uid, uid):
            continue
        try:
            if os.readlink(f"{proc}/{pid}/ns/net") != here:
                continue  # in a sandbox (or some other namespace): not the unsandboxed copy
            exe = os.readlink(f"{proc}/{pid}/exe")
        except OSError:
            continue  # gone, or a kernel thread
        cmdline = _cmdline(pid, proc)
        if (target is not None and exe == target) or _program_name(cmdline) == name:
            hits.append((int(pid), name))
    return sorted(hits)


def single_instance_warning(hits: Sequence[tuple[int, str]]) -> str | None:
    if not hits:
        return None
    pids = ", ".join(str(p) for p, _ in hits[:5])
    name = hits[0][1]
    return (f"{name} already runs outside nsfw as you (pid {pids}). A single-instance application hands a new "
            "launch to the copy that is running, and that copy is not sandboxed: the window you are opening would "
            f"have no firewall. Quit {name} first and start it only through nsfw from then on (`nsfw desktop wrap` "
            "makes its menu entry do that), or give it its option for a separate instance (firefox: --new-instance "
            "with its own -P profile)")


# ---------------------------------------------------------------------------------------------- together


def check(argv: Sequence[str], environ: Mapping[str, str], uid: int) -> list[str]:
    """Before the sandbox is built: raise SessionError when COMMAND could not work in it, else the warnings."""
    refusal, warnings = display_problem(environ)
    if refusal is not None:
        raise SessionError(refusal)
    # Handing a launch over to a running copy is what graphical applications do (over the session bus or the
    # display); without a display, a second `git` or `curl` outside nsfw is just another process.
    if environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"):
        warning = single_instance_warning(same_app_outside(argv, environ, uid))
        warnings += [warning] if warning else []
    return warnings
