"""nsfw.compile: golden JSON per test profile, plus the semantics goldens cannot show.

Golden files: tests/golden/profiles/NAME.yaml compiles to tests/golden/NAME.json, which is
json.dumps(sandbox_ruleset(profile), sort_keys=True, indent=1). After an intended change to the compiler,
regenerate them and review the diff:

    NSFW_UPDATE_GOLDEN=1 /usr/bin/python3 -m pytest -q \
        tests/unit/test_compile.py tests/integration/test_compile_kernel.py

(the integration test writes the matching NAME.nft, nft's own text for the same ruleset, as root).

Semantics are checked with a small evaluator of the JSON the compiler emits (the subset it uses: meta, ct,
payload, concat, named and anonymous interval sets, goto, verdicts), run against an oracle written from the
profile spec alone. It is not the kernel; tests/integration/test_compile_kernel.py shows the kernel loads the
same JSON.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from nsfw import compile as nc
from nsfw import profile as npf
from nsfw.names import POOL4, HostEnv, Instance, allocate_slot, slot_net4, slot_net6, slots
from nsfw.profile import Profile, Rule

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PROFILES = sorted((GOLDEN / "profiles").glob("*.yaml"))
UPDATE = os.environ.get("NSFW_UPDATE_GOLDEN") == "1"

Cmd = dict[str, Any]


def golden_profile(path: Path) -> Profile:
    return npf.load(str(path), [GOLDEN / "profiles"])


def dump(cmds: list[Cmd]) -> str:
    return json.dumps(cmds, sort_keys=True, indent=1) + "\n"


# ---------------------------------------------------------------------------------------------- goldens


def test_there_are_golden_profiles() -> None:
    assert len(PROFILES) >= 10


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_golden_json(path: Path) -> None:
    text = dump(nc.sandbox_ruleset(golden_profile(path)))
    golden = GOLDEN / f"{path.stem}.json"
    if UPDATE:
        golden.write_text(text)
    assert golden.exists(), f"no {golden}: run with NSFW_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{path.name} compiles differently; NSFW_UPDATE_GOLDEN=1 after review"


def test_no_stray_golden_files() -> None:
    stems = {p.stem for p in PROFILES}
    stray = [p.name for p in GOLDEN.iterdir() if p.is_file() and p.stem not in stems]
    assert not stray, f"golden files without a profile: {stray}"


# ---------------------------------------------------------------------------------------------- helpers


def rule(text: str) -> Rule:
    """One rule written as in a profile, e.g. rule("{cidr: 10.0.0.0/8, ports: [22], proto: tcp}")."""
    c = npf._Collector("test", {})
    import yaml

    r = npf.parse_rule(yaml.safe_load(text), c, ("allow", 0))
    assert r is not None and not c.errors, c.errors
    return replace(r, origin="")


def prof(allow: Iterable[str] = (), deny: Iterable[str] = (), default: str = "deny", **kw: Any) -> Profile:
    return Profile(name="t", path="t.yaml", allow=tuple(map(rule, allow)), deny=tuple(map(rule, deny)),
                   default=default, **kw)  # type: ignore[arg-type]


def chain_rules(cmds: list[Cmd], chain: str, table: str = nc.TABLE) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in cmds
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
            and c["add"]["rule"]["table"] == table]


def named_set(cmds: list[Cmd], name: str) -> dict[str, Any]:
    (s,) = [c["add"]["set"] for c in cmds if "set" in c.get("add", {}) and c["add"]["set"]["name"] == name]
    return s


def verdict(expr: list[dict[str, Any]]) -> str | None:
    """The rule's verdict, with drop and reject both read as 'deny'."""
    for stmt in expr:
        if stmt.get("goto") == {"target": nc.OPENED}:  # remembers a UDP flow, then accepts
            return "accept"
        for v in ("accept", "drop", "reject", "goto", "jump", "masquerade"):
            if v in stmt:
                return "deny" if v in ("drop", "reject") else v
    return None


def mentions(expr: Any, needle: str) -> bool:
    return needle in json.dumps(expr)


# ---------------------------------------------------------------------------------------------- evaluator

NOMATCH = object()
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58}
ND = {"nd-router-solicit": 133, "nd-router-advert": 134, "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136}
ICMP_TYPES = {4: {"echo-reply": 0, "destination-unreachable": 3, "redirect": 5, "echo-request": 8,
                  "time-exceeded": 11},
              6: {**ND, "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3, "echo-request": 128,
                  "echo-reply": 129, "nd-redirect": 137}}


@dataclass(frozen=True)
class Pkt:
    version: int
    daddr: int
    proto: int
    dport: int
    saddr: int = 0
    # conntrack's word in the host's namespace; in the sandbox's, "established" stands for a UDP flow an earlier
    # packet opened (its flow set holds it)
    state: str = "new"
    sport: int = 40000
    iif: str = "eth0"
    oif: str = "eth0"
    icmp_type: int | None = None
    flags: frozenset[str] = frozenset({"syn"})  # TCP's; the default is a connection's first packet


def pkt(daddr: str, proto: str | int = "tcp", dport: int = 443, **kw: Any) -> Pkt:
    a = ipaddress.ip_address(daddr)
    if isinstance(kw.get("flags"), str):
        kw["flags"] = frozenset(kw["flags"].split(","))
    num = proto if isinstance(proto, int) else {**PROTO_NUMBERS, "icmp": 1 if a.version == 4 else 58}[proto]
    if "saddr" in kw:
        kw["saddr"] = int(ipaddress.ip_address(kw["saddr"]))
    return Pkt(a.version, int(a), num, dport, **kw)


def _kind(left: dict[str, Any]) -> str:
    if "payload" in left:
        return {"daddr": "addr", "saddr": "addr", "dport": "port", "sport": "port",
                "type": "icmp_type"}[left["payload"]["field"]]
    if "meta" in left:
        return "proto" if left["meta"]["key"] == "l4proto" else "str"
    return "str"  # ct state, and tcp flags (compared as sets)


def _value(left: dict[str, Any], p: Pkt) -> Any:
    if "concat" in left:
        parts = [_value(x, p) for x in left["concat"]]
        return NOMATCH if NOMATCH in parts else tuple(parts)
    if "meta" in left:
        key = left["meta"]["key"]
        return {"oif": p.oif, "oifname": p.oif, "iif": p.iif, "iifname": p.iif, "l4proto": p.proto,
                "nfproto": f"ipv{p.version}"}[key]
    if "ct" in left:
        assert left["ct"]["key"] == "state"
        return p.state
    if "&" in left:  # tcp flags & (...)
        field, mask = left["&"]
        assert field == {"payload": {"protocol": "tcp", "field": "flags"}} and isinstance(mask, list), left
        return p.flags & frozenset(mask) if p.proto == 6 else NOMATCH
    pl = left["payload"]
    proto, fld = pl["protocol"], pl["field"]
    if proto in ("ip", "ip6"):
        if (proto == "ip") != (p.version == 4):
            return NOMATCH
        return p.daddr if fld == "daddr" else p.saddr
    if proto == "th":
        assert fld == "dport"
        return p.dport
    if proto in ("tcp", "udp"):  # nft adds the `meta l4proto` this depends on
        if p.proto != PROTO_NUMBERS[proto]:
            return NOMATCH
        return {"dport": p.dport, "sport": p.sport}[fld]
    if proto == "icmpv6":
        return p.icmp_type if p.version == 6 and p.proto == 58 and p.icmp_type is not None else NOMATCH
    if proto == "icmp":
        return p.icmp_type if p.version == 4 and p.proto == 1 and p.icmp_type is not None else NOMATCH
    raise AssertionError(f"unknown payload {pl}")


def _elem_span(elem: Any, kind: str, version: int) -> tuple[Any, Any]:
    """One element (or one part of a concatenated one) as an inclusive (low, high)."""
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = (_scalar(x, kind, version) for x in elem["range"])
        return lo, hi
    if isinstance(elem, dict) and "prefix" in elem:
        net = ipaddress.ip_network(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
        assert net.version == version, elem
        return int(net.network_address), int(net.broadcast_address)
    v = _scalar(elem, kind, version)
    return v, v


def _scalar(x: Any, kind: str, version: int) -> Any:
    if kind == "addr":
        a = ipaddress.ip_address(x)
        assert a.version == version, x
        return int(a)
    if kind == "proto" and isinstance(x, str):
        return PROTO_NUMBERS[x]
    if kind == "icmp_type" and isinstance(x, str):
        return ICMP_TYPES[version][x]
    return x


SET_KINDS = {"ipv4_addr": "addr", "ipv6_addr": "addr", "inet_proto": "proto", "inet_service": "port"}
_SPANS: dict[int, tuple[Any, list[tuple[tuple[Any, Any], ...]]]] = {}


def _set_spans(elems: list[Any], kinds: Sequence[str], version: int) -> list[tuple[tuple[Any, Any], ...]]:
    hit = _SPANS.get(id(elems))
    if hit is None or hit[0] is not elems:  # the stored list keeps its id from being reused
        spans = [tuple(_elem_span(e, k, version) for e, k in
                       zip(elem["concat"] if len(kinds) > 1 else [elem], kinds, strict=True)) for elem in elems]
        hit = _SPANS[id(elems)] = (elems, spans)
    return hit[1]


def _set_has(elems: list[Any], kinds: Sequence[str], value: Any, version: int) -> bool:
    values = value if len(kinds) > 1 else (value,)
    return any(all(lo <= v <= hi for (lo, hi), v in zip(spans, values, strict=True))
               for spans in _set_spans(elems, kinds, version))


class Index:
    """A ruleset's chains, sets and policies by (table, name), built once per list of commands."""

    def __init__(self, cmds: list[Cmd]) -> None:
        self.rules: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
        self.sets: dict[tuple[str, str], tuple[list[str], list[Any]]] = {}
        self.policy: dict[tuple[str, str], str] = {}
        self.maps: dict[tuple[str, str], tuple[list[str], list[Any]]] = {}
        for c in cmds:
            ((what, body),) = c["add"].items() if "add" in c else (("other", None),)
            if what == "rule":
                self.rules.setdefault((body["table"], body["chain"]), []).append(body["expr"])
            elif what == "set":
                types = body["type"] if isinstance(body["type"], list) else [body["type"]]
                self.sets[(body["table"], body["name"])] = ([SET_KINDS[t] for t in types], body.get("elem", []))
            elif what == "map":
                assert body["map"] == "verdict", body
                self.maps[(body["table"], body["name"])] = ([SET_KINDS[body["type"]]], body.get("elem", []))
            elif what == "chain" and "policy" in body:
                self.policy[(body["table"], body["name"])] = body["policy"]


_INDEXES: dict[int, tuple[list[Cmd], Index]] = {}


def index(cmds: list[Cmd]) -> Index:
    hit = _INDEXES.get(id(cmds))
    if hit is None or hit[0] is not cmds:  # the stored list keeps its id from being reused
        hit = _INDEXES[id(cmds)] = (cmds, Index(cmds))
    return hit[1]


def _matches(m: dict[str, Any], p: Pkt, ix: Index, table: str) -> bool:
    left, right, op = m["left"], m["right"], m["op"]
    value = _value(left, p)
    if value is NOMATCH:
        return False
    kinds = [_kind(x) for x in left["concat"]] if "concat" in left else [_kind(left)]
    if "&" in left:
        hit = value == frozenset(right if isinstance(right, list) else [right])
    elif isinstance(right, str) and right in DYNAMIC:  # filled from the packet path: modelled by the packet's state
        hit = DYNAMIC[right](p)
    elif isinstance(right, str) and right.startswith("@"):
        set_kinds, elems = ix.sets[(table, right[1:])]
        assert set_kinds == kinds, (right, set_kinds, kinds)
        hit = _set_has(elems, kinds, value, p.version)
    elif isinstance(right, dict) and "set" in right:
        hit = _set_has(right["set"], kinds, value, p.version)
    elif op == "in" or isinstance(right, list):
        hit = value in (right if isinstance(right, list) else [right])
    elif isinstance(right, str) and right.endswith("*") and kinds == ["str"]:
        hit = value.startswith(right[:-1])
    else:
        hit = _scalar(right, kinds[0], p.version) == value
    if op == "!=":
        return not hit
    assert op in ("==", "in"), op
    return hit


# The sandbox's sets filled from the packet path. A flow set holds the packet's flow when an earlier packet of it
# was let out ("established"); the verdict cache is taken as empty, so the classification it repeats is what is
# tested (test_the_verdict_cache_holds_only_what_was_accepted).
DYNAMIC: dict[str, Any] = {**{f"@{n}": (lambda p: p.state == "established") for n in nc.FLOWS.values()},
                           **{f"@{n}": (lambda p: False) for n in nc.SEEN.values()}}


def run_chain(cmds: list[Cmd], chain: str, p: Pkt, table: str = nc.TABLE, depth: int = 0) -> str | None:
    """The verdict `chain` gives `p`, None when it falls off the end. 'masquerade' and 'dnat' count as
    verdicts."""
    assert depth < 10
    ix = index(cmds)
    for expr in ix.rules.get((table, chain), []):
        for stmt in expr:
            if "match" in stmt:
                if not _matches(stmt["match"], p, ix, table):
                    break
            elif "counter" in stmt or "set" in stmt:  # a set statement changes no verdict
                continue
            elif "vmap" in stmt:
                hit = _map_lookup(ix, table, stmt["vmap"], p)
                if hit is None:  # no element: the rule does nothing
                    break
                r = run_chain(cmds, (hit.get("goto") or hit["jump"])["target"], p, table, depth + 1)
                if "goto" in hit or r is not None:
                    return r
                break
            elif "goto" in stmt or "jump" in stmt:
                r = run_chain(cmds, (stmt.get("goto") or stmt["jump"])["target"], p, table, depth + 1)
                if "goto" in stmt or r is not None:
                    return r
                break
            else:
                (v,) = stmt
                assert v in ("accept", "drop", "reject", "masquerade", "dnat"), stmt
                return v
    return None


def _map_lookup(ix: Index, table: str, vmap: dict[str, Any], p: Pkt) -> dict[str, Any] | None:
    """The verdict a verdict map gives `p`'s key, None when no element holds it (or the key does not apply)."""
    value = _value(vmap["key"], p)
    if value is NOMATCH:
        return None
    kinds, elems = ix.maps[(table, vmap["data"][1:])]
    assert kinds == [_kind(vmap["key"])], (vmap, kinds)
    for key, verdict_ in elems:
        lo, hi = _elem_span(key, kinds[0], p.version)
        if lo <= value <= hi:
            return dict(verdict_)
    return None


def run_hook(cmds: list[Cmd], chain: str, p: Pkt, table: str = nc.TABLE) -> str:
    """The base chain's verdict, its policy when no rule gives one."""
    return run_chain(cmds, chain, p, table) or index(cmds).policy[(table, chain)]


def out(cmds: list[Cmd], p: Pkt) -> str:
    """What the sandbox's output hook does with `p`: 'accept' or 'deny' (drop and reject alike)."""
    v = run_hook(cmds, "output", p)
    assert v in ("accept", "drop", "reject"), v
    return "accept" if v == "accept" else "deny"


# ---------------------------------------------------------------------------------------------- the oracle

SPEC_LAN = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                                               "100.64.0.0/10", "fc00::/7", "fe80::/10")]
NOT_UNICAST = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32", "::1/128",
                                                 "ff00::/8")]
# Addresses whose zone the spec leaves open (this-network, reserved 240/4, v4-mapped): never generated.
UNCLEAR = [ipaddress.ip_network(n) for n in ("0.0.0.0/8", "240.0.0.0/4", "::/128", "::ffff:0:0/96")]


def spec_zone(addr: int, version: int, env: HostEnv, gateways: Sequence[str]) -> str:
    a = ipaddress.ip_address(addr) if version == 4 else ipaddress.IPv6Address(addr)
    if a in env.addresses or a in {ipaddress.ip_address(g) for g in gateways}:
        return "host"
    if any(a in n for n in SPEC_LAN if n.version == version) or any(a in n for n in env.connected
                                                                     if n.version == version):
        return "lan"
    if any(a in n for n in NOT_UNICAST if n.version == version):
        return "none"
    return "internet"


def spec_verdict(pr: Profile, p: Pkt, env: HostEnv | None = None, gateways: Sequence[str] = ()) -> str:
    """The profile spec, read literally, for a new outgoing connection."""
    env = env or HostEnv()
    if pr.network == "none":  # loopback only: nothing else to reach, whatever the rules say
        return "accept" if p.oif == "lo" else "deny"
    resolver = any(ipaddress.ip_address(g).version == p.version for g in gateways)
    if resolver and p.proto in (6, 17) and p.dport == 53:  # any DNS: the host sends it to the sandbox's resolver
        return "accept"
    if p.version == 6 and not pr.ipv6:  # `ipv6: false`: no IPv6 at all
        return "deny"
    zone = spec_zone(p.daddr, p.version, env, gateways)
    icmp = 1 if p.version == 4 else 58

    def proto_ok(r: Rule) -> bool:
        in_ports = any(lo <= p.dport <= hi for lo, hi in r.ports)
        if r.proto == "icmp":
            return p.proto == icmp
        if r.proto in ("tcp", "udp"):
            return p.proto == PROTO_NUMBERS[r.proto] and (not r.ports or in_ports)
        return not r.ports or (p.proto in (6, 17) and in_ports)  # with ports, any means tcp and udp

    def hits(r: Rule, allow: bool) -> bool:
        if r.kind == "zone":
            where = zone == r.value or (r.value == "any" and zone in ("lan", "internet"))
        elif r.kind == "cidr":
            net = r.network
            where = net.version == p.version and int(net.network_address) <= p.daddr <= int(net.broadcast_address)
            where = where and not (allow and zone == "host")  # a cidr covering a host address does not open it
        else:
            where = False  # names need DNS: not the compiler's business
        return where and proto_ok(r)

    if any(hits(r, False) for r in pr.deny):
        return "deny"
    if any(hits(r, True) for r in pr.allow):
        return "accept"
    return "accept" if pr.default == "allow" and zone != "host" else "deny"


# ---------------------------------------------------------------------------------------------- semantics

ENV = HostEnv(addresses=(ipaddress.ip_address("192.168.1.10"), ipaddress.ip_address("2001:db8::10"),
                         ipaddress.ip_address("203.0.113.50")),
              connected=(ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("198.51.100.0/24")),
              routes=(ipaddress.ip_network("192.168.1.0/24"),))
GATEWAYS = ("10.213.0.1", "fd6e:7366:7700::1")

ZONES = ["internet", "lan", "host", "any"]
CIDRS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "192.168.1.0/24", "192.0.2.0/24", "192.0.2.128/25",
         "8.8.8.8", "198.51.100.0/24", "224.0.0.0/4", "10.213.0.0/30", "203.0.113.50", "::/0", "2001:db8::/32",
         "2001:db8:1::/48", "2001:db8::10", "fe80::/10", "fd00::/8", "ff00::/8", "2606:4700::/32"]
PORTS = ["22", "53", "'80-90'", "85", "443", "'1-65535'", "'1000-2000'"]
ADDRS = ["8.8.8.8", "1.1.1.1", "192.0.2.1", "192.0.2.200", "203.0.113.7", "203.0.113.50", "10.1.2.3", "10.1.2.4",
         "10.200.0.1", "10.213.0.1", "10.213.0.2", "172.16.5.5", "192.168.1.10", "192.168.1.11", "192.168.2.1",
         "198.51.100.9", "100.64.0.1", "169.254.1.1", "127.0.0.5", "224.0.0.251", "239.255.255.250",
         "255.255.255.255", "2001:db8::10", "2001:db8::11", "2001:db8:1::5", "2606:4700::1111", "2a00:1450::1",
         "fe80::1", "fd00::5", "fc00::1", "fd6e:7366:7700::1", "ff02::1", "::1"]
PKT_PORTS = [22, 53, 79, 80, 85, 90, 91, 443, 999, 1000, 1500, 2000, 2001, 65535]


def random_rule(rng: random.Random) -> str:
    target = rng.choice([f"zone: {rng.choice(ZONES)}", f"cidr: '{rng.choice(CIDRS)}'"])
    if rng.random() < 0.3:
        return target.split(": ")[1].strip("'")  # the plain string form
    proto = rng.choice(["tcp", "udp", "icmp", "any", None])
    parts = [target] + ([f"proto: {proto}"] if proto else [])
    if proto != "icmp" and rng.random() < 0.6:
        parts.append("ports: [" + ", ".join(rng.sample(PORTS, rng.randrange(1, 3))) + "]")
    return "{" + ", ".join(parts) + "}"


def random_profile(rng: random.Random) -> Profile:
    return prof([random_rule(rng) for _ in range(rng.randrange(0, 6))],
                [random_rule(rng) for _ in range(rng.randrange(0, 4))],
                default=rng.choice(["allow", "deny"]))


def random_pkt(rng: random.Random) -> Pkt:
    addr = rng.choice(ADDRS)
    proto = rng.choice(["tcp", "tcp", "udp", "udp", "icmp", 132, 47])
    port = rng.randrange(65536) if proto == "icmp" else rng.choice(PKT_PORTS)  # icmp: th dport is the checksum
    return pkt(addr, proto, port)


def test_generated_addresses_have_a_clear_zone() -> None:
    for a in map(ipaddress.ip_address, ADDRS):
        clear = not any(a in n for n in UNCLEAR if n.version == a.version)
        assert clear or any(a in n for n in NOT_UNICAST if n.version == a.version), a


@pytest.mark.parametrize("seed", range(4))
def test_random_profiles_agree_with_the_spec(seed: int) -> None:
    """Random profiles from a pool of overlapping zones/CIDRs/ports, with and without a host environment."""
    rng = random.Random(seed)
    for _ in range(60):
        pr = random_profile(rng)
        for env, gws in ((HostEnv(), ()), (ENV, GATEWAYS)):
            cmds = nc.sandbox_ruleset(pr, env, gws)
            for _ in range(40):
                p = random_pkt(rng)
                want = spec_verdict(pr, p, env, gws)
                got = out(cmds, p)
                assert got == want, (pr.allow, pr.deny, pr.default, env == ENV, p)


def test_every_golden_profile_agrees_with_the_spec() -> None:
    rng = random.Random(1)
    for path in PROFILES:
        pr = golden_profile(path)
        for env, gws in ((HostEnv(), ()), (ENV, GATEWAYS)):
            cmds = nc.sandbox_ruleset(pr, env, gws)
            for a in ADDRS:
                for proto in ("tcp", "udp", "icmp", 132):
                    for port in (22, 25, 53, 443, 631, rng.randrange(1, 65536)):
                        p = pkt(a, proto, port)
                        assert out(cmds, p) == spec_verdict(pr, p, env, gws), (path.name, p)


def test_loopback_established_and_neighbour_discovery_pass_everything_else_does_not() -> None:
    cmds = nc.sandbox_ruleset(prof())
    assert out(cmds, pkt("8.8.8.8")) == "deny"
    assert out(cmds, pkt("127.0.0.1", oif="lo")) == "accept"
    assert out(cmds, pkt("8.8.8.8", "udp", state="established")) == "accept"  # a UDP flow opened before
    assert out(cmds, pkt("8.8.8.8", "udp", state="new")) == "deny"
    assert out(cmds, pkt("8.8.8.8", "tcp", flags="ack")) == "accept"  # TCP: see test_tcp_*
    assert out(cmds, pkt("ff02::2", "icmp", 0, icmp_type=133)) == "accept"
    assert out(cmds, pkt("ff02::2", "icmp", 0, icmp_type=128)) == "deny"  # echo request
    allow_all = nc.sandbox_ruleset(prof(default="allow"))
    assert out(allow_all, pkt("8.8.8.8")) == "accept"


def test_input_takes_only_replies() -> None:
    for pr in (prof(), prof(["any", "{zone: host, ports: [22]}"], default="allow")):
        cmds = nc.sandbox_ruleset(pr)
        assert run_hook(cmds, "input", pkt("10.213.0.2", "tcp", 22, iif="eth0")) == "drop"
        assert run_hook(cmds, "input", pkt("10.213.0.2", "udp", 22, iif="eth0")) == "drop"
        assert run_hook(cmds, "input", pkt("10.213.0.2", "udp", 22, iif="eth0", state="established")) == "accept"
        assert run_hook(cmds, "input", pkt("10.213.0.2", "tcp", 22, iif="eth0", flags="syn,ack")) == "accept"
        assert run_hook(cmds, "input", pkt("127.0.0.1", "tcp", 22, iif="lo")) == "accept"
        assert run_hook(cmds, "input", pkt("fe80::2", "icmp", 0, iif="eth0", icmp_type=136)) == "accept"
        # the resolver's answers (the host's conntrack returns them from where the query went)
        assert run_hook(cmds, "input", pkt("10.213.0.2", "udp", 40000, sport=53, iif="eth0")) == "accept"
        assert run_hook(cmds, "input", pkt("10.213.0.2", "udp", 53, sport=40000, iif="eth0")) == "drop"
    assert [c["add"]["chain"]["policy"] for c in cmds if "chain" in c["add"] and "hook" in c["add"]["chain"]] == [
        "drop", "drop"]


TCP_FLAGS = ("syn", "ack", "fin", "rst", "psh", "urg", "ecn", "cwr")
FLAG_SETS = [frozenset(f for i, f in enumerate(TCP_FLAGS) if n >> i & 1) for n in range(1 << len(TCP_FLAGS))]


def first_syn(flags: frozenset[str]) -> bool:
    return "syn" in flags and not flags & {"ack", "fin", "rst"}


def test_the_sandbox_has_no_conntrack() -> None:
    """conntrack in the sandbox's namespace cost each new connection a tenth of its rate; the kernel registers
    its hooks in a namespace only for a rule that needs it (ct, nat, notrack), and the sandbox's table has none.
    The host's conntrack follows every flow; the sandbox remembers UDP flows in sets (test_udp_flows_*)."""
    for pr in (prof(), prof(["example.org", "{zone: internet, ports: [443], proto: tcp}"], ["lan"], ipv6=False),
               prof(["any", "{zone: host, proto: icmp}", "'*.example.com'"], ["ads.example.org"], default="allow")):
        cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
        for needle in ('"ct"', '"notrack"', '"dnat"', '"snat"', '"masquerade"', '"redirect"'):
            assert not mentions(cmds, needle), needle
        hooks = [c["add"]["chain"] for c in cmds if "chain" in c["add"] and "hook" in c["add"]["chain"]]
        assert [(h["name"], h["hook"], h["prio"]) for h in hooks] == [("output", "output", 0), ("input", "input", 0)]


def test_udp_flows_are_remembered_from_the_packet_path() -> None:
    """What a zone chain accepts goes through `opened`, which adds a UDP packet's flow; a known flow passes
    both ways and its timeout restarts; the set has a size and a timeout, as conntrack's table had."""
    pr = prof(["example.org", "{zone: internet, ports: [443], proto: udp}"])
    cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
    for v in (4, 6):
        out_key = {"concat": [nc._daddr(v), nc._payload("udp", "dport"), nc._payload("udp", "sport")]}
        in_key = {"concat": [nc._saddr(v), nc._payload("udp", "sport"), nc._payload("udp", "dport")]}
        name = nc.FLOWS[v]
        update = {"set": {"op": "update", "elem": out_key, "set": f"@{name}"}}
        assert [update] in chain_rules(cmds, nc.OPENED)
        known_out = [e for e in chain_rules(cmds, "output") if mentions(e, f"@{name}")]
        assert known_out == [[{"match": {"op": "==", "left": out_key, "right": f"@{name}"}}, update,
                              {"counter": "allowed"}, {"accept": None}]]
        known_in = [e for e in chain_rules(cmds, "input") if mentions(e, f"@{name}")]
        assert known_in == [[{"match": {"op": "==", "left": in_key, "right": f"@{name}"}},
                             {"set": {"op": "update", "elem": in_key, "set": f"@{name}"}}, {"accept": None}]]
        (spec,) = [c["add"]["set"] for c in cmds if c["add"].get("set", {}).get("name") == name]
        assert spec["timeout"] == nc.FLOW_TIMEOUT and spec["size"] == nc.FLOW_MAX and "timeout" in spec["flags"]
    # every accepting rule of a zone chain goes through `opened`, and nothing else reaches it
    for chain in ZONE_CHAINS:
        for e in chain_rules(cmds, chain):
            assert "accept" not in e[-1], (chain, e)
    gotos = [(c["add"]["rule"]["chain"], e) for c in cmds if "rule" in c["add"]
             for e in c["add"]["rule"]["expr"] if e.get("goto") == {"target": nc.OPENED}]
    assert gotos and {chain for chain, _e in gotos} <= set(ZONE_CHAINS)
    assert out(cmds, pkt("8.8.8.8", "udp", 443)) == "accept"
    assert out(cmds, pkt("8.8.8.8", "udp", 444)) == "deny"
    assert out(cmds, pkt("8.8.8.8", "udp", 444, state="established")) == "accept"  # known: a grant may be gone
    assert run_hook(cmds, "input", pkt("10.213.0.2", "udp", 443, iif="eth0")) == "drop"


def test_the_verdict_cache_holds_only_what_was_accepted() -> None:
    """A TCP destination whose SYN the profile accepted skips classification for VERDICT_TTL seconds: only
    `opened` adds to the cache, its entries are never refreshed, and it is looked up only for a first SYN (the
    rest of a connection passed before it)."""
    pr = prof(["example.org", "{zone: internet, ports: [443], proto: tcp}"], ["ads.example.org", "192.0.2.0/24"])
    cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
    output = chain_rules(cmds, "output")
    for v in (4, 6):
        name, key = nc.SEEN[v], {"concat": [nc._daddr(v), nc._payload("tcp", "dport")]}
        writers = [(c["add"]["rule"]["chain"], e) for c in cmds if "rule" in c["add"]
                   for e in c["add"]["rule"]["expr"] if "set" in e and e["set"]["set"] == f"@{name}"]
        assert writers == [(nc.OPENED, {"set": {"op": "add", "elem": key, "set": f"@{name}"}})]
        (i,) = [i for i, e in enumerate(output) if mentions(e, f"@{name}")]
        assert output[i] == [{"match": {"op": "==", "left": key, "right": f"@{name}"}}, {"counter": "allowed"},
                             {"accept": None}]
        assert any(nc.NOT_FIRST_SYN in e for e in output[:i])
        (spec,) = [c["add"]["set"] for c in cmds if c["add"].get("set", {}).get("name") == name]
        assert spec["timeout"] == nc.VERDICT_TTL == 1 and spec["size"] == nc.FLOW_MAX


def test_tcp_out_only_a_first_syn_is_classified() -> None:
    """The rest of a connection passes as it did when conntrack called it established; the host drops what
    its conntrack never saw open (test_tcp_from_the_sandbox_only_opens_with_a_syn_on_the_host)."""
    for pr in (prof(), prof(["internet"], ["lan", "8.8.8.0/24"], ipv6=False), prof(default="allow")):
        cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
        for dst in ("8.8.8.8", "192.168.1.11", "192.168.1.10", "2a00:1450::1", "224.0.0.251"):
            want_syn = out(cmds, pkt(dst, "tcp", 443))
            for flags in FLAG_SETS:
                p = pkt(dst, "tcp", 443, flags=flags)
                for state in ("new", "established", "invalid"):  # no conntrack: its word changes nothing
                    assert out(cmds, replace(p, state=state)) == (want_syn if first_syn(flags) else "accept"), p
    cmds = nc.sandbox_ruleset(prof())
    assert out(cmds, pkt("8.8.8.8", "tcp", 443, flags="syn,ecn,cwr")) == "deny"  # ECN setup is a first SYN
    assert out(cmds, pkt("8.8.8.8", "udp", 443, state="new")) == "deny"  # UDP: classified until its flow is known
    (rule,) = [r for r in chain_rules(cmds, "output") if nc.NOT_FIRST_SYN in r]
    assert rule == [nc.NOT_FIRST_SYN, {"counter": "allowed"}, {"accept": None}]  # `nsfw ps` counts it


def test_tcp_in_only_replies_and_icmp_errors() -> None:
    for pr in (prof(), prof(["any", "host"], default="allow")):
        cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
        for flags in FLAG_SETS:
            p = pkt("10.213.0.2", "tcp", 22, iif="eth0", flags=flags)
            opening = "syn" in flags and "ack" not in flags  # SYN+FIN and SYN+RST too: never a reply
            assert run_hook(cmds, "input", p) == ("drop" if opening else "accept"), flags
        for v4, v6, want in (("destination-unreachable", "destination-unreachable", "accept"),
                             ("time-exceeded", "time-exceeded", "accept"), (None, "packet-too-big", "accept"),
                             ("echo-reply", "echo-reply", "accept"),
                             ("echo-request", "echo-request", "drop"), ("redirect", "nd-redirect", "drop")):
            for dst, name in (("10.213.0.2", v4), ("fd6e:7366:7700::2", v6)):
                if name is None:
                    continue
                p = pkt(dst, "icmp", 0, iif="eth0", icmp_type=ICMP_TYPES[4 if "." in dst else 6][name])
                assert run_hook(cmds, "input", p) == want, name


ZONE_CHAINS = ("to_lan", "to_internet", "to_other", "to_host")


def test_denies_come_before_allows_in_every_zone_chain() -> None:
    pr = prof(["any", "host", "{zone: lan, ports: [22], proto: tcp}", "10.0.0.0/8", "{zone: host, ports: [53]}"],
              ["{zone: any, ports: [25], proto: tcp}", "{zone: host, proto: icmp}", "{zone: lan, ports: [22]}",
               "{zone: internet, proto: udp}"], default="allow")
    cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
    for chain in ("to_lan", "to_internet", "to_host"):
        verdicts = [verdict(e) for e in chain_rules(cmds, chain)]
        assert "deny" in verdicts[:-1] and "accept" in verdicts, (chain, verdicts)
        last_deny = max(i for i, v in enumerate(verdicts[:-1]) if v == "deny")
        first_allow = verdicts.index("accept")
        assert last_deny < first_allow, (chain, verdicts)
    # the cidr denies sit in output, ahead of every goto into a zone chain
    outv = [verdict(e) for e in chain_rules(nc.sandbox_ruleset(prof(["internet"], ["192.0.2.0/24"])), "output")]
    assert outv.index("deny", 3) < outv.index("goto")


def test_zone_spans_are_disjoint_and_the_first_zone_wins() -> None:
    assert nc.zone_spans([[(5, 5)], [(0, 9), (20, 29)], [(8, 12)]]) == [
        ((0, 4), 1), ((5, 5), 0), ((6, 9), 1), ((10, 12), 2), ((20, 29), 1)]
    assert nc.zone_spans([[], [(0, 3), (4, 7)], []]) == [((0, 7), 1)]  # neighbours of one zone merge
    assert nc.zone_spans([[], [], []]) == []
    rng = random.Random(5)
    for _ in range(200):
        groups = [[(lo, lo + rng.randrange(8)) for lo in rng.sample(range(40), rng.randrange(4))] for _ in range(3)]
        got = nc.zone_spans(groups)
        for a in range(50):
            ranks = [r for r, g in enumerate(groups) if any(lo <= a <= hi for lo, hi in g)]
            hits = [r for (lo, hi), r in got if lo <= a <= hi]
            assert hits == ranks[:1], (groups, a)


def test_one_lookup_classifies_a_destination() -> None:
    cmds = nc.sandbox_ruleset(prof(["internet"]), ENV, GATEWAYS)
    vmaps = [e for e in chain_rules(cmds, "output") if mentions(e, "vmap")]
    assert [e[0]["vmap"]["data"] for e in vmaps] == ["@zone4", "@zone6"]
    elems = {json.dumps(k): v["goto"]["target"] for k, v in index(cmds).maps[(nc.TABLE, "zone4")][1]}
    assert elems['"192.168.1.10"'] == "to_host" and elems['"10.213.0.1"'] == "to_host"  # inside lan networks


def test_to_host_never_uses_the_cidr_allow_sets() -> None:
    rng = random.Random(2)
    for _ in range(100):
        pr = random_profile(rng)
        for env, gws in ((HostEnv(), ()), (ENV, GATEWAYS)):
            cmds = nc.sandbox_ruleset(pr, env, gws)
            for expr in chain_rules(cmds, "to_host"):
                assert not mentions(expr, "@allow4") and not mentions(expr, "@allow6")


def test_cidr_covering_the_host_does_not_open_it() -> None:
    pr = prof(["0.0.0.0/0", "::/0", "192.168.1.10", "10.213.0.0/30", "any"])
    cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
    for host in ("192.168.1.10", "2001:db8::10", "10.213.0.1", "fd6e:7366:7700::1", "203.0.113.50"):
        assert out(cmds, pkt(host)) == "deny", host
    assert out(cmds, pkt("192.168.1.11")) == "accept"
    assert out(cmds, pkt("10.213.0.2")) == "accept"  # the sandbox's own /30, not the host


@pytest.mark.parametrize("extra", [[], ["any"], ["internet", "lan"], ["0.0.0.0/0", "::/0"]])
def test_default_allow_keeps_the_host_closed(extra: list[str]) -> None:
    cmds = nc.sandbox_ruleset(prof(extra, default="allow"), ENV, GATEWAYS)
    last = chain_rules(cmds, "to_host")[-1]
    assert verdict(last) == "deny" and len(chain_rules(cmds, "to_host")) == 1
    for chain in ("to_lan", "to_internet", "to_other"):
        assert verdict(chain_rules(cmds, chain)[-1]) == "accept", chain
    assert out(cmds, pkt("192.168.1.10")) == "deny"


def test_default_deny_ends_every_zone_chain_in_drop() -> None:
    cmds = nc.sandbox_ruleset(prof(["{zone: lan, ports: [22]}", "{zone: host, ports: [22]}"]))
    for chain in ZONE_CHAINS:
        assert verdict(chain_rules(cmds, chain)[-1]) == "deny", chain


def test_ipv4_only_rules_leave_the_ipv6_sets_empty() -> None:
    pr = prof(["10.0.0.0/8", "{cidr: 192.0.2.0/24, ports: [443], proto: tcp}"],
              ["{cidr: 10.9.0.0/16, proto: udp}"])
    cmds = nc.sandbox_ruleset(pr)
    for name in ("allow6", "deny6", "allowaddr6", "denyaddr6"):
        assert "elem" not in named_set(cmds, name)
    assert named_set(cmds, "allow4")["elem"] and named_set(cmds, "deny4")["elem"]
    assert named_set(cmds, "allowaddr4")["elem"]  # the whole /8: a plain interval set
    assert not any(mentions(c, "@allow6") or mentions(c, "@deny6") or mentions(c, "@allowaddr6") for c in cmds)
    v6 = nc.sandbox_ruleset(prof(["2001:db8::/32"]))
    assert "elem" not in named_set(v6, "allowaddr4") and named_set(v6, "allowaddr6")["elem"]
    assert not any(mentions(c, "@allow4") or mentions(c, "@allowaddr4") for c in v6)


def test_any_zone_means_lan_and_internet_not_host_nor_other() -> None:
    cmds = nc.sandbox_ruleset(prof(["{zone: any, ports: [443], proto: tcp}"], ["{zone: any, ports: [25]}"]))
    for chain in ("to_lan", "to_internet"):
        exprs = chain_rules(cmds, chain)
        assert [verdict(e) for e in exprs] == ["deny", "deny", "accept", "accept", "deny"], chain
        assert mentions(exprs, '"tcp"') and mentions(exprs, "443")
    for chain in ("to_host", "to_other"):
        assert not mentions(chain_rules(cmds, chain), "443") and not mentions(chain_rules(cmds, chain), "25")
    assert cmds == nc.sandbox_ruleset(prof(["{zone: lan, ports: [443], proto: tcp}",
                                            "{zone: internet, ports: [443], proto: tcp}"],
                                           ["{zone: lan, ports: [25]}", "{zone: internet, ports: [25]}"]))


def test_proto_any_with_ports_is_tcp_and_udp_only() -> None:
    cmds = nc.sandbox_ruleset(prof(["{zone: internet, ports: [53]}"]))
    assert out(cmds, pkt("8.8.8.8", "tcp", 53)) == "accept"
    assert out(cmds, pkt("8.8.8.8", "udp", 53)) == "accept"
    assert out(cmds, pkt("8.8.8.8", 132, 53)) == "deny"  # sctp
    assert out(cmds, pkt("8.8.8.8", "udp", 54)) == "deny"
    whole = nc.sandbox_ruleset(prof(["{zone: internet, proto: any}"]))
    assert out(whole, pkt("8.8.8.8", 132, 53)) == "accept"
    assert out(whole, pkt("2a00:1450::1", 47, 0)) == "accept"


def test_icmp_rule_means_icmp_for_v4_and_icmpv6_for_v6() -> None:
    cmds = nc.sandbox_ruleset(prof(["{zone: internet, proto: icmp}"]))
    assert out(cmds, pkt("8.8.8.8", 1, 1234)) == "accept"
    assert out(cmds, pkt("2a00:1450::1", 58, 1234)) == "accept"
    assert out(cmds, pkt("2a00:1450::1", 1, 1234)) == "deny"  # icmp (v4) over ipv6: no
    assert out(cmds, pkt("8.8.8.8", 58, 1234)) == "deny"
    assert out(cmds, pkt("8.8.8.8", "tcp", 80)) == "deny"


def test_deny_wins_over_allow_in_every_combination() -> None:
    cases = [(["lan"], ["10.1.0.0/16"], "10.1.2.3"), (["10.0.0.0/8"], ["lan"], "10.1.2.3"),
             (["10.0.0.0/8"], ["10.1.0.0/16"], "10.1.2.3"), (["internet"], ["internet"], "8.8.8.8"),
             (["8.8.8.8"], ["internet"], "8.8.8.8"), (["internet"], ["8.8.8.0/24"], "8.8.8.8"),
             (["host"], ["192.168.1.0/24"], "192.168.1.10"),
             (["{zone: host, ports: [22]}"], ["host"], "192.168.1.10"),
             (["any"], ["{zone: any, ports: [443]}"], "8.8.8.8")]
    for allow, deny, addr in cases:
        for default in ("allow", "deny"):
            cmds = nc.sandbox_ruleset(prof(allow, deny, default), ENV, GATEWAYS)
            port = 22 if "22" in str(allow) else 443
            assert out(cmds, pkt(addr, "tcp", port)) == "deny", (allow, deny, default)


def test_connected_networks_join_lan() -> None:
    lan = nc.sandbox_ruleset(prof(["lan"]), ENV)
    internet = nc.sandbox_ruleset(prof(["internet"]), ENV)
    assert out(lan, pkt("198.51.100.9")) == "accept"
    assert out(internet, pkt("198.51.100.9")) == "deny"
    assert run_hook(nc.sandbox_ruleset(prof(["internet"])), "output", pkt("198.51.100.9")) == "accept"


def test_documentation_ranges_count_as_internet() -> None:
    cmds = nc.sandbox_ruleset(prof(["internet"]))
    for a in ("192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1"):
        assert out(cmds, pkt(a)) == "accept", a
    for a in ("10.0.0.1", "fd00::1", "224.0.0.1", "255.255.255.255", "ff02::1", "169.254.0.1", "100.64.0.1"):
        assert out(cmds, pkt(a)) == "deny", a


def test_output_is_deterministic_and_json_clean() -> None:
    rng = random.Random(3)
    for _ in range(50):
        pr = random_profile(rng)
        a = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
        assert a == nc.sandbox_ruleset(pr, ENV, GATEWAYS)
        assert json.loads(json.dumps(a)) == a
        assert json.dumps(nc.wrap(a)) == json.dumps({"nftables": a})


def test_rule_order_and_duplicates_do_not_change_the_output() -> None:
    rng = random.Random(4)
    for _ in range(80):
        pr = random_profile(rng)
        allow, deny = list(pr.allow), list(pr.deny)
        rng.shuffle(allow)
        rng.shuffle(deny)
        shuffled = replace(pr, allow=tuple(allow + allow[:1]), deny=tuple(deny + deny[:2]))
        assert nc.sandbox_ruleset(shuffled, ENV, GATEWAYS) == nc.sandbox_ruleset(pr, ENV, GATEWAYS)


def test_equivalent_rules_compile_identically() -> None:
    pairs = [
        (["{zone: lan, ports: [80, 81, 82]}"], ["{zone: lan, ports: ['80-82']}"]),
        (["{zone: lan, ports: [53]}"],
         ["{zone: lan, ports: [53], proto: tcp}", "{zone: lan, ports: [53], proto: udp}"]),
        (["10.0.0.0/9", "10.128.0.0/9"], ["10.0.0.0/8"]),
        (["10.0.0.0/8", "10.1.0.0/16"], ["10.0.0.0/8"]),
        (["{cidr: 10.0.0.0/8, ports: ['1-100']}", "{cidr: 10.0.0.0/8, ports: ['101-65535']}"],
         ["{cidr: 10.0.0.0/8, ports: ['1-65535']}"]),
        (["any"], ["lan", "internet"]),
    ]
    for a, b in pairs:
        assert nc.sandbox_ruleset(prof(a)) == nc.sandbox_ruleset(prof(b)), (a, b)


def test_a_rule_subsumed_by_another_adds_no_elements() -> None:
    wide = nc.sandbox_ruleset(prof(["10.0.0.0/8"]))
    assert nc.sandbox_ruleset(prof(["10.0.0.0/8", "{cidr: 10.1.0.0/16, ports: [22], proto: tcp}"])) == wide


def test_profile_metadata_does_not_reach_the_kernel() -> None:
    base = prof(["internet"], ["lan"])
    other = replace(base, name="x", path="/elsewhere/x.yaml", description="d", command=("sh",), sha256="ab")
    assert nc.sandbox_ruleset(base) == nc.sandbox_ruleset(other)
    assert not any(mentions(c, "t.yaml") for c in nc.sandbox_ruleset(base))


def test_overlapping_cidrs_become_disjoint_set_elements() -> None:
    cmds = nc.sandbox_ruleset(golden_profile(GOLDEN / "profiles" / "overlapping.yaml"))
    for name, version in (("allow4", 4), ("deny4", 4), ("allow6", 6)):
        boxes = []
        for e in named_set(cmds, name).get("elem", []):
            addr, proto, port = e["concat"]
            if isinstance(addr, dict) and "prefix" in addr:
                n = ipaddress.ip_network(f"{addr['prefix']['addr']}/{addr['prefix']['len']}")
                a = (int(n.network_address), int(n.broadcast_address))
            elif isinstance(addr, dict):
                a = tuple(int(ipaddress.ip_address(x)) for x in addr["range"])
            else:
                a = (int(ipaddress.ip_address(addr)),) * 2
            pr = tuple(_scalar(x, "proto", version) for x in proto["range"]) if isinstance(proto, dict) else (
                _scalar(proto, "proto", version),) * 2
            po = tuple(port["range"]) if isinstance(port, dict) else (port, port)
            boxes.append((a, pr, po))
        for i, x in enumerate(boxes):
            for y in boxes[i + 1:]:
                assert not all(max(p[0], q[0]) <= min(p[1], q[1]) for p, q in zip(x, y, strict=True)), (x, y)


def test_addr_elements_use_the_shortest_form() -> None:
    cmds = nc.sandbox_ruleset(prof(["8.8.8.8", "192.0.2.0/24", "2001:db8::1", "{cidr: 10.0.0.0/8, ports: [1]}",
                                    "{cidr: 10.1.0.0/16, ports: [2]}"]))
    whole = named_set(cmds, "allowaddr4")["elem"]
    assert "8.8.8.8" in whole and {"prefix": {"addr": "192.0.2.0", "len": 24}} in whole
    elems = [e["concat"][0] for e in named_set(cmds, "allow4")["elem"]]
    assert {"range": ["10.2.0.0", "10.255.255.255"]} in elems
    assert named_set(cmds, "allowaddr6")["elem"] == ["2001:db8::1"]


# ---------------------------------------------------------------------------------------------- host side

INST = Instance("0123abcd", slot=5, ipv6=True)
OWN4, OWN6 = str(INST.address4.ip), str(INST.address6.ip)  # type: ignore[union-attr]


def host(pr: Profile, inst: Instance = INST) -> list[Cmd]:
    return nc.host_ruleset(inst, pr)


def test_instance_addresses() -> None:
    assert (str(INST.gateway4), str(INST.address4)) == ("10.213.0.21/30", "10.213.0.22/30")
    assert (str(INST.gateway6), str(INST.address6)) == ("fd6e:7366:7700:5::1/64", "fd6e:7366:7700:5::2/64")
    assert INST.veth == "nsfw0123abcd" and len(INST.veth) < 16 and INST.table == INST.netns == "nsfw-0123abcd"
    v4only = Instance("0123abcd", slot=5)
    assert v4only.address6 is None and v4only.gateway6 is None
    with pytest.raises(ValueError):
        _ = Instance("0123abcd").address4


def test_host_table_names_and_hooks() -> None:
    cmds = host(prof(["internet"]))
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": INST.table}}}
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in cmds if "chain" in c["add"]}
    assert {n: (c["type"], c["hook"], c["policy"]) for n, c in chains.items() if "hook" in c} == {
        "prerouting": ("nat", "prerouting", "accept"), "postrouting": ("nat", "postrouting", "accept"),
        "forward": ("filter", "forward", "accept"), "input": ("filter", "input", "accept")}
    # forwarded packets meet two rules, then only their own direction's chain
    assert {n for n, c in chains.items() if "hook" not in c} == {"from_sandbox", "to_sandbox"}
    assert chain_rules(cmds, "forward", INST.table) == [
        [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": INST.veth}},
         {"goto": {"target": "from_sandbox"}}],
        [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": INST.veth}},
         {"goto": {"target": "to_sandbox"}}]]
    assert all(c["add"]["rule"]["table"] == INST.table for c in cmds if "rule" in c["add"])


def test_masquerade_only_for_the_sandboxs_own_source() -> None:
    cmds = host(prof(["internet"]))
    nat = chain_rules(cmds, "postrouting", INST.table)
    assert len(nat) == 2 and all(verdict(e) == "masquerade" for e in nat)
    assert all(mentions(e, "saddr") for e in nat)
    t = INST.table
    assert run_chain(cmds, "postrouting", pkt("8.8.8.8", saddr=OWN4, iif=INST.veth), t) == "masquerade"
    assert run_chain(cmds, "postrouting", pkt("2a00:1450::1", saddr=OWN6, iif=INST.veth), t) == "masquerade"
    assert run_chain(cmds, "postrouting", pkt("8.8.8.8", saddr="10.213.0.26"), t) is None  # a neighbour's source
    assert run_chain(cmds, "postrouting", pkt("8.8.8.8", saddr="192.168.1.10"), t) is None  # the host's own
    assert run_chain(cmds, "postrouting", pkt(OWN4, saddr=OWN4, oif=INST.veth), t) is None  # back into the veth
    no6 = host(prof(["internet"]), Instance("0123abcd", slot=5))
    assert len(chain_rules(no6, "postrouting", INST.table)) == 1


def test_forward_toward_other_nsfw_interfaces_is_dropped() -> None:
    cmds, t = host(prof(["any"], default="allow")), INST.table
    out = chain_rules(cmds, "from_sandbox", t)
    assert verdict(out[0]) == "deny" and mentions(out[0], '"nsfw*"')
    for other in ("nsfwdeadbeef", "nsfw0123abce"):
        assert run_hook(cmds, "forward", pkt("10.213.0.26", saddr=OWN4, iif=INST.veth, oif=other), t) == "drop"
        assert run_hook(cmds, "forward", pkt("10.213.0.26", saddr=OWN4, iif=INST.veth, oif=other,
                                             state="established"), t) == "drop"
    assert run_hook(cmds, "forward", pkt("8.8.8.8", saddr=OWN4, iif=INST.veth, oif="eth0"), t) == "accept"
    assert run_hook(cmds, "forward", pkt("2a00:1450::1", saddr=OWN6, iif=INST.veth, oif="wlan0"), t) == "accept"


def test_forward_drops_spoofed_sources_and_v6_without_an_address() -> None:
    cmds, t = host(prof(["internet"])), INST.table
    assert run_hook(cmds, "forward", pkt("8.8.8.8", saddr="10.213.0.26", iif=INST.veth), t) == "drop"
    assert run_hook(cmds, "forward", pkt("2a00:1450::1", saddr="fd6e:7366:7700:6::2", iif=INST.veth), t) == "drop"
    v4only = Instance("0123abcd", slot=5)
    cmds4 = host(prof(["internet"]), v4only)
    assert run_hook(cmds4, "forward", pkt("2a00:1450::1", saddr="fd6e:7366:7700:5::2", iif=INST.veth), t) == "drop"
    assert run_hook(cmds4, "forward", pkt("8.8.8.8", saddr=OWN4, iif=INST.veth), t) == "accept"


def test_new_connections_into_the_sandbox_are_dropped() -> None:
    cmds, t = host(prof(["any"], default="allow")), INST.table
    for state, want in (("new", "drop"), ("established", "accept"), ("related", "accept"), ("invalid", "drop")):
        assert run_hook(cmds, "forward", pkt(OWN4, saddr="8.8.8.8", oif=INST.veth, state=state), t) == want, state
        assert run_hook(cmds, "forward", pkt(OWN6, saddr="2a00:1450::1", oif=INST.veth, state=state), t) == want
    # a second sandbox's veth as the source is just as refused
    assert run_hook(cmds, "forward", pkt(OWN4, saddr="10.213.0.26", iif="nsfwdeadbeef", oif=INST.veth), t) == "drop"


def test_tcp_from_the_sandbox_only_opens_with_a_syn_on_the_host() -> None:
    """The sandbox passes every TCP packet but a first SYN unclassified: with nf_conntrack_tcp_loose a mid-stream
    ACK would open a flow here that the sandbox's table never saw. Into the sandbox only replies, whatever the
    flags."""
    cmds, t = host(prof(["any", "{zone: host, ports: [631, 53], proto: tcp}"], default="allow")), INST.table
    gw4, gw6 = str(INST.gateway4.ip), str(INST.gateway6.ip)  # type: ignore[union-attr]
    for hook, dst, own in (("forward", "8.8.8.8", OWN4), ("forward", "2a00:1450::1", OWN6), ("input", gw4, OWN4),
                           ("input", gw6, OWN6), ("input", "192.168.1.10", OWN4)):
        for port in (631, 53):
            for flags in FLAG_SETS:
                p = pkt(dst, "tcp", port, saddr=own, iif=INST.veth, flags=flags)
                assert run_hook(cmds, hook, p, t) == ("accept" if first_syn(flags) else "drop"), (hook, dst, flags)
                assert run_hook(cmds, hook, replace(p, state="established"), t) == "accept"
                assert run_hook(cmds, hook, replace(p, state="invalid"), t) == "drop"
                inbound = pkt(own, "tcp", port, saddr=dst, oif=INST.veth, flags=flags)
                assert run_hook(cmds, "forward", inbound, t) == "drop"
        if hook == "forward":  # UDP's invalid packets the sandbox's own conntrack drops, as before
            udp = pkt(dst, "udp", 631, saddr=own, iif=INST.veth, state="invalid")
            assert run_hook(cmds, hook, udp, t) == "accept", dst


def test_host_forwarding_between_other_interfaces_is_untouched() -> None:
    cmds, t = host(prof()), INST.table
    assert run_hook(cmds, "forward", pkt("8.8.8.8", saddr="192.168.1.20", iif="eth1", oif="eth0"), t) == "accept"
    assert run_hook(cmds, "input", pkt("192.168.1.10", "tcp", 22, iif="eth0"), t) == "accept"


@pytest.mark.parametrize(
    ("allow", "deny", "opened"),
    [
        ([], [], set()),
        (["any", "0.0.0.0/0", "::/0", "lan", "internet"], [], set()),
        (["{zone: host, ports: [631], proto: tcp}"], [], {("tcp", 631)}),
        (["{zone: host, ports: [53]}"], [], {("tcp", 53), ("udp", 53)}),
        (["{zone: host, proto: icmp}"], [], {("icmp", 0)}),
        (["host"], [], {("tcp", 631), ("tcp", 53), ("udp", 53), ("icmp", 0), ("tcp", 22), (132, 9), ("udp", 631)}),
    ],
)
def test_input_from_the_veth_only_for_host_zone_ports(allow: list[str], deny: list[str],
                                                      opened: set[tuple[Any, int]]) -> None:
    cmds, t = host(prof(allow, deny, default="allow")), INST.table
    for proto, port in [("tcp", 631), ("tcp", 53), ("udp", 53), ("icmp", 0), ("tcp", 22), (132, 9), ("udp", 631)]:
        for gw in ("10.213.0.21", "192.168.1.10", "fd6e:7366:7700:5::1"):
            resolver = gw in (str(INST.gateway4.ip), str(INST.gateway6.ip)) and port == 53 and proto != "icmp"
            want = "accept" if (proto, port) in opened or resolver else "drop"
            p = pkt(gw, proto, port, saddr=OWN4 if "." in gw else OWN6, iif=INST.veth)
            assert run_hook(cmds, "input", p, t) == want, (allow, proto, port, gw)
            assert run_hook(cmds, "input", replace(p, state="established"), t) == "accept"
    nd = pkt("fd6e:7366:7700:5::1", "icmp", 0, iif=INST.veth, icmp_type=135)
    assert run_hook(cmds, "input", nd, t) == "accept"


def test_host_input_respects_host_zone_denies() -> None:
    cmds, t = host(prof(["host"], ["{zone: host, ports: [22], proto: tcp}"])), INST.table
    assert run_hook(cmds, "input", pkt("10.213.0.21", "tcp", 22, saddr=OWN4, iif=INST.veth), t) == "drop"


def test_every_dns_packet_from_the_sandbox_goes_to_its_resolver() -> None:
    """On the host, so the sandbox's own namespace needs no nat hook (each costs every new connection)."""
    cmds, t = host(prof(["internet"])), INST.table
    gw = {4: str(INST.gateway4.ip), 6: str(INST.gateway6.ip)}  # type: ignore[union-attr]
    for dst in ("8.8.8.8", "192.168.1.1", gw[4], "2606:4700::1111", gw[6]):
        for proto in ("udp", "tcp"):
            p = pkt(dst, proto, 53, saddr=OWN4 if "." in dst else OWN6, iif=INST.veth)
            assert run_chain(cmds, "prerouting", p, t) == "dnat"
            (rule,) = [e for e in chain_rules(cmds, "prerouting", t) if mentions(e, f"ipv{p.version}\"")]
            assert rule[-1]["dnat"]["addr"] == gw[p.version]
            assert run_chain(cmds, "prerouting", replace(p, dport=5353), t) is None
            assert run_chain(cmds, "prerouting", replace(p, iif="eth0"), t) is None  # only the sandbox's
    no6 = host(prof(["internet"]), Instance("0123abcd", slot=5))
    assert run_chain(no6, "prerouting", pkt("2606:4700::1111", "udp", 53, iif=INST.veth), t) is None


def test_the_sandbox_table_has_no_nat_hook() -> None:
    for pr in (prof(["internet"]), prof(["example.org"], ["ads.example.org"], ipv6=False)):
        cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
        hooks = [c["add"]["chain"] for c in cmds if "chain" in c["add"] and "hook" in c["add"]["chain"]]
        assert [(h["name"], h["type"]) for h in hooks] == [("output", "filter"), ("input", "filter")]
        assert not any(mentions(c, "dnat") for c in cmds)


def test_guard_ruleset() -> None:
    cmds = nc.guard_ruleset()
    t = nc.GUARD_TABLE
    assert t.startswith("nsfw")
    # idempotent, in place: the rules of a leftover go, its table and hook stay (no grace period to wait for)
    assert [next(iter(c)) for c in cmds[:3]] == ["add", "add", "flush"]
    assert cmds[2] == {"flush": {"chain": {"family": "inet", "table": t, "name": "forward"}}}
    assert not any("delete" in c for c in cmds)
    assert run_hook(cmds, "forward", pkt("8.8.8.8", iif="eth1", oif="eth0"), t) == "drop"
    assert run_hook(cmds, "forward", pkt("8.8.8.8", iif="nsfw0123abcd", oif="eth0"), t) == "accept"
    assert run_hook(cmds, "forward", pkt("10.213.0.22", iif="eth0", oif="nsfw0123abcd"), t) == "accept"
    assert run_hook(cmds, "forward", pkt("10.213.0.22", iif="nsfwaaaabbbb", oif="nsfw0123abcd"), t) == "accept"


# ---------------------------------------------------------------------------------------------- allocate_slot


def nets(*texts: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in texts]


def test_slot_subnets() -> None:
    assert str(slot_net4(0)) == "10.213.0.0/30" and str(slot_net4(1)) == "10.213.0.4/30"
    assert str(slot_net4(slots() - 1)) == "10.213.255.252/30"
    assert str(slot_net6(0)) == "fd6e:7366:7700::/64" and str(slot_net6(3)) == "fd6e:7366:7700:3::/64"
    assert slots() == 16384
    assert all(slot_net4(s).subnet_of(POOL4) for s in (0, 1, slots() - 1))


def test_allocate_first_free_slot() -> None:
    assert allocate_slot([], []) == 0
    assert allocate_slot([0, 1, 3], []) == 2
    assert allocate_slot(iter([1, 0]), iter([])) == 2


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        (["10.213.0.0/30"], 1),
        (["10.213.0.2/32"], 1),
        (["10.213.0.0/29"], 2),
        (["10.213.0.4/30"], 0),
        (["10.213.0.0/30", "10.213.0.4/32", "10.213.0.9/32"], 3),
        (["10.212.0.0/16", "10.214.0.0/16", "10.213.0.4/30"], 0),
        (["10.213.0.0/24"], 64),
        (["10.213.0.0/17"], 8192),
        (["fd6e:7366:7700::/64"], 1),
        (["fd6e:7366:7700::5/128", "fd6e:7366:7700:1::/64"], 2),
        (["fd6e:7366:7700::/62"], 4),
        (["fd6e:7366:7701::/48"], 0),
        (["0.0.0.0/0", "::/0"], 0),  # default routes overlap everything and are ignored
        (["10.0.0.0/8"], None),
        (["10.213.0.0/16"], None),
        (["fd6e:7366:7700::/48"], None),
        (["fd00::/8"], None),
    ],
)
def test_allocate_skips_routed_slots(routes: list[str], expected: int | None) -> None:
    assert allocate_slot([], nets(*routes)) == expected


def test_allocate_combines_used_and_routes() -> None:
    assert allocate_slot([0, 2], nets("10.213.0.4/30", "fd6e:7366:7700:3::/64")) == 4


def test_allocate_returns_none_when_full() -> None:
    small = ipaddress.IPv4Network("192.0.2.0/28")  # four /30s
    assert slots(small) == 4
    assert allocate_slot([0, 1, 2], [], small) == 3
    assert slot_net4(3, small) == ipaddress.IPv4Network("192.0.2.12/30")
    assert allocate_slot([0, 1, 2, 3], [], small) is None
    assert allocate_slot([0, 1, 2], nets("192.0.2.14/32"), small) is None
    assert allocate_slot([0, 1], nets("192.0.2.8/29"), small) is None
    assert allocate_slot(range(slots()), []) is None


def test_allocated_slot_never_overlaps_a_route() -> None:
    rng = random.Random(8)
    for _ in range(200):
        used = rng.sample(range(64), rng.randrange(10))
        routes = [ipaddress.ip_network((int(POOL4.network_address) + rng.randrange(256) * 4, rng.choice([24, 28, 30,
                                                                                                         32])),
                                       strict=False) for _ in range(rng.randrange(4))]
        s = allocate_slot(used, routes)
        assert s is not None and s not in used
        assert not any(slot_net4(s).overlaps(r) for r in routes)
        assert all(k in used or any(slot_net4(k).overlaps(r) for r in routes) for k in range(s))
