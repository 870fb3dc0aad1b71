#!/usr/bin/python3
"""bench/run: every benchmark, one after the other, and one table of all the goals: goal, metric, median, min,
max, anchor, ratio, goal met. Each benchmark builds (and removes) its own simulated world; results go to
bench/results/NAME.json, the whole table to bench/results/table.md (and, with --readme, into bench/README.md).

usage: bench/run.py [--only launch,datapath,...] [--quick] [--readme]     (as root; `make bench` runs it)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c

ORDER = ("launch", "datapath", "ruleset", "resolver", "scale")
# rounds and sizes: (full, --quick)
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "launch": ({"rounds": 30}, {"rounds": 5}),
    "datapath": ({"rounds": 7, "seconds": 3.0, "diagnose": True}, {"rounds": 2, "seconds": 2.0}),
    "ruleset": ({"rounds": 5}, {"rounds": 2}),
    "resolver": ({"rounds": 5, "seconds": 3.0}, {"rounds": 2, "seconds": 2.0}),
    "scale": ({"sandboxes": 100, "stale": 1000, "rounds": 5}, {"sandboxes": 20, "stale": 200, "rounds": 2}),
}
README = os.path.join(c.HERE, "README.md")
BEGIN, END = "<!-- bench table: begin -->", "<!-- bench table: end -->"


def host_clean() -> dict[str, str]:
    """What the machine's own namespace holds that a benchmark could have left: must be empty before and after."""
    return {
        "ip netns list": subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.strip(),
        "veth links": subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True,
                                     text=True).stdout.strip(),
        "nft list tables": subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.strip(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated: " + ", ".join(ORDER))
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller scale: a smoke test")
    parser.add_argument("--readme", action="store_true", help="also put the table into bench/README.md")
    args = parser.parse_args()
    c.need_root("run")
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(chosen) - set(ORDER)
    if unknown:
        sys.exit(f"bench/run: unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(ORDER)}")
    before = host_clean()
    rows: list[c.Row] = []
    failed: list[str] = []
    started = time.time()
    for name in (n for n in ORDER if n in chosen):
        module = importlib.import_module(name)
        settings = SETTINGS[name][1 if args.quick else 0]
        c.log(f"run: {name} {settings}")
        t0 = time.perf_counter()
        try:
            got, extra = module.measure(**settings)
        except Exception as e:  # one broken benchmark must not hide the others' results
            c.log(f"run: {name} FAILED: {type(e).__name__}: {e}")
            failed.append(f"{name}: {type(e).__name__}: {e}")
            continue
        c.save(name, got, {**extra, "settings": settings})
        rows += got
        c.log(f"run: {name} done in {time.perf_counter() - t0:.0f} s")
    after = host_clean()
    if after != before:
        failed.append(f"the machine's own namespace changed: before {before}, after {after}")

    date = time.strftime("%Y-%m-%d")
    head = f"`make bench`{' --quick' if args.quick else ''}, {date}, {c.machine()}"
    text = f"{head}\n\n{c.table(rows)}\n"
    met = [r for r in rows if r.met is not None]
    summary = f"{sum(1 for r in met if r.met)} of {len(met)} goals met"
    print(f"\n{text}\n{summary}; took {(time.time() - started) / 60:.1f} min")
    os.makedirs(c.RESULTS, exist_ok=True)
    with open(os.path.join(c.RESULTS, "table.md"), "w") as f:
        f.write(text)
    c.save("all", rows, {"failed": failed, "host_before": before, "host_after": after})
    if args.readme:
        with open(README) as f:
            readme = f.read()
        block = f"{BEGIN}\n{text}\n{summary}.\n{END}"
        readme = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _m: block, readme, flags=re.S)
        with open(README, "w") as f:
            f.write(readme)
    for problem in failed:
        print(f"bench/run: {problem}", file=sys.stderr)
    print(json.dumps({"goals_met": sum(1 for r in met if r.met), "goals": len(met)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
