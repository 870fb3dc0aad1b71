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
import os
import re
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import caps, launch
from .compile import name_groups
from .errors import SetupError
from .granter import MIN_GRANT, Granter
from .names import Instance, IPAddress
from .profile import Profile

NOBODY = launch.User(uid=65534, gid=65534, name="nobody", home="/nonexistent", groups=(65534,))
# The host resolver's side doors: systemd-resolved's varlink and D-Bus-free socket, nscd's cache socket.
HIDDEN_DIRS = ("/run/systemd/resolve", "/run/nscd", "/var/run/nscd")
NSSWITCH_KEEP = ("files", "myhostname", "dns")  # modules that never ask the host to resolve for us
READY_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------------- what it sees

# Compiled at import: re's own cache is filled per process, and a warm launch's process would compile them anew.
_KEPT_LINE = re.compile(r"\s*(search|domain|options)\b")
_HOSTS_LINE = re.compile(r"\s*hosts\s*:")


def resolv_conf(host_text: str, nameserver: str | None) -> str:
    """The sandbox's resolv.conf: its own resolver, with the host's search domains and options.
    With no resolver (`none`), loopback refuses at once, so a lookup fails now rather than after a timeout."""
    kept = [line for line in host_text.splitlines() if _KEPT_LINE.match(line)]
    head = "# written by nsfw: this sandbox's own resolver\n" if nameserver else \
        "# written by nsfw: this sandbox has no network, so no resolver\n"
    return head + f"nameserver {nameserver or '127.0.0.1'}\n" + "".join(line + "\n" for line in kept)


def nsswitch_conf(host_text: str) -> str:
    """The host's nsswitch.conf with a hosts: line that resolves through DNS (and files), never through a
    module that would ask a service on the host (resolve, mdns, wins, mymachines...)."""
    out, seen_hosts = [], False
    for line in host_text.splitlines():
        if _HOSTS_LINE.match(line):
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
    write_conf(files_dir, nameserver)
    return create_log(files_dir, user)


def write_conf(files_dir: str, nameserver: str | None) -> None:
    """The sandbox's resolv.conf and nsswitch.conf, which depend on no profile nor user: the warm daemon's pool
    writes a `none` sandbox's ahead (sandbox.prebuild)."""
    os.makedirs(files_dir, mode=0o755, exist_ok=True)
    os.chmod(files_dir, 0o755)
    for name, text in (("resolv.conf", resolv_conf(_read("/etc/resolv.conf"), nameserver)),
                       ("nsswitch.conf", nsswitch_conf(_read("/etc/nsswitch.conf")))):
        with open(os.path.join(files_dir, name), "w") as f:
            f.write(text)


def create_log(files_dir: str, user: launch.User) -> str:
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
    from .resolver.entry import never_grant  # the resolver's own image builds it too

    return never_grant(host_addresses)


# ---------------------------------------------------------------------------------------------- the granter


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


def start(inst: Instance, netns_path: str, profile: Profile, host_addresses: Sequence[IPAddress],
          log_path: str) -> Resolver:
    """Fork the sandbox's resolver: it binds port 53 on the gateway addresses, drops to nobody, and serves."""
    from .resolver.policy import Policy
    from .resolver.upstream import read_resolv_conf

    policy = policy_args(profile)
    Policy(*policy)  # a pattern it cannot take fails the launch here, not in the resolver after "ready"
    upstreams = read_resolv_conf()
    addresses = [str(a.ip) for a in (inst.gateway4, inst.gateway6) if a is not None]
    never = [*map(str, host_addresses), *addresses]
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
            _serve_slim(udp, tcp, theirs, log.fileno(), policy, upstreams, never, MIN_GRANT)
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


def _serve_slim(udp: Sequence[socket.socket], tcp: Sequence[socket.socket], granter: socket.socket, log: int,
                policy: tuple[list[tuple[str, str]], list[str], bool], upstreams: Sequence[str],
                never: Sequence[str], min_grant: int) -> None:
    """In the resolver, bound and unprivileged: exec its own image (resolver/entry.py), which holds none of the
    keeper's heap. Returns only if the exec failed: then this image serves, as it did before."""
    from .resolver import entry

    fds = [s.fileno() for s in (*udp, *tcp, granter)]
    for fd in (*fds, log):
        os.set_inheritable(fd, True)
    argv = entry.argv(entry.pack(fds[:len(udp)], fds[len(udp):len(udp) + len(tcp)], granter.fileno(), log,
                                 *policy, upstreams, never, min_grant))
    try:
        os.execv(argv[0], argv)
    except OSError:
        pass
    from .resolver.policy import Policy
    from .resolver.server import Limits, serve

    serve(udp, tcp, policy=Policy(*policy), upstreams=upstreams, grant=entry.remote_grant(granter),
          log=open(log, "a+b", buffering=0, closefd=False), learn_denied=policy[2],  # noqa: SIM115
          never_grant=ungrantable([ipaddress.ip_address(a) for a in never]), limits=Limits(min_grant=min_grant))


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

