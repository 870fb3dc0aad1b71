"""Sandboxes you can list, stop and trust to be cleaned up, whatever happens: in the simulated world.

The autouse `baseline` fixture compares the simulated host before and after every test (namespaces, links,
routes, ruleset, sysctls, /run/nsfw, processes): each test here ends with nothing left, however it killed nsfw.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nsfw.sandbox import SETUP_STEPS

from .sandbox import NSFW, ROOT, baseline, profile_dir, run, settle, snapshot_diff, write_profile

__all__ = ["baseline", "profile_dir", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSFW_PROBE_TIMEOUT": "1"}
# A fraction of a second unique to this test session: the world shares the machine's process list, so a
# `pgrep` for plain `sleep 300` would also see another session's sleeps.
TAG = f".{os.getpid()}"


def nsfw(world: Any, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return world.run([NSFW, *args], env=ENV, **kw)


def records(world: Any) -> list[dict[str, Any]]:
    out = world.run(["sh", "-c", "for f in /run/nsfw/sandboxes/*.json; do [ -e $f ] && cat $f && printf '\\0'; done"]
                    ).stdout
    return [json.loads(c) for c in out.split("\x00") if c.strip()]


def until(what: Callable[[], bool], timeout: float = 15) -> bool:
    """A keeper removes its sandbox after `nsfw run` returned: wait (boundedly) for what that leads to."""
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        time.sleep(0.05)
    return what()


@contextmanager
def running(world: Any, *args: str, script: str = "echo ready; read _") -> Iterator[subprocess.Popen[str]]:
    proc = world.popen([NSFW, "run", *args, "--", "sh", "-c", script], env=ENV, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "ready", line
        yield proc
    finally:
        if proc.poll() is None:
            try:
                proc.communicate(input="\n", timeout=30)
            except ValueError:
                proc.wait(timeout=30)
        settle(world)


# ---------------------------------------------------------------------------------------------- ps, stop, gc


def test_ps_lists_sandboxes_with_counters(world: Any) -> None:
    probes = " ".join(f"{shlex.join(world.probe_argv(*p))} >/dev/null;" for p in
                      (("tcp", "192.0.2.10", 80), ("tcp", "10.77.0.10", 80), ("tcp", "10.77.0.10", 22)))
    with running(world, "-p", "default", script=f"{probes} echo ready; read _"):
        rows = json.loads(nsfw(world, "ps", "--json").stdout)
        assert len(rows) == 1
        row = rows[0]
        assert set(row) >= {"id", "profile", "command", "user", "uid", "pid", "network", "addresses",
                            "started_at", "uptime_seconds", "allowed", "denied"}
        assert row["profile"] == "default" and row["user"] == "root" and row["network"] == "nat"
        assert row["command"][:2] == ["sh", "-c"] and row["pid"] > 0 and row["addresses"]
        assert row["allowed"]["packets"] >= 3 and row["allowed"]["bytes"] > 0  # SYN, ACK, data of the probe
        assert row["denied"]["packets"] >= 2  # two refused SYNs
        text = nsfw(world, "ps").stdout
        assert row["id"] in text and "default" in text


def test_stop_by_profile_ends_the_whole_sandbox(world: Any) -> None:
    script = f"trap 'echo term; exit 3' TERM; (sleep 300{TAG} &); echo ready; while :; do sleep 0.05; done"
    proc = world.popen([NSFW, "run", "-p", "default", "--", "sh", "-c", script], env=ENV,
                       stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    done = nsfw(world, "stop", "default", "--grace", "2")
    assert done.returncode == 0 and "stopped" in done.stdout, done.stderr
    out, _ = proc.communicate(timeout=20)
    assert "term" in out and proc.returncode == 3
    assert not world.run(["pgrep", "-f", f"^sleep 300{TAG}"]).stdout.strip()  # the orphaned grandchild too
    settle(world)


def test_stop_kills_what_ignores_term_after_the_grace_period(world: Any) -> None:
    proc = world.popen([NSFW, "run", "-p", "offline", "--", "sh", "-c", "trap '' TERM; echo ready; sleep 300"],
                       env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    rid = records(world)[0]["id"]
    start = time.monotonic()
    assert nsfw(world, "stop", rid[:4], "--grace", "1").returncode == 0
    proc.wait(timeout=20)
    assert proc.returncode == 128 + signal.SIGKILL and 0.9 < time.monotonic() - start < 8
    settle(world)


def test_stop_refuses_unknown_sandboxes(world: Any) -> None:
    done = nsfw(world, "stop", "no-such-thing")
    assert done.returncode == 1 and "nsfw ps" in done.stderr


def _kill_nsfw(world: Any, pattern: str) -> None:
    pids = world.run(["pgrep", "-f", pattern]).stdout.split()
    for pid in pids:
        world.run(["kill", "-KILL", pid])


def test_gc_after_supervisor_and_keeper_are_killed(world: Any) -> None:
    script = f"(setsid sleep 311{TAG} >/dev/null 2>&1 &); echo ready; exec sleep 300{TAG}"
    proc = world.popen([NSFW, "run", "-p", "default", "--", "sh", "-c", script], env=ENV, stdout=subprocess.PIPE,
                       text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    rec = records(world)[0]
    for pid in (rec["keeper_pid"], rec["supervisor_pid"]):  # both at once: nobody is left to clean up
        world.run(["kill", "-KILL", str(pid)])
    proc.wait(timeout=10)
    dry = nsfw(world, "gc", "--dry-run")
    assert rec["id"] in dry.stdout and "would remove" in dry.stdout
    assert any(r["id"] == rec["id"] for r in records(world))  # the dry run removed nothing
    done = nsfw(world, "gc")
    assert done.returncode == 0 and rec["id"] in done.stdout and "1 process(es)" in done.stdout, done.stdout
    assert not world.run(["pgrep", "-f", f"^sleep 311{TAG}"]).stdout.strip()  # the stray was killed
    assert nsfw(world, "gc").stdout.strip() == "nothing to do"  # a second run finds nothing


# ---------------------------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("step", [s for s in SETUP_STEPS if s != "command"])
def test_supervisor_killed_at_each_setup_step(world: Any, tmp_path: Path, step: str) -> None:
    marker = tmp_path / "ran"
    done = world.run([NSFW, "run", "-p", "default", "--", "touch", str(marker)],
                     env={**ENV, "NSFW_TEST_KILL_AT": step})
    assert done.returncode == -signal.SIGKILL or done.returncode == 128 + signal.SIGKILL, done
    assert not marker.exists(), "COMMAND must never start without its rules"
    settle(world, 3)
    nsfw(world, "gc")  # restores the baseline exactly: the autouse fixture compares


def test_supervisor_killed_while_command_runs_kills_the_whole_tree(world: Any) -> None:
    script = (f"(setsid sh -c 'sleep 301{TAG}' &); (sleep 302{TAG} &); "
              f"{shlex.join(world.probe_argv('tcp', '192.0.2.10', 80))} >/dev/null; exec sleep 303{TAG}")
    proc = world.popen([NSFW, "run", "-p", "default", "--", "sh", "-c", script], env={**ENV,
                       "NSFW_TEST_KILL_AT": "command"}, stdout=subprocess.PIPE, text=True)
    proc.wait(timeout=20)
    assert proc.returncode in (-9, 137)
    settle(world)
    leftovers = world.run(["pgrep", "-f", rf"^sleep 30[123]\{TAG}"]).stdout.split()
    assert not leftovers, "COMMAND's whole tree must die with its supervisor"
    nsfw(world, "gc")


def test_command_killed_leaves_nothing(world: Any) -> None:
    done = run(world, "default", "sh", "-c", "kill -KILL $$")
    assert done.returncode == 137
    assert until(lambda: not records(world))  # its keeper removes it; the baseline fixture checks the rest


# ---------------------------------------------------------------------------------------------- joining


NETNS = "readlink /proc/self/ns/net"


def test_second_run_joins_and_the_sandbox_lives_until_its_last_process(world: Any) -> None:
    first = world.popen([NSFW, "run", "-p", "default", "--", "sh", "-c", f"{NETNS}; echo ready; read _"],
                        env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None
    ns_first = first.stdout.readline().strip()
    assert first.stdout.readline().strip() == "ready"
    second = world.popen([NSFW, "run", "-p", "default", "--", "sh", "-c", f"{NETNS}; echo ready; read _; "
                          f"{shlex.join(world.probe_argv('tcp', '192.0.2.10', 80))}"],
                         env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert second.stdout is not None
    assert second.stdout.readline().strip() == ns_first  # joined: the same namespace, the same rules
    assert second.stdout.readline().strip() == "ready"
    other = run(world, "default", "sh", "-c", NETNS, new=True)
    assert other.stdout.strip() != ns_first  # --new starts its own
    assert until(lambda: len(records(world)) == 1)  # its keeper removed it: nothing else ran there
    first.communicate("\n", timeout=20)  # the first COMMAND ends: its nsfw exits, the sandbox stays
    assert first.returncode == 0 and len(records(world)) == 1
    out, _ = second.communicate("\n", timeout=20)
    assert "open world inet 192.0.2.10 80" in out  # still enforced and working after the first left
    settle(world)
    assert not records(world)


def test_joining_needs_the_same_profile_content(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "changing", "allow: [internet]\n")
    proc = world.popen([NSFW, "run", "-p", p, "--", "sh", "-c", f"{NETNS}; echo ready; read _"], env=ENV,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first_ns = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "ready"
        write_profile(profile_dir, "changing", "allow: [lan]\n")
        done = run(world, p, "sh", "-c", NETNS)
        assert done.stdout.strip() != first_ns  # new rules, so a new sandbox rather than the old one's
    finally:
        proc.communicate("\n", timeout=20)
        settle(world)


# ---------------------------------------------------------------------------------------------- addresses


def test_pool_avoids_routes_the_host_gained_later(world: Any) -> None:
    first = run(world, "default", "ip", "-4", "-o", "addr", "show", "eth0")
    assert " 10.213.0.2/30 " in first.stdout, first.stdout
    world.run(["ip", "route", "add", "10.213.0.0/26", "dev", "lan0"])  # a VPN or a LAN appeared since
    try:
        second = run(world, "default", "ip", "-4", "-o", "addr", "show", "eth0")
        addr = second.stdout.split()[3]
        assert not addr.startswith("10.213.0.") or int(addr.split(".")[3].split("/")[0]) >= 64, addr
    finally:
        world.run(["ip", "route", "del", "10.213.0.0/26", "dev", "lan0"])


def test_pool_from_config(world: Any, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    setup = f"cp -a /etc {etc} && mkdir -p {etc}/nsfw && cp {tmp_path}/nsfw.yaml {etc}/nsfw/ && mount --bind {etc} /etc"
    script = f"{setup} && {NSFW} run -p default -- ip -o addr show eth0"
    (tmp_path / "nsfw.yaml").write_text("pool:\n  ipv4: 10.99.0.0/24\n  ipv6: 'fd00:99::/56'\n")
    done = world.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=ENV)
    assert " 10.99.0.2/30 " in done.stdout and "fd00:99::2/64" in done.stdout, done.stdout + done.stderr
    world.run(["rm", "-rf", str(etc)])
    (tmp_path / "nsfw.yaml").write_text("pool:\n  ipv4: 10.99.0.7/24\n  ipv5: x\n")
    done = world.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=ENV)
    assert done.returncode == 125 and "pool.ipv4" in done.stderr and "pool.ipv5" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------- races


def test_fifty_parallel_launches_while_gc_runs(world: Any) -> None:
    stop = threading.Event()
    gc_runs = [0]

    def gc_loop() -> None:
        while not stop.is_set():
            assert nsfw(world, "gc").returncode == 0
            gc_runs[0] += 1

    reach = shlex.join(world.probe_argv("tcp", "192.0.2.10", 80))
    lan = shlex.join(world.probe_argv("tcp", "10.77.0.10", 80))
    script = f"ip -4 -o addr show eth0 | cut -d' ' -f7; {NETNS}; {reach} >/dev/null; echo $?; {lan} >/dev/null; " \
             "echo $?; sleep 1"
    thread = threading.Thread(target=gc_loop)
    thread.start()
    try:
        procs = [world.popen([NSFW, "run", "--new", "-p", "default", "--", "sh", "-c", script], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(50)]
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        stop.set()
        thread.join()
    outs = [out.split() for out, _ in results]
    assert all(p.returncode == 0 for p in procs), [err for _o, err in results if err][:3]
    assert all(len(o) == 4 for o in outs), outs
    assert len({o[0] for o in outs}) == 50, "every sandbox got its own address"
    assert len({o[1] for o in outs}) == 50, "every sandbox got its own namespace"
    assert all(o[2] == "0" and o[3] == "3" for o in outs), "every sandbox's policy held"
    assert gc_runs[0] >= 2
    settle(world, 30)


# ---------------------------------------------------------------------------------------------- other firewalls


def test_a_forward_drop_by_another_firewall_is_refused_at_launch(world: Any, tmp_path: Path) -> None:
    ruleset = tmp_path / "docker-like.nft"
    ruleset.write_text("table ip filter {\n chain FORWARD { type filter hook forward priority 0; policy drop; }\n}\n")
    assert world.run(["nft", "-f", str(ruleset)]).returncode == 0
    try:
        marker = tmp_path / "ran"
        done = run(world, "default", "touch", str(marker))
        assert done.returncode == 125, done.stderr
        assert "FORWARD" in done.stderr and "nsfw doctor" in done.stderr
        assert not marker.exists()
        assert run(world, "offline", "true").returncode == 0  # no forwarding needed, nothing in the way
    finally:
        world.run(["nft", "delete", "table", "ip", "filter"])


HOST_ENV_BOTH_WAYS = """
import ipaddress, json, sys
sys.path.insert(0, sys.argv[1])
from pyroute2 import IPRoute
from nsfw import netns
with IPRoute() as ipr:
    skip = {l["index"] for l in ipr.get_links() if (l.get_attr("IFLA_IFNAME") or "").startswith("nsfw")}
    addrs = sorted({str(ipaddress.ip_address((a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")).split("%")[0]))
                    for a in ipr.get_addr()})
    routes, connected, default6 = [], [], False
    for fam in (2, 10):
        for r in ipr.get_routes(family=fam, table=254):
            dst = r.get_attr("RTA_DST")
            if not dst:
                default6 = default6 or (fam == 10 and r["dst_len"] == 0)
                continue
            net = ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False)
            routes.append(str(net))
            if (r.get_attr("RTA_GATEWAY") is None and r["type"] == 1 and r.get_attr("RTA_OIF") not in skip
                    and not net.is_link_local):
                connected.append(str(net))
env = netns.host_env(exclude_prefix="nsfw")
print(json.dumps([[addrs, sorted(set(connected)), sorted(routes), default6],
                  [sorted(map(str, env.addresses)), sorted(map(str, env.connected)), sorted(map(str, env.routes)),
                   env.default6]]))
"""


def test_the_host_is_read_as_pyroute2_reads_it(world: Any) -> None:
    """netns.host_env speaks rtnetlink itself (launch speed): it must see what a full netlink library sees,
    on-link routes, routes through a gateway, another table and a sandbox's own veth included."""
    added = [["ip", "route", "add", "192.0.2.128/25", "dev", "lan0"],
             ["ip", "route", "add", "203.0.113.0/24", "via", "10.77.0.10"],
             ["ip", "route", "add", "198.51.100.0/24", "dev", "lan0", "table", "100"]]
    for cmd in added:
        assert world.run(cmd).returncode == 0
    try:
        with running(world, "-p", "default"):
            done = world.run(["/usr/bin/python3", "-I", "-c", HOST_ENV_BOTH_WAYS, str(ROOT)])
            assert done.returncode == 0, done.stderr
            theirs, ours = json.loads(done.stdout)
            assert ours == theirs
            assert "192.0.2.128/25" in ours[1] and "203.0.113.0/24" not in ours[1] and "203.0.113.0/24" in ours[2]
            assert "198.51.100.0/24" not in ours[2] and not any(n.startswith("10.213.") for n in ours[1])
    finally:
        for cmd in added:
            world.run(["ip", "route", "del", *cmd[3:]])
