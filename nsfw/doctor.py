"""`nsfw doctor`: what this machine needs for nsfw and what gets in its way, each with the fix.

Every check returns a `Check`; `main` prints one line per check, the fix under each that is not ok, and exits 0
only when no check failed (warnings do not fail). Nothing here changes the machine: kernel features are tried in
a forked child that first moves into a throwaway network namespace (as `nft.render` does), and everything else
is read from /proc, /run and the kernel's ruleset.

The firewall part is also what `nsfw run` calls at launch: `forward_blockers_now()` reads the ruleset once and
says, in the doctor's words, which other firewall would drop the sandboxes' forwarded traffic. It does not
pattern-match product names: it evaluates every base chain on the forward hook (jumps, gotos, returns and
policies included) for a few concrete packets a sandbox sends and receives, and reports a chain only when
every path those packets can take through it ends in drop or reject. Products are named only for the fix.

Importing this module is cheap: pyroute2, libnftables and the compiler are imported by the checks that use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .names import PREFIX, Instance

Status = Literal["ok", "warn", "fail"]
TV = bool | None  # a match's truth: True, False, or None when it cannot be known from the ruleset alone


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


CONFIG = "/etc/nsfw/nsfw.yaml"
RESOLV_CONF = "/etc/resolv.conf"
NSSWITCH = "/etc/nsswitch.conf"
NETNS_DIR = "/run/netns"
GUARD_TABLE = f"{PREFIX}-guard"  # compile.GUARD_TABLE, without importing the compiler
MIN_NFT = (0, 9, 4)  # concatenated interval sets (`ip daddr . meta l4proto . th dport`) in nft
MIN_KERNEL = (5, 6)  # ... and in the kernel (nft_set_pipapo)
MIN_PYROUTE2 = (0, 7)  # pyproject.toml's floor
APT_FIX = "apt-get install nftables python3-nftables python3-pyroute2"
ROOT_ONLY = ("firewall: forward", "firewall: input", "leftovers")
GC_FIX = "nsfw gc"


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


# ============================================================================================ the firewall model
#
# A packet is concrete: a sandbox in slot 0 opening a TCP (or UDP) connection to an internet address, the reply
# coming back, or its DNS query to the resolver on its gateway. Only the uplink's name may be unknown (the pure
# function is given rulesets recorded elsewhere); a match on it is then "unknown", never guessed.

SAMPLE = Instance("00000000", 0, ipv6=True)
VETH = SAMPLE.veth
REMOTE = {4: "198.51.100.80", 6: "2001:db8:80::80"}  # stands for any internet address
EPHEMERAL = 40000


@dataclass(frozen=True)
class Packet:
    hook: Literal["forward", "input"]
    family: int  # 4 | 6
    way: Literal["out", "reply", "dns"]
    proto: str  # tcp | udp
    iif: str | None  # None: the uplink
    oif: str | None  # None: the uplink; "": no output interface (input hook)
    saddr: str
    daddr: str
    sport: int
    dport: int
    ct_state: str

    @property
    def label(self) -> str:
        what = {"out": "connections out of a sandbox", "reply": "replies to a sandbox",
                "dns": "DNS from a sandbox to its resolver"}[self.way]
        return f"{what} (IPv{self.family})"


def forward_packets(ipv6: bool = True) -> list[Packet]:
    out: list[Packet] = []
    for v in (4, 6) if ipv6 else (4,):
        sandbox = str((SAMPLE.address4 if v == 4 else SAMPLE.address6).ip)  # type: ignore[union-attr]
        for proto in ("tcp", "udp"):
            out.append(Packet("forward", v, "out", proto, VETH, None, sandbox, REMOTE[v], EPHEMERAL, 443, "new"))
        out.append(Packet("forward", v, "reply", "tcp", None, VETH, REMOTE[v], sandbox, 443, EPHEMERAL,
                          "established"))
    return out


def input_packets(ipv6: bool = True) -> list[Packet]:
    out: list[Packet] = []
    for v in (4, 6) if ipv6 else (4,):
        sandbox = str((SAMPLE.address4 if v == 4 else SAMPLE.address6).ip)  # type: ignore[union-attr]
        gateway = str((SAMPLE.gateway4 if v == 4 else SAMPLE.gateway6).ip)  # type: ignore[union-attr]
        for proto in ("udp", "tcp"):
            out.append(Packet("input", v, "dns", proto, VETH, "", sandbox, gateway, EPHEMERAL, 53, "new"))
    return out


# -------------------------------------------------------------------------------------------- the ruleset

ChainKey = tuple[str, str, str]  # family, table, chain


@dataclass
class Ruleset:
    """The parts of a ruleset the evaluation needs, from `nft -j list ruleset` and/or `iptables-legacy -S`."""

    chains: dict[ChainKey, dict[str, Any]] = field(default_factory=dict)
    rules: dict[ChainKey, list[list[dict[str, Any]]]] = field(default_factory=dict)
    sets: dict[ChainKey, list[Any]] = field(default_factory=dict)  # (family, table, set name) -> elements


def index_ruleset(items: Iterable[Mapping[str, Any]], into: Ruleset | None = None) -> Ruleset:
    rs = into or Ruleset()
    for item in items:
        if "chain" in item:
            c = item["chain"]
            key = (c["family"], c["table"], c["name"])
            rs.chains[key] = dict(c)
            rs.rules.setdefault(key, [])
        elif "rule" in item:
            r = item["rule"]
            rs.rules.setdefault((r["family"], r["table"], r["chain"]), []).append(list(r.get("expr", [])))
        elif "set" in item or "map" in item:
            s = item.get("set") or item["map"]
            rs.sets[(s["family"], s["table"], s["name"])] = list(s.get("elem", []))
    return rs


def owned(family: str, table: str) -> bool:
    """nsfw's own host tables (one per sandbox, and the guard): they are built to let the sandboxes through."""
    return family == "inet" and table.startswith(f"{PREFIX}-")


# ---------------------------------------------------------------------------------------- iptables-legacy text

LEGACY_TABLE = "filter (iptables-legacy)"
_LEGACY_HOOKS = {"INPUT": "input", "FORWARD": "forward", "OUTPUT": "output"}
_XT_VERDICTS = {"ACCEPT": "accept", "DROP": "drop", "REJECT": "reject", "RETURN": "return"}


def _legacy_ifname(value: str) -> str:
    return value[:-1] + "*" if value.endswith("+") else value  # iptables' wildcard is nft's `*`


def _legacy_addr(value: str) -> Any:
    net = ipaddress.ip_network(value, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _legacy_ports(value: str) -> Any:
    if ":" in value:
        low, high = value.split(":", 1)
        return {"range": [int(low or 0), int(high or 65535)]}
    return int(value) if value.isdigit() else value


def _m(left: Any, right: Any, negate: bool) -> dict[str, Any]:
    return {"match": {"op": "!=" if negate else "==", "left": left, "right": right}}


# Targets that are not chains and do not end a rule's evaluation (LOG, MARK...) in iptables' filter table.
_XT_MODELLED = {"tcp", "udp", "conntrack", "state", "comment", "icmp", "icmp6", "icmpv6", "addrtype", "rt"}
_XT_NONTERMINAL = {"LOG", "NFLOG", "ULOG", "MARK", "CONNMARK", "CLASSIFY", "DSCP", "TOS", "TTL", "HL", "TCPMSS",
                   "CT", "NOTRACK", "SET", "AUDIT", "CHECKSUM", "TEE", "TRACE", "SECMARK", "CONNSECMARK", "LED",
                   "IDLETIMER", "HMARK", "RATEEST", "SYNPROXY"}


def _legacy_rule(args: list[str], family: str, chains: set[str]) -> list[dict[str, Any]]:
    """One `-A CHAIN ...` line as nft JSON expressions; whatever is not understood becomes an unknown match."""
    exprs: list[dict[str, Any]] = []
    ip = "ip" if family == "ip" else "ip6"
    proto = ""
    negate = False
    i = 0
    while i < len(args):
        a = args[i]
        val = args[i + 1] if i + 1 < len(args) else ""
        if a == "!":
            negate = True
            i += 1
            continue
        if a in ("-i", "--in-interface", "-o", "--out-interface"):
            key = "iifname" if a in ("-i", "--in-interface") else "oifname"
            exprs.append(_m({"meta": {"key": key}}, _legacy_ifname(val), negate))
        elif a in ("-s", "--source", "-d", "--destination"):
            fld = "saddr" if a in ("-s", "--source") else "daddr"
            exprs.append(_m({"payload": {"protocol": ip, "field": fld}}, _legacy_addr(val), negate))
        elif a in ("-p", "--protocol"):
            proto = val.lower()
            exprs.append(_m({"meta": {"key": "l4proto"}}, proto, negate))
        elif a in ("--ctstate", "--state"):
            exprs.append({"match": {"op": "!=" if negate else "in", "left": {"ct": {"key": "state"}},
                                    "right": [s.lower() for s in val.split(",")]}})
        elif a in ("--dport", "--sport", "--destination-port", "--source-port"):
            fld = "dport" if a in ("--dport", "--destination-port") else "sport"
            exprs.append(_m({"payload": {"protocol": proto or "th", "field": fld}}, _legacy_ports(val), negate))
        elif a in ("--icmp-type", "--icmpv6-type"):
            exprs.append(_m({"payload": {"protocol": "icmp" if family == "ip" else "icmpv6", "field": "type"}},
                            val, negate))
        elif a in ("-m", "--match"):
            if val not in _XT_MODELLED:
                exprs.append({"xt": {"type": "match", "name": val}})  # limit, mark, set...: unknown
        elif a in ("--dst-type", "--src-type"):  # -m addrtype, as nft's own `fib daddr type local`
            fib = {"fib": {"flags": ["daddr" if a == "--dst-type" else "saddr"], "result": "type"}}
            exprs.append(_m(fib, [t.lower() for t in val.split(",")], negate))
        elif a == "--rt-type":  # -m rt: a routing header, which a sandbox's packets do not carry
            exprs.append(_m({"rt": {"key": "type"}}, int(val) if val.isdigit() else val, negate))
        elif a == "--comment":
            pass
        elif a in ("-j", "--jump", "-g", "--goto"):
            if a in ("-g", "--goto"):
                exprs.append({"goto": {"target": val}})
            elif val in _XT_VERDICTS:
                exprs.append({_XT_VERDICTS[val]: None})
            elif val in ("NFQUEUE", "QUEUE"):
                exprs.append({"queue": None})
            elif val in _XT_NONTERMINAL and val not in chains:
                exprs.append({"xt": {"type": "target", "name": val}})
            else:  # a chain; one `-S CHAIN` did not show is evaluated as unknown
                exprs.append({"jump": {"target": val}})
            return exprs  # target options (--log-prefix, --reject-with) do not change the verdict
        elif a.startswith("-"):
            if not val.startswith("-") and val != "!":
                i += 1  # an option we do not model, and its value
            exprs.append({"xt": {"type": "match", "name": a}})
            negate = False
            i += 1
            continue
        negate = False
        i += 2
    return exprs


def index_legacy(family: str, text: str, into: Ruleset | None = None, table: str = LEGACY_TABLE) -> Ruleset:
    """`iptables -S` (family ip) or `ip6tables -S` (ip6) output, as an indexed ruleset under `table`."""
    rs = into or Ruleset()
    lines: list[list[str]] = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            lines.append(shlex.split(line))
    chains = {w[1] for w in lines if len(w) >= 2 and w[0] == "-N"}
    for words in lines:
        if len(words) < 2:
            continue
        key = (family, table, words[1])
        if words[0] == "-P" and len(words) >= 3:
            rs.chains[key] = {"family": family, "table": table, "name": words[1],
                              "hook": _LEGACY_HOOKS.get(words[1], ""), "policy": words[2].lower(), "type": "filter"}
            rs.rules.setdefault(key, [])
        elif words[0] == "-N":
            rs.chains.setdefault(key, {"family": family, "table": table, "name": words[1]})
            rs.rules.setdefault(key, [])
        elif words[0] == "-A":
            rs.rules.setdefault(key, []).append(_legacy_rule(words[2:], family, chains))
    return rs


# -------------------------------------------------------------------------------------------- evaluation

_PROTO_NUMBERS = {"tcp": 6, "udp": 17}
_ABSENT = object()  # a header the packet does not have: the match (and its rule) cannot match
_UNKNOWN = object()


def _and(values: Iterable[TV]) -> TV:
    result: TV = True
    for v in values:
        if v is False:
            return False
        if v is None:
            result = None
    return result


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.endswith("\\*"):
        return name == pattern[:-2] + "*"
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern


@dataclass(frozen=True)
class _Ctx:
    pkt: Packet
    uplinks: tuple[str, ...]
    rs: Ruleset
    family: str
    table: str


def _left(left: Any, ctx: _Ctx) -> Any:
    """The packet's value for a match's left-hand side, or _ABSENT / _UNKNOWN."""
    p = ctx.pkt
    if not isinstance(left, dict):
        return _UNKNOWN
    if "meta" in left:
        key = left["meta"].get("key")
        if key in ("iifname", "oifname", "iif", "oif"):
            name = p.iif if key.startswith("i") else p.oif
            return ("names", (name,) if name is not None else ctx.uplinks)
        if key == "nfproto":
            return f"ipv{p.family}"
        if key == "l4proto":
            return p.proto
        if key == "pkttype":
            return "host"
        return _UNKNOWN
    if "payload" in left:
        proto, fld = left["payload"].get("protocol"), left["payload"].get("field")
        if proto in ("ip", "ip6"):
            if (proto == "ip") != (p.family == 4):
                return _ABSENT
            if fld in ("saddr", "daddr"):
                return ipaddress.ip_address(p.saddr if fld == "saddr" else p.daddr)
            if fld in ("protocol", "nexthdr"):
                return p.proto
            return _UNKNOWN
        if proto in ("tcp", "udp", "th", "udplite", "sctp", "dccp"):
            if proto not in ("th", p.proto):
                return _ABSENT
            if fld in ("sport", "dport"):
                return p.sport if fld == "sport" else p.dport
            return _UNKNOWN
        if proto in ("icmp", "icmpv6", "ah", "esp", "comp"):
            return _ABSENT
        return _UNKNOWN
    if "fib" in left:
        fib = left["fib"]
        if fib.get("result") == "type" and fib.get("flags") in (["daddr"], ["saddr"]):
            # the only local address among ours is the gateway, which input-hook packets are addressed to
            return "local" if fib["flags"] == ["daddr"] and p.hook == "input" else "unicast"
        return _UNKNOWN
    if any(k in left for k in ("rt", "hbh", "frag", "dst", "mh", "srh", "exthdr")):
        return _ABSENT  # extension headers: a sandbox's TCP and UDP carry none
    if "ct" in left:
        key = left["ct"].get("key")
        if key == "state":
            return p.ct_state
        if key == "direction":
            return "original" if p.ct_state == "new" else "reply"
        if key == "status":
            # new: nothing yet; a reply to a masqueraded connection: seen-reply, assured, confirmed, snat
            return ("flags", () if p.ct_state == "new" else ("seen-reply", "assured", "confirmed", "snat"))
        return _UNKNOWN
    return _UNKNOWN


def _elements(right: Any, ctx: _Ctx) -> list[Any] | None:
    if isinstance(right, str) and right.startswith("@"):
        elems = ctx.rs.sets.get((ctx.family, ctx.table, right[1:]))
        return None if elems is None else [e.get("elem", {}).get("val", e) if isinstance(e, dict) and "elem" in e
                                           else e for e in elems]
    if isinstance(right, dict) and "set" in right:
        return [e.get("elem", {}).get("val", e) if isinstance(e, dict) and "elem" in e else e
                for e in right["set"]]
    if isinstance(right, list):
        return right
    return [right]


def _element_matches(value: Any, elem: Any) -> TV:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        try:
            if isinstance(elem, str):
                return bool(value in ipaddress.ip_network(elem, strict=False))
            if isinstance(elem, dict) and "prefix" in elem:
                pfx = elem["prefix"]
                return bool(value in ipaddress.ip_network(f"{pfx['addr']}/{pfx['len']}", strict=False))
            if isinstance(elem, dict) and "range" in elem:
                low, high = (ipaddress.ip_address(x) for x in elem["range"])
                return bool(low <= value <= high)  # type: ignore[operator]
        except (ValueError, TypeError, KeyError):
            return None
        return None
    if isinstance(value, int):
        if isinstance(elem, bool):
            return None
        if isinstance(elem, int):
            return value == elem
        if isinstance(elem, dict) and "range" in elem:
            low, high = elem["range"]
            return bool(isinstance(low, int) and isinstance(high, int) and low <= value <= high)
        return None  # a service name (`https`): not worth a lookup table
    if isinstance(value, str):
        if isinstance(elem, int) and value in _PROTO_NUMBERS:
            return _PROTO_NUMBERS[value] == elem
        if isinstance(elem, str):
            return value == elem.lower()
        return None
    return None


def _any(values: Iterable[TV]) -> TV:
    result: TV = False
    for v in values:
        if v is True:
            return True
        if v is None:
            result = None
    return result


def _eval_match(match: Mapping[str, Any], ctx: _Ctx) -> TV:
    op = match.get("op", "==")
    value = _left(match.get("left"), ctx)
    if value is _ABSENT:
        return False  # nft's implicit dependency: `tcp dport != 22` does not match a UDP packet
    if value is _UNKNOWN:
        return None
    elems = _elements(match.get("right"), ctx)
    if elems is None:
        return None
    if op in ("<", ">", "<=", ">="):
        if not isinstance(value, int) or len(elems) != 1 or not isinstance(elems[0], int):
            return None
        bound = elems[0]
        return {"<": value < bound, ">": value > bound, "<=": value <= bound, ">=": value >= bound}[op]
    if isinstance(value, tuple) and value[0] == "names":
        names: tuple[str, ...] = value[1]
        if not names:
            # an uplink whose name we were not told: only `lo` and nsfw's own names are known not to be it
            if all(isinstance(e, str) and (e == "lo" or _name_matches(e, VETH) or e.startswith(PREFIX))
                   for e in elems):
                hit: TV = False
            else:
                return None
        else:
            per_name = [_any(isinstance(e, str) and _name_matches(e, n) for e in elems) for n in names]
            hit = per_name[0] if len(set(per_name)) == 1 else None
    elif isinstance(value, tuple) and value[0] == "flags":
        hit = _any(e in value[1] for e in elems)
    else:
        hit = _any(_element_matches(value, e) for e in elems)
    if op in ("==", "in"):
        return hit
    if op == "!=":
        return None if hit is None else not hit
    return None


Outcome = tuple[str, str]  # ("accept" | "drop" | "other" | "return" | "next", where)
MAX_DEPTH = 16  # the kernel's own jump limit


def _describe(expr: Mapping[str, Any]) -> str:
    return next(iter(expr))


def _rule_match(exprs: Sequence[Mapping[str, Any]], ctx: _Ctx) -> tuple[TV, Mapping[str, Any] | None]:
    """Whether a rule matches the packet (True, False, unknown), and its verdict statement, if it has one."""
    truths: list[TV] = []
    for e in exprs:
        if "match" in e:
            truths.append(_eval_match(e["match"], ctx))
            if truths[-1] is False:
                return False, None
        elif any(k in e for k in ("accept", "drop", "reject", "jump", "goto", "return", "continue", "queue",
                                  "vmap")):
            return _and(truths), e
        elif "xt" in e:
            if e["xt"].get("type") == "target":
                name = str(e["xt"].get("name", ""))
                if name in _XT_VERDICTS:
                    return _and(truths), {_XT_VERDICTS[name]: None}
                if name in ("NFQUEUE", "QUEUE"):
                    return _and(truths), {"queue": None}
                continue  # LOG, MARK, CONNMARK...: not a verdict
            truths.append(None)
        elif any(k in e for k in ("limit", "quota", "fib", "socket", "osf", "synproxy")):
            truths.append(None)  # a match in disguise, that depends on state we cannot see
    return _and(truths), None


def _run_chain(key: ChainKey, ctx: _Ctx, depth: int) -> set[Outcome]:
    """Every way evaluation of `key` can end: accept / drop / other (queue, unknown chain) / return."""
    if depth > MAX_DEPTH or key not in ctx.rs.rules:
        return {("other", f"chain {key[2]} (not in the ruleset)")}
    outcomes: set[Outcome] = set()
    for n, exprs in enumerate(ctx.rs.rules[key], 1):
        truth, verdict = _rule_match(exprs, ctx)
        if truth is False or verdict is None:
            continue
        where = f"rule {n} of chain {key[2]}"
        sub = _verdict_outcomes(verdict, key, ctx, depth, where)
        if truth is True and not any(o[0] == "next" for o in sub):
            return outcomes | sub
        outcomes |= {o for o in sub if o[0] != "next"}
    outcomes.add(("return", f"end of chain {key[2]}"))
    return outcomes


def _verdict_outcomes(verdict: Mapping[str, Any], key: ChainKey, ctx: _Ctx, depth: int,
                      where: str) -> set[Outcome]:
    kind = _describe(verdict)
    if kind in ("accept", "drop"):
        return {(kind, where)}
    if kind == "reject":
        return {("drop", where + " (reject)")}
    if kind == "queue":
        return {("other", where + " (queue to a program)")}
    if kind == "continue":
        return {("next", where)}
    if kind == "return":
        return {("return", where)}
    if kind in ("jump", "goto"):
        target = (key[0], key[1], str((verdict[kind] or {}).get("target", "")))
        sub = _run_chain(target, ctx, depth + 1)
        if kind == "goto":
            return sub  # the goto'd chain's return is this chain's return
        return {("next", o[1]) if o[0] == "return" else o for o in sub}
    if kind == "vmap":
        vmap = verdict["vmap"]
        value_match = {"op": "==", "left": vmap.get("key")}
        branches = vmap.get("data", {})
        pairs = branches.get("set", []) if isinstance(branches, dict) else []
        outcomes: set[Outcome] = set()
        if not isinstance(pairs, list) or (isinstance(branches, str)):
            return {("other", where + " (verdict map)"), ("next", where)}
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                continue
            truth = _eval_match({**value_match, "right": pair[0]}, ctx)
            if truth is False:
                continue
            sub = _verdict_outcomes(pair[1], key, ctx, depth, where)
            if truth is True:
                return outcomes | sub
            outcomes |= sub
        return outcomes | {("next", where)}
    return {("other", where)}


def evaluate(rs: Ruleset, key: ChainKey, pkt: Packet, uplinks: Sequence[str] = ()) -> set[Outcome]:
    """How base chain `key` can end for `pkt`: outcomes accept / drop / other, each with where it happens."""
    ctx = _Ctx(pkt, tuple(uplinks), rs, key[0], key[1])
    policy = str(rs.chains.get(key, {}).get("policy", "accept"))
    out: set[Outcome] = set()
    for kind, where in _run_chain(key, ctx, 0):
        if kind in ("return", "next"):
            out.add(("drop" if policy == "drop" else "accept", f"policy {policy}"))
        else:
            out.add((kind, where))
    return out


# ------------------------------------------------------------------------------------------- findings

@dataclass(frozen=True)
class Finding:
    """One foreign base chain that drops (`blocked`) or may drop (`unsure`) some of the sandboxes' traffic."""

    hook: str
    family: str
    table: str
    chain: str
    product: str
    blocked: tuple[str, ...]  # labels of packets every path drops
    unsure: tuple[str, ...]  # labels of packets some path drops
    how: str  # where the drop happens: "policy drop", "rule 12 of chain filter_FORWARD (reject)"
    fix: str

    @property
    def certain(self) -> bool:
        return bool(self.blocked)

    @property
    def what(self) -> str:
        owner = {"": "another firewall", "iptables": "iptables' rules", "iptables-legacy": "iptables-legacy's rules"
                 }.get(self.product, self.product)
        where = f"table {self.family} {self.table}, chain {self.chain}"
        if self.blocked:
            return f"{owner} ({where}) drops {_join(self.blocked)}: {self.how}"
        return f"{owner} ({where}) may drop {_join(self.unsure)}, depending on what nsfw cannot see: {self.how}"

    @property
    def message(self) -> str:
        return f"{self.what}. Fix: {self.fix}"


def _join(labels: Sequence[str]) -> str:
    # "connections out of a sandbox (IPv4), ... (IPv6)" -> "connections out of a sandbox (IPv4, IPv6)"
    grouped: dict[str, list[str]] = {}
    for label in labels:
        what, _sep, fam = label.rpartition(" (")
        if fam.rstrip(")") not in grouped.setdefault(what, []):
            grouped[what].append(fam.rstrip(")"))
    return "; ".join(f"{what} ({', '.join(fams)})" for what, fams in grouped.items())


def product(rs: Ruleset, family: str, table: str) -> str:
    """The firewall a table belongs to, when recognisable from its table and chain names."""
    names = [k[2] for k in rs.chains if k[0] == family and k[1] == table]
    if table == "firewalld" or any(n.startswith("filter_FWD_") for n in names):
        return "firewalld"
    if any(n.startswith(("ufw-", "ufw6-")) for n in names):
        return "ufw"
    if any(n.startswith("DOCKER") for n in names):
        return "Docker"
    if any(n.startswith("LIBVIRT_") for n in names) or table.startswith("libvirt"):
        return "libvirt"
    if any(n.startswith("KUBE-") for n in names):
        return "Kubernetes"
    if table in ("netavark", "podman"):
        return "Podman"
    if table in ("lxd", "incus"):
        return table.upper() if table == "lxd" else "Incus"
    if any(n.startswith("ts-") for n in names):
        return "Tailscale"
    if table == LEGACY_TABLE:
        return "iptables-legacy"
    if table in ("filter", "mangle") and family in ("ip", "ip6") and any(n.isupper() for n in names):
        return "iptables"
    return ""


def _fix(rs: Ruleset, f: Finding) -> str:
    """The command that lets nsfw's traffic through this one firewall. Accepting nsfw's interfaces here opens
    nothing a profile denies: a packet must pass every base chain, and nsfw's own tables still drop it."""
    v6 = f.family == "ip6"
    ipt = ("ip6tables" if v6 else "iptables") + ("-legacy" if f.table == LEGACY_TABLE else "")
    fwd = f.hook == "forward"
    note = " (nsfw's own tables still enforce every profile: this opens nothing a profile denies)"
    if f.product == "ufw":
        return ("ufw route allow in on nsfw+" if fwd else "ufw allow in on nsfw+ to any port 53") + note
    if f.product == "firewalld":
        return ("firewall-cmd --permanent --zone=trusted --add-interface=nsfw+ && firewall-cmd --reload" + note)
    if f.product == "Docker" and fwd and (f.family, f.table, "DOCKER-USER") in rs.chains:
        return (f"{ipt} -I DOCKER-USER -i nsfw+ -j ACCEPT && "
                f"{ipt} -I DOCKER-USER -o nsfw+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" + note
                + "; Docker keeps DOCKER-USER across its restarts, not across reboots: save it (netfilter-persistent)")
    if f.table == LEGACY_TABLE or f.product in ("iptables", "Docker", "libvirt", "Kubernetes"):
        if fwd:
            return (f"{ipt} -I {f.chain} -i nsfw+ -j ACCEPT && "
                    f"{ipt} -I {f.chain} -o nsfw+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" + note
                    + ", and make it permanent where your firewall's rules are kept")
        return (f"{ipt} -I {f.chain} -i nsfw+ -p udp --dport 53 -j ACCEPT && "
                f"{ipt} -I {f.chain} -i nsfw+ -p tcp --dport 53 -j ACCEPT" + note)
    chain = f"{f.family} {f.table} {f.chain}"
    if fwd:
        return (f"nft insert rule {chain} iifname \"nsfw*\" accept && "
                f"nft insert rule {chain} oifname \"nsfw*\" ct state established,related accept" + note
                + ", and add the same to the file that defines that table (/etc/nftables.conf?)")
    return (f"nft insert rule {chain} iifname \"nsfw*\" meta l4proto {{ tcp, udp }} th dport 53 accept" + note
            + ", and add the same to the file that defines that table (/etc/nftables.conf?)")


def findings(rs: Ruleset, hook: str, packets: Sequence[Packet], uplinks: Sequence[str] = ()) -> list[Finding]:
    out: list[Finding] = []
    for key, chain in sorted(rs.chains.items()):
        family, table, name = key
        if chain.get("hook") != hook or owned(family, table) or family not in ("ip", "ip6", "inet"):
            continue
        blocked: list[str] = []
        unsure: list[str] = []
        hows: list[str] = []
        for pkt in packets:
            if pkt.hook != hook or (family == "ip" and pkt.family != 4) or (family == "ip6" and pkt.family != 6):
                continue
            outcomes = evaluate(rs, key, pkt, uplinks)
            drops = sorted(where for kind, where in outcomes if kind == "drop")
            if not drops:
                continue
            (blocked if all(kind == "drop" for kind, _w in outcomes) else unsure).append(pkt.label)
            hows += [d for d in drops if d not in hows]
        if not blocked and not unsure:
            continue
        draft = Finding(hook, family, table, name, product(rs, family, table), tuple(dict.fromkeys(blocked)),
                        tuple(dict.fromkeys(x for x in unsure if x not in blocked)), ", ".join(hows[:2]), "")
        out.append(dataclasses.replace(draft, fix=_fix(rs, draft)))
    return out


def _ruleset(ruleset_json: Sequence[Mapping[str, Any]], legacy: Mapping[str, str] | None) -> Ruleset:
    """The JSON ruleset plus iptables text: "iptables"/"ip6tables" are iptables-legacy's own tables;
    "iptables-nft"/"ip6tables-nft" (`iptables-nft -S`) stand in for the JSON's `ip filter`/`ip6 filter`, whose
    xt matches (`-m conntrack --ctstate ...`) the JSON shows without their arguments."""
    replaced = {("ip6" if t.startswith("ip6") else "ip") for t in (legacy or {}) if t.endswith("-nft")}
    rs = index_ruleset(item for item in ruleset_json
                       if "metainfo" not in item and _table_of(item) not in {(f, "filter") for f in replaced})
    for tool, text in (legacy or {}).items():
        family = "ip6" if tool.startswith("ip6") else "ip"
        index_legacy(family, text, rs, "filter" if tool.endswith("-nft") else LEGACY_TABLE)
    return rs


def _table_of(item: Mapping[str, Any]) -> tuple[str, str]:
    """(family, table) of a `list ruleset` item: a table names itself, the rest name their table."""
    kind, body = next(iter(item.items()), ("", {}))
    if not isinstance(body, dict):
        return "", ""
    return str(body.get("family", "")), str(body.get("name" if kind == "table" else "table", ""))


def _has_xt(ruleset_json: Sequence[Mapping[str, Any]], family: str) -> bool:
    return any("rule" in item and item["rule"].get("family") == family and item["rule"].get("table") == "filter"
               and any("xt" in e for e in item["rule"].get("expr", [])) for item in ruleset_json)


def forward_findings(ruleset_json: Sequence[Mapping[str, Any]], legacy: Mapping[str, str] | None = None, *,
                     uplinks: Sequence[str] = (), ipv6: bool = True) -> list[Finding]:
    return findings(_ruleset(ruleset_json, legacy), "forward", forward_packets(ipv6), uplinks)


def input_findings(ruleset_json: Sequence[Mapping[str, Any]], legacy: Mapping[str, str] | None = None, *,
                   uplinks: Sequence[str] = (), ipv6: bool = True) -> list[Finding]:
    return findings(_ruleset(ruleset_json, legacy), "input", input_packets(ipv6), uplinks)


def forward_blockers(ruleset_json: list[dict[str, Any]], legacy: dict[str, str] | None,
                     *, uplinks: Sequence[str] = (), ipv6: bool = True) -> list[str]:
    """One message (what, and the fix) per foreign firewall chain that certainly drops the sandboxes' forwarded
    traffic. `ruleset_json` is `nft -j list ruleset`'s "nftables" list; `legacy` maps "iptables" and
    "ip6tables" to `iptables-legacy -S` / `ip6tables-legacy -S` output. `uplinks` are the host's default-route
    interfaces (unknown when empty: a rule that depends on them is then not counted as certain); `ipv6` whether
    sandboxes get IPv6 (the host has an IPv6 default route)."""
    return [f.message for f in forward_findings(ruleset_json, legacy, uplinks=uplinks, ipv6=ipv6) if f.certain]


# ------------------------------------------------------------------------------------------- from the kernel

def _iptables_s(tool: str) -> str | None:
    binary = shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if binary is None:
        return None
    done = subprocess.run([binary, "-w", "-S"], capture_output=True, text=True, timeout=10, check=False)
    return done.stdout if done.returncode == 0 else None


def iptables_rules(ruleset_json: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """What `forward_blockers`' `legacy` wants from this namespace: iptables-legacy's filter tables when there
    are any, and `iptables-nft -S` where the nft ruleset holds iptables-nft rules with xt matches."""
    out = legacy_rules()
    for family, tool in (("ip", "iptables-nft"), ("ip6", "ip6tables-nft")):
        if _has_xt(ruleset_json, family):
            text = _iptables_s(tool)
            if text is not None:
                out[tool] = text
    return out


def legacy_rules() -> dict[str, str]:
    """iptables-legacy's filter tables, when there are any: /proc says so without loading a module (running
    `iptables-legacy -S` where ip_tables is not loaded would load it, and create empty tables)."""
    out: dict[str, str] = {}
    for tool, names in (("iptables", "/proc/net/ip_tables_names"), ("ip6tables", "/proc/net/ip6_tables_names")):
        try:
            with open(names) as f:
                if "filter" not in f.read().split():
                    continue
        except OSError:
            continue
        text = _iptables_s(f"{tool}-legacy")
        if text is not None:
            out[tool] = text
    return out


def uplinks() -> tuple[list[str], bool]:
    """The host's default-route interfaces, and whether there is an IPv6 default route (sandboxes get IPv6
    only then), from /proc: the reader's own network namespace, and no netlink library to import."""
    names: list[str] = []
    with contextlib.suppress(OSError), open("/proc/net/route") as f:
        for line in f.read().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 7 and cols[1] == "00000000" and cols[7] == "00000000" and cols[0] not in names:
                names.append(cols[0])
    default6 = False
    with contextlib.suppress(OSError), open("/proc/net/ipv6_route") as f:
        for line in f:
            cols = line.split()
            # destination ::/0, not the unreachable/blackhole defaults the kernel lists on lo
            if len(cols) >= 10 and cols[0] == "0" * 32 and cols[1] == "00" and cols[9] != "lo":
                default6 = True
                if cols[9] not in names:
                    names.append(cols[9])
    return names, default6


def forward_blockers_now() -> list[str]:
    """forward_blockers() on this namespace's live ruleset (one `list ruleset` through libnftables) and, where
    iptables-legacy has a filter table, its rules. For `nsfw run` to call before it builds anything."""
    from . import nft

    links, default6 = uplinks()
    ruleset = nft.ruleset()
    return forward_blockers(ruleset, iptables_rules(ruleset), uplinks=links, ipv6=default6)


def launch_blockers() -> list[str]:
    """What `nsfw run` refuses to start under: another firewall that certainly drops a sandbox's forwarded
    traffic, or its DNS to the sandbox's resolver. Starting anyway would give an app that silently cannot
    connect; nsfw never opens the other firewall's tables itself."""
    from . import nft

    links, default6 = uplinks()
    ruleset = nft.ruleset()
    legacy = iptables_rules(ruleset)
    out = []
    for fn in (forward_findings, input_findings):
        out += [f.message for f in fn(ruleset, legacy, uplinks=links, ipv6=default6) if f.certain]
    return out


def _firewall_checks() -> list[Check]:
    from . import nft
    from .errors import SetupError

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


# ============================================================================================ the other checks

def check_root() -> Check:
    if os.geteuid() == 0:
        return _ok("root", "running as root")
    return Check("root", "fail", "not root: nsfw run needs root, and these checks could not run: "
                 + ", ".join(ROOT_ONLY[:2]) + " and the nft tables part of leftovers", "sudo nsfw doctor")


# ------------------------------------------------------------------------------------------------ kernel

def _version(text: str) -> tuple[int, ...]:
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x) for x in found.groups() if x is not None) if found else ()


def _tiny_rulesets() -> list[tuple[str, list[dict[str, Any]]]]:
    """One table per feature, so that a failure names the feature."""
    t = f"{PREFIX}-doctor"

    def table(suffix: str, *cmds: dict[str, Any]) -> list[dict[str, Any]]:
        name = f"{t}-{suffix}"
        fix = [{**c, "add": {k: {**v, "table": name} for k, v in c["add"].items()}} for c in cmds]
        return [{"add": {"table": {"family": "inet", "name": name}}}, *fix]

    concat = {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"meta": {"key": "l4proto"}},
                         {"payload": {"protocol": "th", "field": "dport"}}]}
    return [
        ("inet table, filter chain, reject", table(
            "filter",
            {"add": {"chain": {"family": "inet", "name": "f", "type": "filter", "hook": "forward", "prio": 0,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": "inet", "chain": "f", "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                {"accept": None}]}}},
            {"add": {"rule": {"family": "inet", "chain": "f", "expr": [
                {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]}}})),
        ("inet NAT with masquerade", table(
            "nat",
            {"add": {"chain": {"family": "inet", "name": "p", "type": "nat", "hook": "postrouting", "prio": 100,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": "inet", "chain": "p", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                           "right": {"prefix": {"addr": "10.213.0.0", "len": 16}}}},
                {"masquerade": None}]}}})),
        ("concatenated interval sets (address . protocol . port)", table(
            "sets",
            {"add": {"set": {"family": "inet", "name": "s", "type": ["ipv4_addr", "inet_proto", "inet_service"],
                             "flags": ["interval"], "elem": [{"concat": [
                                 {"prefix": {"addr": "192.0.2.0", "len": 24}}, "tcp", {"range": [443, 444]}]}]}}},
            {"add": {"chain": {"family": "inet", "name": "o", "type": "filter", "hook": "output", "prio": 0,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": "inet", "chain": "o", "expr": [
                {"match": {"op": "==", "left": concat, "right": "@s"}}, {"accept": None}]}}})),
    ]


def _real_rulesets() -> list[tuple[str, list[dict[str, Any]]]]:
    """What nsfw itself loads for a profile that uses every kind of rule: the real test of the kernel."""
    from . import compile as rules
    from .names import HostEnv
    from .profile import Profile, Rule

    profile = Profile(
        name="doctor", path="", allow=(Rule("zone", "internet"), Rule("cidr", "192.0.2.0/24", "tcp", ((443, 443),)),
                                       Rule("zone", "host", "tcp", ((631, 631),)), Rule("host", "example.org")),
        deny=(Rule("zone", "lan"), Rule("host", "ads.example.org")))
    env = HostEnv(addresses=(ipaddress.ip_address("192.168.1.10"),),
                  connected=(ipaddress.ip_network("192.168.1.0/24"),), default6=True)
    gateways = [str(a.ip) for a in (SAMPLE.gateway4, SAMPLE.gateway6) if a]
    return [("nsfw's host-side table", rules.host_ruleset(SAMPLE, profile)),
            ("nsfw's forwarding guard", rules.guard_ruleset()),
            ("nsfw's sandbox table", rules.sandbox_ruleset(profile, env, gateways))]


def _kernel_child() -> dict[str, Any]:  # pragma: no cover - runs in the forked child
    from .caps import CLONE_NEWNET, CLONE_NEWUSER, unshare

    res: dict[str, Any] = {}
    try:
        unshare(CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET)
        res["netns"] = ""
    except OSError as e:
        res["netns"] = str(e)
        return res
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname=f"{PREFIX}doctor0", kind="veth", peer=f"{PREFIX}doctor1")
        res["veth"] = ""
    except Exception as e:
        res["veth"] = f"{type(e).__name__}: {e}"
    try:
        from . import nft
    except Exception as e:
        res["nft"] = [["libnftables", f"{type(e).__name__}: {e}"]]
        return res
    steps: list[list[str]] = []
    for what, build in (("tiny", _tiny_rulesets), ("real", _real_rulesets)):
        try:
            parts = build()
        except Exception as e:
            steps.append([what, f"cannot build: {type(e).__name__}: {e}"])
            continue
        for label, cmds in parts:
            try:
                nft.apply(cmds, label)
                steps.append([label, ""])
            except Exception as e:
                steps.append([label, str(e)])
    res["nft"] = steps
    return res


def probe_kernel(timeout: float = 20.0) -> dict[str, Any]:
    """Try namespaces, veth and nf_tables in a forked child inside a throwaway network namespace."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(_kernel_child()).encode())
            code = 0
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.write(write, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(code)
    os.close(write)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _w, _x = select.select([read], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                return {"error": f"the kernel check did not finish in {timeout:.0f} s"}
            chunk = os.read(read, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    try:
        result: dict[str, Any] = json.loads(data or b"{}")
    except ValueError:
        return {"error": "the kernel check died without an answer"}
    return result


def _kernel_fix(label: str, error: str) -> str:
    if "masquerade" in label or "NAT" in label:
        return "load the NAT modules (modprobe nft_nat nft_masq nft_chain_nat), or use a kernel with " \
               "CONFIG_NFT_NAT and CONFIG_NFT_MASQ"
    if "concatenated" in label:
        return (f"needs Linux >= {'.'.join(map(str, MIN_KERNEL))} (CONFIG_NF_TABLES_SET, nft_set_pipapo) and "
                f"nftables >= {'.'.join(map(str, MIN_NFT))}: upgrade the kernel and `{APT_FIX}`")
    if "libnftables" in label:
        return APT_FIX
    return "modprobe nf_tables nft_reject_inet nft_ct, or use a kernel with CONFIG_NF_TABLES and CONFIG_NF_TABLES_INET"


def kernel_checks(probe: Mapping[str, Any]) -> list[Check]:
    """Turn probe_kernel()'s answer into checks (pure)."""
    if "error" in probe:
        return [Check("kernel", "fail", str(probe["error"]), "run `nsfw doctor` again; report it if it persists")]
    if probe.get("netns"):
        hint = "" if os.geteuid() == 0 else " (without root, user namespaces must be enabled too)"
        return [Check("kernel: namespaces", "fail", f"cannot create a network namespace: {probe['netns']}{hint}",
                      "use a kernel with CONFIG_NET_NS (every distribution kernel has it)")]
    out = [_ok("kernel: namespaces", "network namespaces work")]
    if probe.get("veth"):
        out.append(Check("kernel: veth", "fail", f"cannot create a veth pair: {probe['veth']}",
                         "modprobe veth, or use a kernel with CONFIG_VETH"))
    else:
        out.append(_ok("kernel: veth", "veth pairs work"))
    steps = probe.get("nft") or []
    failed = [(label, err) for label, err in steps if err]
    if failed:
        label, err = failed[0]
        out.append(Check("kernel: nf_tables", "fail", f"{label}: {err}", _kernel_fix(label, err)))
    else:
        out.append(_ok("kernel: nf_tables", "loaded " + ", ".join(label for label, _e in steps)
                       + " into a throwaway namespace"))
    return out


# ---------------------------------------------------------------------------------------------- versions

def version_checks() -> list[Check]:
    out: list[Check] = []
    nft_bin = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if nft_bin is None:
        out.append(Check("versions: nft", "warn", "the nft command is not installed (nsfw uses libnftables; nft is "
                         "for looking at rulesets yourself)", "apt-get install nftables"))
    else:
        done = subprocess.run([nft_bin, "--version"], capture_output=True, text=True, timeout=10, check=False)
        have = _version(done.stdout)
        if have and have < MIN_NFT:
            out.append(Check("versions: nft", "fail", f"{done.stdout.strip()}: older than "
                             f"{'.'.join(map(str, MIN_NFT))}, which concatenated interval sets need",
                             "upgrade: " + APT_FIX))
        else:
            out.append(_ok("versions: nft", done.stdout.strip() or "nft present"))
    import importlib.util

    if importlib.util.find_spec("nftables") is None:
        out.append(Check("versions: libnftables", "fail", "the python3 binding of libnftables is missing", APT_FIX))
    else:
        out.append(_ok("versions: libnftables", "python3-nftables binding present (the same release as nft on "
                       "Debian)"))
    try:
        import importlib.metadata

        pv = importlib.metadata.version("pyroute2")
    except Exception:
        pv = ""
    if importlib.util.find_spec("pyroute2") is None:
        out.append(Check("versions: pyroute2", "fail", "pyroute2 is missing", APT_FIX))
    elif pv and _version(pv) and _version(pv) < MIN_PYROUTE2:
        out.append(Check("versions: pyroute2", "fail", f"pyroute2 {pv} is older than "
                         f"{'.'.join(map(str, MIN_PYROUTE2))}", "upgrade: " + APT_FIX))
    else:
        out.append(_ok("versions: pyroute2", f"pyroute2 {pv or '(version unknown)'}"))
    kernel = _version(os.uname().release)
    if kernel and kernel < MIN_KERNEL:
        out.append(Check("versions: kernel", "warn", f"Linux {os.uname().release}: older than "
                         f"{'.'.join(map(str, MIN_KERNEL))}, which concatenated interval sets need (see the "
                         "nf_tables check)", "upgrade the kernel"))
    else:
        out.append(_ok("versions: kernel", f"Linux {os.uname().release}"))
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
    from . import state

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


# ---------------------------------------------------------------------------------------------- resolver

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
    from .resolver.upstream import DEFAULT_NAMESERVER, parse_resolv_conf

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
    from . import state

    views = [RecordView(r.id, state.alive(r), r.netns, r.veth, r.table) for r in state.records()]
    try:
        ns = os.listdir(NETNS_DIR)
    except OSError:
        ns = []
    tables: list[str] = []
    if root:
        from . import nft

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
    from . import config
    from .errors import ProfileErrors

    if not os.path.exists(path):
        return _ok("config", f"{path}: none (defaults)")
    try:
        conf = config.load(Path(path))
    except ProfileErrors as e:
        return Check("config", "fail", str(e), f"fix {path} as the message says")
    return _ok("config", f"{path}: address pool {conf.pool4}, {conf.pool6}")


def _guard(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """A check that crashes is a finding, not a traceback: the rest of the report still matters."""
    try:
        return fn()
    except Exception as e:
        return [Check(name, "warn", f"the check itself failed: {type(e).__name__}: {e}",
                      "report this as a bug in nsfw doctor")]


def run_checks() -> list[Check]:
    root = os.geteuid() == 0
    checks = [check_root()]
    checks += _guard("kernel", lambda: kernel_checks(probe_kernel()))
    checks += _guard("versions", version_checks)
    checks += _guard("forwarding", lambda: [_forwarding()])
    if root:
        checks += _guard("firewall", _firewall_checks)
    else:
        checks += [Check(n, "warn", "not checked: reading the ruleset needs root", "sudo nsfw doctor")
                   for n in ROOT_ONLY[:2]]
    checks += _guard("rp_filter", lambda: [_rp_filter()])
    checks += _guard("ipv6", lambda: [_ipv6()])
    checks += _guard("resolver", lambda: [_resolver(), _port53()])
    checks += _guard("leftovers", lambda: [_leftovers(root)])
    checks += _guard("config", lambda: [config_check()])
    return checks


MARK = {"ok": "ok", "warn": "warn", "fail": "FAIL"}


def render(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks) if checks else 0
    lines = []
    for c in checks:
        lines.append(f"{MARK[c.status]:<5} {c.name:<{width}}  {c.detail}")
        if c.status != "ok" and c.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if failed:
        lines.append(f"\n{failed} problem(s) stop nsfw here" + (f"; {warned} warning(s)" if warned else "") + ".")
    else:
        lines.append("\nnsfw can run here" + (f" ({warned} warning(s))" if warned else "") + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    checks = run_checks()
    sys.stdout.write(render(checks))
    sys.stdout.flush()
    return 1 if any(c.status == "fail" for c in checks) else 0
