"""Warm launches (`nsfw daemon`): the same contract as a cold `nsfw run`, in the simulated world."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .sandbox import NSFW, as_user, baseline, profile_dir, snapshot_diff

__all__ = ["baseline", "profile_dir", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSFW_PROBE_TIMEOUT": "1"}
SOCKET = "/run/nsfw/warm.sock"


@pytest.fixture(scope="module")
def daemon(world: Any) -> Iterator[subprocess.Popen[str]]:
    proc = world.popen([NSFW, "daemon"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        if world.run(["test", "-S", SOCKET]).returncode == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("nsfw daemon did not start")
    yield proc
    proc.terminate()
    proc.wait(timeout=10)
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
                                           or world.run(["ls", "/run/nsfw/sandboxes"]).stdout.strip()):
        time.sleep(0.05)
    assert not world.run(["pgrep", "-f", "^sleep 32[12]"]).stdout.strip()
    assert not world.run(["ls", "/run/nsfw/sandboxes"]).stdout.strip()


def test_only_root_may_use_the_daemon(world: Any, daemon: Any, test_user: Any) -> None:
    code = ("import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
            f"s.connect({SOCKET!r}); print(s.recv(10))")
    done = world.run(["setpriv", f"--reuid={test_user.uid}", f"--regid={test_user.gid}", "--clear-groups",
                      "/usr/bin/python3", "-c", code], env=ENV)
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert warm(world, "-p", "offline", "--", "true").returncode == 0
