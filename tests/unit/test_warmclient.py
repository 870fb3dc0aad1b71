"""The warm launch request: what the client sends is what the daemon reads, whatever the bytes."""

from __future__ import annotations

import pytest

from nsfw import warmclient


def test_a_request_round_trips() -> None:
    argv = ["sh", "-c", "echo 'a b'", "", "caf\udce9"]  # an empty argument, and bytes that are not UTF-8
    env = {b"PATH": b"/bin", b"EMPTY": b"", b"EQ": b"a=b=c", b"RAW": b"\xe9t\xe9"}
    data = warmclient.encode(argv, b"/tmp/d\xe9", 0o027, env)
    got_argv, cwd, umask, got_env = warmclient.decode(data)
    assert got_argv == argv and umask == 0o027
    assert cwd.encode("utf-8", "surrogateescape") == b"/tmp/d\xe9"
    assert {k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
            for k, v in got_env.items()} == env


@pytest.mark.parametrize("data", [b"", b"nsfw-warm-1\0/\0" + b"1\0true", b"nsfw-warm-2\0/\0022\0" + b"3\0true",
                                  b"nsfw-warm-2\0/\0022\0x\0true"])
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        warmclient.decode(data)


def test_an_entry_without_a_name_is_dropped() -> None:
    _argv, _cwd, _umask, env = warmclient.decode(warmclient.encode(["true"], b"/", 0o22, {b"A": b"1"}) + b"\0=x\0y")
    assert env == {"A": "1"}
