"""The keeper's watch over its sandbox, and the slim image the keeper execs into to keep it.

keeper.keep() starts what the keeper owns (the resolver, the granter) and then watches (watch()). Once GRACE
has passed, the keeper execs `slim.py keeper FD` (nsfw/slim.py): the same pid and pipes, the resolver still
its child, in an interpreter that has imported only this module and what it needs; the granter (and
nftables) only once the resolver asks for its first grant. The forked keeper held the launch's whole heap
(pyroute2, click, yaml, the compiler...), which, once the supervisor and the resolver have exec'd away, is
its alone: about 60 MiB.

What goes across the exec, on FD (a memfd holding one `marshal` record): the sandbox's record (JSON), its
namespace's identity, the supervisor's pipe ends and what was heard on them, the granter's socket and what it
granted until when, and sys.path. The granter is paused between two requests first (granter.Granter.pause),
so no request is lost: one the resolver sends meanwhile waits in the socket for the new image's granter.
Removal (and the rare "is the sandbox empty now" under the lock) imports nsfw's full modules, once, at the end.

Imports: built-in modules (posix, not os) and select; no `signal` (enum), `socket`, `threading`, `json` or
`typing` until used.
"""

from __future__ import annotations

import posix as os  # what `os` wraps: `os` itself (with stat, posixpath, abc...) is 0.3 MiB of every keeper
import select
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; type checkers take it as True
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable

    from .granter import Granter
    from .state import Record
else:
    import _signal  # `signal` would import enum

GRACE = 1.5  # seconds after "ready" before the keeper slims down (a launch's busy moment is over by then)
LINGER_POLL = 0.25


def netns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def processes_in(ns: tuple[int, int]) -> list[int]:
    """Every process whose network namespace is `ns`: the sandbox's whole tree, found by membership rather than
    parentage, so a double-forked daemon is found as surely as COMMAND itself."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue  # gone meanwhile, or a kernel thread
            if (st.st_dev, st.st_ino) == ns:
                found.append(int(entry))
    return found


def processes_by_namespace(wanted: set[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """One scan of /proc for many namespaces at once (gc of many sandboxes)."""
    found: dict[tuple[int, int], list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in wanted:
                found.setdefault((st.st_dev, st.st_ino), []).append(int(entry))
    return found


def kill_all(ns: tuple[int, int], grace: float = 0.0) -> None:
    """TERM, wait up to `grace`, then KILL until the namespace is empty (a process forking meanwhile is caught
    on the next round). Never raises."""
    if grace > 0:
        for pid in processes_in(ns):
            _kill(pid, _signal.SIGTERM)
        deadline = time.monotonic() + grace
        while processes_in(ns) and time.monotonic() < deadline:
            time.sleep(0.05)
    for _ in range(200):
        pids = processes_in(ns)
        if not pids:
            return
        for pid in pids:
            _kill(pid, _signal.SIGKILL)
        time.sleep(0.01)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def say(fd: int, word: bytes) -> None:
    try:
        os.write(fd, word)
    except OSError:
        pass


class Watch:
    """What the keeper knows of its supervisor: the pipe ends (-1 once closed), and what it heard."""

    def __init__(self, from_supervisor: int, to_supervisor: int, handed_over: bool = False,
                 watching: bool = True) -> None:
        self.from_supervisor, self.to_supervisor = from_supervisor, to_supervisor
        self.handed_over, self.watching = handed_over, watching

    def run(self, ns: tuple[int, int], close_if_empty: Callable[[], bool],
            slim: Callable[[Watch], None] | None = None, wake: tuple[int, Callable[[], None]] | None = None) -> None:
        """Until the sandbox is to be removed: COMMAND exited and nothing runs in the sandbox any more, or the
        supervisor died while COMMAND ran (then its whole tree is killed first). `slim` is called once, after
        GRACE; it returns only when the exec failed. `wake`: an fd, and what to call once when it is readable."""
        slim_at = time.monotonic() + GRACE if slim is not None else None
        while True:
            timeout = LINGER_POLL if self.handed_over else None
            if slim_at is not None:
                left = max(0.0, slim_at - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            fds = ([self.from_supervisor] if self.watching else []) + ([wake[0]] if wake else [])
            if fds:
                ready, _w, _x = select.select(fds, [], [], timeout)
            else:
                ready = []
                time.sleep(LINGER_POLL)
            if wake and wake[0] in ready:
                wake[1]()
                wake = None
            if self.from_supervisor in ready and self.watching:
                data = os.read(self.from_supervisor, 64)
                if data.startswith(b"exit"):
                    self.handed_over = True
                elif not data:
                    self.watching = False
                    if not self.handed_over:  # the supervisor died while COMMAND ran: COMMAND dies with it
                        kill_all(ns)
                        return
            if self.handed_over:
                if close_if_empty():
                    return
                if self.to_supervisor >= 0:  # COMMAND is gone but the sandbox is not: nsfw may exit now
                    say(self.to_supervisor, b"linger")
                    os.close(self.to_supervisor)
                    self.to_supervisor = -1
            if slim is not None and slim_at is not None and time.monotonic() >= slim_at:
                slim(self)
                slim, slim_at = None, None


def become_slim(watch: Watch, record: Record, ns: tuple[int, int], granter: Granter | None) -> None:
    """In the forked keeper: exec the slim keeper. Returns only when that failed (then this image goes on)."""
    import json
    import marshal
    import sys
    from dataclasses import asdict

    if granter is not None:
        granter.pause()
    try:
        fds = [fd for fd in (watch.from_supervisor, watch.to_supervisor) if fd >= 0]
        if granter is not None:
            fds.append(granter.sock.fileno())
        spec = marshal.dumps((json.dumps(asdict(record)), ns, watch.from_supervisor, watch.to_supervisor,
                              watch.handed_over, watch.watching, granter.state() if granter else None,
                              granter.sock.fileno() if granter else -1, list(sys.path)))
        fd = os.memfd_create("nsfw-keeper", 0)
        view = memoryview(spec)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, 0)
        for f in fds:
            os.set_inheritable(f, True)
        argv = [sys.executable, "-IS", __file__.rsplit("/", 1)[0] + "/slim.py", "keeper", str(fd)]
        os.execv(argv[0], argv)
    except OSError:
        pass
    if granter is not None:
        granter.lock.release()


def main(args: list[str]) -> None:
    """`slim.py keeper FD`: the rest of keeper.keep()'s life."""
    import marshal
    import sys

    code = 0
    record_json, to_supervisor = "", -1
    try:
        fd = int(args[0])
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        os.close(fd)
        (record_json, ns, from_supervisor, to_supervisor, handed_over, watching, granter_state, granter_fd,
         path) = marshal.loads(b"".join(chunks))
        ns = tuple(ns)
        sys.path[:] = path  # the full nsfw's, for the end: the packages it removes the sandbox with

        def start_granter() -> None:  # on the first request: a sandbox that resolves no name never pays for it
            import socket

            from .granter import Granter

            sock = socket.socket(fileno=granter_fd)
            sock.set_inheritable(False)
            Granter.from_state(granter_state, sock).start()

        def close_if_empty() -> bool:
            if processes_in(ns):  # the usual answer while it lingers, without the lock's imports
                return False
            import json

            from . import keeper, state

            return keeper.close_if_empty(state.Record(**json.loads(record_json)), ns)

        watch = Watch(from_supervisor, to_supervisor, handed_over, watching)
        for f in (from_supervisor, to_supervisor):
            if f >= 0:
                os.set_inheritable(f, False)
        try:
            watch.run(ns, close_if_empty, wake=(granter_fd, start_granter) if granter_state is not None else None)
        finally:
            to_supervisor = watch.to_supervisor
    except BaseException:
        code = 1
    finally:
        try:
            import json

            from . import reconcile, state

            reconcile.teardown(state.Record(**json.loads(record_json)))
            if to_supervisor >= 0:
                say(to_supervisor, b"done")
        finally:
            os._exit(code)
