"""The doctor's checks of the host: root, other firewalls, forwarding, rp_filter, IPv6, leftovers, config.

Each `*_check` (and `leftovers`) is pure, given what was read; the `_name()` beside it reads it from /proc,
/run, the kernel's ruleset or nsfw's records, in the reader's own network namespace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..names import PREFIX
from .check import APT_FIX, GC_FIX, ROOT_ONLY, Check, _ok
from .firewall import _ruleset, forward_findings, input_findings, iptables_rules, uplinks
from .ruleset import owned

__all__ = ["CONFIG", "GUARD_TABLE", "NETNS_DIR", "RP_MODES", "RecordView", "check_root", "config_check",
           "forwarding_check", "ipv6_check", "leftovers", "rp_filter_check"]

CONFIG = "/etc/nsfw/nsfw.yaml"
NETNS_DIR = "/run/netns"
GUARD_TABLE = f"{PREFIX}-guard"  # compile.GUARD_TABLE, without importing the compiler


def check_root() -> Check:
    if os.geteuid() == 0:
        return _ok("root", "running as root")
    return Check("root", "fail", "not root: nsfw run needs root, and these checks could not run: "
                 + ", ".join(ROOT_ONLY[:2]) + " and the nft tables part of leftovers", "sudo nsfw doctor")


# ------------------------------------------------------------------------------------------------ firewall

def _firewall_checks() -> list[Check]:
    from .. import nft
    from ..errors import SetupError

    try:
        ruleset = nft.ruleset()
    except (SetupError, ImportError, OSError) as e:
        return [Check("firewall: forward", "warn", f"cannot read the ruleset: {e}", APT_FIX)]
    legacy = iptables_rules(ruleset)
    links, default6 = uplinks()
    out: list[Check] = []
    for name, fn, purpose in (
            ("firewall: forward", forward_findings, "the sandboxes' forwarded traffic"),
            ("firewall: input", input_findings, "DNS from sandboxes to their resolver on the host")):
        found = fn(ruleset, legacy, uplinks=links, ipv6=default6)
        bad = [f for f in found if f.certain]
        maybe = [f for f in found if not f.certain]
        if bad:
            out.append(Check(name, "fail", "; ".join(f.what for f in bad), "; ".join(f.fix for f in bad)))
        elif maybe:
            out.append(Check(name, "warn", "; ".join(f.what for f in maybe), "; ".join(f.fix for f in maybe)))
        else:
            seen = sorted({f"{k[0]} {k[1]}" for k, c in _ruleset(ruleset, legacy).chains.items()
                           if c.get("hook") == name.split(": ")[1] and not owned(k[0], k[1])})
            extra = f" (checked {', '.join(seen)})" if seen else " (no other firewall on that hook)"
            legacy_note = "; iptables-legacy too" if {"iptables", "ip6tables"} & legacy.keys() else ""
            out.append(_ok(name, f"nothing drops {purpose}{extra}{legacy_note}"))
    if not links:
        out[0] = Check(out[0].name, "warn" if out[0].status == "ok" else out[0].status,
                       out[0].detail + "; the host has no default route: sandboxes will reach nothing beyond it",
                       out[0].fix or "connect the host to a network")
    return out


# -------------------------------------------------------------------------------------------- forwarding

def _sysctl(key: str) -> str | None:
    try:
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def forwarding_check(values: Mapping[str, str | None], saved: Mapping[str, Any] | None, live: int) -> Check:
    """ip_forward and IPv6 forwarding as found, and whether nsfw's record of what it found is stale (pure)."""
    shown = ", ".join(f"{k}={v if v is not None else 'absent'}" for k, v in values.items())
    if saved is not None and live == 0:
        before = ", ".join(f"{k}={v}" for k, v in sorted(saved.items()) if k in ("ipv4", "ipv6"))
        return Check("forwarding", "warn", f"{shown}; nsfw's saved forwarding state ({before}) is stale: no "
                     "sandbox is running, so nothing will put it back", GC_FIX)
    if saved is not None:
        return _ok("forwarding", f"{shown}: turned on by nsfw for {live} running sandbox(es); it puts back what it "
                   "found when the last one ends")
    if values.get("net.ipv4.ip_forward") == "1":
        return _ok("forwarding", f"{shown}: this host already forwards, so nsfw adds no forwarding guard")
    return _ok("forwarding", f"{shown}: nsfw turns forwarding on while `nat` sandboxes run (with a guard table "
               "that forwards nothing else) and puts it back afterwards")


def _forwarding() -> Check:
    from .. import state

    values = {k: _sysctl(k) for k in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")}
    live = sum(1 for r in state.records() if state.alive(r))
    return forwarding_check(values, state.load_forwarding(), live)


# ------------------------------------------------------------------------------------------ rp_filter, IPv6

RP_MODES = {"0": "off", "1": "strict", "2": "loose"}


def rp_filter_check(values: Mapping[str, str | None]) -> Check:
    """Any mode works for nsfw (pure). A sandbox's packets arrive on its veth from its own /30, which the host
    routes back through that veth (strict passes); replies arrive on the uplink for the uplink's own address,
    masqueraded, and are un-NATed after the check (strict passes). nsfw never uses a source the host would route
    elsewhere: it skips address slots that overlap the host's routes."""
    shown = ", ".join(f"{k}={v}({RP_MODES.get(v or '', '?')})" for k, v in values.items() if v is not None)
    return _ok("rp_filter", (shown or "not present") + ": every mode suits nsfw's NAT (a sandbox's source "
               "is routed back through its own veth; replies come back to the uplink's own address)")


def _rp_filter() -> Check:
    links, _v6 = uplinks()
    return rp_filter_check({f"{i}.rp_filter": _sysctl(f"net.ipv4.conf.{i}.rp_filter")
                            for i in ("all", "default", *links)})


def ipv6_check(default6: bool, disabled: Mapping[str, str | None]) -> Check:
    if disabled.get("all") is None:
        return _ok("ipv6", "IPv6 is off in this kernel (ipv6.disable=1): sandboxes get IPv4 only")
    if disabled.get("all") == "1":
        return _ok("ipv6", "IPv6 is disabled on this host (net.ipv6.conf.all.disable_ipv6=1): sandboxes get IPv4 "
                   "only")
    if not default6:
        return _ok("ipv6", "the host has no IPv6 default route: sandboxes get IPv4 only (IPv6 whenever it has one)")
    note = "; new links start with IPv6 disabled (default.disable_ipv6=1), nsfw enables it on its own" \
        if disabled.get("default") == "1" else ""
    return _ok("ipv6", f"the host has an IPv6 default route: sandboxes whose profile allows it get IPv6{note}")


def _ipv6() -> Check:
    _links, default6 = uplinks()
    return ipv6_check(default6, {k: _sysctl(f"net.ipv6.conf.{k}.disable_ipv6") for k in ("all", "default")})


# ------------------------------------------------------------------------------------------------ leftovers

@dataclass(frozen=True)
class RecordView:
    id: str
    alive: bool
    netns: str
    veth: str | None
    table: str | None


def leftovers(records: Sequence[RecordView], netns_names: Iterable[str], links: Iterable[str],
              tables: Iterable[str], sandbox_dirs: Iterable[str] = ()) -> list[tuple[str, str]]:
    """What a killed nsfw left behind (pure), each with its fix: dead records go with `nsfw gc`; an nsfw-named
    object that no record names is removed by name (a record is written before what it describes, so such an
    object is not a launch in progress)."""
    out = [(f"record {r.id} of a sandbox whose supervisor is gone", GC_FIX) for r in records if not r.alive]
    ns_known = {r.netns for r in records}
    links_known = {r.veth for r in records if r.veth}
    tables_known = {r.table for r in records if r.table}
    ids = {r.id for r in records}
    out += [(f"network namespace {n} with no record", f"ip netns delete {n}") for n in sorted(netns_names)
            if n.startswith(f"{PREFIX}-") and n not in ns_known]
    out += [(f"link {n} with no record", f"ip link delete {n}") for n in sorted(links)
            if n.startswith(PREFIX) and n not in links_known]
    tables = list(tables)
    out += [(f"table inet {t} with no record", f"nft delete table inet {t}") for t in sorted(tables)
            if t.startswith(f"{PREFIX}-") and t != GUARD_TABLE and t not in tables_known]
    if GUARD_TABLE in tables and not any(r.alive for r in records):
        out.append((f"forwarding guard table inet {GUARD_TABLE} with no sandbox running", GC_FIX))
    out += [(f"files of sandbox {d} with no record", f"rm -r /run/nsfw/sandboxes/{d}") for d in sorted(sandbox_dirs)
            if d not in ids]
    return out


def _links() -> list[str]:
    # /proc/net/dev lists the reader's own network namespace (unlike /sys/class/net, whose view is the mounter's)
    try:
        with open("/proc/net/dev") as f:
            return [line.split(":", 1)[0].strip() for line in f.read().splitlines()[2:] if ":" in line]
    except OSError:
        return []


def _leftovers(root: bool) -> Check:
    from .. import state

    views = [RecordView(r.id, state.alive(r), r.netns, r.veth, r.table) for r in state.records(include_pool=True)]
    try:
        ns = os.listdir(NETNS_DIR)
    except OSError:
        ns = []
    tables: list[str] = []
    if root:
        from .. import nft

        with contextlib.suppress(Exception):
            tables = nft.tables("inet")
    try:
        dirs = [d for d in os.listdir(state.sandbox_dir("")) if os.path.isdir(state.sandbox_dir(d))]
    except OSError:
        dirs = []
    found = leftovers(views, ns, _links(), tables, dirs)
    live = sum(1 for v in views if v.alive)
    unchecked = "" if root else " (tables not checked: needs root)"
    if found:
        fixes = list(dict.fromkeys(fix for _what, fix in found))
        return Check("leftovers", "warn", "; ".join(what for what, _fix in found) + unchecked, "; ".join(fixes))
    return _ok("leftovers", f"nothing left behind; {live} sandbox(es) running{unchecked}")


# ------------------------------------------------------------------------------------------------ config

def config_check(path: str = CONFIG) -> Check:
    """/etc/nsfw/nsfw.yaml, if present, validated exactly as `nsfw run` reads it."""
    from .. import config
    from ..errors import ProfileErrors

    if not os.path.exists(path):
        return _ok("config", f"{path}: none (defaults)")
    try:
        conf = config.load(Path(path))
    except ProfileErrors as e:
        return Check("config", "fail", str(e), f"fix {path} as the message says")
    return _ok("config", f"{path}: address pool {conf.pool4}, {conf.pool6}")

