"""Warm launches (`nsfw daemon`): the same contract as a cold `nsfw run`, in the simulated world."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .sandbox import NSFW, as_user, baseline, profile_dir, snapshot_diff, write_profile

__all__ = ["baseline", "profile_dir", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSFW_PROBE_TIMEOUT": "1"}
SOCKET = "/run/nsfw/warm.sock"


POOL = 4  # POOL_SIZE of each kind the daemon starts with: none, and nat with IPv6 (the world routes it)


def records(world: Any) -> list[dict[str, Any]]:
    out = world.run(["sh", "-c", "for f in /run/nsfw/sandboxes/*.json; do [ -e $f ] && cat $f && printf '\\0'; done"]
                    ).stdout
    return [json.loads(c) for c in out.split("\x00") if c.strip()]


def pooled(world: Any) -> list[dict[str, Any]]:
    return [r for r in records(world) if r.get("pooled")]


def wait_for(what: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.05)
    return what()


@pytest.fixture
def daemon(world: Any, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """One daemon per test, its pool filled before the test's first snapshot... and gone by its last: the
    baseline then proves that stopping the daemon removes the whole pool."""
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = world.popen([NSFW, "daemon"], env=ENV, stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        if not wait_for(lambda: world.run(["test", "-S", SOCKET]).returncode == 0 and len(pooled(world)) >= POOL):
            raise AssertionError(f"nsfw daemon did not start: {log.read_text()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"nsfw daemon did not stop: {log.read_text()}") from None
        world.run(["rm", "-f", SOCKET])


def warm(world: Any, *args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    """A launch with no terminal on 0-2, as from a menu: the warm path."""
    return world.run([NSFW, "run", *args], env={**ENV, **(env or {})}, stdin=subprocess.DEVNULL,
                     capture_output=True, **kw)


def test_exit_statuses_and_output(world: Any, daemon: Any) -> None:
    done = warm(world, "-p", "offline", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")
    assert warm(world, "-p", "offline", "--", "sh", "-c", "kill -KILL $$").returncode == 137
    missing = warm(world, "-p", "offline", "--", "/no/such/command")
    assert missing.returncode == 127 and "/no/such/command" in missing.stderr
    bad = warm(world, "-p", "/no/such/profile.yaml", "--", "true")
    assert bad.returncode == 125 and "profile.yaml" in bad.stderr


def test_it_is_the_daemon_that_launched(world: Any, daemon: Any) -> None:
    done = warm(world, "-p", "offline", "--", "sh", "-c", "cat /proc/$PPID/status | grep PPid")
    supervisor_parent = done.stdout.split()[-1]
    assert supervisor_parent == str(daemon.pid)  # COMMAND's supervisor is a child of the daemon
    cold = warm(world, "-p", "offline", "--", "sh", "-c", "cat /proc/$PPID/status | grep PPid",
                env={"NSFW_WARM": "0"})
    assert cold.stdout.split()[-1] != str(daemon.pid)


def test_environment_cwd_and_user(world: Any, daemon: Any, test_user: Any, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    script = "echo $FOO; pwd; id -u; grep CapEff /proc/self/status"
    done = warm(world, "-p", "offline", "--", "sh", "-c", script, env={"FOO": "a b", **as_user(test_user)},
                cwd=str(tmp_path))
    assert done.stdout.splitlines()[:3] == ["a b", str(tmp_path), str(test_user.uid)], done.stderr
    assert done.stdout.splitlines()[3].split()[1] == "0000000000000000"


def test_network_rules_hold(world: Any, daemon: Any) -> None:
    probe = world.probe_argv("tcp", "192.0.2.10", 80)
    assert warm(world, "-p", "default", "--", *probe).returncode == 0
    assert warm(world, "-p", "default", "--", *world.probe_argv("tcp", "10.77.0.10", 80)).returncode == 3


def test_signals_reach_the_command(world: Any, daemon: Any) -> None:
    proc = world.popen([NSFW, "run", "-p", "offline", "--", "sh", "-c",
                        "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done"],
                       env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGTERM)  # nsenter execs the client: this is the client
    out, _ = proc.communicate(timeout=20)
    assert "got TERM" in out and proc.returncode == 3


def test_killed_client_takes_the_whole_tree_with_it(world: Any, daemon: Any) -> None:
    proc = world.popen([NSFW, "run", "-p", "default", "--", "sh", "-c",
                        "(setsid sleep 321 &); echo ready; exec sleep 322"],
                       env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (world.run(["pgrep", "-f", "^sleep 32[12]"]).stdout.strip()
                                           or [r for r in records(world) if not r.get("pooled")]):
        time.sleep(0.05)
    assert not world.run(["pgrep", "-f", "^sleep 32[12]"]).stdout.strip()
    assert not [r for r in records(world) if not r.get("pooled")]  # only the pool: the sandbox is gone


def test_only_root_may_use_the_daemon(world: Any, daemon: Any, test_user: Any) -> None:
    code = ("import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
            f"s.connect({SOCKET!r}); print(s.recv(10))")
    done = world.run(["setpriv", f"--reuid={test_user.uid}", f"--regid={test_user.gid}", "--clear-groups",
                      "/usr/bin/python3", "-c", code], env=ENV)
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert warm(world, "-p", "offline", "--", "true").returncode == 0


def test_a_launch_takes_a_prebuilt_sandbox_that_ps_and_stop_never_saw(world: Any, daemon: Any) -> None:
    ready = {r["id"]: r for r in pooled(world)}
    assert {r["network"] for r in ready.values()} == {"none", "nat"}
    assert json.loads(world.run([NSFW, "ps", "--json"], env=ENV).stdout) == []  # the pool runs nothing
    some = next(iter(ready))
    refused = world.run([NSFW, "stop", some], env=ENV)
    assert refused.returncode == 1 and "no running sandbox" in refused.stderr
    proc = world.popen([NSFW, "run", "-p", "default", "--", "sh", "-c", "echo ready; read _"], env=ENV,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        rows = json.loads(world.run([NSFW, "ps", "--json"], env=ENV).stdout)
        assert len(rows) == 1 and rows[0]["profile"] == "default"
        assert rows[0]["id"] in ready and ready[rows[0]["id"]]["network"] == "nat"  # taken from the pool
        assert rows[0]["addresses"] == ready[rows[0]["id"]]["addresses"]
    finally:
        proc.communicate(input="\n", timeout=30)
    assert proc.returncode == 0
    # the daemon builds another in its place: the pool is full again, with a new sandbox
    assert wait_for(lambda: len(pooled(world)) == POOL and rows[0]["id"] not in {r["id"] for r in pooled(world)})


def test_a_kind_the_pool_lacks_is_built_at_launch_then_kept_ready(world: Any, daemon: Any,
                                                                 profile_dir: Path) -> None:
    path = write_profile(profile_dir, "v4only", "network: nat\nipv6: false\nallow: [internet]\n")
    done = warm(world, "-p", path, "--", "sh", "-c", "ip -o addr show dev eth0")
    assert done.returncode == 0, done.stderr
    assert " inet " in done.stdout and " inet6 " not in done.stdout  # no IPv6 at all, as the profile says
    assert wait_for(lambda: sum(1 for r in pooled(world) if r["network"] == "nat" and len(r["addresses"]) == 1) == 2)
    again = warm(world, "-p", path, "--", "sh", "-c", "ip -o addr show dev eth0")
    assert " inet " in again.stdout and " inet6 " not in again.stdout


def test_a_failure_in_a_taken_sandbox_removes_it(world: Any, daemon: Any, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    marker = tmp_path / "ran"
    for step in ("record", "host-rules", "sandbox-rules", "keeper"):
        before = {r["id"] for r in pooled(world)}
        done = warm(world, "-p", "default", "--", "touch", str(marker), env={"NSFW_TEST_FAIL_AT": step})
        assert done.returncode == 125 and "injected failure" in done.stderr, (step, done.stderr)
        assert not marker.exists()
        taken = before - {r["id"] for r in pooled(world)}
        assert len(taken) == 1, step
        # nothing of it is left: no record, no namespace, no veth, no table
        assert not any(r["id"] in taken for r in records(world)), step
        gone = world.run(["sh", "-c", "ls /run/netns; ip -o link; nft list tables"]).stdout
        assert not any(t in gone for t in taken), (step, gone)
        assert wait_for(lambda: len(pooled(world)) == POOL)


def test_a_killed_daemon_leaves_a_pool_that_gc_removes(world: Any, daemon: Any) -> None:
    left = {r["id"] for r in pooled(world)}
    daemon.kill()
    daemon.wait(timeout=10)
    assert left <= {r["id"] for r in pooled(world)}  # nobody removed them...
    done = world.run([NSFW, "gc"], env=ENV)
    assert done.returncode == 0, done.stderr
    assert records(world) == []  # ...until gc saw their owner was dead; the baseline checks the kernel objects
    assert warm(world, "-p", "offline", "--", "true").returncode == 0  # with no daemon: a cold launch



def test_the_umask_and_cwd_travel_with_the_launch(world: Any, daemon: Any, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    done = world.run(["sh", "-c", f"umask 027; exec {NSFW} run -p offline -- sh -c 'umask; pwd'"], env=ENV,
                     stdin=subprocess.DEVNULL, cwd=str(tmp_path))
    assert done.stdout.split() == ["0027", str(tmp_path)], done.stderr


def test_a_pooled_sandbox_in_a_route_the_host_gained_is_never_used(world: Any, daemon: Any) -> None:
    """As for a cold launch (test_lifecycle), a slot the host now routes elsewhere is not handed out: the
    daemon's prebuilt ones in 10.213.0.0/26 are replaced by others."""
    assert any(r["addresses"][0].startswith("10.213.0.") for r in pooled(world) if r["network"] == "nat")
    world.run(["ip", "route", "add", "10.213.0.0/26", "dev", "lan0"])  # a VPN or a LAN appeared since
    try:
        done = warm(world, "-p", "default", "--", "ip", "-4", "-o", "addr", "show", "eth0")
        addr = done.stdout.split()[3]
        assert not addr.startswith("10.213.0.") or int(addr.split(".")[3].split("/")[0]) >= 64, addr
        assert wait_for(lambda: len(pooled(world)) == POOL and not any(
            r["addresses"][0].startswith("10.213.0.") and int(r["addresses"][0].split(".")[3].split("/")[0]) < 64
            for r in pooled(world) if r["network"] == "nat"))
    finally:
        world.run(["ip", "route", "del", "10.213.0.0/26", "dev", "lan0"])
