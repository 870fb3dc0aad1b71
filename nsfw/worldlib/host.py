"""The world process: it lays out the simulated host in fresh namespaces, runs the servers, and takes snapshots.

It runs as root inside `unshare --mount --net` (World.start) and refuses to build anywhere else; its server
processes and it die with whoever started it (PDEATHSIG), and everything they built goes with them.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from .layout import (
    DNS_LOG,
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
    INET_ADDRS,
    LAN,
    LAN4,
    LAN6,
    LANLINK,
    NSFW_RUN_DIR,
    PIDS_FILE,
    RESOLV_CONF,
    RESOLVER,
    RUN_DIR,
    TCP_PORTS,
    UDP_PORTS,
    UPLINK,
    ZONE_FILE,
    WorldError,
)
from .servers import Servers
from .zone import _ZoneFile

# ------------------------------------------------------------------------------------------------ kernel helpers

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(_libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                         ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")


def _setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc().setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def _die_with_parent(parent: int) -> None:
    _check(_libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the death signal was armed


def _ns_inode(kind: str, pid: int | str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def _write(path: str, text: str, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _ip_batch(lines: Sequence[str], netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    r = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False)
    if r.returncode:
        raise WorldError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


def _sysctls(values: Mapping[str, str]) -> None:
    # /proc/sys/net belongs to the network namespace of whoever opens it: here, the world's host
    for key, value in values.items():
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value + "\n")


def _addr(a: str) -> str:
    # nodad: the world must be usable at once, not after IPv6 duplicate address detection
    return f"{a} nodad" if ":" in a else a


# ------------------------------------------------------------------------------------------------ the world process

def _build(config: Mapping[str, Any]) -> None:
    """Lay out the host namespace; runs as the world process, after unshare."""
    # The one guard between a bug here and the machine's real network: never build in the caller's namespaces.
    if _ns_inode("net") == config["netns"] or _ns_inode("mnt") == config["mntns"]:
        raise WorldError("refusing to build: not in a fresh network + mount namespace")
    resolv_target = os.path.realpath(RESOLV_CONF)
    _mount("nsfw-world-run", "/run", "tmpfs", 0, "mode=755")
    os.makedirs("/run/netns", mode=0o755)
    os.makedirs(RUN_DIR, mode=0o755)
    _write(f"{RUN_DIR}/resolv.conf", f"nameserver {RESOLVER}\n")
    if resolv_target.startswith("/run/"):
        # /etc/resolv.conf is a link into /run (systemd-resolved): our tmpfs now stands where it points
        os.makedirs(os.path.dirname(resolv_target), mode=0o755, exist_ok=True)
        _write(resolv_target, f"nameserver {RESOLVER}\n")
    else:
        _mount(f"{RUN_DIR}/resolv.conf", resolv_target, None, _MS_BIND, None)
    _write(ZONE_FILE, json.dumps(config["zone"], indent=1))
    _write(DNS_LOG, "")
    # A new namespace may inherit the machine's IPv4 values; the host's baseline is "not a router".
    _sysctls({"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0",
              "net/ipv6/conf/default/forwarding": "0"})
    _ip_batch([
        "link set lo up",
        f"netns add {INET}",
        f"netns add {LAN}",
        f"link add {UPLINK} type veth peer name eth0 netns {INET}",
        f"link add {LANLINK} type veth peer name eth0 netns {LAN}",
    ])
    # No duplicate address detection on the world's own links, link-local addresses included: the kernel adds
    # their local routes only once DAD is over, a second or two after start(), and a snapshot taken before would
    # differ from one taken after. Only these two links: those nsfw makes behave as on a real machine.
    _sysctls({f"net/ipv6/conf/{link}/accept_dad": "0" for link in (UPLINK, LANLINK)})
    # Links go up before they get addresses: IPv6 addresses added (nodad) to a link that is still down lose the
    # first neighbour solicitations after it comes up, and the first IPv6 connection would wait a second.
    _ip_batch([
        f"link set {UPLINK} up",
        f"link set {LANLINK} up",
        f"addr add {HOST_UPLINK4}/24 dev {UPLINK}",
        f"addr add {_addr(HOST_UPLINK6 + '/64')} dev {UPLINK}",
        f"addr add {HOST_LAN4}/24 dev {LANLINK}",
        f"addr add {_addr(HOST_LAN6 + '/64')} dev {LANLINK}",
        f"route add default via {GATEWAY4}",
        f"route add default via {GATEWAY6}",
    ])
    # No default route in inet or lan: only their own link is routed, so whatever the host forwards without
    # NAT gets no answer, as on the real internet.
    _ip_batch([
        "link set lo up",
        "link set eth0 up",
        f"addr add {GATEWAY4}/24 dev eth0",
        f"addr add {_addr(GATEWAY6 + '/64')} dev eth0",
        *(f"addr add {a}/{128 if ':' in a else 32} dev lo" for a in INET_ADDRS),
    ], INET)
    _ip_batch([
        "link set lo up",
        "link set eth0 up",
        f"addr add {LAN4}/24 dev eth0",
        f"addr add {_addr(LAN6 + '/64')} dev eth0",
    ], LAN)


def _fork_servers(label: str, parent: int) -> tuple[int, int]:
    """A server process inside the named netns; returns (pid, fd that reads 'ready')."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return pid, r
    try:
        os.close(r)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent(parent)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        _setns(f"/run/netns/{label}", _CLONE_NEWNET)
        servers = Servers(label, TCP_PORTS, UDP_PORTS, _ZoneFile(ZONE_FILE), DNS_LOG)
        servers.bind()
        os.write(w, b"ready\n")
        os.close(w)
        servers.serve_forever()
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)  # serve_forever() only ends by an error


def _world_main() -> int:
    """The world process: host namespace, host servers, parent of the inet and lan server processes."""
    # Ctrl-C in a terminal reaches the whole process group; the world stops when its owner says so, not then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(_sig: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    config = json.loads(sys.stdin.buffer.readline())
    _die_with_parent(config["parent"])
    children: list[int] = []
    try:
        _build(config)
        me = os.getpid()
        # fork before any thread exists in this process
        ready = []
        for label in (INET, LAN):
            pid, fd = _fork_servers(label, me)
            children.append(pid)
            ready.append((label, fd))
        host = Servers(HOST, HOST_TCP_PORTS, HOST_UDP_PORTS, None, None)
        host.bind()
        threading.Thread(target=host.serve_forever, daemon=True).start()
        for label, fd in ready:
            with os.fdopen(fd, "rb") as f:
                if f.readline() != b"ready\n":
                    raise WorldError(f"the {label} servers did not start (see above)")
        _write(PIDS_FILE, " ".join(str(p) for p in (me, *children)) + "\n")
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        # EOF on stdin is the stop signal; it also comes when the owner dies without a word
        while sys.stdin.buffer.read(65536):
            pass
    except SystemExit:
        pass
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        if os.path.exists(f"/run/netns/{INET}"):
            # The namespaces would go with this mount namespace anyway, but a process left inside it
            # (nsenter from a test) would keep them alive: take them down now.
            subprocess.run(["ip", "-batch", "-"], input=f"netns del {INET}\nnetns del {LAN}\n",
                           capture_output=True, text=True, check=False)
    return 0


# ------------------------------------------------------------------------------------------------ snapshot

_SNAPSHOT_SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/default/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/default/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/conf/default/route_localnet",
)


def _json_cmd(argv: Sequence[str]) -> Any:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode:
        raise WorldError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return json.loads(r.stdout or "null")


def _snapshot_here() -> dict[str, Any]:
    """The host namespace's state; runs inside it (World.snapshot enters it)."""
    links = []
    for link in _json_cmd(["ip", "-j", "-d", "address", "show"]) or []:
        links.append({
            "name": link["ifname"],
            "kind": (link.get("linkinfo") or {}).get("info_kind"),
            "up": "UP" in link.get("flags", []),
            "addresses": sorted(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if "local" in a),
        })
    routes: dict[str, list[Any]] = {}
    for fam in ("4", "6"):
        rows = _json_cmd(["ip", "-j", f"-{fam}", "route", "show", "table", "all"]) or []
        for row in rows:
            row.pop("expires", None)
        routes[fam] = sorted(rows, key=lambda row: json.dumps(row, sort_keys=True))
    nft = [item for item in (_json_cmd(["nft", "-j", "list", "ruleset"]) or {}).get("nftables", [])
           if "metainfo" not in item]
    sysctl = {}
    for key in _SNAPSHOT_SYSCTLS:
        with open(f"/proc/sys/{key}") as f:
            sysctl[key.replace("/", ".")] = f.read().strip()
    nsfw_files = []
    for root, _dirs, files in os.walk(NSFW_RUN_DIR):
        nsfw_files += [os.path.relpath(os.path.join(root, name), NSFW_RUN_DIR) for name in files]
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == "/run" or point.startswith("/run/") or point == RESOLV_CONF:
                mounts.append(point)
    with open(PIDS_FILE) as f:
        own = {int(p) for p in f.read().split()} | {os.getpid()}
    my_net, my_mnt = _ns_inode("net"), _ns_inode("mnt")
    processes = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in own:
            continue
        try:
            if _ns_inode("net", entry) != my_net and _ns_inode("mnt", entry) != my_mnt:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        processes.append({"pid": int(entry), "cmdline": cmd})
    return {
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
        "links": sorted(links, key=lambda link: link["name"]),
        "routes": routes,
        "nft": nft,
        "sysctl": sysctl,
        "run_nsfw": sorted(nsfw_files),
        "mounts": sorted(mounts),
        "processes": sorted(processes, key=lambda p: p["pid"]),
    }
