"""The resolver's query log: one JSON line per answer, written in batches, bounded in size.

Bounded at `Limits.log_max_bytes` (10 MB): past it the file is cut down to its newest half (whole lines) when
it is a readable regular file; truncated to empty with a note line when it cannot be read; and when it cannot
be truncated either (a pipe), logging stops after a note line. A full disk or a closed pipe stops logging,
never DNS. (The lines themselves are made by `server._Out.log_tail`, after a shared time.)
"""

from __future__ import annotations

import errno
import os
import stat
import time

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import BinaryIO


def _json_str(text: str) -> str:
    # Names reach here escaped by dnsmsg ([a-z0-9-_*.\\] only), so this is all the encoding they need;
    # `json` (and `re` behind it) stays unimported in the common case.
    if text.isascii() and text.isprintable() and '"' not in text:
        return '"' + text.replace("\\", "\\\\") + '"'
    import json

    return json.dumps(text)


class _QueryLog:
    def __init__(self, f: BinaryIO | None, limit: int) -> None:
        self.f = f
        self.limit = limit
        self.size = 0
        self.regular = False
        if f is not None:
            try:
                st = os.fstat(f.fileno())
                self.regular = stat.S_ISREG(st.st_mode)
                self.size = st.st_size if self.regular else 0
            except (OSError, ValueError):
                pass

    def write(self, data: bytes) -> None:
        """Whole lines, at once."""
        if self.f is None or not data:
            return
        try:
            self.f.write(data)
            self.f.flush()
        except (OSError, ValueError):
            self.f = None  # a full disk or a closed pipe must not take DNS down
            return
        self.size += len(data)
        if self.size > self.limit:
            self._shrink()

    def _note(self, text: str) -> bytes:
        return f'{{"time": {time.time():.6f}, "note": "{text}"}}\n'.encode()

    def _shrink(self) -> None:
        f = self.f
        assert f is not None
        keep = self.limit // 2
        try:
            if not self.regular:
                raise OSError(errno.ESPIPE, "not a regular file")
            try:
                f.seek(max(0, self.size - keep))
                tail = f.read()
                tail = tail[tail.find(b"\n") + 1:]  # whole lines only
            except (OSError, ValueError):  # opened write-only: keep nothing, but keep logging
                tail = self._note(f"log cut at {self.limit} bytes; older lines dropped")
            f.seek(0)
            f.truncate(0)
            f.write(tail)
            f.flush()
            self.size = len(tail)
        except (OSError, ValueError):
            try:
                f.write(self._note(f"log limit of {self.limit} bytes reached; no more lines"))
                f.flush()
            except (OSError, ValueError):
                pass
            self.f = None
