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
import signal
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from . import nspath, state
from .slimkeeper import LINGER_POLL as LINGER_POLL  # where the keeper's watch lives: its slim image runs it too
from .slimkeeper import Watch, become_slim, say
from .slimkeeper import kill_all as kill_all
from .slimkeeper import netns_id as netns_id
from .slimkeeper import processes_by_namespace as processes_by_namespace
from .slimkeeper import processes_in as processes_in

if TYPE_CHECKING:
    from .granter import Granter


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


def keep(record: state.Record, from_supervisor: int, to_supervisor: int,
         on_start: Callable[[], Granter | None]) -> NoReturn:
    """The keeper's life; never returns. `on_start` starts what the keeper owns (the resolver, the granter,
    which it returns) and is called before the keeper says "ready". After slimkeeper.GRACE the keeper goes on
    in its slim image (slimkeeper.become_slim), which ends as this does."""
    from . import reconcile  # which needs this module: imported late

    code = 0
    watch = Watch(from_supervisor, to_supervisor)
    try:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, signal.SIG_IGN)  # the terminal's signals are COMMAND's business, not ours
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        ns = netns_id(nspath.path(record.netns))
        granter = on_start()
        say(to_supervisor, b"ready")
        watch.run(ns, lambda: close_if_empty(record, ns), lambda w: become_slim(w, record, ns, granter))
    except BaseException:
        code = 1
    finally:
        try:
            reconcile.teardown(record)
            if watch.to_supervisor >= 0:
                say(watch.to_supervisor, b"done")
        finally:
            os._exit(code)


def close_if_empty(record: state.Record, ns: tuple[int, int]) -> bool:
    """Under the lock that joins take, so no `nsfw run` can enter a sandbox that is being removed."""
    with state.locked():
        if processes_in(ns):
            return False
        current = state.load(record.id) or record  # the supervisor saved pids into it after the fork
        current.closing = True
        state.save(current)
        return True
