"""The world's DNS: a zone checked and normalised, resolved (wildcards, CNAME chains, NXDOMAIN/NODATA), and
the authoritative answer to one query, which never raises on garbage."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .dnswire import (
    _EDNS_SIZE,
    _FORMERR,
    _NOERROR,
    _NXDOMAIN,
    _REFUSED,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_ANY,
    QTYPE_CNAME,
    QTYPE_OPT,
    QTYPE_SOA,
    _parse_query,
    _Question,
    _rr,
    encode_name,
    type_name,
)
from .layout import DEFAULT_TTL, NEGATIVE_TTL, Record, Zone

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
