#!/usr/bin/python3
"""bench/ruleset: how long a profile with a 100,000-CIDR blocklist takes to load, against `nft -f` of the same
elements in one interval set, side by side; and the wall time of `nsfw check` and `nsfw rules` on it.

The blocklist is generated (bench/gen.py): 100,000 IPv4 CIDRs, overlapping and adjacent ranges and repeats
included, in a `file:` list beside the profile. Each round, in a fresh network namespace of its own (unshare:
nothing reaches the machine's own), it times, interleaved:
  nft -f        the whole `nft -f FILE` process, FILE holding one `flags interval; auto-merge` set with the
                100,000 elements as listed (auto-merge: nft refuses overlapping elements otherwise)
  nsfw          profile.load (YAML and the list file) + compile.sandbox_ruleset + nft.apply, in one process
                with its modules already imported; each step is also reported alone
and, outside any timing, checks that both sets end up with the same number of (merged) elements.
`nsfw check`, `nsfw rules` and `nsfw rules --json` are timed as whole processes (python start-up included).

usage: bench/ruleset.py [--rounds N] [--cidrs N]     (as root: namespaces)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c
import gen


def nft_script(cidrs: list[str]) -> str:
    return ("table inet bench {\n set deny4 {\n  type ipv4_addr\n  flags interval\n  auto-merge\n  elements = {\n"
            + ",\n".join(f"   {x}" for x in cidrs) + "\n  }\n }\n}\n")


def _in_fresh_netns(fn: Any) -> dict[str, Any]:
    """Run fn() in a forked child that first moves to a network namespace of its own; its dict result."""
    from nsfw.caps import CLONE_NEWNET, unshare

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            unshare(CLONE_NEWNET)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        except BaseException as e:
            os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data: dict[str, Any] = json.loads(f.read() or b"{}")
    os.waitpid(pid, 0)
    if "error" in data:
        raise RuntimeError(data["error"])
    return data


def _count(argv: list[str], set_name: str) -> int:
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return sum(len(i["set"].get("elem", [])) for i in json.loads(out)["nftables"] if i.get("set", {}).get("name")
               == set_name)


def measure(rounds: int = 5, n: int = 100_000) -> tuple[list[c.Row], dict[str, Any]]:
    from nsfw import compile as rules
    from nsfw import nft
    from nsfw import profile as profiles
    from nsfw.names import Instance

    work = tempfile.mkdtemp(prefix="nsfw-bench-ruleset-")
    os.chmod(work, 0o755)
    try:
        cidrs = gen.blocklist(n, seed=7)
        gen.write_list(os.path.join(work, "blocklist.txt"), cidrs)
        profile = gen.write_profile(os.path.join(work, "big.yaml"), description=f"bench/ruleset: {n} CIDRs",
                                    allow=["internet"], deny=[{"file": "blocklist.txt"}])
        script = os.path.join(work, "anchor.nft")
        with open(script, "w") as f:
            f.write(nft_script(cidrs))
        example = Instance("0" * 8, slot=0, ipv6=True)
        gateways = [str(example.gateway4.ip), str(example.gateway6.ip) if example.gateway6 else ""]
        gateways = [g for g in gateways if g]

        def anchor() -> dict[str, Any]:
            t0 = time.perf_counter()
            subprocess.run(["nft", "-f", script], check=True)
            took = time.perf_counter() - t0
            return {"ms": took * 1000, "elements": _count(["nft", "-j", "list", "set", "inet", "bench", "deny4"],
                                                          "deny4")}

        def ours() -> dict[str, Any]:
            t0 = time.perf_counter()
            prof = profiles.load(profile, [])
            t1 = time.perf_counter()
            cmds = rules.sandbox_ruleset(prof, gateways=gateways)
            t2 = time.perf_counter()
            nft.apply(cmds)
            t3 = time.perf_counter()
            return {"ms": (t3 - t0) * 1000, "load_ms": (t1 - t0) * 1000, "compile_ms": (t2 - t1) * 1000,
                    "apply_ms": (t3 - t2) * 1000,
                    "elements": _count(["nft", "-j", "list", "set", "inet", "nsfw", "denyaddr4"], "denyaddr4")}

        samples: dict[str, list[dict[str, Any]]] = {"nft": [], "nsfw": []}
        _in_fresh_netns(anchor)  # once each, untimed: page cache, first-run allocations
        _in_fresh_netns(ours)
        for rnd in range(rounds):
            order = [("nft", anchor), ("nsfw", ours)]
            for label, fn in order if rnd % 2 == 0 else reversed(order):
                samples[label].append(_in_fresh_netns(fn))
            c.log(f"ruleset: round {rnd + 1}/{rounds}: nft -f {samples['nft'][-1]['ms']:.0f} ms, nsfw "
                  f"{samples['nsfw'][-1]['ms']:.0f} ms")
        if samples["nft"][0]["elements"] != samples["nsfw"][0]["elements"]:
            c.log(f"ruleset: WARNING: element counts differ: nft {samples['nft'][0]['elements']}, nsfw "
                  f"{samples['nsfw'][0]['elements']}")

        cli: dict[str, list[float]] = {}
        for label, argv in (("nsfw check", ["check", profile]), ("nsfw rules", ["rules", profile]),
                            ("nsfw rules --json", ["rules", "--json", profile])):
            cli[label] = c.timed_inner(["unshare", "-n", c.NSFW, *argv], rounds)
            c.log(f"ruleset: {label}: {min(cli[label]):.0f} ms at best")
        unshare_only = c.timed_inner(["unshare", "-n", "/bin/true"], rounds)
        prof = profiles.load(profile, [])
        entries = sum(len(r.listed) if r.listed else 1 for r in prof.deny)
        extra = {"cidrs": n, "rounds": rounds, "entries_after_load": entries,
                 "elements_nft": samples["nft"][0]["elements"], "elements_nsfw": samples["nsfw"][0]["elements"],
                 "samples": samples, "cli_ms": cli, "unshare_ms": unshare_only}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    g = "3 ruleset"
    nft_ms = [s["ms"] for s in samples["nft"]]
    rows = [
        c.Row(g, f"load {n // 1000}k-CIDR profile: load+compile+apply", "ms", [s["ms"] for s in samples["nsfw"]],
              "nft -f, one interval set", nft_ms, ("<=", 1.2)),
    ]
    for step in ("load", "compile", "apply"):
        rows.append(c.Row(g, f"  of which {step}", "ms", [s[f"{step}_ms"] for s in samples["nsfw"]],
                          "nft -f, one interval set", nft_ms))
    for label, times in cli.items():
        rows.append(c.Row(g, f"{label} of that profile", "ms", times, goal=("<=", 1000.0), absolute=True,
                          note="whole process"))
    return rows, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cidrs", type=int, default=100_000)
    args = parser.parse_args()
    c.need_root("ruleset")
    if not shutil.which("nft"):
        sys.exit("bench/ruleset: needs nft (apt-get install nftables)")
    rows, extra = measure(args.rounds, args.cidrs)
    c.report("ruleset", rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
