"""Which other firewall would drop the sandboxes' traffic, in the doctor's words, with the fix.

This is what `nsfw run` calls at launch (`launch_blockers()`, through `from nsfw.doctor import ...`): it reads
the ruleset once and says which other firewall would drop the sandboxes' forwarded traffic or their DNS. It
does not pattern-match product names: it evaluates every base chain on the hook (`evaluation`) for a few
concrete packets a sandbox sends and receives (`ruleset`), and reports a chain only when every path those
packets can take through it ends in drop or reject. Products are named only for the fix.

Importing this module is cheap, since every launch does: standard library, `names`, and no `typing`;
libnftables is imported by the functions that read the live ruleset.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import TYPE_CHECKING
from .evaluation import evaluate
from .ruleset import LEGACY_TABLE, Packet, Ruleset, forward_packets, index_legacy, index_ruleset, input_packets, owned

if TYPE_CHECKING:
    from typing import Any

__all__ = ["Finding", "findings", "forward_blockers", "forward_blockers_now", "forward_findings", "input_findings",
           "iptables_rules", "launch_blockers", "legacy_rules", "product", "uplinks"]


@dataclass(frozen=True)
class Finding:
    """One foreign base chain that drops (`blocked`) or may drop (`unsure`) some of the sandboxes' traffic."""

    hook: str
    family: str
    table: str
    chain: str
    product: str
    blocked: tuple[str, ...]  # labels of packets every path drops
    unsure: tuple[str, ...]  # labels of packets some path drops
    how: str  # where the drop happens: "policy drop", "rule 12 of chain filter_FORWARD (reject)"
    fix: str

    @property
    def certain(self) -> bool:
        return bool(self.blocked)

    @property
    def what(self) -> str:
        owner = {"": "another firewall", "iptables": "iptables' rules", "iptables-legacy": "iptables-legacy's rules"
                 }.get(self.product, self.product)
        where = f"table {self.family} {self.table}, chain {self.chain}"
        if self.blocked:
            return f"{owner} ({where}) drops {_join(self.blocked)}: {self.how}"
        return f"{owner} ({where}) may drop {_join(self.unsure)}, depending on what nsfw cannot see: {self.how}"

    @property
    def message(self) -> str:
        return f"{self.what}. Fix: {self.fix}"


def _join(labels: Sequence[str]) -> str:
    # "connections out of a sandbox (IPv4), ... (IPv6)" -> "connections out of a sandbox (IPv4, IPv6)"
    grouped: dict[str, list[str]] = {}
    for label in labels:
        what, _sep, fam = label.rpartition(" (")
        if fam.rstrip(")") not in grouped.setdefault(what, []):
            grouped[what].append(fam.rstrip(")"))
    return "; ".join(f"{what} ({', '.join(fams)})" for what, fams in grouped.items())


def product(rs: Ruleset, family: str, table: str) -> str:
    """The firewall a table belongs to, when recognisable from its table and chain names."""
    names = [k[2] for k in rs.chains if k[0] == family and k[1] == table]
    if table == "firewalld" or any(n.startswith("filter_FWD_") for n in names):
        return "firewalld"
    if any(n.startswith(("ufw-", "ufw6-")) for n in names):
        return "ufw"
    if any(n.startswith("DOCKER") for n in names):
        return "Docker"
    if any(n.startswith("LIBVIRT_") for n in names) or table.startswith("libvirt"):
        return "libvirt"
    if any(n.startswith("KUBE-") for n in names):
        return "Kubernetes"
    if table in ("netavark", "podman"):
        return "Podman"
    if table in ("lxd", "incus"):
        return table.upper() if table == "lxd" else "Incus"
    if any(n.startswith("ts-") for n in names):
        return "Tailscale"
    if table == LEGACY_TABLE:
        return "iptables-legacy"
    if table in ("filter", "mangle") and family in ("ip", "ip6") and any(n.isupper() for n in names):
        return "iptables"
    return ""


def _fix(rs: Ruleset, f: Finding) -> str:
    """The command that lets nsfw's traffic through this one firewall. Accepting nsfw's interfaces here opens
    nothing a profile denies: a packet must pass every base chain, and nsfw's own tables still drop it."""
    v6 = f.family == "ip6"
    ipt = ("ip6tables" if v6 else "iptables") + ("-legacy" if f.table == LEGACY_TABLE else "")
    fwd = f.hook == "forward"
    note = " (nsfw's own tables still enforce every profile: this opens nothing a profile denies)"
    if f.product == "ufw":
        return ("ufw route allow in on nsfw+" if fwd else "ufw allow in on nsfw+ to any port 53") + note
    if f.product == "firewalld":
        return ("firewall-cmd --permanent --zone=trusted --add-interface=nsfw+ && firewall-cmd --reload" + note)
    if f.product == "Docker" and fwd and (f.family, f.table, "DOCKER-USER") in rs.chains:
        return (f"{ipt} -I DOCKER-USER -i nsfw+ -j ACCEPT && "
                f"{ipt} -I DOCKER-USER -o nsfw+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" + note
                + "; Docker keeps DOCKER-USER across its restarts, not across reboots: save it (netfilter-persistent)")
    if f.table == LEGACY_TABLE or f.product in ("iptables", "Docker", "libvirt", "Kubernetes"):
        if fwd:
            return (f"{ipt} -I {f.chain} -i nsfw+ -j ACCEPT && "
                    f"{ipt} -I {f.chain} -o nsfw+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" + note
                    + ", and make it permanent where your firewall's rules are kept")
        return (f"{ipt} -I {f.chain} -i nsfw+ -p udp --dport 53 -j ACCEPT && "
                f"{ipt} -I {f.chain} -i nsfw+ -p tcp --dport 53 -j ACCEPT" + note)
    chain = f"{f.family} {f.table} {f.chain}"
    if fwd:
        return (f"nft insert rule {chain} iifname \"nsfw*\" accept && "
                f"nft insert rule {chain} oifname \"nsfw*\" ct state established,related accept" + note
                + ", and add the same to the file that defines that table (/etc/nftables.conf?)")
    return (f"nft insert rule {chain} iifname \"nsfw*\" meta l4proto {{ tcp, udp }} th dport 53 accept" + note
            + ", and add the same to the file that defines that table (/etc/nftables.conf?)")


def findings(rs: Ruleset, hook: str, packets: Sequence[Packet], uplinks: Sequence[str] = ()) -> list[Finding]:
    out: list[Finding] = []
    for key, chain in sorted(rs.chains.items()):
        family, table, name = key
        if chain.get("hook") != hook or owned(family, table) or family not in ("ip", "ip6", "inet"):
            continue
        blocked: list[str] = []
        unsure: list[str] = []
        hows: list[str] = []
        for pkt in packets:
            if pkt.hook != hook or (family == "ip" and pkt.family != 4) or (family == "ip6" and pkt.family != 6):
                continue
            outcomes = evaluate(rs, key, pkt, uplinks)
            drops = sorted(where for kind, where in outcomes if kind == "drop")
            if not drops:
                continue
            (blocked if all(kind == "drop" for kind, _w in outcomes) else unsure).append(pkt.label)
            hows += [d for d in drops if d not in hows]
        if not blocked and not unsure:
            continue
        draft = Finding(hook, family, table, name, product(rs, family, table), tuple(dict.fromkeys(blocked)),
                        tuple(dict.fromkeys(x for x in unsure if x not in blocked)), ", ".join(hows[:2]), "")
        out.append(dataclasses.replace(draft, fix=_fix(rs, draft)))
    return out


def _ruleset(ruleset_json: Sequence[Mapping[str, Any]], legacy: Mapping[str, str] | None) -> Ruleset:
    """The JSON ruleset plus iptables text: "iptables"/"ip6tables" are iptables-legacy's own tables;
    "iptables-nft"/"ip6tables-nft" (`iptables-nft -S`) stand in for the JSON's `ip filter`/`ip6 filter`, whose
    xt matches (`-m conntrack --ctstate ...`) the JSON shows without their arguments."""
    replaced = {("ip6" if t.startswith("ip6") else "ip") for t in (legacy or {}) if t.endswith("-nft")}
    rs = index_ruleset(item for item in ruleset_json
                       if "metainfo" not in item and _table_of(item) not in {(f, "filter") for f in replaced})
    for tool, text in (legacy or {}).items():
        family = "ip6" if tool.startswith("ip6") else "ip"
        index_legacy(family, text, rs, "filter" if tool.endswith("-nft") else LEGACY_TABLE)
    return rs


def _table_of(item: Mapping[str, Any]) -> tuple[str, str]:
    """(family, table) of a `list ruleset` item: a table names itself, the rest name their table."""
    kind, body = next(iter(item.items()), ("", {}))
    if not isinstance(body, dict):
        return "", ""
    return str(body.get("family", "")), str(body.get("name" if kind == "table" else "table", ""))


def _has_xt(ruleset_json: Sequence[Mapping[str, Any]], family: str) -> bool:
    return any("rule" in item and item["rule"].get("family") == family and item["rule"].get("table") == "filter"
               and any("xt" in e for e in item["rule"].get("expr", [])) for item in ruleset_json)


def forward_findings(ruleset_json: Sequence[Mapping[str, Any]], legacy: Mapping[str, str] | None = None, *,
                     uplinks: Sequence[str] = (), ipv6: bool = True) -> list[Finding]:
    return findings(_ruleset(ruleset_json, legacy), "forward", forward_packets(ipv6), uplinks)


def input_findings(ruleset_json: Sequence[Mapping[str, Any]], legacy: Mapping[str, str] | None = None, *,
                   uplinks: Sequence[str] = (), ipv6: bool = True) -> list[Finding]:
    return findings(_ruleset(ruleset_json, legacy), "input", input_packets(ipv6), uplinks)


def forward_blockers(ruleset_json: list[dict[str, Any]], legacy: dict[str, str] | None,
                     *, uplinks: Sequence[str] = (), ipv6: bool = True) -> list[str]:
    """One message (what, and the fix) per foreign firewall chain that certainly drops the sandboxes' forwarded
    traffic. `ruleset_json` is `nft -j list ruleset`'s "nftables" list; `legacy` maps "iptables" and
    "ip6tables" to `iptables-legacy -S` / `ip6tables-legacy -S` output. `uplinks` are the host's default-route
    interfaces (unknown when empty: a rule that depends on them is then not counted as certain); `ipv6` whether
    sandboxes get IPv6 (the host has an IPv6 default route)."""
    return [f.message for f in forward_findings(ruleset_json, legacy, uplinks=uplinks, ipv6=ipv6) if f.certain]


# ------------------------------------------------------------------------------------------- from the kernel

def _iptables_s(tool: str) -> str | None:
    # Imported here: most launches never read iptables' text, and `nsfw run` imports this module every time.
    import shutil
    import subprocess

    binary = shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if binary is None:
        return None
    done = subprocess.run([binary, "-w", "-S"], capture_output=True, text=True, timeout=10, check=False)
    return done.stdout if done.returncode == 0 else None


def iptables_rules(ruleset_json: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """What `forward_blockers`' `legacy` wants from this namespace: iptables-legacy's filter tables when there
    are any, and `iptables-nft -S` where the nft ruleset holds iptables-nft rules with xt matches."""
    out = legacy_rules()
    for family, tool in (("ip", "iptables-nft"), ("ip6", "ip6tables-nft")):
        if _has_xt(ruleset_json, family):
            text = _iptables_s(tool)
            if text is not None:
                out[tool] = text
    return out


def legacy_rules() -> dict[str, str]:
    """iptables-legacy's filter tables, when there are any: /proc says so without loading a module (running
    `iptables-legacy -S` where ip_tables is not loaded would load it, and create empty tables)."""
    out: dict[str, str] = {}
    for tool, names in (("iptables", "/proc/net/ip_tables_names"), ("ip6tables", "/proc/net/ip6_tables_names")):
        try:
            with open(names) as f:
                if "filter" not in f.read().split():
                    continue
        except OSError:
            continue
        text = _iptables_s(f"{tool}-legacy")
        if text is not None:
            out[tool] = text
    return out


def uplinks() -> tuple[list[str], bool]:
    """The host's default-route interfaces, and whether there is an IPv6 default route (sandboxes get IPv6
    only then), from /proc: the reader's own network namespace, and no netlink library to import."""
    names: list[str] = []
    with contextlib.suppress(OSError), open("/proc/net/route") as f:
        for line in f.read().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 7 and cols[1] == "00000000" and cols[7] == "00000000" and cols[0] not in names:
                names.append(cols[0])
    default6 = False
    with contextlib.suppress(OSError), open("/proc/net/ipv6_route") as f:
        for line in f:
            cols = line.split()
            # destination ::/0, not the unreachable/blackhole defaults the kernel lists on lo
            if len(cols) >= 10 and cols[0] == "0" * 32 and cols[1] == "00" and cols[9] != "lo":
                default6 = True
                if cols[9] not in names:
                    names.append(cols[9])
    return names, default6


def forward_blockers_now() -> list[str]:
    """forward_blockers() on this namespace's live ruleset (one `list ruleset` through libnftables) and, where
    iptables-legacy has a filter table, its rules. For `nsfw run` to call before it builds anything."""
    from .. import nft

    links, default6 = uplinks()
    ruleset = nft.ruleset()
    return forward_blockers(ruleset, iptables_rules(ruleset), uplinks=links, ipv6=default6)


def launch_blockers() -> list[str]:
    """What `nsfw run` refuses to start under: another firewall that certainly drops a sandbox's forwarded
    traffic, or its DNS to the sandbox's resolver. Starting anyway would give an app that silently cannot
    connect; nsfw never opens the other firewall's tables itself."""
    from .. import nft

    links, default6 = uplinks()
    ruleset = nft.ruleset()
    legacy = iptables_rules(ruleset)
    out = []
    for fn in (forward_findings, input_findings):
        out += [f.message for f in fn(ruleset, legacy, uplinks=links, ipv6=default6) if f.certain]
    return out

