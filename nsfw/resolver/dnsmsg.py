"""DNS wire format for the sandbox resolver: parse queries and upstream responses, build replies. Pure.

Whatever arrives is hostile until parsed. Every malformation (a short header, counts larger than the packet,
truncated records, labels over 63 bytes, names over 255, reserved label types, compression pointers that point
forwards or loop, trailing garbage) raises `DnsFormatError` and nothing else. Every walk is bounded by the
message length: a compression pointer must point strictly before the name segment that holds it, so a walk
can neither loop nor go forwards.

Names are returned as text: lower case (ASCII only, as DNS compares), no trailing dot, "." for the root, and
every byte other than [a-z0-9-_*] escaped zone-file style (`\\DDD`). The escaping matters for policy: a label
that contains a dot ("allowed.test" as a single label) must never read like two labels of an allowed name.
"""

from __future__ import annotations

import struct

from . import TYPE_CHECKING, NamedTuple  # typing.NamedTuple for type checkers; see the package docstring

if TYPE_CHECKING:
    import socket
else:
    from . import sockets as socket  # `socket` itself would import enum

TYPE_A, TYPE_NS, TYPE_CNAME, TYPE_SOA, TYPE_AAAA, TYPE_OPT = 1, 2, 5, 6, 28, 41
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

QR, OPCODE, TC, RD, RA = 0x8000, 0x7800, 0x0200, 0x0100, 0x0080
RCODE_MASK = 0x000F

# What we advertise upstream and to EDNS clients: the DNS flag day 2020 size, which needs no IP fragmentation.
EDNS_SIZE = 1232
MAX_NAME = 255  # wire octets, length bytes and the root's zero included (RFC 1035 2.3.4)
MAX_LABEL = 63
# Pointers followed within one name. Encoders emit one per name (and the suffix it lands on perhaps one more);
# the bound keeps a crafted 64 KB message of pointers to pointers from costing quadratic time.
MAX_POINTERS = 32
# Records a query may carry (OPT, perhaps a TSIG or a cookie-bearing OPT): more is no query of a stub's.
MAX_QUERY_RECORDS = 8

TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
              35: "NAPTR", 41: "OPT", 43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS",
              251: "IXFR", 252: "AXFR", 255: "ANY", 257: "CAA"}
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

_HEADER = struct.Struct("!6H")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_TTL = struct.Struct("!I")
_QTAIL = struct.Struct("!HH")
_OPT_RR = b"\0" + _RR.pack(TYPE_OPT, EDNS_SIZE, 0, 0)  # root owner, our payload size, no flags, no options

_SAFE = b"abcdefghijklmnopqrstuvwxyz0123456789-_*"
_SAFE_SET = frozenset(_SAFE)


def type_name(code: int) -> str:
    return TYPE_NAMES.get(code, f"TYPE{code}")


def rcode_name(code: int) -> str:
    return RCODE_NAMES.get(code, f"RCODE{code}")


class DnsFormatError(ValueError):
    """A message we cannot use. `qid` is set when its header was a usable query header: it then deserves an
    error answer (`rcode`, FORMERR or NOTIMP); otherwise the right answer is silence."""

    def __init__(self, problem: str, qid: int | None = None, flags: int = 0, rcode: int = FORMERR) -> None:
        super().__init__(problem)
        self.qid = qid
        self.flags = flags
        self.rcode = rcode

    def reply(self) -> bytes | None:
        """The header-only error answer, or None to stay silent."""
        if self.qid is None:
            return None
        return _HEADER.pack(self.qid, QR | (self.flags & (OPCODE | RD)) | RA | self.rcode, 0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------- names


def _escape(label: bytes) -> str:
    return "".join(chr(b) if b in _SAFE_SET else f"\\{b:03d}" for b in label)


def _text(labels: list[bytes]) -> str:
    if not labels:
        return "."
    joined = b".".join(labels).lower()
    # Fast path: delete the safe bytes; if only the separators are left, the name needs no escaping.
    if len(joined.translate(None, _SAFE)) == len(labels) - 1:
        return joined.decode("ascii")
    return ".".join(_escape(lb.lower()) for lb in labels)


def read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """The (possibly compressed) name at `pos` as text, and the position just after it in the message."""
    size = len(msg)
    labels: list[bytes] = []
    octets = 1  # the root's zero byte
    end = -1
    segment = pos  # a pointer must land strictly before the segment that holds it: no loops, no forward jumps
    jumps = 0
    while True:
        if pos >= size:
            raise DnsFormatError("name runs past the end of the message")
        n = msg[pos]
        if n == 0:
            break
        if n <= MAX_LABEL:
            octets += n + 1
            if octets > MAX_NAME:
                raise DnsFormatError("name longer than 255 octets")
            stop = pos + 1 + n
            if stop > size:
                raise DnsFormatError("label runs past the end of the message")
            labels.append(msg[pos + 1:stop])
            pos = stop
        elif n >= 0xC0:
            if pos + 1 >= size:
                raise DnsFormatError("compression pointer runs past the end of the message")
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if not 12 <= target < segment:
                raise DnsFormatError("compression pointer that loops or points forwards")
            jumps += 1
            if jumps > MAX_POINTERS:
                raise DnsFormatError("too many compression pointers in one name")
            if end < 0:
                end = pos + 2
            pos = segment = target
        else:
            raise DnsFormatError("label longer than 63 octets or of a reserved type")
    return _text(labels), (end if end >= 0 else pos + 1)


def _plain_name_end(msg: bytes, pos: int, qid: int, flags: int) -> tuple[list[bytes], int]:
    """An uncompressed name (a question's: nothing precedes it that a pointer could refer to)."""
    size = len(msg)
    labels: list[bytes] = []
    while True:
        if pos >= size:
            raise DnsFormatError("question runs past the end of the message", qid, flags)
        n = msg[pos]
        if n == 0:
            pos += 1
            break
        if n > MAX_LABEL:
            raise DnsFormatError("compressed, reserved or over-long label in the question", qid, flags)
        stop = pos + 1 + n
        if stop > size:
            raise DnsFormatError("label runs past the end of the message", qid, flags)
        labels.append(msg[pos + 1:stop])
        pos = stop
    if pos - 12 > MAX_NAME:
        raise DnsFormatError("name longer than 255 octets", qid, flags)
    return labels, pos


def _skip_record(msg: bytes, pos: int) -> tuple[int, int, int, int, int]:
    """Walk one resource record: (type, class, ttl offset, rdata start, rdata end)."""
    _owner, pos = read_name(msg, pos)
    if pos + 10 > len(msg):
        raise DnsFormatError("record header runs past the end of the message")
    rtype, rclass, _ttl, rdlen = _RR.unpack_from(msg, pos)
    start = pos + 10
    if start + rdlen > len(msg):
        raise DnsFormatError("record data runs past the end of the message")
    return rtype, rclass, pos + 4, start, start + rdlen


# ---------------------------------------------------------------------------------------------- queries


class Query(NamedTuple):
    """One client question. A NamedTuple: it is built for every packet, and tuples are the cheapest objects."""

    id: int
    flags: int
    name: str  # see the module docstring
    qtype: int
    qclass: int
    question: bytes  # the question section as received (the client's letter case, echoed back to it)
    wire: bytes  # the same with the name lower-cased: what we ask upstream
    edns: int | None  # the client's UDP payload size (at least 512), None when it sent no OPT


def parse_query(msg: bytes) -> Query:
    if len(msg) < 12:
        raise DnsFormatError("shorter than a DNS header")
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(msg)
    if flags & QR:
        raise DnsFormatError("a response, not a query")  # answering it could start a loop between two servers
    if flags & OPCODE:
        raise DnsFormatError("opcode not supported", qid, flags, NOTIMP)
    if qd != 1:
        raise DnsFormatError("not exactly one question", qid, flags)
    labels, pos = _plain_name_end(msg, 12, qid, flags)
    if pos + 4 > len(msg):
        raise DnsFormatError("question runs past the end of the message", qid, flags)
    qtype, qclass = _QTAIL.unpack_from(msg, pos)
    name_end = pos
    pos += 4
    if an + ns + ar > MAX_QUERY_RECORDS or (an + ns + ar) * 11 > len(msg) - pos:
        raise DnsFormatError("more records than a query has, or than the message holds", qid, flags)
    edns: int | None = None
    try:
        for i in range(an + ns + ar):
            rtype, rclass, _ttl_at, _start, pos = _skip_record(msg, pos)
            if rtype == TYPE_OPT and i >= an + ns:
                if edns is not None:
                    raise DnsFormatError("more than one OPT record")
                edns = max(512, rclass)
        if pos != len(msg):
            raise DnsFormatError("trailing bytes after the last record")
    except DnsFormatError as e:
        raise DnsFormatError(str(e), qid, flags) from None
    question = msg[12:name_end + 4]
    # lower-case the name only: the type and class bytes after it may well look like ASCII letters
    wire = msg[12:name_end].lower() + msg[name_end:name_end + 4]
    return Query(qid, flags, _text(labels), qtype, qclass, question, wire, edns)


def make_query(qid: int, wire: bytes) -> bytes:
    """What we send upstream: recursion desired, one question, EDNS so that answers up to 1232 bytes fit UDP."""
    return _HEADER.pack(qid, RD, 1, 0, 0, 1) + wire + _OPT_RR


def error_reply(query: Query, rcode: int) -> bytes:
    """NXDOMAIN / REFUSED / SERVFAIL / ... for `query`, echoing its question."""
    opt = query.edns is not None
    header = _HEADER.pack(query.id, QR | (query.flags & RD) | RA | rcode, 1, 0, 0, 1 if opt else 0)
    return header + query.question + (_OPT_RR if opt else b"")


def truncated_reply(query: Query) -> bytes:
    """An empty answer with TC set: the client asks again over TCP."""
    opt = query.edns is not None
    header = _HEADER.pack(query.id, QR | TC | (query.flags & RD) | RA, 1, 0, 0, 1 if opt else 0)
    return header + query.question + (_OPT_RR if opt else b"")


# ---------------------------------------------------------------------------------------------- responses


class Record(NamedTuple):
    owner: str
    rtype: int
    rclass: int
    ttl: int
    data: str | bytes  # A/AAAA: the address as text; CNAME: the target name; anything else: the raw rdata


class Response(NamedTuple):
    """A parsed upstream response, kept whole so that a cached copy can be served again by `rewrite`.
    (NamedTuples, not dataclasses, throughout: `dataclasses` alone takes 10 ms to import.)"""

    raw: bytes
    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    wire: bytes  # the question section, name lower-cased
    answers: tuple[Record, ...]
    authority: tuple[Record, ...]
    counts: tuple[int, int, int]  # answer, authority and kept additional records
    cut: int  # raw[:cut] is what rewrite() keeps: everything before the OPT record
    ttl_offsets: tuple[tuple[int, int], ...]  # (offset, ttl) of every kept record's TTL field
    negative_ttl: int | None  # min(SOA TTL, SOA minimum) when the authority section has a SOA (RFC 2308)

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TC)


def _ttl(value: int) -> int:
    return 0 if value & 0x80000000 else value  # RFC 2181 8: a TTL with the top bit set means zero


def _rdata(msg: bytes, rtype: int, rclass: int, start: int, end: int) -> str | bytes:
    if rclass == CLASS_IN and rtype == TYPE_A:
        if end - start != 4:
            raise DnsFormatError("A record that is not 4 bytes")
        return socket.inet_ntop(socket.AF_INET, msg[start:end])
    if rclass == CLASS_IN and rtype == TYPE_AAAA:
        if end - start != 16:
            raise DnsFormatError("AAAA record that is not 16 bytes")
        return socket.inet_ntop(socket.AF_INET6, msg[start:end])
    if rtype == TYPE_CNAME:
        target, stop = read_name(msg, start)
        if stop != end:
            raise DnsFormatError("CNAME data longer or shorter than its name")
        return target
    if rtype == TYPE_SOA:
        _mname, pos = read_name(msg, start)
        _rname, pos = read_name(msg, pos)
        if pos + 20 != end:
            raise DnsFormatError("SOA data of the wrong length")
    return msg[start:end]


def parse_response(msg: bytes) -> Response:
    if len(msg) < 12:
        raise DnsFormatError("shorter than a DNS header")
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(msg)
    if not flags & QR:
        raise DnsFormatError("a query, not a response")
    if qd != 1:
        raise DnsFormatError("not exactly one question")
    labels, pos = _plain_name_end(msg, 12, qid, flags)
    if pos + 4 > len(msg):
        raise DnsFormatError("question runs past the end of the message")
    qtype, qclass = _QTAIL.unpack_from(msg, pos)
    wire = msg[12:pos].lower() + msg[pos:pos + 4]
    pos += 4
    # Each record takes at least 11 bytes: a cheap bound before walking counts that cannot be real.
    if (an + ns + ar) * 11 > len(msg) - pos:
        raise DnsFormatError("record counts larger than the message")
    sections: tuple[list[Record], list[Record]] = ([], [])
    offsets: list[tuple[int, int]] = []
    negative: int | None = None
    cut, kept = -1, 0
    for i in range(an + ns + ar):
        start_rr = pos
        owner, at = read_name(msg, pos)
        if at + 10 > len(msg):
            raise DnsFormatError("record header runs past the end of the message")
        rtype, rclass, ttl, rdlen = _RR.unpack_from(msg, at)
        start, end = at + 10, at + 10 + rdlen
        if end > len(msg):
            raise DnsFormatError("record data runs past the end of the message")
        pos = end
        if i >= an + ns:  # additional: kept opaque; the OPT record and anything after it are not kept
            if rtype == TYPE_OPT and cut < 0:
                cut = start_rr
            elif cut < 0:
                offsets.append((at + 4, _ttl(ttl)))
                kept += 1
            continue
        ttl = _ttl(ttl)
        rec = Record(owner, rtype, rclass, ttl, _rdata(msg, rtype, rclass, start, end))
        sections[0 if i < an else 1].append(rec)
        offsets.append((at + 4, ttl))
        if rtype == TYPE_SOA and i >= an:
            minimum = _TTL.unpack_from(msg, end - 4)[0]
            soa_ttl = min(ttl, _ttl(minimum))
            negative = soa_ttl if negative is None else min(negative, soa_ttl)
    if pos != len(msg):
        raise DnsFormatError("trailing bytes after the last record")
    return Response(msg, qid, flags, _text(labels), qtype, qclass, wire, tuple(sections[0]), tuple(sections[1]),
                    (an, ns, kept), cut if cut >= 0 else len(msg), tuple(offsets), negative)


def rewrite(resp: Response, query: Query, elapsed: int, ttl_cap: int, limit: int) -> bytes:
    """`resp` as the answer to `query`: its id and question (in the client's letter case), every TTL capped at
    `ttl_cap` and aged by `elapsed` seconds, the upstream's OPT replaced by ours when the client spoke EDNS.
    Over `limit` bytes: an empty answer with TC set instead."""
    buf = bytearray(resp.raw[:resp.cut])
    an, ns, kept = resp.counts
    opt = query.edns is not None
    flags = QR | (query.flags & RD) | RA | (resp.flags & RCODE_MASK)
    _HEADER.pack_into(buf, 0, query.id, flags, 1, an, ns, kept + (1 if opt else 0))
    # same length: the upstream's question is ours, which is the client's lower-cased
    buf[12:12 + len(query.question)] = query.question
    pack = _TTL.pack_into
    for offset, ttl in resp.ttl_offsets:
        left = (ttl if ttl < ttl_cap else ttl_cap) - elapsed
        pack(buf, offset, left if left > 0 else 0)
    if opt:
        buf += _OPT_RR
    if len(buf) > limit:
        return truncated_reply(query)
    return bytes(buf)


MAX_CHAIN = 16  # CNAME hops followed; real chains are a handful long


def follow_chain(name: str, answers: tuple[Record, ...]) -> tuple[tuple[str, ...], tuple[Record, ...]]:
    """The CNAME chain from `name` through `answers` (`name` first) and the IN A/AAAA records owned by its
    names. Records of other owners (an upstream's unrelated extras) are not part of the answer to `name`."""
    cnames: dict[str, str] = {}
    for rec in answers:
        if rec.rtype == TYPE_CNAME and rec.owner not in cnames:
            cnames[rec.owner] = str(rec.data)
    chain = [name]
    current = name
    while current in cnames and len(chain) <= MAX_CHAIN:
        current = cnames[current]
        if current in chain:
            break
        chain.append(current)
    owners = set(chain)
    addresses = tuple(r for r in answers if r.rtype in (TYPE_A, TYPE_AAAA) and r.rclass == CLASS_IN
                      and r.owner in owners)
    return tuple(chain), addresses
