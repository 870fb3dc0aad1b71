"""The simulated world itself: its map, servers, DNS, probe, snapshot and clean-up.

Every other integration test stands on these facts, so each is checked with real packets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nsfw import world as worldmod
from nsfw.world import (
    BLOCKED,
    DEFAULT_ZONE,
    HOST_TCP_PORTS,
    HOST_UDP_PORTS,
    INET,
    INET_ADDRS,
    LAN,
    PYTHON,
    REACHED,
    REFUSED,
    TCP_PORTS,
    TIMEOUT,
    UDP_PORTS,
    USAGE,
    ProbeResult,
    World,
    WorldError,
)

from ..conftest import LocalUser

ROOT = Path(__file__).resolve().parents[2]
WORLD_PY = str(ROOT / "nsfw" / "world.py")
Probe = Callable[..., ProbeResult]

# Connect or send from a chosen source address, as a sandbox's forwarded packet would arrive at the inet side.
BOUND_PROBE = """
import socket, sys
src, dst, port, proto, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET,
                  socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.settimeout(timeout)
s.bind((src, 0))
try:
    s.connect((dst, port))
    if proto == "udp":
        s.send(b"ping\\n")
    print("open", s.recv(4096).decode().strip())
except TimeoutError:
    print("timeout")
"""

# Every server of every inet address in one process: a probe per port would cost a Python start-up each.
ALL_SERVERS = """
import json, socket, sys
addrs, tcp, udp = json.loads(sys.argv[1])
out = {}
for a in addrs:
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    for proto, ports in (("tcp", tcp), ("udp", udp)):
        for p in ports:
            s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
            s.settimeout(2)
            try:
                s.connect((a, p))
                if proto == "udp":
                    s.send(b"x")
                out[f"{proto} {a} {p}"] = s.recv(4096).decode().strip()
            except OSError as e:
                out[f"{proto} {a} {p}"] = repr(e)
            finally:
                s.close()
print(json.dumps(out))
"""

# Malformed DNS over UDP and TCP; the server must answer what deserves an answer and survive the rest.
GARBAGE = r"""
import json, random, socket, struct
random.seed(7)
SERVER = ("192.0.2.53", 53)
Q = b"\x07allowed\x04test\x00" + struct.pack("!HH", 1, 1)

def udp(payload, wait=0.3):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(wait)
    s.connect(SERVER)
    s.send(payload)
    try:
        r = s.recv(65536)
    except (TimeoutError, ConnectionRefusedError):
        return None
    finally:
        s.close()
    return {"rcode": r[3] & 0xF, "tc": bool(r[2] & 2), "an": struct.unpack("!H", r[6:8])[0],
            "ar": struct.unpack("!H", r[10:12])[0], "opt": r[-11:-8] == b"\x00\x00\x29"}

def hdr(flags=0x0100, qd=1, ar=0):
    return struct.pack("!6H", 0x4242, flags, qd, 0, 0, ar)

out = {
    "empty": udp(b""),
    "short": udp(b"\x12\x34\x01"),
    "response": udp(hdr(flags=0x8000) + Q),
    "two_questions": udp(hdr(qd=2) + Q + Q),
    "status_opcode": udp(hdr(flags=0x1000) + Q),
    "label_overrun": udp(hdr() + b"\x3fabc"),
    "pointer_in_question": udp(hdr() + b"\xc0\x0c" + struct.pack("!HH", 1, 1)),
    "no_type": udp(hdr() + b"\x07allowed\x04test\x00"),
    "chaos_class": udp(hdr() + b"\x07allowed\x04test\x00" + struct.pack("!HH", 1, 3)),
    "edns": udp(hdr(ar=1) + Q + b"\x00" + struct.pack("!HHIH", 41, 4096, 0, 0)),
    "broken_edns": udp(hdr(ar=3) + Q + b"\xff\xff"),
}
fuzz = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fuzz.connect(SERVER)
for _ in range(300):
    fuzz.send(bytes(random.getrandbits(8) for _ in range(random.randrange(0, 80))))
fuzz.close()
for junk in (b"\xff\xff", b"\x00\x05abc", b"\x00\x03\x00\x00\x00", b"\x00\x00"):
    t = socket.create_connection(SERVER, timeout=1)
    t.sendall(junk)
    t.close()
for _ in range(5):  # as any resolver would: ask again (the flood may still be queued)
    out["after"] = udp(hdr() + Q, wait=1)
    if out["after"]:
        break
print(json.dumps(out))
"""


def machine_state() -> dict[str, str]:
    """The machine's own network state, as the hard rule names it (lifetimes and expiries blanked)."""
    cmds = {
        "links": ["ip", "-o", "link"],
        "addrs": ["ip", "-o", "addr"],
        "netns": ["ip", "netns", "list"],
        "routes4": ["ip", "route", "show", "table", "all"],
        "routes6": ["ip", "-6", "route", "show", "table", "all"],
        "veths": ["ip", "-o", "link", "show", "type", "veth"],
        "nft": ["nft", "list", "ruleset"],
    }
    state = {}
    for key, argv in cmds.items():
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        state[key] = re.sub(r"(valid_lft|preferred_lft|expires) \S+", r"\1", done.stdout + done.stderr)
    for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
        state[key] = Path(f"/proc/sys/net/{key}").read_text()
    state["resolv.conf"] = Path("/etc/resolv.conf").read_text()
    state["run"] = " ".join(sorted(os.listdir("/run")))
    return state


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status  # a zombie holds no namespace and runs nothing


def wait_until(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def bound(world: World, src: str, dst: str, port: int, proto: str = "tcp", timeout: float = 0.5) -> str:
    done = world.run([PYTHON, "-c", BOUND_PROBE, src, dst, str(port), proto, str(timeout)])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# ------------------------------------------------------------------------------------------------ the map


def test_world_has_namespaces_of_its_own(world: World) -> None:
    for kind in ("net", "mnt"):
        ours = os.stat(f"/proc/self/ns/{kind}").st_ino
        assert os.stat(f"/proc/{world.pid}/ns/{kind}").st_ino != ours
        inside = world.run(["stat", "-L", "-c", "%i", f"/proc/self/ns/{kind}"]).stdout.strip()
        assert inside == str(os.stat(f"/proc/{world.pid}/ns/{kind}").st_ino)


def test_host_layout(fresh_world: World) -> None:
    # a world of its own: the session's world carries what earlier tests legitimately left (nsfw's lock file)
    world = fresh_world
    snap = world.snapshot()
    assert snap["netns"] == [INET, LAN]
    links = {link["name"]: link for link in snap["links"]}
    assert set(links) == {"lo", "uplink0", "lan0"}
    assert links["uplink0"]["kind"] == links["lan0"]["kind"] == "veth"
    assert all(link["up"] for link in links.values())
    assert {"198.18.0.2/24", "2001:db8:ff::2/64"} <= set(links["uplink0"]["addresses"])
    assert {"10.77.0.1/24", "fd77::1/64"} <= set(links["lan0"]["addresses"])
    defaults = {(fam, r.get("gateway")) for fam, rows in snap["routes"].items() for r in rows if r["dst"] == "default"}
    assert defaults == {("4", "198.18.0.1"), ("6", "2001:db8:ff::1")}
    assert set(snap["sysctl"].values()) == {"0"}  # not a router until nsfw makes it one
    assert snap["nft"] == []
    assert snap["run_nsfw"] == []
    assert snap["processes"] == []
    assert {"/run", "/run/netns/inet", "/run/netns/lan", "/etc/resolv.conf"} <= set(snap["mounts"])
    assert world.run(["cat", "/etc/resolv.conf"]).stdout == "nameserver 192.0.2.53\n"


def test_inet_and_lan_route_only_their_own_link(world: World) -> None:
    inet_routes = world.run(["ip", "-o", "route"], ns=INET).stdout
    assert "default" not in inet_routes and "198.18.0.0/24" in inet_routes
    lan_routes = world.run(["ip", "-o", "-6", "route"], ns=LAN).stdout
    assert "default" not in lan_routes and "fd77::/64" in lan_routes
    assert world.probe("tcp", "192.0.2.10", 80, ns=LAN).out == "blocked ENETUNREACH"
    assert world.probe("tcp", "10.77.0.10", 80, ns=INET).code == BLOCKED


# ------------------------------------------------------------------------------------------------ servers


def test_every_inet_server_answers_from_the_asked_address(world: World) -> None:
    tcp = [p for p in TCP_PORTS if p != 53]
    udp = [p for p in UDP_PORTS if p != 53]
    done = world.run([PYTHON, "-c", ALL_SERVERS, json.dumps([INET_ADDRS, tcp, udp])])
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    for addr in INET_ADDRS:
        peer = "2001:db8:ff::2" if ":" in addr else "198.18.0.2"
        for proto, ports in (("tcp", tcp), ("udp", udp)):
            for port in ports:
                assert answers[f"{proto} {addr} {port}"] == f"world inet {addr} {port} {proto} from {peer}"


@pytest.mark.parametrize(("proto", "addr", "port"), [
    ("tcp", "192.0.2.10", 80), ("udp", "203.0.113.30", 9999), ("tcp", "2001:db8::10", 443),
    ("udp", "2001:db8::20", 123),
])
def test_inet_answers_nothing_that_is_not_natted(world: World, proto: str, addr: str, port: int) -> None:
    # From the lan0 address the packet still leaves by the default route, but inet has no route back to it.
    src = "fd77::1" if ":" in addr else "10.77.0.1"
    assert bound(world, src, addr, port, proto) == "timeout"


def test_nat_on_the_host_is_what_gets_an_answer(fresh_world: World) -> None:
    rules = "table inet worldtest {\n chain post {\n type nat hook postrouting priority srcnat\n" \
            " oifname uplink0 masquerade\n }\n}\n"
    assert fresh_world.run(["nft", "-f", "-"], input=rules).returncode == 0
    assert bound(fresh_world, "10.77.0.1", "192.0.2.10", 80) == "open world inet 192.0.2.10 80 tcp from 198.18.0.2"
    assert bound(fresh_world, "fd77::1", "2001:db8::10", 9999, "udp") == \
        "open world inet 2001:db8::10 9999 udp from 2001:db8:ff::2"


@pytest.mark.parametrize(("proto", "addr", "port"), [
    ("tcp", "10.77.0.10", 22), ("tcp", "fd77::10", 8080), ("udp", "10.77.0.10", 123), ("udp", "fd77::10", 443),
])
def test_lan_is_reached_directly(probe: Probe, proto: str, addr: str, port: int) -> None:
    peer = "fd77::1" if ":" in addr else "10.77.0.1"
    r = probe(proto, addr, port)
    assert (r.code, r.out) == (REACHED, f"open world lan {addr} {port} {proto} from {peer}")


def test_closed_ports_are_refused(probe: Probe) -> None:
    assert (probe("tcp", "192.0.2.10", 81).code, probe("tcp", "192.0.2.10", 81).out) == (REFUSED, "refused")
    assert probe("udp", "192.0.2.10", 5000).out == "refused"
    assert probe("tcp", "fd77::10", 81).out == "refused"


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1", "198.18.0.2", "2001:db8:ff::2", "10.77.0.1", "fd77::1"])
def test_host_services_answer_on_every_address(probe: Probe, addr: str) -> None:
    for port in HOST_TCP_PORTS:
        assert probe("tcp", addr, port).out == f"open world host {addr} {port} tcp from {addr}"
    for port in HOST_UDP_PORTS:
        assert probe("udp", addr, port).out == f"open world host {addr} {port} udp from {addr}"


def test_host_services_are_reached_from_the_lan(world: World) -> None:
    r = world.probe("tcp", "10.77.0.1", 631, ns=LAN)
    assert r.out == "open world host 10.77.0.1 631 tcp from 10.77.0.10"


def test_http_client_gets_banner_echo_and_eof(world: World) -> None:
    script = ("import socket; s = socket.create_connection(('192.0.2.10', 80), timeout=2); "
              "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); data = b''\n"
              "while chunk := s.recv(4096): data += chunk\n"
              "print(data.decode())")
    out = world.run([PYTHON, "-c", script]).stdout
    assert out.startswith("world inet 192.0.2.10 80 tcp from 198.18.0.2\nGET / HTTP/1.0")


# ------------------------------------------------------------------------------------------------ DNS


def test_dns_a_and_aaaa(probe: Probe) -> None:
    assert probe("dns", "allowed.test").out == "192.0.2.10 2001:db8::10"
    assert probe("dns", "multi.test").out == "192.0.2.10 198.51.100.20"
    assert probe("dns", "v6only.test").out == "2001:db8::20"
    assert probe("dns", "ALLOWED.Test.", "2001:db8::53").out == "192.0.2.10 2001:db8::10"


def test_dns_cname_chain_is_in_the_answer(probe: Probe) -> None:
    r = probe("query", "chain.test", "A")
    assert r.code == REACHED
    assert r.out.splitlines() == [
        "rcode NOERROR",
        "chain.test 30 CNAME c1.chain.test",
        "c1.chain.test 30 CNAME c2.chain.test",
        "c2.chain.test 30 A 203.0.113.30",
    ]
    assert probe("query", "chain.test", "AAAA").out.splitlines()[-1] == "c2.chain.test 30 AAAA 2001:db8::20"
    assert probe("dns", "www.cname.test").out == "198.51.100.20 2001:db8::20"


def test_dns_nxdomain(probe: Probe) -> None:
    assert (probe("dns", "nope.test").code, probe("dns", "nope.test").out) == (REFUSED, "nxdomain")
    assert probe("query", "nope.example", "AAAA").out == "rcode NXDOMAIN"
    assert probe("query", "x.allowed.test", "A").out == "rcode NXDOMAIN"


def test_dns_known_name_without_that_type_is_empty(probe: Probe) -> None:
    assert probe("query", "cdn.test", "AAAA").out == "rcode NOERROR"
    assert probe("query", "v6only.test", "A").out == "rcode NOERROR"
    assert probe("query", "wild.test", "A").out == "rcode NOERROR"  # exists: it has names below it
    assert probe("query", "test", "A").out == "rcode NOERROR"
    assert probe("dns", "cdn.test").out == "203.0.113.30"


def test_dns_wildcard(probe: Probe) -> None:
    assert probe("query", "anything.wild.test", "A").out.splitlines()[1:] == ["anything.wild.test 30 A 192.0.2.11"]
    assert probe("query", "a.b.wild.test", "A").out.splitlines()[1:] == ["a.b.wild.test 30 A 192.0.2.11"]


def test_dns_ttls(probe: Probe) -> None:
    assert probe("query", "short.test", "A").out.splitlines()[1:] == ["short.test 2 A 192.0.2.12"]
    assert probe("query", "allowed.test", "AAAA").out.splitlines()[1:] == ["allowed.test 30 AAAA 2001:db8::10"]


@pytest.mark.parametrize("server", [*INET_ADDRS, "198.18.0.1", "10.77.0.10", "fd77::10"])
def test_dns_on_every_server_address_udp_and_tcp(probe: Probe, server: str) -> None:
    for transport in ((), ("tcp",)):
        r = probe("query", "other.test", "A", server, *transport)
        assert r.out.splitlines() == ["rcode NOERROR", "other.test 30 A 198.51.100.20"], (server, transport)


def test_libc_resolver_uses_the_world_dns(probe: Probe) -> None:
    assert probe("resolve", "allowed.test").out == "192.0.2.10 2001:db8::10"
    assert probe("resolve", "chain.test").out == "2001:db8::20 203.0.113.30"
    assert probe("resolve", "nope.test").out == "nxdomain"
    assert probe("tcpname", "allowed.test", 8080).out == "open world inet 192.0.2.10 8080 tcp from 198.18.0.2"


def test_dns_log_records_every_query(world: World, probe: Probe) -> None:
    world.clear_dns_log()
    probe("dns", "allowed.test")
    probe("query", "Nope.Test", "TXT", "10.77.0.10", "tcp")
    probe("query", "chain.test", "HTTPS")
    assert world.dns_log() == ["allowed.test A", "allowed.test AAAA", "nope.test TXT", "chain.test HTTPS"]


def test_dns_survives_garbage(world: World) -> None:
    done = world.run([PYTHON, "-c", GARBAGE], timeout=60)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    for silent in ("empty", "short", "response"):
        assert out[silent] is None, silent
    for formerr in ("two_questions", "label_overrun", "pointer_in_question", "no_type"):
        assert out[formerr]["rcode"] == 1, formerr
    assert out["status_opcode"]["rcode"] == 4  # NOTIMP
    assert out["chaos_class"]["rcode"] == 5  # REFUSED
    assert out["edns"] == {"rcode": 0, "tc": False, "an": 1, "ar": 1, "opt": True}
    assert out["broken_edns"]["an"] == 1  # a broken additional section does not cost the answer
    assert out["after"]["an"] == 1
    assert not any(gone(pid) for pid in world.server_pids)


def test_zone_can_be_replaced_and_big_answers_truncate_over_udp(fresh_world: World) -> None:
    big = [f"192.0.2.{i}" for i in range(1, 61)]
    fresh_world.set_zone({**DEFAULT_ZONE, "big.test": {"A": big, "ttl": 7}, "allowed.test": {"A": ["192.0.2.99"]}})
    assert fresh_world.probe("dns", "allowed.test").out == "192.0.2.99"
    assert fresh_world.probe("query", "big.test", "A").out == "rcode NOERROR"  # truncated: no answers over UDP
    over_tcp = fresh_world.probe("query", "big.test", "A", "192.0.2.53", "tcp").out.splitlines()
    assert len(over_tcp) == 61 and over_tcp[1] == "big.test 7 A 192.0.2.1"


def test_zone_is_checked() -> None:
    bads: list[dict[str, dict[str, Any]]] = [
        {"x.test": {"A": ["2001:db8::1"]}}, {"x.test": {"CNAME": "y.test", "A": ["192.0.2.1"]}},
        {"x.test": {"MX": "y"}}, {"x..test": {}}, {"x.test": {"ttl": -1}}, {"x.test": {"A": "192.0.2.1"}},
    ]
    for bad in bads:
        with pytest.raises(ValueError):
            World(zone=bad)


def test_custom_zone_at_start(world: World) -> None:
    with World(zone={"only.test": {"AAAA": ["2001:db8::10"], "ttl": 60}}) as w:
        answer = w.probe("query", "only.test", "AAAA").out.splitlines()
        assert answer == ["rcode NOERROR", "only.test 60 AAAA 2001:db8::10"]
        assert w.probe("dns", "allowed.test").out == "nxdomain"


# ------------------------------------------------------------------------------------------------ the probe


def test_probe_runs_as_an_unprivileged_user(world: World, test_user: LocalUser) -> None:
    script = Path(world.probe_script)
    assert stat.S_IMODE(script.stat().st_mode) == 0o644
    assert stat.S_IMODE(script.parent.stat().st_mode) == 0o755
    as_user = ["setpriv", f"--reuid={test_user.uid}", f"--regid={test_user.gid}", "--init-groups"]
    done = world.run([*as_user, PYTHON, world.probe_script, "tcp", "192.0.2.10", "80"])
    assert (done.returncode, done.stdout.strip()) == (REACHED, "open world inet 192.0.2.10 80 tcp from 198.18.0.2")
    done = world.run([*as_user, *world.probe_argv("dns", "allowed.test")])
    assert done.stdout.strip() == "192.0.2.10 2001:db8::10"
    ids = world.run([*as_user, "id", "-G"]).stdout.split()
    assert sorted(map(int, ids)) == sorted(test_user.groups)


def test_probe_timeout_comes_from_the_environment(world: World) -> None:
    # inet owns no 192.0.2.200 and does not forward: a packet to it vanishes without a word
    for seconds in (0.3, 1.5):
        env = {**os.environ, "NSFW_PROBE_TIMEOUT": str(seconds)}
        t0 = time.monotonic()
        done = world.run([PYTHON, world.probe_script, "tcp", "192.0.2.200", "80"], env=env)
        took = time.monotonic() - t0
        assert (done.returncode, done.stdout.strip()) == (TIMEOUT, "timeout")
        assert seconds <= took < seconds + 1.5


def test_probe_outcomes_and_exit_codes(world: World) -> None:
    assert world.probe("tcp", "192.0.2.10", 80).code == REACHED
    assert world.probe("tcp", "192.0.2.10", 81).code == REFUSED
    assert world.probe("tcp", "10.77.0.10", 80, ns=INET).code == BLOCKED
    assert world.run([PYTHON, world.probe_script, "probe", "nonsense"]).returncode == USAGE
    assert world.run([PYTHON, world.probe_script, "tcp", "192.0.2.10"]).returncode == USAGE


def test_probe_times_out_on_silence(fresh_world: World) -> None:
    # a rule that drops replies makes the inet servers silent for the host
    rules = "table inet t {\n chain in {\n type filter hook input priority 0\n iifname uplink0 drop\n }\n}\n"
    assert fresh_world.run(["nft", "-f", "-"], input=rules).returncode == 0
    t0 = time.monotonic()
    for kind, args in (("tcp", ("192.0.2.10", 80)), ("udp", ("192.0.2.10", 9999)), ("dns", ("allowed.test",)),
                       ("resolve", ("allowed.test",))):
        r = fresh_world.probe(kind, *args, timeout=0.3)
        assert (r.code, r.out) == (TIMEOUT, "timeout"), kind
    assert time.monotonic() - t0 < 8


# ------------------------------------------------------------------------------------------------ life cycle


def test_start_is_fast(fresh_world: World) -> None:
    assert fresh_world.startup_seconds is not None
    assert fresh_world.startup_seconds < 2.0, f"start-up took {fresh_world.startup_seconds:.3f} s"


def test_machine_namespace_is_untouched() -> None:
    before = machine_state()
    with World() as w:
        assert w.probe("tcp", "192.0.2.10", 80).reached
        w.run(["nft", "add table inet scratch"])
        w.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        w.run(["ip", "netns", "add", "scratch"])
        assert machine_state() == before  # while it runs, too
    assert machine_state() == before


def test_stop_is_idempotent_and_leaves_nothing() -> None:
    w = World().start()
    pids, probe_dir = w.server_pids, Path(w.probe_script).parent
    netns = os.stat(f"/proc/{w.pid}/ns/net").st_ino
    assert len(pids) == 3 and probe_dir.is_dir()
    w.stop()
    w.stop()
    assert all(gone(pid) for pid in pids)
    assert not probe_dir.exists()
    assert not any(_holds_ns(entry, "net", netns) for entry in os.listdir("/proc") if entry.isdigit())
    with pytest.raises(WorldError):
        w.run(["true"])
    with pytest.raises(WorldError):
        _ = w.pid


def test_world_process_death_takes_everything_with_it() -> None:
    w = World().start()
    pids = w.server_pids
    inodes = {kind: os.stat(f"/proc/{w.pid}/ns/{kind}").st_ino for kind in ("net", "mnt")}
    os.kill(w.pid, signal.SIGKILL)
    assert wait_until(lambda: all(gone(pid) for pid in pids)), "server processes outlived the world process"
    for kind, inode in inodes.items():
        assert not any(_holds_ns(e, kind, inode) for e in os.listdir("/proc") if e.isdigit()), kind
    with pytest.raises(WorldError, match="died"):
        w.run(["true"])
    w.stop()
    w.stop()


def _holds_ns(pid: str, kind: str, inode: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino == inode
    except OSError:
        return False


OWNER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from nsfw.world import World
w = World().start()
print(json.dumps([w.server_pids, __import__("os").stat(f"/proc/{w.pid}/ns/net").st_ino]), flush=True)
time.sleep(60)
"""


def test_world_dies_with_its_owner() -> None:
    owner = subprocess.Popen([PYTHON, "-I", "-c", OWNER, str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pids, netns = json.loads(owner.stdout.readline())
        assert not any(gone(pid) for pid in pids)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert wait_until(lambda: all(gone(pid) for pid in pids)), "world processes outlived their owner"
    assert wait_until(lambda: not any(_holds_ns(e, "net", netns) for e in os.listdir("/proc") if e.isdigit()))


def test_snapshot_is_steady_from_the_start(fresh_world: World) -> None:
    # Tests compare snapshots taken before and after: the world must not settle (IPv6 duplicate address detection
    # ends a second or two after the links come up) or change with traffic on its own.
    first = fresh_world.snapshot()
    for addr in ("2001:db8::10", "fd77::10", "192.0.2.10", "10.77.0.10"):
        assert fresh_world.probe("tcp", addr, 80).reached
    time.sleep(2.5)
    assert fresh_world.snapshot() == first


def test_snapshot_sees_what_is_left_behind(fresh_world: World) -> None:
    w = fresh_world
    base = w.snapshot()
    changes = [
        # a named netns is a bind mount under /run/netns
        (["ip", "netns", "add", "leftover"], ["ip", "netns", "del", "leftover"], {"netns", "mounts"}),
        # a link brings its own routes (IPv6 multicast) with it
        (["ip", "link", "add", "name", "br9", "up", "type", "bridge"], ["ip", "link", "del", "br9"],
         {"links", "routes"}),
        (["ip", "route", "add", "blackhole", "203.0.113.0/24"], ["ip", "route", "del", "blackhole", "203.0.113.0/24"],
         {"routes"}),
        (["nft", "add table ip leftover"], ["nft", "delete table ip leftover"], {"nft"}),
        (["sysctl", "-qw", "net.ipv4.ip_forward=1"], ["sysctl", "-qw", "net.ipv4.ip_forward=0"], {"sysctl"}),
        (["sh", "-c", "mkdir -p /run/nsfw/sub && touch /run/nsfw/sub/rec"], ["rm", "-r", "/run/nsfw"], {"run_nsfw"}),
        (["sh", "-c", "mkdir /run/nsfw && mount -t tmpfs x /run/nsfw"],
         ["sh", "-c", "umount /run/nsfw && rmdir /run/nsfw"], {"mounts"}),
    ]
    for do, undo, keys in changes:
        assert w.run(do).returncode == 0, do
        try:
            after = w.snapshot()
            assert {k for k in base if after[k] != base[k]} == keys, do
        finally:
            assert w.run(undo).returncode == 0, undo
        assert w.snapshot() == base, f"undoing {do}"
    sleeper = w.popen(["sleep", "30"])
    try:
        assert wait_until(lambda: [p["cmdline"] for p in w.snapshot()["processes"]] == ["sleep 30"])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert w.snapshot() == base


def test_run_keeps_the_working_directory_and_env(world: World, tmp_path: Path) -> None:
    env = {"WORLD_TEST": "yes", "PATH": "/usr/bin:/bin"}
    done = world.run(["sh", "-c", "pwd; echo $WORLD_TEST"], cwd=tmp_path, env=env)
    assert done.stdout.split() == [str(tmp_path), "yes"]


# ------------------------------------------------------------------------------------------------ command line


def test_cli_runs_a_command_on_the_simulated_host() -> None:
    done = subprocess.run([PYTHON, WORLD_PY, "--", "sh", "-c", "cat /etc/resolv.conf; ip -o -4 addr show dev uplink0;"
                           f" {PYTHON} {WORLD_PY} probe tcp 192.0.2.10 80; exit 7"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 7, done.stderr
    assert "nameserver 192.0.2.53" in done.stdout and "198.18.0.2/24" in done.stdout
    assert "open world inet 192.0.2.10 80 tcp from 198.18.0.2" in done.stdout


def test_cli_info_and_help() -> None:
    done = subprocess.run([PYTHON, WORLD_PY, "info"], capture_output=True, text=True, check=True)
    info = json.loads(done.stdout)
    assert info["inet"]["addrs"] == list(INET_ADDRS)
    assert info["zone"]["chain.test"] == {"CNAME": "c1.chain.test"}
    assert worldmod.__doc__ is not None and "probe" in worldmod.__doc__
