"""The client side of a warm launch (see warm.py). Standard library only, so it costs almost nothing to load:
that is the point of it."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys

SOCKET = "/run/nsfw/warm.sock"
# launch.DEFAULT_FORWARD, spelled out: importing launch (ctypes, pwd) would cost the client what it saves
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGWINCH, signal.SIGCONT)


def usable(argv: list[str]) -> bool:
    """Only `run`, only as root, only when no standard fd is a terminal (see warm.py), and not when told not to."""
    return (argv[:1] == ["run"] and os.geteuid() == 0 and os.environ.get("NSFW_WARM", "1") != "0"
            and not any(os.isatty(fd) for fd in (0, 1, 2)) and os.path.exists(SOCKET))


def run(argv: list[str]) -> int | None:
    """COMMAND's exit status, or None when no warm server answered (then launch cold)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(SOCKET)
        request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        first = sock.recv(4096)
    except OSError:
        sock.close()
        return None
    if not first:
        return None
    supervisor = int(json.loads(first)["pid"])

    def relay(signum: int, _frame: object) -> None:
        try:
            os.kill(supervisor, signum)
        except ProcessLookupError:
            pass

    for s in RELAYED:
        signal.signal(s, relay)
    while True:
        try:
            msg = sock.recv(4096)
        except InterruptedError:
            continue
        if not msg:
            print("nsfw: the warm launcher died before the command's end", file=sys.stderr)
            return 125
        reply = json.loads(msg)
        if "exit" in reply:
            return int(reply["exit"])
