#!/usr/bin/python3
"""bench/datapath: new TCP connections per second and TCP throughput out of an nsfw sandbox, against the same
traffic through an unfiltered namespace and through an NFQUEUE userspace firewall, in the same run.

All of it runs in nsfw's simulated world. The sandbox is a real `nsfw run` of a `nat` profile holding a
10,000-CIDR blocklist (a `file:` list, overlapping and adjacent ranges included), 200 allowed names (in the
world's zone; each resolved inside the sandbox first, so the grant sets hold 200 elements) and 50 port rules.
Its load reaches a server in the world's inet namespace through one of those port rules, after the blocklist,
zone and grant lookups: the longest path a new connection takes to be accepted.

Contenders, interleaved round by round (so a slow moment of the machine costs each alike):
  unfiltered   a namespace the bench builds on the world's host: veth pair, NAT, no filter rules at all
  nsfw         the sandbox (its own table, its host-side table with the DNS redirect and NAT)
  nfq verdict  a namespace like the unfiltered one whose SYNs go to NFQUEUE, accepted by Python (bench/nfq.py)
  nfq + /proc  the same, but each verdict first finds the owning process in /proc, as OpenSnitch does
Load: bench/c/connrate (epoll, CONC connections in flight, each reset once established) against bench/c/connsrv;
throughput: iperf3 (one stream). Conntrack's close/time-wait timeouts are set to 1 s in every namespace on the
path (the world's host, the sandbox, the bench's own), so tens of thousands of closed connections a second do
not fill the table; the same for every contender.

usage: bench/datapath.py [--rounds N] [--seconds S] [--conc N]    (as root; `make bench` installs the anchors)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c
import gen

BARE, NFQ = "bench-bare", "bench-nfq"
# --diagnose: the unfiltered namespace plus one piece of what a sandbox's table costs at a time. A value is the
# ruleset itself, or what to make of the sandbox's own table (`nft list`'s text).
DIAGNOSE: dict[str, str | Callable[[str], str]] = {
    # what a table that needs conntrack would cost (the sandbox's has none: nsfw/compile.py)
    "unfiltered + conntrack": (
        "table inet diag { chain output { type filter hook output priority 0; policy accept;\n"
        " ct state established,related accept;\n}\n}\n"),
    # the floor of a table: two filter hooks, one rule each
    "unfiltered + filter hooks, no conntrack": (
        "table inet diag {\n"
        " chain output { type filter hook output priority 0; policy accept;\n"
        " tcp flags & (fin | syn | rst | ack) != syn accept;\n}\n"
        " chain input { type filter hook input priority 0; policy accept;\n meta l4proto tcp accept;\n}\n}\n"),
    # the sandbox's own table, copied: its namespace's share of the cost, without the host table's
    "unfiltered + the sandbox's table": lambda table: table,
    # ... and without its verdict cache: every first SYN classified
    "unfiltered + the sandbox's table, no verdict cache": lambda table: "\n".join(
        line for line in table.splitlines() if "@seen" not in line),
}
CT_SYSCTLS = {f"net.netfilter.nf_conntrack_tcp_timeout_{k}": "1"
              for k in ("close", "time_wait", "fin_wait", "close_wait", "last_ack")}


def ct_tune(w: Any, ns: str | None) -> None:
    argv = ["sysctl", "-qw", *(f"{k}={v}" for k, v in CT_SYSCTLS.items())]
    c.wrun(w, argv if ns is None else ["ip", "netns", "exec", ns, *argv])


def set_sizes(w: Any, netns: str) -> dict[str, int]:
    """Elements in each set and map of the sandbox's table (an interval counts its start only)."""
    r = c.wrun(w, ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "nsfw"])
    out = {}
    for item in json.loads(r.stdout)["nftables"]:
        for kind in ("set", "map"):
            if kind in item:
                out[item[kind]["name"]] = len(item[kind].get("elem", []))
    return out


def resolve(names: list[str]) -> int:
    """Inside the sandbox: look every name up as an application would; exit 1 unless all resolve."""
    import socket

    bad = []
    for name in names:
        try:
            socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            bad.append(f"{name}: {e}")
    if bad:
        print("\n".join(bad[:10]), file=sys.stderr)
        return 1
    return 0


def measure(rounds: int = 5, seconds: float = 3.0, conc: int = 16,
            diagnose: bool = False) -> tuple[list[c.Row], dict[str, Any]]:
    connsrv, connrate = c.build_c("connsrv"), c.build_c("connrate")
    work = tempfile.mkdtemp(prefix="nsfw-bench-datapath-")
    os.chmod(work, 0o755)
    profile, names = gen.datapath_profile(work)
    from nsfw.world import DEFAULT_ZONE

    zone = {**DEFAULT_ZONE, **gen.zone(gen.names(len(names)))}
    lo, hi = gen.CONN_PORTS
    load = [connrate, gen.TARGET, str(lo), str(hi), str(conc), str(seconds), "10000000"]
    iperf = ["iperf3", "-c", gen.TARGET, "-p", str(gen.IPERF_PORT), "-t", str(seconds), "-J"]
    rates: dict[str, list[float]] = {"unfiltered": [], "nsfw": [], "nfq verdict": [], "nfq + /proc": []}
    gbps: dict[str, list[float]] = {"unfiltered": [], "nsfw": [], "nfq + /proc": []}
    extra: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "concurrency": conc}
    try:
        with c.world(zone) as (w, procs):
            c.prepare_host(w)
            ct_tune(w, None)
            for i, ns in enumerate((BARE, NFQ), 1):
                c.bare_netns(w, ns, i)
                ct_tune(w, ns)
            c.wrun(w, ["ip", "netns", "exec", NFQ, "iptables-nft", "-A", "OUTPUT", "-p", "tcp", "--syn",
                       "-j", "NFQUEUE", "--queue-num", "0"])
            diag_ns = {}
            for i, label in enumerate(DIAGNOSE if diagnose else (), 3):
                diag_ns[label] = ns = f"bench-diag{i}"
                c.bare_netns(w, ns, i)
                ct_tune(w, ns)
                rates[label] = []
            srv = c.wpopen(w, procs, [connsrv, gen.TARGET, str(lo), str(hi), "3600"], ns="inet")
            c.wait_ready(srv)
            c.wpopen(w, procs, ["timeout", "3600", "iperf3", "-s", "-B", gen.TARGET, "-p", str(gen.IPERF_PORT)],
                     ns="inet")

            c.log("datapath: starting the sandbox")
            nsfw_run = [c.NSFW, "run", "-p", profile, "--"]
            keep = c.wpopen(w, procs, [*nsfw_run, "sleep", "3600"])
            rec = c.sandbox_record(w, keep)
            ct_tune(w, rec["netns"])
            t0 = time.perf_counter()
            c.wrun(w, [*nsfw_run, c.PYTHON, "-I", os.path.abspath(__file__), "--resolve", *names])
            extra["resolve_200_names_s"] = time.perf_counter() - t0
            extra["set_elements"] = sizes = set_sizes(w, rec["netns"])
            own = c.wrun(w, ["ip", "netns", "exec", rec["netns"], "nft", "list", "table", "inet", "nsfw"]).stdout
            for label, ns in diag_ns.items():
                make = DIAGNOSE[label]
                script = make if isinstance(make, str) else make(own)
                c.wrun(w, ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script)
            c.log(f"datapath: sandbox {rec['id']}, sets {sizes}")
            blocked = gen.blocklist(10)[3].split("/")[0]
            probe = w.run([*nsfw_run, *w.probe_argv("tcp", blocked, 80)], timeout=30)
            extra["blocklisted_probe"] = probe.stdout.strip()
            if probe.returncode != 3:
                raise RuntimeError(f"a blocklisted address was not blocked: {probe.stdout} {probe.stderr}")

            def conn(label: str, argv: list[str]) -> None:
                r = c.wrun(w, argv, timeout=seconds * 4 + 30)
                data = json.loads(r.stdout.strip().splitlines()[-1])
                if data["failed"]:
                    c.log(f"datapath: {label}: {data['failed']} connections failed")
                rates[label].append(data["rate"])

            def thru(label: str, argv: list[str]) -> None:
                r = c.wrun(w, argv, timeout=seconds * 4 + 30)
                gbps[label].append(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9)

            def nfq(label: str, mode: str, with_thru: bool) -> None:
                prog = c.wpopen(w, procs, ["ip", "netns", "exec", NFQ, "timeout", "300", c.bench_python(),
                                           os.path.join(c.HERE, "nfq.py"), mode, "240"])
                c.wait_ready(prog)
                try:
                    conn(label, ["ip", "netns", "exec", NFQ, *load])
                    if with_thru:
                        thru(label, ["ip", "netns", "exec", NFQ, *iperf])
                finally:
                    procs.stop(prog)

            steps = [
                lambda: (conn("unfiltered", ["ip", "netns", "exec", BARE, *load]),
                         thru("unfiltered", ["ip", "netns", "exec", BARE, *iperf])),
                lambda: (conn("nsfw", [*nsfw_run, *load]), thru("nsfw", [*nsfw_run, *iperf])),
                lambda: nfq("nfq verdict", "verdict", False),
                lambda: nfq("nfq + /proc", "proc", True),
            ]
            for label, ns in diag_ns.items():
                steps.append(lambda label=label, ns=ns: conn(label, ["ip", "netns", "exec", ns, *load]))
            for rnd in range(rounds):
                for k in range(len(steps)):
                    steps[(k + rnd) % len(steps)]()
                c.log(f"datapath: round {rnd + 1}/{rounds}: " + ", ".join(
                    f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()))
            extra["set_elements_after"] = set_sizes(w, rec["netns"])
            # No conntrack in the sandbox (nsfw/compile.py): its load, and its 200 lookups, left no entry there
            c.wrun(w, [*nsfw_run, *load[:5], "1", "10000000"], timeout=30)
            entries = c.wrun(w, ["ip", "netns", "exec", rec["netns"], "cat", "/proc/net/nf_conntrack"]).stdout
            extra["sandbox_conntrack_entries"] = n_entries = len(entries.splitlines())
            c.log(f"datapath: conntrack entries in the sandbox after its load: {n_entries}")
    finally:
        subprocess.run(["rm", "-rf", work], check=False)
    extra["rates"] = rates
    extra["gbps"] = gbps
    g = "2 datapath"
    note = f"{conc} in flight"
    rows = [
        c.Row(g, "new TCP conn/s, nsfw sandbox", "/s", rates["nsfw"], "unfiltered", rates["unfiltered"],
              (">=", 0.95), note=note),
        c.Row(g, "new TCP conn/s, nsfw sandbox", "/s", rates["nsfw"], "nfq + /proc", rates["nfq + /proc"],
              (">=", 50.0), note=note),
        c.Row(g, "new TCP conn/s, nfq verdict in Python", "/s", rates["nfq verdict"], "unfiltered",
              rates["unfiltered"]),
        c.Row(g, "new TCP conn/s, nfq + /proc lookup", "/s", rates["nfq + /proc"], "unfiltered",
              rates["unfiltered"]),
        c.Row(g, "TCP throughput, nsfw sandbox", "Gbit/s", gbps["nsfw"], "unfiltered", gbps["unfiltered"],
              (">=", 0.95), note="iperf3, 1 stream"),
        c.Row(g, "TCP throughput, nsfw sandbox", "Gbit/s", gbps["nsfw"], "nfq + /proc", gbps["nfq + /proc"],
              note="NFQUEUE sees SYNs only"),
    ]
    rows += [c.Row(g, f"new TCP conn/s, {label}", "/s", rates[label], "unfiltered", rates["unfiltered"],
                   note="diagnosis") for label in DIAGNOSE if diagnose]
    return rows, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--conc", type=int, default=16)
    parser.add_argument("--diagnose", action="store_true",
                        help="also measure the unfiltered namespace with conntrack, and with a nat hook")
    parser.add_argument("--resolve", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolve:
        return resolve(args.resolve)
    c.need_root("datapath")
    rows, extra = measure(args.rounds, args.seconds, args.conc, args.diagnose)
    c.report("datapath", rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
