#!/usr/bin/python3
"""bench/launch: how long `nsfw run -- /bin/true` takes, whole process, against the anchors, side by side.

Everything runs on the simulated host of nsfw's own world (a network + mount namespace with a simulated
internet), so a `nat` sandbox never touches the machine's real network. The commands are interleaved round by
round, so a slow moment of the machine costs every contender alike; each is run once untimed first.
  nsfw run (nat, 100 rules)   bench/profiles/hundred.yaml: a nat sandbox (veth, NAT, both rulesets, resolver)
  nsfw run (none)             the shipped `offline` profile: a namespace with loopback only
  firejail --net=none         the anchor (`--noprofile`: no filesystem sandbox either, just the network one)
  unshare -n, bwrap --unshare-net   what a bare namespace costs, for reference
usage: bench/launch.py [--rounds N]        (as root; `make bench` installs firejail and bubblewrap)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c
from common import Row

PROFILES = os.path.join(c.HERE, "profiles")
FIREJAIL = "firejail --net=none"
NAT, NONE = "nsfw run (nat, 100 rules)", "nsfw run (none)"


def contenders() -> dict[str, list[str]]:
    out = {
        "unshare -n": ["unshare", "-n", "/bin/true"],
        "bwrap --unshare-net": ["bwrap", "--dev-bind", "/", "/", "--unshare-net", "/bin/true"],
        FIREJAIL: ["firejail", "--quiet", "--noprofile", "--net=none", "/bin/true"],
        NONE: [c.NSFW, "run", "-p", "offline", "--", "/bin/true"],
        NAT: [c.NSFW, "run", "-p", os.path.join(PROFILES, "hundred.yaml"), "--", "/bin/true"],
    }
    for name, argv in list(out.items()):
        if not shutil.which(argv[0]):
            del out[name]
    return out


def inner(rounds: int) -> int:
    """Runs on the simulated host: time each contender, round-robin."""
    cmds = contenders()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for argv in cmds.values():  # one untimed run each: page cache, first-run files
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    for _ in range(rounds):
        for name, argv in cmds.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            times[name].append((time.perf_counter() - start) * 1000)
    json.dump(times, sys.stdout)
    return 0


def measure(rounds: int = 30) -> tuple[list[Row], dict[str, Any]]:
    with c.world() as (w, _procs):
        done = c.wrun(w, [c.PYTHON, os.path.abspath(__file__), "--inner", "--rounds", str(rounds)], timeout=1800)
    times: dict[str, list[float]] = json.loads(done.stdout)
    anchor = times.get(FIREJAIL, [])
    g = "1 launch"
    rows = [
        Row(g, f"{NAT} /bin/true", "ms", times[NAT], FIREJAIL, anchor, ("<=", 1.0), note="whole process"),
        Row(g, f"{NONE} /bin/true", "ms", times[NONE], FIREJAIL, anchor, ("<=", 0.5), note="whole process"),
    ]
    rows += [Row(g, f"{name} /bin/true", "ms", t, FIREJAIL, anchor) for name, t in times.items()
             if name not in (NAT, NONE, FIREJAIL)]
    return rows, {"rounds": rounds, "times_ms": times}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args.rounds)
    c.need_root("launch")
    rows, extra = measure(args.rounds)
    c.report("launch", rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
