"""What the sandbox integration tests share: running nsfw in the world, probing from inside, and the check
that every test leaves the simulated host exactly as it found it."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NSFW = str(ROOT / "bin" / "nsfw")
PY = "/usr/bin/python3"
REACHED, REFUSED, TIMEOUT, BLOCKED = 0, 1, 2, 3

@pytest.fixture(autouse=True)
def baseline(world: Any) -> Iterator[None]:
    """Whatever a test does, nsfw must leave the simulated host exactly as it found it."""
    before = world.snapshot()
    yield
    settle(world)  # `nsfw run` returns COMMAND's status first; the keeper removes the sandbox right after
    after = world.snapshot()
    assert not snapshot_diff(before, after), "nsfw left something behind: " + "; ".join(snapshot_diff(before, after))


def _flat(value: Any, path: str = "") -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_flat(v, f"{path}.{k}") for k, v in value.items())) if value else {path + "={}"}
    if isinstance(value, list):
        return {f"{path}[]={json.dumps(v, sort_keys=True)}" for v in value}
    return {f"{path}={value}"}


def snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs, readably; the lock file is nsfw's permanent meeting point, not a leftover."""
    ignore = {".run_nsfw[]=\"lock\""}
    a, b = _flat(before) - ignore, _flat(after) - ignore
    return [f"gone {x}" for x in sorted(a - b)] + [f"new {x}" for x in sorted(b - a)]


@pytest.fixture
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Profiles in a directory every user can read (tmp_path itself is root-only)."""
    d = tmp_path_factory.mktemp("profiles")
    d.chmod(0o755)
    for parent in d.parents:
        if str(parent).startswith("/tmp/"):
            parent.chmod(parent.stat().st_mode | 0o005)
    return d


def write_profile(d: Path, name: str, text: str) -> str:
    path = d / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    path.chmod(0o644)
    return str(path)


def run(world: Any, profile: str | None, *cmd: str, env: dict[str, str] | None = None,
        timeout: float = 60, new: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [NSFW, "run", *(["-p", profile] if profile else []), *(["--new"] if new else []), "--", *cmd]
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSFW_PROBE_TIMEOUT": "2", **(env or {})}
    return world.run(argv, env=full_env, timeout=timeout)


def probe(world: Any, profile: str, kind: str, addr: str, port: int | str, **kw: Any) -> tuple[int, str]:
    done = run(world, profile, *world.probe_argv(kind, addr, port), **kw)
    return done.returncode, done.stdout.strip()


def reached(world: Any, profile: str, kind: str, addr: str, port: int) -> bool:
    code, out = probe(world, profile, kind, addr, port)
    assert code in (REACHED, BLOCKED), f"{kind} {addr}:{port}: unexpected {code} {out}"
    return code == REACHED


def as_user(user: Any) -> dict[str, str]:
    return {"SUDO_UID": str(user.uid), "SUDO_GID": str(user.gid), "SUDO_USER": user.name}


def settle(world: Any, timeout: float = 15) -> None:
    """Keepers remove a sandbox after nsfw exits when something else still ran in it: wait for that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = world.run(["sh", "-c", "ls /run/nsfw/sandboxes 2>/dev/null; ls /run/netns | grep ^nsfw"]).stdout
        if not busy.strip():
            return
        time.sleep(0.05)
