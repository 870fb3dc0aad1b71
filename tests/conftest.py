"""Shared fixtures: the simulated world, its probe, and a throwaway local user.

Integration tests (tests/integration/) need root: they build network namespaces. Without root they are skipped
with a reason; CI runs as root, so there they run.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import nsfw` from a checkout, without installing it

from nsfw.world import PYTHON, ProbeResult, World  # noqa: E402

INTEGRATION = ROOT / "tests" / "integration"
TOOLS = ("ip", "nft", "nsenter", "unshare", "useradd", "setpriv")

# One account per test session, so two sessions on one machine never remove each other's user.
TEST_USER = f"nsfwt{os.getpid()}"
TEST_GROUP = f"nsfwg{os.getpid()}"
# Set on the account when the fixture makes it: an account without it is somebody's, never reused or removed.
TEST_USER_MARK = "nsfw test suite, throwaway"


def integration_skip_reason() -> str | None:
    """Why integration tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "integration tests build network namespaces and need root (CI runs them as root)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not os.access(PYTHON, os.X_OK):
        missing.append(PYTHON)
    if missing:
        return f"integration tests need {', '.join(missing)} (make test-deps installs them)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = integration_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(skip)


def _need_integration() -> None:
    reason = integration_skip_reason()
    if reason is not None:
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------------- the world


def _started_world() -> Iterator[World]:
    _need_integration()
    w = World().start()
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    """One simulated world for the whole session; tests must leave its host as they found it."""
    yield from _started_world()


@pytest.fixture
def fresh_world() -> Iterator[World]:
    """A world of the test's own, for tests that change the world itself (start-up takes well under a second)."""
    yield from _started_world()


@pytest.fixture(scope="session")
def probe(world: World) -> Callable[..., ProbeResult]:
    """probe("tcp", "192.0.2.10", 80) runs the world's probe on the simulated host; .code, .out, .word, .reached.

    To probe from inside a sandbox, run world.probe_argv(kind, *args) through nsfw instead.
    """
    return world.probe


# ----------------------------------------------------------------------------------------------- a local user


@dataclass(frozen=True)
class LocalUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # every group id of the user, the primary one included (as /proc/PID/status shows)
    home: str
    supplementary: str  # the one supplementary group's name


def _exists(db: Callable[[str], object], name: str) -> bool:
    try:
        db(name)
    except KeyError:
        return False
    return True


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def _remove_stale_test_users() -> None:
    """Accounts of earlier sessions that were killed before their clean-up (their pid is gone)."""
    for entry in pwd.getpwall():
        if entry.pw_gecos == TEST_USER_MARK and entry.pw_name.startswith("nsfwt") and entry.pw_name != TEST_USER:
            pid = entry.pw_name[len("nsfwt"):]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                subprocess.run(["userdel", "--remove", "--force", entry.pw_name], capture_output=True, check=False)
                for group in (f"nsfwg{pid}", entry.pw_name):
                    if _exists(grp.getgrnam, group):
                        subprocess.run(["groupdel", group], capture_output=True, check=False)


def _ensure_test_user() -> LocalUser:
    _remove_stale_test_users()
    if not _exists(grp.getgrnam, TEST_GROUP):
        _run("groupadd", TEST_GROUP)
    if _exists(pwd.getpwnam, TEST_USER):
        if pwd.getpwnam(TEST_USER).pw_gecos != TEST_USER_MARK:
            raise RuntimeError(f"a user {TEST_USER!r} exists that the test suite did not create: not touching it")
        # left by a run that was killed before its clean-up: reuse it, made whole again
        _run("usermod", "--append", "--groups", TEST_GROUP, TEST_USER)
    else:
        # a leftover primary group of the same name would make --user-group fail
        primary = ["--gid", TEST_USER] if _exists(grp.getgrnam, TEST_USER) else ["--user-group"]
        _run("useradd", "--create-home", "--shell", "/bin/sh", "--comment", TEST_USER_MARK, *primary,
             "--groups", TEST_GROUP, TEST_USER)
    entry = pwd.getpwnam(TEST_USER)
    if not os.path.isdir(entry.pw_dir):
        os.makedirs(entry.pw_dir, mode=0o700)
        os.chown(entry.pw_dir, entry.pw_uid, entry.pw_gid)
    return LocalUser(
        name=TEST_USER,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(sorted(os.getgrouplist(TEST_USER, entry.pw_gid))),
        home=entry.pw_dir,
        supplementary=TEST_GROUP,
    )


def _remove_test_user() -> None:
    if _exists(pwd.getpwnam, TEST_USER):
        if pwd.getpwnam(TEST_USER).pw_gecos != TEST_USER_MARK:
            return
        # --force: a process a failed test left behind must not keep the account (and its home) alive
        subprocess.run(["userdel", "--remove", "--force", TEST_USER], capture_output=True, check=False)
    for group in (TEST_GROUP, TEST_USER):
        if _exists(grp.getgrnam, group):
            subprocess.run(["groupdel", group], capture_output=True, check=False)


@pytest.fixture(scope="session")
def test_user() -> Iterator[LocalUser]:
    """A throwaway local user `nsfwtest` (home directory, primary group, supplementary group `nsfwtestgrp`),
    removed with its groups at the end of the session, whatever happened."""
    _need_integration()
    try:
        yield _ensure_test_user()
    finally:
        _remove_test_user()
