"""The sandbox's namespace has no conntrack (nsfw/compile.py): a UDP flow is remembered in a set its packets
fill, its replies come in by that set, it outlives the grant that opened it, and nothing unsolicited comes in.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .sandbox import NSFW, PY, baseline, profile_dir, snapshot_diff, write_profile
from .test_names import grant_set
from .test_untracked_tcp import Held

__all__ = ["baseline", "profile_dir", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")

ALLOWED, PORT, LISTEN = "192.0.2.10", 9999, 5353
PROFILE = f"allow: [{{host: allowed.test, ports: [{PORT}], proto: udp}}]\n"

# In the sandbox: one UDP flow to the world's echo server held open; its local port, then, on each line of
# stdin, an echo through it and one datagram from a new socket (a new flow) to the same address; then it
# listens on LISTEN for a datagram nobody asked for.
UDP_HOLD = f"""
import socket, sys
def echo(s):
    try:
        s.send(b"ping")
        return "echo" if s.recv(200) else "empty"
    except OSError as e:
        return f"failed {{e.errno}}"
    except TimeoutError:
        return "timeout"
addr = socket.getaddrinfo(sys.argv[1], {PORT}, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.connect((addr, {PORT}))
print(echo(s), flush=True)
print(s.getsockname()[1], flush=True)
while (line := sys.stdin.readline()) and line.strip() != "listen":
    n = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); n.settimeout(3); n.connect((addr, {PORT}))
    print(echo(s), flush=True)
    print("new " + echo(n), flush=True)
listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); listener.bind(("0.0.0.0", {LISTEN}))
listener.settimeout(2)
print("listening", flush=True)
try:
    print("got " + listener.recv(100).decode(), flush=True)
except TimeoutError:
    print("nothing", flush=True)
"""


class UdpHeld(Held):
    def __init__(self, world: Any, profile: str, target: str) -> None:
        self.world = world
        self.proc = world.popen([NSFW, "run", "-p", profile, "--", PY, "-c", UDP_HOLD, target],
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        try:
            self.first = self.proc.stdout.readline().strip()
            assert self.first == "echo", f"the app's flow did not work: {self.first!r}"
            self.port = int(self.proc.stdout.readline())
            self._record(profile)
        except BaseException:
            self.close()
            raise

    def line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()


def test_a_udp_flow_outlives_its_grant_and_leaves_no_conntrack_in_the_sandbox(world: Any,
                                                                            profile_dir: Path) -> None:
    p = write_profile(profile_dir, "udpflow", PROFILE)
    held = UdpHeld(world, p, "allowed.test")
    try:
        held.line("")
        assert [held.read(), held.read()] == ["echo", "new echo"]
        keys = [tuple(e["val"]["concat"]) for e in grant_set(world, held.record, "flows4")]
        assert (ALLOWED, PORT, held.port) in keys, keys  # the flow, as its packets put it there
        assert held.sandbox("cat", "/proc/net/nf_conntrack").stdout == ""  # no conntrack there at all
        gone = held.sandbox("nft", "delete", "element", "inet", "nsfw", "dns4_0", f"{{ {ALLOWED} }}")
        assert gone.returncode == 0, gone.stderr
        held.line("")
        assert held.read() == "echo"  # the open flow goes on
        assert held.read() == "new failed 1"  # a new one is refused at once: EPERM, send() meets the reject
    finally:
        held.line("listen")
        held.close()


def test_unsolicited_udp_does_not_reach_the_sandbox(world: Any, profile_dir: Path) -> None:
    """From the host itself (a forwarded datagram the host's table already drops): only a known flow's replies
    come in."""
    p = write_profile(profile_dir, "udpflow", PROFILE)
    held = UdpHeld(world, p, "allowed.test")
    try:
        held.line("listen")
        assert held.read() == "listening"
        before = _rx_packets(held)
        send = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                f"[s.sendto(b'hello', (sys.argv[1], {LISTEN})) for _ in range(3)]")
        sent = world.run([PY, "-c", send, held.addr])
        assert sent.returncode == 0, sent.stderr
        assert held.read() == "nothing"
        assert _rx_packets(held) >= before + 3  # they reached the sandbox's link: its table dropped them
    finally:
        held.close()


def _rx_packets(held: Held) -> int:
    links = json.loads(held.sandbox("ip", "-j", "-s", "link", "show").stdout)
    return sum(link["stats64"]["rx"]["packets"] for link in links if link["ifname"] != "lo")
