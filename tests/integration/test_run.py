"""`nsfw run` end to end, in the simulated world: real namespaces, real rulesets, real sockets.

Every test runs nsfw on the world's simulated host and probes with real connections from inside the sandbox.
After each test the host must be exactly as before (namespaces, links, ruleset, sysctls, records).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from nsfw.sandbox import SETUP_STEPS

from .sandbox import (
    BLOCKED,
    NSFW,
    PY,
    REACHED,
    as_user,
    baseline,
    probe,
    profile_dir,
    reached,
    run,
    snapshot_diff,
    write_profile,
)

__all__ = ["baseline", "profile_dir", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")


# ---------------------------------------------------------------------------------------------- zones


def test_default_profile_reaches_internet_through_nat_and_nothing_else(world: Any) -> None:
    code, out = probe(world, "default", "tcp", "192.0.2.10", 80)
    assert code == REACHED and out.endswith("from 198.18.0.2"), out  # masqueraded behind the host's uplink
    code, out = probe(world, "default", "udp", "203.0.113.30", 9999)
    assert code == REACHED and out.endswith("from 198.18.0.2"), out
    assert not reached(world, "default", "tcp", "10.77.0.10", 80)  # the home network
    assert not reached(world, "default", "tcp", "198.18.0.1", 80)  # a network connected to the host is lan
    assert not reached(world, "default", "tcp", "198.18.0.2", 631)  # the host itself


def test_blocked_connections_fail_at_once(world: Any) -> None:
    start = time.monotonic()
    code, out = probe(world, "default", "tcp", "10.77.0.10", 80)
    assert code == BLOCKED and "EHOSTUNREACH" in out, out
    assert time.monotonic() - start < 1.5, "a blocked connection should not wait for a timeout"


BURST = """
import errno, socket, sys
codes = []
for port in range(1000, 1020):
    s = socket.socket(); s.settimeout(3)
    codes.append(s.connect_ex((sys.argv[1], port)))
    s.close()
print(" ".join(errno.errorcode.get(c, str(c)) for c in codes))
"""


@pytest.mark.parametrize(("addr", "error"), [("10.77.0.10", "EHOSTUNREACH"), ("fd77::10", "EACCES")])
def test_a_burst_of_blocked_connections_all_fail_at_once(world: Any, addr: str, error: str) -> None:
    """Every reject is answered, however many come at once: generated inside the sandbox, where the error goes
    over loopback, not by the host, whose ICMP rate limit (a burst of 6, then 1/s per destination) would leave
    the rest waiting for a timeout."""
    done = run(world, "default", PY, "-c", BURST.replace("socket.socket()", "socket.socket(socket.AF_INET6)")
               if ":" in addr else BURST, addr)
    assert done.stdout.split() == [error] * 20, done.stdout + done.stderr  # admin-prohibited, as IPv4 and IPv6 say it


def test_ipv6_through_nat(world: Any) -> None:
    code, out = probe(world, "default", "tcp", "2001:db8::10", 443)
    assert code == REACHED and out.endswith("from 2001:db8:ff::2"), out
    assert not reached(world, "default", "tcp", "fd77::10", 80)


def test_lan_zone_includes_connected_networks(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "lanonly", "allow: [lan]\n")
    assert reached(world, p, "tcp", "10.77.0.10", 80)
    assert reached(world, p, "tcp", "fd77::10", 80)
    assert reached(world, p, "tcp", "198.18.0.1", 80)  # not a private range, but connected to the host
    assert not reached(world, p, "tcp", "192.0.2.10", 80)
    assert not reached(world, p, "tcp", "198.18.0.2", 631)


def test_any_zone_is_internet_and_lan_but_not_host(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "anyz", "allow: [any]\n")
    assert reached(world, p, "tcp", "192.0.2.10", 80)
    assert reached(world, p, "tcp", "10.77.0.10", 80)
    assert not reached(world, p, "tcp", "198.18.0.2", 631)
    assert not reached(world, p, "tcp", "10.213.0.1", 631)


def test_host_only_where_a_rule_names_it(world: Any, profile_dir: Path) -> None:
    cidr_all = write_profile(profile_dir, "cidrall", "allow: [0.0.0.0/0]\ndefault: allow\n")
    assert not reached(world, cidr_all, "tcp", "198.18.0.2", 631)
    p = write_profile(profile_dir, "printer", """\
        allow:
          - {zone: host, ports: [631], proto: tcp}
        """)
    assert reached(world, p, "tcp", "198.18.0.2", 631)
    assert reached(world, p, "tcp", "10.77.0.1", 631)  # every address of the host
    code, out = probe(world, p, "tcp", "2001:db8:ff::2", 631)
    assert code == REACHED, out
    assert not reached(world, p, "tcp", "198.18.0.2", 8631)  # other ports stay closed
    assert not reached(world, p, "tcp", "192.0.2.10", 80)
    # the gateway is the host too
    probe_gw = f"gw=$(ip -4 route show default | cut -d' ' -f3); {' '.join(world.probe_argv('tcp'))} $gw 631"
    gw = run(world, p, "sh", "-c", probe_gw)
    assert gw.returncode == REACHED and "world host" in gw.stdout, gw.stdout + gw.stderr


# ---------------------------------------------------------------------------------------------- rules


def test_cidr_ports_and_proto(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "web", """\
        allow:
          - cidr: 192.0.2.0/24
            ports: [443, "8000-8100"]
            proto: tcp
        """)
    assert reached(world, p, "tcp", "192.0.2.10", 443)
    assert reached(world, p, "tcp", "192.0.2.11", 8080)
    assert not reached(world, p, "tcp", "192.0.2.10", 80)
    assert not reached(world, p, "udp", "192.0.2.10", 443)  # tcp only
    assert not reached(world, p, "tcp", "198.51.100.20", 443)  # another network
    assert not reached(world, p, "tcp", "2001:db8::10", 443)  # an IPv4 rule never opens IPv6


def test_udp_only_and_any_with_ports(world: Any, profile_dir: Path) -> None:
    udp = write_profile(profile_dir, "udp", "allow: [{cidr: 203.0.113.0/24, proto: udp}]\n")
    assert reached(world, udp, "udp", "203.0.113.30", 9999)
    assert not reached(world, udp, "tcp", "203.0.113.30", 80)
    both = write_profile(profile_dir, "both", "allow: [{cidr: 203.0.113.30, ports: [443]}]\n")
    assert reached(world, both, "tcp", "203.0.113.30", 443)
    assert reached(world, both, "udp", "203.0.113.30", 443)
    assert not reached(world, both, "udp", "203.0.113.30", 9999)


ICMP_PROBE = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM, socket.IPPROTO_ICMP if fam == socket.AF_INET else socket.IPPROTO_ICMPV6)
s.settimeout(2)
try:
    s.sendto(bytes([8 if fam == socket.AF_INET else 128, 0, 0, 0, 0, 0, 0, 1]) + b"nsfw", (sys.argv[1], 0))
    s.recv(100)
except OSError as e:
    print("no", e); sys.exit(3)
print("pong")
"""


def test_icmp_rule(world: Any, profile_dir: Path) -> None:
    world.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
    try:
        icmp = write_profile(profile_dir, "icmp", "allow: [{cidr: 192.0.2.0/24, proto: icmp}, "
                                                  "{cidr: '2001:db8::/32', proto: icmp}]\n")
        assert run(world, icmp, PY, "-c", ICMP_PROBE, "192.0.2.10").stdout.strip() == "pong"
        assert run(world, icmp, PY, "-c", ICMP_PROBE, "2001:db8::10").stdout.strip() == "pong"
        assert not reached(world, icmp, "tcp", "192.0.2.10", 80)
        tcp = write_profile(profile_dir, "tcponly", "allow: [{cidr: 192.0.2.0/24, proto: tcp}]\n")
        assert run(world, tcp, PY, "-c", ICMP_PROBE, "192.0.2.10").returncode == 3
    finally:
        world.run(["sysctl", "-qw", "net.ipv4.ping_group_range=1 0"])


def test_deny_wins_over_allow(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "denywins", """\
        allow: [internet, {cidr: 10.77.0.10}]
        deny:
          - 192.0.2.10
          - {cidr: 198.51.100.0/24, ports: [80]}
          - lan
        """)
    assert not reached(world, p, "tcp", "192.0.2.10", 80)
    assert reached(world, p, "tcp", "192.0.2.11", 80)
    assert not reached(world, p, "tcp", "198.51.100.20", 80)
    assert reached(world, p, "tcp", "198.51.100.20", 443)
    assert not reached(world, p, "tcp", "10.77.0.10", 80)  # allowed by cidr, denied by zone: deny wins


def test_file_lists_block_and_open_as_their_lines_say(world: Any, profile_dir: Path) -> None:
    """A blocklist of thousands of lines (overlapping, adjacent, repeated, IPv6, a comment, a name), and an
    allow list with ports: the kernel holds what each line says, and nothing more."""
    scatter = [f"100.{64 + i // 250 % 64}.{i % 250}.0/24" for i in range(3000)]  # lan space, far from the probes
    block = [*scatter, "192.0.2.10", "192.0.2.8/31", "192.0.2.12/30", "192.0.2.10/32  # again",
             "198.51.100.0/25", "2001:db8::10/128", "ads.example.com"]
    (profile_dir / "block.txt").write_text("# a blocklist\n" + "\n".join(block) + "\n")
    (profile_dir / "open.txt").write_text("203.0.113.0/24\n")
    for name in ("block.txt", "open.txt"):
        (profile_dir / name).chmod(0o644)
    p = write_profile(profile_dir, "listed", """\
        allow:
          - internet
          - {file: open.txt, ports: [22], proto: tcp}
        deny:
          - {file: block.txt}
        """)
    assert not reached(world, p, "tcp", "192.0.2.10", 80)  # the end of 192.0.2.8-10, merged from two lines
    assert reached(world, p, "tcp", "192.0.2.11", 80)  # the one address between it and 192.0.2.12/30
    assert not reached(world, p, "tcp", "198.51.100.20", 443)
    assert not reached(world, p, "tcp", "2001:db8::10", 80)
    assert reached(world, p, "tcp", "203.0.113.30", 443)  # the internet zone allows it anyway


def test_default_allow_keeps_denies_and_host_closed(world: Any, profile_dir: Path) -> None:
    p = write_profile(profile_dir, "open", "default: allow\ndeny: [lan]\n")
    assert reached(world, p, "tcp", "203.0.113.30", 22)
    assert not reached(world, p, "tcp", "10.77.0.10", 80)
    assert not reached(world, p, "tcp", "198.18.0.2", 631)


def test_ipv6_rules_and_switch(world: Any, profile_dir: Path) -> None:
    v6 = write_profile(profile_dir, "v6", "allow: [{cidr: '2001:db8::/64'}]\n")
    assert reached(world, v6, "tcp", "2001:db8::10", 80)
    assert not reached(world, v6, "tcp", "192.0.2.10", 80)
    off = write_profile(profile_dir, "nov6", "allow: [internet]\nipv6: false\n")
    assert reached(world, off, "tcp", "192.0.2.10", 80)
    code, out = probe(world, off, "tcp", "2001:db8::10", 80)
    assert code == BLOCKED, out


def test_network_none_has_only_loopback(world: Any) -> None:
    code, out = probe(world, "offline", "tcp", "192.0.2.10", 80)
    assert code == BLOCKED, out
    links = run(world, "offline", "ip", "-o", "link")
    assert links.returncode == 0 and links.stdout.count(": ") == 2 and " lo:" in links.stdout, links.stdout


LOOPBACK = """
import socket
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname(), 2); a, _ = srv.accept(); a.sendall(b"ok"); print(c.recv(2).decode())
"""


@pytest.mark.parametrize("prof", ["offline", "default"])
def test_loopback_always_works(world: Any, prof: str) -> None:
    done = run(world, prof, PY, "-c", LOOPBACK)
    assert done.stdout.strip() == "ok", done.stderr


LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 7777)); s.listen(5)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(("192.0.2.1", 9)); own = u.getsockname()[0]
c = socket.create_connection((own, 7777), 2); a, _ = s.accept()  # the listener works: from inside it is reached
print("listening", flush=True)
s.settimeout(float(sys.argv[1]))
try:
    c, peer = s.accept(); print("accepted", peer, flush=True)
except OSError:
    print("nobody", flush=True)
"""


def _sandbox_address(world: Any, before: set[str]) -> str:
    for _ in range(100):
        recs = world.run(["sh", "-c", "cat /run/nsfw/sandboxes/*.json 2>/dev/null"]).stdout
        if '"addresses"' in recs:
            import json
            for chunk in recs.replace("}\n{", "}\x00{").split("\x00"):
                rec = json.loads(chunk)
                if rec["id"] not in before and rec["addresses"]:
                    return str(rec["addresses"][0]).split("/")[0]
        time.sleep(0.05)
    raise AssertionError("no sandbox record appeared")


def test_no_new_connections_into_the_sandbox_nor_between_sandboxes(world: Any) -> None:
    server = world.popen([NSFW, "run", "-p", "default", "--", PY, "-c", LISTEN, "6"],
                         env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        addr = _sandbox_address(world, set())
        from_host = world.run(world.probe_argv("tcp", addr, 7777), env={"NSFW_PROBE_TIMEOUT": "1"})
        assert from_host.returncode != REACHED, from_host.stdout
        from_lan = world.run(world.probe_argv("tcp", addr, 7777), ns="lan", env={"NSFW_PROBE_TIMEOUT": "1"})
        assert from_lan.returncode != REACHED, from_lan.stdout
        code, out = probe(world, "default", "tcp", addr, 7777, new=True)  # from another sandbox
        assert code != REACHED, out
    finally:
        out, _ = server.communicate(timeout=30)
    assert "nobody" in out and "accepted" not in out


# ---------------------------------------------------------------------------------------------- the process


STATUS = "import os;print(open('/proc/self/status').read());print('FDS', sorted(os.listdir('/proc/self/fd')))"


def _status(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def test_command_runs_as_invoking_user_without_capabilities(world: Any, test_user: Any) -> None:
    done = run(world, "default", PY, "-c", STATUS, env=as_user(test_user))
    assert done.returncode == 0, done.stderr
    st = _status(done.stdout)
    assert st["Uid"].split() == [str(test_user.uid)] * 4
    assert st["Gid"].split() == [str(test_user.gid)] * 4
    assert sorted(map(int, st["Groups"].split())) == sorted(test_user.groups)
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[key], 16) == 0, key
    assert st["NoNewPrivs"] == "1"
    assert "FDS ['0', '1', '2', '3']" in done.stdout  # 3 is the listing's own directory fd


def test_pkexec_uid_is_honoured(world: Any, test_user: Any) -> None:
    done = run(world, "offline", "id", "-u", env={"PKEXEC_UID": str(test_user.uid)})
    assert done.stdout.strip() == str(test_user.uid)


def test_root_inside_has_no_capabilities_and_cannot_change_its_rules(world: Any) -> None:
    done = run(world, "default", PY, "-c", STATUS)
    st = _status(done.stdout)
    assert st["Uid"].split() == ["0"] * 4
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[key], 16) == 0, key
    script = f"nft flush ruleset; ip route del default; {' '.join(world.probe_argv('tcp', '10.77.0.10', 80))}"
    done = run(world, "default", "sh", "-c", script)
    assert done.returncode == BLOCKED, done.stdout + done.stderr
    assert "Operation not permitted" in done.stderr


def test_environment_and_cwd_pass_unchanged(world: Any, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    done = world.run(["sh", "-c", f"cd {tmp_path} && FOO='a b' {NSFW} run -p offline -- sh -c 'echo \"$FOO\"; pwd'"],
                     env={"PATH": "/usr/bin:/bin"})
    assert done.stdout.splitlines() == ["a b", str(tmp_path)], done.stderr


def test_privileged_part_ignores_pythonpath(world: Any, tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (evil / "yaml.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    done = run(world, "offline", "true", env={"PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil / "yaml.py")})
    assert done.returncode == 0, done.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- exit statuses


def test_exit_status_of_command(world: Any) -> None:
    assert run(world, "offline", "sh", "-c", "exit 7").returncode == 7
    assert run(world, "offline", "sh", "-c", "kill -KILL $$").returncode == 128 + 9
    assert run(world, "offline", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_not_found_and_not_executable(world: Any, tmp_path: Path) -> None:
    done = run(world, "offline", "/no/such/command")
    assert done.returncode == 127 and "/no/such/command" in done.stderr, done.stderr
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    assert run(world, "offline", str(script)).returncode == 126


def test_bad_profile_exits_125_and_nothing_runs(world: Any, profile_dir: Path, tmp_path: Path) -> None:
    p = write_profile(profile_dir, "broken", "allow: [{cidr: 300.1.2.3}]\nnetwrok: nat\n")
    marker = tmp_path / "ran"
    done = run(world, p, "touch", str(marker))
    assert done.returncode == 125
    assert "broken.yaml" in done.stderr and "netwrok" in done.stderr and "did you mean 'network'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("step", [s for s in SETUP_STEPS if s != "command"])
def test_fail_closed_at_every_step(world: Any, tmp_path: Path, step: str) -> None:
    marker = tmp_path / "ran"
    done = run(world, "default", "touch", str(marker), env={"NSFW_TEST_FAIL_AT": step})
    assert done.returncode == 125, done.stderr
    assert "injected failure" in done.stderr
    assert not marker.exists()
    # the autouse baseline fixture checks that nothing was left behind


def test_unreadable_profile_is_refused_for_the_user(world: Any, profile_dir: Path, test_user: Any) -> None:
    p = write_profile(profile_dir, "secret", "allow: [internet]\n")
    os.chmod(p, 0o600)
    done = run(world, p, "true", env=as_user(test_user))
    assert done.returncode == 125 and "cannot be read by you" in done.stderr, done.stderr
    assert run(world, p, "true").returncode == 0  # root may read its own file


def test_needs_root(world: Any, test_user: Any) -> None:
    done = world.run(["setpriv", f"--reuid={test_user.uid}", f"--regid={test_user.gid}", "--clear-groups",
                      NSFW, "run", "-p", "offline", "--", "true"])
    assert done.returncode == 125 and "needs root" in done.stderr


def test_profile_named_after_the_command_else_default(world: Any, profile_dir: Path) -> None:
    write_profile(profile_dir, "sh", "network: none\n")
    env = {"NSFW_PROFILE_PATH": str(profile_dir)}
    done = world.run([NSFW, "run", "sh", "-c", "ip -o link | wc -l"], env={"PATH": "/usr/bin:/bin", **env})
    assert done.stdout.strip() == "1", done.stderr  # the `sh` profile: only lo
    done = world.run([NSFW, "run", "true"], env={"PATH": "/usr/bin:/bin", **env})
    assert done.returncode == 0 and "using the shipped profile 'default'" in done.stderr


def test_signals_reach_the_command(world: Any) -> None:
    script = "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done"
    proc = world.popen([NSFW, "run", "-p", "offline", "--", "sh", "-c", script], env={"PATH": "/usr/bin:/bin"},
                       stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    nsfw_pid = int(world.run(["pgrep", "-of", "nsfw run -p offline -- sh -c trap"]).stdout.split()[0])
    world.run(["kill", "-TERM", str(nsfw_pid)])
    out, _ = proc.communicate(timeout=20)
    assert "got TERM" in out
    assert proc.returncode == 3


def test_signal_forwarding_does_not_kill_nsfw_first(world: Any) -> None:
    # SIGUSR1 would kill a process that does not handle it; nsfw must pass it on and keep supervising
    script = "trap 'echo got USR1; exit 4' USR1; echo ready; while :; do sleep 0.05; done"
    proc = world.popen([NSFW, "run", "-p", "offline", "--", "sh", "-c", script], env={"PATH": "/usr/bin:/bin"},
                       stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    nsfw_pid = int(world.run(["pgrep", "-of", "nsfw run -p offline -- sh -c trap"]).stdout.split()[0])
    os.kill(nsfw_pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert "got USR1" in out and proc.returncode == 4


def test_profile_from_an_endless_file_is_refused(world: Any, test_user: Any) -> None:
    start = time.monotonic()
    done = run(world, "/dev/zero", "true", env=as_user(test_user))
    assert done.returncode == 125 and "/dev/zero" in done.stderr and "too large" in done.stderr, done.stderr
    assert time.monotonic() - start < 20
