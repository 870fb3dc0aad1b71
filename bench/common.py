"""What every benchmark shares: statistics, result rows, the table, results files, the machine's description,
small C programs compiled on the fly, and the simulated world's extra pieces (a bare namespace without nsfw).

Every benchmark that sends traffic runs inside `nsfw.world.World`: nothing here touches the machine's own
network namespace. Helper processes started in the world are bounded in time (`timeout`, or a deadline of their
own) and killed, with their whole process group, when the benchmark ends.

Also a small command line, run inside the world where timing must not include `nsenter`:
  common.py time ROUNDS -- CMD [ARG...]     wall time of CMD, ROUNDS times, as a JSON list of milliseconds
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NSFW = os.path.join(ROOT, "bin", "nsfw")
RESULTS = os.path.join(HERE, "results")
PYTHON = "/usr/bin/python3"
BENCH_VENV = os.path.join(ROOT, ".venv-bench")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------------------------- statistics


def summary(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max); NaNs for no samples."""
    if not samples:
        nan = float("nan")
        return nan, nan, nan
    return statistics.median(samples), min(samples), max(samples)


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), nearest rank."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table: a measured metric, optionally against an anchor measured in the same run.

    `ratio` is median / anchor median. `goal` is how the ratio (or, with `absolute`, the median itself) must
    compare: ("<=", 1.0) or (">=", 0.95); None for a row that only informs."""

    goal_id: str  # "1 launch", "2 datapath", ...
    metric: str
    unit: str
    samples: list[float]
    anchor: str = ""
    anchor_samples: list[float] = field(default_factory=list)
    goal: tuple[str, float] | None = None
    absolute: bool = False  # the goal bounds the median itself, not the ratio
    note: str = ""

    @property
    def median(self) -> float:
        return summary(self.samples)[0]

    @property
    def anchor_median(self) -> float | None:
        return summary(self.anchor_samples)[0] if self.anchor_samples else None

    @property
    def ratio(self) -> float | None:
        base = self.anchor_median
        if base is None or base == 0 or not self.samples:
            return None
        return self.median / base

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        value = self.median if self.absolute else self.ratio
        if value is None or value != value:  # NaN: nothing measured
            return False
        op, bound = self.goal
        return {"<=": value <= bound, "<": value < bound, ">=": value >= bound, ">": value > bound}[op]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(median=self.median, min=summary(self.samples)[1], max=summary(self.samples)[2],
                   anchor_median=self.anchor_median, ratio=self.ratio, met=self.met)
        return out


def _num(x: float | None, unit: str = "") -> str:
    if x is None or x != x:
        return "-"
    ax = abs(x)
    text = f"{x:,.0f}" if ax >= 1000 else f"{x:.1f}" if ax >= 10 else f"{x:.2f}" if ax >= 0.1 else f"{x:.3f}"
    return f"{text} {unit}".strip()


def table(rows: Sequence[Row]) -> str:
    """A markdown table: goal, metric, median, min, max, anchor, ratio, goal met."""
    head = ["goal", "metric", "median", "min", "max", "anchor (median)", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---", "---:", "---",
                                                                                          "---"]) + "|"]
    for r in rows:
        med, lo, hi = summary(r.samples)
        anchor = f"{r.anchor} ({_num(r.anchor_median, r.unit)})" if r.anchor else "-"
        if r.goal is None:
            target = "-"
        elif r.absolute:
            target = f"{r.goal[0]} {_num(r.goal[1], r.unit)}"
        else:
            target = f"ratio {r.goal[0]} {r.goal[1]:g}"
        met = {None: "-", True: "yes", False: "**no**"}[r.met]
        metric = r.metric + (f" ({r.note})" if r.note else "")
        lines.append("| " + " | ".join([r.goal_id, metric, _num(med, r.unit), _num(lo, r.unit), _num(hi, r.unit),
                                        anchor, "-" if r.ratio is None else f"{r.ratio:.2f}", target, met]) + " |")
    return "\n".join(lines)


def machine() -> str:
    model = "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    distro = "Linux"
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, {distro}, kernel {platform.release()}, "
            f"Python {platform.python_version()}")


def save(name: str, rows: Sequence[Row], extra: dict[str, Any] | None = None) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(),
            "rows": [r.as_dict() for r in rows], **(extra or {})}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def report(name: str, rows: Sequence[Row], extra: dict[str, Any] | None = None) -> None:
    """Print the table of one benchmark and write its results file."""
    path = save(name, rows, extra)
    print(f"\n{name}, {time.strftime('%Y-%m-%d')}, {machine()}")
    print(table(rows))
    print(f"(results: {os.path.relpath(path, ROOT)})")


def need_root(name: str) -> None:
    if os.geteuid() != 0:
        sys.exit(f"bench/{name}: run as root (it builds network namespaces)")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- tools


def build_c(name: str) -> str:
    """Compile bench/c/NAME.c (once, when the source is newer) into bench/results/bin/NAME."""
    src = os.path.join(HERE, "c", f"{name}.c")
    out_dir = os.path.join(RESULTS, "bin")
    out = os.path.join(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        subprocess.run(["gcc", "-O2", "-Wall", "-o", out, src], check=True)
    for d in (RESULTS, out_dir):
        os.chmod(d, 0o755)
    os.chmod(out, 0o755)
    return out


def bench_python() -> str:
    """The bench venv's interpreter (netfilterqueue lives there), else the system's."""
    candidate = os.path.join(BENCH_VENV, "bin", "python3")
    return candidate if os.access(candidate, os.X_OK) else PYTHON


# ---------------------------------------------------------------------------------------------- the world


class Procs:
    """Helper processes started in the world: each in its own process group, all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def add(self, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], sig: int = signal.SIGTERM, wait: float = 10) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=wait)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                self.stop(proc)
        self.procs.clear()


@contextlib.contextmanager
def world(zone: dict[str, Any] | None = None) -> Iterator[Any]:
    """A started World, plus a Procs for the helpers started in it, removed in the right order."""
    from nsfw.world import World

    w = World(zone=zone)
    procs = Procs()
    w.start()
    try:
        yield w, procs
    finally:
        procs.close()
        w.stop()


def wrun(w: Any, argv: Sequence[str], *, ns: str = "host", timeout: float = 120, check: bool = True,
         **kw: Any) -> subprocess.CompletedProcess[str]:
    """world.run, failing loudly with the command's stderr."""
    r: subprocess.CompletedProcess[str] = w.run(list(argv), ns=ns, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} (in {ns}) exited {r.returncode}: {(r.stderr or '').strip()[-2000:]}")
    return r


def wpopen(w: Any, procs: Procs, argv: Sequence[str], *, ns: str = "host", **kw: Any) -> subprocess.Popen[str]:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return procs.add(w.popen(list(argv), ns=ns, start_new_session=True, **kw))


def wait_ready(proc: subprocess.Popen[str], word: str = "ready", timeout: float = 15) -> None:
    """Wait for a helper's first line to be `word`."""
    import select

    assert proc.stdout is not None
    ready, _w, _x = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if line != word:
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        raise RuntimeError(f"helper {proc.args!r} did not start: {line!r} {err}")


BARE_POOL = "10.99"  # bench namespaces: 10.99.N.0/30, far from nsfw's pool 10.213.0.0/16


def prepare_host(w: Any) -> None:
    """The world's host forwards (as a machine that already routes): nsfw then adds no guard table, and the
    bench's own namespaces reach the simulated internet through the same host as nsfw's sandboxes."""
    wrun(w, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    # one NAT table for every bench namespace, as nsfw's host table masquerades a sandbox's traffic
    wrun(w, ["nft", "-f", "-"], input=(
        "table ip nsfwbench {\n"
        " chain postrouting { type nat hook postrouting priority 100; policy accept;\n"
        f"  ip saddr {BARE_POOL}.0.0/16 oifname != \"bb*\" masquerade\n"
        " }\n"
        "}\n"))


def bare_netns(w: Any, name: str, index: int) -> str:
    """A namespace on the world's host with a veth pair and NAT to the simulated internet, and no filter
    rules at all: the unfiltered path a sandbox's traffic is compared with. Returns its address."""
    base = f"{BARE_POOL}.{index}"
    host_if, host_ip, ns_ip = f"bb{index}", f"{base}.1", f"{base}.2"
    wrun(w, ["ip", "-batch", "-"], input="\n".join([
        f"netns add {name}",
        f"link add {host_if} type veth peer name eth0 netns {name}",
        f"addr add {host_ip}/30 dev {host_if}",
        f"link set {host_if} up",
    ]) + "\n")
    wrun(w, ["ip", "-n", name, "-batch", "-"], input="\n".join([
        "link set lo up",
        "link set eth0 up",
        f"addr add {ns_ip}/30 dev eth0",
        f"route add default via {host_ip}",
    ]) + "\n")
    return ns_ip


def sandbox_records(w: Any) -> list[dict[str, Any]]:
    """The records of the sandboxes running in the world (nsfw's /run/nsfw there)."""
    import glob

    out = []
    for path in glob.glob(f"/proc/{w.pid}/root/run/nsfw/sandboxes/*.json"):
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            out.append(json.load(f))
    return out


def sandbox_record(w: Any, proc: subprocess.Popen[str] | None = None, timeout: float = 20) -> dict[str, Any]:
    """The record of the one sandbox running in the world, once its command runs (`proc`: its `nsfw run`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"nsfw run exited {proc.returncode}: {err.strip()}")
        for rec in sandbox_records(w):
            if rec.get("command_pid"):
                return rec
        time.sleep(0.1)
    raise RuntimeError("the sandbox did not start")


def gateway(rec: dict[str, Any]) -> str:
    """A sandbox's IPv4 gateway on the host side, where its resolver listens: the first address of its /30."""
    import ipaddress

    four = next(a for a in rec["addresses"] if ":" not in a)
    return str(ipaddress.ip_interface(four).network.network_address + 1)


def timed_inner(argv: Sequence[str], rounds: int) -> list[float]:
    """Wall time of argv, `rounds` times, in milliseconds (output discarded)."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run(list(argv), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: Sequence[str]) -> int:
    if len(argv) >= 3 and argv[0] == "time" and argv[2] == "--":
        json.dump(timed_inner(argv[3:], int(argv[1])), sys.stdout)
        return 0
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
