#!/usr/bin/python3
"""bench/launch: how long `nsfw run -- /bin/true` takes, whole process, against the anchors, side by side.

Everything runs on the simulated host of nsfw's own world (a network + mount namespace with a simulated
internet), so a `nat` sandbox never touches the machine's real network. The commands are interleaved round by
round, so a slow moment of the machine costs every contender alike; each is run once untimed first.
  nsfw run (nat, 100 rules)   bench/profiles/hundred.yaml: a nat sandbox (veth, NAT, both rulesets, resolver)
  nsfw run (none)             the shipped `offline` profile: a namespace with loopback only
  each of them cold (NSFW_WARM=0: the process imports everything) and warm (`nsfw daemon` runs in the world,
  as `make install` runs it: a spare launcher it forked ahead takes the launch, with a prebuilt sandbox)
Before each timed run the bench waits until nsfw is quiet (no keeper still removing a sandbox after its `nsfw
run` returned, the daemon's pool full again): what is measured is the launch from a quiet machine, for every
contender alike; the work nsfw moved before and after the launch is not in these figures.
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
WARM_SOCKET = "/run/nsfw/warm.sock"  # the world's own /run
SANDBOXES = "/run/nsfw/sandboxes"
POOL = 4  # what the daemon keeps ready here: two `none`, two `nat` with IPv6 (the world routes IPv6)


def contenders(warm: bool) -> dict[str, tuple[list[str], dict[str, str]]]:
    cold = {**os.environ, "NSFW_WARM": "0"}
    out = {
        "unshare -n": (["unshare", "-n", "/bin/true"], cold),
        "bwrap --unshare-net": (["bwrap", "--dev-bind", "/", "/", "--unshare-net", "/bin/true"], cold),
        FIREJAIL: (["firejail", "--quiet", "--noprofile", "--net=none", "/bin/true"], cold),
    }
    for label, argv in ((NONE, [c.NSFW, "run", "-p", "offline", "--", "/bin/true"]),
                        (NAT, [c.NSFW, "run", "-p", os.path.join(PROFILES, "hundred.yaml"), "--", "/bin/true"])):
        out[f"{label}, cold"] = (argv, cold)
        if warm:
            out[f"{label}, warm"] = (argv, {**os.environ, "NSFW_WARM": "1"})
    for name, (argv, _env) in list(out.items()):
        if not shutil.which(argv[0]):
            del out[name]
    return out


def _cpu_ticks(pid: int) -> int:
    """CPU time so far of `pid` and of its children (the daemon's spares), in clock ticks."""
    total = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    for p in (pid, *kids):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def quiet(pool: int, daemon: int | None = None, timeout: float = 3.0) -> None:
    """Wait until nsfw does nothing in the background: no sandbox being removed by its keeper after `nsfw run`
    returned, the daemon's pool refilled, and the daemon and its spares idle (a pooled sandbox's record is
    written before its kernel objects are built, so the record alone does not say the work is done). Every
    contender starts from a quiet machine, so none pays for the work another one moved off its own path (and
    the report says that this work exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            names = [n for n in os.listdir(SANDBOXES) if n.endswith(".json")]
            records = []
            for n in names:
                with open(os.path.join(SANDBOXES, n)) as f:
                    records.append(json.load(f))
        except (OSError, ValueError):
            time.sleep(0.01)
            continue
        if all(r.get("pooled") for r in records) and len(records) >= pool:
            if daemon is None:
                return
            before = _cpu_ticks(daemon)
            time.sleep(0.03)
            if _cpu_ticks(daemon) == before:
                return
            continue
        time.sleep(0.01)


def inner(rounds: int) -> int:
    """Runs on the simulated host: time each contender, round-robin; the warm ones against `nsfw daemon`."""
    daemon = None
    with open(os.devnull, "w") as null:
        if subprocess.run([c.NSFW, "daemon", "--help"], stdout=null, stderr=null).returncode == 0:
            daemon = subprocess.Popen([c.NSFW, "daemon"], stdout=null, stderr=null, start_new_session=True)
            deadline = time.monotonic() + 20
            while not os.path.exists(WARM_SOCKET) and time.monotonic() < deadline and daemon.poll() is None:
                time.sleep(0.05)
    try:
        warm = daemon is not None and os.path.exists(WARM_SOCKET)
        pool = POOL if warm else 0
        cmds = contenders(warm)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for argv, env in cmds.values():  # one untimed run each: page cache, first-run files
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        for _ in range(rounds):
            for name, (argv, env) in cmds.items():
                quiet(pool, daemon.pid if daemon is not None else None)
                start = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
                times[name].append((time.perf_counter() - start) * 1000)
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=10)
    json.dump(times, sys.stdout)
    return 0


def measure(rounds: int = 30) -> tuple[list[Row], dict[str, Any]]:
    with c.world() as (w, _procs):
        done = c.wrun(w, [c.PYTHON, os.path.abspath(__file__), "--inner", "--rounds", str(rounds)], timeout=1800)
    times: dict[str, list[float]] = json.loads(done.stdout)
    anchor = times.get(FIREJAIL, [])
    g = "1 launch"
    rows = []
    # The goal is a launch's, as nsfw is installed (`make install` enables `nsfw daemon`); a cold launch, with
    # nothing warm, must work and is reported, with no bound of its own.
    for label, bound in ((NAT, 1.0), (NONE, 0.5)):
        if f"{label}, warm" in times:
            rows.append(Row(g, f"{label}, warm /bin/true", "ms", times[f"{label}, warm"], FIREJAIL, anchor,
                            ("<=", bound), note="whole process"))
        if f"{label}, cold" in times:
            rows.append(Row(g, f"{label}, cold /bin/true", "ms", times[f"{label}, cold"], FIREJAIL, anchor,
                            note="whole process; no daemon"))
    rows += [Row(g, f"{name} /bin/true", "ms", t, FIREJAIL, anchor) for name, t in times.items()
             if name != FIREJAIL and not name.startswith("nsfw")]
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
