"""The root supervisor of one `nsfw run`: build the sandbox (or join the user's running one), start COMMAND
in it, wait, then hand the sandbox to its keeper, which removes it when its last process ends.

Every acquire is followed at once by the registration of its release, so whatever fails (or whichever signal
arrives) during setup, the ExitStack removes exactly what was made, in reverse order, and COMMAND never starts.
The record is written before the kernel objects it names, so a supervisor killed outright leaves a record from
which `nsfw gc` (and every later launch) removes the rest by name. Once COMMAND runs, the keeper owns it all.
"""

from __future__ import annotations

import ipaddress
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from . import compile as rules
from . import config, dns, forwarding, keeper, launch, netns, nft, reconcile, state, waiter
from .errors import NsfwError, SetupError
from .granter import Granter
from .names import PREFIX, HostEnv, Instance, IPAddress, IPNetwork, allocate_slot, new_id
from .profile import Profile

SETUP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
SETUP_STEPS = ("record", "netns", "veth", "forwarding", "host-rules", "sandbox-rules", "keeper", "command")
KEEPER_TIMEOUT = 10.0


class Interrupted(NsfwError):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name} before the command started")
        self.exit_code = 128 + signum


_T0 = time.monotonic()


def _fault(step: str) -> None:
    """Each step of a launch passes here. NSFW_TRACE=1 prints how long the launch took to reach it; the test-only
    switches fail or die at a chosen step, to prove that a failure removes exactly what was built (fail
    closed) and that a killed supervisor leaves only what clean-up by name removes."""
    if os.environ.get("NSFW_TRACE"):
        print(f"nsfw: {step} at {1000 * (time.monotonic() - _T0):.1f} ms", file=sys.stderr)
    if os.environ.get("NSFW_TEST_FAIL_AT") == step:
        raise SetupError(f"injected failure at step '{step}' (NSFW_TEST_FAIL_AT)")
    if os.environ.get("NSFW_TEST_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def _signals_abort_setup() -> Iterator[None]:
    def abort(signum: int, _frame: Any) -> NoReturn:
        raise Interrupted(signum)

    old = {s: signal.signal(s, abort) for s in SETUP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Teardown runs to the end: a second Ctrl-C must not leave half a sandbox behind."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SETUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@dataclass
class Keeper:
    pid: int
    to_keeper: int
    from_keeper: int

    def kill(self) -> None:
        """During setup only: the supervisor's own ExitStack removes what was built. Never raises."""
        for fd in (self.to_keeper, self.from_keeper):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def hand_over(self) -> bool:
        """COMMAND has exited: tell the keeper, which removes the sandbox (or keeps it while something else runs
        in it) on its own, after nsfw has returned COMMAND's status. False when the keeper is gone already.

        Not waiting for the removal is what keeps a launch short: deleting a veth and a table waits for the
        kernel's RCU grace periods (tens of ms). The keeper already owns every clean-up once COMMAND runs, and a
        keeper that dies is what `nsfw gc` and every later launch clean up after."""
        try:
            os.write(self.to_keeper, b"exit")
            handed = True
        except OSError:  # EPIPE: nobody reads the other end any more
            handed = False
        finally:
            os.close(self.to_keeper)
            os.close(self.from_keeper)
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return handed


@dataclass
class Started:
    pid: int
    record: state.Record
    keeper: Keeper | None  # None: this run joined a sandbox that another run keeps


def run(profile: Profile, argv: Sequence[str], user: launch.User, environ: Mapping[str, str], *,
        new: bool = False) -> int:
    """Run COMMAND as `user` in a sandbox for `profile`: the user's running one (unless `new`), else a new one.
    Returns COMMAND's exit status."""
    _fault("loaded")
    stack = ExitStack()
    try:
        with _signals_abort_setup():
            started = None if new else _join(profile, argv, user, environ)
            if started is None:
                started = _setup(stack, profile, argv, user, environ)
            stack.pop_all()  # COMMAND runs: from here the keeper owns the sandbox
        _fault("command")
        if POOL_OWNER:  # a warm launcher: its pages are the daemon's, shared, and its client needs its socket
            code = launch.wait_child(started.pid)
        else:  # after waiter.GRACE this process becomes the slim waiter, which does the rest and exits
            kept = started.keeper
            code = waiter.wait(started.pid, (kept.pid, kept.to_keeper, kept.from_keeper) if kept else None,
                               started.record.id)
    finally:
        with _signals_held():
            stack.close()
    with _signals_held():
        _fault("exited")
        if EXITED is not None:  # a warm launch: its client may return now, as the keeper already owns the sandbox
            EXITED(code)
        if started.keeper is not None and not started.keeper.hand_over():
            # the keeper died: nobody else will remove the sandbox, so this run does
            reconcile.kill_processes(started.record)
            reconcile.teardown(started.record)
    _fault("handed-over")
    return code


def _join(profile: Profile, argv: Sequence[str], user: launch.User, environ: Mapping[str, str]) -> Started | None:
    """Enter the user's running sandbox of the same profile (same content), as single-instance apps hand new
    windows to their running process anyway. The lock keeps its keeper from removing it meanwhile."""
    with state.locked():
        for record in state.records():
            if (record.uid == user.uid and record.profile == profile.name and not record.closing
                    and record.profile_sha256 == profile.sha256 and record.keeper_pid and state.alive(record)):
                pid = _spawn(record, argv, user, environ)
                return Started(pid, record, None)
    return None


def _spawn(record: state.Record, argv: Sequence[str], user: launch.User, environ: Mapping[str, str],
           prepared: launch.Preforked | None = None) -> int:
    # From here signals wait in the mask: wait_child relays whatever arrived while COMMAND was being started.
    signal.pthread_sigmask(signal.SIG_BLOCK, launch.DEFAULT_FORWARD)
    if prepared is None:
        prepared = _prepare_command(record, argv, user, environ)
    if prepared is not None:
        return prepared.start()
    fd = os.open(netns.path(record.netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return launch.spawn(argv, user=user, env=environ, netns_fd=fd,
                            in_child=dns.bind_name_files(state.sandbox_dir(record.id)))
    finally:
        os.close(fd)


def _prepare_command(record: state.Record, argv: Sequence[str], user: launch.User,
                     environ: Mapping[str, str]) -> launch.Preforked | None:
    """In a warm launcher: COMMAND's process, forked ahead, enters the sandbox and drops its privileges now,
    side by side with the rest of the setup; it execs only when _spawn says so. None in a cold run."""
    global PREFORKED
    child, PREFORKED = PREFORKED, None
    if child is not None:
        child.prepare(argv, user=user, env=environ, netns=netns.path(record.netns),
                      in_child=(dns.bind_name_files, (state.sandbox_dir(record.id),)))
    return child


def _setup(stack: ExitStack, profile: Profile, argv: Sequence[str], user: launch.User,
           environ: Mapping[str, str]) -> Started:
    nat = profile.network == "nat"
    if nat:
        blockers = _launch_blockers()
        if blockers:  # never more permissive than the profile, and never an app that silently cannot connect
            raise SetupError("another firewall on this host would drop this sandbox's traffic, so nsfw will not "
                             "start it:\n  " + "\n  ".join(blockers) + "\n(`nsfw doctor` checks it all again)")
    _fault("checked")
    env = netns.host_env(exclude_prefix=PREFIX) if nat else HostEnv()
    ipv6 = nat and profile.ipv6 and env.default6
    claimed = _claim(profile, argv, user, ipv6, env.routes) if POOL_OWNER else None
    if POOL_OWNER:
        _say_to_pool(b"want %s\n" % pool_kind(profile.network, ipv6).encode())
    if claimed is not None:
        record, inst = claimed
        _release_on_failure(stack, record, inst)
        _fault("record")
        if not nat:  # the pool loaded a `none` sandbox's table, the same for every profile, ahead (prebuild)
            return _arm(stack, record, inst, env, profile, argv, user, environ, ready=True)
    else:
        record, inst = _new_record(profile.network, ipv6, env.routes, profile=profile.name, profile_path=profile.path,
                                   profile_sha256=profile.sha256, command=list(argv), uid=user.uid, user=user.name)
        stack.callback(reconcile.release, record)
        _fault("record")
        _build(stack, inst, nat)
    return _arm(stack, record, inst, env, profile, argv, user, environ)


def _new_record(network: str, ipv6: bool, routes: Sequence[IPNetwork], **fields: Any) -> tuple[state.Record, Instance]:
    """A new sandbox's record, saved before any kernel object it names exists, and its instance."""
    nat = network == "nat"
    with state.locked():
        reconcile.reap_dead()
        slot = None
        conf = config.load()
        if nat:
            taken = [ipaddress.ip_network(a, strict=False) for r in state.records(include_pool=True)
                     for a in r.addresses]
            slot = allocate_slot((), routes, conf.pool4, conf.pool6, taken)
            if slot is None:
                raise SetupError(f"no free address for a new sandbox: every slot of the pool {conf.pool4} is taken "
                                 f"or routed by the host (stop some sandboxes, or widen pool: in {config.PATH})")
        inst = Instance(new_id(), slot, ipv6=ipv6, pool4=conf.pool4, pool6=conf.pool6)
        addresses = [str(a) for a in (inst.address4, inst.address6) if a] if nat else []
        record = state.new_record(id=inst.id, network=network, netns=inst.netns, slot=slot,
                                  veth=inst.veth if nat else None, table=inst.table if nat else None,
                                  addresses=addresses, **fields)
        state.save(record)
    return record, inst


def _build(stack: ExitStack, inst: Instance, nat: bool) -> None:
    """The sandbox's kernel objects, none of which depends on the profile: its namespace with loopback up and,
    for `nat`, the veth pair with its addresses and routes, and forwarding on. A warm daemon builds them
    ahead of launches (prebuild); the profile's rules go on at launch (_arm)."""
    netns.create(inst.netns)
    stack.callback(netns.remove, inst.netns)
    _fault("netns")
    if nat:
        netns.add_veth(inst.veth, inst.netns)
        stack.callback(netns.delete_link, inst.veth)
        _fault("veth")
        netns.configure_host_side(inst.veth, inst.gateway4, inst.gateway6)
        forwarding.enable(inst.ipv6)
        _fault("forwarding")
    netns.configure_sandbox_side(inst.netns, inst.address4 if nat else None, inst.gateway4 if nat else None,
                                 inst.address6, inst.gateway6)


def _arm(stack: ExitStack, record: state.Record, inst: Instance, env: HostEnv, profile: Profile,
         argv: Sequence[str], user: launch.User, environ: Mapping[str, str], ready: bool = False) -> Started:
    """The profile's part of a launch, on built kernel objects: the rulesets and files (unless `ready`: a pooled
    `none` sandbox has them already), the keeper, then COMMAND."""
    nat = profile.network == "nat"
    gateways = [str(a.ip) for a in (inst.gateway4, inst.gateway6) if a] if nat else []
    files = state.sandbox_dir(inst.id)
    stack.callback(state.drop_dir, inst.id)
    log = dns.create_log(files, user) if ready else dns.write_files(files, gateways[0] if gateways else None, user)
    # In a warm launch the keeper (forked ahead) starts the resolver, and COMMAND's process gets ready to exec,
    # while the rulesets go in: side by side (two cores are common); COMMAND execs only after all of it. A cold
    # launch forks its keeper after the rulesets instead: forked before, the pages the rulesets' work fills
    # would be the supervisor's alone rather than shared with the keeper (about 25 MiB more per sandbox).
    owned: Owned = (inst, profile, env.addresses, log) if nat else None
    prepared = None if nat else _prepare_command(record, argv, user, environ)  # nothing else takes longer
    kept = _start_keeper(record, owned) if PREFORKED_KEEPER is not None else None
    if kept is not None:
        stack.callback(kept.kill)
    if nat:  # after the keeper, whose resolver takes longer to start
        prepared = _prepare_command(record, argv, user, environ)
    if prepared is not None:
        stack.callback(prepared.close)
    if nat:
        stack.callback(nft.delete_table, inst.table)
        nft.apply(rules.host_ruleset(inst, profile), "host-side ruleset")
        _fault("host-rules")
    if not ready:
        with netns.entered(inst.netns):
            nft.apply(rules.sandbox_ruleset(profile, env, gateways), "sandbox ruleset")
    _fault("sandbox-rules")

    if kept is None:
        kept = _start_keeper(record, owned)
        stack.callback(kept.kill)
    _await_keeper(kept)
    record.keeper_pid, record.keeper_start = kept.pid, state.proc_start_time(kept.pid) or 0
    if prepared is not None:  # its pid is COMMAND's once it execs: one save for both, before it does
        record.command_pid = prepared.pid
    state.save(record)
    _fault("keeper")

    pid = _spawn(record, argv, user, environ, prepared)
    if record.command_pid != pid:
        record.command_pid = pid
        state.save(record)
    _fault("spawned")
    return Started(pid, record, kept)


# --- the warm daemon's pool ---------------------------------------------------------------------------------

POOL_OWNER = 0  # in a warm launcher: the pid of the daemon whose pooled sandboxes it may take
POOL_NOTIFY = -1  # and the pipe on which it tells the daemon what it took, to be built again
PREFORKED: launch.Preforked | None = None  # in a warm launcher: COMMAND's process, forked ahead
PREFORKED_KEEPER: Keeper | None = None  # and the keeper, waiting for its sandbox
BLOCKERS_CHECKED: tuple[float, list[str]] | None = None  # the daemon's launch_blockers(), and when (monotonic)
BLOCKERS_TTL = 5.0
EXITED: Callable[[int], None] | None = None  # in a warm launcher: tells the client COMMAND's exit status


def _launch_blockers() -> list[str]:
    """doctor.launch_blockers(), or the warm daemon's answer when it is recent (see warm.py)."""
    if BLOCKERS_CHECKED is not None and time.monotonic() - BLOCKERS_CHECKED[0] < BLOCKERS_TTL:
        return BLOCKERS_CHECKED[1]
    from .doctor import launch_blockers

    return launch_blockers()


def _say_to_pool(note: bytes) -> None:
    try:
        os.write(POOL_NOTIFY, note)
    except OSError:  # the daemon has gone: nobody refills, which is no launch's concern
        pass


def pool_kind(network: str, ipv6: bool) -> str:
    return "nat6" if network == "nat" and ipv6 else network


def prebuild(network: str, ipv6: bool) -> state.Record:
    """For the warm daemon: a sandbox's kernel objects with no profile, no keeper and no process, recorded as
    the daemon's (so that `nsfw gc` removes them if the daemon dies, and ps, stop and joins never see them).
    A failure removes what was built, and raises."""
    stack = ExitStack()
    with stack:
        routes = netns.host_env(exclude_prefix=PREFIX).routes if network == "nat" else ()
        record, inst = _new_record(network, ipv6, routes, pooled=True, profile="", profile_path="", profile_sha256="",
                                   command=[], uid=0, user="")
        stack.callback(reconcile.release, record)
        _build(stack, inst, network == "nat")
        if network == "none":  # its table and files depend on no profile (compile.loopback_ruleset)
            with netns.entered(inst.netns):
                nft.apply(rules.loopback_ruleset(), "sandbox ruleset")
            stack.callback(state.drop_dir, inst.id)
            dns.write_conf(state.sandbox_dir(inst.id), None)
        stack.pop_all()
    return record


def pool_stale(record: state.Record, routes: Sequence[IPNetwork]) -> bool:
    """A pooled sandbox whose addresses overlap a route the host gained since it was built (a VPN, a LAN):
    a launch would not have picked that slot, so none takes this sandbox (the daemon removes it)."""
    own = [ipaddress.ip_network(a, strict=False) for a in record.addresses]
    return any(r not in own and r.version == n.version and r.overlaps(n) for r in routes for n in own)


def _claim(profile: Profile, argv: Sequence[str], user: launch.User, ipv6: bool,
           routes: Sequence[IPNetwork]) -> tuple[state.Record, Instance] | None:
    """Take one of the daemon's pooled sandboxes of the kind this launch needs: from here it is this launch's,
    removed by it on failure and by its keeper after. None when the pool has none (then build one here)."""
    kind = pool_kind(profile.network, ipv6)
    conf = config.load()
    with state.locked():
        for record in state.records(include_pool=True):
            if (record.pooled and record.supervisor_pid == POOL_OWNER and pool_kind(record.network, bool(
                    record.addresses[1:])) == kind and not record.closing and not pool_stale(record, routes)
                    and os.path.exists(netns.path(record.netns))):
                record.pooled = False
                record.profile, record.profile_path, record.profile_sha256 = profile.name, profile.path, profile.sha256
                record.command, record.uid, record.user = list(argv), user.uid, user.name
                record.supervisor_pid, record.supervisor_start = os.getpid(), state.proc_start_time(os.getpid()) or 0
                record.started_at = time.time()
                state.save(record)
                return record, Instance(record.id, record.slot, ipv6=ipv6, pool4=conf.pool4, pool6=conf.pool6)
    return None


def _release_on_failure(stack: ExitStack, record: state.Record, inst: Instance) -> None:
    """What _new_record and _build registered, for a claimed sandbox: the same removal in the same order."""
    stack.callback(reconcile.release, record)
    stack.callback(netns.remove, inst.netns)
    if record.veth:
        stack.callback(netns.delete_link, record.veth)


def _start_owned(inst: Instance, profile: Profile, addresses: Sequence[IPAddress], log: str) -> Granter:
    """In the keeper: the resolver is its child, the granter its thread (returned: the keeper hands it on)."""
    granter = dns.start(inst, netns.path(inst.netns), profile, addresses, log).granter
    granter.start()
    return granter


Owned = tuple[Instance, Profile, tuple[IPAddress, ...], str] | None  # _start_owned's arguments; None: nothing


def _start_keeper(record: state.Record, owned: Owned) -> Keeper:
    global PREFORKED_KEEPER
    if PREFORKED_KEEPER is not None:
        kept, PREFORKED_KEEPER = PREFORKED_KEEPER, None
        try:
            keeper.send_sandbox(kept.to_keeper, record, owned)
        except OSError:
            kept.kill()
            raise SetupError("the sandbox's keeper, started ahead, is gone") from None
    else:
        kept = _fork_keeper(lambda from_supervisor, to_supervisor: keeper.keep(
            record, from_supervisor, to_supervisor, lambda: _start_owned(*owned) if owned else None))
    return kept


def _await_keeper(kept: Keeper) -> None:
    """Until the keeper says it runs what it owns; on failure, removes it and raises."""
    ready, _w, _x = select.select([kept.from_keeper], [], [], KEEPER_TIMEOUT)
    if not ready or os.read(kept.from_keeper, 16) != b"ready":
        kept.kill()
        raise SetupError("the sandbox's keeper did not start (its resolver could not bind port 53 on the "
                         "gateway?); run `nsfw doctor`")


def prefork_keeper() -> None:
    """For a warm launcher, before its launch arrives: the keeper, forked now, waits to be told its sandbox."""
    global PREFORKED_KEEPER

    def wait(from_supervisor: int, to_supervisor: int) -> NoReturn:
        keeper.close_all_but({from_supervisor, to_supervisor})  # what the launcher holds is not the keeper's
        record, owned = keeper.receive_sandbox(from_supervisor)
        keeper.keep(record, from_supervisor, to_supervisor, lambda: _start_owned(*owned) if owned else None)

    PREFORKED_KEEPER = _fork_keeper(wait)


def _fork_keeper(body: Callable[[int, int], NoReturn]) -> Keeper:
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the keeper process
        try:
            os.close(to_w)
            os.close(from_r)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # it may outlive the terminal, and must not hold a pipe's end open
                os.dup2(null, fd)
            os.close(null)
            body(to_r, from_w)
        finally:
            os._exit(1)
    os.close(to_r)
    os.close(from_w)
    return Keeper(pid, to_w, from_r)
