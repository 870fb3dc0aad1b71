"""nft.named_counters reads the sandbox table's counters with one netlink dump of its own (libnftables would
fetch the whole ruleset first): it must say exactly what libnftables says, after real traffic, in a namespace
of its own (`unshare -n`: a veth pair with both ends inside, nothing reaches any other namespace)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a namespace of its own")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
from nsfw import compile as rules, nft, profile as profiles
from nsfw.names import HostEnv

before = nft.named_counters("nsfw")  # no table yet
prof = profiles.load("default", profiles.search_path({}, "/nonexistent"))
nft.apply(rules.sandbox_ruleset(prof, HostEnv(), ["10.213.0.1"]))
for cmd in ("ip link add d0 type veth peer name d1", "ip addr add 10.9.9.1/24 dev d0", "ip link set d1 up",
            "ip link set d0 up", "ip route add default via 10.9.9.254"):
    subprocess.run(cmd.split(), check=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = {"allowed": 0, "denied": 0}
for dst, n in (("198.51.100.7", 3), ("10.9.9.7", 2)):  # the internet, allowed; the LAN, denied
    for _ in range(n):
        try:
            u.sendto(b"x" * 100, (dst, 443))
            sent["allowed"] += 1
        except PermissionError:  # the ruleset's reject
            sent["denied"] += 1
rc, out, err = nft._ctx().cmd("list counters table inet nsfw")
theirs = {c["counter"]["name"]: {"packets": c["counter"]["packets"], "bytes": c["counter"]["bytes"]}
          for c in json.loads(out)["nftables"] if "counter" in c}
print(json.dumps({"before": before, "ours": nft.named_counters("nsfw"), "theirs": theirs, "sent": sent,
                  "other": nft.named_counters("nope")}))
"""


def test_named_counters_match_libnftables_after_traffic() -> None:
    done = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["before"] == {} and got["other"] == {}
    assert got["sent"] == {"allowed": 3, "denied": 2}
    assert got["ours"] == got["theirs"]
    assert got["ours"]["allowed"]["packets"] >= 3 and got["ours"]["denied"]["packets"] == 2
    assert got["ours"]["allowed"]["bytes"] >= 3 * 128
