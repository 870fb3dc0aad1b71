#!/usr/bin/python3
"""A simulated host whose only uplink is a simulated internet, for nsfw's integration tests and `nsfw demo`.

Nothing built here touches the machine's own network: the "host" is a fresh network + mount namespace,
its default routes go over a veth into an "inet" namespace that owns documentation address ranges and
runs small servers, and a "lan" namespace stands for the home network. Everything dies with the world
process, and the world process dies with whoever started it.

Standalone on purpose (stdlib only, no import from the rest of nsfw, only from worldlib/ beside it): the
same code is the world's builder, its server processes, and a probe that an unprivileged user runs inside a
sandbox.

usage:
  world.py [--] CMD [ARGS...]            (root) run CMD on the simulated host; exits with CMD's status
  world.py probe tcp ADDR PORT           connect; 'open <banner>' | 'refused' | 'timeout' | 'blocked <errno>'
  world.py probe udp ADDR PORT           send one datagram, wait for the answer
  world.py probe dns NAME [SERVER]       ask SERVER (default: first resolv.conf nameserver) for A and AAAA
  world.py probe query NAME TYPE [SERVER] [tcp]
                                         one raw query; prints 'rcode RCODE' then 'NAME TTL TYPE DATA' lines
  world.py probe resolve NAME            libc resolver (getaddrinfo), as an application would
  world.py probe tcpname NAME PORT       resolve NAME (IPv4) with the libc resolver, then connect
  world.py info                          print the world's map (JSON)
  ("probe" may be left out: `world.py tcp 192.0.2.10 80` is the same probe.)

probe exit codes: 0 reached, 1 refused / reset / nxdomain, 2 timeout, 3 blocked locally (EPERM, EACCES,
unreachable), 4 anything else, 64 bad usage. NSFW_PROBE_TIMEOUT sets the timeout in seconds (default 2).

The map:
  host  (the world process) lo; uplink0 198.18.0.2/24 2001:db8:ff::2/64 with the default routes;
        lan0 10.77.0.1/24 fd77::1/64; private tmpfs /run; /etc/resolv.conf says nameserver 192.0.2.53;
        servers on every address: TCP 631 8631, UDP 9999; ip_forward 0
  inet  eth0 198.18.0.1/24 2001:db8:ff::1/64; on lo 192.0.2.10 .11 .12 .53 198.51.100.20 203.0.113.30
        203.0.113.53 2001:db8::10 ::20 ::53; TCP 22 53 80 443 853 8080, UDP 53 123 443 9999; DNS on 53;
        no route back beyond its link, so the host must NAT whatever it forwards
  lan   eth0 10.77.0.10/24 fd77::10/64, same servers; only its own link routed
Every DNS query that reaches a world server is appended to /run/world/dns.log (in the world's /run)
as "NAME QTYPE": the name in lower case without the final dot, the type as a mnemonic ("allowed.test AAAA",
"x.test TYPE99").
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

if not __package__:
    # Run by path (`python3 -I world.py ...`: the world process, probes, the command line) or loaded from a file:
    # -I keeps this file's directory off sys.path, so the directory is made a package of its own, for the
    # relative imports below to find worldlib beside this file, wherever it is (World copies both for probes).
    _here = os.path.dirname(os.path.abspath(__file__))
    __package__ = "_world_" + "".join(c if c.isalnum() else "_" for c in _here)
    if __package__ not in sys.modules:
        _package = types.ModuleType(__package__)
        _package.__path__ = [_here]
        sys.modules[__package__] = _package

# worldlib: after the block above, which makes these imports work when this file is run by path
from .worldlib.dnswire import (
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_ANY,
    QTYPE_CNAME,
    QTYPE_NS,
    QTYPE_OPT,
    QTYPE_SOA,
    RCODES,
    encode_name,
    type_code,
    type_name,
)
from .worldlib.host import _ns_inode, _snapshot_here, _world_main, _write
from .worldlib.layout import (
    _TOOL_PATH,
    BLOCKED,
    DEFAULT_TTL,
    DEFAULT_ZONE,
    DNS_LOG,
    DNS_PORT,
    GATEWAY4,
    GATEWAY6,
    HOST,
    HOST_LAN4,
    HOST_LAN6,
    HOST_TCP_PORTS,
    HOST_UDP_PORTS,
    HOST_UPLINK4,
    HOST_UPLINK6,
    INET,
    INET4_ADDRS,
    INET6_ADDRS,
    INET_ADDRS,
    LAN,
    LAN4,
    LAN6,
    LAN_ADDRS,
    LANLINK,
    NEGATIVE_TTL,
    NSFW_RUN_DIR,
    OTHER,
    PIDS_FILE,
    PROBE_KINDS,
    PROBE_TIMEOUT_ENV,
    PYTHON,
    REACHED,
    REFUSED,
    RESOLV_CONF,
    RESOLVER,
    RUN_DIR,
    TCP_PORTS,
    TIMEOUT,
    UDP_PORTS,
    UPLINK,
    USAGE,
    ZONE_FILE,
    Record,
    WorldError,
    Zone,
)
from .worldlib.probes import _probe_timeout, dns_query, probe_main
from .worldlib.servers import Servers
from .worldlib.zone import ZoneView, dns_reply, normalize_zone

# Everything world.py has always offered, wherever in worldlib it now lives
__all__ = [
    "BLOCKED", "DEFAULT_TTL", "DEFAULT_ZONE", "DNS_LOG", "DNS_PORT", "GATEWAY4", "GATEWAY6", "HOST", "HOST_LAN4",
    "HOST_LAN6", "HOST_TCP_PORTS", "HOST_UDP_PORTS", "HOST_UPLINK4", "HOST_UPLINK6", "INET", "INET4_ADDRS",
    "INET6_ADDRS", "INET_ADDRS", "LAN", "LAN4", "LAN6", "LANLINK", "LAN_ADDRS", "NEGATIVE_TTL", "NSFW_RUN_DIR",
    "OTHER", "PIDS_FILE", "PROBE_KINDS", "PROBE_TIMEOUT_ENV", "PYTHON", "QTYPE_A", "QTYPE_AAAA", "QTYPE_ANY",
    "QTYPE_CNAME", "QTYPE_NS", "QTYPE_OPT", "QTYPE_SOA", "RCODES", "REACHED", "REFUSED", "RESOLVER", "RESOLV_CONF",
    "RUN_DIR", "TCP_PORTS", "TIMEOUT", "UDP_PORTS", "UPLINK", "USAGE", "ZONE_FILE", "ProbeResult", "Record",
    "Servers", "World", "WorldError", "Zone", "ZoneView", "dns_query", "dns_reply", "encode_name", "main",
    "normalize_zone", "probe_main", "type_code", "type_name", "world_map",
]


def world_map(zone: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The map as data, for `world.py info` and for a demo that wants to show it."""
    return {
        HOST: {UPLINK: [f"{HOST_UPLINK4}/24", f"{HOST_UPLINK6}/64"], LANLINK: [f"{HOST_LAN4}/24", f"{HOST_LAN6}/64"],
               "resolver": RESOLVER, "tcp": list(HOST_TCP_PORTS), "udp": list(HOST_UDP_PORTS)},
        INET: {"eth0": [f"{GATEWAY4}/24", f"{GATEWAY6}/64"], "addrs": list(INET_ADDRS),
               "tcp": list(TCP_PORTS), "udp": list(UDP_PORTS)},
        LAN: {"eth0": [f"{LAN4}/24", f"{LAN6}/64"], "addrs": list(LAN_ADDRS),
              "tcp": list(TCP_PORTS), "udp": list(UDP_PORTS)},
        "zone": normalize_zone(DEFAULT_ZONE if zone is None else zone),
    }


# ------------------------------------------------------------------------------------------------ the API

@dataclass(frozen=True)
class ProbeResult:
    code: int  # REACHED, REFUSED, TIMEOUT, BLOCKED, OTHER (USAGE for a bad call)
    out: str  # stdout, stripped: 'open world inet 192.0.2.10 80 tcp from 198.18.0.2', 'timeout', ...
    err: str = ""

    @property
    def word(self) -> str:
        return self.out.split(" ", 1)[0] if self.out else ""

    @property
    def reached(self) -> bool:
        return self.code == REACHED


_PROBE_DIR_PREFIX = "nsfw-world-"


class World:
    """The simulated world. start() builds it (well under a second), stop() removes all of it.

        with World() as w:
            w.run(["nsfw", "run", "--", PYTHON, w.probe_script, "tcp", "192.0.2.10", "80"])
            w.probe("dns", "allowed.test").out       # '192.0.2.10 2001:db8::10'
            w.snapshot() == baseline                 # nothing left behind on the host

    zone: replaces DEFAULT_ZONE (merge with {**DEFAULT_ZONE, ...} to extend it); probe_dir: where the
    world-readable copy of the probe goes (default: the temp dir). The world process is bound to the thread
    that called start(): it dies when that thread ends (PDEATHSIG), as it does when the whole caller dies.
    """

    def __init__(self, *, zone: Mapping[str, Mapping[str, Any]] | None = None,
                 probe_dir: str | None = None, ready_timeout: float = 15.0) -> None:
        self.zone: Zone = normalize_zone(DEFAULT_ZONE if zone is None else zone)
        self._probe_parent = probe_dir
        self._ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._probe_dir: str | None = None
        self._pids: tuple[int, ...] = ()
        self._tools: dict[str, str] = {}
        self.startup_seconds: float | None = None  # how long the last start() took

    # -- lifecycle

    def __enter__(self) -> World:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> World:
        """Build the world; returns once every server listens. WorldError says why it could not."""
        if self._proc is not None:
            return self
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise WorldError("the world needs root (it builds network namespaces)")
        # Absolute paths: a caller's env= with a short PATH must not decide which tools run.
        tools = {t: shutil.which(t, path=_TOOL_PATH) for t in ("unshare", "nsenter", "ip")}
        missing = [t for t, path in tools.items() if path is None] + ([] if os.access(PYTHON, os.X_OK) else [PYTHON])
        if missing:
            raise WorldError(f"the world needs {', '.join(missing)} (apt-get install iproute2 util-linux python3)")
        self._tools = {t: str(path) for t, path in tools.items()}
        try:
            self._make_probe_dir()
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - held for the world's life, closed in stop()
            config = {"parent": os.getpid(), "netns": _ns_inode("net"), "mntns": _ns_inode("mnt"), "zone": self.zone}
            self._proc = proc = subprocess.Popen(
                [self._tools["unshare"], "--mount", "--net", "--propagation", "private", "--",
                 PYTHON, "-I", "-S", os.path.abspath(__file__), "--world"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                start_new_session=True,  # terminal signals belong to the command in the world, not the world
            )
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(config).encode() + b"\n")
            proc.stdin.flush()
            if self._read_line(proc.stdout.fileno(), t0 + self._ready_timeout) != b"ready\n":
                late = "" if proc.poll() is not None else f" within {self._ready_timeout:g} s"
                raise WorldError(f"the world did not start{late}: {self._stderr_text() or 'no message'}")
            with open(f"/proc/{proc.pid}/root{PIDS_FILE}") as f:
                self._pids = tuple(int(p) for p in f.read().split())
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Remove the world; idempotent, never raises."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()  # EOF: the world process takes everything down
                proc.wait(timeout=5)
            except Exception:
                try:
                    proc.kill()  # its servers follow through PDEATHSIG
                    proc.wait(timeout=5)
                except Exception:
                    pass
            with contextlib.suppress(Exception):
                if proc.stdout is not None:
                    proc.stdout.close()
        if self._stderr is not None:
            with contextlib.suppress(Exception):
                self._stderr.close()
            self._stderr = None
        if self._probe_dir is not None:
            shutil.rmtree(self._probe_dir, ignore_errors=True)
            self._probe_dir = None
        self._pids = ()

    @staticmethod
    def _read_line(fd: int, deadline: float) -> bytes:
        """One line, or what came of it before EOF or the deadline."""
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()
        except Exception:
            return ""

    def _make_probe_dir(self) -> None:
        parent = self._probe_parent or tempfile.gettempdir()
        # Directories of worlds whose owner was SIGKILLed; our pid in the name tells whose they were.
        for name in os.listdir(parent):
            pid = name[len(_PROBE_DIR_PREFIX):].split("-", 1)[0]
            path = os.path.join(parent, name)
            if (name.startswith(_PROBE_DIR_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}")
                    and os.lstat(path).st_uid == os.geteuid()):
                shutil.rmtree(path, ignore_errors=True)
        d = tempfile.mkdtemp(prefix=f"{_PROBE_DIR_PREFIX}{os.getpid()}-", dir=parent)
        os.chmod(d, 0o755)  # the sandboxed user must read the probe, nothing more
        script = os.path.join(d, "world.py")
        shutil.copyfile(os.path.abspath(__file__), script)
        os.chmod(script, 0o644)
        # ... and the package it imports, beside it as here
        lib = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worldlib")
        os.mkdir(os.path.join(d, "worldlib"))
        os.chmod(os.path.join(d, "worldlib"), 0o755)  # whatever the umask
        for name in sorted(os.listdir(lib)):
            if name.endswith(".py"):
                shutil.copyfile(os.path.join(lib, name), os.path.join(d, "worldlib", name))
                os.chmod(os.path.join(d, "worldlib", name), 0o644)
        self._probe_dir = d

    # -- state

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _live(self) -> subprocess.Popen[bytes]:
        # poll() without reaping a live child: as long as we have not reaped it, its pid cannot be reused,
        # so nsenter can never land in some other process's (or the machine's) namespaces
        if self._proc is None:
            raise WorldError("the world is not started")
        if self._proc.poll() is not None:
            raise WorldError(f"the world process died (status {self._proc.returncode}): {self._stderr_text()}")
        return self._proc

    @property
    def pid(self) -> int:
        """A process whose network and mount namespaces are the simulated host."""
        return self._live().pid

    @property
    def server_pids(self) -> tuple[int, ...]:
        """The world process and its server processes (for tests that check nothing outlives the world)."""
        return self._pids

    @property
    def probe_script(self) -> str:
        """A world-readable copy of this file, for probes run by an unprivileged user."""
        if self._probe_dir is None:
            raise WorldError("the world is not started")
        return os.path.join(self._probe_dir, "world.py")

    # -- running things

    def command(self, argv: Sequence[str], *, ns: str = HOST, cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """argv wrapped to run on the simulated host (or in its inet/lan namespace)."""
        if ns not in (HOST, INET, LAN):
            raise ValueError(f"ns must be one of {HOST!r}, {INET!r}, {LAN!r}")
        # nsenter --mount resets the working directory to "/": carry the caller's over
        wd = os.path.abspath(os.fspath(cwd)) if cwd is not None else os.getcwd()
        pid = self.pid
        inner = [self._tools["ip"], "netns", "exec", ns] if ns != HOST else []
        return [self._tools["nsenter"], f"--target={pid}", "--net", "--mount", f"--wd={wd}", "--", *inner, *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 60, ns: str = HOST,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """subprocess.run on the simulated host; text and captured output unless told otherwise."""
        kw.setdefault("text", True)
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        check = kw.pop("check", False)
        cmd = self.command(argv, ns=ns, cwd=kw.pop("cwd", None))
        result: subprocess.CompletedProcess[str] = subprocess.run(cmd, timeout=timeout, check=check, **kw)
        return result

    def popen(self, argv: Sequence[str], *, ns: str = HOST, **kw: Any) -> subprocess.Popen[str]:
        kw.setdefault("text", True)
        cmd = self.command(argv, ns=ns, cwd=kw.pop("cwd", None))
        proc: subprocess.Popen[str] = subprocess.Popen(cmd, **kw)
        return proc

    def probe_argv(self, kind: str, *args: str | int) -> list[str]:
        """The probe command line, to run through a sandbox: /usr/bin/python3 -I <copy> probe KIND ARGS."""
        return [PYTHON, "-I", self.probe_script, "probe", kind, *(str(a) for a in args)]

    def probe(self, kind: str, *args: str | int, timeout: float | None = None, ns: str = HOST) -> ProbeResult:
        """Run one probe on the simulated host (or in inet/lan); timeout overrides NSFW_PROBE_TIMEOUT."""
        env = dict(os.environ)
        if timeout is not None:
            env[PROBE_TIMEOUT_ENV] = str(timeout)
        # a probe waits at most twice its own timeout (dns asks two questions); this only guards a hang
        wait = _probe_timeout(env) * 4 + 10
        r = self.run(self.probe_argv(kind, *args), env=env, ns=ns, timeout=wait)
        return ProbeResult(r.returncode, r.stdout.strip(), r.stderr.strip())

    # -- looking at it

    def _run_file(self, path: str) -> str:
        # the world's private /run, seen from outside through the world process's root
        return f"/proc/{self.pid}/root{path}"

    def snapshot(self) -> dict[str, Any]:
        """State of the host namespace: netns, links, routes, nft ruleset, forwarding sysctls, /run/nsfw files,
        mounts under /run, and processes in the host's net or mount namespace other than the world's own."""
        r = self.run([PYTHON, "-I", "-S", os.path.abspath(__file__), "--snapshot"], timeout=60)
        if r.returncode:
            raise WorldError(f"snapshot failed: {r.stderr.strip()}")
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def dns_log(self) -> list[str]:
        """Every DNS query that reached a world server, oldest first, as 'NAME QTYPE'."""
        with open(self._run_file(DNS_LOG), encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()

    def clear_dns_log(self) -> None:
        with open(self._run_file(DNS_LOG), "w"):
            pass

    def set_zone(self, zone: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the zone of every world DNS server; the next query sees it."""
        self.zone = normalize_zone(zone)
        _write(self._run_file(ZONE_FILE), json.dumps(self.zone, indent=1))


# ------------------------------------------------------------------------------------------------ command line

def _run_in_world(cmd: Sequence[str]) -> int:
    try:
        world = World().start()
    except WorldError as e:
        print(f"world: {e}", file=sys.stderr)
        return 125
    try:
        try:
            child = world.popen(cmd, stdin=None, stdout=None, stderr=None)
        except OSError as e:
            print(f"world: {e}", file=sys.stderr)
            return 127
        # Ctrl-C belongs to the command; a SIGTERM for us is passed on so that the command ends first
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        code = child.wait()
        return 128 - code if code < 0 else code
    finally:
        world.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--world"], ["--snapshot"]):
        os.environ["PATH"] = f"{_TOOL_PATH}:{os.environ.get('PATH', '')}"
    if args[:1] == ["--world"]:
        return _world_main()
    if args[:1] == ["--snapshot"]:
        print(json.dumps(_snapshot_here()))
        return 0
    if args[:1] == ["probe"]:
        return probe_main(args[1:])
    if args[:1] and args[0] in PROBE_KINDS:
        return probe_main(args)
    if args[:1] == ["info"]:
        print(json.dumps(world_map(), indent=1))
        return 0
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else USAGE
    if os.geteuid() != 0:
        print("world: run as root (it builds network namespaces)", file=sys.stderr)
        return 125
    return _run_in_world(args)


if __name__ == "__main__":
    status = main()
    with contextlib.suppress(BrokenPipeError):  # `world.py info | head`
        sys.stdout.flush()
        sys.stderr.flush()
    # not sys.exit(): a getaddrinfo thread still stuck in libc after a probe timed out must not hold the exit up
    os._exit(status)
