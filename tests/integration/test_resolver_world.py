"""The sandbox resolver against the simulated world's real DNS (root: the world is namespaces).

A small script runs on the world's host: it binds the resolver to 127.0.0.1:5353 there, with the world's
resolver 192.0.2.53 upstream, a recording grant and a never_grant that refuses LAN addresses, asks its
questions, and prints what came back and what was granted. Nothing runs in the machine's own namespace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nsfw.world import PYTHON, RESOLVER, World

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import ipaddress, json, socket, sys, threading, time
sys.path.insert(0, sys.argv[1])
from nsfw import world
from nsfw.resolver import dnsmsg
from nsfw.resolver.policy import Policy
from nsfw.resolver.server import serve

PORT = 5353
LAN = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]
policy = Policy(
    allow=[("allowed.test", "dns_0"), ("chain.test", "dns_1"), ("multi.test", "dns_0"), ("v6only.test", "dns_0"),
           ("short.test", "dns_0"), ("rebind.test", "dns_0"), ("*.wild.test", "dns_2"), ("*.test", "dns_3")],
    deny=["cdn.test"], resolve_unlisted=False)
grants = []
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", PORT))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.bind(("127.0.0.1", PORT))
tcp.listen(16)
stop = threading.Event()
thread = threading.Thread(target=serve, args=([udp], [tcp]), kwargs=dict(
    policy=policy, upstreams=[sys.argv[2]], grant=lambda g: grants.extend(g), log=None, learn_denied=False,
    never_grant=lambda a: any(a in n for n in LAN), stop=stop))
thread.start()

def ask(name, qtype, proto):
    msg = dnsmsg.make_query(0x5151, dnsmsg.parse_query(
        b"\x51\x51\0\0\0\1\0\0\0\0\0\0" + world.encode_name(name) + qtype.to_bytes(2, "big") + b"\0\1").wire)
    before = len(grants)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", PORT))
        if proto == "tcp":
            s.sendall(len(msg).to_bytes(2, "big") + msg)
            data = b""
            while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
                data += s.recv(65536)
            data = data[2:]
        else:
            s.send(msg)
            data = s.recv(65536)
    r = dnsmsg.parse_response(data)
    return {"rcode": r.rcode, "answers": [[a.owner, a.rtype, a.ttl, str(a.data)] for a in r.answers],
            "grants": [list(g) for g in grants[before:]]}

results = {}
for i, line in enumerate(sys.stdin.read().split("\n")):
    if line.startswith("sleep "):
        time.sleep(float(line.split()[1]))
    elif line:
        name, qtype, proto = line.split()
        results[f"{i} {line}"] = ask(name, int(qtype), proto)
stop.set()
thread.join()
print(json.dumps(results))
"""

QUESTIONS = """chain.test 1 udp
chain.test 28 udp
multi.test 1 udp
v6only.test 28 udp
v6only.test 1 udp
short.test 1 udp
rebind.test 1 udp
deep.er.wild.test 1 udp
allowed.test 28 tcp
cdn.test 1 udp
leak-secret-1f2e3d.example 1 udp
leak-secret-4c5b6a.test.example 16 udp
sleep 2.5
short.test 1 udp
chain.test 1 udp
"""


@pytest.fixture(scope="module")
def answers(world: World) -> dict[str, dict[str, Any]]:
    world.clear_dns_log()
    done = world.run([PYTHON, "-I", "-c", SCRIPT, str(ROOT), RESOLVER], input=QUESTIONS, timeout=60)
    assert done.returncode == 0, done.stderr
    results: dict[str, dict[str, Any]] = json.loads(done.stdout)
    return {key.split(" ", 1)[1] + f" #{key.split()[0]}": value for key, value in results.items()}


def _get(answers: dict[str, dict[str, Any]], question: str, nth: int = 0) -> dict[str, Any]:
    return [v for k, v in answers.items() if k.startswith(question + " #")][nth]


def test_cname_chain_is_followed_and_granted(answers: dict[str, dict[str, Any]]) -> None:
    a = _get(answers, "chain.test 1 udp")
    assert a["rcode"] == 0
    assert [x[0] for x in a["answers"]] == ["chain.test", "c1.chain.test", "c2.chain.test"]
    # chain.test matches both its own rule and *.test; the CNAME targets are granted under the asked name's rules
    assert a["grants"] == [["dns_1", "203.0.113.30", 35], ["dns_3", "203.0.113.30", 35]]
    v6 = _get(answers, "chain.test 28 udp")
    assert v6["grants"] == [["dns_1", "2001:db8::20", 35], ["dns_3", "2001:db8::20", 35]]


def test_several_addresses_and_ipv6(answers: dict[str, dict[str, Any]]) -> None:
    multi = _get(answers, "multi.test 1 udp")
    assert sorted(g[1] for g in multi["grants"] if g[0] == "dns_0") == ["192.0.2.10", "198.51.100.20"]
    v6 = _get(answers, "v6only.test 28 udp")
    assert [x[3] for x in v6["answers"]] == ["2001:db8::20"] and ["dns_0", "2001:db8::20", 35] in v6["grants"]
    nodata = _get(answers, "v6only.test 1 udp")
    assert nodata["rcode"] == 0 and nodata["answers"] == [] and nodata["grants"] == []
    wild = _get(answers, "deep.er.wild.test 1 udp")
    assert wild["grants"] == [["dns_2", "192.0.2.11", 35], ["dns_3", "192.0.2.11", 35]]
    tcp = _get(answers, "allowed.test 28 tcp")
    assert tcp["grants"] == [["dns_0", "2001:db8::10", 35], ["dns_3", "2001:db8::10", 35]]


def test_short_ttl_expires_from_the_cache(world: World, answers: dict[str, dict[str, Any]]) -> None:
    first = _get(answers, "short.test 1 udp")
    assert first["answers"][0][2] == 2 and ["dns_0", "192.0.2.12", 7] in first["grants"]
    again = _get(answers, "short.test 1 udp", 1)
    assert again["answers"][0][2] == 2  # asked upstream again: the cached copy had expired
    assert world.dns_log().count("short.test A") == 2
    cached = _get(answers, "chain.test 1 udp", 1)
    assert 26 <= cached["answers"][-1][2] <= 28  # served from the cache, aged
    assert cached["grants"] == []  # granted 35 s a moment ago: held longer than the aged answer asks
    assert world.dns_log().count("chain.test A") == 1


def test_rebinding_answer_is_not_granted(answers: dict[str, dict[str, Any]]) -> None:
    a = _get(answers, "rebind.test 1 udp")
    assert [x[3] for x in a["answers"]] == ["10.77.0.10"]
    assert a["grants"] == []


def test_denied_and_refused_names_never_reach_the_world(world: World, answers: dict[str, dict[str, Any]]) -> None:
    assert _get(answers, "cdn.test 1 udp")["rcode"] == 3
    assert _get(answers, "leak-secret-1f2e3d.example 1 udp")["rcode"] == 3
    assert _get(answers, "leak-secret-4c5b6a.test.example 16 udp")["rcode"] == 3
    log = world.dns_log()
    assert not [line for line in log if "leak-secret" in line or line.startswith("cdn.test")]
    assert "allowed.test AAAA" in log  # the log does record what was asked
