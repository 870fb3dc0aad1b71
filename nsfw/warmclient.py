"""The client side of a warm launch (see warm.py): what `nsfw run` is when `nsfw daemon` runs.

It is the whole of a warm launch's own start-up, so it imports nothing that is not built into the interpreter:
`socket` costs 8 ms (enum) and `json` 5 ms (re), more than the rest of the client. The request goes over as
NUL-separated bytes (no argument or environment entry can hold a NUL) and the replies are ASCII words.
"""

import _signal  # type: ignore[import-not-found]  # signal itself loads enum: 8 ms
import _socket
import posix
import sys

from nsfw.relay import RELAYED  # built-in modules only, as this one

SOCKET = "/run/nsfw/warm.sock"
VERSION = b"nsfw-warm-2"


def usable(argv: list[str]) -> bool:
    """Only `run`, only as root, only when no standard fd is a terminal (see warm.py), and not when told not to."""
    if argv[:1] != ["run"] or posix.geteuid() != 0 or posix.environ.get(b"NSFW_WARM", b"1") == b"0":
        return False
    if any(posix.isatty(fd) for fd in (0, 1, 2)):
        return False
    try:
        posix.stat(SOCKET)
    except OSError:
        return False
    return True


def encode(argv: list[str], cwd: bytes, umask: int, environ: dict[bytes, bytes]) -> bytes:
    """The request: version, cwd, umask, argc, argv..., then NAME=VALUE entries, NUL-separated."""
    fields = [VERSION, cwd, b"%o" % umask, str(len(argv)).encode()]
    fields += [a.encode("utf-8", "surrogateescape") for a in argv]
    fields += [k + b"=" + v for k, v in environ.items()]
    return b"\0".join(fields)


def decode(data: bytes) -> tuple[list[str], str, int, dict[str, str]]:
    """The daemon's side of encode(): (argv, cwd, umask, environment). Raises ValueError on anything else."""
    fields = data.split(b"\0")
    if len(fields) < 4 or fields[0] != VERSION or not fields[3].isdigit():
        raise ValueError("not a launch request of this version of nsfw")
    umask = int(fields[2], 8) & 0o777
    argc = int(fields[3])
    fields = fields[:2] + fields[3:]  # as before the umask: argc at 2
    if len(fields) < 3 + argc:
        raise ValueError("a launch request cut short")

    def text(b: bytes) -> str:
        return b.decode("utf-8", "surrogateescape")

    argv = [text(a) for a in fields[3:3 + argc]]
    env = {}
    for entry in fields[3 + argc:]:
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env[text(name)] = text(value)
    return argv, text(fields[1]), umask, env


def run(argv: list[str]) -> int | None:
    """COMMAND's exit status, or None when no warm server answered (then launch cold)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        sock.connect(SOCKET)
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        umask = posix.umask(0o022)
        posix.umask(umask)
        sock.sendmsg([encode(argv, posix.getcwdb(), umask, posix.environ)],
                     [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        first = sock.recv(64)
    except OSError:
        sock.close()
        return None
    if not first.startswith(b"pid "):
        return None  # refused, or a daemon that died first: nothing ran yet, so a cold launch is safe
    supervisor = int(first[4:])

    def relay(signum: int, _frame: object) -> None:
        try:
            posix.kill(supervisor, signum)
        except ProcessLookupError:
            pass

    for s in RELAYED:
        _signal.signal(s, relay)
    while True:
        try:
            msg = sock.recv(64)
        except InterruptedError:
            continue
        if not msg:
            sys.stderr.write("nsfw: the warm launcher died before the command's end\n")
            return 125
        if msg.startswith(b"exit "):
            return int(msg[5:])
