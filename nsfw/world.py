#!/usr/bin/python3
"""A simulated host whose only uplink is a simulated internet, for nsfw's integration tests and `nsfw demo`.

Nothing built here touches the machine's own network: the "host" is a fresh network + mount namespace,
its default routes go over a veth into an "inet" namespace that owns documentation address ranges and
runs small servers, and a "lan" namespace stands for the home network. Everything dies with the world
process, and the world process dies with whoever started it.

Standalone on purpose (stdlib only, no import from the rest of nsfw): the same file is the world's
builder, its server processes, and a probe that an unprivileged user runs inside a sandbox.

usage:
  world.py [--] CMD [ARGS...]            (root) run CMD on the simulated host; exits with CMD's status
  world.py probe tcp ADDR PORT           connect; 'open <banner>' | 'refused' | 'timeout' | 'blocked <errno>'
  world.py probe udp ADDR PORT           send one datagram, wait for the answer
  world.py probe dns NAME [SERVER]       ask SERVER (default: first resolv.conf nameserver) for A and AAAA
  world.py probe query NAME TYPE [SERVER] [tcp]
                                         one raw query; prints 'rcode RCODE' then 'NAME TTL TYPE DATA' lines
  world.py probe resolve NAME            libc resolver (getaddrinfo), as an application would
  world.py probe tcpname NAME PORT       resolve NAME (IPv4) with the libc resolver, then connect
  world.py info                          print the world's map (JSON)
  ("probe" may be left out: `world.py tcp 192.0.2.10 80` is the same probe.)

probe exit codes: 0 reached, 1 refused / reset / nxdomain, 2 timeout, 3 blocked locally (EPERM, EACCES,
unreachable), 4 anything else, 64 bad usage. NSFW_PROBE_TIMEOUT sets the timeout in seconds (default 2).

The map:
  host  (the world process) lo; uplink0 198.18.0.2/24 2001:db8:ff::2/64 with the default routes;
        lan0 10.77.0.1/24 fd77::1/64; private tmpfs /run; /etc/resolv.conf says nameserver 192.0.2.53;
        servers on every address: TCP 631 8631, UDP 9999; ip_forward 0
  inet  eth0 198.18.0.1/24 2001:db8:ff::1/64; on lo 192.0.2.10 .11 .12 .53 198.51.100.20 203.0.113.30
        203.0.113.53 2001:db8::10 ::20 ::53; TCP 22 53 80 443 853 8080, UDP 53 123 443 9999; DNS on 53;
        no route back beyond its link, so the host must NAT whatever it forwards
  lan   eth0 10.77.0.10/24 fd77::10/64, same servers; only its own link routed
Every DNS query that reaches a world server is appended to /run/world/dns.log (in the world's /run)
as "NAME QTYPE": the name in lower case without the final dot, the type as a mnemonic ("allowed.test AAAA",
"x.test TYPE99").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

# ------------------------------------------------------------------------------------------------ the map

HOST, INET, LAN = "host", "inet", "lan"
UPLINK, LANLINK = "uplink0", "lan0"
HOST_UPLINK4, HOST_UPLINK6 = "198.18.0.2", "2001:db8:ff::2"
GATEWAY4, GATEWAY6 = "198.18.0.1", "2001:db8:ff::1"
HOST_LAN4, HOST_LAN6 = "10.77.0.1", "fd77::1"
LAN4, LAN6 = "10.77.0.10", "fd77::10"
RESOLVER = "192.0.2.53"

INET4_ADDRS: tuple[str, ...] = (
    "192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.53", "198.51.100.20", "203.0.113.30", "203.0.113.53",
)
INET6_ADDRS: tuple[str, ...] = ("2001:db8::10", "2001:db8::20", "2001:db8::53")
INET_ADDRS: tuple[str, ...] = INET4_ADDRS + INET6_ADDRS
LAN_ADDRS: tuple[str, ...] = (LAN4, LAN6)

TCP_PORTS: tuple[int, ...] = (22, 53, 80, 443, 853, 8080)
UDP_PORTS: tuple[int, ...] = (53, 123, 443, 9999)
HOST_TCP_PORTS: tuple[int, ...] = (631, 8631)
HOST_UDP_PORTS: tuple[int, ...] = (9999,)
DNS_PORT = 53

DEFAULT_TTL = 30
# Short, so that a cache in front of the world's DNS does not make a test wait for a negative answer to expire.
NEGATIVE_TTL = 5

RUN_DIR = "/run/world"
DNS_LOG = f"{RUN_DIR}/dns.log"
ZONE_FILE = f"{RUN_DIR}/zone.json"
PIDS_FILE = f"{RUN_DIR}/pids"
RESOLV_CONF = "/etc/resolv.conf"
NSFW_RUN_DIR = "/run/nsfw"

PYTHON = "/usr/bin/python3"
# Where the world looks for ip, nft, unshare and nsenter, whatever PATH it was given.
_TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PROBE_TIMEOUT_ENV = "NSFW_PROBE_TIMEOUT"
PROBE_KINDS = ("tcp", "udp", "dns", "query", "resolve", "tcpname")

# probe exit codes
REACHED, REFUSED, TIMEOUT, BLOCKED, OTHER, USAGE = 0, 1, 2, 3, 4, 64

Record = dict[str, Any]
Zone = dict[str, Record]

# A name maps to {"A": [...], "AAAA": [...], "ttl": N} or {"CNAME": "target", "ttl": N}; "*.x" is a wildcard.
DEFAULT_ZONE: Zone = {
    "allowed.test": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"]},
    "other.test": {"A": ["198.51.100.20"], "AAAA": ["2001:db8::20"]},
    "cdn.test": {"A": ["203.0.113.30"]},
    "short.test": {"A": ["192.0.2.12"], "ttl": 2},
    "rebind.test": {"A": ["10.77.0.10"]},
    "multi.test": {"A": ["192.0.2.10", "198.51.100.20"]},
    "www.cname.test": {"CNAME": "other.test"},
    "chain.test": {"CNAME": "c1.chain.test"},
    "c1.chain.test": {"CNAME": "c2.chain.test"},
    "c2.chain.test": {"A": ["203.0.113.30"], "AAAA": ["2001:db8::20"]},
    "v6only.test": {"AAAA": ["2001:db8::20"]},
    "*.wild.test": {"A": ["192.0.2.11"]},
}


def world_map(zone: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The map as data, for `world.py info` and for a demo that wants to show it."""
    return {
        HOST: {UPLINK: [f"{HOST_UPLINK4}/24", f"{HOST_UPLINK6}/64"], LANLINK: [f"{HOST_LAN4}/24", f"{HOST_LAN6}/64"],
               "resolver": RESOLVER, "tcp": list(HOST_TCP_PORTS), "udp": list(HOST_UDP_PORTS)},
        INET: {"eth0": [f"{GATEWAY4}/24", f"{GATEWAY6}/64"], "addrs": list(INET_ADDRS),
               "tcp": list(TCP_PORTS), "udp": list(UDP_PORTS)},
        LAN: {"eth0": [f"{LAN4}/24", f"{LAN6}/64"], "addrs": list(LAN_ADDRS),
              "tcp": list(TCP_PORTS), "udp": list(UDP_PORTS)},
        "zone": normalize_zone(DEFAULT_ZONE if zone is None else zone),
    }


class WorldError(RuntimeError):
    """The world could not be built, or is no longer there."""


# ------------------------------------------------------------------------------------------------ zone

_ZONE_KEYS = {"A", "AAAA", "CNAME", "ttl"}


def _norm_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def normalize_zone(zone: Mapping[str, Mapping[str, Any]]) -> Zone:
    """Check a zone and return it with lower-case, dot-less names; ValueError names the bad entry."""
    out: Zone = {}
    for raw_name, rec in zone.items():
        name = _norm_name(raw_name)
        where = f"zone entry {raw_name!r}"
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where}: must be a mapping of A/AAAA/CNAME/ttl")
        unknown = set(rec) - _ZONE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_ZONE_KEYS)})")
        labels = name.split(".")
        if not name or len(name) > 253 or any(not 0 < len(lb) <= 63 for lb in labels) or "*" in name[1:]:
            raise ValueError(f"{where}: not a valid domain name (a wildcard is '*.' followed by a name)")
        try:
            name.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: only ASCII names (use the punycode form)") from None
        norm: Record = {}
        if "ttl" in rec:
            ttl = rec["ttl"]
            if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl < 2**31:
                raise ValueError(f"{where}: ttl must be an integer from 0 to 2147483647")
            norm["ttl"] = ttl
        if "CNAME" in rec:
            if "A" in rec or "AAAA" in rec:
                raise ValueError(f"{where}: a CNAME cannot have other records beside it")
            if not isinstance(rec["CNAME"], str) or not _norm_name(rec["CNAME"]):
                raise ValueError(f"{where}: CNAME must be a domain name")
            norm["CNAME"] = _norm_name(rec["CNAME"])
        for rtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if rtype not in rec:
                continue
            addrs = rec[rtype]
            if isinstance(addrs, str) or not isinstance(addrs, Sequence):
                raise ValueError(f"{where}: {rtype} must be a list of addresses")
            for a in addrs:
                try:
                    socket.inet_pton(fam, a)
                except (OSError, TypeError):
                    raise ValueError(f"{where}: {a!r} is not an {'IPv4' if rtype == 'A' else 'IPv6'} address") from None
            norm[rtype] = list(addrs)
        out[name] = norm
    return out


# ------------------------------------------------------------------------------------------------ DNS wire format

QTYPE_A, QTYPE_NS, QTYPE_CNAME, QTYPE_SOA, QTYPE_AAAA, QTYPE_OPT, QTYPE_ANY = 1, 2, 5, 6, 28, 41, 255
_TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
               41: "OPT", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
_TYPE_CODES = {v: k for k, v in _TYPE_NAMES.items()}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_NOERROR, _FORMERR, _NXDOMAIN, _NOTIMP, _REFUSED = 0, 1, 3, 4, 5
_EDNS_SIZE = 1232
_SAFE_LABEL = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")


def type_name(code: int) -> str:
    return _TYPE_NAMES.get(code, f"TYPE{code}")


def type_code(name: str) -> int:
    name = name.upper()
    if name in _TYPE_CODES:
        return _TYPE_CODES[name]
    if name.startswith("TYPE") and name[4:].isdigit():
        return int(name[4:])
    raise ValueError(f"unknown DNS type {name!r}")


def _label_text(label: bytes) -> str:
    # Escape the way zone files do, so that a hostile name can neither split a dns.log line nor look like another.
    return "".join(chr(b) if b in _SAFE_LABEL else f"\\{b:03d}" for b in label).lower()


def encode_name(name: str) -> bytes:
    name = name.rstrip(".")
    if not name:
        return b"\0"
    return b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.split(".")) + b"\0"


def _read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """Decompress the name at pos; returns it and the position after it in the message."""
    labels: list[str] = []
    end = -1
    jumps = 0
    while True:
        n = msg[pos]
        if n & 0xC0 == 0xC0:
            if jumps > 32:
                raise ValueError("compression loop")
            if end < 0:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | msg[pos + 1]
            jumps += 1
            continue
        if n & 0xC0:
            raise ValueError("bad label type")
        if n == 0:
            break
        if pos + 1 + n > len(msg):
            raise ValueError("name runs past the message")
        labels.append(_label_text(msg[pos + 1:pos + 1 + n]))
        pos += 1 + n
    return ".".join(labels) or ".", (end if end >= 0 else pos + 1)


@dataclass(frozen=True)
class _Question:
    qid: int
    flags: int
    name: str  # lower case, escaped, "." for the root
    qtype: int
    qclass: int
    raw: bytes  # the question section as received, echoed back unchanged
    edns: int | None  # the client's UDP payload size, None without EDNS


class ZoneView:
    """A zone plus the set of names that exist (including empty non-terminals), for proper NXDOMAIN/NODATA."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.existing: set[str] = {"."}
        for name in zone:
            labels = name.split(".")
            for i in range(len(labels)):
                self.existing.add(".".join(labels[i:]))

    def find(self, name: str) -> Record | None:
        rec = self.zone.get(name)
        if rec is not None or name in self.existing:
            return rec
        # RFC 4592: synthesise from the wildcard at the closest encloser, and only there
        labels = name.split(".")
        for i in range(1, len(labels) + 1):
            parent = ".".join(labels[i:]) or "."
            if parent in self.existing:
                return self.zone.get("*" if parent == "." else f"*.{parent}")
        return None

    def resolve(self, name: str, qtype: int) -> tuple[int, list[tuple[str, int, int, bytes]]]:
        """rcode and answer RRs (owner, type, ttl, rdata); a CNAME chain is followed within the zone."""
        answers: list[tuple[str, int, int, bytes]] = []
        seen: set[str] = set()
        current = name
        while True:
            rec = self.find(current)
            if rec is None:
                # RFC 6604: the rcode is that of the last name in the chain
                return (_NOERROR if current in self.existing else _NXDOMAIN), answers
            ttl = int(rec.get("ttl", DEFAULT_TTL))
            target = rec.get("CNAME")
            if target is not None:
                answers.append((current, QTYPE_CNAME, ttl, encode_name(target)))
                if qtype in (QTYPE_CNAME, QTYPE_ANY) or target in seen or len(seen) > 16:
                    return _NOERROR, answers
                seen.add(current)
                current = target
                continue
            for rtype, code, fam in (("A", QTYPE_A, socket.AF_INET), ("AAAA", QTYPE_AAAA, socket.AF_INET6)):
                if qtype in (code, QTYPE_ANY):
                    answers += [(current, code, ttl, socket.inet_pton(fam, a)) for a in rec.get(rtype, [])]
            return _NOERROR, answers


def _parse_query(data: bytes) -> _Question | tuple[int, int, int] | None:
    """A question, or (qid, flags, rcode) for a header worth an error answer, or None to stay silent."""
    if len(data) < 12:
        return None
    qid, flags, qd, an, ns, ar = struct.unpack("!6H", data[:12])
    if flags & 0x8000:
        return None  # a response: answering it could start a loop between two servers
    if (flags >> 11) & 0xF:
        return qid, flags, _NOTIMP
    if qd != 1:
        return qid, flags, _FORMERR
    pos = 12
    labels: list[bytes] = []
    while True:
        if pos >= len(data):
            return qid, flags, _FORMERR
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 or pos + 1 + n > len(data):
            return qid, flags, _FORMERR
        labels.append(data[pos + 1:pos + 1 + n])
        pos += 1 + n
    if pos + 4 > len(data) or sum(len(lb) + 1 for lb in labels) > 255:
        return qid, flags, _FORMERR
    qtype, qclass = struct.unpack("!HH", data[pos:pos + 4])
    raw = data[12:pos + 4]
    pos += 4
    edns: int | None = None
    try:
        if an == 0 and ns == 0:
            for _ in range(ar):
                _name, pos = _read_name(data, pos)
                rtype, rclass, _ttl, rdlen = struct.unpack("!HHIH", data[pos:pos + 10])
                pos += 10 + rdlen
                if rtype == QTYPE_OPT:
                    edns = max(512, rclass)
    except (IndexError, ValueError, struct.error):
        edns = None  # a broken additional section is no reason to refuse the question
    name = ".".join(_label_text(lb) for lb in labels) or "."
    return _Question(qid, flags, name, qtype, qclass, raw, edns)


def _rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def _soa() -> bytes:
    rdata = encode_name("ns.world.test") + encode_name("hostmaster.world.test") + struct.pack(
        "!5I", 1, 3600, 600, 86400, NEGATIVE_TTL)
    return _rr(b"\0", QTYPE_SOA, NEGATIVE_TTL, rdata)


def dns_reply(data: bytes, zone: ZoneView, *, udp: bool,
              log: Callable[[str], None] | None = None) -> bytes | None:
    """The answer to one DNS message, or None when it deserves none. Never raises on garbage."""
    try:
        q = _parse_query(data)
    except Exception:  # garbage must never take the world's DNS down
        return None
    if q is None:
        return None
    if not isinstance(q, _Question):
        qid, flags, rcode = q
        return struct.pack("!6H", qid, 0x8000 | (flags & 0x7900) | rcode, 0, 0, 0, 0)
    if log is not None:
        log(f"{q.name} {type_name(q.qtype)}")
    flags = 0x8000 | 0x0400 | 0x0080 | (q.flags & 0x0100)  # QR AA RA, RD echoed
    answers: list[tuple[str, int, int, bytes]] = []
    if q.qclass not in (1, 255):
        rcode = _REFUSED
    elif q.qtype == QTYPE_OPT:
        rcode = _FORMERR
    else:
        rcode, answers = zone.resolve(q.name, q.qtype)
    body = b"".join(_rr(b"\xc0\x0c" if owner == q.name else encode_name(owner), t, ttl, rd)
                    for owner, t, ttl, rd in answers)
    # RFC 2308: a negative answer (NXDOMAIN, or no data of the asked type, after any CNAMEs) carries the SOA that
    # tells a cache how long to keep it
    final = any(t == q.qtype or q.qtype == QTYPE_ANY for _o, t, _ttl, _rd in answers)
    authority = _soa() if rcode in (_NOERROR, _NXDOMAIN) and not final else b""
    # OPT: root owner, class = our UDP payload size, no extended flags, no options
    opt = b"\0" + struct.pack("!HHIH", QTYPE_OPT, _EDNS_SIZE, 0, 0) if q.edns else b""
    header = struct.pack("!6H", q.qid, flags | rcode, 1, len(answers), 1 if authority else 0, 1 if opt else 0)
    reply = header + q.raw + body + authority + opt
    limit = min(q.edns or 512, _EDNS_SIZE)
    if udp and len(reply) > limit:
        reply = struct.pack("!6H", q.qid, flags | 0x0200 | rcode, 1, 0, 0, 1 if opt else 0) + q.raw + opt
    return reply


class _ZoneFile:
    """The zone as a file in the world's /run, re-read when World.set_zone() replaces it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.key: tuple[int, int, int] | None = None
        self.view = ZoneView({})
        self.lock = threading.Lock()

    def get(self) -> ZoneView:
        try:
            st = os.stat(self.path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            with self.lock:
                if key != self.key:
                    with open(self.path, encoding="utf-8") as f:
                        self.view = ZoneView(normalize_zone(json.load(f)))
                    self.key = key
        except (OSError, ValueError):
            pass  # keep answering from the zone we have
        return self.view


def _append_log(path: str, line: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())  # one write with O_APPEND: lines from many servers never interleave
        finally:
            os.close(fd)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ servers

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_SO_RCVBUFFORCE = 33


def _unmap(addr: str) -> str:
    return addr.removeprefix("::ffff:")


class Servers:
    """Banner/echo TCP and UDP servers (DNS on 53 when a zone is given) on every address of one namespace."""

    def __init__(self, label: str, tcp_ports: Sequence[int], udp_ports: Sequence[int],
                 zone: _ZoneFile | None, dns_log: str | None) -> None:
        self.label = label
        self.zone = zone
        self.dns_log = dns_log
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        self.tcp_ports = tcp_ports
        self.udp_ports = udp_ports

    def bind(self) -> None:
        """Bind every socket now, so that 'ready' means connections are already queued, not refused."""
        for port in self.tcp_ports:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", port))
            s.listen(128)
            s.setblocking(False)
            self.selector.register(s, selectors.EVENT_READ, ("tcp", port))
            self.sockets.append(s)
        for port in self.udp_ports:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
            s.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            with contextlib.suppress(OSError):
                # room for a burst of datagrams (a fuzzing test, a resolver's retries) while one thread answers
                s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 4 << 20)
            s.bind(("::", port))
            s.setblocking(False)
            self.selector.register(s, selectors.EVENT_READ, ("udp", port))
            self.sockets.append(s)

    def serve_forever(self) -> None:
        while True:
            for key, _events in self.selector.select():
                proto, port = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if proto == "tcp":
                        conn, peer = sock.accept()
                        threading.Thread(target=self._tcp_client, args=(conn, port, peer), daemon=True).start()
                    else:
                        self._udp_datagram(sock, port)
                except Exception:  # one bad client must never stop the servers
                    continue

    def _log_query(self, line: str) -> None:
        if self.dns_log:
            _append_log(self.dns_log, line)

    def _dns(self, data: bytes, *, udp: bool) -> bytes | None:
        if self.zone is None:
            return None
        return dns_reply(data, self.zone.get(), udp=udp, log=self._log_query)

    def _tcp_client(self, conn: socket.socket, port: int, peer: tuple[Any, ...]) -> None:
        with conn:
            try:
                conn.settimeout(10)
                if port == DNS_PORT and self.zone is not None:
                    self._dns_stream(conn)
                    return
                local = _unmap(conn.getsockname()[0])
                conn.sendall(f"world {self.label} {local} {port} tcp from {_unmap(peer[0])}\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data)
                    if data.startswith((b"GET ", b"HEAD ", b"POST ")):
                        break  # an HTTP client gets banner + echo of its request, then EOF (curl --http0.9)
            except OSError:
                pass

    def _dns_stream(self, conn: socket.socket) -> None:
        # RFC 7766: length-prefixed messages, several per connection
        def exactly(n: int) -> bytes | None:
            buf = b""
            while len(buf) < n:
                chunk = conn.recv(n - len(buf))
                if not chunk:
                    return None
                buf += chunk
            return buf

        while (prefix := exactly(2)) is not None:
            msg = exactly(struct.unpack("!H", prefix)[0])
            if msg is None:
                return
            reply = self._dns(msg, udp=False)
            if reply is not None:
                conn.sendall(struct.pack("!H", len(reply)) + reply)

    def _udp_datagram(self, sock: socket.socket, port: int) -> None:
        data, anc, _flags, peer = sock.recvmsg(65536, 256)
        local: str | None = None
        for level, ctype, value in anc:
            if level == socket.IPPROTO_IPV6 and ctype == _IPV6_PKTINFO:
                local = socket.inet_ntop(socket.AF_INET6, value[:16])
            elif level == socket.IPPROTO_IP and ctype == _IP_PKTINFO:
                local = socket.inet_ntop(socket.AF_INET, value[8:12])
        if port == DNS_PORT and self.zone is not None:
            reply = self._dns(data, udp=True)
        else:
            reply = f"world {self.label} {_unmap(local or '?')} {port} udp from {_unmap(peer[0])}\n".encode()
        if reply is None:
            return
        # e.g. no route back to an un-NATed sender: that silence is the point
        with contextlib.suppress(OSError):
            if local is None:
                sock.sendto(reply, peer)
                return
            # Answer from the address that was asked: the servers' addresses sit on lo, and a plain sendto would
            # leave from the link address, which a connected client (and any conntrack) would not accept.
            mapped = local if ":" in local else f"::ffff:{local}"
            sock.sendmsg([reply], [(socket.IPPROTO_IPV6, _IPV6_PKTINFO,
                                    socket.inet_pton(socket.AF_INET6, mapped) + b"\0\0\0\0")], 0, peer)


# ------------------------------------------------------------------------------------------------ kernel helpers

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(_libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                         ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")


def _setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc().setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def _die_with_parent(parent: int) -> None:
    _check(_libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the death signal was armed


def _ns_inode(kind: str, pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def _write(path: str, text: str, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _ip_batch(lines: Sequence[str], netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    r = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False)
    if r.returncode:
        raise WorldError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


def _sysctls(values: Mapping[str, str]) -> None:
    # /proc/sys/net belongs to the network namespace of whoever opens it: here, the world's host
    for key, value in values.items():
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value + "\n")


def _addr(a: str) -> str:
    # nodad: the world must be usable at once, not after IPv6 duplicate address detection
    return f"{a} nodad" if ":" in a else a


# ------------------------------------------------------------------------------------------------ the world process

def _build(config: Mapping[str, Any]) -> None:
    """Lay out the host namespace; runs as the world process, after unshare."""
    # The one guard between a bug here and the machine's real network: never build in the caller's namespaces.
    if _ns_inode("net") == config["netns"] or _ns_inode("mnt") == config["mntns"]:
        raise WorldError("refusing to build: not in a fresh network + mount namespace")
    resolv_target = os.path.realpath(RESOLV_CONF)
    _mount("nsfw-world-run", "/run", "tmpfs", 0, "mode=755")
    os.makedirs("/run/netns", mode=0o755)
    os.makedirs(RUN_DIR, mode=0o755)
    _write(f"{RUN_DIR}/resolv.conf", f"nameserver {RESOLVER}\n")
    if resolv_target.startswith("/run/"):
        # /etc/resolv.conf is a link into /run (systemd-resolved): our tmpfs now stands where it points
        os.makedirs(os.path.dirname(resolv_target), mode=0o755, exist_ok=True)
        _write(resolv_target, f"nameserver {RESOLVER}\n")
    else:
        _mount(f"{RUN_DIR}/resolv.conf", resolv_target, None, _MS_BIND, None)
    _write(ZONE_FILE, json.dumps(config["zone"], indent=1))
    _write(DNS_LOG, "")
    # A new namespace may inherit the machine's IPv4 values; the host's baseline is "not a router".
    _sysctls({"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0",
              "net/ipv6/conf/default/forwarding": "0"})
    _ip_batch([
        "link set lo up",
        f"netns add {INET}",
        f"netns add {LAN}",
        f"link add {UPLINK} type veth peer name eth0 netns {INET}",
        f"link add {LANLINK} type veth peer name eth0 netns {LAN}",
    ])
    # No duplicate address detection on the world's own links, link-local addresses included: the kernel adds
    # their local routes only once DAD is over, a second or two after start(), and a snapshot taken before would
    # differ from one taken after. Only these two links: those nsfw makes behave as on a real machine.
    _sysctls({f"net/ipv6/conf/{link}/accept_dad": "0" for link in (UPLINK, LANLINK)})
    # Links go up before they get addresses: IPv6 addresses added (nodad) to a link that is still down lose the
    # first neighbour solicitations after it comes up, and the first IPv6 connection would wait a second.
    _ip_batch([
        f"link set {UPLINK} up",
        f"link set {LANLINK} up",
        f"addr add {HOST_UPLINK4}/24 dev {UPLINK}",
        f"addr add {_addr(HOST_UPLINK6 + '/64')} dev {UPLINK}",
        f"addr add {HOST_LAN4}/24 dev {LANLINK}",
        f"addr add {_addr(HOST_LAN6 + '/64')} dev {LANLINK}",
        f"route add default via {GATEWAY4}",
        f"route add default via {GATEWAY6}",
    ])
    # No default route in inet or lan: only their own link is routed, so whatever the host forwards without
    # NAT gets no answer, as on the real internet.
    _ip_batch([
        "link set lo up",
        "link set eth0 up",
        f"addr add {GATEWAY4}/24 dev eth0",
        f"addr add {_addr(GATEWAY6 + '/64')} dev eth0",
        *(f"addr add {a}/{128 if ':' in a else 32} dev lo" for a in INET_ADDRS),
    ], INET)
    _ip_batch([
        "link set lo up",
        "link set eth0 up",
        f"addr add {LAN4}/24 dev eth0",
        f"addr add {_addr(LAN6 + '/64')} dev eth0",
    ], LAN)


def _fork_servers(label: str, parent: int) -> tuple[int, int]:
    """A server process inside the named netns; returns (pid, fd that reads 'ready')."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return pid, r
    try:
        os.close(r)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent(parent)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        _setns(f"/run/netns/{label}", _CLONE_NEWNET)
        servers = Servers(label, TCP_PORTS, UDP_PORTS, _ZoneFile(ZONE_FILE), DNS_LOG)
        servers.bind()
        os.write(w, b"ready\n")
        os.close(w)
        servers.serve_forever()
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)  # serve_forever() only ends by an error


def _world_main() -> int:
    """The world process: host namespace, host servers, parent of the inet and lan server processes."""
    # Ctrl-C in a terminal reaches the whole process group; the world stops when its owner says so, not then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(_sig: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    config = json.loads(sys.stdin.buffer.readline())
    _die_with_parent(config["parent"])
    children: list[int] = []
    try:
        _build(config)
        me = os.getpid()
        # fork before any thread exists in this process
        ready = []
        for label in (INET, LAN):
            pid, fd = _fork_servers(label, me)
            children.append(pid)
            ready.append((label, fd))
        host = Servers(HOST, HOST_TCP_PORTS, HOST_UDP_PORTS, None, None)
        host.bind()
        threading.Thread(target=host.serve_forever, daemon=True).start()
        for label, fd in ready:
            with os.fdopen(fd, "rb") as f:
                if f.readline() != b"ready\n":
                    raise WorldError(f"the {label} servers did not start (see above)")
        _write(PIDS_FILE, " ".join(str(p) for p in (me, *children)) + "\n")
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        # EOF on stdin is the stop signal; it also comes when the owner dies without a word
        while sys.stdin.buffer.read(65536):
            pass
    except SystemExit:
        pass
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        if os.path.exists(f"/run/netns/{INET}"):
            # The namespaces would go with this mount namespace anyway, but a process left inside it
            # (nsenter from a test) would keep them alive: take them down now.
            subprocess.run(["ip", "-batch", "-"], input=f"netns del {INET}\nnetns del {LAN}\n",
                           capture_output=True, text=True, check=False)
    return 0


# ------------------------------------------------------------------------------------------------ snapshot

_SNAPSHOT_SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/default/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/default/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/conf/default/route_localnet",
)


def _json_cmd(argv: Sequence[str]) -> Any:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode:
        raise WorldError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return json.loads(r.stdout or "null")


def _snapshot_here() -> dict[str, Any]:
    """The host namespace's state; runs inside it (World.snapshot enters it)."""
    links = []
    for link in _json_cmd(["ip", "-j", "-d", "address", "show"]) or []:
        links.append({
            "name": link["ifname"],
            "kind": (link.get("linkinfo") or {}).get("info_kind"),
            "up": "UP" in link.get("flags", []),
            "addresses": sorted(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if "local" in a),
        })
    routes: dict[str, list[Any]] = {}
    for fam in ("4", "6"):
        rows = _json_cmd(["ip", "-j", f"-{fam}", "route", "show", "table", "all"]) or []
        for row in rows:
            row.pop("expires", None)
        routes[fam] = sorted(rows, key=lambda row: json.dumps(row, sort_keys=True))
    nft = [item for item in (_json_cmd(["nft", "-j", "list", "ruleset"]) or {}).get("nftables", [])
           if "metainfo" not in item]
    sysctl = {}
    for key in _SNAPSHOT_SYSCTLS:
        with open(f"/proc/sys/{key}") as f:
            sysctl[key.replace("/", ".")] = f.read().strip()
    nsfw_files = []
    for root, _dirs, files in os.walk(NSFW_RUN_DIR):
        nsfw_files += [os.path.relpath(os.path.join(root, name), NSFW_RUN_DIR) for name in files]
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == "/run" or point.startswith("/run/") or point == RESOLV_CONF:
                mounts.append(point)
    with open(PIDS_FILE) as f:
        own = {int(p) for p in f.read().split()} | {os.getpid()}
    my_net, my_mnt = _ns_inode("net"), _ns_inode("mnt")
    processes = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in own:
            continue
        try:
            if _ns_inode("net", entry) != my_net and _ns_inode("mnt", entry) != my_mnt:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        processes.append({"pid": int(entry), "cmdline": cmd})
    return {
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
        "links": sorted(links, key=lambda link: link["name"]),
        "routes": routes,
        "nft": nft,
        "sysctl": sysctl,
        "run_nsfw": sorted(nsfw_files),
        "mounts": sorted(mounts),
        "processes": sorted(processes, key=lambda p: p["pid"]),
    }


# ------------------------------------------------------------------------------------------------ the API

@dataclass(frozen=True)
class ProbeResult:
    code: int  # REACHED, REFUSED, TIMEOUT, BLOCKED, OTHER (USAGE for a bad call)
    out: str  # stdout, stripped: 'open world inet 192.0.2.10 80 tcp from 198.18.0.2', 'timeout', ...
    err: str = ""

    @property
    def word(self) -> str:
        return self.out.split(" ", 1)[0] if self.out else ""

    @property
    def reached(self) -> bool:
        return self.code == REACHED


_PROBE_DIR_PREFIX = "nsfw-world-"


class World:
    """The simulated world. start() builds it (well under a second), stop() removes all of it.

        with World() as w:
            w.run(["nsfw", "run", "--", PYTHON, w.probe_script, "tcp", "192.0.2.10", "80"])
            w.probe("dns", "allowed.test").out       # '192.0.2.10 2001:db8::10'
            w.snapshot() == baseline                 # nothing left behind on the host

    zone: replaces DEFAULT_ZONE (merge with {**DEFAULT_ZONE, ...} to extend it); probe_dir: where the
    world-readable copy of the probe goes (default: the temp dir). The world process is bound to the thread
    that called start(): it dies when that thread ends (PDEATHSIG), as it does when the whole caller dies.
    """

    def __init__(self, *, zone: Mapping[str, Mapping[str, Any]] | None = None,
                 probe_dir: str | None = None, ready_timeout: float = 15.0) -> None:
        self.zone: Zone = normalize_zone(DEFAULT_ZONE if zone is None else zone)
        self._probe_parent = probe_dir
        self._ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._probe_dir: str | None = None
        self._pids: tuple[int, ...] = ()
        self._tools: dict[str, str] = {}
        self.startup_seconds: float | None = None  # how long the last start() took

    # -- lifecycle

    def __enter__(self) -> World:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> World:
        """Build the world; returns once every server listens. WorldError says why it could not."""
        if self._proc is not None:
            return self
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise WorldError("the world needs root (it builds network namespaces)")
        # Absolute paths: a caller's env= with a short PATH must not decide which tools run.
        tools = {t: shutil.which(t, path=_TOOL_PATH) for t in ("unshare", "nsenter", "ip")}
        missing = [t for t, path in tools.items() if path is None] + ([] if os.access(PYTHON, os.X_OK) else [PYTHON])
        if missing:
            raise WorldError(f"the world needs {', '.join(missing)} (apt-get install iproute2 util-linux python3)")
        self._tools = {t: str(path) for t, path in tools.items()}
        try:
            self._make_probe_dir()
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - held for the world's life, closed in stop()
            config = {"parent": os.getpid(), "netns": _ns_inode("net"), "mntns": _ns_inode("mnt"), "zone": self.zone}
            self._proc = proc = subprocess.Popen(
                [self._tools["unshare"], "--mount", "--net", "--propagation", "private", "--",
                 PYTHON, "-I", "-S", os.path.abspath(__file__), "--world"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                start_new_session=True,  # terminal signals belong to the command in the world, not the world
            )
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(config).encode() + b"\n")
            proc.stdin.flush()
            if self._read_line(proc.stdout.fileno(), t0 + self._ready_timeout) != b"ready\n":
                late = "" if proc.poll() is not None else f" within {self._ready_timeout:g} s"
                raise WorldError(f"the world did not start{late}: {self._stderr_text() or 'no message'}")
            with open(f"/proc/{proc.pid}/root{PIDS_FILE}") as f:
                self._pids = tuple(int(p) for p in f.read().split())
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Remove the world; idempotent, never raises."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()  # EOF: the world process takes everything down
                proc.wait(timeout=5)
            except Exception:
                try:
                    proc.kill()  # its servers follow through PDEATHSIG
                    proc.wait(timeout=5)
                except Exception:
                    pass
            with contextlib.suppress(Exception):
                if proc.stdout is not None:
                    proc.stdout.close()
        if self._stderr is not None:
            with contextlib.suppress(Exception):
                self._stderr.close()
            self._stderr = None
        if self._probe_dir is not None:
            shutil.rmtree(self._probe_dir, ignore_errors=True)
            self._probe_dir = None
        self._pids = ()

    @staticmethod
    def _read_line(fd: int, deadline: float) -> bytes:
        """One line, or what came of it before EOF or the deadline."""
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()
        except Exception:
            return ""

    def _make_probe_dir(self) -> None:
        parent = self._probe_parent or tempfile.gettempdir()
        # Directories of worlds whose owner was SIGKILLed; our pid in the name tells whose they were.
        for name in os.listdir(parent):
            pid = name[len(_PROBE_DIR_PREFIX):].split("-", 1)[0]
            path = os.path.join(parent, name)
            if (name.startswith(_PROBE_DIR_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}")
                    and os.lstat(path).st_uid == os.geteuid()):
                shutil.rmtree(path, ignore_errors=True)
        d = tempfile.mkdtemp(prefix=f"{_PROBE_DIR_PREFIX}{os.getpid()}-", dir=parent)
        os.chmod(d, 0o755)  # the sandboxed user must read the probe, nothing more
        script = os.path.join(d, "world.py")
        shutil.copyfile(os.path.abspath(__file__), script)
        os.chmod(script, 0o644)
        self._probe_dir = d

    # -- state

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _live(self) -> subprocess.Popen[bytes]:
        # poll() without reaping a live child: as long as we have not reaped it, its pid cannot be reused,
        # so nsenter can never land in some other process's (or the machine's) namespaces
        if self._proc is None:
            raise WorldError("the world is not started")
        if self._proc.poll() is not None:
            raise WorldError(f"the world process died (status {self._proc.returncode}): {self._stderr_text()}")
        return self._proc

    @property
    def pid(self) -> int:
        """A process whose network and mount namespaces are the simulated host."""
        return self._live().pid

    @property
    def server_pids(self) -> tuple[int, ...]:
        """The world process and its server processes (for tests that check nothing outlives the world)."""
        return self._pids

    @property
    def probe_script(self) -> str:
        """A world-readable copy of this file, for probes run by an unprivileged user."""
        if self._probe_dir is None:
            raise WorldError("the world is not started")
        return os.path.join(self._probe_dir, "world.py")

    # -- running things

    def command(self, argv: Sequence[str], *, ns: str = HOST, cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """argv wrapped to run on the simulated host (or in its inet/lan namespace)."""
        if ns not in (HOST, INET, LAN):
            raise ValueError(f"ns must be one of {HOST!r}, {INET!r}, {LAN!r}")
        # nsenter --mount resets the working directory to "/": carry the caller's over
        wd = os.path.abspath(os.fspath(cwd)) if cwd is not None else os.getcwd()
        pid = self.pid
        inner = [self._tools["ip"], "netns", "exec", ns] if ns != HOST else []
        return [self._tools["nsenter"], f"--target={pid}", "--net", "--mount", f"--wd={wd}", "--", *inner, *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 60, ns: str = HOST,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """subprocess.run on the simulated host; text and captured output unless told otherwise."""
        kw.setdefault("text", True)
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        check = kw.pop("check", False)
        cmd = self.command(argv, ns=ns, cwd=kw.pop("cwd", None))
        result: subprocess.CompletedProcess[str] = subprocess.run(cmd, timeout=timeout, check=check, **kw)
        return result

    def popen(self, argv: Sequence[str], *, ns: str = HOST, **kw: Any) -> subprocess.Popen[str]:
        kw.setdefault("text", True)
        cmd = self.command(argv, ns=ns, cwd=kw.pop("cwd", None))
        proc: subprocess.Popen[str] = subprocess.Popen(cmd, **kw)
        return proc

    def probe_argv(self, kind: str, *args: str | int) -> list[str]:
        """The probe command line, to run through a sandbox: /usr/bin/python3 -I <copy> probe KIND ARGS."""
        return [PYTHON, "-I", self.probe_script, "probe", kind, *(str(a) for a in args)]

    def probe(self, kind: str, *args: str | int, timeout: float | None = None, ns: str = HOST) -> ProbeResult:
        """Run one probe on the simulated host (or in inet/lan); timeout overrides NSFW_PROBE_TIMEOUT."""
        env = dict(os.environ)
        if timeout is not None:
            env[PROBE_TIMEOUT_ENV] = str(timeout)
        # a probe waits at most twice its own timeout (dns asks two questions); this only guards a hang
        wait = _probe_timeout(env) * 4 + 10
        r = self.run(self.probe_argv(kind, *args), env=env, ns=ns, timeout=wait)
        return ProbeResult(r.returncode, r.stdout.strip(), r.stderr.strip())

    # -- looking at it

    def _run_file(self, path: str) -> str:
        # the world's private /run, seen from outside through the world process's root
        return f"/proc/{self.pid}/root{path}"

    def snapshot(self) -> dict[str, Any]:
        """State of the host namespace: netns, links, routes, nft ruleset, forwarding sysctls, /run/nsfw files,
        mounts under /run, and processes in the host's net or mount namespace other than the world's own."""
        r = self.run([PYTHON, "-I", "-S", os.path.abspath(__file__), "--snapshot"], timeout=60)
        if r.returncode:
            raise WorldError(f"snapshot failed: {r.stderr.strip()}")
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def dns_log(self) -> list[str]:
        """Every DNS query that reached a world server, oldest first, as 'NAME QTYPE'."""
        with open(self._run_file(DNS_LOG), encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()

    def clear_dns_log(self) -> None:
        with open(self._run_file(DNS_LOG), "w"):
            pass

    def set_zone(self, zone: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the zone of every world DNS server; the next query sees it."""
        self.zone = normalize_zone(zone)
        _write(self._run_file(ZONE_FILE), json.dumps(self.zone, indent=1))


# ------------------------------------------------------------------------------------------------ probes

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


# ------------------------------------------------------------------------------------------------ command line

def _run_in_world(cmd: Sequence[str]) -> int:
    try:
        world = World().start()
    except WorldError as e:
        print(f"world: {e}", file=sys.stderr)
        return 125
    try:
        try:
            child = world.popen(cmd, stdin=None, stdout=None, stderr=None)
        except OSError as e:
            print(f"world: {e}", file=sys.stderr)
            return 127
        # Ctrl-C belongs to the command; a SIGTERM for us is passed on so that the command ends first
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        code = child.wait()
        return 128 - code if code < 0 else code
    finally:
        world.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--world"], ["--snapshot"]):
        os.environ["PATH"] = f"{_TOOL_PATH}:{os.environ.get('PATH', '')}"
    if args[:1] == ["--world"]:
        return _world_main()
    if args[:1] == ["--snapshot"]:
        print(json.dumps(_snapshot_here()))
        return 0
    if args[:1] == ["probe"]:
        return probe_main(args[1:])
    if args[:1] and args[0] in PROBE_KINDS:
        return probe_main(args)
    if args[:1] == ["info"]:
        print(json.dumps(world_map(), indent=1))
        return 0
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else USAGE
    if os.geteuid() != 0:
        print("world: run as root (it builds network namespaces)", file=sys.stderr)
        return 125
    return _run_in_world(args)


if __name__ == "__main__":
    status = main()
    with contextlib.suppress(BrokenPipeError):  # `world.py info | head`
        sys.stdout.flush()
        sys.stderr.flush()
    # not sys.exit(): a getaddrinfo thread still stuck in libc after a probe timed out must not hold the exit up
    os._exit(status)
