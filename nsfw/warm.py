"""Warm launches: `nsfw daemon` keeps the supervisor's code loaded and the sandboxes' kernel objects built, so
a launch pays neither for imports nor for namespaces and veths.

A cold `nsfw run` spends most of its time importing (pyroute2 alone loads 63 plugins), then building kernel
objects that the profile has no say in. The daemon imports everything once, and then keeps:

- two spare launchers: processes forked from it, waiting in accept() on the socket; one becomes the launch's
  supervisor. It runs exactly the code of a cold `nsfw run` (the same rules, keeper and clean-up) with the
  caller's arguments, environment, working directory and standard fds (passed over the socket), and sends
  back COMMAND's exit status. A spare lives SPARE_LIFETIME at most, so what it inherited (the firewall check
  below) is never old. Only the last spare is replaced at once; the rest of the daemon's work (another spare,
  the pool) waits until launches have left the CPU alone for FILL_DELAY;
- a pool of prebuilt sandboxes (sandbox.prebuild), POOL_SIZE of each kind launches asked for: a namespace with
  loopback up, none or nat, with the veth pair, its addresses and routes, and forwarding on. Each has a record
  that names the daemon as its owner, so `nsfw gc` removes it if the daemon dies, and ps, stop and joins
  ignore it. A launch takes one (sandbox._claim) and puts the profile's rulesets, keeper and COMMAND in it; an
  empty pool only means the launcher builds the sandbox itself. The daemon refills the pool (off the launch's
  path, as above) and removes what is left of it when it stops;
- the firewall check that a nat launch must pass (doctor.launch_blockers), done at most sandbox.BLOCKERS_TTL before
  the spare that uses it was forked. It only ever refuses a launch, so an answer a few seconds old can at
  worst start an app that a firewall added meanwhile blocks: what any launch racing that change would do.

What stays with the client (nsfw/warmclient.py, built-in modules only): relaying signals to the launcher, and
dying visibly: if the client is killed, the launcher kills itself, and the sandbox's keeper then kills
COMMAND's whole tree, exactly as when a cold supervisor is killed. Launches with a terminal on fd 0, 1 or 2 stay
cold: a process forked by a daemon cannot have the caller's controlling terminal, which interactive programs
need.
"""

from __future__ import annotations

import array
import gc
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import NoReturn

from . import state, warmclient

SOCKET = "/run/nsfw/warm.sock"
MAX_REQUEST = 1 << 20
POOL_SIZE = 2  # per kind: back-to-back launches of one kind find one ready while the other is rebuilt
SPARES = 2  # a second launch arriving during the first finds one too
SPARE_LIFETIME = 3.0
RETRY_AFTER = 5.0  # after a failed prebuild: the pool is an optimization, never a busy loop
FILL_DELAY = 0.1  # the pool is refilled once launches leave the CPU alone for this long (2 cores are common)


def _warm_up() -> None:
    """Everything a launch would import, now, and its pure parts run once: what they load or compile on first
    use (click's parser, yaml's constructors, regexes, libnftables, the compiler's tables) is then in the heap
    every launcher inherits, instead of being paid again by each launch."""
    from . import cli, keeper, launch, nft, reconcile, sandbox, session  # noqa: F401
    from . import compile as rules
    from . import profile as profiles
    from .doctor import launch_blockers  # noqa: F401 - the package loads a name's module when it is asked for
    from .names import HostEnv, Instance
    from .resolver import server  # noqa: F401

    try:
        with cli.cli.make_context("nsfw", ["run", "-p", "offline", "--", "true"]) as ctx:
            run = cli.cli.get_command(ctx, "run")
            if run is not None:
                run.make_context("run", ["-p", "offline", "--", "true"], parent=ctx).close()
        session.check(["true"], {}, 0)
        launch.invoking_user({}, 0)
        for name in ("offline", "default"):
            prof = profiles.load(name, profiles.search_path({}, "/nonexistent"))
            rules.sandbox_ruleset(prof, HostEnv(), ["10.0.0.1"])
            if prof.network == "nat":
                rules.host_ruleset(Instance("00000000", 0), prof)
        nft._ctx()
    except Exception:  # a rehearsal only: the launch itself reports what is wrong
        pass


class Daemon:
    def __init__(self, listener: socket.socket) -> None:
        from . import netns, sandbox
        from .names import PREFIX

        self.listener = listener
        self.notify_r, self.notify_w = os.pipe()  # launchers -> daemon: "took" a connection, "want" a kind
        os.set_blocking(self.notify_r, False)
        self.quit_r, self.quit_w = os.pipe()  # daemon -> spares: EOF when the daemon stops
        self.spares: dict[int, float] = {}
        default6 = netns.host_env(exclude_prefix=PREFIX).default6
        self.kinds = {sandbox.pool_kind("none", False): POOL_SIZE, sandbox.pool_kind("nat", default6): POOL_SIZE}
        self.retry: dict[str, float] = {}
        self.quiet_from = 0.0
        self.stopping = False

    def loop(self) -> None:
        while not self.stopping:
            self._reap()
            self._refresh_blockers()
            now = time.monotonic()
            # One spare at least, always, so that no launch waits for a fork; the second one, and the pool,
            # once launches leave the CPU to themselves (a spare forks twice more as it starts).
            if not self.spares or (len(self.spares) < SPARES and now >= self.quiet_from):
                self._fork_spare()
            wait = max(0.05, min((t + SPARE_LIFETIME for t in self.spares.values()), default=now + 1) - now)
            if self.stopping:
                return
            if now < self.quiet_from:
                wait = min(wait, self.quiet_from - now)
            elif len(self.spares) < SPARES or self._fill_one():  # more to do: go on at once
                wait = 0
            try:
                ready, _w, _x = select.select([self.notify_r], [], [], wait)
            except InterruptedError:
                continue
            if ready:
                self._read_notes()
                self.quiet_from = time.monotonic() + FILL_DELAY

    def _fork_spare(self) -> None:
        from . import sandbox

        sandbox.POOL_OWNER, sandbox.POOL_NOTIFY = os.getpid(), self.notify_w
        pid = os.fork()
        if pid == 0:
            os.close(self.notify_r)
            os.close(self.quit_w)
            _spare(self.listener, self.quit_r, self.notify_w)
        self.spares[pid] = time.monotonic()

    def _reap(self) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.spares.pop(pid, None)

    def _read_notes(self) -> None:
        try:
            data = os.read(self.notify_r, 4096)
        except BlockingIOError:
            return
        for line in data.decode(errors="replace").splitlines():
            word, _sp, arg = line.partition(" ")
            if word == "took" and arg.isdigit():
                self.spares.pop(int(arg), None)
            elif word == "done":  # a launch is over: a good moment for the work put off meanwhile
                pass
            elif word == "want" and arg in ("none", "nat", "nat6"):
                self.kinds.setdefault(arg, POOL_SIZE)

    def _refresh_blockers(self) -> None:
        from . import sandbox

        checked = sandbox.BLOCKERS_CHECKED
        # a margin, so that the answer a spare inherits is still fresh at the end of the spare's life
        if checked is None or time.monotonic() - checked[0] > sandbox.BLOCKERS_TTL - SPARE_LIFETIME - 0.5:
            from .doctor import launch_blockers

            try:
                sandbox.BLOCKERS_CHECKED = (time.monotonic(), launch_blockers())
            except Exception:  # the launch checks again, and says why
                sandbox.BLOCKERS_CHECKED = None

    def _pooled(self) -> list[state.Record]:
        return [r for r in state.records(include_pool=True)
                if r.pooled and r.supervisor_pid == os.getpid() and not r.closing]

    def _fill_one(self) -> bool:
        """Build one missing pooled sandbox, or remove one that went stale; True when there was something to do
        (there may be more)."""
        from . import netns, reconcile, sandbox
        from .names import PREFIX

        pooled = self._pooled()
        routes = netns.host_env(exclude_prefix=PREFIX).routes if any(r.network == "nat" for r in pooled) else ()
        for record in pooled:
            if sandbox.pool_stale(record, routes):
                with state.locked():  # read again: a launch may have taken it meanwhile, and then it is not ours
                    current = state.load(record.id)
                    if current is None or not current.pooled or current.supervisor_pid != os.getpid():
                        return True
                    current.closing = True  # no launch takes it from here on
                    state.save(current)
                reconcile.teardown(current)
                return True
        have: dict[str, int] = {}
        for r in pooled:
            kind = sandbox.pool_kind(r.network, bool(r.addresses[1:]))
            have[kind] = have.get(kind, 0) + 1
        now = time.monotonic()
        for kind, want in self.kinds.items():
            if have.get(kind, 0) < want and self.retry.get(kind, 0) <= now:
                try:
                    sandbox.prebuild("none" if kind == "none" else "nat", kind == "nat6")
                except Exception as e:
                    print(f"nsfw daemon: cannot build a {kind} sandbox ahead: {e}", file=sys.stderr, flush=True)
                    self.retry[kind] = now + RETRY_AFTER
                    return False
                return True
        return False

    def stop(self) -> None:
        """Spares leave (their quit pipe closes), launches under way go on, and the unused pool goes."""
        from . import reconcile

        os.close(self.quit_w)
        with state.locked():
            mine = self._pooled()
            for record in mine:  # no launch may take them from here on
                record.closing = True
                state.save(record)
        for record in mine:
            reconcile.teardown(record)


def _spare(listener: socket.socket, quit_r: int, notify_w: int) -> NoReturn:
    """A spare launcher: wait for one launch (or for the daemon to stop, or to grow old), then serve it."""
    code = 0
    try:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
        listener.setblocking(False)
        from . import launch, sandbox

        sandbox.PREFORKED = launch.prefork()  # COMMAND's process and the keeper: forked now, not on the launch's path
        sandbox.prefork_keeper()
        watcher = _Watcher()  # after the forks: they must not inherit its thread
        # The rehearsal once more, here: in a process forked from the daemon the first write to a page (a
        # reference count, a cache) copies it, a fault each; made now, while the spare waits, they are not
        # made on the launch's path (a few milliseconds of it).
        _warm_up()
        deadline = time.monotonic() + SPARE_LIFETIME
        while True:
            ready, _w, _x = select.select([listener, quit_r], [], [], max(0.0, deadline - time.monotonic()))
            if quit_r in ready or not ready:
                os._exit(0)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:  # another spare was faster
                continue
            break
        os.write(notify_w, b"took %d\n" % os.getpid())
        listener.close()
        os.close(quit_r)
        conn.setblocking(True)
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != 0:
            conn.close()
            os._exit(0)
        _launch(conn, watcher)
    except BaseException:
        code = 1
    os._exit(code)


def serve(path: str = SOCKET) -> NoReturn:
    """`nsfw daemon`: serve launches until told to stop. Only root may connect."""
    _warm_up()
    # Everything loaded so far lives as long as the daemon: out of the collector's sight, its pages stay
    # shared with every forked launch instead of being copied when the collector walks them.
    gc.collect()
    gc.freeze()
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)

    daemon = Daemon(listener)

    def leave(_signum: int, _frame: object) -> None:
        # Only a flag and a wake-up: an exception raised wherever the daemon happens to be (halfway through
        # building a sandbox, inside a library's lock) would leave half-built objects or be swallowed.
        daemon.stopping = True
        try:
            os.write(daemon.notify_w, b"stop\n")
        except OSError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, leave)
    try:
        daemon.loop()
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        try:
            os.unlink(path)  # new launches go cold from here
        except OSError:
            pass
        daemon.stop()
    raise SystemExit(0)

class _Watcher:
    """The thread that makes a launch die with its client, started in the spare ahead of the launch (a thread
    costs a forked process most of a millisecond to start): it waits for the launch's connection."""

    def __init__(self) -> None:
        self.told = threading.Event()  # the client has COMMAND's status: its leaving kills nothing any more
        self.conn: socket.socket | None = None
        self.given = threading.Lock()
        self.given.acquire()
        threading.Thread(target=self._watch, name="nsfw-client", daemon=True).start()

    def watch(self, conn: socket.socket) -> None:
        self.conn = conn
        self.given.release()

    def _watch(self) -> None:
        """The client is this launch's face: when it dies before it was told COMMAND's status, this supervisor
        dies too (and its keeper acts)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        self.given.acquire()
        assert self.conn is not None
        try:
            while self.conn.recv(64):
                pass
        except OSError:
            pass
        if not self.told.is_set():
            os.kill(os.getpid(), signal.SIGKILL)


def _launch(conn: socket.socket, watcher: _Watcher) -> NoReturn:
    """In the forked child: become the `nsfw run` the client would have been."""
    code = 125
    told = watcher.told
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the supervisor waits for its own children
        data, ancdata, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(3 * 4))
        fds = array.array("i")
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        argv, cwd, umask, env = warmclient.decode(data)
        if len(fds) != 3:
            raise ValueError("a launch brings its three standard fds")
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(cwd)
        os.umask(umask)
        os.environ.clear()
        os.environ.update(env)
        conn.send(b"pid %d" % os.getpid())
        from . import sandbox

        sandbox._T0 = time.monotonic()  # a warm launch starts now, not when the daemon did

        def tell(status: int) -> None:
            """COMMAND's status, as soon as it is known: the hand-over to the keeper then goes on alone, the
            client no longer this launch's face (its leaving must not kill the launcher midway)."""
            if not told.is_set():
                told.set()
                try:
                    conn.send(b"exit %d" % status)
                except OSError:
                    pass

        sandbox.EXITED = tell
        watcher.watch(conn)
        code = _run_cli(argv)
    except BaseException:
        code = 125
    finally:
        if not told.is_set():
            try:
                conn.send(b"exit %d" % code)
            except OSError:
                pass
        from . import sandbox

        sandbox._say_to_pool(b"done\n")
        os._exit(0)


def _run_cli(argv: list[str]) -> int:
    import sys

    from .cli import cli

    sys.stdout = os.fdopen(1, "w", closefd=False, buffering=1)
    sys.stderr = os.fdopen(2, "w", closefd=False, buffering=1)
    try:
        cli.main(args=argv, prog_name="nsfw")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0
