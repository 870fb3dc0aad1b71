"""`nsfw demo`: real sandboxes from shipped profiles against a simulated world, as a table.

The world (a simulated host with an internet and a home network, all network namespaces) is built for the demo
and removed after it, so the demo runs on a machine with no desktop and no network, and leaves the machine's
own namespace untouched.
"""

from __future__ import annotations

import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .world import World

NSFW = str(Path(__file__).resolve().parent.parent / "bin" / "nsfw")
PROFILES = ("default", "web", "lan-only", "offline")
# (column title, probe kind, address, port)
DESTINATIONS = (
    ("web 192.0.2.10:443", "tcp", "192.0.2.10", "443"),
    ("ssh 203.0.113.30:22", "tcp", "203.0.113.30", "22"),
    ("ntp 198.51.100.20/udp", "udp", "198.51.100.20", "123"),
    ("web [2001:db8::10]:443", "tcp", "2001:db8::10", "443"),
    ("home LAN 10.77.0.10:80", "tcp", "10.77.0.10", "80"),
    ("the host :631", "tcp", "198.18.0.2", "631"),
)
RESULT = {0: "reached", 1: "refused", 2: "timeout", 3: "blocked"}


def _row(world: World, profile: str) -> list[str]:
    """One sandbox per profile, probing every destination from inside it."""
    probes = "; ".join(
        f"{shlex.join(world.probe_argv(kind, addr, port))} >/dev/null 2>&1; echo $?"
        for _title, kind, addr, port in DESTINATIONS)
    done = world.run([NSFW, "run", "-p", profile, "--", "sh", "-c", probes],
                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NSFW_PROBE_TIMEOUT": "2"}, timeout=120)
    codes = done.stdout.split()
    if done.returncode != 0 or len(codes) != len(DESTINATIONS):
        return [f"error: {done.stderr.strip() or done.returncode}"] + [""] * (len(DESTINATIONS) - 1)
    return [RESULT.get(int(c), f"code {c}") for c in codes]


def main() -> int:
    if os.geteuid() != 0:
        print("nsfw demo needs root: it builds network namespaces (run `sudo nsfw demo` or `sudo make demo`)",
              file=sys.stderr)
        return 1
    print("Building a simulated world: a host whose only uplink is a simulated internet (192.0.2.0/24,\n"
          "198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) and a home network (10.77.0.0/24). Nothing here\n"
          "touches this machine's own network.\n")
    with World() as world, ThreadPoolExecutor(len(PROFILES)) as pool:
        rows = dict(zip(PROFILES, pool.map(lambda p: _row(world, p), PROFILES), strict=True))
        leftovers = world.snapshot()
    header = ["profile", *(d[0] for d in DESTINATIONS)]
    table = [header] + [[p, *cells] for p, cells in rows.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nEach row is one application sandbox started with `nsfw run -p PROFILE`, probing each destination\n"
          "with a real connection from inside. 'blocked' means the sandbox's own ruleset refused it in the kernel.")
    sandboxes = leftovers.get("netns", [])
    ok = all("error" not in c for cells in rows.values() for c in cells)
    if any(str(n).startswith("nsfw") for n in sandboxes):
        print(f"\nnsfw left namespaces behind: {sandboxes}", file=sys.stderr)
        ok = False
    return 0 if ok else 1
