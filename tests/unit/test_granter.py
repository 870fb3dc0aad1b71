"""The granter writes into the sandbox's host table, which holds a `nat` sandbox's policy, and only into its
known grant sets."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from nsfw import dns, nft


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, Any]]]:
    calls: list[list[dict[str, Any]]] = []
    monkeypatch.setattr(nft, "apply", lambda cmds, what="": calls.append(cmds))
    return calls


def granter(groups: int = 2, deny: bool = True) -> dns.Granter:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    return dns.Granter("nsfw-0123abcd", groups, deny, ours)


def test_grants_go_to_the_sandboxs_host_table(sent: list[list[dict[str, Any]]]) -> None:
    g = granter()
    g.apply([["h1", "192.0.2.1", 30], ["deny", "2001:db8::1", 5]])
    (cmds,) = sent
    adds = [c["add"]["element"] for c in cmds if "add" in c]
    assert {(e["family"], e["table"]) for e in adds} == {("inet", "nsfw-0123abcd")}
    got = {(e["name"], e["elem"][0]["elem"]["val"]) for e in adds}
    assert got == {("dns4_1", "192.0.2.1"), ("dnsdeny6", "2001:db8::1")}
    assert all(e["elem"][0]["elem"]["timeout"] >= dns.MIN_GRANT for e in adds)


@pytest.mark.parametrize("request_", [[["h2", "192.0.2.1", 30]], [["deny", "192.0.2.1", 30]],
                                      [["dns4_0", "192.0.2.1", 30]], [["h0", "not-an-address", 30]],
                                      [["h0", "192.0.2.1", 0]], [["h0", "192.0.2.1", 10**9]]])
def test_only_known_sets_addresses_and_bounded_timeouts(sent: list[list[dict[str, Any]]],
                                                        request_: list[list[Any]]) -> None:
    with pytest.raises(ValueError):
        granter(groups=2, deny=False).apply(request_)
    assert sent == []
