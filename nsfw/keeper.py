"""The keeper: one root process per sandbox, forked by `nsfw run` once the sandbox is built, that owns it from
then on: it runs the resolver and the granter, and removes the sandbox when its last process ends.

It watches the supervisor through a pipe. When COMMAND exits, the supervisor says so ("exit") and the keeper
removes the sandbox at once if nothing else runs in it, or lingers while other processes do (a second `nsfw
run` that joined it, a child that outlived COMMAND). If the pipe closes without that word, the supervisor was
killed: the keeper then kills every process in the sandbox's network namespace (the whole tree, wherever it
re-parented) and removes everything. `nsfw gc` covers the case where both die.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import nspath, state

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
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while processes_in(ns) and time.monotonic() < deadline:
            time.sleep(0.05)
    for _ in range(200):
        pids = processes_in(ns)
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.01)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def send_sandbox(to_keeper: int, record: state.Record, owned: object) -> None:
    """To a keeper forked ahead (sandbox.prefork_keeper): its sandbox, and what to start in it."""
    import pickle

    data = pickle.dumps((record, owned))
    view = memoryview(struct.pack("=I", len(data)) + data)
    while view:
        view = view[os.write(to_keeper, view):]


def receive_sandbox(from_supervisor: int) -> tuple[state.Record, Any]:
    """The keeper's side of send_sandbox(); leaves quietly when the launcher went away without a launch."""
    import pickle

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(from_supervisor, n - len(data))
            if not chunk:
                os._exit(0)  # nothing was handed over: nothing to own, nothing to remove
            data += chunk
        return data

    (size,) = struct.unpack("=I", exactly(4))
    record, owned = pickle.loads(exactly(size))
    return record, owned


def close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def keep(record: state.Record, from_supervisor: int, to_supervisor: int, on_start: Callable[[], None]) -> NoReturn:
    """The keeper's life; never returns. `on_start` starts what the keeper owns (the resolver, the granter)
    and is called before the keeper says "ready"."""
    from . import reconcile  # which needs this module: imported late

    code = 0
    try:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, signal.SIG_IGN)  # the terminal's signals are COMMAND's business, not ours
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        ns = netns_id(nspath.path(record.netns))
        on_start()
        _say(to_supervisor, b"ready")
        watching, handed_over = [from_supervisor], False
        while True:
            if watching:
                ready, _w, _x = select.select(watching, [], [], LINGER_POLL if handed_over else None)
            else:
                ready = []
                time.sleep(LINGER_POLL)
            if ready:
                data = os.read(from_supervisor, 64)
                if data.startswith(b"exit"):
                    handed_over = True
                elif not data:
                    watching = []
                    if not handed_over:  # the supervisor died while COMMAND ran: COMMAND dies with it
                        kill_all(ns)
                        break
            if handed_over:
                if _close_if_empty(record, ns):
                    break
                if to_supervisor >= 0:  # COMMAND is gone but the sandbox is not: nsfw may exit now
                    _say(to_supervisor, b"linger")
                    os.close(to_supervisor)
                    to_supervisor = -1
    except BaseException:
        code = 1
    finally:
        try:
            reconcile.teardown(record)
            if to_supervisor >= 0:
                _say(to_supervisor, b"done")
        finally:
            os._exit(code)


def _close_if_empty(record: state.Record, ns: tuple[int, int]) -> bool:
    """Under the lock that joins take, so no `nsfw run` can enter a sandbox that is being removed."""
    with state.locked():
        if processes_in(ns):
            return False
        current = state.load(record.id) or record  # the supervisor saved pids into it after the fork
        current.closing = True
        state.save(current)
        return True


def _say(fd: int, word: bytes) -> None:
    try:
        os.write(fd, word)
    except OSError:
        pass
