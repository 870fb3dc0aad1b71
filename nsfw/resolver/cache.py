"""The resolver's cache: upstream answers, with what every answer from one needs worked out once, in an LRU.

An entry keeps the CNAME chain, whether it passes through a denied name, its addresses and how long it may be
cached; and, for the second they hold, the last reply it was rewritten into and the last grants it handed
out (`Grant`: what the supervisor is asked to let the sandbox reach). Imported by `server`, in every
sandbox's resolver: no `typing` at run time, as in the rest of the package.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable

from . import TYPE_CHECKING, NamedTuple
from .dnsmsg import NOERROR, NXDOMAIN, RD, Query, Response, follow_chain, rewrite

if TYPE_CHECKING:
    from .policy import Policy
    from .server import Limits

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
GRANT_SLACK = 5  # seconds a grant outlives the TTL: the app connects a moment after it has the answer


class Grant(NamedTuple):
    """An address the sandbox may reach for `timeout` seconds, for the rule whose set is `set_name`. The
    supervisor picks the IPv4 or IPv6 set from the address. (A NamedTuple: frozen, and cheap to import.)"""

    set_name: str
    address: str
    timeout: int  # seconds



class _Answer:
    """An upstream response with what every answer from it needs worked out once: the CNAME chain, whether
    the chain is denied, its addresses (text, parsed, TTL), and how long it may be cached.

    A cached answer is mostly served to the same client asking the same question again, within the same
    second: the last rewritten reply and the last grants are kept, keyed by everything they depend on, so a
    hot name costs a dict lookup and an id patch. (So `never_grant` is asked again once a second per name.)"""

    __slots__ = ("addresses", "chain", "denied", "expires", "grant_key", "grant_memo", "reply_key", "reply_memo",
                 "response", "stored", "texts")

    def __init__(self, response: Response, now: float, policy: Policy, limits: Limits) -> None:
        self.response = response
        self.stored = now
        chain, records = follow_chain(response.name, response.answers)
        self.chain = chain
        self.denied = policy.check_chain(chain) == "deny"
        self.addresses = tuple((str(r.data), ipaddress.ip_address(str(r.data)), r.ttl) for r in records)
        self.texts = tuple(a[0] for a in self.addresses)
        self.expires = now + _lifetime(response, limits)
        self.reply_key: tuple[object, ...] | None = None
        self.reply_memo = b""
        self.grant_key: tuple[object, ...] | None = None
        self.grant_memo: list[Grant] = []

    def reply(self, q: Query, elapsed: int, cap: int, limit: int) -> bytes:
        key = (elapsed, q.question, q.flags & RD, q.edns is None, limit)
        if key != self.reply_key:
            self.reply_memo = rewrite(self.response, q, elapsed, cap, limit)
            self.reply_key = key
        return q.id.to_bytes(2, "big") + self.reply_memo[2:]

    def grants(self, sets: tuple[str, ...], elapsed: int, cap: int,
               never_grant: Callable[[IPAddress], bool]) -> list[Grant]:
        """Every address of the chain for each set, timeout = max(remaining TTL, 1) + GRANT_SLACK, except those
        `never_grant` refuses (or fails on: then the kernel blocks them, which is the safe side)."""
        key = (elapsed, sets)
        if key == self.grant_key:
            return self.grant_memo
        grants: list[Grant] = []
        for text, ip, ttl in self.addresses:
            try:
                if never_grant(ip):
                    continue
            except Exception:
                continue
            left = (ttl if ttl < cap else cap) - elapsed
            timeout = (left if left > 1 else 1) + GRANT_SLACK
            grants += [Grant(s, text, timeout) for s in sets]
        self.grant_key, self.grant_memo = key, grants
        return grants


def _lifetime(response: Response, limits: Limits) -> int:
    """Seconds the response may be cached: its smallest answer TTL; for a negative answer (RFC 2308) the
    SOA's, and none without a SOA; 0 (not cached) for a failure."""
    negative = response.negative_ttl
    if response.rcode not in (NOERROR, NXDOMAIN):
        return 0
    if response.rcode == NXDOMAIN or not response.answers:
        return 0 if negative is None else min(negative, limits.negative_ttl_cap)
    ttls = [r.ttl for r in response.answers]
    if negative is not None:
        ttls.append(negative)
    return min(*ttls, limits.ttl_cap)


class _Cache:
    """LRU of answers keyed by (name, type, class), shared by every query of this sandbox; bounded in entries
    and in bytes (answers over TCP may be 64 KB each)."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[tuple[str, int, int], _Answer] = OrderedDict()

    def get(self, key: tuple[str, int, int], now: float) -> _Answer | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self.entries[key]
            self.bytes -= len(entry.response.raw)
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, int, int], entry: _Answer) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old.response.raw)
        self.entries[key] = entry
        self.bytes += len(entry.response.raw)
        while len(self.entries) > self.size or self.bytes > self.max_bytes:
            _key, evicted = self.entries.popitem(last=False)
            self.bytes -= len(evicted.response.raw)
