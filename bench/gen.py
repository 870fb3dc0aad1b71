"""Generated inputs for the benchmarks: blocklists (with overlapping and adjacent ranges, as real ones have),
allowed names for the world's zone, port rules, and the profiles that hold them. Deterministic: a seed."""

from __future__ import annotations

import ipaddress
import json
import os
import random
from collections.abc import Sequence
from typing import Any

# Never in a generated blocklist: the addresses the benchmarks reach, the world's own links, and what is not
# internet anyway.
KEEP_OUT = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
    "100.64.0.0/10", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/3",
))
NAME_NET = "198.19"  # the benchmark's names resolve to 198.19.x.y: internet (a benchmarking range), unconnected
TARGET = "192.0.2.10"  # where the load goes: a world address in the inet namespace
CONN_PORTS = (5001, 5016)  # bench/c/connsrv listens on these
IPERF_PORT = 5201


def _clear(net: ipaddress.IPv4Network) -> bool:
    return not any(net.overlaps(k) for k in KEEP_OUT)


def blocklist(n: int, seed: int = 1) -> list[str]:
    """n IPv4 CIDRs, about 10% of them inside an earlier one, 10% right next to one, 1% repeated, the rest
    scattered, mostly /32 and /24 with a few networks as large as /16."""
    rng = random.Random(seed)
    # mostly single hosts and /24s, a few larger networks, as in public blocklists
    lengths, weights = (16, 18, 20, 22, 24, 25, 26, 27, 28, 29, 30, 31, 32), (5, 10, 30, 50, 300, 30, 30, 30, 30, 30,
                                                                             30, 20, 405)
    out: list[ipaddress.IPv4Network] = []
    while len(out) < n:
        roll = rng.random()
        if out and roll < 0.10:  # inside an earlier one
            parent = out[rng.randrange(len(out))]
            if parent.prefixlen < 32:
                length = rng.randint(parent.prefixlen + 1, min(32, parent.prefixlen + 8))
                subs = 1 << (length - parent.prefixlen)
                base = int(parent.network_address) + rng.randrange(subs) * (1 << (32 - length))
                out.append(ipaddress.IPv4Network((base, length)))
            continue
        if out and roll < 0.20:  # adjacent to an earlier one
            prev = out[rng.randrange(len(out))]
            nxt = int(prev.broadcast_address) + 1
            if nxt < 2**32:
                net = ipaddress.IPv4Network((nxt & ~((1 << (32 - prev.prefixlen)) - 1), prev.prefixlen))
                if _clear(net):
                    out.append(net)
            continue
        if out and roll < 0.21:  # the same again
            out.append(out[rng.randrange(len(out))])
            continue
        length = rng.choices(lengths, weights)[0]
        base = rng.getrandbits(32) & ~((1 << (32 - length)) - 1)
        net = ipaddress.IPv4Network((base, length))
        if _clear(net):
            out.append(net)
    return [str(net) for net in out]


def names(n: int) -> list[tuple[str, str]]:
    """n (name, address) pairs for the world's zone, each its own address."""
    return [(f"n{i}.bench.test", f"{NAME_NET}.{i // 250}.{i % 250 + 1}") for i in range(n)]


def zone(pairs: Sequence[tuple[str, str]], ttl: int = 3600) -> dict[str, Any]:
    """Zone entries; a long TTL so the grants outlive the benchmark (a grant lasts the TTL, at least 60 s)."""
    return {name: {"A": [addr], "ttl": ttl} for name, addr in pairs}


def port_rules(n: int, seed: int = 2) -> list[dict[str, Any]]:
    """n port rules; the first opens the benchmark's own servers, the others are scattered like a real
    application's (a service here, a range there)."""
    rng = random.Random(seed)
    rules: list[dict[str, Any]] = [{"cidr": f"{TARGET}/32", "ports": [f"{CONN_PORTS[0]}-{CONN_PORTS[1]}",
                                                                       IPERF_PORT], "proto": "tcp"}]
    while len(rules) < n:
        length = rng.choice([16, 20, 24, 24, 28, 32])
        net = ipaddress.IPv4Network((rng.getrandbits(32) & ~((1 << (32 - length)) - 1), length))
        if not _clear(net):
            continue
        lo = rng.randint(1, 60000)
        ports: list[Any] = [lo] if rng.random() < 0.6 else [f"{lo}-{lo + rng.randint(1, 500)}"]
        rules.append({"cidr": str(net), "ports": ports, "proto": rng.choice(["tcp", "tcp", "udp"])})
    return rules


def _yaml_rule(rule: dict[str, Any] | str) -> str:
    if isinstance(rule, str):
        return f"  - {json.dumps(rule)}"
    parts = []
    for key, value in rule.items():
        if isinstance(value, list):
            value = "[" + ", ".join(json.dumps(v) for v in value) + "]"
        elif isinstance(value, str):
            value = json.dumps(value)
        parts.append(f"{key}: {value}")
    return "  - {" + ", ".join(parts) + "}"


def write_profile(path: str, *, description: str, network: str = "nat", allow: Sequence[dict[str, Any] | str] = (),
                  deny: Sequence[dict[str, Any] | str] = (), default: str = "deny") -> str:
    lines = [f"description: {description!r}", f"network: {network}", f"default: {default}"]
    for key, rules in (("allow", allow), ("deny", deny)):
        if rules:
            lines.append(f"{key}:")
            lines += [_yaml_rule(r) for r in rules]
    _write(path, "\n".join(lines) + "\n")
    return path


def write_list(path: str, entries: Sequence[str]) -> str:
    _write(path, "# generated by bench/gen.py\n" + "\n".join(entries) + "\n")
    return path


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)


def datapath_profile(directory: str, *, cidrs: int = 10_000, n_names: int = 200, ports: int = 50) -> tuple[str,
                                                                                                      list[str]]:
    """The data-path profile: a `file:` blocklist of `cidrs` CIDRs, `n_names` allowed names (a quarter of
    them for tcp/443 only, so two grant groups), `ports` port rules. Returns its path and the names."""
    pairs = names(n_names)
    listed = write_list(os.path.join(directory, "blocklist.txt"), blocklist(cidrs))
    quarter = n_names // 4
    allow: list[dict[str, Any] | str] = [name for name, _a in pairs[quarter:]]
    allow += [{"host": name, "ports": [443], "proto": "tcp"} for name, _a in pairs[:quarter]]
    allow += port_rules(ports)
    path = write_profile(os.path.join(directory, "datapath.yaml"),
                         description=f"bench/datapath: {cidrs} CIDRs blocked, {n_names} names, {ports} port rules",
                         allow=allow, deny=[{"file": os.path.basename(listed)}])
    return path, [name for name, _a in pairs]
