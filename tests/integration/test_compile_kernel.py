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
    assert "192.168.1.10" in text and "198.51.100.0/24" in text and "10.213.0.1" in text
    for inst in (Instance("0123abcd", slot=0, ipv6=True), Instance("0123abcd", slot=16383)):
        text = nft.render(nc.host_ruleset(inst, pr))
        assert f"table inet {inst.table} " in text
        assert "masquerade" in text and '"nsfw*"' in text


@pytest.mark.parametrize("families", [("ipv4", "ipv6"), ("ipv4",), ("ipv6",), ()])
def test_guard_ruleset_loads_and_reloads(families: tuple[str, ...]) -> None:
    cmds = nc.guard_ruleset(families) if families else nc.guard_ruleset()
    text = nft.render(cmds + cmds)  # add-delete-add: loading twice replaces, never duplicates
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
