"""A sandbox's nsfw processes after they exec'd their slim images (nsfw/slim.py), in the simulated world.

The supervisor becomes the slim waiter once COMMAND has run for waiter.GRACE, the keeper the slim keeper
slimkeeper.GRACE after it said "ready"; the resolver execs its own image as soon as it is bound and
unprivileged. Each still does its whole job afterwards: COMMAND's status and the
signals it is sent, the keeper's hand-over and its kill of the whole tree, names and grants.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .sandbox import NSFW, baseline, profile_dir, settle, snapshot_diff, write_profile

__all__ = ["baseline", "profile_dir", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSFW_PROBE_TIMEOUT": "2"}


def until(what: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        time.sleep(0.05)
    return what()


def cmdline(world: Any, pid: int) -> list[str]:
    return world.run(["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")


def slim_kind(world: Any, pid: int) -> str | None:
    """'waiter', 'keeper' or 'resolver' when `pid` runs nsfw/slim.py; None otherwise."""
    cmd = cmdline(world, pid)
    return cmd[3] if len(cmd) > 3 and cmd[1] == "-IS" and cmd[2].endswith("/nsfw/slim.py") else None


def dead(world: Any, pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet."""
    stat = world.run(["sh", "-c", f"cat /proc/{pid}/stat 2>/dev/null"]).stdout
    return not stat or stat.rsplit(")", 1)[1].split()[0] == "Z"


def maps(world: Any, pid: int) -> str:
    return world.run(["cat", f"/proc/{pid}/maps"]).stdout


@contextmanager
def live(world: Any, script: str, profile: str = "default") -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """`nsfw run` of `script` (which prints "ready" first), and its record once the supervisor is the waiter."""
    proc = world.popen([NSFW, "run", "-p", profile, "--", "sh", "-c", script], env=ENV, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        listing = world.run(["sh", "-c", "cat /run/nsfw/sandboxes/*.json"]).stdout
        records = [json.loads(c) for c in listing.replace("}\n{", "}\x00{").split("\x00") if c.strip()]
        record = records[-1]
        assert until(lambda: slim_kind(world, record["supervisor_pid"]) == "waiter"), \
            cmdline(world, record["supervisor_pid"])
        assert until(lambda: slim_kind(world, record["keeper_pid"]) == "keeper"), cmdline(world, record["keeper_pid"])
        yield proc, record
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        settle(world)


def test_waiter_returns_commands_status_and_the_keeper_removes_the_sandbox(world: Any) -> None:
    with live(world, "echo ready; read _; exit 7") as (proc, record):
        mapped = maps(world, record["supervisor_pid"])  # the launch loaded libnftables and compiled modules
        assert "libnftables" not in mapped and "lib-dynload" not in mapped, mapped
        out, _err = proc.communicate(input="\n", timeout=30)
        assert proc.returncode == 7
        assert until(lambda: not world.run(["ls", "/run/nsfw/sandboxes"]).stdout.strip())
        assert record["netns"] not in world.run(["ip", "netns", "list"]).stdout


def test_waiter_relays_signals_to_command(world: Any) -> None:
    script = "trap 'echo got-usr1' USR1; trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done"
    with live(world, script) as (proc, record):
        world.run(["kill", "-USR1", str(record["supervisor_pid"])])
        assert proc.stdout is not None and proc.stdout.readline().strip() == "got-usr1"
        world.run(["kill", "-TERM", str(record["supervisor_pid"])])
        proc.wait(timeout=30)
        assert proc.returncode == 42


def test_waiter_reports_death_by_signal(world: Any) -> None:
    with live(world, "echo ready; exec sleep 300") as (proc, record):
        world.run(["pkill", "-KILL", "-x", "-P", str(record["supervisor_pid"]), "sleep"])
        proc.wait(timeout=30)
        assert proc.returncode == 128 + signal.SIGKILL


def test_waiter_killed_the_keeper_kills_the_whole_tree(world: Any) -> None:
    script = "(setsid sh -c 'sleep 321' &); (sleep 322 &); echo ready; exec sleep 323"
    with live(world, script) as (proc, record):
        world.run(["kill", "-KILL", str(record["supervisor_pid"])])
        proc.wait(timeout=30)
        assert until(lambda: not world.run(["pgrep", "-f", "^sleep 32[123]"]).stdout.strip()), \
            "COMMAND's whole tree must die with its supervisor, slim or not"
        assert until(lambda: not world.run(["ls", "/run/nsfw/sandboxes"]).stdout.strip())


def test_waiter_whose_keeper_died_removes_the_sandbox_itself(world: Any) -> None:
    with live(world, "echo ready; read _") as (proc, record):
        world.run(["kill", "-KILL", str(record["keeper_pid"])])
        assert until(lambda: dead(world, record["keeper_pid"]))
        proc.communicate(input="\n", timeout=30)
        assert proc.returncode == 0
        assert not world.run(["ls", "/run/nsfw/sandboxes"]).stdout.strip()
        assert record["netns"] not in world.run(["ip", "netns", "list"]).stdout


def test_slim_resolver_resolves_and_grants(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "slimnames", "allow: [allowed.test]\n")
    probes = [world.probe_argv("tcp", "192.0.2.10", 80), world.probe_argv("resolve", "allowed.test"),
              world.probe_argv("tcp", "192.0.2.10", 80), world.probe_argv("resolve", "other.test")]
    script = "echo ready; read _; " + "".join(f"{shlex.join(a)} >/dev/null 2>&1; echo \"@@ $?\"; " for a in probes)
    with live(world, script, p) as (proc, record):
        kids = world.run(["pgrep", "-P", str(record["keeper_pid"])]).stdout.split()
        resolvers = [int(k) for k in kids if slim_kind(world, int(k)) == "resolver"]
        assert len(resolvers) == 1, kids
        status = world.run(["cat", f"/proc/{resolvers[0]}/status"]).stdout
        assert "Uid:\t65534\t65534\t65534\t65534" in status and "CapEff:\t0000000000000000" in status
        assert "CapPrm:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
        assert "libnftables" not in maps(world, resolvers[0])  # the keeper's heap is not the resolver's
        out, _err = proc.communicate(input="\n", timeout=60)
    assert [line for line in out.splitlines() if line.startswith("@@")] == ["@@ 3", "@@ 0", "@@ 0", "@@ 1"], out


def test_slim_keeper_lingers_while_something_runs_then_removes_the_sandbox(world: Any) -> None:
    with live(world, "(setsid sleep 331 >/dev/null 2>&1 &); echo ready; read _") as (proc, record):
        mapped = maps(world, record["keeper_pid"])
        assert "libnftables" not in mapped and "_yaml" not in mapped, mapped  # nothing granted yet: not loaded
        proc.communicate(input="\n", timeout=30)
        assert proc.returncode == 0
        time.sleep(0.5)  # several of the keeper's polls: it must not remove a sandbox something still runs in
        assert record["id"] + ".json" in world.run(["ls", "/run/nsfw/sandboxes"]).stdout
        world.run(["pkill", "-KILL", "-f", "^sleep 331"])
        assert until(lambda: not world.run(["ls", "/run/nsfw/sandboxes"]).stdout.strip())
        assert until(lambda: record["netns"] not in world.run(["ip", "netns", "list"]).stdout)
        assert until(lambda: dead(world, record["keeper_pid"]))
