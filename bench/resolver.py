#!/usr/bin/python3
"""bench/resolver: the sandbox's resolver (queries per second, latency added, cached and uncached) against
dnsmasq with --nftset filling the same kind of set, both in front of the same upstream: the world's DNS server.

All of it runs in nsfw's simulated world:
  nsfw      a real `nsfw run` of a profile allowing *.r.bench.test: its resolver (forked by the sandbox's
            keeper, on the sandbox's gateway) grants every address it hands out into the sandbox's set
            through the keeper's granter; the load runs inside the sandbox
  dnsmasq   on the world's host, on the gateway of a bench namespace (veth, NAT; no filter rules), with
            `--nftset=/r.bench.test/4#inet#dnsbench#grant4` (a timeout set) and a 10,000-entry cache; the load
            runs in that namespace
  upstream  the world's DNS server asked directly, from the same bench namespace: what a resolver adds to
Load: dnsperf (queries per second: as many in flight as it may, for a few seconds) and a sequential prober
(this file, --probe: one query at a time, for the latency distribution), the same tools for every contender.
Uncached: every query a name the contender never asked before, each name with an address of its own (10,000
a round for dnsperf, for as long as they take; 300 for the prober); cached: 200 names asked again and again
after one pass to fill the caches. Contenders are interleaved round by round.

usage: bench/resolver.py [--rounds N] [--seconds S]    (as root; `make bench` installs dnsmasq and dnsperf)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as c
import gen

BARE = "bench-dns"
DOMAIN = "r.bench.test"
FIRST_ADDRESS = "198.18.1.0"
UPSTREAM = "192.0.2.53"
CACHED_NAMES = 200


def probe(server: str, names: list[str]) -> list[float]:
    """Ask `server` for each name's A record, one at a time; the round-trip times in ms (lost: not counted)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect((server, 53))
        for i, name in enumerate(names):
            qid = i & 0xFFFF
            query = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + b"".join(
                bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
            t0 = time.perf_counter_ns()
            s.send(query)
            try:
                while True:
                    reply = s.recv(4096)
                    if struct.unpack("!H", reply[:2])[0] == qid:
                        break
            except TimeoutError:
                continue
            out.append((time.perf_counter_ns() - t0) / 1e6)
            if reply[3] & 0x0F:
                raise SystemExit(f"{name}: rcode {reply[3] & 0x0F}")
    return out


def dnsperf_qps(text: str) -> float:
    m = re.search(r"Queries per second:\s+([0-9.]+)", text)
    if not m:
        raise RuntimeError(f"no rate in dnsperf's output: {text[-500:]}")
    return float(m.group(1))


class Names:
    """The benchmark's names, each with an address of its own (198.18.1.0 onwards: a benchmarking range, never
    reached): granting a name's addresses for the first time is the common case of an uncached answer."""

    def __init__(self) -> None:
        self.zone: dict[str, Any] = {}

    def make(self, prefix: str, count: int) -> list[str]:
        base = int(ipaddress.IPv4Address(FIRST_ADDRESS)) + len(self.zone)
        out = [f"{prefix}{i}.{DOMAIN}" for i in range(count)]
        for i, name in enumerate(out):
            self.zone[name] = {"A": [str(ipaddress.IPv4Address(base + i))], "ttl": 3600}
        return out


def measure(rounds: int = 5, seconds: float = 3.0, probes: int = 300,
            uncached: int = 10_000) -> tuple[list[c.Row], dict[str, Any]]:
    from nsfw.world import DEFAULT_ZONE

    names = Names()
    cached = names.make("c", CACHED_NAMES)
    # one fresh list a round, each name asked once by each contender (their caches are their own)
    fresh = [(names.make(f"u{r}x", uncached), names.make(f"p{r}x", probes)) for r in range(rounds)]
    zone = {**DEFAULT_ZONE, **names.zone}
    work = tempfile.mkdtemp(prefix="nsfw-bench-resolver-")
    os.chmod(work, 0o755)
    profile = gen.write_profile(os.path.join(work, "resolver.yaml"), description="bench/resolver",
                                allow=[f"*.{DOMAIN}"])
    def qfile(label: str, entries: list[str]) -> str:
        path = os.path.join(work, f"{label}.txt")
        with open(path, "w") as f:
            f.write("".join(f"{n} A\n" for n in entries))
        os.chmod(path, 0o644)
        return path

    cached_file = qfile("cached", cached)
    fresh_files = [qfile(f"uncached{r}", perf_names) for r, (perf_names, _p) in enumerate(fresh)]
    qps: dict[str, dict[str, list[float]]] = {k: {"nsfw": [], "dnsmasq": [], "upstream": []}
                                              for k in ("cached", "uncached")}
    p50: dict[str, dict[str, list[float]]] = {k: {"nsfw": [], "dnsmasq": [], "upstream": []}
                                              for k in ("cached", "uncached")}
    extra: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "probes": probes}
    try:
        with c.world(zone) as (w, procs):
            c.prepare_host(w)
            client = c.bare_netns(w, BARE, 5)
            gw = client.rsplit(".", 1)[0] + ".1"
            c.wrun(w, ["nft", "-f", "-"], input="table inet dnsbench {\n set grant4 {\n  type ipv4_addr\n"
                                                 "  flags timeout\n  timeout 1h\n }\n}\n")
            dnsmasq = c.wpopen(w, procs, [
                "timeout", "3600", "dnsmasq", "-k", "--no-resolv", "--no-hosts", f"--server={UPSTREAM}",
                f"--listen-address={gw}", "--bind-interfaces", "--except-interface=lo", "--cache-size=10000",
                f"--nftset=/{DOMAIN}/4#inet#dnsbench#grant4", "--pid-file=", "--log-facility=-"])
            time.sleep(0.5)
            if dnsmasq.poll() is not None:
                raise RuntimeError(f"dnsmasq did not start: {dnsmasq.stderr.read() if dnsmasq.stderr else ''}")
            c.log("resolver: starting the sandbox")
            nsfw_run = [c.NSFW, "run", "-p", profile, "--"]
            keep = c.wpopen(w, procs, [*nsfw_run, "sleep", "3600"])
            rec = c.sandbox_record(w, keep)
            sandbox_gw = c.gateway(rec)
            where = {"nsfw": (nsfw_run, sandbox_gw), "dnsmasq": (["ip", "netns", "exec", BARE], gw),
                     "upstream": (["ip", "netns", "exec", BARE], UPSTREAM)}
            me = [c.PYTHON, "-I", os.path.abspath(__file__), "--probe"]

            def perf(label: str, kind: str, rnd: int) -> None:
                prefix, server = where[label]
                if kind == "cached":
                    argv = ["dnsperf", "-s", server, "-d", cached_file, "-l", str(seconds), "-q", "64", "-t", "2"]
                else:  # each name once: as long as that takes (a minute at most)
                    argv = ["dnsperf", "-s", server, "-d", fresh_files[rnd], "-n", "1", "-l", "60", "-q", "64",
                            "-t", "2"]
                r = c.wrun(w, [*prefix, *argv], timeout=seconds * 4 + 30)
                qps[kind][label].append(dnsperf_qps(r.stdout))

            def lat(label: str, kind: str, rnd: int) -> None:
                prefix, server = where[label]
                batch = cached if kind == "cached" else fresh[rnd][1]
                r = c.wrun(w, [*prefix, *me, server, *batch[:probes]], timeout=120)
                times = json.loads(r.stdout)
                p50[kind][label].append(c.percentile(times, 50))

            for label in where:  # fill the caches, and check every contender answers
                lat(label, "cached", 0)
                p50["cached"][label].clear()
            for rnd in range(rounds):
                labels = list(where)
                labels = labels[rnd % 3:] + labels[:rnd % 3]
                for label in labels:
                    for kind in ("cached", "uncached"):
                        lat(label, kind, rnd)
                        perf(label, kind, rnd)
                c.log(f"resolver: round {rnd + 1}/{rounds}: " + "; ".join(
                    f"{k} {kind} {qps[kind][k][-1]:,.0f} q/s p50 {p50[kind][k][-1]:.3f} ms"
                    for kind in ("cached", "uncached") for k in where))
            sets = c.wrun(w, ["ip", "netns", "exec", rec["netns"], "nft", "-j", "list", "set", "inet", "nsfw",
                              "dns4_0"]).stdout
            extra["nsfw_set_elements"] = len(json.loads(sets)["nftables"][1]["set"].get("elem", []))
            theirs = c.wrun(w, ["nft", "-j", "list", "set", "inet", "dnsbench", "grant4"]).stdout
            extra["dnsmasq_set_elements"] = len(json.loads(theirs)["nftables"][1]["set"].get("elem", []))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra["qps"], extra["p50_ms"] = qps, p50
    added = {kind: {k: [x - d for x, d in zip(p50[kind][k], p50[kind]["upstream"], strict=False)]
                    for k in ("nsfw", "dnsmasq")} for kind in p50}
    extra["added_p50_ms"] = added
    g = "4 resolver"
    rows = []
    for kind in ("cached", "uncached"):
        rows.append(c.Row(g, f"queries/s, {kind}", "q/s", qps[kind]["nsfw"], "dnsmasq --nftset",
                          qps[kind]["dnsmasq"], (">=", 0.5), note="dnsperf"))
    rows.append(c.Row(g, "p50 latency added, uncached", "ms", added["uncached"]["nsfw"], "dnsmasq --nftset",
                      added["uncached"]["dnsmasq"], ("<=", 1.5), note="over asking upstream directly"))
    rows.append(c.Row(g, "p50 latency, cached", "ms", p50["cached"]["nsfw"], "dnsmasq --nftset",
                      p50["cached"]["dnsmasq"], ("<=", 1.5), note="whole round trip: a cache beats upstream"))
    for kind in ("cached", "uncached"):
        rows.append(c.Row(g, f"p50 latency added, {kind}", "ms", added[kind]["nsfw"], "", [],
                          note="nsfw over upstream directly"))
        rows.append(c.Row(g, f"queries/s, {kind}, nsfw", "q/s", qps[kind]["nsfw"], "upstream directly",
                          qps[kind]["upstream"]))
    return rows, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], args.probe[1:])))
        return 0
    c.need_root("resolver")
    for tool in ("dnsmasq", "dnsperf"):
        if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin"):
            sys.exit(f"bench/resolver: needs {tool} (make bench installs it)")
    rows, extra = measure(args.rounds, args.seconds, args.probes)
    c.report("resolver", rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
