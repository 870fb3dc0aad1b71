"""Names inside the sandbox: its own resolver, and domain rules enforced at the IP level, in the simulated world.

The world's DNS server (192.0.2.53 and friends) holds allowed.test, other.test, cdn.test, short.test (TTL 2),
rebind.test (a LAN address), multi.test (two addresses), chain.test (a CNAME chain), v6only.test, *.wild.test,
and logs every query that reaches it, so a test can prove that a refused name never left the sandbox's resolver.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .sandbox import NSFW, PY, REACHED, baseline, profile_dir, run, snapshot_diff, write_profile

__all__ = ["baseline", "profile_dir", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")


def steps(world: Any, profile: str, *probes: tuple[Any, ...], env: dict[str, str] | None = None,
          prefix: str = "") -> list[tuple[int, str]]:
    """Several probes, in order, from inside ONE sandbox (grants are per sandbox): [(exit code, output)]."""
    script = prefix + "".join(f"{shlex.join(world.probe_argv(*map(str, p)))} 2>&1; echo \"@@ $?\"; " for p in probes)
    done = run(world, profile, "sh", "-c", script, env=env)
    out: list[tuple[int, str]] = []
    lines: list[str] = []
    for line in done.stdout.splitlines():
        if line.startswith("@@ "):
            out.append((int(line[3:]), "\n".join(lines).strip()))
            lines = []
        else:
            lines.append(line)
    assert len(out) == len(probes), done.stdout + done.stderr
    return out


def codes(results: list[tuple[int, str]]) -> list[int]:
    return [c for c, _ in results]


@pytest.fixture
def names(profile_dir: Path) -> str:
    return write_profile(profile_dir, "names", """\
        allow:
          - allowed.test
          - {host: "*.wild.test", ports: [80], proto: tcp}
          - chain.test
          - multi.test
          - v6only.test
          - short.test
          - rebind.test
        deny:
          - lan
        """)


# ---------------------------------------------------------------------------------------------- what it sees


def test_the_sandbox_uses_its_own_resolver(world: Any, names: str) -> None:
    done = run(world, names, "sh", "-c", "cat /etc/resolv.conf; grep '^hosts' /etc/nsswitch.conf; ip -4 route")
    ns = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("nameserver")]
    gw = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("default")]
    assert ns == gw and ns[0].startswith("10.213."), done.stdout


def test_allowed_name_opens_its_addresses_and_nothing_else(world: Any, names: str) -> None:
    world.clear_dns_log()
    res = steps(world, names,
                ("tcp", "192.0.2.10", 80),        # before the lookup: not yet granted
                ("resolve", "allowed.test"),
                ("tcp", "192.0.2.10", 80),        # now it is
                ("tcp", "2001:db8::10", 443),     # its AAAA too
                ("tcpname", "allowed.test", 443),
                ("tcp", "192.0.2.11", 80),        # another address of the same network: no
                ("resolve", "other.test"))        # a name no rule allows
    assert codes(res) == [3, 0, 0, 0, 0, 3, 1], res
    assert res[1][1] == "192.0.2.10 2001:db8::10"
    assert not any("other.test" in q for q in world.dns_log()), "a refused name must never leave the resolver"


def test_wildcard_names_with_ports(world: Any, names: str) -> None:
    res = steps(world, names, ("tcpname", "a.b.wild.test", 80), ("tcp", "192.0.2.11", 443),
                ("resolve", "wild.test"))
    assert codes(res) == [0, 3, 1], res  # any depth of subdomain; only the rule's port; not the apex


def test_cname_chains_multiple_addresses_and_ipv6(world: Any, names: str) -> None:
    res = steps(world, names, ("resolve", "chain.test"), ("tcp", "203.0.113.30", 22), ("tcp", "2001:db8::20", 22),
                ("resolve", "multi.test"), ("tcp", "192.0.2.10", 443), ("tcp", "198.51.100.20", 443),
                ("resolve", "v6only.test"))
    assert codes(res) == [0, 0, 0, 0, 0, 0, 0], res


def test_dns_rebinding_opens_nothing_in_a_denied_zone(world: Any, names: str) -> None:
    res = steps(world, names, ("resolve", "rebind.test"), ("tcp", "10.77.0.10", 80))
    assert res[0] == (0, "10.77.0.10") and res[1][0] == 3, res


def test_name_pointing_at_the_host_opens_nothing(world: Any, profile_dir: Path) -> None:
    before = dict(world.zone)
    world.set_zone({**before, "sneaky.test": {"A": ["198.18.0.2"]}})
    try:
        p = write_profile(profile_dir, "sneaky", "allow: [sneaky.test]\n")
        res = steps(world, p, ("resolve", "sneaky.test"), ("tcp", "198.18.0.2", 631))
        assert res[0][0] == 0 and res[1][0] == 3, res
    finally:
        world.set_zone(before)


def test_unlisted_names_resolve_only_where_the_internet_is_open(world: Any, profile_dir: Path) -> None:
    world.clear_dns_log()
    open_ = steps(world, "default", ("resolve", "cdn.test"), ("tcpname", "cdn.test", 443))
    assert codes(open_) == [0, 0], open_
    closed = write_profile(profile_dir, "closed", "allow: [{cidr: 203.0.113.0/24}]\n")
    res = steps(world, closed, ("resolve", "made-up-secret.cdn.test"))
    assert codes(res) == [1]
    assert not any("made-up-secret" in q for q in world.dns_log())


def test_denied_names_and_their_addresses(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "noother", "allow: [internet]\ndeny: [other.test]\n")
    res = steps(world, p, ("tcp", "198.51.100.20", 80), ("resolve", "other.test"), ("tcp", "198.51.100.20", 80),
                ("tcp", "192.0.2.10", 80))
    # reachable by address until the name is known; refused by name; then its addresses are blocked too
    assert codes(res) == [0, 1, 3, 0], res


def test_every_dns_packet_goes_to_the_sandbox_resolver(world: Any, names: str) -> None:
    world.clear_dns_log()
    res = steps(world, names, ("dns", "other.test", "203.0.113.53"), ("dns", "allowed.test", "198.51.100.20"),
                ("query", "other.test", "A", "2001:db8::53", "tcp"), ("tcp", "192.0.2.10", 80))
    assert codes(res) == [1, 0, 1, 0], res  # answered by policy, whatever server was asked, UDP or TCP
    assert not any("other.test" in q for q in world.dns_log())


def test_dns_over_tls_is_ordinary_traffic(world: Any, names: str, profile_dir: Path) -> None:
    assert codes(steps(world, names, ("tcp", "203.0.113.53", 853))) == [3]
    dot = write_profile(profile_dir, "dot", "allow: [{cidr: 203.0.113.53, ports: [853], proto: tcp}]\n")
    assert codes(steps(world, dot, ("tcp", "203.0.113.53", 853))) == [0]


def test_none_sandbox_fails_names_at_once(world: Any) -> None:
    start = time.monotonic()
    res = steps(world, "offline", ("resolve", "allowed.test"))
    assert res[0][0] != REACHED
    assert time.monotonic() - start < 2.0, "with no network, a lookup must fail at once, not time out"


# ---------------------------------------------------------------------------------------------- the kernel side


@contextmanager
def live(world: Any, profile: str,
         script: str = "echo ready; read _") -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A sandbox that stays up while the test looks at it from the host side."""
    proc = world.popen([NSFW, "run", "-p", profile, "--", "sh", "-c", script],
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        listing = world.run(["sh", "-c", "cat /run/nsfw/sandboxes/*.json"]).stdout
        records = [json.loads(chunk) for chunk in listing.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
        yield proc, records[-1]
    finally:
        if proc.poll() is None:
            try:
                proc.communicate(input="\n", timeout=30)
            except ValueError:  # the test already talked to it
                proc.wait(timeout=30)


def grant_set(world: Any, record: dict[str, Any], name: str) -> list[dict[str, Any]]:
    done = world.run(["ip", "netns", "exec", record["netns"], "nft", "-j", "list", "set", "inet", "nsfw", name])
    sets = [x["set"] for x in json.loads(done.stdout)["nftables"] if "set" in x]
    return [e["elem"] for e in sets[0].get("elem", [])]


def test_grant_timeouts_follow_ttls_and_later_answers_refresh_them(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "short", "allow: [short.test]\n")
    look = shlex.join(world.probe_argv("resolve", "short.test"))
    script = f"echo ready; {look} >/dev/null; echo looked; read _; {look} >/dev/null; echo again; read _"
    with live(world, p, script) as (proc, record):
        assert proc.stdout is not None and proc.stdout.readline().strip() == "looked"
        first = {e["val"]: e for e in grant_set(world, record, "dns4_0")}["192.0.2.12"]
        # never shorter than the record's TTL (2 s), nor than the minute apps keep an address
        assert first["timeout"] >= 60
        time.sleep(2.5)
        aged = {e["val"]: e for e in grant_set(world, record, "dns4_0")}["192.0.2.12"]["expires"]
        assert aged <= first["expires"] - 2
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "again"
        refreshed = {e["val"]: e for e in grant_set(world, record, "dns4_0")}["192.0.2.12"]["expires"]
        assert refreshed >= aged + 2  # the later answer (from the resolver's cache or upstream) renewed it


def test_sandboxes_never_share_grants(world: Any, names: str, profile_dir: Path) -> None:
    other = write_profile(profile_dir, "other", "allow: [other.test]\n")
    script = f"echo ready; {shlex.join(world.probe_argv('resolve', 'allowed.test'))} >/dev/null; echo looked; read _"
    with live(world, names, script) as (proc, _record):
        assert proc.stdout is not None and proc.stdout.readline().strip() == "looked"
        assert codes(steps(world, other, ("tcp", "192.0.2.10", 80))) == [3]


def test_resolver_runs_as_nobody_and_its_death_closes_names(world: Any, names: str) -> None:
    script = ("echo ready; read _; " + shlex.join(world.probe_argv("resolve", "allowed.test")) +
              "; echo \"@@ $?\"; " + shlex.join(world.probe_argv("tcp", "192.0.2.11", 80)) + "; echo \"@@ $?\"")
    with live(world, names, script) as (proc, record):
        sup = record["keeper_pid"]  # the resolver is the keeper's child
        kids = world.run(["pgrep", "-P", str(sup)]).stdout.split()
        resolvers = [k for k in kids if "Uid:\t65534" in world.run(["cat", f"/proc/{k}/status"]).stdout]
        assert len(resolvers) == 1, kids
        status = world.run(["cat", f"/proc/{resolvers[0]}/status"]).stdout
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
        world.run(["kill", "-KILL", resolvers[0]])
        time.sleep(0.2)
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, _err = proc.communicate(timeout=30)
    rcs = [line for line in out.splitlines() if line.startswith("@@")]
    assert rcs[0] != "@@ 0", out  # names stop resolving...
    assert rcs[1] == "@@ 3", out  # ...and nothing else changes: the rules still hold


def test_query_log(world: Any, names: str) -> None:
    script = f"echo ready; {shlex.join(world.probe_argv('resolve', 'allowed.test'))}; " \
             f"{shlex.join(world.probe_argv('resolve', 'nope.test'))}; echo done; read _"
    with live(world, names, script) as (proc, record):
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != "done":
            pass
        log = world.run(["cat", f"/run/nsfw/sandboxes/{record['id']}/dns.log"]).stdout
    entries = [json.loads(line) for line in log.splitlines()]
    allowed = [e for e in entries if e["name"] == "allowed.test" and e["type"] == "A"]
    assert allowed and allowed[0]["verdict"] == "allow" and "192.0.2.10" in allowed[0]["answers"]
    nope = [e for e in entries if e["name"] == "nope.test"]
    assert nope and nope[0]["verdict"] == "refuse" and nope[0]["rcode"] == "NXDOMAIN"


GARBAGE = """
import os, random, socket, sys
r = random.Random(7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
gw = sys.argv[1]
for i in range(3000):
    n = r.randrange(0, 600)
    s.sendto(bytes(r.randrange(256) for _ in range(n)), (gw, 53))
# a compression loop and an oversize label
s.sendto(bytes.fromhex("1234010000010000000000000c0c0001") , (gw, 53))
s.sendto(bytes.fromhex("123401000001000000000000") + b"\\x40" + b"a" * 64 + b"\\x00\\x00\\x01\\x00\\x01", (gw, 53))
print("sent")
"""


def test_garbage_and_floods_neither_crash_nor_open(world: Any, names: str) -> None:
    gw = "$(ip -4 route show default | cut -d' ' -f3)"
    prefix = f"{PY} -c {shlex.quote(GARBAGE)} {gw}; "
    res = steps(world, names, ("tcp", "192.0.2.10", 80), ("resolve", "allowed.test"), ("tcp", "192.0.2.10", 80),
                prefix=prefix)
    assert codes(res) == [3, 0, 0], res


# ---------------------------------------------------------------------------------------------- the host's resolver


FORWARDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.53", 53))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("192.0.2.53", 53))
u.settimeout(2)
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(4096)
    open("/run/world/stub.log", "a").write("q\\n")
    u.send(q)
    try:
        s.sendto(u.recv(4096), peer)
    except OSError:
        pass
"""


def test_host_on_systemd_resolved(world: Any, names: str, tmp_path: Path) -> None:
    """The host's resolv.conf is a symlink to resolved's stub (127.0.0.53), hosts: uses `resolve`, and
    resolved's and nscd's sockets exist: the sandbox resolves through its own resolver, via the stub."""
    etc = tmp_path / "etc"
    stub = world.popen([PY, "-c", FORWARDER], stdout=subprocess.PIPE, text=True)
    try:
        assert stub.stdout is not None and stub.stdout.readline().strip() == "ready"
        setup = f"""
            set -e
            cp -a /etc {etc}
            rm {etc}/resolv.conf
            ln -s /run/systemd/resolve/stub-resolv.conf {etc}/resolv.conf
            sed -i 's/^hosts:.*/hosts: files mymachines resolve [!UNAVAIL=return] myhostname dns/' {etc}/nsswitch.conf
            mkdir -p /run/systemd/resolve /run/nscd
            printf 'nameserver 127.0.0.53\\noptions edns0 trust-ad\\nsearch example.invalid\\n' \
                > /run/systemd/resolve/stub-resolv.conf
            {PY} -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind("/run/systemd/resolve/io.systemd.Resolve")'
            {PY} -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind("/run/nscd/socket")'
            mount --bind {etc} /etc
            {NSFW} run -p {names} -- sh -c '
                cat /etc/resolv.conf; grep "^hosts" /etc/nsswitch.conf
                ls /run/systemd/resolve /run/nscd; echo listed
                {shlex.join(world.probe_argv("tcpname", "allowed.test", 80))}'
        """
        done = world.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup])
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "nameserver 10.213." in out and "127.0.0.53" not in out
        assert "search example.invalid" in out  # the host's search domains are kept
        assert "hosts: files myhostname dns" in out
        assert "io.systemd.Resolve" not in out and "socket" not in out.split("listed")[0]
        assert "open world inet 192.0.2.10 80" in out
        assert world.run(["cat", "/run/world/stub.log"]).stdout.count("q") >= 1  # upstream was the host's stub
    finally:
        stub.kill()
        stub.wait()
        world.run(["rm", "-rf", "/run/systemd", "/run/nscd", "/run/world/stub.log"])
