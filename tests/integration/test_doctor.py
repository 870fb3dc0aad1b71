"""`nsfw doctor` on the simulated host: clean, then with another firewall's forward drop, then with a leftover
namespace. Each change is made inside the world, and undone; `baseline` checks that the host is as it was."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .sandbox import NSFW, baseline

__all__ = ["baseline"]  # a fixture, used by name

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def doctor(world: Any) -> subprocess.CompletedProcess[str]:
    return world.run([NSFW, "doctor"], env=ENV, timeout=60)


def line(out: str, name: str) -> str:
    """The report's line for check `name`, with the fix line under it when there is one."""
    lines = out.splitlines()
    for i, text in enumerate(lines):
        words = text.split()
        if len(words) > 1 and " ".join(words[1:1 + len(name.split())]) == name:
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].split()[:1] == ["fix:"] else ""
            return text + "\n" + fix
    raise AssertionError(f"no line for {name!r} in:\n{out}")


def in_world(world: Any, *argv: str) -> None:
    done = world.run(list(argv), env=ENV)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


def test_a_clean_world_passes(world: Any) -> None:
    started = time.monotonic()
    done = doctor(world)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout
    for name in ("root", "kernel: namespaces", "kernel: veth", "kernel: nf_tables", "firewall: forward",
                 "firewall: input", "leftovers"):
        assert line(done.stdout, name).startswith("ok"), line(done.stdout, name)
    assert "nameservers 192.0.2.53" in line(done.stdout, "resolver")  # the world's resolv.conf, not the machine's
    assert "IPv6 default route" in line(done.stdout, "ipv6")
    assert done.stdout.rstrip().endswith("nsfw can run here.") or "warning" in done.stdout.splitlines()[-1]
    print(f"doctor took {took:.2f} s")


@pytest.fixture
def forward_drop(world: Any) -> Iterator[None]:
    """iptables-nft's shape, made with nft: table ip filter, chain FORWARD, policy drop."""
    in_world(world, "nft", "add", "table", "ip", "filter")
    try:
        in_world(world, "nft", "add", "chain", "ip", "filter", "FORWARD",
                 "{ type filter hook forward priority 0; policy drop; }")
        yield
    finally:
        world.run(["nft", "delete", "table", "ip", "filter"], env=ENV)


def test_a_forward_drop_fails_with_its_name_and_fix(world: Any, forward_drop: None) -> None:
    done = doctor(world)
    assert done.returncode == 1, done.stdout
    report = line(done.stdout, "firewall: forward")
    assert report.startswith("FAIL"), report
    assert "table ip filter, chain FORWARD" in report and "policy drop" in report
    assert "connections out of a sandbox (IPv4)" in report and "replies to a sandbox (IPv4)" in report
    assert "fix: iptables -I FORWARD -i nsfw+ -j ACCEPT" in report
    assert done.stdout.splitlines()[-1].startswith("1 problem(s) stop nsfw here")


def test_the_suggested_fix_clears_it(world: Any, forward_drop: None) -> None:
    """The doctor's own advice, followed in the world: it passes again."""
    for rule in ('iifname "nsfw*" accept', 'oifname "nsfw*" ct state established,related accept'):
        in_world(world, "nft", "insert", "rule", "ip", "filter", "FORWARD", *rule.split())
    done = doctor(world)
    assert done.returncode == 0, done.stdout
    assert line(done.stdout, "firewall: forward").startswith("ok")


def test_forward_blockers_now_in_the_world(world: Any, forward_drop: None) -> None:
    """What `nsfw run` calls at launch: the same finding, from the live ruleset."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from nsfw import doctor; "
            "print('\\n'.join(doctor.forward_blockers_now()))")
    done = world.run(["/usr/bin/python3", "-I", "-c", code, str(Path(NSFW).parents[1])],
                     env=ENV)
    assert done.returncode == 0, done.stderr
    found = done.stdout.strip().splitlines()
    assert len(found) == 1 and found[0].startswith("iptables' rules (table ip filter, chain FORWARD) drops")


@pytest.fixture
def leftover_netns(world: Any) -> Iterator[None]:
    in_world(world, "ip", "netns", "add", "nsfw-deadbeef")
    try:
        yield
    finally:
        world.run(["ip", "netns", "delete", "nsfw-deadbeef"], env=ENV)


def test_a_leftover_namespace_is_reported(world: Any, leftover_netns: None) -> None:
    done = doctor(world)
    report = line(done.stdout, "leftovers")
    assert report.startswith("warn"), report
    assert "network namespace nsfw-deadbeef with no record" in report
    assert "fix: ip netns delete nsfw-deadbeef" in report
    assert done.returncode == 0, done.stdout  # a warning, not a failure
