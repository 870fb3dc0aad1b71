"""The resolver's readiness loop, on epoll directly: the part of `selectors` it uses, without the key object,
the mask conversion and the dictionary walks `selectors` spends on every event, which are microseconds of a
cached answer's few dozen. Registered with each socket is its handler, whose `on_event(mask, now)` the loop
calls with the mask in `selectors`' terms (READ, WRITE; an error or hang-up counts as both).
"""

from __future__ import annotations

import select

from . import TYPE_CHECKING

if TYPE_CHECKING:
    import socket
    from typing import Protocol

    class Handler(Protocol):
        def on_event(self, mask: int, now: float) -> None: ...

READ = 1  # selectors.EVENT_READ
WRITE = 2  # selectors.EVENT_WRITE
NOT_OUT = ~select.EPOLLOUT  # readable, or an error or hang-up to be read
NOT_IN = ~select.EPOLLIN  # writable, or an error or hang-up to be seen when writing


def _epoll_events(events: int) -> int:
    return (select.EPOLLIN if events & READ else 0) | (select.EPOLLOUT if events & WRITE else 0)


def mask(epoll_events: int) -> int:
    """`selectors`' mask for what epoll reported."""
    return (READ if epoll_events & NOT_OUT else 0) | (WRITE if epoll_events & NOT_IN else 0)


class Poller:
    """register/modify/unregister as `selectors.BaseSelector` (KeyError for a socket not registered); the loop
    reads `epoll.poll` and `handlers` itself. A handler unregistered by an earlier event of the same poll is
    no longer in `handlers`, so its stale event is skipped."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}

    def register(self, sock: socket.socket, events: int, handler: Handler) -> None:
        fd = sock.fileno()
        if fd in self.handlers:
            raise KeyError(f"{sock!r} is already registered")
        self.epoll.register(fd, _epoll_events(events))
        self.handlers[fd] = handler

    def modify(self, sock: socket.socket, events: int, handler: Handler) -> None:
        fd = sock.fileno()
        if fd not in self.handlers:
            raise KeyError(f"{sock!r} is not registered")
        self.epoll.modify(fd, _epoll_events(events))
        self.handlers[fd] = handler

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        del self.handlers[fd]  # KeyError first: never ask epoll about a descriptor it does not watch
        self.epoll.unregister(fd)

    def close(self) -> None:
        self.handlers.clear()
        self.epoll.close()
