"""The pure parts of nsfw.launch: who the invoking user is, how statuses and signals are judged."""

from __future__ import annotations

import os
import pwd
import signal

import pytest

from nsfw.errors import NsfwError, PrivilegeError
from nsfw.launch import (
    DEFAULT_FORWARD,
    ExecError,
    User,
    invoking_user,
    parse_status,
    privilege_problems,
)
from nsfw.relay import SI_KERNEL, exit_status, should_relay


def _unused_uid() -> int:
    return next(uid for uid in range(3_999_999, 3_000_000, -1) if not _has_entry(uid))


def _has_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _existing() -> pwd.struct_passwd:
    """A passwd entry that is not root, so that SUDO_UID visibly wins over the real uid."""
    for name in ("nobody", "daemon", "bin"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("no non-root account (nobody, daemon, bin) in the passwd database")


def test_sudo_uid_names_the_user() -> None:
    entry = _existing()
    user = invoking_user({"SUDO_UID": str(entry.pw_uid)}, 0)
    assert user == User(
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        name=entry.pw_name,
        home=entry.pw_dir,
        groups=tuple(dict.fromkeys(os.getgrouplist(entry.pw_name, entry.pw_gid))),
    )


def test_sudo_gid_overrides_the_passwd_group() -> None:
    entry = _existing()
    user = invoking_user({"SUDO_UID": str(entry.pw_uid), "SUDO_GID": "4242"}, 0)
    assert user.gid == 4242
    assert 4242 in user.groups  # getgrouplist puts the primary gid in, as initgroups does


def test_pkexec_uid_is_used_without_sudo() -> None:
    entry = _existing()
    user = invoking_user({"PKEXEC_UID": str(entry.pw_uid)}, 0)
    assert (user.uid, user.gid, user.name) == (entry.pw_uid, entry.pw_gid, entry.pw_name)


def test_sudo_wins_over_pkexec() -> None:
    entry = _existing()
    assert invoking_user({"SUDO_UID": str(entry.pw_uid), "PKEXEC_UID": "0"}, 0).uid == entry.pw_uid


def test_no_launcher_means_the_real_uid() -> None:
    user = invoking_user({}, 0)
    assert (user.uid, user.name) == (0, pwd.getpwuid(0).pw_name)


def test_launcher_variables_are_ignored_when_not_started_as_root() -> None:
    # A non-root caller could set SUDO_UID=0 itself; only sudo/pkexec (real uid 0) are believed.
    entry = _existing()
    assert invoking_user({"SUDO_UID": "0", "PKEXEC_UID": "0"}, entry.pw_uid).uid == entry.pw_uid


@pytest.mark.parametrize("value", ["", "abc", "-1", "1.5", " 1000", "\uff11", "4294967295", "99999999999"])
@pytest.mark.parametrize("key", ["SUDO_UID", "PKEXEC_UID"])
def test_malformed_ids_are_refused_with_a_fix(key: str, value: str) -> None:
    with pytest.raises(PrivilegeError) as caught:
        invoking_user({key: value}, 0)
    assert key in str(caught.value)
    assert "sudo" in str(caught.value)


def test_malformed_sudo_gid_is_refused() -> None:
    entry = _existing()
    with pytest.raises(PrivilegeError, match="SUDO_GID"):
        invoking_user({"SUDO_UID": str(entry.pw_uid), "SUDO_GID": "wheel"}, 0)


def test_uid_without_passwd_entry_is_refused_with_a_fix() -> None:
    uid = _unused_uid()
    with pytest.raises(PrivilegeError) as caught:
        invoking_user({"SUDO_UID": str(uid)}, 0)
    message = str(caught.value)
    assert str(uid) in message
    assert "SUDO_UID" in message
    assert "passwd" in message


def test_user_is_immutable() -> None:
    user = invoking_user({}, 0)
    with pytest.raises(AttributeError):
        user.uid = 5  # type: ignore[misc]


@pytest.mark.parametrize(("status", "expected"), [(0, 0), (7 << 8, 7), (255 << 8, 255), (9, 137), (15, 143)])
def test_exit_status_is_the_code_or_128_plus_the_signal(status: int, expected: int) -> None:
    assert exit_status(status) == expected


def test_exit_status_ignores_the_core_dump_flag() -> None:
    assert exit_status(0x80 | signal.SIGSEGV) == 128 + signal.SIGSEGV


@pytest.mark.parametrize(
    ("si_code", "si_pid", "relay"),
    [
        (0, 1234, True),  # SI_USER: kill(1) from another process
        (-1, 1234, True),  # SI_QUEUE
        (SI_KERNEL, 0, False),  # ^C on the terminal already reached COMMAND's process group
        (0, 99, False),  # COMMAND itself: kill(0, ...) reached it already
    ],
)
def test_should_relay(si_code: int, si_pid: int, relay: bool) -> None:
    assert should_relay(si_code, si_pid, child=99) is relay


def test_default_forward_covers_the_documented_signals() -> None:
    assert set(DEFAULT_FORWARD) == {
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
        signal.SIGCONT,
    }
    assert signal.SIGKILL not in DEFAULT_FORWARD


def test_parse_status() -> None:
    text = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nCapBnd:\t0000000000000000\nNoNewPrivs:\t1\nbroken line\n"
    assert parse_status(text) == {
        "Name": "sh",
        "Uid": "1000\t1000\t1000\t1000",
        "CapBnd": "0000000000000000",
        "NoNewPrivs": "1",
    }


@pytest.mark.parametrize("code", [126, 127])
def test_exec_error_carries_its_exit_code(code: int) -> None:
    error = ExecError(code, "x: command not found")
    assert isinstance(error, NsfwError)
    assert error.exit_code == code
    assert str(error) == "x: command not found"


def test_privilege_problems_names_what_is_left() -> None:
    stranger = User(uid=3_999_998, gid=3_999_998, name="stranger", home="/", groups=(3_999_998,))
    status = {
        "Uid": "0\t0\t0\t0",
        "Gid": "0\t0\t0\t0",
        "CapInh": "0000000000000000",
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapBnd": "000001ffffffffff",
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "0",
    }
    problems = " ".join(privilege_problems(stranger, status))
    for expected in ("uids are", "gids are", "groups are", "CapBnd is 000001ffffffffff", "no_new_privs"):
        assert expected in problems
    assert "CapAmb" not in problems


