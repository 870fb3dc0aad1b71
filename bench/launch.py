#!/usr/bin/python3
"""bench/launch: how long `nsfw run -- /bin/true` takes, whole process, against the anchors, side by side.

Everything runs on the simulated host of nsfw's own world (a network + mount namespace with a simulated
internet), so a `nat` sandbox never touches the machine's real network. The commands are interleaved round by
round, so a slow moment of the machine costs every contender alike. Prints a table (median, min, max, ratio of
medians to firejail) and writes bench/results/launch.json.

usage: bench/launch.py [--rounds N]        (as root; `make bench` installs firejail first)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NSFW = os.path.join(ROOT, "bin", "nsfw")
PROFILES = os.path.join(HERE, "profiles")


def contenders() -> dict[str, list[str]]:
    out = {
        "unshare -n /bin/true": ["unshare", "-n", "/bin/true"],
        "firejail --net=none /bin/true": ["firejail", "--quiet", "--noprofile", "--net=none", "/bin/true"],
        "nsfw run (none) /bin/true": [NSFW, "run", "-p", "offline", "--", "/bin/true"],
        "nsfw run (nat, 100 rules) /bin/true": [NSFW, "run", "-p", os.path.join(PROFILES, "hundred.yaml"), "--",
                                                "/bin/true"],
    }
    if not shutil.which("firejail"):
        del out["firejail --net=none /bin/true"]
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


def table(times: dict[str, list[float]], anchor: str) -> str:
    base = statistics.median(times[anchor]) if anchor in times else None
    rows = [f"| {'command':40} | median ms | min ms | max ms | ratio to firejail |",
            f"|{'-' * 42}|---:|---:|---:|---:|"]
    for name, samples in times.items():
        med = statistics.median(samples)
        ratio = f"{med / base:.2f}" if base else "n/a"
        rows.append(f"| {name:40} | {med:.1f} | {min(samples):.1f} | {max(samples):.1f} | {ratio} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args.rounds)
    if os.geteuid() != 0:
        sys.exit("bench/launch: run as root (it builds namespaces)")
    sys.path.insert(0, ROOT)
    from nsfw.world import World

    with World() as world:
        done = world.run([sys.executable, os.path.abspath(__file__), "--inner", "--rounds", str(args.rounds)],
                         timeout=1800)
    if done.returncode != 0:
        sys.exit(f"bench/launch failed: {done.stderr}")
    times = json.loads(done.stdout)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"kernel {platform.release()}", "rounds": args.rounds, "times_ms": times}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "launch.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"launch of /bin/true, {args.rounds} rounds, {result['date']}, {result['machine']}")
    print(table(times, "firejail --net=none /bin/true"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
