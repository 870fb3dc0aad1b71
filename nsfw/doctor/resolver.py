"""The doctor's resolver checks: what the sandboxes' resolver will ask, and whether it can bind port 53."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence

from .check import Check, _ok

__all__ = ["BYPASSED", "NSSWITCH", "RESOLV_CONF", "nsswitch_hosts", "resolver_check", "wildcard_port53"]

RESOLV_CONF = "/etc/resolv.conf"
NSSWITCH = "/etc/nsswitch.conf"
BYPASSED = ("resolve", "mdns", "mdns4", "mdns6", "mdns_minimal", "mdns4_minimal", "mdns6_minimal", "mymachines",
            "wins", "libvirt", "libvirt_guest")


def nsswitch_hosts(text: str) -> list[str]:
    """The modules of nsswitch.conf's `hosts:` line, without [ACTION] items; glibc's default when absent."""
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        if re.match(r"\s*hosts\s*:", line):
            return [w for w in re.sub(r"\[[^]]*\]", " ", line.split(":", 1)[1]).split()]
    return ["dns", "files"]


def resolver_check(resolv_text: str | None, target: str | None, hosts: Sequence[str], nscd: bool) -> Check:
    """What the sandboxes' resolver will ask, from the host's resolv.conf (pure). That resolver runs on the
    host's side, so a local stub (systemd-resolved's 127.0.0.53, dnsmasq on 127.0.0.1) works for it."""
    from ..resolver.upstream import DEFAULT_NAMESERVER, parse_resolv_conf

    where = RESOLV_CONF + (f" -> {target}" if target and target != RESOLV_CONF else "")
    if resolv_text is None:
        return Check("resolver", "warn", f"{where} is missing or unreadable: sandboxes' names go to "
                     f"{DEFAULT_NAMESERVER}, as glibc does", "give the host a working /etc/resolv.conf")
    servers = parse_resolv_conf(resolv_text)
    named = any(w.split()[:1] == ["nameserver"] for w in resolv_text.splitlines())
    notes: list[str] = []
    if "127.0.0.53" in servers:
        notes.append("127.0.0.53 is systemd-resolved's stub: fine, the sandboxes' resolver asks it from the host")
    bypassed = [m for m in hosts if m in BYPASSED]
    if bypassed:
        notes.append(f"nsswitch hosts: {' '.join(hosts)}; inside sandboxes {', '.join(bypassed)} are bypassed "
                     "(names go through DNS and files only)")
    if nscd:
        notes.append("nscd runs: sandboxes do not use its cache")
    detail = f"{where}: nameservers {', '.join(servers)}" + ("".join(f"; {n}" for n in notes))
    if not named:
        return Check("resolver", "warn", detail + f" (none named: glibc's default {DEFAULT_NAMESERVER})",
                     "name a nameserver in /etc/resolv.conf")
    return _ok("resolver", detail)


def _nscd_running() -> bool:
    if os.path.exists("/run/nscd/socket") or os.path.exists("/var/run/nscd/socket"):
        return True
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "nscd":
                    return True
    return False


def _resolver() -> Check:
    try:
        with open(RESOLV_CONF, encoding="utf-8", errors="replace") as f:
            text: str | None = f.read()
    except OSError:
        text = None
    target = os.path.realpath(RESOLV_CONF) if os.path.islink(RESOLV_CONF) else None
    try:
        with open(NSSWITCH) as f:
            hosts = nsswitch_hosts(f.read())
    except OSError:
        hosts = nsswitch_hosts("")
    return resolver_check(text, target, hosts, _nscd_running())


def wildcard_port53(tables: Mapping[str, str]) -> list[tuple[str, str]]:
    """(protocol, inode) of sockets bound to port 53 on every address, from /proc/net/{udp,udp6,tcp,tcp6} text
    (pure). Each sandbox's resolver binds port 53 on its gateway address: a socket on 0.0.0.0:53 or [::]:53
    (dnsmasq's default, say) makes that bind fail with EADDRINUSE, whatever SO_REUSEADDR says."""
    out: list[tuple[str, str]] = []
    for proto, text in tables.items():
        for line in text.splitlines()[1:]:
            cols = line.split()
            if len(cols) < 10 or ":" not in cols[1]:
                continue
            addr, port = cols[1].rsplit(":", 1)
            listening = proto.startswith("udp") or cols[3] == "0A"
            if port == "0035" and listening and set(addr) == {"0"}:
                out.append((proto, cols[9]))
    return out


def _socket_owners(inodes: set[str]) -> list[str]:
    found: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    with open(f"/proc/{pid}/comm") as f:
                        found.add(f"{f.read().strip()} (pid {pid})")
        except OSError:
            continue
    return sorted(found)


def _port53() -> Check:
    tables: dict[str, str] = {}
    for proto in ("udp", "udp6", "tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{proto}") as f:
            tables[proto] = f.read()
    bound = wildcard_port53(tables)
    if not bound:
        return _ok("resolver: port 53", "nothing holds port 53 on every address, so each sandbox's resolver can "
                   "bind its gateway")
    owners = _socket_owners({inode for _p, inode in bound}) or ["an unknown process"]
    protos = sorted({p for p, _i in bound})
    return Check("resolver: port 53", "fail", f"{', '.join(owners)} listens on port 53 of every address "
                 f"({', '.join(protos)}): each sandbox's resolver must bind port 53 on its gateway, which then fails",
                 "make that server bind only the addresses it serves (dnsmasq: bind-interfaces or "
                 "bind-dynamic with listen-address=127.0.0.1; bind9: listen-on { 127.0.0.1; ... })")

