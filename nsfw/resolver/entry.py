"""The resolver process's own image: what dns.start's child execs once it has bound port 53 and become nobody.

Forked from the keeper, the resolver held the keeper's whole heap (pyroute2, click, yaml, nftables...), about
24 MiB that reference counting soon un-shares. It execs `slim.py resolver FD` instead (nsfw/slim.py), which
imports this package alone. Its pid, its PDEATHSIG (kept across exec: python3 is neither set-id nor
file-capable), its blocked-nothing signal mask and its fds stay: the bound sockets, the granter's socket and the
query log, made inheritable for the exec. What it is to serve (the policy's patterns, the upstreams, the
addresses never to grant) comes on FD: a memfd holding one `marshal` record, built in and read with no import.
Queries that arrive during the exec wait in the sockets' buffers.
"""

from __future__ import annotations

import ipaddress
import marshal
import posix
import sys

from . import TYPE_CHECKING

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence

    from .cache import Grant, IPAddress
else:
    from . import sockets as socket  # `socket` itself would import enum

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def never_grant(host_addresses: Sequence[IPAddress]) -> Callable[[IPAddress], bool]:
    """A name never opens the host, loopback, multicast or unspecified addresses (DNS rebinding)."""
    host = set(host_addresses)

    def check(addr: IPAddress) -> bool:
        return addr in host or addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr == _BROADCAST

    return check


def encode_grants(items: Sequence[Grant]) -> bytes:
    """The granter's request: JSON [[set, address, timeout], ...], written without `json` (and `re` behind
    it). Set names are the policy's ("h<n>", "deny") and addresses come from ipaddress: neither needs escaping,
    which is checked rather than assumed."""
    parts = []
    for g in items:
        name, addr = str(g.set_name), str(g.address)
        if not (name.isalnum() and all(c in "0123456789abcdefABCDEF.:" for c in addr)):
            raise ValueError(f"not a grant: {name!r} {addr!r}")
        parts.append(f'["{name}","{addr}",{int(g.timeout)}]')
    return ("[" + ",".join(parts) + "]").encode()


def remote_grant(sock: socket.socket) -> Callable[[Sequence[Grant]], None]:
    """`grant` for serve(): one request to the granter, answered once the kernel has the elements."""
    def grant(items: Sequence[Grant]) -> None:
        sock.send(encode_grants(items))
        reply = sock.recv(1024)
        if reply != b"ok":
            raise OSError(f"grant refused: {reply.decode(errors='replace')}")

    return grant


def pack(udp: Sequence[int], tcp: Sequence[int], granter: int, log: int, allow: Sequence[tuple[str, str]],
         deny: Sequence[str], open_names: bool, upstreams: Sequence[str], never: Sequence[str],
         min_grant: int = 0) -> int:
    """What main() reads, in a memfd (not close-on-exec); returns its fd. The fds named must be inheritable."""
    fd = posix.memfd_create("nsfw-resolver", 0)
    data = marshal.dumps((list(udp), list(tcp), granter, log, [tuple(a) for a in allow], list(deny),
                          bool(open_names), list(upstreams), list(never), int(min_grant)))
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view):]
    posix.lseek(fd, 0, 0)
    return fd


def argv(spec_fd: int) -> list[str]:
    return [sys.executable, "-IS", __file__.rsplit("/", 2)[0] + "/slim.py", "resolver", str(spec_fd)]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := posix.read(fd, 1 << 16):
        chunks.append(chunk)
    posix.close(fd)
    return b"".join(chunks)


def main(args: list[str]) -> None:
    """`slim.py resolver FD`: serve until killed (PDEATHSIG: with the keeper)."""
    code = 1
    try:
        udp_fds, tcp_fds, granter_fd, log_fd, allow, deny, open_names, upstreams, never, min_grant = marshal.loads(
            _read_all(int(args[0])))
        from .policy import Policy
        from .server import Limits, serve

        udp = [socket.socket(fileno=fd) for fd in udp_fds]
        tcp = [socket.socket(fileno=fd) for fd in tcp_fds]
        granter = socket.socket(fileno=granter_fd)
        for fd in (*udp_fds, *tcp_fds, granter_fd, log_fd):
            posix.set_inheritable(fd, False)
        log = open(log_fd, "a+b", buffering=0)  # noqa: SIM115 - readable: a full log keeps its newest half
        serve(udp, tcp, policy=Policy(allow, deny, open_names), upstreams=upstreams, grant=remote_grant(granter),
              log=log, learn_denied=open_names, never_grant=never_grant([ipaddress.ip_address(a) for a in never]),
              limits=Limits(min_grant=min_grant))
        code = 0
    finally:
        posix._exit(code)
