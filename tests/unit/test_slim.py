"""The slim images' parts that need no namespace: the waiter's wait and exec, the resolver's hand-over record,
the granter's pause and state, the keeper's watch. (tests/integration/test_slim.py runs them in sandboxes.)"""

from __future__ import annotations

import json
import marshal
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from nsfw import granter, slimkeeper, waiter
from nsfw.resolver import entry
from nsfw.resolver.cache import Grant

ROOT = Path(__file__).resolve().parents[2]


def until(what: Any, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(what())


# ---------------------------------------------------------------------------------------------- the waiter


def _supervise(script: str, grace: float) -> subprocess.Popen[str]:
    """A process that starts `sh -c script` and waits for it as sandbox.run does (no keeper)."""
    code = textwrap.dedent(f"""
        import subprocess, sys
        sys.path.insert(0, {str(ROOT)!r})
        from nsfw import waiter
        waiter.GRACE = {grace}
        child = subprocess.Popen(["sh", "-c", {script!r}])
        print("started", flush=True)
        sys.exit(waiter.wait(child.pid, None, "norecord"))
    """)
    proc = subprocess.Popen([sys.executable, "-I", "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    return proc


def _slim(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[2:4] == [waiter.SCRIPT.encode(), b"waiter"]


def test_a_short_command_never_execs_the_waiter() -> None:
    proc = _supervise("exit 5", grace=30)
    assert proc.wait(timeout=30) == 5


def test_the_slim_waiter_returns_the_status_and_relays_signals() -> None:
    proc = _supervise("trap 'exit 42' TERM; while :; do sleep 0.02; done", grace=0.1)
    try:
        assert until(lambda: _slim(proc.pid))
        proc.send_signal(signal.SIGTERM)  # from another process: relayed, as before the exec
        assert proc.wait(timeout=30) == 42
    finally:
        proc.kill()


def test_the_slim_waiter_reports_death_by_signal() -> None:
    proc = _supervise("sleep 0.5; kill -USR2 $$", grace=0.1)
    assert proc.wait(timeout=30) == 128 + signal.SIGUSR2


def test_a_signal_around_the_switch_is_relayed() -> None:
    # blocked all along: one that arrives while the new image starts waits in the mask, then is relayed
    proc = _supervise("trap 'exit 43' HUP; while :; do sleep 0.02; done", grace=0.3)
    try:
        time.sleep(0.3)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=30) == 43
    finally:
        proc.kill()


# ---------------------------------------------------------------------------------------------- the resolver


def test_grant_requests_are_the_json_the_granter_reads() -> None:
    items = [Grant("h0", "192.0.2.10", 65), Grant("deny", "2001:db8::1", 70)]
    assert json.loads(entry.encode_grants(items)) == [["h0", "192.0.2.10", 65], ["deny", "2001:db8::1", 70]]
    for bad in (Grant('h0"]', "192.0.2.10", 1), Grant("h0", '1"', 1)):
        with pytest.raises(ValueError):
            entry.encode_grants([bad])


def test_resolver_record_round_trip() -> None:
    fd = entry.pack([3], [4, 5], 6, 7, [("a.test", "h0")], ["b.test"], True, ["192.0.2.53"], ["10.0.0.1"])
    assert os.get_inheritable(fd)  # handed across the exec
    got = marshal.loads(entry._read_all(fd))
    assert got == ([3], [4, 5], 6, 7, [("a.test", "h0")], ["b.test"], True, ["192.0.2.53"], ["10.0.0.1"], 0)
    fd = entry.pack([3], [4], 6, 7, [], [], False, [], [], 60)
    assert marshal.loads(entry._read_all(fd))[-1] == 60  # the granter's floor reaches the resolver's image


def test_never_grant() -> None:
    import ipaddress

    check = entry.never_grant([ipaddress.ip_address("198.18.0.2")])
    assert check(ipaddress.ip_address("198.18.0.2")) and check(ipaddress.ip_address("127.0.0.1"))
    assert check(ipaddress.ip_address("255.255.255.255")) and check(ipaddress.ip_address("::"))
    assert not check(ipaddress.ip_address("192.0.2.10"))


# ---------------------------------------------------------------------------------------------- the granter


class _Recording(granter.Granter):
    def apply(self, grants: Any) -> None:
        self.seen = [*getattr(self, "seen", []), grants]


@pytest.mark.skipif(os.geteuid() != 0, reason="the granter enters a network namespace: run as root")
def test_a_paused_granter_leaves_requests_to_the_next_one() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(10)
    first = _Recording("/proc/self/ns/net", 1, False, ours)
    first.expiry[("dns4_0", "192.0.2.10")] = 123.5
    first.timeouts[("dns4_0", "192.0.2.10")] = 61
    first.start()
    theirs.send(b'[["h0","192.0.2.10",60]]')
    assert theirs.recv(64) == b"ok"
    first.pause()
    theirs.send(b'[["h0","192.0.2.11",60]]')
    time.sleep(0.2)  # the first granter wakes for it, and must leave it alone
    second = _Recording.from_state(first.state(), ours)
    assert second.expiry == first.expiry and second.timeouts == first.timeouts
    second.start()
    assert theirs.recv(64) == b"ok"
    assert getattr(second, "seen", None) == [[["h0", "192.0.2.11", 60]]]
    assert first.seen == [[["h0", "192.0.2.10", 60]]]


# ---------------------------------------------------------------------------------------------- the keeper


def test_watch_kills_the_tree_when_the_supervisor_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    killed: list[Any] = []
    monkeypatch.setattr(slimkeeper, "kill_all", killed.append)
    r, w = os.pipe()
    os.close(w)
    slimkeeper.Watch(r, -1).run((1, 2), lambda: pytest.fail("never asked"))  # type: ignore[func-returns-value]
    assert killed == [(1, 2)]
    os.close(r)


def test_watch_lingers_after_exit_then_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slimkeeper, "LINGER_POLL", 0.01)
    monkeypatch.setattr(slimkeeper, "kill_all", lambda ns: pytest.fail("nothing to kill"))
    r, w = os.pipe()
    back_r, back_w = os.pipe()
    os.write(w, b"exit")
    answers = iter([False, False, True])
    watch = slimkeeper.Watch(r, back_w)
    watch.run((1, 2), lambda: next(answers))
    assert os.read(back_r, 64) == b"linger" and watch.to_supervisor == -1
    for fd in (r, w, back_r):
        os.close(fd)


def test_watch_slims_once_after_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slimkeeper, "GRACE", 0.05)
    r, w = os.pipe()
    calls: list[bool] = []

    def slim(watch: slimkeeper.Watch) -> None:  # an exec that failed: the watch goes on
        calls.append(watch.handed_over)
        os.write(w, b"exit")

    slimkeeper.Watch(r, -1).run((1, 2), lambda: True, slim)
    assert calls == [False]
    for fd in (r, w):
        os.close(fd)


def test_watch_wakes_the_granter_once_on_its_first_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slimkeeper, "LINGER_POLL", 0.01)
    r, w = os.pipe()
    req_r, req_w = os.pipe()
    woken: list[int] = []

    def wake() -> None:  # the granter thread would read the request; here it stays readable
        woken.append(1)
        os.write(w, b"exit")

    os.write(req_w, b"request")
    answers = iter([False, False, True])
    slimkeeper.Watch(r, -1).run((1, 2), lambda: next(answers), wake=(req_r, wake))
    assert woken == [1]
    for fd in (r, w, req_r, req_w):
        os.close(fd)


def test_the_resolvers_sockets_without_the_socket_module() -> None:
    import socket as real

    from nsfw.resolver import sockets

    listener = sockets.socket(sockets.AF_INET, sockets.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = real.create_connection(listener.getsockname(), timeout=10)
    conn, addr = listener.accept()
    assert isinstance(conn, sockets.socket) and addr == client.getsockname()
    conn.send(b"hi")
    assert client.recv(2) == b"hi"
    assert sockets.inet_ntop(sockets.AF_INET6, bytes(16)) == "::"
    for s in (conn, listener, client):
        s.close()


def _question(qid: int, name: str) -> bytes:
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + (1).to_bytes(2, "big") * 2
    return qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + wire


def test_the_slim_resolver_serves_on_what_it_was_handed(tmp_path: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log = open(tmp_path / "dns.log", "a+b", buffering=0)  # noqa: SIM115
    handed = [udp.fileno(), tcp.fileno(), theirs.fileno(), log.fileno()]
    for fd in handed:
        os.set_inheritable(fd, True)
    spec = entry.pack([udp.fileno()], [tcp.fileno()], theirs.fileno(), log.fileno(), [("allowed.test", "h0")],
                      ["denied.test"], False, ["127.0.0.1#9"], [])
    proc = subprocess.Popen(entry.argv(spec), pass_fds=(spec, *handed), stderr=subprocess.PIPE)
    try:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(10)
        client.sendto(_question(0x1234, "denied.test"), udp.getsockname())
        reply = client.recv(512)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == 3, reply  # NXDOMAIN, from the policy
        conn = socket.create_connection(tcp.getsockname(), timeout=10)  # accept() of the slim sockets
        q = _question(0x4321, "unlisted.test")
        conn.sendall(len(q).to_bytes(2, "big") + q)
        size = int.from_bytes(conn.recv(2), "big")
        reply = conn.recv(size)
        assert reply[:2] == b"\x43\x21" and reply[3] & 0x0F in (3, 5), reply  # refused without asking anyone
        for s in (client, conn):
            s.close()
        assert proc.poll() is None
    finally:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        for s in (udp, tcp, ours, theirs, log):
            s.close()
        os.close(spec)
    assert not err, err
