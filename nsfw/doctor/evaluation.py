"""How a base chain ends for one packet: every path through its rules, jumps, gotos, returns and policy.

A match is True, False, or unknown (None) when it depends on what the ruleset alone cannot tell (an uplink
whose name was not given, a rate limit, an xt match shown without its arguments). A chain is reported by
`firewall` only when every path ends in drop or reject; unknowns make a path possible, never certain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..names import PREFIX
from . import TYPE_CHECKING
from .ruleset import _XT_VERDICTS, VETH, ChainKey, Packet, Ruleset

if TYPE_CHECKING:
    from typing import Any

__all__ = ["MAX_DEPTH", "TV", "Outcome", "evaluate"]

TV = bool | None  # a match's truth: True, False, or None when it cannot be known from the ruleset alone

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

