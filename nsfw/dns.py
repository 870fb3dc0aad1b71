"""Names inside a sandbox: what it sees (resolv.conf, nsswitch.conf), its resolver, and the granter.

The resolver runs on the host side as nobody, with no capabilities, so it cannot touch nftables itself: for
every address it is about to hand out for an allowed name, it asks the granter, a thread of the root
supervisor that lives in the sandbox's namespace, to add the address to that rule's set with a timeout. The
granter checks each request (a known set, an IP address, a bounded timeout) and answers only once the kernel
has the elements, so the app can connect the moment it has the answer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import caps, launch, nft
from .compile import FAMILY, TABLE, grant_set, name_groups
from .errors import SetupError
from .names import Instance, IPAddress
from .profile import Profile

NOBODY = launch.User(uid=65534, gid=65534, name="nobody", home="/nonexistent", groups=(65534,))
# The host resolver's side doors: systemd-resolved's varlink and D-Bus-free socket, nscd's cache socket.
HIDDEN_DIRS = ("/run/systemd/resolve", "/run/nscd", "/var/run/nscd")
NSSWITCH_KEEP = ("files", "myhostname", "dns")  # modules that never ask the host to resolve for us
MAX_TIMEOUT = 7 * 86400
# Browsers and getaddrinfo caches keep an address about a minute whatever its TTL: a grant shorter than that
# would block the app's next connection to an address it was rightly given. Never shorter than the TTL either.
MIN_GRANT = 60


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


READD_REFRESHES = _kernel_at_least(6, 10)
READY_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------------- what it sees


def resolv_conf(host_text: str, nameserver: str | None) -> str:
    """The sandbox's resolv.conf: its own resolver, with the host's search domains and options.
    With no resolver (`none`), loopback refuses at once, so a lookup fails now rather than after a timeout."""
    kept = [line for line in host_text.splitlines() if re.match(r"\s*(search|domain|options)\b", line)]
    head = "# written by nsfw: this sandbox's own resolver\n" if nameserver else \
        "# written by nsfw: this sandbox has no network, so no resolver\n"
    return head + f"nameserver {nameserver or '127.0.0.1'}\n" + "".join(line + "\n" for line in kept)


def nsswitch_conf(host_text: str) -> str:
    """The host's nsswitch.conf with a hosts: line that resolves through DNS (and files), never through a
    module that would ask a service on the host (resolve, mdns, wins, mymachines...)."""
    out, seen_hosts = [], False
    for line in host_text.splitlines():
        if re.match(r"\s*hosts\s*:", line):
            seen_hosts = True
            words = [w for w in line.split(":", 1)[1].split() if not w.startswith("[")]
            keep = [w for w in words if w in NSSWITCH_KEEP]
            if "dns" not in keep:
                keep.append("dns")
            line = "hosts: " + " ".join(keep)
        out.append(line)
    if not seen_hosts:
        out.append("hosts: files dns")
    return "\n".join(out) + "\n"


def _bind_ro(source: str, target: str) -> None:
    caps.mount(source, target, None, caps.MS_BIND)
    caps.mount(None, target, None, caps.MS_REMOUNT | caps.MS_BIND | caps.MS_RDONLY | caps.MS_NOSUID | caps.MS_NODEV)


def _tmpfs(path: str) -> None:
    caps.mount("nsfw", path, "tmpfs", caps.MS_NOSUID | caps.MS_NODEV | caps.MS_NOEXEC, "mode=0755,size=64k")


def bind_name_files(files_dir: str) -> Callable[[], None]:
    """What the sandbox's first process does, as root, in its private mount namespace, before exec."""

    def bind() -> None:
        hidden = []
        for d in HIDDEN_DIRS:
            if os.path.isdir(d) and not os.path.islink(d):
                _tmpfs(d)
                hidden.append(d)
        target = os.path.realpath("/etc/resolv.conf")
        if not os.path.exists(target):
            # a symlink into a directory we just hid (systemd-resolved's stub), or a dangling one
            parent = os.path.dirname(target)
            if parent not in hidden:
                if not os.path.isdir(parent):
                    raise SetupError(f"/etc/resolv.conf points to {target}, whose directory does not exist")
                _tmpfs(parent)
            with open(target, "w"):
                pass
        _bind_ro(os.path.join(files_dir, "resolv.conf"), target)
        nsswitch = os.path.realpath("/etc/nsswitch.conf")
        if os.path.exists(nsswitch):
            _bind_ro(os.path.join(files_dir, "nsswitch.conf"), nsswitch)

    return bind


def write_files(files_dir: str, nameserver: str | None, user: launch.User) -> str:
    """The sandbox's resolv.conf, nsswitch.conf and query log (readable by the user the sandbox is for)."""
    os.makedirs(files_dir, mode=0o755, exist_ok=True)
    os.chmod(files_dir, 0o755)
    for name, text in (("resolv.conf", resolv_conf(_read("/etc/resolv.conf"), nameserver)),
                       ("nsswitch.conf", nsswitch_conf(_read("/etc/nsswitch.conf")))):
        with open(os.path.join(files_dir, name), "w") as f:
            f.write(text)
    log = os.path.join(files_dir, "dns.log")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    os.fchown(fd, 0, user.gid)
    os.close(fd)
    return log


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- policy


def wants_open_names(profile: Profile) -> bool:
    """Names no rule mentions still resolve when the profile lets traffic reach the internet anyway: there,
    a lookup leaks nothing a connection could not. Otherwise they are refused without asking upstream."""
    return profile.default == "allow" or any(r.kind == "zone" and r.value in ("internet", "any")
                                             for r in profile.allow)


def policy_args(profile: Profile) -> tuple[list[tuple[str, str]], list[str], bool]:
    allow = [(rule.value, f"h{i}") for i, group in enumerate(name_groups(profile)) for rule in group]
    deny = [rule.value for rule in profile.deny if rule.kind == "host"]
    return allow, deny, wants_open_names(profile)


def ungrantable(host_addresses: Sequence[IPAddress]) -> Callable[[IPAddress], bool]:
    """A name never opens the host, loopback, multicast or unspecified addresses (DNS rebinding)."""
    host = set(host_addresses)

    def check(addr: IPAddress) -> bool:
        return addr in host or addr.is_loopback or addr.is_multicast or addr.is_unspecified or \
            (addr.version == 4 and addr == ipaddress.IPv4Address("255.255.255.255"))

    return check


# ---------------------------------------------------------------------------------------------- the granter


class Granter:
    """Root's half of an unprivileged resolver: adds checked addresses to this sandbox's grant sets."""

    def __init__(self, netns_path: str, groups: int, deny: bool, sock: socket.socket) -> None:
        self.netns_path, self.groups, self.deny, self.sock = netns_path, groups, deny, sock
        self.expiry: dict[tuple[str, str], float] = {}
        self.timeouts: dict[tuple[str, str], int] = {}  # the timeout last given to each element
        self.thread = threading.Thread(target=self._run, name="nsfw-granter", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        # Signals go to the supervisor's main thread, which relays them to COMMAND.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        fd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            caps.setns(fd, caps.CLONE_NEWNET)  # this thread only
        finally:
            os.close(fd)
        while True:
            try:
                msg = self.sock.recv(65536)
            except OSError:
                return
            if not msg:
                return
            try:
                self.apply(json.loads(msg))
                reply = b"ok"
            except (ValueError, TypeError, KeyError, SetupError) as e:
                reply = f"error {e}".encode()[:512]
            try:
                self.sock.send(reply)
            except OSError:
                return

    def _set_for(self, name: str, addr: IPAddress) -> str:
        if name == "deny" and self.deny:
            return f"dnsdeny{addr.version}"
        if name.startswith("h") and name[1:].isdigit() and int(name[1:]) < self.groups:
            return grant_set(int(name[1:]), addr.version)
        raise ValueError(f"unknown grant set {name!r}")

    def apply(self, grants: Sequence[Sequence[Any]]) -> None:
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


# ---------------------------------------------------------------------------------------------- the resolver


@dataclass
class Resolver:
    pid: int
    granter: Granter

    def stop(self) -> None:
        """Idempotent, never raises."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.granter.sock.close()


def _listeners(addresses: Sequence[str]) -> tuple[list[socket.socket], list[socket.socket]]:
    udp, tcp = [], []
    for a in addresses:
        fam = socket.AF_INET6 if ":" in a else socket.AF_INET
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.bind((a, 53))
        t = socket.socket(fam, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((a, 53))
        t.listen(64)
        udp.append(u)
        tcp.append(t)
    return udp, tcp


def _remote_grant(sock: socket.socket) -> Callable[[Sequence[Any]], None]:
    def grant(items: Sequence[Any]) -> None:
        sock.send(json.dumps([[g.set_name, g.address, int(g.timeout)] for g in items]).encode())
        reply = sock.recv(1024)
        if reply != b"ok":
            raise OSError(f"grant refused: {reply.decode(errors='replace')}")

    return grant


def start(inst: Instance, netns_path: str, profile: Profile, host_addresses: Sequence[IPAddress],
          log_path: str) -> Resolver:
    """Fork the sandbox's resolver: it binds port 53 on the gateway addresses, drops to nobody, and serves."""
    from .resolver.policy import Policy
    from .resolver.upstream import read_resolv_conf

    allow, deny, open_names = policy_args(profile)
    policy = Policy(allow, deny, open_names)
    upstreams = read_resolv_conf()
    addresses = [str(a.ip) for a in (inst.gateway4, inst.gateway6) if a is not None]
    never = ungrantable([*host_addresses, *(ipaddress.ip_address(a) for a in addresses)])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the resolver process
        code = 1
        try:
            ours.close()
            os.close(ready_r)
            caps.prctl(caps.PR_SET_PDEATHSIG, signal.SIGKILL)
            udp, tcp = _listeners(addresses)
            log = open(log_path, "a+b", buffering=0)  # noqa: SIM115 - readable: a full log keeps its newest half
            _keep_only({*(s.fileno() for s in (*udp, *tcp, theirs)), log.fileno(), ready_w})
            launch.drop_privileges(NOBODY)
            caps.prctl(caps.PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the uid change
            for s in launch.DEFAULT_FORWARD:  # the supervisor's handlers are not the resolver's
                signal.signal(s, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.write(ready_w, b"1")
            os.close(ready_w)
            from .resolver.server import serve

            serve(udp, tcp, policy=policy, upstreams=upstreams, grant=_remote_grant(theirs), log=log,
                  learn_denied=open_names, never_grant=never)
            code = 0
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    os.close(ready_w)
    granter = Granter(netns_path, len(name_groups(profile)), any(r.kind == "host" for r in profile.deny), ours)
    resolver = Resolver(pid, granter)
    try:
        import select

        ready, _w, _x = select.select([ready_r], [], [], READY_TIMEOUT)
        if not ready or os.read(ready_r, 1) != b"1":
            raise SetupError("the sandbox's resolver could not start: is another DNS server listening on port 53 of "
                             "every address (dnsmasq's default)? `nsfw doctor` checks it and says how to fix it")
    except BaseException:
        resolver.stop()
        raise
    finally:
        os.close(ready_r)
    return resolver  # the caller starts the granter once COMMAND is forked: no thread may exist at a fork


def _keep_only(keep: set[int]) -> None:
    """The resolver holds nothing of the supervisor's: its terminal and every other fd are closed."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)

