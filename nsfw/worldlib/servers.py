"""The world's servers: banner/echo TCP and UDP on every address of one namespace, and DNS on port 53.

Every DNS query that reaches a server is appended to the world's dns.log, one line per query.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

from .layout import DNS_PORT
from .zone import _ZoneFile, dns_reply


def _append_log(path: str, line: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())  # one write with O_APPEND: lines from many servers never interleave
        finally:
            os.close(fd)
    except OSError:
        pass


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
