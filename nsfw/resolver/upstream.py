"""The resolver's upstreams: which they are (from resolv.conf text), and asking them one question.

`Exchange` asks one question without blocking, driven by the server's selector loop: UDP to each upstream in
turn with a short timeout, the same upstream again over TCP when the answer comes back truncated. An answer
counts only if it comes from the upstream's address (a connected socket, on a fresh random port per
question), carries our random id and echoes our question; anything else is ignored, as a spoofing attempt.
`ask` wraps it in a loop of its own for callers that can block.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import ipaddress
import itertools
import os
import time
from collections.abc import Callable, Sequence

from . import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import socket
else:
    from . import sockets as socket  # `socket` itself would import enum
from .dnsmsg import NOERROR, NXDOMAIN, DnsFormatError, Response, make_query, parse_response
from .poller import READ, WRITE, Poller, mask

DEFAULT_NAMESERVER = "127.0.0.1"  # what glibc asks when resolv.conf names none
MAXNS = 3  # glibc reads the first three nameserver lines only
TIMEOUT = 1.5  # per upstream: a local resolver answers in milliseconds, a slow one is better skipped
_TCP_MAX = 65535 + 2
_SEQ = itertools.count()


def parse_resolv_conf(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order, deduplicated, at most three (as glibc); IPv6 ones
    may carry a scope (`fe80::1%eth0`). Comments, options, search and anything unparsable are ignored."""
    found: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        addr = words[1]
        host, _sep, scope = addr.partition("%")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if scope and (ip.version != 6 or not scope.isprintable()):
            continue
        text_addr = f"{ip}%{scope}" if scope else str(ip)
        if text_addr not in found:
            found.append(text_addr)
    return found[:MAXNS] or [DEFAULT_NAMESERVER]


def read_resolv_conf(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_resolv_conf(f.read())
    except OSError:
        return [DEFAULT_NAMESERVER]


class Upstream(NamedTuple):
    address: str
    family: int
    sockaddr: tuple[str, int] | tuple[str, int, int, int]


def upstreams(addresses: Sequence[str], port: int = 53) -> list[Upstream]:
    """Socket addresses for `addresses` (scope ids resolved to interface indexes); the unusable are skipped.
    An address may name its port dnsmasq-style, `127.0.0.1#5353` (for tests and development)."""
    out: list[Upstream] = []
    for addr in addresses:
        host, sep, port_text = addr.partition("#")
        number = int(port_text) if sep and port_text.isdigit() else port if not sep else 0
        if not 0 < number < 65536:
            continue
        try:
            infos = socket.getaddrinfo(host, number, 0, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
        except (OSError, UnicodeError):
            continue
        if infos:
            family, _type, _proto, _name, sockaddr = infos[0]
            out.append(Upstream(addr, family, sockaddr))
    return out


def new_id() -> int:
    return int.from_bytes(os.urandom(2), "big")


class Timer:
    """An entry of the loop's timer heap. Cancelling clears `exchange` rather than searching the heap, so a
    cancelled entry is a few dozen bytes until its deadline comes round (or the owner compacts the heap)."""

    __slots__ = ("deadline", "exchange", "seq")

    def __init__(self, deadline: float, exchange: Exchange) -> None:
        self.deadline = deadline
        self.seq = next(_SEQ)  # ties go in order of creation: exchanges themselves do not compare
        self.exchange: Exchange | None = exchange

    def __lt__(self, other: Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


def run_timers(timers: list[Timer], now: float) -> None:
    """Fire every timer of the heap `timers` that is due."""
    while timers and timers[0].deadline <= now:
        exchange = heapq.heappop(timers).exchange
        if exchange is not None:
            exchange.on_timeout(now)


class Exchange:
    """One question asked of the upstreams. Registers its socket in `selector` with itself as the handler;
    the loop calls `on_event` when the socket is ready, and `run_timers` calls `on_timeout` (the exchange
    pushes a `Timer` onto the heap `timers` for each attempt). Ends by calling `done(self, response)`, with
    None when every upstream failed."""

    def __init__(self, selector: Poller, timers: list[Timer],
                 wire: bytes, servers: Sequence[Upstream], done: Callable[[Exchange, Response | None], None],
                 *, timeout: float = TIMEOUT) -> None:
        self.selector = selector
        self.timers = timers
        self.wire = wire
        self.servers = servers
        self.done = done
        self.timeout = timeout
        self.qid = new_id()
        self.packet = make_query(self.qid, wire)
        self.index = 0
        self.tcp = False
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.sent = 0
        self.timer: Timer | None = None
        self.finished = False

    def start(self, now: float) -> None:
        self._attempt(now)

    def close(self) -> None:
        """Stop without calling `done` (the server is shutting down)."""
        self.finished = True
        self._drop_socket()

    # -- the attempts: UDP to each upstream, TCP to the same one when the UDP answer was truncated

    def _drop_socket(self) -> None:
        if self.timer is not None:
            self.timer.exchange = None
            self.timer = None
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def _next(self, now: float) -> None:
        self.index += 1
        self.tcp = False
        self._attempt(now)

    def _attempt(self, now: float) -> None:
        self._drop_socket()
        while self.index < len(self.servers):
            server = self.servers[self.index]
            kind = socket.SOCK_STREAM if self.tcp else socket.SOCK_DGRAM
            try:
                sock = socket.socket(server.family, kind | socket.SOCK_NONBLOCK)
            except OSError:  # out of descriptors: this question fails, the resolver goes on
                break
            try:
                if self.tcp:
                    err = sock.connect_ex(server.sockaddr)
                    if err not in (0, errno.EINPROGRESS):
                        raise OSError(err, os.strerror(err))
                    self.buf = bytearray(len(self.packet).to_bytes(2, "big") + self.packet)
                    self.sent = 0
                    events = WRITE
                else:
                    sock.connect(server.sockaddr)  # the kernel then drops datagrams from any other address
                    sock.send(self.packet)
                    events = READ
                self.selector.register(sock, events, self)
            except OSError:
                sock.close()
                self.index += 1
                self.tcp = False
                continue
            self.sock = sock
            self.timer = Timer(now + self.timeout, self)
            heapq.heappush(self.timers, self.timer)
            return
        self._finish(None)

    def _finish(self, response: Response | None) -> None:
        if self.finished:
            return
        self.finished = True
        self._drop_socket()
        self.done(self, response)

    def on_timeout(self, now: float) -> None:
        if not self.finished:
            self._next(now)

    def on_event(self, mask: int, now: float) -> None:
        if self.finished or self.sock is None:
            return
        try:
            if self.tcp:
                self._tcp_event(self.sock, mask, now)
            else:
                self._udp_event(self.sock, now)
        except (BlockingIOError, InterruptedError):
            return  # a stale readiness event
        except OSError:
            self._next(now)  # refused (ICMP port unreachable), reset, unreachable: the next upstream

    def _udp_event(self, sock: socket.socket, now: float) -> None:
        for _ in range(16):  # a spoofer's flood must not keep us here
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return
            response = self._accept(data)
            if response is None:
                continue
            if response.truncated:
                self.tcp = True
                self._attempt(now)
            elif response.rcode not in (NOERROR, NXDOMAIN):
                self._next(now)  # SERVFAIL, REFUSED...: another upstream may do better
            else:
                self._finish(response)
            return

    def _tcp_event(self, sock: socket.socket, mask: int, now: float) -> None:
        if self.sent < len(self.buf):
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            self.sent += sock.send(self.buf[self.sent:])
            if self.sent == len(self.buf):
                self.buf = bytearray()
                self.selector.modify(sock, READ, self)
            return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "upstream closed the connection")
        self.buf += chunk
        if len(self.buf) > _TCP_MAX:
            raise ConnectionError(errno.EMSGSIZE, "upstream sent more than one message")
        if len(self.buf) < 2 or len(self.buf) < 2 + int.from_bytes(self.buf[:2], "big"):
            return
        response = self._accept(bytes(self.buf[2:2 + int.from_bytes(self.buf[:2], "big")]))
        if response is None or response.truncated or response.rcode not in (NOERROR, NXDOMAIN):
            self._next(now)  # over TCP there is no one else on the line: a bad answer is this upstream's
        else:
            self._finish(response)

    def _accept(self, data: bytes) -> Response | None:
        """The response if it answers our question with our id, else None (garbage, or spoofed)."""
        try:
            response = parse_response(data)
        except DnsFormatError:
            return None
        if response.id != self.qid or response.wire != self.wire:
            return None
        return response


def ask(wire: bytes, servers: Sequence[Upstream], *, timeout: float = TIMEOUT) -> Response | None:
    """Blocking: the upstreams' answer to the question `wire` (a question section), or None."""
    selector = Poller()
    timers: list[Timer] = []
    result: list[Response | None] = []
    exchange = Exchange(selector, timers, wire, servers, lambda _ex, r: result.append(r), timeout=timeout)
    try:
        exchange.start(time.monotonic())
        while not result:
            wait = max(0.0, timers[0].deadline - time.monotonic()) if timers else -1
            for fd, events in selector.epoll.poll(wait):
                handler = selector.handlers.get(fd)
                if handler is not None:
                    handler.on_event(mask(events), time.monotonic())
            run_timers(timers, time.monotonic())
    finally:
        exchange.close()
        selector.close()
    return result[0]
