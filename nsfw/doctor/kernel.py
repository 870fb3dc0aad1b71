"""The doctor's kernel and version checks: namespaces, veth and nf_tables tried for real, and what is installed.

Nothing here changes the machine: kernel features are tried in a forked child that first moves into a
throwaway network namespace (as `nft.render` does), with tiny rulesets (one per feature, so that a failure
names it) and then the very rulesets nsfw loads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from ..names import PREFIX
from .check import APT_FIX, Check, _ok
from .ruleset import SAMPLE

__all__ = ["MIN_KERNEL", "MIN_NFT", "MIN_PYROUTE2", "kernel_checks", "probe_kernel", "version_checks"]

MIN_NFT = (0, 9, 4)  # concatenated interval sets (`ip daddr . meta l4proto . th dport`) in nft
MIN_KERNEL = (5, 6)  # ... and in the kernel (nft_set_pipapo)
MIN_PYROUTE2 = (0, 7)  # pyproject.toml's floor


def _version(text: str) -> tuple[int, ...]:
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x) for x in found.groups() if x is not None) if found else ()


def _tiny_rulesets() -> list[tuple[str, list[dict[str, Any]]]]:
    """One table per feature, so that a failure names the feature."""
    t = f"{PREFIX}-doctor"

    def table(suffix: str, *cmds: dict[str, Any]) -> list[dict[str, Any]]:
        name = f"{t}-{suffix}"
        fix = [{**c, "add": {k: {**v, "table": name} for k, v in c["add"].items()}} for c in cmds]
        return [{"add": {"table": {"family": "inet", "name": name}}}, *fix]

    concat = {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}, {"meta": {"key": "l4proto"}},
                         {"payload": {"protocol": "th", "field": "dport"}}]}
    return [
        ("inet table, filter chain, reject", table(
            "filter",
            {"add": {"chain": {"family": "inet", "name": "f", "type": "filter", "hook": "forward", "prio": 0,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": "inet", "chain": "f", "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                {"accept": None}]}}},
            {"add": {"rule": {"family": "inet", "chain": "f", "expr": [
                {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]}}})),
        ("inet NAT with masquerade", table(
            "nat",
            {"add": {"chain": {"family": "inet", "name": "p", "type": "nat", "hook": "postrouting", "prio": 100,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": "inet", "chain": "p", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                           "right": {"prefix": {"addr": "10.213.0.0", "len": 16}}}},
                {"masquerade": None}]}}})),
        ("concatenated interval sets (address . protocol . port)", table(
            "sets",
            {"add": {"set": {"family": "inet", "name": "s", "type": ["ipv4_addr", "inet_proto", "inet_service"],
                             "flags": ["interval"], "elem": [{"concat": [
                                 {"prefix": {"addr": "192.0.2.0", "len": 24}}, "tcp", {"range": [443, 444]}]}]}}},
            {"add": {"chain": {"family": "inet", "name": "o", "type": "filter", "hook": "output", "prio": 0,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": "inet", "chain": "o", "expr": [
                {"match": {"op": "==", "left": concat, "right": "@s"}}, {"accept": None}]}}})),
        ("sets filled from the packet path (the sandbox's UDP flows), TCP flags", table(
            "dynset",
            {"add": {"set": {"family": "inet", "name": "f", "type": ["ipv4_addr", "inet_service", "inet_service"],
                             "flags": ["timeout"], "timeout": 120, "size": 65536}}},
            {"add": {"chain": {"family": "inet", "name": "o", "type": "filter", "hook": "output", "prio": 0,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": "inet", "chain": "o", "expr": [
                {"match": {"op": "!=", "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                                                      ["fin", "syn", "rst", "ack"]]}, "right": "syn"}},
                {"accept": None}]}}},
            {"add": {"rule": {"family": "inet", "chain": "o", "expr": [
                {"set": {"op": "update", "set": "@f", "elem": {"concat": [
                    {"payload": {"protocol": "ip", "field": "daddr"}},
                    {"payload": {"protocol": "udp", "field": "dport"}},
                    {"payload": {"protocol": "udp", "field": "sport"}}]}}}]}}})),
    ]


def _real_rulesets() -> list[tuple[str, list[dict[str, Any]]]]:
    """What nsfw itself loads for a profile that uses every kind of rule: the real test of the kernel."""
    from .. import compile as rules
    from ..names import HostEnv
    from ..profile import Profile, Rule

    profile = Profile(
        name="doctor", path="", allow=(Rule("zone", "internet"), Rule("cidr", "192.0.2.0/24", "tcp", ((443, 443),)),
                                       Rule("zone", "host", "tcp", ((631, 631),)), Rule("host", "example.org")),
        deny=(Rule("zone", "lan"), Rule("host", "ads.example.org")))
    env = HostEnv(addresses=(ipaddress.ip_address("192.168.1.10"),),
                  connected=(ipaddress.ip_network("192.168.1.0/24"),), default6=True)
    gateways = [str(a.ip) for a in (SAMPLE.gateway4, SAMPLE.gateway6) if a]
    return [("nsfw's host-side table", rules.host_ruleset(SAMPLE, profile)),
            ("nsfw's forwarding guard", rules.guard_ruleset()),
            ("nsfw's sandbox table", rules.sandbox_ruleset(profile, env, gateways))]


def _kernel_child() -> dict[str, Any]:  # pragma: no cover - runs in the forked child
    from ..caps import CLONE_NEWNET, CLONE_NEWUSER, unshare

    res: dict[str, Any] = {}
    try:
        unshare(CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET)
        res["netns"] = ""
    except OSError as e:
        res["netns"] = str(e)
        return res
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname=f"{PREFIX}doctor0", kind="veth", peer=f"{PREFIX}doctor1")
        res["veth"] = ""
    except Exception as e:
        res["veth"] = f"{type(e).__name__}: {e}"
    try:
        from .. import nft
    except Exception as e:
        res["nft"] = [["libnftables", f"{type(e).__name__}: {e}"]]
        return res
    steps: list[list[str]] = []
    for what, build in (("tiny", _tiny_rulesets), ("real", _real_rulesets)):
        try:
            parts = build()
        except Exception as e:
            steps.append([what, f"cannot build: {type(e).__name__}: {e}"])
            continue
        for label, cmds in parts:
            try:
                nft.apply(cmds, label)
                steps.append([label, ""])
            except Exception as e:
                steps.append([label, str(e)])
    res["nft"] = steps
    return res


def probe_kernel(timeout: float = 20.0) -> dict[str, Any]:
    """Try namespaces, veth and nf_tables in a forked child inside a throwaway network namespace."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(_kernel_child()).encode())
            code = 0
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.write(write, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(code)
    os.close(write)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _w, _x = select.select([read], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                return {"error": f"the kernel check did not finish in {timeout:.0f} s"}
            chunk = os.read(read, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    try:
        result: dict[str, Any] = json.loads(data or b"{}")
    except ValueError:
        return {"error": "the kernel check died without an answer"}
    return result


def _kernel_fix(label: str, error: str) -> str:
    if "masquerade" in label or "NAT" in label:
        return "load the NAT modules (modprobe nft_nat nft_masq nft_chain_nat), or use a kernel with " \
               "CONFIG_NFT_NAT and CONFIG_NFT_MASQ"
    if "concatenated" in label:
        return (f"needs Linux >= {'.'.join(map(str, MIN_KERNEL))} (CONFIG_NF_TABLES_SET, nft_set_pipapo) and "
                f"nftables >= {'.'.join(map(str, MIN_NFT))}: upgrade the kernel and `{APT_FIX}`")
    if "libnftables" in label:
        return APT_FIX
    return "modprobe nf_tables nft_reject_inet nft_ct, or use a kernel with CONFIG_NF_TABLES and CONFIG_NF_TABLES_INET"


def kernel_checks(probe: Mapping[str, Any]) -> list[Check]:
    """Turn probe_kernel()'s answer into checks (pure)."""
    if "error" in probe:
        return [Check("kernel", "fail", str(probe["error"]), "run `nsfw doctor` again; report it if it persists")]
    if probe.get("netns"):
        hint = "" if os.geteuid() == 0 else " (without root, user namespaces must be enabled too)"
        return [Check("kernel: namespaces", "fail", f"cannot create a network namespace: {probe['netns']}{hint}",
                      "use a kernel with CONFIG_NET_NS (every distribution kernel has it)")]
    out = [_ok("kernel: namespaces", "network namespaces work")]
    if probe.get("veth"):
        out.append(Check("kernel: veth", "fail", f"cannot create a veth pair: {probe['veth']}",
                         "modprobe veth, or use a kernel with CONFIG_VETH"))
    else:
        out.append(_ok("kernel: veth", "veth pairs work"))
    steps = probe.get("nft") or []
    failed = [(label, err) for label, err in steps if err]
    if failed:
        label, err = failed[0]
        out.append(Check("kernel: nf_tables", "fail", f"{label}: {err}", _kernel_fix(label, err)))
    else:
        out.append(_ok("kernel: nf_tables", "loaded " + ", ".join(label for label, _e in steps)
                       + " into a throwaway namespace"))
    return out


# ---------------------------------------------------------------------------------------------- versions

def version_checks() -> list[Check]:
    out: list[Check] = []
    nft_bin = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if nft_bin is None:
        out.append(Check("versions: nft", "warn", "the nft command is not installed (nsfw uses libnftables; nft is "
                         "for looking at rulesets yourself)", "apt-get install nftables"))
    else:
        done = subprocess.run([nft_bin, "--version"], capture_output=True, text=True, timeout=10, check=False)
        have = _version(done.stdout)
        if have and have < MIN_NFT:
            out.append(Check("versions: nft", "fail", f"{done.stdout.strip()}: older than "
                             f"{'.'.join(map(str, MIN_NFT))}, which concatenated interval sets need",
                             "upgrade: " + APT_FIX))
        else:
            out.append(_ok("versions: nft", done.stdout.strip() or "nft present"))
    import importlib.util

    if importlib.util.find_spec("nftables") is None:
        out.append(Check("versions: libnftables", "fail", "the python3 binding of libnftables is missing", APT_FIX))
    else:
        out.append(_ok("versions: libnftables", "python3-nftables binding present (the same release as nft on "
                       "Debian)"))
    try:
        import importlib.metadata

        pv = importlib.metadata.version("pyroute2")
    except Exception:
        pv = ""
    if importlib.util.find_spec("pyroute2") is None:
        out.append(Check("versions: pyroute2", "fail", "pyroute2 is missing", APT_FIX))
    elif pv and _version(pv) and _version(pv) < MIN_PYROUTE2:
        out.append(Check("versions: pyroute2", "fail", f"pyroute2 {pv} is older than "
                         f"{'.'.join(map(str, MIN_PYROUTE2))}", "upgrade: " + APT_FIX))
    else:
        out.append(_ok("versions: pyroute2", f"pyroute2 {pv or '(version unknown)'}"))
    kernel = _version(os.uname().release)
    if kernel and kernel < MIN_KERNEL:
        out.append(Check("versions: kernel", "warn", f"Linux {os.uname().release}: older than "
                         f"{'.'.join(map(str, MIN_KERNEL))}, which concatenated interval sets need (see the "
                         "nf_tables check)", "upgrade the kernel"))
    else:
        out.append(_ok("versions: kernel", f"Linux {os.uname().release}"))
    return out

