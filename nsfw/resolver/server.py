"""The sandbox's policy resolver: answer DNS on already-bound sockets, granting addresses before they leave.

One thread runs one epoll loop (`poller`) over the UDP and TCP listening sockets, the TCP clients and the
upstream questions in flight. Each turn of the loop reads what is ready (at most `udp_burst` datagrams per socket),
decides every query, then flushes the turn's answers as one batch: first those that hand out no address
or only addresses already granted long enough, then one `grant` call for all the addresses the others hand
out (each once), then those, then the log lines. Batching is what keeps a slow `grant` (an IPC round trip to
the keeper's granter and a netlink transaction) from capping the query rate: under load the batches grow
instead of the queue. No answer that hands out an address leaves before `grant` has returned for it, in
this turn or an earlier one; when it raises, those answers become SERVFAIL (fail closed: never hand out an
address the kernel would refuse). The resolver remembers until when each (set, address) the granter
confirmed lives (at least `timeout`, or `Limits.min_grant` if longer, from before the call), and asks again
only when an answer needs it to live longer than that, less a second: the granter's own test, so a cached
answer mostly costs no round trip at all. Hot paths are memoized: a UDP packet answered before (but for
its id) is answered again by the listener as it is read, with the same reply, for as long as that reply
holds (to the next second of the cache entry's age, while its grants hold, forever for a name the policy
refuses; never while a denied name is being learned) and logged as any answer; a packet seen before skips
parsing and policy; a cached answer keeps its last rewritten reply and grants for the second they hold.
Queries that come one at a time are read one a turn (`clients.LONE_TURNS`), so the turn ends sooner.

Per query: the policy decides by name (any type). "refuse" and "deny" answer NXDOMAIN at once without asking
upstream (with `learn_denied`, a denied name is still resolved, in the background of the loop, and its
addresses granted to the set named "deny"). "allow" and "unlisted" are answered from the cache or upstream;
a CNAME chain that passes through a denied name makes the whole answer NXDOMAIN. For "allow", every A/AAAA of
the chain goes to each of the decision's sets with timeout = max(remaining TTL, 1) + 5 seconds, also when
served from the cache (unless already granted as long, as above), except the addresses `never_grant` refuses
(DNS rebinding: the answer still goes out, the kernel blocks them). Identical questions in flight share one
upstream question.

Bounds, so that a flood or garbage costs at most CPU: the kernel's socket buffers are the only queue; at most
`max_inflight` upstream questions and `max_waiters` clients per question (the excess is dropped, as an
overloaded server does, and clients retry); at most `tcp_clients` TCP connections (the least recently active
is closed to make room), each idle for at most `tcp_idle` seconds, with at most `tcp_pending` queries being
answered and `tcp_outbuf` bytes unsent; the cache is an LRU of `cache_entries` and `cache_bytes`; cancelled
upstream timers are compacted away. Malformed packets are dropped (no usable header) or answered FORMERR (a
usable header), and never reach the policy.

Query log: one JSON object per line, {"time": unix float, "name": str, "type": "A", "verdict":
"allow|deny|unlisted|refuse", "rcode": "NOERROR|NXDOMAIN|SERVFAIL|...", "answers": [addresses], "cached": bool},
plus "chain": [names] when a CNAME chain was followed. Bounded at `log_max_bytes` (10 MB): `querylog` says how.

Here: the loop, one query's way through it, and the batch. The cache (`cache`), the query log's file
(`querylog`) and the sockets' side, UDP peers and TCP connections (`clients`), are modules of their own.
"""

from __future__ import annotations

import contextlib
import heapq
import sys
import time
from collections.abc import Callable, Sequence

from . import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import socket
else:
    from . import sockets as socket  # `socket` itself would import enum
from .cache import GRANT_SLACK, Grant, IPAddress, _Answer, _Cache
from .clients import _TcpClient, _TcpListener, _UdpDest, _UdpListener
from .dnsmsg import (
    CLASS_IN,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    TC,
    TYPE_OPT,
    DnsFormatError,
    Query,
    Response,
    error_reply,
    parse_query,
    rcode_name,
    type_name,
)
from .policy import Decision, Policy
from .poller import NOT_IN, NOT_OUT, READ, WRITE, Poller
from .querylog import _json_str, _QueryLog
from .upstream import TIMEOUT, Exchange, Timer, run_timers
from .upstream import upstreams as socket_addresses

if TYPE_CHECKING:
    import threading
    from typing import BinaryIO

__all__ = ["DENY_SET", "GRANT_SLACK", "Grant", "IPAddress", "Limits", "serve"]

DENY_SET = "deny"  # the set name learned addresses of denied names go to; the supervisor maps it
_META_TYPES = {251: NOTIMP, 252: NOTIMP, TYPE_OPT: REFUSED}  # IXFR, AXFR: not for a stub; OPT: not a question


class Limits(NamedTuple):
    upstream_timeout: float = TIMEOUT
    cache_entries: int = 10000
    cache_bytes: int = 16 << 20
    ttl_cap: int = 86400  # a day: longer TTLs are served (and granted) as a day
    negative_ttl_cap: int = 300
    max_inflight: int = 256
    max_waiters: int = 64
    udp_burst: int = 128
    tcp_clients: int = 64
    tcp_idle: float = 10.0
    tcp_pending: int = 16
    tcp_outbuf: int = 256 * 1024
    log_max_bytes: int = 10 << 20
    grant_batch: int = 512  # grants per call at most (unless one answer alone has more): ~30 KB as JSON
    min_grant: int = 0  # the granter's floor on every timeout (dns.MIN_GRANT): what a grant it confirmed lasts


# ---------------------------------------------------------------------------------------------- the resolver


class _Out:
    """One answer of the turn's batch. dest None: a learn-only item (grants, no reply, no log). `until`: how
    long the same reply (but for the id) answers the same packet, as far as the cache and policy go (0: not
    at all); `again_cached`: what the log says of "cached" then."""

    __slots__ = ("again_cached", "answers", "cached", "chain", "dest", "failed", "grants", "query", "rcode", "reply",
                 "until", "verdict")

    def __init__(self, dest: _UdpDest | _TcpClient | None, query: Query, reply: bytes, grants: list[Grant],
                 verdict: str, rcode: int, answers: Sequence[str] = (), cached: bool = False,
                 chain: Sequence[str] = ()) -> None:
        self.dest = dest
        self.query = query
        self.reply = reply
        self.grants = grants
        self.verdict = verdict
        self.rcode = rcode
        self.answers = answers
        self.cached = cached
        self.chain = chain
        self.failed = False
        self.until = 0.0
        self.again_cached = False

    def log_tail(self, cached: bool) -> str:
        """The log line but for its start, `{"time": ...`: what a memoized answer logs again as it is."""
        q = self.query
        answers = ", ".join(_json_str(a) for a in self.answers)
        chain = f', "chain": [{", ".join(_json_str(c) for c in self.chain)}]' if len(self.chain) > 1 else ""
        return (f'"name": {_json_str(q.name)}, "type": "{type_name(q.qtype)}", '
                f'"verdict": "{self.verdict}", "rcode": "{rcode_name(self.rcode)}", "answers": [{answers}], '
                f'"cached": {"true" if cached else "false"}{chain}}}\n')


class _Pending:
    __slots__ = ("exchange", "key", "waiters")

    def __init__(self, key: tuple[str, int, int]) -> None:
        self.key = key
        self.waiters: list[tuple[Query, _UdpDest | _TcpClient | None, Decision]] = []
        self.exchange: Exchange | None = None


_LEARN = Decision("deny")
_DENY_SETS = (DENY_SET,)
_PARSED_MEMO = 1024
_FOREVER = float("inf")


class _Resolver:
    def __init__(self, udp: Sequence[socket.socket], tcp: Sequence[socket.socket], policy: Policy,
                 upstreams: Sequence[str], grant: Callable[[Sequence[Grant]], None], log: BinaryIO | None,
                 learn_denied: bool, never_grant: Callable[[IPAddress], bool], limits: Limits) -> None:
        self.policy = policy
        self.servers = socket_addresses(upstreams)
        if not self.servers:
            raise ValueError(f"no usable upstream resolver among {list(upstreams)}")
        self.grant = grant
        self.log = _QueryLog(log, limits.log_max_bytes)
        self.learn_denied = learn_denied
        self.never_grant = never_grant
        self.limits = limits
        self.sel = Poller()
        self.cache = _Cache(limits.cache_entries, limits.cache_bytes)
        self.pending: dict[tuple[str, int, int], _Pending] = {}
        self.parsed: dict[bytes, tuple[Query, Decision]] = {}
        # A UDP packet (but for its id) -> the tail of its reply, until when it holds (cache, policy and the
        # grants it needs all alike), and its log line's tail: the listener answers a hit at once, as it reads
        # it. Filled by `flush` from answers that went out; bounded as `parsed`.
        self.fast: dict[bytes, tuple[bytes, float, bytes]] = {}
        self.fast_log: list[bytes] = []
        self.timers: list[Timer] = []
        # (set, address) -> until when (monotonic) the granter has confirmed the element lives, at least
        self.confirmed: dict[tuple[str, str], float] = {}
        self.confirmed_limit = 4096
        self.clients: dict[_TcpClient, None] = {}
        self.out: list[_Out] = []
        self.now = time.monotonic()
        self.errors = 0
        self.listeners: list[socket.socket] = []
        for sock in udp:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # room for a burst while the loop grants; as nobody: up to rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sel.register(sock, READ, _UdpListener(self, sock))
            self.listeners.append(sock)
        for sock in tcp:
            sock.setblocking(False)
            self.sel.register(sock, READ, _TcpListener(self, sock))
            self.listeners.append(sock)

    # -- the loop

    def run(self, stop: threading.Event | None) -> None:
        # Every turn is on a cached answer's path: locals, and nothing done that the turn does not need.
        poll = self.sel.epoll.poll
        handlers = self.sel.handlers
        timers = self.timers
        monotonic = time.monotonic
        sweep = self.now + 1.0
        try:
            while stop is None or not stop.is_set():
                if self.out:  # answers queued while the last batch was sent (TCP queries held back)
                    wait = 0.0
                else:
                    now = monotonic()
                    wait = sweep - now
                    if timers and timers[0].deadline - now < wait:
                        wait = timers[0].deadline - now
                    if stop is not None and wait > 0.25:
                        wait = 0.25
                    if wait < 0.0:
                        wait = 0.0
                events = poll(wait)
                self.now = now = monotonic()
                for fd, ev in events:
                    handler = handlers.get(fd)
                    if handler is None:
                        continue  # closed by an earlier event of this turn
                    try:
                        handler.on_event((READ if ev & NOT_OUT else 0) | (WRITE if ev & NOT_IN else 0), now)
                    except Exception as e:  # one bad packet or client must never stop the resolver
                        self._error(e)
                if timers and timers[0].deadline <= now:
                    try:
                        run_timers(timers, now)
                    except Exception as e:
                        self._error(e)
                if self.out:
                    self.flush()
                elif self.fast_log:  # memoized answers only: they went out already, the log lines are left
                    self._log_fast()
                if now >= sweep:
                    sweep = now + 1.0
                    self._sweep(now)
        finally:
            self._shutdown()

    def _error(self, e: Exception) -> None:
        self.errors += 1
        if self.errors == 1:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        elif self.errors <= 20:  # enough to diagnose, not enough to fill a disk
            print(f"nsfw resolver: {type(e).__name__}: {e}", file=sys.stderr)

    def _sweep(self, now: float) -> None:
        idle = [c for c in self.clients if c.pending == 0 and now - c.last > self.limits.tcp_idle]
        for client in idle:
            client.close()
        if len(self.timers) > 4 * len(self.pending) + 1024:  # mostly cancelled: drop those now
            self.timers[:] = [t for t in self.timers if t.exchange is not None]
            heapq.heapify(self.timers)
        if len(self.confirmed) > self.confirmed_limit:  # amortized: a pass only once the map has doubled
            self.confirmed = {k: until for k, until in self.confirmed.items() if until > now}
            self.confirmed_limit = max(4096, 2 * len(self.confirmed))

    def _shutdown(self) -> None:
        for p in list(self.pending.values()):
            if p.exchange is not None:
                p.exchange.close()
        self.pending.clear()
        for client in list(self.clients):
            client.close()
        for sock in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
        self.sel.close()

    # -- one query

    def handle(self, data: bytes, dest: _UdpDest | _TcpClient) -> None:
        # A client asks the same few questions over and over, in byte-identical packets but for the id:
        # parsing and deciding are done once per distinct packet (a bounded memo, dropped whole when full).
        seen = self.parsed.get(data[2:])
        if seen is not None:
            q = seen[0]._replace(id=int.from_bytes(data[:2], "big"))
            decision = seen[1]
        else:
            try:
                q = parse_query(data)
            except DnsFormatError as e:
                reply = e.reply()
                if reply is None:
                    dest.release()
                else:
                    dest.send(reply)  # no question we could act on: not logged, nothing granted
                return
            if q.qclass != CLASS_IN or q.qtype in _META_TYPES:
                rcode = _META_TYPES.get(q.qtype, REFUSED)
                self.out.append(_Out(dest, q, error_reply(q, rcode), [], "refuse", rcode))
                return
            decision = self.policy.decide(q.name)
            if len(data) <= 512:  # a stub's question; anything bigger is not worth the memory
                if len(self.parsed) >= _PARSED_MEMO:
                    self.parsed.clear()
                self.parsed[data[2:]] = (q, decision)
        verdict = decision.verdict
        if verdict == "refuse" or verdict == "deny":
            o = _Out(dest, q, error_reply(q, NXDOMAIN), [], verdict, NXDOMAIN)
            self.out.append(o)
            if verdict == "deny" and self.learn_denied:
                self._lookup(q, None, _LEARN)  # each time: so never memoized
            else:
                o.until = _FOREVER  # the policy never changes
            return
        self._lookup(q, dest, decision)

    def _lookup(self, q: Query, dest: _UdpDest | _TcpClient | None, decision: Decision) -> None:
        key = (q.name, q.qtype, q.qclass)
        entry = self.cache.get(key, self.now)
        if entry is not None:
            self._answer(q, dest, decision, entry, True)
            return
        pending = self.pending.get(key)
        if pending is None:
            if len(self.pending) >= self.limits.max_inflight:
                if dest is not None:
                    dest.release()  # overloaded: drop, as a busy server does; the client retries
                return
            pending = _Pending(key)
            pending.waiters.append((q, dest, decision))
            self.pending[key] = pending
            exchange = Exchange(self.sel, self.timers, q.wire, self.servers,
                                lambda _ex, response: self._resolved(pending, response),
                                timeout=self.limits.upstream_timeout)
            pending.exchange = exchange
            exchange.start(self.now)
            return
        if len(pending.waiters) >= self.limits.max_waiters:
            if dest is not None:
                dest.release()
            return
        pending.waiters.append((q, dest, decision))

    def _resolved(self, pending: _Pending, response: Response | None) -> None:
        self.pending.pop(pending.key, None)
        if response is None:
            for q, dest, _decision in pending.waiters:
                if dest is not None:
                    self.out.append(_Out(dest, q, error_reply(q, SERVFAIL), [], _decision.verdict, SERVFAIL))
            return
        entry = _Answer(response, self.now, self.policy, self.limits)
        if entry.expires > self.now:
            self.cache.put(pending.key, entry)
        for q, dest, decision in pending.waiters:
            self._answer(q, dest, decision, entry, False)

    def _answer(self, q: Query, dest: _UdpDest | _TcpClient | None, decision: Decision, entry: _Answer,
                cached: bool) -> None:
        elapsed = int(self.now - entry.stored)
        cap = self.limits.ttl_cap
        if dest is None or entry.denied:
            # learning a denied name (grants only), or a chain through a denied name (NXDOMAIN)
            grants = entry.grants(_DENY_SETS, elapsed, cap, self.never_grant) if self.learn_denied else []
            if dest is None:
                self.out.append(_Out(None, q, b"", grants, "deny", NOERROR))
            else:
                o = _Out(dest, q, error_reply(q, NXDOMAIN), grants, "deny", NXDOMAIN, (), cached, entry.chain)
                if not self.learn_denied:
                    o.until, o.again_cached = _until(entry, elapsed), True
                self.out.append(o)
            return
        reply = entry.reply(q, elapsed, cap, dest.limit(q))
        grants = []
        if decision.verdict == "allow" and not reply[2] & (TC >> 8):  # a TC reply hands out nothing
            grants = entry.grants(decision.allow_sets, elapsed, cap, self.never_grant)
        o = _Out(dest, q, reply, grants, decision.verdict, entry.response.rcode, entry.texts, cached, entry.chain)
        o.until, o.again_cached = _until(entry, elapsed), True
        self.out.append(o)

    # -- the batch

    def flush(self) -> None:
        """Send the turn's answers: at once those that hand out no address (NXDOMAIN for a denied name too,
        whatever learning it grants) or only addresses the granter has confirmed lately enough; then grant
        every address the others hand out, each (set, address) once, in as few calls as `grant_batch` allows,
        and send those; memoize what went out for the listener; then log them all."""
        out, self.out = self.out, []
        if not out:
            if self.fast_log:
                self._log_fast()
            return
        held: list[tuple[_UdpDest | _TcpClient, _Out]] = []
        asking: list[tuple[_Out, list[Grant]]] = []
        for o in out:
            needed = self._ungranted(o.grants) if o.grants else o.grants
            if needed:
                asking.append((o, needed))
            if o.dest is None:
                continue  # learn-only: grants, nothing to send
            if needed and o.verdict != "deny":
                held.append((o.dest, o))
            else:
                o.dest.send(o.reply)
        if asking:
            failed = self._grant_all(_merge([g for _o, needed in asking for g in needed]))
            if failed:
                for o, needed in asking:
                    o.failed = any((g.set_name, g.address) in failed for g in needed)
        for dest, o in held:
            if o.failed:  # fail closed: never hand out an address the kernel would not let through
                o.reply = error_reply(o.query, SERVFAIL)
                o.rcode = SERVFAIL
                o.answers = ()
            dest.send(o.reply)
        self._memoize(out)
        self._log(out)

    def _memoize(self, out: list[_Out]) -> None:
        """Remember the UDP answers that went out, for as long as the same packet gets the same reply: as the
        cache and policy say (`_Out.until`), and while every address it hands out stays granted long enough."""
        fast = self.fast
        now = self.now
        confirmed = self.confirmed
        floor = self.limits.min_grant
        for o in out:
            if o.until <= now or o.failed:
                continue
            dest = o.dest
            if type(dest) is not _UdpDest or dest.key is None:
                continue
            until = o.until
            for g in o.grants:  # held from then on, by `_ungranted`'s test, until that test would ask again
                held = confirmed.get((g.set_name, g.address), 0.0) + 1 - (g.timeout if g.timeout > floor else floor)
                if held < until:
                    until = held
            if until > now:
                if len(fast) >= _PARSED_MEMO:
                    fast.clear()
                fast[dest.key] = (o.reply[2:], until, o.log_tail(o.again_cached).encode())

    def _log_fast(self) -> None:
        tails, self.fast_log = self.fast_log, []
        if self.log.f is not None:
            head = b'{"time": %.6f, ' % time.time()
            self.log.write(head + tails[0] if len(tails) == 1 else head.join([b"", *tails]))

    def _log(self, out: list[_Out]) -> None:
        tails, self.fast_log = self.fast_log, []
        if self.log.f is not None:
            tails += [o.log_tail(o.cached).encode() for o in out if o.dest is not None]
            if tails:
                head = b'{"time": %.6f, ' % time.time()
                self.log.write(head.join([b"", *tails]))  # every line: head + tail

    def _ungranted(self, grants: list[Grant]) -> list[Grant]:
        """The grants the kernel may not hold as long as asked: all but those the granter confirmed lately
        enough, by the granter's own test (same floor, same second of slack). A cached answer's grants are
        mostly held already, and skipping them keeps it free of a round trip to the granter."""
        confirmed = self.confirmed
        floor = self.limits.min_grant
        soon = self.now - 1
        return [g for g in grants
                if confirmed.get((g.set_name, g.address), 0.0) < soon + (g.timeout if g.timeout > floor else floor)]

    def _grant_all(self, grants: list[Grant]) -> set[tuple[str, str]]:
        """Grant them all, `grant_batch` at a time (what one call carries stays within what the granter reads
        in one message); the (set, address) pairs whose grant failed. A failing call is split in halves until
        the failures are single grants, so that one bad grant fails only the answers that carry it."""
        failed: set[tuple[str, str]] = set()
        most = max(1, self.limits.grant_batch)
        todo = [grants[i:i + most] for i in range(0, len(grants), most)][::-1]  # a stack, in order
        while todo:
            chunk = todo.pop()
            try:
                self.grant(chunk)
            except Exception:
                if len(chunk) == 1:
                    failed.add((chunk[0].set_name, chunk[0].address))
                else:
                    todo += [chunk[len(chunk) // 2:], chunk[:len(chunk) // 2]]
                continue
            self._confirmed(chunk)
        return failed

    def _confirmed(self, grants: Sequence[Grant]) -> None:
        # counted from the start of the turn, before the granter added them: never later than the kernel does
        confirmed = self.confirmed
        floor = self.limits.min_grant
        now = self.now
        for g in grants:
            key = (g.set_name, g.address)
            until = now + (g.timeout if g.timeout > floor else floor)
            if confirmed.get(key, 0.0) < until:
                confirmed[key] = until


def _until(entry: _Answer, elapsed: int) -> float:
    """Until when an answer from `entry` stays the same: to the next whole second of its age (its TTLs count
    down by one then), and no later than the entry expires."""
    tick = entry.stored + elapsed + 1
    return tick if tick < entry.expires else entry.expires


def _merge(grants: list[Grant]) -> list[Grant]:
    """One grant per (set, address), with the longest timeout asked for."""
    best: dict[tuple[str, str], int] = {}
    for g in grants:
        key = (g.set_name, g.address)
        if best.get(key, -1) < g.timeout:
            best[key] = g.timeout
    if len(best) == len(grants):
        return grants
    return [Grant(s, a, t) for (s, a), t in best.items()]


def serve(udp: Sequence[socket.socket], tcp: Sequence[socket.socket], *, policy: Policy,
          upstreams: Sequence[str], grant: Callable[[Sequence[Grant]], None], log: BinaryIO | None,
          learn_denied: bool, never_grant: Callable[[IPAddress], bool],
          stop: threading.Event | None = None, limits: Limits | None = None) -> None:
    """Serve DNS on the already-bound sockets `udp` and `tcp` (listening) until `stop` is set (forever
    without one). `upstreams` are addresses as `upstream.parse_resolv_conf` returns them (ValueError when
    none is usable). Never returns otherwise: what goes wrong with one packet or client is that one's."""
    _Resolver(udp, tcp, policy, upstreams, grant, log, learn_denied, never_grant, limits or Limits()).run(stop)
