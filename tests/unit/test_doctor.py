"""nsfw doctor, the pure parts: which firewall drops the sandboxes' traffic (on rulesets recorded from the real
products by tests/data/doctor/record.sh), and how the resolver, leftovers, forwarding and config read."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from nsfw import doctor
from nsfw.doctor import Check, Packet, RecordView

DATA = Path(__file__).resolve().parent.parent / "data" / "doctor"


def recorded(name: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """A recorded `nft -j list ruleset`, and `iptables-nft -S` where the scenario has iptables-nft rules."""
    ruleset = json.loads((DATA / f"{name}.json").read_text())["nftables"]
    text = {tool: (DATA / f"{name}.{tool}.txt").read_text() for tool in ("iptables-nft", "ip6tables-nft")
            if (DATA / f"{name}.{tool}.txt").exists()}
    return ruleset, text


def forward(name: str, uplinks: tuple[str, ...] = ("eth0",), ipv6: bool = True) -> list[doctor.Finding]:
    ruleset, text = recorded(name)
    return doctor.forward_findings(ruleset, text, uplinks=uplinks, ipv6=ipv6)


def inbound(name: str, uplinks: tuple[str, ...] = ("eth0",)) -> list[doctor.Finding]:
    ruleset, text = recorded(name)
    return doctor.input_findings(ruleset, text, uplinks=uplinks)


# ---------------------------------------------------------------------------------------------- Docker


def test_docker_forward_drop_is_a_blocker_named_with_its_fix() -> None:
    ruleset, text = recorded("docker")
    found = doctor.forward_blockers(ruleset, text, uplinks=("eth0",))
    assert len(found) == 2  # ip filter FORWARD and ip6 filter FORWARD, both policy drop
    v4 = next(m for m in found if "table ip filter" in m)
    assert v4.startswith("Docker (table ip filter, chain FORWARD) drops connections out of a sandbox (IPv4)")
    assert "replies to a sandbox (IPv4)" in v4 and "policy drop" in v4
    assert "iptables -I DOCKER-USER -i nsfw+ -j ACCEPT" in v4
    assert "iptables -I DOCKER-USER -o nsfw+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in v4
    assert "ip6tables -I DOCKER-USER" in next(m for m in found if "table ip6 filter" in m)


def test_the_docker_fix_clears_it() -> None:
    """docker-fixed is docker plus exactly the commands the doctor suggests."""
    assert forward("docker-fixed") == []
    assert forward("docker-fixed", uplinks=()) == []


def test_docker_without_ipv6_for_sandboxes_only_ipv4_counts() -> None:
    found = forward("docker", ipv6=False)
    assert [(f.family, f.certain) for f in found] == [("ip", True)]


def test_an_unknown_uplink_is_not_guessed() -> None:
    """Docker accepts `-i docker0 ! -o docker0`: whether a reply's uplink is docker0 is unknown without its name,
    so the reply is 'may drop', never 'drops'; outgoing traffic comes from nsfw's veth, known not to be docker0."""
    v4 = next(f for f in forward("docker", uplinks=()) if f.family == "ip")
    assert v4.blocked == ("connections out of a sandbox (IPv4)",)
    assert v4.unsure == ("replies to a sandbox (IPv4)",)


def test_iptables_legacy_text() -> None:
    text = (DATA / "docker-legacy.txt").read_text()
    found = doctor.forward_blockers([], {"iptables": text}, uplinks=("eth0",))
    assert len(found) == 1
    assert "Docker (table ip filter (iptables-legacy), chain FORWARD) drops" in found[0]
    assert "iptables-legacy -I DOCKER-USER -i nsfw+ -j ACCEPT" in found[0]
    fixed = text.replace("-A DOCKER-USER -j RETURN", "-A DOCKER-USER -i nsfw+ -j ACCEPT\n"
                         "-A DOCKER-USER -o nsfw+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
                         "-A DOCKER-USER -j RETURN")
    assert doctor.forward_blockers([], {"iptables": fixed}, uplinks=("eth0",)) == []


def test_xt_matches_without_their_arguments_are_unknown_not_guessed() -> None:
    """The JSON alone shows `-m conntrack --ctstate ...` as a bare xt match: no certain verdict on replies."""
    ruleset, _text = recorded("docker-fixed")
    assert not [f for f in doctor.forward_findings(ruleset, None, uplinks=("eth0",)) if f.certain]
    unsure = [f for f in doctor.forward_findings(ruleset, None, uplinks=("eth0",)) if not f.certain]
    assert unsure and all("replies" in " ".join(f.unsure) for f in unsure)


# ---------------------------------------------------------------------------------------------- ufw


def test_ufw_drops_new_connections_but_passes_replies() -> None:
    found = forward("ufw")
    assert {f.family for f in found} == {"ip", "ip6"} and all(f.product == "ufw" for f in found)
    assert all(f.blocked == (f"connections out of a sandbox (IPv{4 if f.family == 'ip' else 6})",) for f in found)
    assert all(f.fix.startswith("ufw route allow in on nsfw+") for f in found)


def test_ufw_drops_the_sandboxes_dns_to_their_resolver() -> None:
    found = inbound("ufw")
    assert {f.chain for f in found} == {"INPUT"} and all(f.certain for f in found)
    assert all(f.fix.startswith("ufw allow in on nsfw+ to any port 53") for f in found)


def test_the_ufw_fixes_clear_it() -> None:
    assert forward("ufw-fixed") == []
    assert inbound("ufw-fixed") == []


# ---------------------------------------------------------------------------------------------- firewalld


def test_firewalld_forwards_within_the_default_zone() -> None:
    """eth0 is in `public`, the default zone, which nsfw's veth falls into: intra-zone forwarding accepts."""
    assert forward("firewalld", uplinks=("eth0",)) == []


def test_firewalld_rejects_towards_an_uplink_outside_the_zone() -> None:
    found = forward("firewalld", uplinks=("wlan0",))
    assert len(found) == 1 and found[0].certain
    f = found[0]
    assert (f.family, f.table, f.chain, f.product) == ("inet", "firewalld", "filter_FORWARD", "firewalld")
    assert "reject" in f.how and "--zone=trusted --add-interface=nsfw+" in f.fix
    assert f.blocked == ("connections out of a sandbox (IPv4)", "connections out of a sandbox (IPv6)")
    assert forward("firewalld", uplinks=())[0].certain is False


def test_firewalld_rejects_the_sandboxes_dns() -> None:
    found = inbound("firewalld")
    assert len(found) == 1 and found[0].certain and found[0].chain == "filter_INPUT"


# ---------------------------------------------------------------------------------------------- plain rulesets


def test_iptables_nft_forward_policy_drop() -> None:
    ruleset, text = recorded("iptables-nft")
    found = doctor.forward_blockers(ruleset, text)
    assert len(found) == 1
    assert found[0].startswith("iptables' rules (table ip filter, chain FORWARD) drops")
    assert "iptables -I FORWARD -i nsfw+ -j ACCEPT" in found[0]


def test_nftables_conf_forward_drop_and_the_suggested_nft_rules_clear_it() -> None:
    found = forward("nftables-conf", uplinks=())
    assert len(found) == 1 and found[0].blocked == ("connections out of a sandbox (IPv4)",
                                                   "connections out of a sandbox (IPv6)")
    assert 'nft insert rule inet filter forward iifname "nsfw*" accept' in found[0].fix
    ruleset, _ = recorded("nftables-conf")
    # what the two suggested `nft insert rule` commands add, at the top of the chain
    top = [{"rule": {"family": "inet", "table": "filter", "chain": "forward", "expr": expr}} for expr in (
        [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "nsfw*"}}, {"accept": None}],
        [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "nsfw*"}},
         {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
         {"accept": None}])]
    first_rule = next(i for i, item in enumerate(ruleset) if "rule" in item)
    assert doctor.forward_blockers(ruleset[:first_rule] + top + ruleset[first_rule:], None) == []


def test_nsfws_own_tables_and_an_accepting_nftables_conf_block_nothing() -> None:
    ruleset, _ = recorded("clean")
    assert any("table" in i and i["table"]["name"] == doctor.GUARD_TABLE for i in ruleset)
    assert doctor.forward_findings(ruleset) == [] and doctor.input_findings(ruleset) == []


def test_a_foreign_table_named_like_nsfws_but_not_inet_is_not_skipped() -> None:
    ruleset, _ = recorded("iptables-nft")
    renamed = json.loads(json.dumps(ruleset).replace('"filter"', '"nsfw-1a2b3c4d"'))
    assert len(doctor.forward_blockers(renamed, None)) == 1


# ---------------------------------------------------------------------------------------------- evaluation


def _chain(name: str, **kw: Any) -> dict[str, Any]:
    return {"chain": {"family": "inet", "table": "t", "name": name, **kw}}


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": "inet", "table": "t", "chain": chain, "expr": list(expr)}}


IIF_NSFW = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "nsfw*"}}
TCP_443 = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 443}}
UDP_443 = {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 443}}


def _base(policy: str) -> dict[str, Any]:
    return _chain("fwd", type="filter", hook="forward", prio=0, policy=policy)


def _outcomes(items: list[dict[str, Any]], pkt: Packet) -> set[str]:
    rs = doctor.index_ruleset(items)
    return {kind for kind, _where in doctor.evaluate(rs, ("inet", "t", "fwd"), pkt, ("eth0",))}


OUT_TCP, OUT_UDP, REPLY = doctor.forward_packets()[:3]


def test_jump_return_and_goto() -> None:
    items = [_base("drop"), _chain("sub"), _rule("fwd", {"jump": {"target": "sub"}}),
             _rule("fwd", IIF_NSFW, {"accept": None}), _rule("sub", TCP_443, {"return": None}),
             _rule("sub", {"drop": None})]
    assert _outcomes(items, OUT_TCP) == {"accept"}  # sub returns, then the accept in fwd
    assert _outcomes(items, OUT_UDP) == {"drop"}  # sub drops
    goto = copy.deepcopy(items)
    goto[2] = _rule("fwd", {"goto": {"target": "sub"}})  # sub's return now ends fwd: its policy decides
    assert _outcomes(goto, OUT_TCP) == {"drop"}


def test_a_protocol_mismatch_never_matches_even_negated() -> None:
    items = [_base("accept"), _rule("fwd", {"match": {**UDP_443["match"], "op": "!="}}, {"drop": None})]
    assert _outcomes(items, OUT_TCP) == {"accept"}  # `udp dport != 443` does not match TCP


def test_an_unknown_match_makes_the_outcome_uncertain() -> None:
    items = [_base("drop"), _rule("fwd", {"xt": {"type": "match", "name": "owner"}}, {"accept": None})]
    assert _outcomes(items, OUT_TCP) == {"accept", "drop"}


def test_named_sets_and_prefixes() -> None:
    items = [_base("drop"),
             {"set": {"family": "inet", "table": "t", "name": "ok", "type": "ipv4_addr", "flags": ["interval"],
                      "elem": [{"prefix": {"addr": "10.213.0.0", "len": 16}}]}},
             _rule("fwd", {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                     "right": "@ok"}}, {"accept": None})]
    assert _outcomes(items, OUT_TCP) == {"accept"}
    assert _outcomes(items, REPLY) == {"drop"}


def test_verdict_maps() -> None:
    vmap = {"vmap": {"key": {"meta": {"key": "iifname"}},
                     "data": {"set": [["eth0", {"accept": None}], ["nsfw*", {"drop": None}]]}}}
    items = [_base("accept"), _rule("fwd", vmap)]
    assert _outcomes(items, OUT_TCP) == {"drop"}
    assert _outcomes(items, REPLY) == {"accept"}


# ---------------------------------------------------------------------------------------------- resolver


def test_nsswitch_hosts_modules() -> None:
    text = "passwd: files\nhosts:  files mdns4_minimal [NOTFOUND=return] resolve [!UNAVAIL=return] dns # c\n"
    assert doctor.nsswitch_hosts(text) == ["files", "mdns4_minimal", "resolve", "dns"]
    assert doctor.nsswitch_hosts("passwd: files\n") == ["dns", "files"]  # glibc's default


def test_systemd_resolved_stub_is_fine() -> None:
    check = doctor.resolver_check("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n",
                                  "/run/systemd/resolve/stub-resolv.conf",
                                  ["files", "mdns4_minimal", "resolve", "dns"], nscd=True)
    assert check.status == "ok"
    assert "/etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf: nameservers 127.0.0.53" in check.detail
    assert "systemd-resolved's stub" in check.detail
    assert "mdns4_minimal, resolve are bypassed" in check.detail and "nscd runs" in check.detail


def test_plain_resolv_conf() -> None:
    check = doctor.resolver_check("# x\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n", None, ["files", "dns"],
                                  nscd=False)
    assert check == Check("resolver", "ok", "/etc/resolv.conf: nameservers 192.0.2.53, 2001:db8::53")


def test_resolv_conf_without_nameserver_or_missing() -> None:
    empty = doctor.resolver_check("search example.org\n", None, ["files", "dns"], nscd=False)
    assert empty.status == "warn" and "127.0.0.1" in empty.detail
    missing = doctor.resolver_check(None, "/run/NetworkManager/resolv.conf", ["files", "dns"], nscd=False)
    assert missing.status == "warn" and "missing or unreadable" in missing.detail


PROC_UDP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref
  1: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 1111 2
  2: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2222 2
  3: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3333 2
"""
PROC_TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr
  0: {zero}:0035 {zero}:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1
  1: {zero}:0035 0100007F000000000000000000000000:9C40 01 00000000:00000000 00:00000000 00000000     0        0 5555 1
""".format(zero="0" * 32)


def test_wildcard_port_53_listeners() -> None:
    """systemd-resolved's 127.0.0.53:53 is fine; 0.0.0.0:53 and a listening [::]:53 are not; a connected TCP
    socket (state 01) is not a listener."""
    assert doctor.wildcard_port53({"udp": PROC_UDP, "tcp6": PROC_TCP6}) == [("udp", "2222"), ("tcp6", "4444")]
    assert doctor.wildcard_port53({"udp": PROC_UDP.replace("00000000:0035", "0100007F:0035")}) == []


# ---------------------------------------------------------------------------------------------- state


def test_leftovers() -> None:
    records = [RecordView("aaaa0001", True, "nsfw-aaaa0001", "nsfwaaaa0001", "nsfw-aaaa0001"),
               RecordView("dead0002", False, "nsfw-dead0002", "nsfwdead0002", "nsfw-dead0002")]
    found = doctor.leftovers(records, ["nsfw-aaaa0001", "nsfw-deadbeef", "other"],
                             ["lo", "eth0", "nsfwaaaa0001", "nsfwdeadbeef"],
                             ["filter", "nsfw-aaaa0001", "nsfw-deadbeef", doctor.GUARD_TABLE],
                             ["aaaa0001", "cafe0003"])
    assert found == [("record dead0002 of a sandbox whose supervisor is gone", "nsfw gc"),
                     ("network namespace nsfw-deadbeef with no record", "ip netns delete nsfw-deadbeef"),
                     ("link nsfwdeadbeef with no record", "ip link delete nsfwdeadbeef"),
                     ("table inet nsfw-deadbeef with no record", "nft delete table inet nsfw-deadbeef"),
                     ("files of sandbox cafe0003 with no record", "rm -r /run/nsfw/sandboxes/cafe0003")]
    only_dead = doctor.leftovers(records[1:], [], [], [doctor.GUARD_TABLE])
    assert (f"forwarding guard table inet {doctor.GUARD_TABLE} with no sandbox running", "nsfw gc") in only_dead
    assert doctor.leftovers(records[:1], ["nsfw-aaaa0001"], ["nsfwaaaa0001"], ["nsfw-aaaa0001"]) == []


def test_forwarding() -> None:
    values = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
    stale = doctor.forwarding_check(values, {"ipv4": "0", "ipv6": "0"}, live=0)
    assert stale.status == "warn" and stale.fix == "nsfw gc" and "ipv4=0, ipv6=0" in stale.detail
    assert doctor.forwarding_check(values, {"ipv4": "0"}, live=2).status == "ok"
    off = doctor.forwarding_check({"net.ipv4.ip_forward": "0"}, None, live=0)
    assert off.status == "ok" and "turns forwarding on" in off.detail


def test_rp_filter_strict_is_fine_and_ipv6_is_information() -> None:
    check = doctor.rp_filter_check({"all.rp_filter": "1", "default.rp_filter": "1", "eth0.rp_filter": "2"})
    assert check.status == "ok" and "all.rp_filter=1(strict)" in check.detail
    assert doctor.ipv6_check(False, {"all": "0"}).detail.startswith("the host has no IPv6 default route")
    assert "disabled" in doctor.ipv6_check(True, {"all": "1"}).detail
    assert doctor.ipv6_check(True, {"all": None}).status == "ok"


def test_config(tmp_path: Path) -> None:
    assert doctor.config_check(str(tmp_path / "absent.yaml")).status == "ok"
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [unclosed\n")
    check = doctor.config_check(str(bad))
    assert check.status == "fail" and "not valid YAML" in check.detail and "line 3" in check.detail
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    assert doctor.config_check(str(listed)).status == "fail"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("anything: [1, 2]\n")  # validated like nsfw run reads it: an unknown key is an error
    assert doctor.config_check(str(unknown)).status == "fail"
    good = tmp_path / "good.yaml"
    good.write_text("pool: {ipv4: 10.50.0.0/16}\n")
    check = doctor.config_check(str(good))
    assert check.status == "ok" and "10.50.0.0/16" in check.detail


# ---------------------------------------------------------------------------------------------- kernel, report


def test_kernel_checks() -> None:
    ok = doctor.kernel_checks({"netns": "", "veth": "", "nft": [["a", ""], ["b", ""]]})
    assert [c.status for c in ok] == ["ok", "ok", "ok"]
    nat = doctor.kernel_checks({"netns": "", "veth": "", "nft": [["inet NAT with masquerade", "No such file"]]})
    assert nat[2].status == "fail" and "nft_masq" in nat[2].fix
    assert doctor.kernel_checks({"netns": "Operation not permitted"})[0].status == "fail"
    assert doctor.kernel_checks({"error": "boom"})[0].status == "fail"


def test_render_and_exit_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    checks = [Check("root", "ok", "running as root", "unused"), Check("leftovers", "warn", "a link", "nsfw gc")]
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    assert doctor.main() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ok", "root", "running", "as", "root"]
    assert out[1].split()[:2] == ["warn", "leftovers"] and out[2].split() == ["fix:", "nsfw", "gc"]
    assert "unused" not in "\n".join(out) and out[-1] == "nsfw can run here (1 warning(s))."
    monkeypatch.setattr(doctor, "run_checks", lambda: [*checks, Check("firewall: forward", "fail", "x", "y")])
    assert doctor.main() == 1
    assert capsys.readouterr().out.splitlines()[-1] == "1 problem(s) stop nsfw here; 1 warning(s)."
