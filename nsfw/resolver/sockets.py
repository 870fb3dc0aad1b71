"""`socket` for the resolver process, without the `socket` module: that imports `enum` (about 0.9 MiB of every
resolver's memory, for the IntEnum wrappers of its constants) and `io`. Everything here is `_socket`'s, which
is what `socket` wraps, plus the one method the resolver uses that `socket.socket` adds in Python: accept().
Type checkers see the real module (see the importers: `if TYPE_CHECKING: import socket`).
"""

from _socket import *  # noqa: F403 - the constants and functions `socket` re-exports
from _socket import socket as _base


class socket(_base):  # type: ignore[no-redef]  # the name the resolver's modules use
    __slots__ = ()

    def accept(self):  # type: ignore[no-untyped-def]
        fd, addr = self._accept()  # type: ignore[attr-defined]
        return socket(self.family, self.type, self.proto, fileno=fd), addr
