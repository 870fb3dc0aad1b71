"""The probe: one connection, datagram, DNS query or name lookup, its outcome as a word and an exit code.

It runs unprivileged, inside sandboxes, from World's world-readable copy of world.py and this package.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import struct
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .dnswire import (
    _NOERROR,
    _NXDOMAIN,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_CNAME,
    RCODES,
    _read_name,
    encode_name,
    type_code,
    type_name,
)
from .layout import (
    BLOCKED,
    DNS_PORT,
    OTHER,
    PROBE_KINDS,
    PROBE_TIMEOUT_ENV,
    REACHED,
    REFUSED,
    RESOLV_CONF,
    TIMEOUT,
    USAGE,
)

_BLOCKED_ERRNOS = {errno.EPERM, errno.EACCES, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}


class _Usage(Exception):
    pass


def _probe_timeout(env: Mapping[str, str] | None = None) -> float:
    try:
        return float((os.environ if env is None else env).get(PROBE_TIMEOUT_ENV) or 2)
    except ValueError:
        return 2.0


def _with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """Run a call that has no timeout of its own (getaddrinfo); TimeoutError if it takes longer."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _connect_banner(family: int, sockaddr: tuple[Any, ...], timeout: float) -> str:
    s = socket.socket(family, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        s.connect(sockaddr)
        buf = b""
        try:
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            pass  # connected is reached; a server without a banner (DNS over TCP) just says nothing
        return ("open " + buf.decode(errors="replace").strip()).strip()


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _default_server() -> str:
    with open(RESOLV_CONF) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    raise _Usage("no nameserver in /etc/resolv.conf; name a server")


def dns_query(name: str, qtype: int, server: str, *, tcp: bool = False, timeout: float = 2.0
              ) -> tuple[int, list[tuple[str, int, str, str]]]:
    """One query: rcode and answer RRs as (name, ttl, TYPE, data). Raises OSError/TimeoutError."""
    qid = secrets.randbits(16)
    query = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)
    with socket.socket(_family(server), socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((server, DNS_PORT))
        if tcp:
            s.sendall(struct.pack("!H", len(query)) + query)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionResetError(errno.ECONNRESET, "connection closed mid-answer")
                buf += chunk
            reply = buf[2:2 + struct.unpack("!H", buf[:2])[0]]
        else:
            s.send(query)
            while True:
                reply = s.recv(65536)
                if len(reply) >= 12 and struct.unpack("!H", reply[:2])[0] == qid:
                    break  # anything else is not the answer to this question
    return _parse_reply(reply)


def _parse_reply(msg: bytes) -> tuple[int, list[tuple[str, int, str, str]]]:
    _qid, flags, qd, an = struct.unpack("!4H", msg[:8])
    pos = 12
    for _ in range(qd):
        _n, pos = _read_name(msg, pos)
        pos += 4
    out = []
    for _ in range(an):
        owner, pos = _read_name(msg, pos)
        rtype, _cls, ttl, rdlen = struct.unpack("!HHIH", msg[pos:pos + 10])
        pos += 10
        rdata = msg[pos:pos + rdlen]
        if rtype == QTYPE_A:
            text = socket.inet_ntop(socket.AF_INET, rdata)
        elif rtype == QTYPE_AAAA:
            text = socket.inet_ntop(socket.AF_INET6, rdata)
        elif rtype == QTYPE_CNAME:
            text = _read_name(msg, pos)[0]
        else:
            text = rdata.hex()
        out.append((owner, ttl, type_name(rtype), text))
        pos += rdlen
    return flags & 0xF, out


def _probe(kind: str, args: Sequence[str]) -> tuple[int, str]:
    timeout = _probe_timeout()
    if kind in ("tcp", "udp"):
        if len(args) != 2 or not args[1].isdigit():
            raise _Usage(f"probe {kind} ADDR PORT")
        addr, port = args[0], int(args[1])
        if kind == "tcp":
            return REACHED, _connect_banner(_family(addr), (addr, port), timeout)
        with socket.socket(_family(addr), socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((addr, port))
            s.send(b"ping\n")
            return REACHED, "open " + s.recv(4096).decode(errors="replace").strip()
    if kind == "tcpname":
        if len(args) != 2 or not args[1].isdigit():
            raise _Usage("probe tcpname NAME PORT")
        infos = _with_timeout(lambda: socket.getaddrinfo(args[0], int(args[1]), socket.AF_INET,
                                                         socket.SOCK_STREAM), timeout)
        return REACHED, _connect_banner(socket.AF_INET, infos[0][4], timeout)
    if kind == "resolve":
        if len(args) != 1:
            raise _Usage("probe resolve NAME")
        infos = _with_timeout(lambda: socket.getaddrinfo(args[0], None, proto=socket.IPPROTO_TCP), timeout)
        return REACHED, " ".join(sorted({i[4][0] for i in infos}))
    if kind == "dns":
        if len(args) not in (1, 2):
            raise _Usage("probe dns NAME [SERVER]")
        server = args[1] if len(args) > 1 else _default_server()
        found: list[str] = []
        for qtype in (QTYPE_A, QTYPE_AAAA):
            rcode, answers = dns_query(args[0], qtype, server, timeout=timeout)
            if rcode == _NXDOMAIN:
                return REFUSED, "nxdomain"
            if rcode != _NOERROR:
                return OTHER, f"error {RCODES.get(rcode, rcode)}"
            found += [data for _o, _t, rtype, data in answers if rtype in ("A", "AAAA")]
        return REACHED, " ".join(found) or "empty"
    if kind == "query":
        rest = list(args)
        tcp = bool(rest) and rest[-1] == "tcp"
        if tcp:
            rest.pop()
        if len(rest) not in (2, 3):
            raise _Usage("probe query NAME TYPE [SERVER] [tcp]")
        try:
            qtype = type_code(rest[1])
        except ValueError as e:
            raise _Usage(str(e)) from None
        server = rest[2] if len(rest) > 2 else _default_server()
        rcode, answers = dns_query(rest[0], qtype, server, tcp=tcp, timeout=timeout)
        lines = [f"rcode {RCODES.get(rcode, rcode)}"] + [f"{o} {t} {ty} {d}" for o, t, ty, d in answers]
        code = REACHED if rcode == _NOERROR else REFUSED if rcode == _NXDOMAIN else OTHER
        return code, "\n".join(lines)
    raise _Usage(f"unknown probe {kind!r} (one of {', '.join(PROBE_KINDS)})")


def probe_main(argv: Sequence[str]) -> int:
    """`world.py probe KIND ARGS`: prints one outcome, exits with its code. Works unprivileged."""
    kind, args = (argv[0], argv[1:]) if argv else ("", [])
    try:
        code, text = _probe(kind, args)
    except _Usage as e:
        print(f"usage: world.py {e}", file=sys.stderr)
        return USAGE
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            code, text = REFUSED, "nxdomain"
        elif e.errno == socket.EAI_AGAIN:  # the libc resolver got no answer
            code, text = TIMEOUT, "timeout"
        else:
            code, text = OTHER, f"error {e}"
    except (ConnectionRefusedError, ConnectionResetError) as e:
        code, text = REFUSED, "refused" if isinstance(e, ConnectionRefusedError) else "reset"
    except TimeoutError:
        code, text = TIMEOUT, "timeout"
    except OSError as e:
        if e.errno in _BLOCKED_ERRNOS:
            code, text = BLOCKED, f"blocked {errno.errorcode.get(e.errno or 0, e.errno)}"
        else:
            code, text = OTHER, f"error {e}"
    except Exception as e:  # a probe reports, it does not crash
        code, text = OTHER, f"error {type(e).__name__}: {e}"
    print(text, flush=True)
    return code
