"""The firewall model: the packets a sandbox sends and receives, and a ruleset indexed for evaluation.

A packet is concrete: a sandbox in slot 0 opening a TCP (or UDP) connection to an internet address, the reply
coming back, or its DNS query to the resolver on its gateway. Only the uplink's name may be unknown (the pure
function is given rulesets recorded elsewhere); a match on it is then "unknown", never guessed.

A ruleset comes from `nft -j list ruleset` and/or `iptables -S` text, which is translated here into the same
nft JSON expressions. On `nsfw run`'s path (through `firewall`): standard library and `names` only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..names import PREFIX, Instance
from . import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any, Literal

__all__ = ["EPHEMERAL", "LEGACY_TABLE", "REMOTE", "SAMPLE", "VETH", "ChainKey", "Packet", "Ruleset",
           "forward_packets", "index_legacy", "index_ruleset", "input_packets", "owned"]

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


