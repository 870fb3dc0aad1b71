"""DNS wire format, as much as the world's servers and probes need: names, questions, type names, RRs.

A name read off the wire is escaped the way zone files do, so that a hostile name can neither split a dns.log
line nor look like another.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

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
