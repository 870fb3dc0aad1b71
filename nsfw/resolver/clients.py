"""The resolver's clients: where an answer goes (a UDP peer, a TCP connection), and the listening sockets.

A TCP connection is framed by 2-byte lengths, carries several queries and gets answers in any order; it is
bounded in queries being answered (`Limits.tcp_pending`) and in bytes unsent (`Limits.tcp_outbuf`). Each
object here is its socket's handler in the resolver's poller: the loop calls its `on_event`.
"""

from __future__ import annotations

from . import TYPE_CHECKING

if TYPE_CHECKING:
    import socket
else:
    from . import sockets as socket  # `socket` itself would import enum
from .dnsmsg import EDNS_SIZE, Query
from .poller import READ, WRITE

if TYPE_CHECKING:
    from typing import Any

    from .server import _Resolver


class _UdpDest:
    __slots__ = ("addr", "key", "sock")

    def __init__(self, sock: socket.socket, addr: tuple[Any, ...], key: bytes | None = None) -> None:
        self.sock = sock
        self.addr = addr
        self.key = key  # the query but for its id, when its answer may be memoized (`_Resolver.fast`)

    @staticmethod
    def limit(query: Query) -> int:
        # the client's EDNS size, but no more than we advertise: larger answers go over TCP, unfragmented
        return 512 if query.edns is None else min(query.edns, EDNS_SIZE)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.addr)
        except OSError:
            pass  # a full send buffer or a vanished client: UDP clients retry

    def release(self) -> None:
        pass



class _TcpClient:
    """One DNS-over-TCP connection: 2-byte length framing, several queries, answers in any order."""

    def __init__(self, server: _Resolver, conn: socket.socket, now: float) -> None:
        self.server = server
        self.conn = conn
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.pending = 0
        self.last = now
        self.eof = False
        self.closed = False
        self.parsing = False
        self.events = 0
        self._interest()

    @staticmethod
    def limit(_query: Query) -> int:
        return 65535

    def on_event(self, mask: int, now: float) -> None:
        if self.closed:
            return
        self.last = now
        if mask & WRITE:
            self._write()
        if mask & READ and not self.closed:
            self._read()

    def _read(self) -> None:
        try:
            chunk = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not chunk:
            self.eof = True  # a client may half-close after its queries: answer them, then close
        self.inbuf += chunk
        self._frames()

    def _frames(self) -> None:
        # An answer sent at once (FORMERR) comes back here through send(): the loop below, already running,
        # picks up the next frame, rather than a recursion as deep as the client has frames.
        if self.parsing:
            return
        self.parsing = True
        try:
            limit = self.server.limits.tcp_pending
            while not self.closed and self.pending < limit and len(self.inbuf) >= 2:
                size = int.from_bytes(self.inbuf[:2], "big")
                if size == 0:
                    self.close()
                    return
                if len(self.inbuf) < 2 + size:
                    break
                msg = bytes(self.inbuf[2:2 + size])
                del self.inbuf[:2 + size]
                self.pending += 1
                self.server.handle(msg, self)
        finally:
            self.parsing = False
        self._settle()

    def _settle(self) -> None:
        if self.closed:
            return
        if self.eof and self.pending == 0 and not self.outbuf:
            self.close()
        else:
            self._interest()

    def _interest(self) -> None:
        events = 0
        if not self.eof and self.pending < self.server.limits.tcp_pending:
            events |= READ
        if self.outbuf:
            events |= WRITE
        if events == self.events:
            return
        sel = self.server.sel
        if not events:
            sel.unregister(self.conn)
        elif not self.events:
            sel.register(self.conn, events, self)
        else:
            sel.modify(self.conn, events, self)
        self.events = events

    def _write(self) -> None:
        try:
            sent = self.conn.send(self.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self.outbuf[:sent]
        self._settle()

    def send(self, data: bytes) -> None:
        self.pending -= 1
        if self.closed:
            return
        frame = len(data).to_bytes(2, "big") + data
        if not self.outbuf:
            try:
                sent = self.conn.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            frame = frame[sent:]
        self.outbuf += frame
        if len(self.outbuf) > self.server.limits.tcp_outbuf:
            self.close()  # a client that does not read its answers
            return
        self._frames()  # queries held back by the pending limit may go on now

    def release(self) -> None:
        self.pending -= 1
        if not self.closed:
            self._frames()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.events:
            self.server.sel.unregister(self.conn)
            self.events = 0
        self.conn.close()
        self.server.clients.pop(self, None)


LONE_TURNS = 16  # turns a listener takes queries one at a time before it looks again whether they still are


class _UdpListener:
    def __init__(self, server: _Resolver, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        # Queries that come one at a time (a stub waiting for each answer) are read one a turn: the read that
        # would only find the socket empty is skipped, and the turn is over that much sooner for the next
        # query. Every LONE_TURNS turns the socket is drained again, to see whether they still come alone.
        self.lone = 0

    def on_event(self, _mask: int, now: float) -> None:
        # The hot path: a packet answered before (but for its id), and still answered the same, is answered
        # here and now, before the rest is read: no parsing, no policy, no batch.
        server = self.server
        sock = self.sock
        handle = server.handle
        fast = server.fast
        fast_log = server.fast_log
        read = 0
        for read in range(server.limits.udp_burst):  # noqa: B007 - counted
            try:
                data, addr = sock.recvfrom(4096)  # larger than any real query; a longer datagram is garbage
            except OSError:  # BlockingIOError (drained) and InterruptedError included
                break
            key = data[2:]
            hit = fast.get(key)
            if hit is not None and hit[1] > now:
                try:
                    sock.sendto(data[:2] + hit[0], addr)
                except OSError:
                    pass  # as _UdpDest.send
                fast_log.append(hit[2])
                if self.lone > 1:
                    self.lone -= 1
                    return  # the level-triggered poll says so if another query came meanwhile
                continue
            handle(data, _UdpDest(sock, addr, key if len(data) <= 512 else None))
        else:
            read += 1
        self.lone = LONE_TURNS if read == 1 else 0  # drained after one query: they come one at a time


class _TcpListener:
    def __init__(self, server: _Resolver, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock

    def on_event(self, _mask: int, now: float) -> None:
        server = self.server
        for _ in range(16):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the kernel keeps the connection queued for later
            conn.setblocking(False)
            if len(server.clients) >= server.limits.tcp_clients:
                min(server.clients, key=lambda c: c.last).close()
            server.clients[_TcpClient(server, conn, now)] = None
