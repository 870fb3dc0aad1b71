"""Every compiled ruleset really loads into the kernel, and nft's text for each golden profile is pinned.

tests/golden/NAME.nft is nft's own listing of tests/golden/NAME.json (see tests/unit/test_compile.py), loaded
into a throwaway network namespace through nsfw.nft.render, so a reviewer sees nft syntax in git diffs.
Regenerate after an intended change with

    NSFW_UPDATE_GOLDEN=1 /usr/bin/python3 -m pytest -q \
        tests/unit/test_compile.py tests/integration/test_compile_kernel.py

Root only (the namespaces); skipped otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from nsfw import compile as nc
from nsfw import nft
from nsfw import profile as npf
from nsfw.errors import SetupError
from nsfw.names import HostEnv, Instance
from nsfw.profile import Profile, Rule

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads rulesets into throwaway namespaces")
pytest.importorskip("nftables")

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PROFILES = sorted((GOLDEN / "profiles").glob("*.yaml"))
UPDATE = os.environ.get("NSFW_UPDATE_GOLDEN") == "1"

ENV = HostEnv(addresses=(ipaddress.ip_address("192.168.1.10"), ipaddress.ip_address("2001:db8::10")),
              connected=(ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("198.51.100.0/24")))
GATEWAYS = ("10.213.0.1", "fd6e:7366:7700::1")


def load(path: Path) -> Profile:
    return npf.load(str(path), [GOLDEN / "profiles"])


def test_there_are_golden_profiles() -> None:
    assert len(PROFILES) >= 10


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_golden_nft(path: Path) -> None:
    text = nft.render(nc.sandbox_ruleset(load(path)))
    golden = GOLDEN / f"{path.stem}.nft"
    if UPDATE:
        golden.write_text(text)
    assert golden.exists(), f"no {golden}: run with NSFW_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"nft lists {path.name} differently; NSFW_UPDATE_GOLDEN=1 after review"


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_launch_time_rulesets_load(path: Path) -> None:
    """The sandbox table with a real host environment, and the host table for v4-only and dual-stack slots."""
    pr = load(path)
    text = nft.render(nc.sandbox_ruleset(pr, ENV, GATEWAYS))
    if pr.network == "none":  # loopback only: the same table whatever the profile and the host
        assert text == nft.render(nc.loopback_ruleset()) and '"lo"' in text and "@" not in text
    else:
        assert "192.168.1.10" in text and "198.51.100.0/24" in text and "10.213.0.1" in text
    for inst in (Instance("0123abcd", slot=0, ipv6=True), Instance("0123abcd", slot=16383)):
        text = nft.render(nc.host_ruleset(inst, pr))
        assert f"table inet {inst.table} " in text
        assert "masquerade" in text and '"nsfw*"' in text


@pytest.mark.parametrize("families", [("ipv4", "ipv6"), ("ipv4",), ("ipv6",), ()])
def test_guard_ruleset_loads_and_reloads(families: tuple[str, ...]) -> None:
    cmds = nc.guard_ruleset(families) if families else nc.guard_ruleset()
    text = nft.render(cmds + cmds)  # add, flush, add: loading twice replaces the rules, never duplicates
    assert text.count(f"table inet {nc.GUARD_TABLE} ") == 1
    assert text.count("drop") == len(families or ("ipv4", "ipv6"))


def test_a_broken_ruleset_is_refused() -> None:
    """The harness can fail: render reports what the kernel refused."""
    bad = nc.sandbox_ruleset(Profile("t", "t"))
    bad.append({"add": {"rule": {"family": "inet", "table": "nsfw", "chain": "nonexistent",
                                 "expr": [{"accept": None}]}}})
    with pytest.raises(SetupError):
        nft.render(bad)


# ---------------------------------------------------------------------------------------------- the kernel's sets


def random_cidr_rules(rng: random.Random, count: int, version: int) -> list[Rule]:
    bits = 32 if version == 4 else 128
    rules = []
    for _ in range(count):
        plen = rng.choice([8, 12, 16, 20, 24, 28, bits] if version == 4 else [16, 32, 48, 64, 100, 128])
        base = rng.choice([0x0A000000, 0xC0000200, rng.randrange(1 << 32)]) if version == 4 else (
            rng.choice([0x20010DB8 << 96, rng.randrange(1 << 128)]))
        base ^= rng.randrange(1 << 20) << (bits - 28)
        net = ipaddress.ip_network((base % (1 << bits) >> (bits - plen) << (bits - plen), plen))
        proto = rng.choice(["any", "any", "tcp", "udp", "icmp"])
        ports: tuple[tuple[int, int], ...] = ()
        if proto != "icmp" and rng.random() < 0.6:
            ports = tuple(sorted({(lo, min(65535, lo + rng.choice([0, 0, 9, 999])))
                                  for lo in (rng.randrange(1, 65536) for _ in range(rng.randrange(1, 3)))}))
        rules.append(Rule("cidr", str(net), proto, ports))  # type: ignore[arg-type]
    return rules


def covers(rules: list[Rule], version: int, addr: int, proto: int, port: int) -> bool:
    """The spec: does any rule take (addr, proto, port)? With ports, proto any means tcp and udp."""
    for r in rules:
        net = r.network
        if net.version != version or not int(net.network_address) <= addr <= int(net.broadcast_address):
            continue
        in_ports = any(lo <= port <= hi for lo, hi in r.ports)
        if r.proto == "icmp":
            hit = proto == (1 if version == 4 else 58)
        elif r.proto in ("tcp", "udp"):
            hit = proto == {"tcp": 6, "udp": 17}[r.proto] and (not r.ports or in_ports)
        else:
            hit = not r.ports or (proto in (6, 17) and in_ports)
        if hit:
            return True
    return False


def probes(rng: random.Random, rules: list[Rule], version: int, count: int) -> list[tuple[int, int, int]]:
    out = []
    for _ in range(count):
        r = rng.choice(rules)
        lo, hi = int(r.network.network_address), int(r.network.broadcast_address)
        addr = rng.choice([lo, hi, lo - 1, hi + 1, rng.randint(lo, hi)]) % (1 << (32 if version == 4 else 128))
        proto = rng.choice([6, 6, 17, 17, 1 if version == 4 else 58, 132])
        port = rng.choice([p for span in r.ports for p in (span[0], span[1], span[0] - 1, span[1] + 1)] or [80])
        out.append((addr, proto, port % 65536))
    return out


@pytest.mark.skipif(not shutil.which("unshare") or not shutil.which("nft"), reason="needs unshare(1) and nft(8)")
@pytest.mark.parametrize("seed", range(2))
def test_kernel_sets_hold_exactly_the_profile(tmp_path: Path, seed: int) -> None:
    """Hundreds of overlapping CIDR rules load (the kernel refuses overlapping interval elements), and the
    kernel's own set lookup agrees with the spec for probes at and around every edge."""
    rng = random.Random(seed)
    allow = random_cidr_rules(rng, 300, 4) + random_cidr_rules(rng, 150, 6)
    pr = Profile("big", "big.yaml", allow=tuple(allow))
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps(nc.wrap(nc.sandbox_ruleset(pr))))
    queries, expected = [], []
    for version in (4, 6):
        mine = [r for r in allow if r.network.version == version]
        for addr, proto, port in probes(rng, mine, version, 60):
            a = ipaddress.ip_address(addr) if version == 4 else ipaddress.IPv6Address(addr)
            # whole networks live in a plain interval set, port-specific ones in the concatenated one
            queries.append(f"(nft get element inet nsfw allowaddr{version} '{{ {a} }}' >/dev/null 2>&1 || "
                           f"nft get element inet nsfw allow{version} '{{ {a} . {proto} . {port} }}' "
                           ">/dev/null 2>&1) && echo 1 || echo 0")
            expected.append((str(a), proto, port, covers(mine, version, addr, proto, port)))
    script = f"nft -j -f {rules_file} || exit 99\n" + "\n".join(queries)
    run = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = run.stdout.split()
    assert len(got) == len(expected)
    wrong = [(e[:3], e[3]) for e, g in zip(expected, got, strict=True) if e[3] != (g == "1")]
    assert not wrong, f"kernel disagrees with the spec at (address, proto, port), expected: {wrong[:10]}"
    assert 0 < sum(e[3] for e in expected) < len(expected)  # the probes see both sides


# ---------------------------------------------------------------------------------------------- large sets in Python


def both_ways(cmds: list[dict[str, object]]) -> tuple[str, str]:
    """render() with every eligible set spelt in Python, and with nothing spelt in Python (all nft's own)."""
    return nft.render(cmds, python_above=0), nft.render(cmds, python_above=1 << 62)


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_python_elements_match_nft_on_the_goldens(path: Path) -> None:
    cmds = nc.sandbox_ruleset(load(path), ENV, GATEWAYS)
    plain = {(spec["family"], spec["table"], spec["name"]) for cmd in cmds
             if isinstance(spec := cmd.get("add", {}).get("set"), dict) and spec.get("flags") == ["interval"]
             and isinstance(spec.get("type"), str) and spec.get("elem")}
    assert set(nft._python_sets(cmds, 0)) == plain  # every plain address set is spelt in Python, none fell back
    ours, kernels = both_ways(cmds)
    assert ours == kernels


def edge_rules() -> tuple[list[Rule], list[Rule]]:
    """Singles, prefixes and ranges (neighbours merged) at both ends of each address space, IPv4-mapped IPv6;
    and a scatter."""
    edges = ["0.0.0.0/32", "0.0.0.2/31", "0.0.0.4/30", "0.0.0.9/32", "0.0.0.10/31", "0.0.0.12/32",
             "255.255.255.255/32", "255.255.255.240/29", "255.255.255.128/26", "198.51.100.0/24",
             "198.51.101.0/25", "203.0.113.7/32", "203.0.113.9/32",
             "::/128", "::2/127", "::4/126", "::ffff:0:0/96", "::ffff:192.0.2.0/120", "2001:db8::/32",
             "2001:db9::/33", "2001:db9:8000::1/128", "ff00::/9", "ff80::/10",
             "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
             "fe80::/64"]
    texts: list[str] = []
    rng = random.Random(11)
    for _ in range(2000):
        plen = rng.choice([16, 20, 23, 24, 27, 30, 31, 32, 32])
        base = rng.getrandbits(32) >> (32 - plen) << (32 - plen)
        texts.append(str(ipaddress.ip_network((base, plen))))
    for _ in range(300):
        plen = rng.choice([32, 47, 64, 100, 127, 128])
        texts.append(str(ipaddress.ip_network((rng.getrandbits(128) >> (128 - plen) << (128 - plen), plen))))
    return [Rule("cidr", t) for t in edges], [Rule("cidr", t) for t in texts]


def test_python_elements_match_nft_on_mixed_sets() -> None:
    """Thousands of elements, prefixes, ranges (merged neighbours) and singles, at the edges of both families,
    in the plain sets; the concatenated (port) sets beside them stay nft's."""
    edges, rules = edge_rules()
    ported = [Rule("cidr", r.value, "tcp", ((22, 22), (8000, 8100))) for r in rules[::7]]
    pr = Profile("mixed", "mixed.yaml", allow=(*edges, *rules[::2], *ported), deny=(*edges, *rules[1::2]))
    cmds = nc.sandbox_ruleset(pr, ENV, GATEWAYS)
    spelt = nft._python_sets(cmds, 0)
    assert {("inet", "nsfw", f"{w}addr{v}") for w in ("allow", "deny") for v in (4, 6)} <= set(spelt)
    sizes = {name: len(next(c["add"]["set"]["elem"] for c in cmds if c.get("add", {}).get("set", {}).get("name")
                            == name)) for name in ("allowaddr4", "denyaddr4")}
    assert min(sizes.values()) > 500
    text = " ".join(spelt.values())
    assert "-" in text and "/" in text  # ranges and prefixes both
    ours, kernels = both_ways(cmds)
    assert ours == kernels
    assert nft.render(cmds) == kernels  # the default threshold: the large sets in Python, the small ones nft's


@pytest.mark.parametrize("elems", [
    ["0.0.0.0/0"], [{"prefix": {"addr": "0.0.0.0", "len": 0}}], [{"range": ["0.0.0.1", "255.255.255.255"]}],
    [{"range": ["0.0.0.0", "255.255.255.254"]}], ["255.255.255.255", {"prefix": {"addr": "10.0.0.0", "len": 8}}],
])
def test_python_elements_match_nft_on_whole_spaces(elems: list[object]) -> None:
    cmds: list[dict[str, object]] = [
        {"add": {"table": {"family": "inet", "name": "t"}}},
        {"add": {"set": {"family": "inet", "table": "t", "name": "s", "type": "ipv4_addr", "flags": ["interval"],
                         "elem": [e for e in elems if not isinstance(e, str) or "/" not in e]
                         or [{"prefix": {"addr": "0.0.0.0", "len": 0}}]}}},
    ]
    assert nft._python_sets(cmds, 0)
    ours, kernels = both_ways(cmds)
    assert ours == kernels


def test_sets_nft_must_list_itself_are_left_to_it() -> None:
    """Touching or overlapping elements (nft would refuse or join them), a set of the same name in another
    table, and sets with more than a type and flags: rendered all the same, and as nft lists them."""
    def addrset(table: str, name: str, elems: list[object], **extra: object) -> dict[str, object]:
        return {"add": {"set": {"family": "inet", "table": table, "name": name, "type": "ipv4_addr",
                                "flags": ["interval"], "elem": elems, **extra}}}

    cmds: list[dict[str, object]] = [
        {"add": {"table": {"family": "inet", "name": "a"}}}, {"add": {"table": {"family": "inet", "name": "b"}}},
        addrset("a", "s", ["192.0.2.1", {"range": ["192.0.2.5", "192.0.2.9"]}]),
        addrset("b", "s", [{"prefix": {"addr": "198.51.100.0", "len": 24}}, "203.0.113.1"]),
        addrset("a", "touching", ["192.0.2.1", "192.0.2.2"], **{"auto-merge": True}),
        addrset("a", "commented", ["192.0.2.1"], comment="hello"),
    ]
    assert set(nft._python_sets(cmds, 0)) == {("inet", "a", "s"), ("inet", "b", "s")}
    ours, kernels = both_ways(cmds)
    assert ours == kernels and "198.51.100.0/24" in ours and "192.0.2.5-192.0.2.9" in ours
    # an element added on its own goes into a set that may already have some: nft's business, whole
    more = [*cmds, {"add": {"element": {"family": "inet", "table": "b", "name": "s", "elem": ["203.0.113.9"]}}}]
    assert nft._python_sets(more, 0) == {}
    assert nft.render(more, python_above=0) == nft.render(more, python_above=1 << 62)
