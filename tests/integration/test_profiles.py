"""The shipped profile library: every profile is valid, pinned by a golden ruleset, and does in the simulated
world what its own rules say, and what it is meant to do.

Three sources of truth, checked against each other:

- INTENT, written down here by hand: whether a profile has no network, reaches only what it names
  ("closed": names and networks, no internet zone), or has the internet open on some ports ("open"), and
  whether it may reach the home network. A profile that drifts (opens the LAN, loses its network, opens the
  internet where it should name its service) fails here, whatever its rules say.
- The profile's own rules, read by `Model`, a small restatement of the README's semantics (zones, deny wins,
  names grant the addresses they resolve to, unlisted names resolve only where the internet is open). It
  predicts the outcome of every probe.
- The kernel: one sandbox per profile in the simulated world runs a batch of probes, in one process, and the
  outcomes must be what Model predicts and what INTENT allows.

Real-world names in the profiles are never resolved for real: each test maps them into the world's zone
(`*.x.com` -> probe.x.com) on documentation addresses, and restores the zone afterwards.

Goldens: tests/golden/shipped/NAME.nft is `nsfw rules NAME` for every shipped profile; after an intended
change to a profile or the compiler, regenerate and review the diff:

    NSFW_UPDATE_GOLDEN=1 /usr/bin/python3 -m pytest -q tests/integration/test_profiles.py -k golden
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nsfw import profile as npf
from nsfw.profile import Profile, Rule
from nsfw.world import DEFAULT_ZONE, HOST_UPLINK4, LAN4

from .sandbox import NSFW, PY, profile_dir, run, snapshot_diff, write_profile

__all__ = ["profile_dir"]  # a fixture, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = npf.SHIPPED_DIR
NAMES = sorted(p.stem for p in SHIPPED.glob("*.yaml"))
GOLDEN = ROOT / "tests" / "golden" / "shipped"
UPDATE = os.environ.get("NSFW_UPDATE_GOLDEN") == "1"

GENERIC = ("default", "offline", "web", "lan-only")  # the first four: `nsfw run -p NAME`, older than the library
BASES = tuple(n for n in NAMES if n.startswith("base-"))
APPS = tuple(n for n in NAMES if n not in GENERIC and n not in BASES)
STANDALONE = ("nextcloud", "remmina", "syncthing")  # apps that say why no base fits them

# What each shipped profile is meant to reach: (internet: none | closed | open, home network: yes/no).
# none: network: none. closed: only what it names (domain names, networks), no internet zone rule, so a name
# no rule lists is refused. open: the internet zone on some ports, so every name resolves.
INTENT: dict[str, tuple[str, bool]] = {
    "default": ("open", False), "offline": ("none", False), "web": ("open", False), "lan-only": ("closed", True),
    "base-offline": ("none", False), "base-internet": ("open", False), "base-web": ("open", False),
    "base-lan": ("closed", True), "base-service": ("closed", False), "base-browser": ("open", False),
    "base-mail": ("open", False), "base-chat": ("open", False), "base-media": ("open", False),
    "base-dev": ("closed", False),
    # browsers
    "firefox": ("open", False), "firefox-esr": ("open", False), "chromium": ("open", False),
    "google-chrome": ("open", False),
    # mail
    "thunderbird": ("open", False), "evolution": ("open", False),
    # chat and calls
    "signal-desktop": ("open", False), "element-desktop": ("open", False), "slack": ("open", False),
    "discord": ("open", False), "zoom": ("open", False), "telegram-desktop": ("closed", False),
    "hexchat": ("open", False),
    # office and documents
    "libreoffice": ("none", False), "evince": ("none", False), "okular": ("none", False), "gimp": ("none", False),
    "inkscape": ("none", False), "simple-scan": ("closed", True),
    # media and streaming
    "vlc": ("open", True), "mpv": ("open", False), "yt-dlp": ("open", False), "spotify": ("closed", False),
    "obs": ("open", False),
    # passwords
    "keepassxc": ("none", False), "bitwarden": ("closed", False), "1password": ("closed", False),
    # development and packages
    "git": ("closed", False), "pip": ("closed", False), "npm": ("closed", False), "cargo": ("closed", False),
    "code": ("closed", False), "flatpak": ("closed", False),
    # games
    "steam": ("open", False), "lutris": ("open", False),
    # torrents, sync and remote desktops
    "transmission-gtk": ("open", False), "qbittorrent": ("open", False), "syncthing": ("open", True),
    "nextcloud": ("open", True), "dropbox": ("closed", False), "remmina": ("open", True),
}

# The world: servers on these addresses and ports (53 is the sandbox resolver's, never probed here).
LISTEN = {"tcp": (443, 80, 8080, 22, 853), "udp": (443, 123, 9999)}
NAME_ADDRS = (("192.0.2.10", "2001:db8::10"), ("192.0.2.11", "2001:db8::20"), ("192.0.2.12", None))
CONTROL = "198.51.100.20"  # no allowed name maps here: raw-address probes and the unlisted name
DENIED_ADDR = "203.0.113.30"  # every denied name
UNLISTED = "unlisted-by-everyone.example.net"
HOST_PROBE = (HOST_UPLINK4, 631)  # CUPS on the simulated host
ENV_TIMEOUT = {"NSFW_PROBE_TIMEOUT": "1"}


# ---------------------------------------------------------------------------------------------- the model


def concrete(pattern: str) -> str:
    """A name a pattern matches: `*.x.com` -> probe.x.com."""
    return "probe." + pattern[2:] if pattern.startswith("*.") else pattern


def matches(pattern: str, name: str) -> bool:
    return name.endswith("." + pattern[2:]) if pattern.startswith("*.") else name == pattern


def covers(rule: Rule, proto: str, port: int) -> bool:
    if rule.proto == "icmp" or rule.proto not in ("any", proto):
        return False
    return not rule.ports or any(lo <= port <= hi for lo, hi in rule.ports)


def in_zone(rule: Rule, zone: str) -> bool:
    return rule.kind == "zone" and (rule.value == zone or (rule.value == "any" and zone in ("lan", "internet")))


def zone_of(addr: str) -> str:
    """The zone of the world addresses these tests probe: the host's uplink, the LAN server, else the internet."""
    return {HOST_UPLINK4: "host", LAN4: "lan"}.get(addr, "internet")


def open_names(p: Profile) -> bool:
    """README: names no rule mentions resolve only where the internet is open anyway."""
    return p.default == "allow" or any(r.kind == "zone" and r.value in ("internet", "any") for r in p.allow)


@dataclass
class Model:
    """What the README says a sandbox of profile `p` does, probe after probe (grants accumulate)."""

    p: Profile
    addr_of: dict[str, str]
    grants: dict[str, list[Rule]] = field(default_factory=dict)
    learned: set[str] = field(default_factory=set)

    def allows(self, addr: str, proto: str, port: int) -> bool:
        p, zone, ip = self.p, zone_of(addr), ipaddress.ip_address(addr)
        if p.network == "none":
            return False
        if any(r.kind == "cidr" and ip in r.network and covers(r, proto, port) for r in p.deny):
            return False
        if addr in self.learned:
            return False
        if any(in_zone(r, zone) and covers(r, proto, port) for r in p.deny):
            return False
        if zone != "host" and any(covers(r, proto, port) for r in self.grants.get(addr, [])):
            return True
        if zone != "host" and any(r.kind == "cidr" and ip in r.network and covers(r, proto, port) for r in p.allow):
            return True
        if any(in_zone(r, zone) and covers(r, proto, port) for r in p.allow):
            return True
        return p.default == "allow" and zone != "host"

    def lookup(self, name: str) -> str:
        """allow | deny | unlisted | refuse, and the grants an answer hands out."""
        if self.p.network == "none":
            return "fail"
        if any(r.kind == "host" and matches(r.value, name) for r in self.p.deny):
            if open_names(self.p):  # the resolver learns a denied name's addresses where names are open
                self.learned.add(self.addr_of[name])
            return "deny"
        hits = [r for r in self.p.allow if r.kind == "host" and matches(r.value, name)]
        if hits:
            self.grants.setdefault(self.addr_of[name], []).extend(hits)
            return "allow"
        return "unlisted" if open_names(self.p) else "refuse"


def representative(rule: Rule) -> tuple[str, int] | None:
    """A (proto, port) the rule opens, where a world server listens if there is one."""
    if rule.proto == "icmp":
        return None
    protos = ("tcp", "udp") if rule.proto == "any" else (rule.proto,)
    for proto in protos:
        for port in LISTEN[proto]:
            if covers(rule, proto, port):
                return proto, port
    port = rule.ports[0][0] if rule.ports else 443
    if port == 53:  # DNS goes to the sandbox's resolver whatever the address
        port = rule.ports[0][1] if rule.ports[0][1] > 53 else 54
    return protos[0], port


# ---------------------------------------------------------------------------------------------- probe plans


@dataclass
class Step:
    argv: tuple[str, ...]
    expect: str  # reached | refused (allowed, nobody listens) | blocked | resolves | nxdomain | fails
    role: str  # host | lan | internet | name | unlisted | denied


def outcome(allowed: bool, proto: str, port: int) -> str:
    if not allowed:
        return "blocked"
    return "reached" if port in LISTEN[proto] else "refused"


def zone_map(p: Profile) -> dict[str, dict[str, Any]]:
    """Every name the profile allows or denies, on documentation addresses, plus the unlisted name."""
    zone: dict[str, dict[str, Any]] = {UNLISTED: {"A": [CONTROL]}}
    allowed = [concrete(r.value) for r in p.allow if r.kind == "host"]
    for i, name in enumerate(dict.fromkeys(allowed)):
        v4, v6 = NAME_ADDRS[i % len(NAME_ADDRS)]
        zone[name] = {"A": [v4], **({"AAAA": [v6]} if v6 else {})}
    for r in p.deny:
        if r.kind == "host":
            zone[concrete(r.value)] = {"A": [DENIED_ADDR]}
    return zone


def plan(p: Profile, zone: dict[str, dict[str, Any]]) -> list[Step]:
    model = Model(p, {name: rec["A"][0] for name, rec in zone.items()})
    steps: list[Step] = []

    def connect(addr: str, proto: str, port: int, role: str) -> None:
        steps.append(Step((proto, addr, str(port)), outcome(model.allows(addr, proto, port), proto, port), role))

    every_rule = [*p.allow, *p.deny]
    ports = {("tcp", 443), ("udp", 443), ("tcp", 80)} | {rp for r in every_rule if (rp := representative(r))}
    # before any lookup: the host, the home network, and a raw internet address
    connect(HOST_PROBE[0], "tcp", HOST_PROBE[1], "host")
    for proto, port in sorted(ports):
        connect(LAN4, proto, port, "lan")
    for proto, port in sorted(ports):
        connect(CONTROL, proto, port, "internet")
    denied = [concrete(r.value) for r in p.deny if r.kind == "host"]
    if denied:
        connect(DENIED_ADDR, "tcp", 443, "denied")
    # every allowed name, on a port its rule opens: the lookup grants its address
    for rule in p.allow:
        if rule.kind != "host" or not (rp := representative(rule)):
            continue
        name, (proto, port) = concrete(rule.value), rp
        addr = zone[name]["A"][0]
        if proto == "tcp":
            connect(addr, proto, port, "name")  # before the lookup
            verdict = model.lookup(name)
            expect = "nxdomain" if verdict in ("deny", "refuse") else outcome(model.allows(addr, proto, port), proto,
                                                                               port)
            steps.append(Step(("tcpname", name, str(port)), expect if p.network != "none" else "fails", "name"))
        else:
            verdict = model.lookup(name)
            steps.append(Step(("resolve", name), "resolves" if verdict in ("allow", "unlisted") else "nxdomain",
                              "name"))
            connect(addr, proto, port, "name")
    # a name nobody allows
    verdict = model.lookup(UNLISTED)
    expect = {"unlisted": "resolves", "refuse": "nxdomain", "fail": "fails"}[verdict]
    steps.append(Step(("resolve", UNLISTED), expect, "unlisted"))
    connect(CONTROL, "tcp", 443, "unlisted")
    # denied names: refused, and where the resolver learns their addresses, those are blocked
    for name in denied:
        verdict = model.lookup(name)
        steps.append(Step(("resolve", name), "nxdomain" if verdict == "deny" else "fails", "denied"))
    if denied:
        steps.append(Step(("sleep", "0.5"), "slept", "denied"))  # the resolver learns them in the background
        connect(DENIED_ADDR, "tcp", 443, "denied")
    return steps


# One process in the sandbox runs every probe of the plan (a fresh interpreter per probe costs more than the
# sandbox itself): world.py's own probe_main, one JSON line per probe.
DRIVER = textwrap.dedent("""\
    import contextlib, importlib.util, io, json, os, sys, time
    spec = importlib.util.spec_from_file_location("world_probe", sys.argv[1])
    world = importlib.util.module_from_spec(spec)
    sys.modules["world_probe"] = world
    spec.loader.exec_module(world)
    for argv in json.loads(sys.argv[2]):
        if argv[0] == "sleep":
            time.sleep(float(argv[1]))
            code, text = 0, "slept"
        else:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = world.probe_main(argv)
            text = buf.getvalue().strip()
        print(json.dumps([code, text]), flush=True)
    os._exit(0)
    """)


def observed(code: int, text: str, step: Step) -> str:
    """The probe's outcome in the words of Step.expect."""
    kind = step.argv[0]
    if kind == "sleep":
        return "slept"
    if kind == "resolve":
        return "resolves" if code == 0 else "nxdomain" if text == "nxdomain" else "fails"
    if code == 0:
        return "reached"
    if code == 3:
        return "blocked"
    if code == 1 and text == "nxdomain":
        return "nxdomain"
    if code == 1 or (code == 2 and step.argv[0] == "udp"):  # a port nobody listens on; ICMP may be rate-limited
        return "refused"
    return f"code {code}: {text}"


def run_plan(world: Any, name: str, steps: list[Step], env: dict[str, str]) -> list[tuple[int, str]]:
    argv = json.dumps([list(s.argv) for s in steps])
    done = run(world, name, PY, "-I", "-c", DRIVER, world.probe_script, argv, env={**ENV_TIMEOUT, **env})
    results = [(int(c), str(t)) for c, t in (json.loads(line) for line in done.stdout.splitlines()
                                             if line.startswith("["))]
    assert done.returncode == 0 and len(results) == len(steps), f"{name}: {done.returncode}\n{done.stdout}{done.stderr}"
    return results


@contextmanager
def names_in_world(world: Any, extra: dict[str, dict[str, Any]]) -> Iterator[None]:
    """The world's zone plus `extra`, for the duration; the zone as it was afterwards, whatever happens."""
    before = dict(world.zone)
    world.set_zone({**DEFAULT_ZONE, **before, **extra})
    try:
        yield
    finally:
        world.set_zone(before)


@pytest.fixture
def no_trace(world: Any) -> Iterator[None]:
    """What sandbox.baseline checks, for the tests that run nsfw in the world only (the autouse original would
    snapshot the world around every static test of this file too, doubling its run time)."""
    before = world.snapshot()
    yield
    diff = snapshot_diff(before, world.snapshot())
    assert not diff, "nsfw left something behind: " + "; ".join(diff)


def shipped(name: str) -> Profile:
    return npf.load(name, [SHIPPED])


@pytest.fixture(scope="module")
def empty_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An NSFW_PROFILE_PATH with nothing in it, so that root's own ~/.config/nsfw/profiles cannot shadow."""
    d = tmp_path_factory.mktemp("nothing")
    d.chmod(0o755)
    for parent in d.parents:
        if str(parent).startswith("/tmp/"):
            parent.chmod(parent.stat().st_mode | 0o005)
    shadowed = [n for n in NAMES if (npf.SYSTEM_DIR / f"{n}.yaml").exists() or (npf.SYSTEM_DIR / f"{n}.yml").exists()]
    if shadowed:
        pytest.skip(f"{npf.SYSTEM_DIR} has profiles that shadow shipped ones: {', '.join(shadowed)}")
    return str(d)


def nsfw(*args: str, path: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent", "NSFW_PROFILE_PATH": path}
    return subprocess.run([NSFW, *args], env=env, capture_output=True, text=True, timeout=60, check=False, **kw)


# ---------------------------------------------------------------------------------------------- the library


def test_the_library_covers_a_desktop() -> None:
    assert len(APPS) >= 30, APPS
    assert {"base-offline", "base-internet", "base-lan", "base-browser", "base-mail", "base-chat"} <= set(BASES)
    assert set(INTENT) == set(NAMES), ("write the intent of every shipped profile down here: "
                                       f"missing {sorted(set(NAMES) - set(INTENT))}, "
                                       f"stale {sorted(set(INTENT) - set(NAMES))}")


@pytest.mark.parametrize("name", NAMES)
def test_profile_reads_well(name: str) -> None:
    """A header comment that says what the app needs; a description; named after its command; built on a base."""
    text = (SHIPPED / f"{name}.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("# "), f"{name}.yaml must start with a comment saying what the app needs and why"
    p = shipped(name)
    assert p.description, f"{name}.yaml has no description:"
    if name in GENERIC:
        return
    assert text.startswith(f"# {name}: "), f"{name}.yaml: start the header with '# {name}: '"
    assert len(" ".join(header)) > 80, f"{name}.yaml: say what the app needs and why each rule is there"
    if p.command:
        assert os.path.basename(p.command[0]) == name, f"{name}.yaml: the profile is named after its command"
    if name in APPS:
        bases = [f for f in p.files if Path(f).stem.startswith("base-")]
        if name in STANDALONE:
            assert not bases and "No base profile" in text, f"{name}.yaml: say why no base fits"
        else:
            assert bases, f"{name}.yaml: build on a base profile"


@pytest.mark.parametrize("name", NAMES)
def test_profile_means_what_it_is_meant_to(name: str) -> None:
    """INTENT, checked on the rules (the world test checks it on the kernel)."""
    p, (reach, lan) = shipped(name), INTENT[name]
    assert (p.network == "none") == (reach == "none"), f"{name}: network: {p.network}, meant {reach}"
    if reach != "none":
        assert open_names(p) == (reach == "open"), f"{name}: internet zone {'closed' if reach == 'open' else 'open'}"
    assert not any(in_zone(r, "host") for r in p.allow), f"{name}: no shipped profile opens this machine"
    model = Model(p, {})
    lan_ports = {rp for r in [*p.allow, *p.deny] if (rp := representative(r))} | {("tcp", 443), ("tcp", 22)}
    opened = sorted(pp for pp in lan_ports if model.allows(LAN4, *pp))
    assert bool(opened) == lan, f"{name}: the home network is {'open on ' + str(opened) if opened else 'closed'}"


def test_nsfw_check_accepts_every_shipped_profile(empty_path: str) -> None:
    by_name = nsfw("check", *NAMES, path=empty_path)
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout.splitlines() == [f"{n}: ok" for n in NAMES]
    paths = [str(SHIPPED / f"{n}.yaml") for n in NAMES]
    by_path = nsfw("check", *paths, path=empty_path)
    assert by_path.returncode == 0, by_path.stderr
    assert by_path.stdout.splitlines() == [f"{p}: ok" for p in paths]


# ---------------------------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("name", NAMES)
def test_golden_rules(name: str, empty_path: str) -> None:
    done = nsfw("rules", name, path=empty_path)
    assert done.returncode == 0, done.stderr
    golden = GOLDEN / f"{name}.nft"
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        golden.write_text(done.stdout)
    assert golden.exists(), f"no {golden}: run with NSFW_UPDATE_GOLDEN=1"
    assert done.stdout == golden.read_text(), f"`nsfw rules {name}` changed; NSFW_UPDATE_GOLDEN=1 after review"


def test_no_stray_shipped_goldens() -> None:
    stray = sorted(p.name for p in GOLDEN.glob("*") if p.suffix != ".nft" or p.stem not in NAMES)
    assert not stray, f"golden files without a shipped profile: {stray}"


# ---------------------------------------------------------------------------------------------- in the world


@pytest.mark.parametrize("name", NAMES)
def test_profile_in_the_world(world: Any, name: str, empty_path: str, no_trace: None) -> None:
    """One sandbox per profile: every probe as the rules predict, and as INTENT allows."""
    p, (reach, lan) = shipped(name), INTENT[name]
    zone = zone_map(p)
    steps = plan(p, zone)
    world.clear_dns_log()
    with names_in_world(world, zone):
        results = run_plan(world, name, steps, {"NSFW_PROFILE_PATH": empty_path})
    seen = [observed(code, text, s) for (code, text), s in zip(results, steps, strict=True)]
    wrong = [f"  {' '.join(s.argv)}: expected {s.expect}, got {got} ({text})"
             for s, got, (_c, text) in zip(steps, seen, results, strict=True) if got != s.expect]
    assert not wrong, f"{name}: the sandbox does not do what the profile says:\n" + "\n".join(wrong)

    # INTENT, on what the kernel did: these hold whatever the profile's rules say
    by_role: dict[str, list[str]] = {}
    for s, got in zip(steps, seen, strict=True):
        by_role.setdefault(s.role, []).append(got)
    assert by_role["host"] == ["blocked"], f"{name}: this machine's services must stay closed"
    if lan:
        assert any(o != "blocked" for o in by_role["lan"]), f"{name}: meant to reach the home network"
    else:
        assert set(by_role["lan"]) == {"blocked"}, f"{name}: the home network must be blocked: {by_role['lan']}"
    if reach == "none":
        assert set(seen) <= {"blocked", "fails", "slept"}, f"{name}: an offline profile reached something"
    elif reach == "closed":
        assert by_role["unlisted"][0] == "nxdomain", f"{name}: a name nobody allows must be refused"
        assert set(by_role["internet"]) == {"blocked"}, f"{name}: meant to reach only what it names"
        assert not any(UNLISTED in q for q in world.dns_log()), f"{name}: a refused name left the sandbox"
    else:
        assert by_role["unlisted"][0] == "resolves", f"{name}: meant to have the internet open"
        assert any(o != "blocked" for o in by_role["internet"]), f"{name}: meant to reach the internet"
    if any(r.kind == "host" for r in p.allow):
        assert "reached" in by_role["name"], f"{name}: none of its names reached its service"


# ---------------------------------------------------------------------------------------------- overriding


def user_dir(profile_dir: Path, **files: str) -> str:
    for name, text in files.items():
        write_profile(profile_dir, name.replace("_", "-"), text)
    return str(profile_dir)


def test_user_profile_of_the_same_name_extends_the_shipped_one(world: Any, profile_dir: Path,
                                                                 no_trace: None) -> None:
    """~/.config/nsfw/profiles/bitwarden.yaml includes the shipped bitwarden and adds a self-hosted vault."""
    path = user_dir(profile_dir, bitwarden="""\
        # my Vaultwarden, besides Bitwarden's cloud
        include: [bitwarden]
        allow:
          - {host: vault.example.net, ports: [443], proto: tcp}
        """)
    p = npf.load("bitwarden", npf.search_path({"NSFW_PROFILE_PATH": path}, "/nonexistent"))
    assert p.files == (str(SHIPPED / "base-service.yaml"), str(SHIPPED / "bitwarden.yaml"),
                       str(profile_dir / "bitwarden.yaml"))
    assert p.allow[:-1] == shipped("bitwarden").allow and p.deny == shipped("bitwarden").deny
    zone = {"vault.example.net": {"A": ["198.51.100.20"]}, "probe.bitwarden.com": {"A": ["192.0.2.10"]}}
    steps = [Step(("tcp", CONTROL, "443"), "blocked", ""), Step(("tcpname", "vault.example.net", "443"), "reached", ""),
             Step(("tcpname", "probe.bitwarden.com", "443"), "reached", ""),
             Step(("tcp", LAN4, "443"), "blocked", ""), Step(("resolve", UNLISTED), "nxdomain", "")]
    with names_in_world(world, {**zone, UNLISTED: {"A": [CONTROL]}}):
        results = run_plan(world, "bitwarden", steps, {"NSFW_PROFILE_PATH": path})
    assert [observed(c, t, s) for (c, t), s in zip(results, steps, strict=True)] == [s.expect for s in steps], results


def test_remove_narrows_a_shipped_profile_to_ones_own_server(world: Any, profile_dir: Path,
                                                              no_trace: None) -> None:
    """The cookbook's nextcloud: drop the shipped HTTPS-everywhere rule, allow one server by name."""
    path = user_dir(profile_dir, nextcloud="""\
        include: [nextcloud]
        remove:
          allow:
            - {zone: any, ports: [80, 443], proto: tcp}   # spelt in another order than the shipped rule
        allow:
          - {host: cloud.example.net, ports: [443], proto: tcp}
        deny:
          - lan
        """)
    p = npf.load("nextcloud", npf.search_path({"NSFW_PROFILE_PATH": path}, "/nonexistent"))
    assert [r.value for r in p.allow] == ["cloud.example.net"] and not open_names(p)
    steps = [Step(("tcp", CONTROL, "443"), "blocked", ""), Step(("tcp", LAN4, "443"), "blocked", ""),
             Step(("tcpname", "cloud.example.net", "443"), "reached", ""),
             Step(("tcp", "192.0.2.11", "80"), "blocked", ""), Step(("resolve", UNLISTED), "nxdomain", "")]
    with names_in_world(world, {"cloud.example.net": {"A": ["192.0.2.11"]}, UNLISTED: {"A": [CONTROL]}}):
        results = run_plan(world, "nextcloud", steps, {"NSFW_PROFILE_PATH": path})
    assert [observed(c, t, s) for (c, t), s in zip(results, steps, strict=True)] == [s.expect for s in steps], results


def test_remove_opens_one_device_at_home_for_a_browser(world: Any, profile_dir: Path, no_trace: None) -> None:
    """The cookbook's router page: firefox without its inherited `deny: [lan]`, plus one device and port."""
    path = user_dir(profile_dir, firefox="""\
        include: [firefox]
        remove:
          deny: [lan]            # inherited from base-browser
        allow:
          - {cidr: 10.77.0.10/32, ports: [80], proto: tcp}   # the router's admin page, and nothing else at home
        """)
    steps = [Step(("tcp", LAN4, "80"), "reached", ""), Step(("tcp", LAN4, "443"), "blocked", ""),
             Step(("tcp", LAN4, "22"), "blocked", ""), Step(("tcp", CONTROL, "443"), "reached", ""),
             Step(("resolve", "incoming.telemetry.mozilla.org"), "nxdomain", "")]  # the rest still holds
    with names_in_world(world, {"incoming.telemetry.mozilla.org": {"A": [DENIED_ADDR]}}):
        results = run_plan(world, "firefox", steps, {"NSFW_PROFILE_PATH": path})
    assert [observed(c, t, s) for (c, t), s in zip(results, steps, strict=True)] == [s.expect for s in steps], results


def test_remove_that_matches_nothing_is_an_error_naming_the_key(profile_dir: Path) -> None:
    path = user_dir(profile_dir, firefox="""\
        include: [firefox]
        remove:
          allow: [lan]           # firefox never allowed the LAN: a mistake, not a no-op
          deny:
            - incoming.telemetry.mozilla.org
        """)
    done = nsfw("check", "firefox", path=path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{profile_dir}/firefox.yaml" in lines[0] and "remove.allow[0] (line 3)" in lines[0], lines[0]
    assert "removes a rule that no included profile has in allow:" in lines[0], lines[0]


def test_remove_matches_what_a_rule_means_not_how_it_is_written(profile_dir: Path) -> None:
    path = user_dir(profile_dir, signal_desktop="""\
        # never calls: no UDP at all
        include: [signal-desktop]
        remove:
          allow:
            - {proto: UDP, zone: Internet}
        """)
    p = npf.load("signal-desktop", npf.search_path({"NSFW_PROFILE_PATH": path}, "/nonexistent"))
    assert [r.value for r in p.allow] == ["*.signal.org"] and not open_names(p)
    assert nsfw("check", "signal-desktop", path=path).returncode == 0


def test_same_name_without_include_replaces_the_shipped_profile(profile_dir: Path) -> None:
    path = user_dir(profile_dir, spotify="include: [base-offline]\n")
    p = npf.load("spotify", npf.search_path({"NSFW_PROFILE_PATH": path}, "/nonexistent"))
    assert p.network == "none" and not p.allow and not p.deny and str(SHIPPED / "spotify.yaml") not in p.files
    mine, offline = nsfw("rules", "spotify", path=path), nsfw("rules", "offline", path=path)
    def ruleset(text: str) -> str:  # the header names the profile; the rules themselves must be the same
        return "".join(line for line in text.splitlines(True) if not line.startswith("#"))

    assert mine.returncode == 0 and ruleset(mine.stdout) == ruleset(offline.stdout)


def test_includes_of_the_own_name_chain_down_the_search_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    """user -> admin (/etc in real life) -> shipped: each `include: [firefox]` reaches the next firefox down."""
    user, admin = tmp_path_factory.mktemp("user"), tmp_path_factory.mktemp("admin")
    (admin / "firefox.yaml").write_text("include: [firefox]\nallow: [{cidr: 192.0.2.1/32, ports: [3128]}]\n")
    (user / "firefox.yaml").write_text("include: [firefox]\nremove: {deny: [incoming.telemetry.mozilla.org]}\n")
    dirs = npf.search_path({"NSFW_PROFILE_PATH": f"{user}:{admin}"}, "/nonexistent")
    p = npf.load("firefox", dirs)
    assert p.files[-3:] == (str(SHIPPED / "firefox.yaml"), str(admin / "firefox.yaml"), str(user / "firefox.yaml"))
    assert p.allow[-1].value == "192.0.2.1/32" and p.deny == shipped("base-browser").deny


def test_a_users_base_profile_changes_every_profile_built_on_it(profile_dir: Path) -> None:
    """Shadowing a base is how to change every app at once: spotify, bitwarden... include base-service."""
    path = user_dir(profile_dir, base_service="include: [base-service]\ndeny: [203.0.113.0/24]\n")
    dirs = npf.search_path({"NSFW_PROFILE_PATH": path}, "/nonexistent")
    for app in ("spotify", "bitwarden", "git"):
        assert "203.0.113.0/24" in [r.value for r in npf.load(app, dirs).deny], app
