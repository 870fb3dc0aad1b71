"""`nsfw demo`: real sandboxes from shipped profiles against a simulated world, as a table.

The world (a simulated host with an internet and a home network, all network namespaces) is built for the demo
and removed after it, so the demo runs on a machine with no desktop and no network, and leaves the machine's
own namespace untouched.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .world import World

NSFW = str(Path(__file__).resolve().parent.parent / "bin" / "nsfw")
PROFILES = ("default", "web", "lan-only", "offline")
# A domain rule at work: the name opens its addresses, on its port, for this sandbox only.
NAMES_PROFILE = ("names (demo)", """\
description: "Demo: one service, by name"
allow:
  - {host: allowed.test, ports: [443], proto: tcp}
deny: [lan]
""")
# (column title, probe kind, address, port), probed in this order inside each sandbox
DESTINATIONS = (
    ("allowed.test:443", "tcpname", "allowed.test", "443"),
    ("other.test:443", "tcpname", "other.test", "443"),
    ("192.0.2.10:443", "tcp", "192.0.2.10", "443"),
    ("ssh 203.0.113.30", "tcp", "203.0.113.30", "22"),
    ("ntp 198.51.100.20", "udp", "198.51.100.20", "123"),
    ("[2001:db8::10]:443", "tcp", "2001:db8::10", "443"),
    ("LAN 10.77.0.10:80", "tcp", "10.77.0.10", "80"),
    ("the host :631", "tcp", "198.18.0.2", "631"),
)
RESULT = {0: "reached", 1: "refused", 2: "timeout", 3: "blocked"}


def _cell(kind: str, code: str) -> str:
    if kind == "tcpname" and code == "1":
        return "no such name"  # the sandbox's resolver refused it
    if kind == "tcpname" and code == "2":
        return "no resolver"
    return RESULT.get(int(code), f"code {code}")


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
    return [_cell(d[1], c) for d, c in zip(DESTINATIONS, codes, strict=True)]


def _settled(world: World, timeout: float = 15.0) -> dict[str, Any]:
    """The world once the keepers are done: `nsfw run` returns COMMAND's status first, and the sandbox's keeper
    removes it right after (a slim keeper imports the removal's modules first), so wait for that, boundedly."""
    deadline = time.monotonic() + timeout
    while True:
        snap: dict[str, Any] = world.snapshot()
        if not any(str(n).startswith("nsfw") for n in snap.get("netns", [])) or time.monotonic() > deadline:
            return snap
        time.sleep(0.1)


def main() -> int:
    if os.geteuid() != 0:
        print("nsfw demo needs root: it builds network namespaces (run `sudo nsfw demo` or `sudo make demo`)",
              file=sys.stderr)
        return 1
    print("Building a simulated world: a host whose only uplink is a simulated internet (192.0.2.0/24,\n"
          "198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) and a home network (10.77.0.0/24). Nothing here\n"
          "touches this machine's own network.\n")
    with tempfile.TemporaryDirectory(prefix="nsfw-demo-") as tmp, World() as world, \
            ThreadPoolExecutor(len(PROFILES) + 1) as pool:
        os.chmod(tmp, 0o755)
        names_path = os.path.join(tmp, "names-demo.yaml")
        with open(names_path, "w") as f:
            f.write(NAMES_PROFILE[1])
        refs = {**{p: p for p in PROFILES}, NAMES_PROFILE[0]: names_path}
        rows = dict(zip(refs, pool.map(lambda r: _row(world, r), refs.values()), strict=True))
        leftovers = _settled(world)
    header = ["profile", *(d[0] for d in DESTINATIONS)]
    table = [header] + [[p, *cells] for p, cells in rows.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nEach row is one sandbox, started with `nsfw run -p PROFILE`, connecting from inside to each\n"
          "destination in turn, left to right: the first two by name, the others by address.\n"
          "'blocked': the sandbox's own ruleset refused it, in the kernel. 'no such name': the sandbox's\n"
          "resolver refused a name that no rule allows, without asking anyone. In the last row, 192.0.2.10:443\n"
          "opened because that sandbox had just looked up allowed.test, whose address it is: a domain rule\n"
          "becomes an address in that sandbox's ruleset, for as long as the DNS record lives.")
    sandboxes = leftovers.get("netns", [])
    ok = all("error" not in c for cells in rows.values() for c in cells)
    if any(str(n).startswith("nsfw") for n in sandboxes):
        print(f"\nnsfw left namespaces behind: {sandboxes}", file=sys.stderr)
        ok = False
    return 0 if ok else 1
