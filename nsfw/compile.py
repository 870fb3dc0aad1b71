"""Profile -> nftables rulesets as libnftables JSON commands. Pure: no kernel, deterministic output.

The sandbox's table classifies each new outbound connection's destination into a zone with one verdict-map
lookup, then decides in that zone's chain. Profile rules become set elements, not rules, so a profile of ten
thousand CIDRs costs the data path a lookup, not ten thousand comparisons:

    output: loopback, TCP but a connection's first SYN, a known UDP flow, DNS (the host redirects it to the
            sandbox's resolver) -> accept; cidr deny and denied-name sets -> reject;
            daddr vmap @zone (host -> to_host, lan -> to_lan, other -> to_other), else to_internet
    to_ZONE: zone deny rules -> reject; granted name addresses (lan, internet) -> accept;
             cidr allow set -> accept (not to_host); zone allow rules -> accept; the profile's default
    opened:  what a zone chain accepts: a UDP flow is remembered (below), then accept

The host's table for a `nat` sandbox (host_ruleset) redirects its DNS, masquerades it, and isolates it. The
sandbox's table has no nat chain: a nat hook there would cost every new connection, where the host's
conntrack, which NAT needs anyway, carries the redirect for nothing.

There is no conntrack in the sandbox's namespace: the table uses no `ct` expression, so the kernel registers
none of conntrack's hooks there. They cost every new connection about a tenth of its rate, and the host's
conntrack, which NAT needs anyway, already follows each flow. For TCP, only a connection's first packet, a bare
SYN, is classified; the rest of it passes. The host's table keeps that honest: from the sandbox it drops TCP
that its conntrack finds invalid, or new without being a bare SYN (a mid-stream ACK would otherwise open a flow
nobody classified), and it lets into the sandbox only replies. For UDP, the flow a classified packet opens goes
into a set from the packet path (`update`), keyed by far address, far port and own port, and expires
FLOW_TIMEOUT after its last packet either way: that is what lets replies in and a flow to a granted name
outlive the grant, as conntrack's state did. ICMP is classified packet by packet (echo replies and errors come
in). Rejects stay in the sandbox, whose ICMP errors reach the app over loopback, free of the ICMP rate limit a
reject from the host would hit.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

from .granter import FAMILY as FAMILY  # the granter's: the slim keeper runs it without this module
from .granter import SEEN as SEEN
from .granter import TABLE as TABLE
from .granter import grant_set as grant_set
from .intervals import Box, Cell, Span, disjoint, disjoint_cells, merge_addresses, merge_packed
from .names import PREFIX, HostEnv, Instance
from .profile import Profile, Rule

Cmd = dict[str, Any]

LAN4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10")
LAN6 = ("fc00::/7", "fe80::/10")
# Neither internet nor lan: this-network, loopback, multicast, reserved and broadcast.
OTHER4 = ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")
OTHER6 = ("::/127", "::ffff:0:0/96", "ff00::/8")
ZONE_CHAINS = ("to_host", "to_lan", "to_other", "to_internet")
ZONE_APPLIES = {"host": ("to_host",), "lan": ("to_lan",), "internet": ("to_internet",),
                "any": ("to_lan", "to_internet")}

PROTO_NUM = {"tcp": 6, "udp": 17}
ICMP = {4: 1, 6: 58}
PROTO_NAME = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}
ALL: Span = (0, 255)
ALL_PORTS: Span = (0, 65535)
ND_TYPES = ["nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert"]


# ---------------------------------------------------------------------------------------------- expressions


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _daddr(version: int) -> dict[str, Any]:
    return _payload("ip" if version == 4 else "ip6", "daddr")


def _saddr(version: int) -> dict[str, Any]:
    return _payload("ip" if version == 4 else "ip6", "saddr")


PROTO_PORT = {"concat": [_meta("l4proto"), _payload("th", "dport")]}
ESTABLISHED = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
INVALID = _match({"ct": {"key": "state"}}, "invalid", "in")
NEW = _match({"ct": {"key": "state"}}, "new", "in")
ND = _match(_payload("icmpv6", "type"), {"set": ND_TYPES})
DNS = _match(PROTO_PORT, {"set": [{"concat": ["udp", 53]}, {"concat": ["tcp", 53]}]})
TCP = _match(_meta("l4proto"), "tcp")
_FLAGS = _payload("tcp", "flags")  # nft adds the `meta l4proto tcp` this depends on
# A connection's first packet: SYN, and none of ACK, FIN, RST (ECN's ECE and CWR may ride along).
NOT_FIRST_SYN = _match({"&": [_FLAGS, ["fin", "syn", "rst", "ack"]]}, "syn", "!=")
# TCP but an opening SYN (SYN without ACK): the sandbox takes no connections from outside; a SYN-ACK is a reply.
NOT_OPENING_TCP = _match({"&": [_FLAGS, ["syn", "ack"]]}, "syn", "!=")
# What ICMP the sandbox takes in: echo replies, and errors about its flows (path MTU: "fragmentation needed" is a
# destination-unreachable code). The host forwards them only when its conntrack found them part of, or related
# to, a flow of the sandbox.
ICMP_IN = [
    _match(_payload("icmp", "type"), {"set": ["echo-reply", "destination-unreachable", "time-exceeded"]}),
    _match(_payload("icmpv6", "type"),
           {"set": ["echo-reply", "destination-unreachable", "packet-too-big", "time-exceeded"]}),
]


# The sandbox has no conntrack at all (it cost every new connection about a tenth of its rate): its UDP flows
# are remembered in a set filled from the packet path, keyed by the far end and both ports, each element
# expiring FLOW_TIMEOUT after the last packet either way (conntrack's own timeout for a UDP stream).
OPENED = "opened"
FLOWS = {4: "flows4", 6: "flows6"}
FLOW_TIMEOUT = 120
FLOW_MAX = 65536  # per sandbox; when full, a new flow is still classified packet by packet, but gets no replies
DNS_REPLY = _match(_payload("udp", "sport"), 53)
# A TCP destination (address, port) the profile let a connection open is not classified again for VERDICT_TTL
# seconds: a browser opens many connections to the same few places, and the classification (the blocklist, the
# zone map, the grant and rule sets) was most of what a sandbox cost a new connection. An entry is never
# refreshed, so no verdict is older than that: a grant that ends takes effect within it. An address learned for a
# denied name empties the cache at once (granter.SEEN). (A UDP flow is remembered whole, in FLOWS.)
VERDICT_TTL = 1


def _flow(version: int, way: str) -> dict[str, Any]:
    """A UDP packet's flow key, (far address, far port, own port), as it leaves ("out") or comes in ("in")."""
    if way == "out":
        return {"concat": [_daddr(version), _payload("udp", "dport"), _payload("udp", "sport")]}
    return {"concat": [_saddr(version), _payload("udp", "sport"), _payload("udp", "dport")]}


def _refresh(version: int, way: str) -> dict[str, Any]:
    """Adds the packet's flow, or restarts its timeout (nft's `update`); a full set leaves the rule there."""
    return {"set": {"op": "update", "elem": _flow(version, way), "set": f"@{FLOWS[version]}"}}


def _dest(version: int) -> dict[str, Any]:
    return {"concat": [_daddr(version), _payload("tcp", "dport")]}


def _verdict(v: str, target: str | None = None) -> dict[str, Any]:
    if v == "reject":  # an app learns at once that it is blocked, instead of waiting out a dropped SYN
        return {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}
    return {v: {"target": target}} if target else {v: None}


def _addr(value: int, version: int) -> str:
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    if value >> 32 in (0, 0xFFFF):  # where inet_ntop writes the last 32 bits dotted and ipaddress does not
        return str(ipaddress.IPv6Address(value))  # ipaddress's spelling of IPv6, as elsewhere in the output
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))  # the same spelling elsewhere, 10x quicker


def _addr_elem(span: Span, version: int) -> Any:
    return _addr_elems([span], version)[0]


def _addr_elems(spans: Iterable[Span], version: int) -> list[Any]:
    """Each span in its shortest form: an address, a prefix (an aligned block of a power of two), else a range.
    One loop with the IPv4 spelling inline: a blocklist's set has tens of thousands of elements."""
    bits = 32 if version == 4 else 128
    ntop, af = socket.inet_ntop, socket.AF_INET
    out: list[Any] = []
    append = out.append
    for lo, hi in spans:
        size = hi - lo + 1
        first = ntop(af, lo.to_bytes(4, "big")) if version == 4 else _addr(lo, 6)
        if size & (size - 1) or lo & (size - 1):
            append({"range": [first, ntop(af, hi.to_bytes(4, "big")) if version == 4 else _addr(hi, 6)]})
        elif size == 1:
            append(first)
        else:
            append({"prefix": {"addr": first, "len": bits + 1 - size.bit_length()}})
    return out


def _proto_elem(span: Span) -> Any:
    if span[0] == span[1]:
        return PROTO_NAME.get(span[0], span[0])
    return {"range": list(span)}


def _port_elem(span: Span) -> Any:
    return span[0] if span[0] == span[1] else {"range": list(span)}


# ---------------------------------------------------------------------------------------------- rules -> cells


def rule_cells(rule: Rule, version: int) -> list[Cell]:
    """The (protocol, port) boxes a rule covers for one IP version."""
    ports = rule.ports or (ALL_PORTS,)
    if rule.proto == "icmp":
        return [((ICMP[version], ICMP[version]), ALL_PORTS)]
    if rule.proto == "any" and not rule.ports:
        return [(ALL, ALL_PORTS)]
    protos = ("tcp", "udp") if rule.proto == "any" else (rule.proto,)
    return [((PROTO_NUM[p], PROTO_NUM[p]), port) for p in protos for port in ports]


def _span(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Span:
    lo = int(net.network_address)
    return lo, lo | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


def _rule_spans(rule: Rule, version: int) -> list[Span]:
    """The address spans of a cidr rule or of a read list, for one IP version."""
    if rule.kind == "cidr":
        return [rule.span[1:]] if rule.span[0] == version else []
    if rule.kind == "file" and rule.listed is not None:
        return rule.listed.spans(version)
    return []


def cidr_boxes(rules: Iterable[Rule], version: int, whole: Sequence[Span] | None = None) -> list[Box]:
    """Address boxes of the cidr rules and lists that open or close only some protocols or ports, less those
    that a whole-network rule of the same list already covers (`whole`: cidr_whole's, when known already)."""
    rules = list(rules)
    if whole is None:
        whole = cidr_whole(rules, version)
    starts = [lo for lo, _hi in whole]
    out: list[Box] = []
    for rule in rules:
        if rule.ports or rule.proto != "any":
            cells = rule_cells(rule, version)
            for span in _rule_spans(rule, version):
                i = bisect.bisect_right(starts, span[0]) - 1
                if i >= 0 and whole[i][1] >= span[1]:
                    continue
                for cell in cells:
                    out.append((span, cell))
    return out


def cidr_whole(rules: Iterable[Rule], version: int) -> list[Span]:
    """Address spans, merged and sorted, of the cidr rules and lists that cover every protocol and port: a plain
    interval set holds them, the quickest kind to load and to look up (a 100,000-line blocklist is one of these)."""
    bits = 32 if version == 4 else 128
    packed: list[int] = []
    for r in rules:
        if r.ports or r.proto != "any":
            continue
        if r.kind == "cidr" and r.span[0] == version:
            packed.append(r.span[1] << bits | r.span[2])
        elif r.kind == "file" and r.listed is not None:
            packed += r.listed.packed(version)
    return merge_packed(packed, bits)


def _zone_cells(rules: Iterable[Rule], chain: str) -> dict[int, list[Cell]]:
    cells: dict[int, list[Cell]] = {4: [], 6: []}
    for rule in rules:
        if rule.kind == "zone" and chain in ZONE_APPLIES[rule.value]:
            for v in (4, 6):
                cells[v] += rule_cells(rule, v)
    return cells


def name_groups(profile: Profile) -> list[tuple[Rule, ...]]:
    """Allowed names grouped by what they open (protocol and ports): one pair of grant sets per group, filled
    by the sandbox's resolver with the addresses it hands out, so 200 names cost one lookup, not 200 rules."""
    groups: dict[tuple[str, tuple[tuple[int, int], ...]], list[Rule]] = {}
    for rule in profile.allow:
        if rule.kind == "host":
            groups.setdefault((rule.proto, rule.ports), []).append(rule)
    return [tuple(g) for g in groups.values()]


def denied_names(profile: Profile) -> bool:
    return any(r.kind == "host" for r in profile.deny)


# ---------------------------------------------------------------------------------------------- sets and chains


def _concat_set(name: str, version: int, boxes: Sequence[Box]) -> Cmd:
    boxes = disjoint(boxes)
    addrs = _addr_elems([span for span, _cell in boxes], version)
    elems = [{"concat": [addr, _proto_elem(proto), _port_elem(port)]}
             for addr, (_span, (proto, port)) in zip(addrs, boxes, strict=True)]
    spec: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name,
                            "type": ["ipv4_addr" if version == 4 else "ipv6_addr", "inet_proto", "inet_service"],
                            "flags": ["interval"]}
    if elems:
        spec["elem"] = elems
    return {"add": {"set": spec}}


def _timeout_set(name: str, version: int, *more: str, timeout: int | None = None, size: int | None = None) -> Cmd:
    """A set whose elements expire: an address (then `more` key fields, a concatenation), with a default
    `timeout` and a bound on its `size` for those the packet path fills."""
    addr = "ipv4_addr" if version == 4 else "ipv6_addr"
    spec: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name, "type": [addr, *more] if more else addr,
                            "flags": ["timeout"]}
    if timeout is not None:
        spec["timeout"] = timeout
    if size is not None:
        spec["size"] = size
    return {"add": {"set": spec}}


def _addr_set(name: str, version: int, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Cmd:
    return _span_set(name, version, [_span(n) for n in nets if n.version == version])


def _span_set(name: str, version: int, spans_in: Iterable[Span]) -> Cmd:
    spans = list(spans_in)
    if any(a[1] + 1 >= b[0] for a, b in pairwise(spans)):  # cidr_whole's come merged: a blocklist's, once
        spans = list(merge_addresses(spans))
    spec: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name,
                            "type": "ipv4_addr" if version == 4 else "ipv6_addr", "flags": ["interval"]}
    elems = _addr_elems(spans, version)
    if elems:
        spec["elem"] = elems
    return {"add": {"set": spec}}


def _rule(chain: str, *expr: dict[str, Any], table: str = TABLE) -> Cmd:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": list(expr)}}}


def _cells_rule(chain: str, cells_by_version: dict[int, list[Cell]], verdict: str) -> list[Cmd]:
    """One rule per IP version (ICMP differs between them), or a bare verdict when every cell is covered."""
    out: list[Cmd] = []
    merged = {v: disjoint_cells(frozenset(c)) for v, c in cells_by_version.items() if c}
    if merged.get(4) == ((ALL, ALL_PORTS),) and merged.get(6) == ((ALL, ALL_PORTS),):
        return [_rule(chain, _verdict(verdict))]
    for v, cells in sorted(merged.items()):
        family = _match(_meta("nfproto"), "ipv4" if v == 4 else "ipv6")
        elems = [{"concat": [_proto_elem(p), _port_elem(q)]} for p, q in cells]
        out.append(_rule(chain, family, _match(PROTO_PORT, {"set": elems}), _verdict(verdict)))
    return out


def _networks(texts: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in texts]


def _grant_rules(chain: str, profile: Profile) -> list[Cmd]:
    """Addresses the resolver handed out for allowed names, in the zones a name may open: never the host nor
    loopback or multicast (DNS rebinding), and after the zone's denies, so `deny: [lan]` still wins."""
    if chain not in ("to_lan", "to_internet"):
        return []
    out: list[Cmd] = []
    for i, group in enumerate(name_groups(profile)):
        for v in (4, 6):
            cells = disjoint_cells(frozenset(rule_cells(group[0], v)))
            where = _match(_daddr(v), f"@{grant_set(i, v)}")
            if cells == ((ALL, ALL_PORTS),):
                out.append(_rule(chain, where, _verdict("accept")))
            else:
                elems = [{"concat": [_proto_elem(p), _port_elem(q)]} for p, q in cells]
                out.append(_rule(chain, where, _match(PROTO_PORT, {"set": elems}), _verdict("accept")))
    return out


Parts = dict[tuple[str, int], Any]  # ("allow" | "deny", version) -> (whole networks, port-specific boxes)


def _parts(profile: Profile) -> Parts:
    """Each list's cidr rules split once per compile, not once per chain: a blocklist is large."""
    out: Parts = {}
    for which, rules in (("allow", profile.allow), ("deny", profile.deny)):
        for v in (4, 6):
            whole = cidr_whole(rules, v)
            out[which, v] = (whole, cidr_boxes(rules, v, whole))
    return out


def _zone_chain(chain: str, profile: Profile, parts: Parts) -> list[Cmd]:
    rules = _cells_rule(chain, _zone_cells(profile.deny, chain), "reject")
    rules += _grant_rules(chain, profile)
    if chain != "to_host":  # the host opens only to rules that name it
        for v in (4, 6):
            if parts["allow", v][0]:
                rules.append(_rule(chain, _match(_daddr(v), f"@allowaddr{v}"), _verdict("accept")))
            if parts["allow", v][1]:
                rules.append(_rule(chain, _match({"concat": [_daddr(v), *PROTO_PORT["concat"]]}, f"@allow{v}"),
                                   _verdict("accept")))
    rules += _cells_rule(chain, _zone_cells(profile.allow, chain), "accept")
    final = "accept" if profile.default == "allow" and chain != "to_host" else "reject"
    rules.append(_rule(chain, _verdict(final)))
    for i, rule in enumerate(rules):  # nothing after a verdict that every packet takes
        if len(rule["add"]["rule"]["expr"]) == 1:
            return rules[: i + 1]
    return rules


ZONE_ORDER = ("host", "lan", "other")  # where zones overlap, the first wins: the host's own 192.168.1.10 is host


def zone_spans(spans: Sequence[Iterable[Span]]) -> list[tuple[Span, int]]:
    """Disjoint address spans, each labelled with the index of the first of `spans` that covers it (an
    interval map refuses overlapping elements); addresses none covers are left out."""
    labelled = [(lo, hi, rank) for rank, group in enumerate(spans) for lo, hi in group]
    cuts = sorted({p for lo, hi, _r in labelled for p in (lo, hi + 1)})
    out: list[tuple[Span, int]] = []
    for lo, nxt in pairwise(cuts):
        ranks = [r for a, b, r in labelled if a <= lo and nxt - 1 <= b]
        if not ranks:
            continue
        rank = min(ranks)
        if out and out[-1][1] == rank and out[-1][0][1] + 1 == lo:
            out[-1] = ((out[-1][0][0], nxt - 1), rank)
        else:
            out.append(((lo, nxt - 1), rank))
    return out


def _zone_map(version: int, nets: Sequence[Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]]) -> Cmd:
    """Destination address -> `goto to_ZONE` in one lookup; what no zone holds is the internet."""
    spans = zone_spans([[_span(n) for n in group if n.version == version] for group in nets])
    spec: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": f"zone{version}",
                            "type": "ipv4_addr" if version == 4 else "ipv6_addr", "map": "verdict",
                            "flags": ["interval"]}
    if spans:
        spec["elem"] = [[_addr_elem(span, version), _verdict("goto", f"to_{ZONE_ORDER[rank]}")]
                        for span, rank in spans]
    return {"add": {"map": spec}}


def _zone_maps(env: HostEnv, gateways: Sequence[str]) -> list[Cmd]:
    """Loaded after the zone chains, which their elements name."""
    host_nets = [ipaddress.ip_network(a) for a in (*env.addresses, *map(ipaddress.ip_address, gateways))]
    lan_nets = _networks(LAN4 + LAN6) + list(env.connected)
    return [_zone_map(v, [host_nets, lan_nets, _networks(OTHER4 if v == 4 else OTHER6)]) for v in (4, 6)]


def _sets(profile: Profile, parts: Parts) -> list[Cmd]:
    """The profile's address sets and the grant sets its resolver fills."""
    cmds: list[Cmd] = []
    for v in (4, 6):
        cmds.append(_span_set(f"denyaddr{v}", v, parts["deny", v][0]))
        cmds.append(_span_set(f"allowaddr{v}", v, parts["allow", v][0]))
        cmds.append(_concat_set(f"deny{v}", v, parts["deny", v][1]))
        cmds.append(_concat_set(f"allow{v}", v, parts["allow", v][1]))
        for i in range(len(name_groups(profile))):
            cmds.append(_timeout_set(grant_set(i, v), v))
        if denied_names(profile):
            cmds.append(_timeout_set(f"dnsdeny{v}", v))
    return cmds


def _chain(name: str, kind: str | None = None, hook: str | None = None, prio: int = 0,
           policy: str = "accept") -> Cmd:
    spec: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name}
    if kind and hook:
        spec.update(type=kind, hook=hook, prio=prio, policy=policy)
    return {"add": {"chain": spec}}


def _classify(chain: str, profile: Profile, parts: Parts) -> list[Cmd]:
    """A new connection, after the fixed accepts: `ipv6: false`, the deny sets, then its destination's zone."""
    cmds: list[Cmd] = []
    if not profile.ipv6:  # the sandbox has no IPv6 route either; this keeps it so whatever it tries
        cmds.append(_rule(chain, _match(_meta("nfproto"), "ipv6"), _verdict("reject")))
    for v in (4, 6):
        if parts["deny", v][0]:
            cmds.append(_rule(chain, _match(_daddr(v), f"@denyaddr{v}"), _verdict("reject")))
        if parts["deny", v][1]:
            cmds.append(_rule(chain, _match({"concat": [_daddr(v), *PROTO_PORT["concat"]]}, f"@deny{v}"),
                              _verdict("reject")))
        if denied_names(profile):  # addresses learned for denied names, while they are known
            cmds.append(_rule(chain, _match(_daddr(v), f"@dnsdeny{v}"), _verdict("reject")))
    for v in (4, 6):
        cmds.append(_rule(chain, {"vmap": {"key": _daddr(v), "data": f"@zone{v}"}}))
    cmds.append(_rule(chain, _verdict("goto", "to_internet")))
    return cmds


def _dns_redirect(chain: str, table: str, resolvers: dict[int, str], *head: dict[str, Any]) -> list[Cmd]:
    """Every DNS packet, to any address, to the sandbox's own resolver: choosing another resolver cannot get
    around a name rule. (DNS over TLS or HTTPS is ordinary traffic under the profile's rules.)"""
    return [_rule(chain, *head, _match(_meta("nfproto"), "ipv4" if v == 4 else "ipv6"), DNS,
                  {"dnat": {"family": "ip" if v == 4 else "ip6", "addr": addr}}, table=table)
            for v, addr in sorted(resolvers.items())]


def sandbox_ruleset(profile: Profile, env: HostEnv | None = None, gateways: Sequence[str] = ()) -> list[Cmd]:
    """The table loaded inside the sandbox's namespace. `env` fills the zone maps at launch; without it (`nsfw
    rules`) they hold only what every machine shares, so the output is the same everywhere. `gateways`: where
    the sandbox's resolvers listen (none for `network: none`)."""
    if profile.network == "none":
        return loopback_ruleset()
    env = env or HostEnv()
    parts = _parts(profile)
    cmds: list[Cmd] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}, *_sets(profile, parts)]
    cmds += [_timeout_set(FLOWS[v], v, "inet_service", "inet_service", timeout=FLOW_TIMEOUT, size=FLOW_MAX)
             for v in (4, 6)]
    cmds += [_timeout_set(SEEN[v], v, "inet_service", timeout=VERDICT_TTL, size=FLOW_MAX) for v in (4, 6)]
    resolvers: dict[int, str] = {ipaddress.ip_address(g).version: g for g in gateways}
    cmds += [_chain("output", "filter", "output", 0, "drop"), _chain("input", "filter", "input", 0, "drop")]
    cmds += [_chain(chain) for chain in (*ZONE_CHAINS, OPENED)]
    cmds += _zone_maps(env, gateways)
    cmds += [
        _rule("output", _match(_meta("oif"), "lo"), _verdict("accept")),
        # The rest of a connection whose SYN this chain accepted (or a reset of one it refused): the host's
        # table drops what its conntrack does not know (host_ruleset).
        _rule("output", NOT_FIRST_SYN, _verdict("accept")),
        *(_rule("output", _match(_dest(v), f"@{SEEN[v]}"), _verdict("accept")) for v in (4, 6)),
        *(_rule("output", _match(_flow(v, "out"), f"@{FLOWS[v]}"), _refresh(v, "out"), _verdict("accept"))
          for v in (4, 6)),
        _rule("output", ND, _verdict("accept")),
    ]
    # Every DNS packet, to any address, reaches the sandbox's own resolver: the host table redirects it
    # (host_ruleset), so choosing another resolver cannot get around a name rule.
    for v in sorted(resolvers):
        cmds.append(_rule("output", _match(_meta("nfproto"), "ipv4" if v == 4 else "ipv6"), DNS,
                          _verdict("accept")))
    cmds += _classify("output", profile, parts)
    for chain in ZONE_CHAINS:
        cmds += _zone_chain(chain, profile, parts)
    # A UDP flow the profile let open is remembered, so that its replies come in and it outlives a name's grant.
    cmds += [*(_rule(OPENED, _refresh(v, "out")) for v in (4, 6)),
             *(_rule(OPENED, {"set": {"op": "add", "elem": _dest(v), "set": f"@{SEEN[v]}"}}) for v in (4, 6)),
             _rule(OPENED, _verdict("accept"))]
    cmds += [
        # TCP but an opening SYN, first: a reply to the sandbox's TCP, the host's table lets only those of flows
        # its conntrack knows through; one rule for most of what comes in.
        _rule("input", NOT_OPENING_TCP, _verdict("accept")),
        _rule("input", _match(_meta("iif"), "lo"), _verdict("accept")),
        *(_rule("input", _match(_flow(v, "in"), f"@{FLOWS[v]}"), _refresh(v, "in"), _verdict("accept"))
          for v in (4, 6)),
        # The resolver's answers, which the host's conntrack returns from wherever the query was sent.
        _rule("input", DNS_REPLY, _verdict("accept")),
        *(_rule("input", m, _verdict("accept")) for m in ICMP_IN),
        _rule("input", ND, _verdict("accept")),
        _rule("input", _verdict("drop")),
    ]
    return _opened(_counted(cmds))


def loopback_ruleset() -> list[Cmd]:
    """A `network: none` sandbox's table: it has loopback only, so no rule of its profile can apply. The same for
    every profile, so the warm daemon's pool loads it ahead of launches (sandbox.prebuild)."""
    cmds: list[Cmd] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
                       _chain("output", "filter", "output", 0, "drop"), _chain("input", "filter", "input", 0, "drop"),
                       _rule("output", _match(_meta("oif"), "lo"), _verdict("accept")),
                       _rule("output", _verdict("reject")),
                       _rule("input", _match(_meta("iif"), "lo"), _verdict("accept")),
                       _rule("input", _verdict("drop"))]
    return _counted(cmds)


def _opened(cmds: list[Cmd]) -> list[Cmd]:
    """What the zone chains accept goes through `opened`, which remembers a UDP flow before accepting it."""
    for cmd in cmds:
        rule = cmd.get("add", {}).get("rule")
        if rule and rule["chain"] in ZONE_CHAINS and rule["expr"][-1] == {"accept": None}:
            rule["expr"][-1] = _verdict("goto", OPENED)
    return cmds


COUNTERS = {"accept": "allowed", "reject": "denied"}


def _counted(cmds: list[Cmd]) -> list[Cmd]:
    """Every verdict on what the sandbox sends, but loopback and neighbour discovery, adds to one of two named
    counters, `allowed` and `denied`, which `nsfw ps` reads."""
    out: list[Cmd] = [cmds[0]]
    out += [{"add": {"counter": {"family": FAMILY, "table": TABLE, "name": n}}} for n in COUNTERS.values()]
    for cmd in cmds[1:]:
        rule = cmd.get("add", {}).get("rule")
        if rule and rule["chain"] not in ("input", OPENED) and rule["expr"][0] not in (_match(_meta("oif"), "lo"), ND):
            verdict = next(iter(rule["expr"][-1]))
            exprs = [e for e in rule["expr"] if "counter" not in e]
            if verdict in COUNTERS:
                rule["expr"] = [*exprs[:-1], {"counter": COUNTERS[verdict]}, exprs[-1]]
        out.append(cmd)
    return out


# ---------------------------------------------------------------------------------------------- host side


def host_ruleset(inst: Instance, profile: Profile) -> list[Cmd]:
    """The host's table for one `nat` sandbox: every DNS packet to the sandbox's resolver, NAT out, nothing in,
    no sandbox-to-sandbox, host closed."""
    t, veth = inst.table, inst.veth
    iif, oif = _meta("iifname"), _meta("oifname")
    cmds: list[Cmd] = [{"add": {"table": {"family": FAMILY, "name": t}}}]
    for name, kind, hook, prio in (("prerouting", "nat", "prerouting", -100),
                                   ("postrouting", "nat", "postrouting", 100), ("forward", "filter", "forward", 0),
                                   ("input", "filter", "input", 0)):
        cmds.append({"add": {"chain": {"family": FAMILY, "table": t, "name": name, "type": kind, "hook": hook,
                                       "prio": prio, "policy": "accept"}}})
    # Here rather than in the sandbox's namespace, where a nat hook would cost every new connection: the host's
    # conntrack, which NAT needs anyway, carries the redirect.
    resolvers: dict[int, str] = {v: str(gw.ip) for v, gw in ((4, inst.gateway4), (6, inst.gateway6)) if gw}
    cmds += _dns_redirect("prerouting", t, resolvers, _match(iif, veth))
    own = {4: inst.address4, 6: inst.address6}
    for v, addr in own.items():
        if addr is None:
            continue
        cmds.append(_rule("postrouting", _match(_saddr(v), str(addr.ip)), _match(oif, veth, "!="),
                          {"masquerade": None}, table=t))
    # Forwarded packets go one way or the other at once: each of them meets two rules of this table, then only
    # those of its direction (these chains see every packet of the sandbox's traffic).
    cmds += [{"add": {"chain": {"family": FAMILY, "table": t, "name": c}}} for c in ("from_sandbox", "to_sandbox")]
    cmds += [_rule("forward", _match(iif, veth), _verdict("goto", "from_sandbox"), table=t),
             _rule("forward", _match(oif, veth), _verdict("goto", "to_sandbox"), table=t)]
    cmds.append(_rule("from_sandbox", _match(oif, f"{PREFIX}*"), _verdict("drop"), table=t))
    for v, addr in own.items():
        nfproto = _match(_meta("nfproto"), "ipv4" if v == 4 else "ipv6")
        if addr is None:
            cmds.append(_rule("from_sandbox", nfproto, _verdict("drop"), table=t))
        else:  # a sandbox cannot send as anybody else
            cmds.append(_rule("from_sandbox", _match(_saddr(v), str(addr.ip), "!="), _verdict("drop"), table=t))
    # The sandbox has no conntrack and passes every TCP packet but a first SYN unclassified (sandbox_ruleset):
    # what is not part of a flow this conntrack saw open with a SYN, the sandbox's table never classified.
    # With nf_conntrack_tcp_loose (the default) a mid-stream ACK would be taken as a new flow: not from here.
    unknown_tcp = [[TCP, INVALID], [NEW, NOT_FIRST_SYN]]
    cmds += [_rule("from_sandbox", *m, _verdict("drop"), table=t) for m in unknown_tcp]
    cmds += [
        _rule("to_sandbox", ESTABLISHED, _verdict("accept"), table=t),
        _rule("to_sandbox", _verdict("drop"), table=t),
        _rule("input", _match(iif, veth), ESTABLISHED, _verdict("accept"), table=t),
        _rule("input", _match(iif, veth), ND, _verdict("accept"), table=t),
    ]
    cmds += [_rule("input", _match(iif, veth), *m, _verdict("drop"), table=t) for m in unknown_tcp]
    # The sandbox's own table already enforces host rules; repeating them here keeps the host closed even if
    # that table were somehow gone.
    for rule in (_cells_rule("input", _zone_cells(profile.deny, "to_host"), "drop")
                 + _cells_rule("input", _zone_cells(profile.allow, "to_host"), "accept")):
        rule["add"]["rule"]["table"] = t
        rule["add"]["rule"]["expr"].insert(0, _match(iif, veth))
        cmds.append(rule)
    for v, gw in ((4, inst.gateway4), (6, inst.gateway6)):
        if gw is not None:  # the sandbox's resolver listens on its gateway
            cmds.append(_rule("input", _match(iif, veth), _match(_daddr(v), str(gw.ip)), DNS, _verdict("accept"),
                              table=t))
    cmds.append(_rule("input", _match(iif, veth), _verdict("drop"), table=t))
    return cmds


GUARD_TABLE = f"{PREFIX}-guard"


def guard_ruleset(families: Sequence[str] = ("ipv4", "ipv6")) -> list[Cmd]:
    """Loaded when nsfw itself had to turn forwarding on for `families`: the host then forwards only for
    nsfw's links, as before, instead of becoming a router between its other interfaces."""
    iif, oif = _meta("iifname"), _meta("oifname")
    # Loaded again with every `nat` sandbox, so it replaces its rules in place: deleting the table would
    # unregister its hook, which waits for an RCU grace period, milliseconds under nsfw's state lock.
    chain = {"family": FAMILY, "table": GUARD_TABLE, "name": "forward"}
    cmds: list[Cmd] = [
        {"add": {"table": {"family": FAMILY, "name": GUARD_TABLE}}},
        {"add": {"chain": {**chain, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}},
        {"flush": {"chain": chain}},
    ]
    for family in families:
        cmds.append(_rule("forward", _match(_meta("nfproto"), family), _match(iif, f"{PREFIX}*", "!="),
                          _match(oif, f"{PREFIX}*", "!="), _verdict("drop"), table=GUARD_TABLE))
    return cmds


def wrap(cmds: list[Cmd]) -> dict[str, Any]:
    return {"nftables": cmds}
