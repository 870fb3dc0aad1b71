"""Warm launches: `nsfw daemon` keeps the supervisor's code loaded, so a launch does not pay for imports.

A cold `nsfw run` spends most of its time importing (pyroute2 alone loads 63 plugins), not building the
sandbox. The daemon imports everything once; for each launch it forks a child that runs exactly the code of a
cold `nsfw run` (the same setup, rules, keeper and clean-up), with the caller's arguments, environment,
working directory and standard fds (passed over the socket), and sends back COMMAND's exit status.

What stays with the client (nsfw/warmclient.py, standard library only): relaying signals to that child, and
dying visibly: if the client is killed, the child kills itself, and the sandbox's keeper then kills COMMAND's
whole tree, exactly as when a cold supervisor is killed. Launches with a terminal on fd 0, 1 or 2 stay cold:
a process forked by a daemon cannot have the caller's controlling terminal, which interactive programs need.
"""

from __future__ import annotations

import array
import gc
import os
import signal
import socket
import struct
import threading
import time
from typing import NoReturn

from . import warmclient

SOCKET = "/run/nsfw/warm.sock"
MAX_REQUEST = 1 << 20


def _warm_up() -> None:
    """Everything a launch would import, now."""
    from . import cli, keeper, reconcile, sandbox  # noqa: F401
    from .doctor import launch_blockers  # noqa: F401 - the package loads a name's module when it is asked for
    from .resolver import server  # noqa: F401


def serve(path: str = SOCKET) -> NoReturn:
    """`nsfw daemon`: accept launches until killed. Only root may connect."""
    _warm_up()
    # Everything loaded so far lives as long as the daemon: out of the collector's sight, its pages stay
    # shared with every forked launch instead of being copied when the collector walks them.
    gc.collect()
    gc.freeze()
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # launch children are reaped by the kernel
    while True:
        conn, _ = listener.accept()
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != 0:
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            _launch(conn)
        conn.close()


def _launch(conn: socket.socket) -> NoReturn:
    """In the forked child: become the `nsfw run` the client would have been."""
    code = 125
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the supervisor waits for its own children
        data, ancdata, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(3 * 4))
        fds = array.array("i")
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        argv, cwd, env = warmclient.decode(data)
        if len(fds) != 3:
            raise ValueError("a launch brings its three standard fds")
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        conn.send(b"pid %d" % os.getpid())
        from . import sandbox

        sandbox._T0 = time.monotonic()  # a warm launch starts now, not when the daemon did
        threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
        code = _run_cli(argv)
    except BaseException:
        code = 125
    finally:
        try:
            conn.send(b"exit %d" % code)
        except OSError:
            pass
        os._exit(0)


def _die_with_client(conn: socket.socket) -> None:
    """The client is this launch's face: when it dies, this supervisor dies too (and its keeper acts)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        while conn.recv(64):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _run_cli(argv: list[str]) -> int:
    import sys

    from .cli import cli

    sys.stdout = os.fdopen(1, "w", closefd=False, buffering=1)
    sys.stderr = os.fdopen(2, "w", closefd=False, buffering=1)
    try:
        cli.main(args=argv, prog_name="nsfw")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0
