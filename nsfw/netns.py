"""pyroute2 at the edge: one small function per kernel object, and teardown that treats 'already gone' as done."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from .errors import SetupError
from .names import SANDBOX_IF, HostEnv, IPNetwork
from .nspath import NETNS_DIR, entered, path

__all__ = ["NETNS_DIR", "entered", "path"]  # the light half lives in nspath; these are used here too

RTN_UNICAST = 1
IFA_F_NODAD = 0x02


def create(name: str) -> None:
    try:
        netns.create(name)
    except OSError as e:
        raise SetupError(f"cannot create network namespace {name}: {e.strerror or e} (run `nsfw doctor`)") from e


def remove(name: str) -> bool:
    """Remove a named namespace; absent counts as done. Never raises. True when it existed."""
    if not os.path.exists(path(name)):
        return False
    try:
        netns.remove(name)
    except OSError:
        try:  # a half-made entry: the bind mount is gone but the file is not
            os.unlink(path(name))
        except OSError:
            return False
    return True


DUMP_TRIES = 10


def _dump(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A netlink dump, again when the kernel says another change interrupted it (launches race each other)."""
    for _ in range(DUMP_TRIES - 1):
        try:
            return call(*args, **kwargs)
        except NetlinkDumpInterrupted:
            continue
    return call(*args, **kwargs)


def _index(ipr: Any, ifname: str) -> int:
    found = _dump(ipr.link_lookup, ifname=ifname)
    if not found:
        raise SetupError(f"interface {ifname} vanished during setup")
    return int(found[0])


def _write_sysctl(key: str, value: str) -> str | None:
    """Write a sysctl of the current namespace; return its old value (None when it does not exist)."""
    file = "/proc/sys/" + key.replace(".", "/")
    try:
        with open(file) as f:
            old = f.read().strip()
        if old != value:
            with open(file, "w") as f:
                f.write(value)
        return old
    except FileNotFoundError:
        return None


def read_sysctl(key: str) -> str | None:
    try:
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def write_sysctl(key: str, value: str) -> str | None:
    try:
        return _write_sysctl(key, value)
    except OSError as e:
        raise SetupError(f"cannot set {key}={value}: {e.strerror}") from e


def _addr_kwargs(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> dict[str, Any]:
    kw: dict[str, Any] = {"address": str(iface.ip), "prefixlen": iface.network.prefixlen}
    if iface.version == 6:
        kw["flags"] = IFA_F_NODAD  # no duplicate detection: nobody else is on this link
    return kw


def add_veth(host_if: str, ns: str) -> None:
    """A veth pair whose peer is born inside `ns` as eth0, so it never appears in the host namespace."""
    fd = os.open(path(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": SANDBOX_IF, "net_ns_fd": fd})
    except NetlinkError as e:
        raise SetupError(f"cannot create veth pair {host_if}: {e} (is the veth module available? `nsfw doctor`)") \
            from e
    finally:
        os.close(fd)


def link_names() -> list[str]:
    """Names of the links of the current namespace. Never raises."""
    try:
        with IPRoute() as ipr:
            return [link.get_attr("IFLA_IFNAME") for link in _dump(ipr.get_links)]
    except (NetlinkError, NetlinkDumpInterrupted, OSError):
        return []


def delete_link(ifname: str) -> bool:
    """Delete a link by name (its veth peer goes with it). Absent counts as done; never raises."""
    try:
        with IPRoute() as ipr:
            found = _dump(ipr.link_lookup, ifname=ifname)
            if not found:
                return False
            ipr.link("del", index=found[0])
            return True
    except (NetlinkError, NetlinkDumpInterrupted, OSError):
        return False


def configure_host_side(ifname: str, gw4: ipaddress.IPv4Interface, gw6: ipaddress.IPv6Interface | None) -> None:
    try:
        # no automatic link-local address: the host's addresses on this link are exactly the ones nsfw knows
        _write_sysctl(f"net.ipv6.conf.{ifname}.addr_gen_mode", "1")
        _write_sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", "0" if gw6 else "1")
        with IPRoute() as ipr:
            idx = _index(ipr, ifname)
            ipr.addr("add", index=idx, **_addr_kwargs(gw4))
            if gw6:
                ipr.addr("add", index=idx, **_addr_kwargs(gw6))
            ipr.link("set", index=idx, state="up")
    except (NetlinkError, OSError) as e:
        raise SetupError(f"cannot configure {ifname}: {e}") from e


def configure_sandbox_side(ns: str, addr4: ipaddress.IPv4Interface | None, gw4: ipaddress.IPv4Interface | None,
                           addr6: ipaddress.IPv6Interface | None, gw6: ipaddress.IPv6Interface | None) -> None:
    """Inside the sandbox: loopback up and, for `nat`, eth0 with its addresses and default routes."""
    # A new namespace starts with unprivileged ICMP sockets off ("1 0"); keep what the host allows (systemd
    # hosts allow everyone), or `ping` would break in the sandbox for reasons that have nothing to do with rules.
    ping_range = read_sysctl("net.ipv4.ping_group_range")
    try:
        with entered(ns), IPRoute() as ipr:
            if ping_range:
                _write_sysctl("net.ipv4.ping_group_range", ping_range)
            ipr.link("set", index=_index(ipr, "lo"), state="up")
            if addr4 is None or gw4 is None:
                return
            _write_sysctl(f"net.ipv6.conf.{SANDBOX_IF}.addr_gen_mode", "1")
            _write_sysctl(f"net.ipv6.conf.{SANDBOX_IF}.disable_ipv6", "0" if addr6 else "1")
            idx = _index(ipr, SANDBOX_IF)
            ipr.addr("add", index=idx, **_addr_kwargs(addr4))
            if addr6:
                ipr.addr("add", index=idx, **_addr_kwargs(addr6))
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=str(gw4.ip), oif=idx)
            if addr6 and gw6:
                ipr.route("add", dst="::/0", gateway=str(gw6.ip), oif=idx, family=10)
    except (NetlinkError, OSError) as e:
        raise SetupError(f"cannot configure the sandbox's network in {ns}: {e}") from e


def host_env(exclude_prefix: str = "") -> HostEnv:
    """Addresses, connected networks and routes of the current (host) namespace, from the kernel.

    Every nat launch asks, so this speaks rtnetlink itself: three dumps parsed with struct take a fraction of a
    millisecond, where pyroute2's generic decoding took several."""
    for _ in range(DUMP_TRIES - 1):
        try:
            return _host_env(exclude_prefix)
        except NetlinkDumpInterrupted:
            continue
    return _host_env(exclude_prefix)


RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE = 18, 22, 26
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_IFNAME, IFA_ADDRESS, IFA_LOCAL = 3, 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RT_TABLE_MAIN = 254


def _host_env(exclude_prefix: str) -> HostEnv:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
        skip = set()
        if exclude_prefix:
            for body, attrs in _rtnl_dump(sock, RTM_GETLINK, struct.pack("=BxHiII", 0, 0, 0, 0, 0), 16):
                name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
                if name.startswith(exclude_prefix):
                    skip.add(struct.unpack_from("=i", body, 4)[0])
        addresses = []
        for body, attrs in _rtnl_dump(sock, RTM_GETADDR, struct.pack("=BBBBi", 0, 0, 0, 0, 0), 8):
            value = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if value and body[0] in (socket.AF_INET, socket.AF_INET6):
                addresses.append(ipaddress.ip_address(value))
        connected: list[IPNetwork] = []
        routes: list[IPNetwork] = []
        default6 = False
        for family in (socket.AF_INET, socket.AF_INET6):
            request = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 0, 0, 0, 0, 0)
            for body, attrs in _rtnl_dump(sock, RTM_GETROUTE, request, 12):
                length, table, rtype = body[1], body[4], body[7]
                if RTA_TABLE in attrs:
                    table = struct.unpack("=I", attrs[RTA_TABLE])[0]
                if body[0] != family or table != RT_TABLE_MAIN:
                    continue
                dst = attrs.get(RTA_DST)
                if not dst:
                    if family == socket.AF_INET6 and length == 0:
                        default6 = True
                    continue
                net = ipaddress.ip_network((ipaddress.ip_address(dst), length), strict=False)
                routes.append(net)
                # on-link: no gateway (IPv6 routes never say scope link)
                oif = struct.unpack("=i", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
                on_link = RTA_GATEWAY not in attrs and rtype == RTN_UNICAST
                if on_link and oif not in skip and not net.is_link_local:
                    connected.append(net)
    return HostEnv(tuple(sorted(set(addresses), key=lambda a: (a.version, int(a)))),
                   tuple(sorted(set(connected), key=lambda n: (n.version, int(n.network_address), n.prefixlen))),
                   tuple(routes), default6)


NETLINK_ROUTE = 0


def _rtnl_dump(sock: socket.socket, kind: int, request: bytes, header: int) -> list[tuple[bytes, dict[int, bytes]]]:
    """One rtnetlink dump: each message's fixed header (`header` bytes) and its top-level attributes."""
    seq = int.from_bytes(os.urandom(4), "little")
    sock.send(struct.pack("=IHHII", 16 + len(request), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
    out: list[tuple[bytes, dict[int, bytes]]] = []
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + 16 <= len(data):
            length, mtype, flags, mseq, _pid = struct.unpack_from("=IHHII", data, offset)
            if length < 16:
                raise OSError("a malformed netlink message")
            if mseq == seq:
                if flags & NLM_F_DUMP_INTR:
                    raise NetlinkDumpInterrupted()
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    code = struct.unpack_from("=i", data, offset + 16)[0]
                    raise OSError(-code, os.strerror(-code))
                body = data[offset + 16:offset + length]
                attrs: dict[int, bytes] = {}
                pos = (header + 3) & ~3
                while pos + 4 <= len(body):
                    alen, atype = struct.unpack_from("=HH", body, pos)
                    if alen < 4:
                        break
                    attrs.setdefault(atype & 0x3FFF, body[pos + 4:pos + alen])
                    pos += (alen + 3) & ~3
                out.append((body[:header], attrs))
            offset += (length + 3) & ~3
