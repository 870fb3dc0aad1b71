"""The root supervisor of one `nsfw run`: build the sandbox, start COMMAND in it, wait, remove everything.

Every acquire is followed at once by the registration of its release, so whatever fails (or whichever signal
arrives) during setup, the ExitStack removes exactly what was made, in reverse order, and COMMAND never starts.
The record is written before the kernel objects it names, so a supervisor killed outright leaves a record from
which `reap_dead` (run by every launch) removes the rest by name.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NoReturn

from . import compile as rules
from . import dns, launch, netns, nft, state
from .errors import NsfwError, SetupError
from .names import PREFIX, HostEnv, Instance, allocate_slot, new_id
from .profile import Profile

SETUP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(NsfwError):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name} before the command started")
        self.exit_code = 128 + signum


SETUP_STEPS = ("record", "netns", "veth", "host-rules", "forwarding", "resolver", "sandbox-rules")


def _fault(step: str) -> None:
    """Test-only switches: fail or die at a chosen step of the setup, to prove that a failure removes exactly
    what was built (fail closed) and that a killed supervisor leaves only what clean-up by name removes."""
    if os.environ.get("NSFW_TEST_FAIL_AT") == step:
        raise SetupError(f"injected failure at step '{step}' (NSFW_TEST_FAIL_AT)")
    if os.environ.get("NSFW_TEST_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- host forwarding


def _enable_forwarding(ipv6: bool) -> None:
    """Turn on forwarding for the sandboxes, remembering first what it was, so the last sandbox can put it back.
    Where nsfw had to turn it on, a guard table keeps the host from forwarding anything else."""
    with state.locked():
        saved = state.load_forwarding() or {}
        before = dict(saved)
        if "ipv4" not in saved:
            saved["ipv4"] = netns.read_sysctl("net.ipv4.ip_forward") or "0"
        if ipv6 and "ipv6" not in saved:
            saved["ipv6"] = netns.read_sysctl("net.ipv6.conf.all.forwarding") or "0"
            # forwarding=1 makes the kernel ignore router advertisements where accept_ra=1; 2 keeps them
            saved["accept_ra"] = [i for i in _interfaces() if netns.read_sysctl(f"net.ipv6.conf.{i}.accept_ra") == "1"]
        if saved != before:
            state.save_forwarding(saved)
        netns.write_sysctl("net.ipv4.ip_forward", "1")
        if ipv6:
            for iface in saved.get("accept_ra", []):
                netns.write_sysctl(f"net.ipv6.conf.{iface}.accept_ra", "2")
            netns.write_sysctl("net.ipv6.conf.all.forwarding", "1")
        families = [f for f, key in (("ipv4", "ipv4"), ("ipv6", "ipv6")) if saved.get(key) == "0"]
        if families:
            nft.apply(rules.guard_ruleset(families), "forwarding guard")


def _interfaces() -> list[str]:
    try:
        return sorted(i for i in os.listdir("/proc/sys/net/ipv6/conf") if i not in ("all", "default"))
    except FileNotFoundError:
        return []


def _restore_forwarding() -> None:
    """With no sandbox left, put forwarding back as nsfw found it. Caller holds the lock. Never raises."""
    saved = state.load_forwarding()
    if saved is None:
        return
    try:
        if "ipv6" in saved:
            netns.write_sysctl("net.ipv6.conf.all.forwarding", saved["ipv6"])
            for iface in saved.get("accept_ra", []):
                if netns.read_sysctl(f"net.ipv6.conf.{iface}.accept_ra") is not None:
                    netns.write_sysctl(f"net.ipv6.conf.{iface}.accept_ra", "1")
        netns.write_sysctl("net.ipv4.ip_forward", saved["ipv4"])
    except NsfwError:
        return
    nft.delete_table(rules.GUARD_TABLE)
    state.drop_forwarding()


# ---------------------------------------------------------------------------------------------- teardown


def remove_objects(record: state.Record) -> list[str]:
    """Delete by name everything a record describes, in reverse order of creation. Idempotent, never raises."""
    removed = []
    if record.table and nft.delete_table(record.table):
        removed.append(f"table inet {record.table}")
    if record.veth and netns.delete_link(record.veth):
        removed.append(f"link {record.veth}")
    if netns.remove(record.netns):
        removed.append(f"netns {record.netns}")
    if state.drop_dir(record.id):
        removed.append(f"files {state.sandbox_dir(record.id)}")
    return removed


def _release(record: state.Record) -> None:
    with state.locked():
        state.drop(record.id)
        if not state.records():
            _restore_forwarding()


def reap_dead() -> list[state.Record]:
    """Remove the sandboxes whose supervisors are gone. Caller holds the lock. Cheap when there are none."""
    dead = [r for r in state.records() if not state.alive(r)]
    for record in dead:
        remove_objects(record)
        state.drop(record.id)
    if dead and not state.records():
        _restore_forwarding()
    return dead


# ---------------------------------------------------------------------------------------------- launch


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


def run(profile: Profile, argv: Sequence[str], user: launch.User, environ: Mapping[str, str]) -> int:
    """Build the sandbox, run COMMAND in it as `user`, tear it down; return COMMAND's exit status."""
    stack = ExitStack()
    try:
        with _signals_abort_setup():
            pid = _setup(stack, profile, argv, user, environ)
        return launch.wait_child(pid)
    finally:
        with _signals_held():
            stack.close()


def _setup(stack: ExitStack, profile: Profile, argv: Sequence[str], user: launch.User,
           environ: Mapping[str, str]) -> int:
    nat = profile.network == "nat"
    with state.locked():
        reap_dead()
        env = netns.host_env(exclude_prefix=PREFIX) if nat else HostEnv()
        slot = None
        if nat:
            slot = allocate_slot((r.slot for r in state.records() if r.slot is not None), env.routes)
            if slot is None:
                raise SetupError("no free address for a new sandbox: every slot of the pool is taken or routed "
                                 "by the host (stop some sandboxes, or run `nsfw gc`)")
        inst = Instance(new_id(), slot, ipv6=nat and profile.ipv6 and env.default6)
        addresses = [str(a) for a in (inst.address4, inst.address6) if a] if nat else []
        record = state.new_record(
            id=inst.id, profile=profile.name, profile_path=profile.path, profile_sha256=profile.sha256,
            command=list(argv), uid=user.uid, user=user.name, network=profile.network, netns=inst.netns,
            slot=slot, veth=inst.veth if nat else None, table=inst.table if nat else None, addresses=addresses)
        state.save(record)
    stack.callback(_release, record)
    _fault("record")

    netns.create(inst.netns)
    stack.callback(netns.remove, inst.netns)
    _fault("netns")
    gateways: list[str] = []
    if nat:
        netns.add_veth(inst.veth, inst.netns)
        stack.callback(netns.delete_link, inst.veth)
        _fault("veth")
        netns.configure_host_side(inst.veth, inst.gateway4, inst.gateway6)
        stack.callback(nft.delete_table, inst.table)
        nft.apply(rules.host_ruleset(inst, profile), "host-side ruleset")
        _fault("host-rules")
        _enable_forwarding(inst.ipv6)
        _fault("forwarding")
        gateways = [str(a.ip) for a in (inst.gateway4, inst.gateway6) if a]
    netns.configure_sandbox_side(inst.netns, inst.address4 if nat else None, inst.gateway4 if nat else None,
                                 inst.address6, inst.gateway6)
    files = state.sandbox_dir(inst.id)
    stack.callback(state.drop_dir, inst.id)
    log = dns.write_files(files, gateways[0] if gateways else None, user)
    resolver = None
    if nat:
        resolver = dns.start(inst, netns.path(inst.netns), profile, env.addresses, log)
        stack.callback(resolver.stop)
        _fault("resolver")
    with netns.entered(inst.netns):
        nft.apply(rules.sandbox_ruleset(profile, env, gateways), "sandbox ruleset")
    _fault("sandbox-rules")

    fd = os.open(netns.path(inst.netns), os.O_RDONLY | os.O_CLOEXEC)
    # From here signals wait in the mask: wait_child relays whatever arrived while COMMAND was being started.
    signal.pthread_sigmask(signal.SIG_BLOCK, launch.DEFAULT_FORWARD)
    try:
        pid = launch.spawn(argv, user=user, env=environ, netns_fd=fd, in_child=dns.bind_name_files(files))
    finally:
        os.close(fd)
    if resolver is not None:
        resolver.granter.start()
    return pid
