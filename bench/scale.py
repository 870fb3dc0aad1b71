#!/usr/bin/python3
"""bench/scale: many sandboxes at once. nsfw's own resident memory per additional sandbox, `nsfw ps` with 100
running, and `nsfw gc` of 1,000 stale sandboxes.

All of it runs in nsfw's simulated world:
  memory  `nsfw run --new -p default -- sleep` started 100 times; with 1, 10 and 100 running, the PSS
          (/proc/PID/smaps_rollup: shared pages split among their sharers, so forked processes are not
          counted twice) of every nsfw process: supervisors, keepers, resolvers. Per additional sandbox:
          (PSS at 100 - PSS at 1) / 99. The commands themselves (sleep) are not nsfw's and not counted.
  ps      wall time of `nsfw ps` (and `--json`), whole process, with the 100 running, timed inside the world
  gc      1,000 stale sandboxes synthesized at once (records with dead owners, their namespaces, veth pairs
          and `inet nsfw-ID` tables, made with `ip -batch` and one `nft -f`), then `nsfw gc` timed; after it,
          none of them may be left
usage: bench/scale.py [--sandboxes N] [--stale N] [--rounds N]     (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c
from common import Row

DEAD_PID = 4_000_000  # above every pid in use here (checked), below pid_max


NSFW_BIN = os.path.normpath(c.NSFW).encode()
SLIM = os.path.normpath(os.path.join(c.ROOT, "nsfw", "slim.py")).encode()


def ours(cmd: list[bytes]) -> bool:
    """An nsfw process of this checkout: `python3 -I[S] bin/nsfw run ...` (supervisors, and the keepers and
    resolvers forked from them), or one that exec'd `python3 -IS nsfw/slim.py KIND ...` (slim waiters and
    resolvers). Other checkouts' nsfw processes on the machine are not counted."""
    if len(cmd) < 4 or not cmd[1].startswith(b"-I"):
        return False
    path = os.path.normpath(cmd[2].decode(errors="replace")).encode()
    return (path == NSFW_BIN and cmd[3] == b"run") or path == SLIM


def nsfw_pss(w: Any) -> dict[str, Any]:
    """kB of PSS and RSS of every nsfw process in the world, by kind (supervisor, keeper, resolver)."""
    recs = c.sandbox_records(w)
    supervisors = {r["supervisor_pid"] for r in recs}
    keepers = {r["keeper_pid"] for r in recs}
    out: dict[str, Any] = {"pss_kb": 0, "rss_kb": 0, "processes": 0, "by_kind": {}}
    world_net = os.stat(f"/proc/{w.pid}/ns/net")  # nsfw runs on the world's simulated host: not another world's
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            if not ours(cmd):
                continue
            net = os.stat(f"/proc/{pid}/ns/net")
            if (net.st_dev, net.st_ino) != (world_net.st_dev, world_net.st_ino):
                continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.endswith("kB\n")}
        except (OSError, ValueError, IndexError):
            continue
        kind = "supervisor" if pid in supervisors else "keeper" if pid in keepers else "resolver"
        out["pss_kb"] += fields.get("Pss", 0)
        out["rss_kb"] += fields.get("Rss", 0)
        out["processes"] += 1
        k = out["by_kind"].setdefault(kind, {"n": 0, "pss_kb": 0, "rss_kb": 0})
        k["n"] += 1
        k["pss_kb"] += fields.get("Pss", 0)
        k["rss_kb"] += fields.get("Rss", 0)
    return out


def wait_running(w: Any, n: int, procs: list[subprocess.Popen[str]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for r in c.sandbox_records(w) if r.get("command_pid")) >= n:
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            err = dead[0].stderr.read() if dead[0].stderr else ""
            raise RuntimeError(f"nsfw run exited {dead[0].returncode}: {err.strip()}")
        time.sleep(0.05)
    raise RuntimeError(f"{n} sandboxes did not start within {timeout:g} s")


def synthesize(w: Any, n: int, batch: int) -> list[str]:
    """n stale sandboxes: records whose owners are dead, plus everything they name. Returns their ids."""
    ids = [f"{batch:x}{i:07x}"[-8:] for i in range(n)]
    run_dir = f"/proc/{w.pid}/root/run/nsfw/sandboxes"
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    now = time.time()
    for i, sid in enumerate(ids):
        slot = 8000 + i
        rec = {"id": sid, "profile": "default", "profile_path": "/usr/share/nsfw/profiles/default.yaml",
               "profile_sha256": "0" * 64, "command": ["sleep", "60"], "uid": 0, "user": "root", "network": "nat",
               "netns": f"nsfw-{sid}", "slot": slot, "veth": f"nsfw{sid}", "table": f"nsfw-{sid}",
               "addresses": [f"10.213.{slot * 4 // 256}.{slot * 4 % 256 + 2}/30"],
               "supervisor_pid": DEAD_PID, "supervisor_start": 1, "keeper_pid": DEAD_PID, "keeper_start": 1,
               "command_pid": DEAD_PID, "closing": False, "started_at": now, "version": 1}
        with open(os.path.join(run_dir, f"{sid}.json"), "w") as f:
            json.dump(rec, f)
        files = os.path.join(run_dir, sid)
        os.makedirs(files, exist_ok=True)
        for name in ("resolv.conf", "nsswitch.conf", "dns.log"):
            with open(os.path.join(files, name), "w") as f:
                f.write("")
    c.wrun(w, ["ip", "-batch", "-"], timeout=600, input="".join(
        f"netns add nsfw-{sid}\nlink add nsfw{sid} type veth peer name eth0 netns nsfw-{sid}\n" for sid in ids))
    c.wrun(w, ["nft", "-f", "-"], timeout=600, input="".join(
        f"table inet nsfw-{sid} {{\n chain forward {{ type filter hook forward priority 0; policy accept;\n"
        f"  iifname \"nsfw{sid}\" drop\n }}\n}}\n" for sid in ids))
    return ids


def leftovers(w: Any, ids: list[str]) -> dict[str, int]:
    want = set(ids)
    netns = set(c.wrun(w, ["ip", "netns", "list"]).stdout.split())
    links = c.wrun(w, ["ip", "-o", "link", "show", "type", "veth"]).stdout
    tables = c.wrun(w, ["nft", "list", "tables"]).stdout
    recs = {r["id"] for r in c.sandbox_records(w)}
    return {"netns": sum(1 for s in want if f"nsfw-{s}" in netns),
            "veth": sum(1 for s in want if f"nsfw{s}@" in links or f"nsfw{s}:" in links),
            "tables": sum(1 for s in want if f"nsfw-{s}\n" in tables + "\n"),
            "records": len(want & recs)}


def measure(sandboxes: int = 100, stale: int = 1000, rounds: int = 5) -> tuple[list[Row], dict[str, Any]]:
    if os.path.exists(f"/proc/{DEAD_PID}"):
        raise RuntimeError(f"pid {DEAD_PID} is in use: the bench needs one that is not")
    extra: dict[str, Any] = {"sandboxes": sandboxes, "stale": stale, "rounds": rounds}
    memory: dict[int, dict[str, Any]] = {}
    timer = [c.PYTHON, os.path.join(c.HERE, "common.py"), "time"]
    with c.world() as (w, procs):
        runs: list[subprocess.Popen[str]] = []
        t0 = time.perf_counter()
        launch_ms = []
        for k in range(1, sandboxes + 1):
            t1 = time.perf_counter()
            runs.append(c.wpopen(w, procs, [c.NSFW, "run", "--new", "-p", "default", "--", "sleep", "1800"]))
            wait_running(w, k, runs)
            launch_ms.append((time.perf_counter() - t1) * 1000)
            if k in (1, 10, sandboxes):
                # resolvers and keepers settle (imports done, first allocations made), and supervisors become
                # slim waiters (nsfw/waiter.GRACE, 1.5 s after COMMAND started)
                time.sleep(2.5)
                memory[k] = nsfw_pss(w)
                c.log(f"scale: {k} sandboxes: {memory[k]['processes']} nsfw processes, PSS "
                      f"{memory[k]['pss_kb'] / 1024:.1f} MiB, RSS {memory[k]['rss_kb'] / 1024:.1f} MiB")
        extra["start_all_s"] = time.perf_counter() - t0
        extra["launch_ms"] = launch_ms
        ps = json.loads(c.wrun(w, [*timer, str(rounds), "--", c.NSFW, "ps"], timeout=600).stdout)
        ps_json = json.loads(c.wrun(w, [*timer, str(rounds), "--", c.NSFW, "ps", "--json"], timeout=600).stdout)
        listed = json.loads(c.wrun(w, [c.NSFW, "ps", "--json"]).stdout)
        extra["ps_listed"] = len(listed)
        c.log(f"scale: nsfw ps with {len(listed)} running: {min(ps):.0f} ms at best")
        for p in runs:  # SIGTERM reaches each sleep through its nsfw run; the keepers remove the sandboxes
            procs.stop(p, wait=30)
        deadline = time.monotonic() + 60
        while c.sandbox_records(w) and time.monotonic() < deadline:
            time.sleep(0.2)
        extra["left_after_stop"] = len(c.sandbox_records(w))

        gc_ms: list[float] = []
        for rnd in range(max(1, rounds // 2)):
            t1 = time.perf_counter()
            ids = synthesize(w, stale, rnd + 1)
            c.log(f"scale: {stale} stale sandboxes made in {time.perf_counter() - t1:.2f} s")
            gc_ms += json.loads(c.wrun(w, [*timer, "1", "--", c.NSFW, "gc"], timeout=900).stdout)
            left = leftovers(w, ids)
            extra.setdefault("gc_leftovers", []).append(left)
            c.log(f"scale: nsfw gc of {stale}: {gc_ms[-1]:.0f} ms; left behind: {left}")
            if any(left.values()):
                raise RuntimeError(f"nsfw gc left things behind: {left}")
    extra["memory"] = {str(k): v for k, v in memory.items()}
    first, last = memory[1], memory[sandboxes]
    per = (last["pss_kb"] - first["pss_kb"]) / max(1, sandboxes - 1) / 1024
    per10 = (memory[10]["pss_kb"] - first["pss_kb"]) / 9 / 1024 if 10 in memory and sandboxes > 10 else per
    kinds = ", ".join(f"{k} {v['pss_kb'] / v['n'] / 1024:.1f}" for k, v in sorted(last["by_kind"].items()))
    g = "5 scale"
    rows = [
        Row(g, f"nsfw PSS per additional sandbox, 1 -> {sandboxes}", "MiB", [per], goal=("<=", 10.0), absolute=True,
            note=f"per process MiB: {kinds}"),
        Row(g, "nsfw PSS per additional sandbox, 1 -> 10", "MiB", [per10]),
        Row(g, f"nsfw ps, {sandboxes} running", "ms", ps, goal=("<", 150.0), absolute=True, note="whole process"),
        Row(g, f"nsfw ps --json, {sandboxes} running", "ms", ps_json, note="whole process"),
        Row(g, f"nsfw gc of {stale} stale sandboxes", "ms", gc_ms, goal=("<", 5000.0), absolute=True),
        Row(g, f"nsfw run of one more sandbox, {sandboxes // 2}-{sandboxes} running", "ms",
            launch_ms[sandboxes // 2:], note="until its command runs"),
    ]
    return rows, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sandboxes", type=int, default=100)
    parser.add_argument("--stale", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    c.need_root("scale")
    rows, extra = measure(args.sandboxes, args.stale, args.rounds)
    c.report("scale", rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
