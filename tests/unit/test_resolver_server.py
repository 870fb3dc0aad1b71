"""nsfw.resolver.server (and .upstream) against a fake upstream on 127.0.0.1, in threads.

Loopback only: nothing here leaves the machine. The fake upstream answers from a zone like the simulated
world's (its DNS code is reused), records every question it gets, and can be told to misbehave.
"""

from __future__ import annotations

import json
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nsfw import world
from nsfw.resolver import dnsmsg, upstream
from nsfw.resolver.policy import Policy
from nsfw.resolver.server import Grant, Limits, serve

LOOP = "127.0.0.1"
ZONE: dict[str, dict[str, Any]] = {
    **world.DEFAULT_ZONE,
    "big.test": {"A": [f"192.0.2.{i}" for i in range(1, 101)]},  # too big for UDP: the upstream sets TC
    "zero.test": {"A": ["192.0.2.99"], "ttl": 0},
    "spoofed.test": {"A": ["192.0.2.12"]},
    "quiet.test": {"A": ["192.0.2.12"]},
}
FAST = Limits(upstream_timeout=0.4)
FLOORED = Limits(upstream_timeout=0.4, min_grant=60)  # as in a sandbox: the granter keeps an address a minute


# ---------------------------------------------------------------------------------------------- the fake upstream


def udp_and_tcp(backlog: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket on one ephemeral loopback port. The port is free for UDP when the kernel
    picks it, not necessarily for TCP (another process may hold it): then try another."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((LOOP, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((LOOP, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(backlog)
        return udp, tcp
    raise RuntimeError("no loopback port free for both UDP and TCP")


class FakeUpstream:
    """UDP and TCP on one loopback port; `spoof` names get forged answers first, `silent` names none."""

    def __init__(self, zone: dict[str, dict[str, Any]] | None = None) -> None:
        self.zone = world.ZoneView(world.normalize_zone(zone or ZONE))
        self.udp, self.tcp = udp_and_tcp(16)
        self.port = self.udp.getsockname()[1]
        self.queries: list[tuple[str, str]] = []  # ("name TYPE", "udp" | "tcp")
        self.spoof: set[str] = set()
        self.silent: set[str] = set()
        self.lock = threading.Lock()
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    @property
    def address(self) -> str:
        return f"{LOOP}#{self.port}"

    def asked(self, qname: str, qtype: str = "A") -> int:
        with self.lock:
            return sum(1 for q, _proto in self.queries if q == f"{qname} {qtype}")

    def _answer(self, data: bytes, proto: str) -> list[bytes]:
        seen: list[str] = []
        reply = world.dns_reply(data, self.zone, udp=proto == "udp", log=seen.append)
        with self.lock:
            self.queries += [(q, proto) for q in seen]
        if reply is None or not seen:
            return [reply] if reply else []
        qname = seen[0].split()[0]
        if qname in self.silent:
            return []
        if qname in self.spoof:
            forged = bytearray(reply)
            forged[-4:] = bytes([6, 6, 6, 6])  # the last A record says 6.6.6.6
            wrong_id = bytes([forged[0] ^ 0xFF]) + bytes(forged[1:])
            wrong_question = world.dns_reply(data.replace(b"spoofed", b"spoofee"), self.zone, udp=True) or b""
            return [wrong_id, wrong_question, b"\xff" * 40, reply]
        return [reply]

    def _serve_udp(self) -> None:
        while True:
            try:
                data, addr = self.udp.recvfrom(65535)
            except OSError:
                return
            for reply in self._answer(data, "udp"):
                self.udp.sendto(reply, addr)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _addr = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_client, args=(conn,), daemon=True).start()

    def _tcp_client(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    data = _read_frame(conn)
                    if data is None:
                        return
                    for reply in self._answer(data, "tcp")[-1:]:
                        conn.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError:
                return

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


def _read_frame(conn: socket.socket, buf: bytearray | None = None) -> bytes | None:
    """One length-prefixed message; pass the same `buf` across calls when several may come in one read."""
    buf = bytearray() if buf is None else buf
    while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    size = int.from_bytes(buf[:2], "big")
    frame = bytes(buf[2:2 + size])
    del buf[:2 + size]
    return frame


# ---------------------------------------------------------------------------------------------- the resolver


class Resolver:
    """serve() in a thread on 127.0.0.1 (UDP and TCP, one ephemeral port), with a recording grant."""

    def __init__(self, upstreams: Sequence[str], policy: Policy, *, learn_denied: bool = False,
                 never_grant: Callable[[Any], bool] = lambda _a: False, limits: Limits = FAST,
                 grant_hook: Callable[[Sequence[Grant]], None] | None = None, log: Any = None) -> None:
        self.udp, self.tcp = udp_and_tcp(64)
        self.port = self.udp.getsockname()[1]
        self.grants: list[list[Grant]] = []
        self.grant_ends: list[float] = []
        self.fail_grants = False
        self.grant_hook = grant_hook
        self.stop = threading.Event()
        self.thread = threading.Thread(target=serve, args=([self.udp], [self.tcp]), kwargs=dict(
            policy=policy, upstreams=list(upstreams), grant=self._grant, log=log, learn_denied=learn_denied,
            never_grant=never_grant, stop=self.stop, limits=limits), daemon=True)
        self.thread.start()

    def _grant(self, grants: Sequence[Grant]) -> None:
        if self.grant_hook is not None:
            self.grant_hook(grants)
        if self.fail_grants:
            raise OSError("nft said no")
        self.grants.append(list(grants))
        self.grant_ends.append(time.monotonic())

    def granted(self) -> list[Grant]:
        return [g for batch in self.grants for g in batch]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.udp.close()
        self.tcp.close()


def query(qname: str | bytes, qtype: int = 1, *, qid: int | None = None, edns: bool = False) -> bytes:
    wire = qname if isinstance(qname, bytes) else world.encode_name(qname)
    qid = random.getrandbits(16) if qid is None else qid
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b""
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 1 if edns else 0) + wire + struct.pack("!HH", qtype, 1) + opt


def ask(port: int, qname: str, qtype: int = 1, *, tcp: bool = False, edns: bool = False,
        timeout: float = 3.0) -> dnsmsg.Response:
    msg = query(qname, qtype, edns=edns)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((LOOP, port))
        if tcp:
            s.sendall(len(msg).to_bytes(2, "big") + msg)
            data = _read_frame(s)
            assert data is not None
        else:
            s.send(msg)
            data = s.recv(65535)
    resp = dnsmsg.parse_response(data)
    assert resp.id == int.from_bytes(msg[:2], "big")
    return resp


def ask_retrying(port: int, qname: str, tries: int = 5) -> dnsmsg.Response:
    for _ in range(tries - 1):
        try:
            return ask(port, qname, timeout=1)
        except TimeoutError:
            continue
    return ask(port, qname, timeout=1)


def addresses(resp: dnsmsg.Response) -> list[str]:
    return [str(r.data) for r in resp.answers if r.rtype in (1, 28)]


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


POLICY = Policy([("*.test", "set_t"), ("allowed.test", "set_a")], ["cdn.test", "*.blocked.test"],
                resolve_unlisted=False)


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    u = FakeUpstream()
    yield u
    u.close()


@pytest.fixture
def make(up: FakeUpstream) -> Iterator[Callable[..., Resolver]]:
    made: list[Resolver] = []

    def factory(policy: Policy = POLICY, upstreams: Sequence[str] | None = None, **kw: Any) -> Resolver:
        r = Resolver([up.address] if upstreams is None else upstreams, policy, **kw)
        made.append(r)
        return r

    yield factory
    for r in made:
        r.close()


# ---------------------------------------------------------------------------------------------- allow and grant


def test_grant_happens_before_the_reply_leaves(make: Callable[..., Resolver]) -> None:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(3)
    early: list[bool] = []

    def hook(_grants: Sequence[Grant]) -> None:
        early.append(bool(select.select([client], [], [], 0)[0]))  # the answer must not be on its way yet
        time.sleep(0.2)

    r = make(grant_hook=hook, limits=FLOORED)
    client.connect((LOOP, r.port))
    for i in range(2):  # from upstream, then from the cache a second later: the minute is renewed
        if i:
            time.sleep(1.1)
        client.send(query("allowed.test"))
        data = client.recv(4096)
        received = time.monotonic()
        assert addresses(dnsmsg.parse_response(data)) == ["192.0.2.10"]
        assert len(r.grant_ends) == i + 1 and received >= r.grant_ends[-1]
    client.close()
    assert early == [False, False]
    assert r.grants[0] == [Grant("set_t", "192.0.2.10", 35), Grant("set_a", "192.0.2.10", 35)]


def test_timeouts_follow_ttls(make: Callable[..., Resolver]) -> None:
    r = make()
    assert addresses(ask(r.port, "short.test")) == ["192.0.2.12"]
    assert addresses(ask(r.port, "zero.test")) == ["192.0.2.99"]
    assert r.granted() == [Grant("set_t", "192.0.2.12", 2 + 5), Grant("set_t", "192.0.2.99", 1 + 5)]


def test_cache_hit_needs_no_grant_while_the_first_one_holds(make: Callable[..., Resolver],
                                                            up: FakeUpstream) -> None:
    r = make()
    first = ask(r.port, "allowed.test")
    time.sleep(1.1)
    second = ask(r.port, "allowed.test")
    assert up.asked("allowed.test") == 1
    assert first.answers[0].ttl == 30 and 28 <= second.answers[0].ttl <= 29
    assert r.grants == [[Grant("set_t", "192.0.2.10", 35), Grant("set_a", "192.0.2.10", 35)]]  # outlives 28+5
    ask(r.port, "zero.test")
    ask(r.port, "zero.test")
    assert up.asked("zero.test") == 2  # TTL 0: never cached
    assert r.granted()[2:] == [Grant("set_t", "192.0.2.99", 6)]  # asked again, but granted 6 s a moment ago


def test_cache_hit_renews_the_floor_with_the_remaining_ttl(make: Callable[..., Resolver]) -> None:
    r = make(limits=FLOORED)
    ask(r.port, "allowed.test")
    ask(r.port, "allowed.test")  # within the second: the minute granted just now still holds
    assert len(r.grants) == 1
    time.sleep(1.1)
    second = ask(r.port, "allowed.test")
    assert len(r.grants) == 2  # a minute from this answer on: longer than the first grant holds
    assert [g.timeout for g in r.grants[1]] == [second.answers[0].ttl + 5] * 2  # the granter applies the floor


def test_a_longer_grant_for_a_held_address_is_asked(make: Callable[..., Resolver]) -> None:
    r = make()
    ask(r.port, "short.test")  # 192.0.2.12 for 2 + 5 s
    ask(r.port, "quiet.test")  # the same address, by a name that keeps it 30 + 5 s
    ask(r.port, "short.test")
    assert r.grants == [[Grant("set_t", "192.0.2.12", 7)], [Grant("set_t", "192.0.2.12", 35)]]


def test_negative_answers_are_cached_by_the_soa(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    r = make()
    for _ in range(3):
        assert ask(r.port, "nothing.test").rcode == dnsmsg.NXDOMAIN
        assert ask(r.port, "cdn.test", 16).rcode == dnsmsg.NXDOMAIN  # denied: never asked anyway
    assert up.asked("nothing.test") == 1
    assert r.grants == []


def test_cname_chain_is_followed_and_every_address_granted(make: Callable[..., Resolver]) -> None:
    r = make()
    resp = ask(r.port, "chain.test", 28)
    assert [x.owner for x in resp.answers] == ["chain.test", "c1.chain.test", "c2.chain.test"]
    assert r.granted() == [Grant("set_t", "2001:db8::20", 35)]
    assert sorted(addresses(ask(r.port, "multi.test"))) == ["192.0.2.10", "198.51.100.20"]
    assert {g.address for g in r.grants[-1]} == {"192.0.2.10", "198.51.100.20"}
    assert addresses(ask(r.port, "deep.down.wild.test")) == ["192.0.2.11"]


def test_truncated_upstream_answer_is_asked_again_over_tcp(make: Callable[..., Resolver],
                                                           up: FakeUpstream) -> None:
    r = make()
    over_udp = ask(r.port, "big.test")
    assert over_udp.truncated and over_udp.answers == ()  # too big for the client's 512 bytes
    assert r.grants == []  # a TC reply hands out nothing
    over_tcp = ask(r.port, "big.test", tcp=True)
    assert len(addresses(over_tcp)) == 100 and not over_tcp.truncated
    assert len(r.granted()) == 100
    with up.lock:
        protos = [p for q, p in up.queries if q == "big.test A"]
    assert protos == ["udp", "tcp"]  # once each: the second answer came from the cache


def test_spoofed_upstream_replies_are_ignored(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    up.spoof.add("spoofed.test")
    r = make()
    assert addresses(ask(r.port, "spoofed.test")) == ["192.0.2.12"]
    assert [g.address for g in r.granted()] == ["192.0.2.12"]
    up.silent.add("spoofed.test")
    r2 = make()
    assert ask(r2.port, "spoofed.test").rcode == dnsmsg.SERVFAIL  # only forgeries came back: time out
    assert r2.grants == []


def test_next_upstream_after_a_timeout_or_a_refusal(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:
        blackhole.bind((LOOP, 0))
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind((LOOP, 0))
        closed_port = closed.getsockname()[1]
        closed.close()  # nobody there: ICMP port unreachable, so the next upstream at once
        r = make(upstreams=[f"{LOOP}#{closed_port}", f"{LOOP}#{blackhole.getsockname()[1]}", up.address])
        start = time.monotonic()
        assert addresses(ask(r.port, "allowed.test")) == ["192.0.2.10"]
        assert time.monotonic() - start >= FAST.upstream_timeout  # waited for the blackhole
    up.silent.add("quiet.test")
    assert ask(r.port, "quiet.test").rcode == dnsmsg.SERVFAIL


# ---------------------------------------------------------------------------------------------- deny, refuse, unlisted


def test_deny_is_nxdomain_and_asks_no_one(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    r = make()
    for qname, qtype in (("cdn.test", 1), ("cdn.test", 28), ("x.y.blocked.test", 65)):
        assert ask(r.port, qname, qtype).rcode == dnsmsg.NXDOMAIN
    time.sleep(0.2)
    assert up.asked("cdn.test") == 0 and up.asked("x.y.blocked.test", "HTTPS") == 0
    assert r.grants == []


def test_learn_denied_resolves_in_the_background_into_the_deny_set(make: Callable[..., Resolver],
                                                                   up: FakeUpstream) -> None:
    r = make(learn_denied=True)
    assert ask(r.port, "cdn.test").rcode == dnsmsg.NXDOMAIN
    assert wait_for(lambda: r.granted() == [Grant("deny", "203.0.113.30", 35)])
    assert ask(r.port, "cdn.test").rcode == dnsmsg.NXDOMAIN  # from the cache: neither asked nor granted again
    ask(r.port, "allowed.test")  # answered after the learning of the query before it, in order
    assert r.granted() == [Grant("deny", "203.0.113.30", 35), Grant("set_t", "192.0.2.10", 35),
                           Grant("set_a", "192.0.2.10", 35)]
    assert up.asked("cdn.test") == 1


def test_refused_names_never_reach_upstream(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    r = make()
    for qname, qtype in (("secret-data.example.com", 1), ("a.b.c", 16), ("test", 1), (".", 2)):
        assert ask(r.port, qname, qtype).rcode == dnsmsg.NXDOMAIN
    time.sleep(0.2)
    with up.lock:
        assert up.queries == []


def test_unlisted_names_resolve_without_grants(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    r = make(Policy([("allowed.test", "s")], ["cdn.test"], resolve_unlisted=True))
    assert addresses(ask(r.port, "other.test")) == ["198.51.100.20"]
    assert ask(r.port, "cdn.test").rcode == dnsmsg.NXDOMAIN
    assert up.asked("other.test") == 1 and up.asked("cdn.test") == 0
    assert r.grants == []


def test_any_type_is_decided_by_name(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    r = make()
    for qtype, tname in ((16, "TXT"), (65, "HTTPS"), (15, "MX"), (12, "PTR")):
        resp = ask(r.port, "allowed.test", qtype)
        assert resp.rcode == dnsmsg.NOERROR and resp.answers == ()
        assert up.asked("allowed.test", tname) == 1
        assert ask(r.port, "elsewhere.example", qtype).rcode == dnsmsg.NXDOMAIN
    assert r.grants == []


def test_a_chain_through_a_denied_name_is_denied(make: Callable[..., Resolver]) -> None:
    policy = Policy([("www.cname.test", "s")], ["other.test"], resolve_unlisted=False)
    r = make(policy)
    assert ask(r.port, "www.cname.test").rcode == dnsmsg.NXDOMAIN
    assert r.grants == []
    learner = make(policy, learn_denied=True)
    assert ask(learner.port, "www.cname.test").rcode == dnsmsg.NXDOMAIN
    deadline = time.monotonic() + 5  # learning happens after the NXDOMAIN has gone out
    while not learner.granted() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert learner.granted() == [Grant("deny", "198.51.100.20", 35)]


def test_never_grant_keeps_rebinding_addresses_out(make: Callable[..., Resolver]) -> None:
    r = make(never_grant=lambda a: a.version == 4 and a.packed[0] == 10)
    assert addresses(ask(r.port, "rebind.test")) == ["10.77.0.10"]  # the answer still goes out
    assert r.grants == []
    assert addresses(ask(r.port, "allowed.test")) == ["192.0.2.10"]
    assert len(r.grants) == 1


def test_grant_failure_answers_servfail(make: Callable[..., Resolver]) -> None:
    r = make()
    r.fail_grants = True
    assert ask(r.port, "allowed.test").rcode == dnsmsg.SERVFAIL
    assert ask(r.port, "allowed.test").rcode == dnsmsg.SERVFAIL  # from the cache: still fail closed
    assert ask(r.port, "nothing.test").rcode == dnsmsg.NXDOMAIN  # no address, no grant: unaffected
    assert ask(r.port, "elsewhere.example").rcode == dnsmsg.NXDOMAIN
    r.fail_grants = False
    assert addresses(ask(r.port, "allowed.test")) == ["192.0.2.10"]


def test_client_letter_case_and_edns_are_honoured(make: Callable[..., Resolver]) -> None:
    r = make()
    msg = query("AlLoWeD.TeSt", edns=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((LOOP, r.port))
        s.send(msg)
        data = s.recv(4096)
    assert data[12:12 + 14] == msg[12:12 + 14]
    resp = dnsmsg.parse_response(data)
    assert addresses(resp) == ["192.0.2.10"]
    assert data[10:12] == b"\0\1" and data.endswith(b"\0\0\x29\x04\xd0" + bytes(6))  # our OPT, 1232
    assert len(r.grants) == 1


# ---------------------------------------------------------------------------------------------- garbage and floods


def _exchange(port: int, packet: bytes, timeout: float = 0.3) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((LOOP, port))
        s.send(packet)
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def test_malformed_queries_get_formerr_or_silence(make: Callable[..., Resolver]) -> None:
    r = make()
    assert _exchange(r.port, b"\x01\x02garbage") is None
    assert _exchange(r.port, query("allowed.test")[:2] + b"\x81\x00" + query("allowed.test")[4:]) is None
    loop = struct.pack("!6H", 0x77, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\0\1\0\1"
    reply = _exchange(r.port, loop)
    assert reply is not None and reply[:2] == b"\0\x77" and reply[3] & 0xF == dnsmsg.FORMERR
    long_label = struct.pack("!6H", 0x78, 0x0100, 1, 0, 0, 0) + b"\x50" + b"a" * 80 + b"\0\0\1\0\1"
    reply = _exchange(r.port, long_label)
    assert reply is not None and reply[3] & 0xF == dnsmsg.FORMERR
    axfr = _exchange(r.port, query("allowed.test", 252))
    assert axfr is not None and axfr[3] & 0xF == dnsmsg.NOTIMP
    chaos = query("version.bind", 16)[:-2] + b"\0\3"
    reply = _exchange(r.port, chaos)
    assert reply is not None and reply[3] & 0xF == dnsmsg.REFUSED
    assert r.grants == []


def test_fuzzed_packets_never_crash_it_nor_grant(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    policy = Policy([("allowed.test", "s")], [], resolve_unlisted=False)
    r = make(policy)
    rng = random.Random(7)
    seeds = [query("allowed.test"), query("other.test", 28, edns=True), query("chain.test", 65),
             query("AllOwEd.TeSt", edns=True)]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect((LOOP, r.port))
    crafted = [
        struct.pack("!6H", 1, 0x0100, 1, 0, 0, 1) + b"\x03abc\xc0\x0c\0\1\0\1",  # pointer in the question
        struct.pack("!6H", 1, 0x0100, 1, 0, 0, 1) + b"\0\0\1\0\1" + b"\xc0\x11" * 20,  # looping additional
        struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + b"\x3f" * 300,
        struct.pack("!6H", 1, 0x0100, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF),
        b"\0" * 4096, b"",
    ]
    for packet in crafted:
        sender.send(packet)
    sent = 0
    for i in range(4000):
        msg = bytearray(seeds[i % len(seeds)])
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(msg))
            if rng.random() < 0.7:
                msg[pos] = rng.randrange(256)
            else:
                del msg[pos:pos + rng.randint(1, 6)]
        sender.send(bytes(msg))
        sent += 1
        if i % 200 == 0:
            time.sleep(0.01)  # let it drain: the point is parsing, not the socket buffer
    sender.close()
    assert addresses(ask(r.port, "allowed.test")) == ["192.0.2.10"]  # alive and well
    for g in r.granted():
        assert g == Grant("s", "192.0.2.10", g.timeout)  # only a still-valid question for the allowed name
    assert sent == 4000


def test_a_flood_leaves_it_responsive(make: Callable[..., Resolver], up: FakeUpstream) -> None:
    r = make(Policy([("*.test", "s")], [], resolve_unlisted=True), limits=Limits(upstream_timeout=0.4,
                                                                                 max_inflight=64))
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # its answers may well be dropped
    flood.connect((LOOP, r.port))
    for i in range(10000):
        # a third the same cached name, the rest a different name each: every one a question upstream
        flood.send(query("allowed.test" if i % 3 == 0 else f"n{i}.flood.example"))
    # The flood overflows the socket buffer, and our question may be dropped with it: ask as a stub does,
    # again after a timeout.
    assert addresses(ask_retrying(r.port, "allowed.test")) == ["192.0.2.10"]
    flood.close()
    assert addresses(ask_retrying(r.port, "other.test")) == ["198.51.100.20"]


# ---------------------------------------------------------------------------------------------- TCP


def test_tcp_several_queries_per_connection_then_idle_close(make: Callable[..., Resolver]) -> None:
    r = make(limits=Limits(upstream_timeout=0.4, tcp_idle=0.5))
    names = ["allowed.test", "other.test", "multi.test", "chain.test", "nothing.test", "cdn.test"]
    msgs = [query(n, qid=i) for i, n in enumerate(names)]
    with socket.create_connection((LOOP, r.port), timeout=5) as s:
        s.sendall(b"".join(len(m).to_bytes(2, "big") + m for m in msgs))  # pipelined
        replies = {}
        buf = bytearray()
        for _ in names:
            data = _read_frame(s, buf)
            assert data is not None
            resp = dnsmsg.parse_response(data)
            replies[resp.id] = resp
        assert sorted(replies) == list(range(len(names)))
        assert addresses(replies[0]) == ["192.0.2.10"] and replies[4].rcode == replies[5].rcode == 3
        start = time.monotonic()
        assert s.recv(10) == b""  # closed for idleness
        assert time.monotonic() - start < 4


def test_tcp_clients_are_capped(make: Callable[..., Resolver]) -> None:
    r = make(limits=Limits(upstream_timeout=0.4, tcp_clients=4))
    conns = [socket.create_connection((LOOP, r.port), timeout=3) for _ in range(8)]
    time.sleep(0.3)
    closed = 0
    for c in conns:
        try:
            c.sendall(len(query("allowed.test")).to_bytes(2, "big") + query("allowed.test"))
            closed += _read_frame(c) is None
        except OSError:
            closed += 1
        c.close()
    assert closed >= 4  # the least recently active made room for the newer ones
    assert addresses(ask(r.port, "allowed.test", tcp=True)) == ["192.0.2.10"]


def test_tcp_client_with_thousands_of_bad_frames(make: Callable[..., Resolver]) -> None:
    r = make()
    bad = struct.pack("!6H", 0x99, 0x0100, 0, 0, 0, 0)  # no question: FORMERR, answered at once
    good = query("allowed.test", qid=0x77)
    with socket.create_connection((LOOP, r.port), timeout=30) as s:  # a busy machine is slow, not wrong
        s.sendall((len(bad).to_bytes(2, "big") + bad) * 5000 + len(good).to_bytes(2, "big") + good)
        buf = bytearray()
        for _ in range(5000):
            data = _read_frame(s, buf)
            assert data is not None and data[3] & 0xF == dnsmsg.FORMERR
        data = _read_frame(s, buf)
        assert data is not None and addresses(dnsmsg.parse_response(data)) == ["192.0.2.10"]


def test_no_usable_upstream_is_an_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, pytest.raises(ValueError, match="upstream"):
        serve([u], [], policy=POLICY, upstreams=["not-an-address"], grant=lambda g: None, log=None,
              learn_denied=False, never_grant=lambda a: False)


def test_tcp_half_close_still_answers(make: Callable[..., Resolver]) -> None:
    r = make()
    with socket.create_connection((LOOP, r.port), timeout=3) as s:
        m = query("allowed.test")
        s.sendall(len(m).to_bytes(2, "big") + m)
        s.shutdown(socket.SHUT_WR)
        data = _read_frame(s)
        assert data is not None and addresses(dnsmsg.parse_response(data)) == ["192.0.2.10"]


# ---------------------------------------------------------------------------------------------- the query log


def test_query_log_is_json_lines(make: Callable[..., Resolver], tmp_path: Path) -> None:
    path = tmp_path / "queries.log"
    with open(path, "ab") as log:
        r = make(log=log)
        ask(r.port, "allowed.test")
        ask(r.port, "allowed.test")
        ask(r.port, "cdn.test")
        ask(r.port, "nope.example")
        ask(r.port, "www.cname.test")
        r.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["name"], x["type"], x["verdict"], x["rcode"], x["answers"], x["cached"]) for x in lines] == [
        ("allowed.test", "A", "allow", "NOERROR", ["192.0.2.10"], False),
        ("allowed.test", "A", "allow", "NOERROR", ["192.0.2.10"], True),
        ("cdn.test", "A", "deny", "NXDOMAIN", [], False),
        ("nope.example", "A", "refuse", "NXDOMAIN", [], False),
        ("www.cname.test", "A", "allow", "NOERROR", ["198.51.100.20"], False),
    ]
    assert lines[-1]["chain"] == ["www.cname.test", "other.test"]
    assert all(abs(x["time"] - time.time()) < 60 for x in lines)


def test_query_log_is_bounded(make: Callable[..., Resolver], tmp_path: Path) -> None:
    path = tmp_path / "queries.log"
    with open(path, "a+b") as log:
        r = make(log=log, limits=Limits(upstream_timeout=0.4, log_max_bytes=4000))
        for i in range(100):
            ask(r.port, f"n{i}.elsewhere.example")
        r.close()
    text = path.read_text()
    assert len(text) <= 4000 + 200
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[-1]["name"] == "n99.elsewhere.example"  # the newest are kept


# ---------------------------------------------------------------------------------------------- upstreams


def test_resolv_conf_nameservers() -> None:
    text = """# generated
nameserver 127.0.0.53
options edns0 trust-ad
search example.org
; comment
nameserver fe80::1%eth0
nameserver not-an-address
nameserver 127.0.0.53
nameserver 2001:db8::53 # trailing words are ignored
nameserver 192.0.2.4
"""
    assert upstream.parse_resolv_conf(text) == ["127.0.0.53", "fe80::1%eth0", "2001:db8::53"]  # at most 3
    assert upstream.parse_resolv_conf("search x\noptions ndots:2\n") == ["127.0.0.1"]
    assert upstream.parse_resolv_conf("nameserver 10.0.0.1%eth0\nnameserver ::1\n") == ["::1"]


def test_upstream_socket_addresses() -> None:
    ups = upstream.upstreams(["127.0.0.53", "::1", "127.0.0.1#5353", "junk", "1.2.3.4#99999"])
    assert [(u.address, u.family, u.sockaddr[:2]) for u in ups] == [
        ("127.0.0.53", socket.AF_INET, ("127.0.0.53", 53)),
        ("::1", socket.AF_INET6, ("::1", 53)),
        ("127.0.0.1#5353", socket.AF_INET, ("127.0.0.1", 5353)),
    ]
    scoped = upstream.upstreams(["fe80::1%lo"])
    assert scoped and scoped[0].sockaddr[-1] == socket.if_nametoindex("lo")  # the scope id


def test_blocking_ask(up: FakeUpstream) -> None:
    wire = dnsmsg.parse_query(query("multi.test")).wire
    resp = upstream.ask(wire, upstream.upstreams([up.address]), timeout=1)
    assert resp is not None and sorted(addresses(resp)) == ["192.0.2.10", "198.51.100.20"]
    up.silent.add("quiet.test")
    assert upstream.ask(dnsmsg.parse_query(query("quiet.test")).wire, upstream.upstreams([up.address]),
                        timeout=0.2) is None


def test_cache_is_bounded_in_entries_and_bytes() -> None:
    from types import SimpleNamespace

    from nsfw.resolver.server import _Cache

    def entry(size: int) -> Any:
        return SimpleNamespace(response=SimpleNamespace(raw=bytes(size)), expires=100.0)

    cache = _Cache(3, 1000)
    for i in range(5):
        cache.put((f"n{i}", 1, 1), entry(100))
    assert list(cache.entries) == [("n2", 1, 1), ("n3", 1, 1), ("n4", 1, 1)] and cache.bytes == 300
    assert cache.get(("n2", 1, 1), 0.0) is not None  # now the most recently used
    cache.put(("big", 1, 1), entry(850))  # one out for the count, one more for the bytes
    assert list(cache.entries) == [("n2", 1, 1), ("big", 1, 1)] and cache.bytes == 950
    assert cache.get(("n2", 1, 1), 100.0) is None and cache.bytes == 850  # expired


def test_cached_answers_to_many_clients_share_one_renewal(make: Callable[..., Resolver]) -> None:
    r = make(limits=FLOORED)
    ask(r.port, "multi.test")  # cached now
    time.sleep(1.1)  # past the second of slack: the next answer renews the minute
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.settimeout(3)
    sender.connect((LOOP, r.port))
    for _ in range(50):
        sender.send(query("multi.test"))
    for _ in range(50):
        assert addresses(dnsmsg.parse_response(sender.recv(4096))) != []
    sender.close()
    assert len(r.grants) == 2  # the first answer's, then one renewal for all 50 (each address once)
    assert sorted(g.address for g in r.grants[1]) == ["192.0.2.10", "198.51.100.20"]


class _Dest:
    """Where a batch's answers go, in a test that drives the batch itself."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def release(self) -> None:
        pass


def _batch_resolver(grant: Callable[[Sequence[Grant]], None], **limits: Any) -> Any:
    from nsfw.resolver.server import _Resolver

    return _Resolver([], [], POLICY, ["127.0.0.1"], grant, None, False, lambda _a: False,
                     Limits(**limits))


def _out(dest: _Dest, name: str, grants: list[Grant]) -> Any:
    from nsfw.resolver.server import _Out

    q = dnsmsg.parse_query(query(name))
    return _Out(dest, q, b"reply " + name.encode(), grants, "allow", dnsmsg.NOERROR, [g.address for g in grants])


def test_a_batch_asks_each_grant_once_in_calls_of_at_most_grant_batch() -> None:
    calls: list[list[Grant]] = []
    r = _batch_resolver(lambda g: calls.append(list(g)), grant_batch=4)
    dest = _Dest()
    many = [Grant("s", f"192.0.2.{i}", 35) for i in range(10)]
    r.out = [_out(dest, "a.test", many[:6]), _out(dest, "b.test", many[3:]), _out(dest, "c.test", many[:1])]
    r.flush()
    assert [len(c) for c in calls] == [4, 4, 2] and sorted(g for c in calls for g in c) == sorted(many)
    assert dest.sent == [b"reply a.test", b"reply b.test", b"reply c.test"]
    r.out = [_out(dest, "a.test", many[:6])]
    r.flush()
    assert len(calls) == 3 and dest.sent[-1] == b"reply a.test"  # held: no call


def test_one_failing_grant_fails_only_the_answers_that_carry_it() -> None:
    calls: list[list[Grant]] = []

    def grant(grants: Sequence[Grant]) -> None:
        calls.append(list(grants))
        if any(g.address == "192.0.2.66" for g in grants):
            raise OSError("the granter refused")

    r = _batch_resolver(grant, grant_batch=8)
    dest = _Dest()
    good = [Grant("s", f"192.0.2.{i}", 35) for i in range(1, 6)]
    bad = Grant("s", "192.0.2.66", 35)
    r.out = [_out(dest, "a.test", good[:3]), _out(dest, "b.test", [good[3], bad]), _out(dest, "c.test", good[3:])]
    r.flush()
    assert dest.sent[0] == b"reply a.test" and dest.sent[2] == b"reply c.test"
    failed = dnsmsg.parse_response(dest.sent[1])
    assert failed.rcode == dnsmsg.SERVFAIL and failed.answers == ()
    assert {g for c in calls[1:] if bad not in c for g in c} == set(good)  # every good one granted in the end
    assert len(calls) <= 1 + 2 * 3  # halved until the bad one is alone: a few calls, not one per grant
    r.out = [_out(dest, "b.test", [good[3], bad])]
    r.flush()
    assert calls[-1] == [bad]  # never confirmed, so asked again; the good one is held
    assert dnsmsg.parse_response(dest.sent[-1]).rcode == dnsmsg.SERVFAIL


def test_confirmed_grants_are_forgotten_once_expired() -> None:
    r = _batch_resolver(lambda _g: None)
    r.confirmed = {("s", f"198.18.{i // 256}.{i % 256}"): r.now - 1 for i in range(5000)}
    r.confirmed[("s", "192.0.2.1")] = r.now + 30
    r._sweep(r.now)
    assert r.confirmed == {("s", "192.0.2.1"): r.now + 30}


def test_a_burst_after_lone_queries_is_answered_whole(make: Callable[..., Resolver]) -> None:
    r = make()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((LOOP, r.port))
        for i in range(40):  # one at a time, from the cache after the first: read one a turn
            s.send(query("allowed.test", qid=i))
            assert dnsmsg.parse_response(s.recv(4096)).id == i
        for i in range(100, 150):  # then all at once: every one answered, none left waiting in the socket
            s.send(query("allowed.test", qid=i))
        ids = {dnsmsg.parse_response(s.recv(4096)).id for _ in range(50)}
    assert ids == set(range(100, 150))


def test_memoized_answers_are_logged_and_keep_the_ttl_counting(make: Callable[..., Resolver],
                                                               tmp_path: Path) -> None:
    path = tmp_path / "queries.log"
    with open(path, "ab") as log:
        r = make(log=log)
        first = [ask(r.port, "allowed.test") for _ in range(5)]
        time.sleep(1.1)
        later = ask(r.port, "allowed.test")
        r.close()
    assert {resp.answers[0].ttl for resp in first} == {30} and later.answers[0].ttl in (28, 29)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["cached"] for x in lines] == [False, True, True, True, True, True]
    assert all(x["answers"] == ["192.0.2.10"] and x["verdict"] == "allow" for x in lines)
