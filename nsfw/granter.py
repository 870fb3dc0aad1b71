"""The granter: root's half of an unprivileged resolver, a thread of the sandbox's keeper living in the sandbox's
network namespace. It adds checked addresses to the sandbox's grant sets (see nsfw/dns.py for the whole story).

Kept light (no `re`, `typing`, `signal` or `threading` until used; nftables on the first grant) because the
slim keeper (nsfw/slimkeeper.py) runs it too. Its state (what it granted, until when) survives the keeper's
exec: state() and from_state(). pause() stops it between two requests, never in the middle of one, so that the
exec loses no request: one read from the socket is always answered by the same image.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; type checkers take it as True
if TYPE_CHECKING:
    import socket
    import threading
    from collections.abc import Sequence
    from typing import Any

    from .names import IPAddress

TABLE = "nsfw"  # inside a sandbox's own namespace the name need not be unique
FAMILY = "inet"
MAX_TIMEOUT = 7 * 86400
# Browsers and getaddrinfo caches keep an address about a minute whatever its TTL: a grant shorter than that
# would block the app's next connection to an address it was rightly given. Never shorter than the TTL either.
MIN_GRANT = 60
# The sandbox's verdict cache (compile.SEEN): a destination accepted a moment ago skips classification, so an
# address learned for a denied name must empty it, or the cache would let it through a moment longer.
SEEN = {4: "seen4", 6: "seen6"}


def grant_set(group: int, version: int) -> str:
    return f"dns{version}_{group}"


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


READD_REFRESHES = _kernel_at_least(6, 10)

State = tuple[str, int, bool, list[tuple[str, str, float, int]]]  # what from_state() takes


class Granter:
    """Adds checked addresses to this sandbox's grant sets."""

    def __init__(self, netns_path: str, groups: int, deny: bool, sock: socket.socket) -> None:
        import threading

        self.netns_path, self.groups, self.deny, self.sock = netns_path, groups, deny, sock
        self.expiry: dict[tuple[str, str], float] = {}
        self.timeouts: dict[tuple[str, str], int] = {}  # the timeout last given to each element
        self.thread: threading.Thread = threading.Thread(target=self._run, name="nsfw-granter", daemon=True)
        self.lock = threading.Lock()  # held while a request is read and answered; pause() keeps it

    def start(self) -> None:
        self.thread.start()

    def pause(self) -> None:
        """From the keeper's main thread, before it execs: no request is being handled, and none will be."""
        self.lock.acquire()

    def state(self) -> State:
        """What a granter in the next image needs to go on (with the same socket)."""
        return (self.netns_path, self.groups, self.deny,
                [(s, a, self.expiry[(s, a)], self.timeouts.get((s, a), 0)) for s, a in self.expiry])

    @classmethod
    def from_state(cls, state: State, sock: socket.socket) -> Granter:
        netns_path, groups, deny, elems = state
        g = cls(netns_path, groups, deny, sock)
        for s, a, expiry, timeout in elems:
            g.expiry[(s, a)] = expiry
            if timeout:
                g.timeouts[(s, a)] = timeout
        return g

    def _run(self) -> None:
        import select
        import signal

        from . import caps

        # Signals go to the keeper's main thread.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        fd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            caps.setns(fd, caps.CLONE_NEWNET)  # this thread only
        finally:
            os.close(fd)
        while True:
            try:  # readable first, then read under the lock: a paused granter never takes a request it drops
                select.select([self.sock], [], [])
            except (OSError, ValueError):
                return
            with self.lock:
                try:
                    msg = self.sock.recv(65536, 0x40)  # MSG_DONTWAIT
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not msg:
                    return
                reply = self.handle(msg)
                try:
                    self.sock.send(reply)
                except OSError:
                    return

    def handle(self, msg: bytes) -> bytes:
        """One request ([[set, address, timeout], ...] in JSON), and its reply."""
        import json

        from .errors import SetupError

        try:
            self.apply(json.loads(msg))
            return b"ok"
        except (ValueError, TypeError, KeyError, SetupError) as e:
            return f"error {e}".encode()[:512]

    def _set_for(self, name: str, addr: IPAddress) -> str:
        if name == "deny" and self.deny:
            return f"dnsdeny{addr.version}"
        if name.startswith("h") and name[1:].isdigit() and int(name[1:]) < self.groups:
            return grant_set(int(name[1:]), addr.version)
        raise ValueError(f"unknown grant set {name!r}")

    def apply(self, grants: Sequence[Sequence[Any]]) -> None:
        import ipaddress

        from . import nft
        from .errors import SetupError

        now = time.monotonic()
        elems: dict[tuple[str, str], int] = {}
        for name, address, timeout in grants:
            addr = ipaddress.ip_address(address)
            if not isinstance(timeout, int) or not 0 < timeout <= MAX_TIMEOUT:
                raise ValueError(f"bad timeout {timeout!r}")
            key = (self._set_for(str(name), addr), str(addr))
            elems[key] = max(timeout, MIN_GRANT, elems.get(key, 0))
        # An element that already lives at least as long as asked needs nothing: the common case of a cached
        # answer, which would otherwise cost a kernel transaction per query.
        todo = {k: t for k, t in elems.items() if self.expiry.get(k, 0) < now + t - 1}
        if not todo:
            return
        # Since 6.10 the kernel renews an element that is added again, when the timeout given differs from the
        # one it holds, so a renewal alternates the timeout by a second (never shorter than asked). Before,
        # only a delete and an add in one transaction renew it, and a delete waits for an RCU grace period
        # (milliseconds), so only there.
        if READD_REFRESHES:
            todo = {k: t + 1 if self.timeouts.get(k) == t else t for k, t in todo.items()}
        live = [] if READD_REFRESHES else [k for k in todo if self.expiry.get(k, 0) > now + 0.5]
        cmds = [_element("delete", k) for k in live] + [_element("add", k, t) for k, t in todo.items()]
        if any(k[0].startswith("dnsdeny") for k in todo):
            cmds += [{"flush": {"set": {"family": FAMILY, "table": TABLE, "name": n}}} for n in SEEN.values()]
        try:
            nft.apply(cmds, "name grant")
        except SetupError:
            nft.apply([_element("add", k, t) for k, t in todo.items()], "name grant")
        for k, t in todo.items():
            self.expiry[k] = now + t
            self.timeouts[k] = t


def _element(op: str, key: tuple[str, str], timeout: int | None = None) -> dict[str, Any]:
    value: Any = key[1] if timeout is None else {"elem": {"val": key[1], "timeout": timeout}}
    return {op: {"element": {"family": FAMILY, "table": TABLE, "name": key[0], "elem": [value]}}}
