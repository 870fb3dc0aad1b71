"""There is no conntrack in the sandbox's namespace (nsfw/compile.py): only a connection's first SYN is classified
there, the host's table drops TCP its conntrack never saw open with a SYN, and ICMP errors about TCP flows are
taken as such. Crafted packets come from raw sockets as root in the sandbox's namespace (what an app could send
if it held CAP_NET_RAW, which nsfw never gives it: the host's table must hold without the sandbox's help).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .sandbox import NSFW, PY, baseline, profile_dir, snapshot_diff, write_profile
from .test_names import grant_set

__all__ = ["baseline", "profile_dir", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")

ALLOWED, BLOCKED_ADDR, PORT = "192.0.2.10", "192.0.2.11", 22
PROFILE = f"""\
allow: [{{zone: internet, ports: [{PORT}], proto: tcp}}, {{host: allowed.test, ports: [{PORT}], proto: tcp}}]
deny: [{BLOCKED_ADDR}]
"""

CSUM = """
import socket, struct, sys
def csum(b):
    b += b"\\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
"""

# In the inet namespace: the sequence numbers of the marked TCP segments that arrive, once the control has.
SNIFF = CSUM + """
import time
marks, control = {int(x) for x in sys.argv[1].split(",")}, int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800)); s.settimeout(0.2)
print("ready", flush=True)
seen, deadline = set(), time.monotonic() + 20
while control not in seen and time.monotonic() < deadline:
    try:
        d = s.recv(65535)
    except TimeoutError:
        continue
    ihl = (d[0] & 15) * 4
    if len(d) >= ihl + 8 and d[9] == 6 and struct.unpack("!I", d[ihl + 4:ihl + 8])[0] in marks:
        seen.add(struct.unpack("!I", d[ihl + 4:ihl + 8])[0])
print(" ".join(map(str, sorted(seen))), flush=True)
"""

# In the sandbox's namespace: bare TCP segments, `dst:dport:sport:seq:flags` each, from its own address.
SEND = CSUM + """
src = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
for spec in sys.argv[2:]:
    dst, dport, sport, seq, flags = spec.split(":")
    hdr = struct.pack("!HHIIBBHHH", int(sport), int(dport), int(seq), 1 if flags != "2" else 0, 5 << 4,
                      int(flags), 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
    s.sendto(hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:], (dst, 0))
"""

# In the inet namespace: "fragmentation needed" (MTU 1200) about the TCP flow src:sport -> dst:dport, from dst.
FRAG_NEEDED = CSUM + """
src, dst, sport, dport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1500, 0, 0x4000, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
body = struct.pack("!BBHHH", 3, 4, 0, 0, 1200) + ip + struct.pack("!HHI", sport, dport, 1)
body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.bind((dst, 0))
s.sendto(body, (src, 0))
"""

# In the sandbox: a TCP connection held open; its local port, then, on each line of stdin, an echo through it
# and one new connection to the same address.
HOLD = """
import socket, sys
addr = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
s = socket.create_connection((addr, int(sys.argv[2])), timeout=5)
s.recv(200)
print(s.getsockname()[1], flush=True)
while sys.stdin.readline():
    s.sendall(b"still here\\n")
    print("echo", s.recv(200).decode().strip(), flush=True)
    try:
        socket.create_connection((addr, int(sys.argv[2])), timeout=3).close()
        print("new reached", flush=True)
    except OSError as e:
        print("new failed", e.errno, flush=True)
"""


class Held:
    """A sandbox whose app holds one TCP connection, and the sandbox's record."""

    def __init__(self, world: Any, profile: str, target: str) -> None:
        self.world = world
        self.proc = world.popen([NSFW, "run", "-p", profile, "--", PY, "-c", HOLD, target, str(PORT)],
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        try:
            line = self.proc.stdout.readline().strip()
            assert line.isdigit(), f"the app did not connect: {line!r}"
            self.port = int(line)
            self._record(profile)
        except BaseException:
            self.close()
            raise

    def _record(self, profile: str) -> None:
        listing = self.world.run(["sh", "-c", "cat /run/nsfw/sandboxes/*.json"]).stdout
        (self.record,) = [r for r in (json.loads(c) for c in listing.replace("}\n{", "}\x00{").split("\x00")
                                      if c.strip()) if r.get("profile_path") == profile]
        self.addr = self.record["addresses"][0].split("/")[0]

    def ask(self) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return [self.proc.stdout.readline().strip(), self.proc.stdout.readline().strip()]

    def sandbox(self, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """As root in the sandbox's namespace (the app itself has no capability)."""
        return self.world.run(["ip", "netns", "exec", self.record["netns"], *argv], **kw)

    def close(self) -> None:
        try:
            self.proc.communicate(input="", timeout=30)
        except ValueError:
            self.proc.wait(timeout=30)


def host_conntrack(world: Any) -> str:
    return str(world.run(["cat", "/proc/net/nf_conntrack"]).stdout)


def test_mid_stream_tcp_from_the_sandbox_reaches_nobody_and_opens_no_flow(world: Any, profile_dir: Path) -> None:
    """With nf_conntrack_tcp_loose (the kernel's default), a bare ACK would open a flow on the host that the
    sandbox's table never classified: toward an allowed destination it would sidestep nothing, toward a blocked
    one everything. The host's table drops both; a SYN through the same raw socket, the control, arrives."""
    assert world.run(["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose"]).stdout.strip() == "1"
    p = write_profile(profile_dir, "rawtcp", PROFILE)
    held = Held(world, p, ALLOWED)
    try:
        rng = random.Random()
        ports = rng.sample(range(40000, 60000), 6)
        marks = rng.sample(range(1 << 20, 1 << 31), 6)
        ack, psh_ack, fin_ack, rst = "16", "24", "17", "4"
        stray = [(ALLOWED, ack), (ALLOWED, psh_ack), (ALLOWED, fin_ack), (BLOCKED_ADDR, ack), (BLOCKED_ADDR, rst)]
        specs = [f"{dst}:{PORT}:{ports[i]}:{marks[i]}:{flags}" for i, (dst, flags) in enumerate(stray)]
        control = f"{ALLOWED}:{PORT}:{ports[5]}:{marks[5]}:2"
        sniff = world.popen([PY, "-c", SNIFF, ",".join(map(str, marks)), str(marks[5])], ns="inet",
                            stdout=subprocess.PIPE, text=True)
        try:
            assert sniff.stdout is not None and sniff.stdout.readline().strip() == "ready"
            sent = held.sandbox(PY, "-c", SEND, held.addr, *specs, control)
            assert sent.returncode == 0, sent.stderr
            seen, _ = sniff.communicate(timeout=30)
        finally:
            if sniff.poll() is None:
                sniff.kill()
                sniff.wait()
        assert seen.split() == [str(marks[5])], f"marked segments that reached the internet: {seen}"
        table = host_conntrack(world)
        assert f"sport={ports[5]} dport={PORT}" in table  # the control's flow: the check can see flows
        for port in ports[:5]:
            assert f"sport={port} " not in table, f"a segment without SYN opened a flow on the host: {table}"
        assert held.ask() == ["echo still here", "new reached"]  # the real connection was not disturbed
    finally:
        held.close()


def test_tcp_leaves_no_conntrack_entry_in_the_sandbox(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "rawtcp", PROFILE)
    held = Held(world, p, ALLOWED)
    try:
        assert held.ask() == ["echo still here", "new reached"]
        mine = held.sandbox("cat", "/proc/net/nf_conntrack").stdout
        assert " tcp " not in mine, mine
        assert f"sport={held.port} dport={PORT}" in host_conntrack(world)  # the host's conntrack follows it
    finally:
        held.close()


def test_tcp_to_a_granted_name_outlives_the_grant(world: Any, profile_dir: Path) -> None:
    """Only a connection's first SYN is classified: once the grant is gone, new connections fail and the open
    one goes on."""
    p = write_profile(profile_dir, "rawtcp", PROFILE.replace("zone: internet", f"cidr: {BLOCKED_ADDR}"))
    held = Held(world, p, "allowed.test")
    try:
        world.run(["sleep", "1.1"])  # past VERDICT_TTL: the next connection is classified afresh...
        assert held.ask() == ["echo still here", "new reached"]
        cached = [e["val"]["concat"] for e in grant_set(world, held.record, "seen4")]
        assert cached == [[ALLOWED, PORT]]  # ...and its verdict cached, without the (random) local port
        assert [e["val"] for e in grant_set(world, held.record, "dns4_0")] == [ALLOWED]
        gone = held.sandbox("nft", "delete", "element", "inet", "nsfw", "dns4_0", f"{{ {ALLOWED} }}")
        assert gone.returncode == 0, gone.stderr
        world.run(["sleep", "1.1"])  # a cached verdict lasts VERDICT_TTL at most
        assert held.ask() == ["echo still here", "new failed 113"]  # EHOSTUNREACH: the ruleset's reject
    finally:
        held.close()


def _dest_unreachables(held: Held) -> int:
    lines = [line.split() for line in held.sandbox("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InDestUnreachs")])


def test_path_mtu_errors_about_tcp_reach_the_sandbox(world: Any, profile_dir: Path) -> None:
    """TCP is untracked in the sandbox, so its conntrack cannot call such an error related: the sandbox takes
    them as such, and the host's conntrack forwards only those about a flow it knows."""
    p = write_profile(profile_dir, "rawtcp", PROFILE)
    held = Held(world, p, ALLOWED)
    try:
        (entry,) = [line for line in host_conntrack(world).splitlines()
                    if f"src={held.addr} dst={ALLOWED} sport={held.port} dport={PORT} " in line]
        fields = [f.split("=", 1) for f in entry.split() if "=" in f]
        reply = dict(fields[4:8])  # the flow as the internet sees it, after the host's NAT
        nat_addr, nat_port = reply["dst"], int(reply["dport"])
        before = _dest_unreachables(held)
        unknown = world.run([PY, "-c", FRAG_NEEDED, nat_addr, ALLOWED, str(nat_port ^ 1), str(PORT)], ns="inet")
        assert unknown.returncode == 0, unknown.stderr
        known = world.run([PY, "-c", FRAG_NEEDED, nat_addr, ALLOWED, str(nat_port), str(PORT)], ns="inet")
        assert known.returncode == 0, known.stderr
        after = before
        for _ in range(100):
            after = _dest_unreachables(held)
            if after != before:
                break
            world.run(["sleep", "0.05"])
        assert after == before + 1  # the error about the flow arrived; the one about no flow did not
    finally:
        held.close()
