"""`file:` lists: what a line may be, what each becomes, the errors a bad list gets, and that a list compiles to
exactly what the same entries written as rules compile to.

A read list is one "file" rule holding its addresses as packed integers (profile.Listed) plus one host rule
per name; these tests check that representation against ipaddress, line by line and as a whole.
"""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path
from typing import Any

import pytest

from nsfw import compile as nc
from nsfw import profile
from nsfw.cli import json_text
from nsfw.errors import ProfileError, ProfileErrors
from nsfw.intervals import merge_addresses, merge_packed
from nsfw.profile import Listed, Profile, Rule


def write(d: Path, name: str, text: str | bytes) -> Path:
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def load(tmp_path: Path, lines: str | bytes, rule: str = "{file: list.txt}", which: str = "deny") -> Profile:
    write(tmp_path, "list.txt", lines)
    return profile.load(str(write(tmp_path, "p.yaml", f"{which}:\n  - {rule}\n")), [tmp_path])


def errors(tmp_path: Path, lines: str | bytes, rule: str = "{file: list.txt}", which: str = "deny") -> list[str]:
    write(tmp_path, "list.txt", lines)
    path = write(tmp_path, "p.yaml", f"{which}:\n  - {rule}\n")
    return [str(e) for e in profile.check([str(path)], [tmp_path])]


def reference(entry: str) -> tuple[int, int, int] | None:
    """What a list line means, by ipaddress: a network with host bits cleared, or nothing."""
    if "%" in entry:
        return None
    try:
        net = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None
    return net.version, int(net.network_address), int(net.broadcast_address)


def listed_spans(rules: tuple[Rule, ...]) -> set[tuple[int, int, int]]:
    return {(v, lo, hi) for r in rules if r.listed is not None for v in (4, 6) for lo, hi in r.listed.spans(v)}


# ---------------------------------------------------------------------------------------------- lines


TRICKY = [
    "192.0.2.1", "192.0.2.0/24", "192.0.2.77/24", "0.0.0.0/0", "255.255.255.255", "255.255.255.255/32",
    "10.0.0.0/8", "1.2.3.4/0", "1.2.3.4/33", "1.2.3.4/024", "1.2.3.4/255.255.255.0", "1.2.3.4/0.0.0.255",
    "1.2.3.4/ 24", "1.2.3.4/+24", "1.2.3.4/2_4", "1.2.3.4/\u0662\u0664", "\u0661.2.3.4", "01.2.3.4", "1.2.3",
    "1.2.3.4.5", "256.1.1.1", "1.2.3.-1", "0x1.2.3.4", "1.2.3.4/", "/24", "1.2.3.4//24", "1.2.3.4/24/24",
    "2001:db8::1", "2001:db8::/32", "2001:db8::1/32", "::/0", "::", "::1", "::ffff:192.0.2.1", "::ffff:0:0/96",
    "fe80::1%eth0", "fe80::/10", "2001:db8::/129", "2001:db8:::1", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9",
    "0001:0db8::/32", "2001:DB8::/32", "::1.2.3.4", "2001:db8::/064", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
]


@pytest.mark.parametrize("entry", TRICKY)
def test_a_line_means_what_ipaddress_says(entry: str) -> None:
    assert profile.list_entry(entry) == reference(entry)


@pytest.mark.parametrize("entry", TRICKY)
def test_the_inline_ipv4_path_agrees_with_the_general_one(tmp_path: Path, entry: str) -> None:
    """parse_list takes the usual IPv4 line without calling list_entry: both must read every line alike."""
    want = reference(entry)
    errs: list[ProfileError] = []
    rules = profile.parse_list(f"{entry}\n".encode(), "l.txt", Rule("file", "l.txt"), errs)
    if want is None:
        assert not listed_spans(tuple(rules))
        assert errs or [r.kind for r in rules] == ["host"]  # "1.2.3" etc. are refused; nothing is taken silently
    else:
        assert not errs and listed_spans(tuple(rules)) == {want}


def test_random_lines_against_ipaddress() -> None:
    rng = random.Random(5)
    lines, want = [], []
    for _ in range(3000):
        version = rng.choice([4, 4, 4, 6])
        bits = 32 if version == 4 else 128
        plen = rng.randint(0, bits)
        addr = ipaddress.ip_address(rng.getrandbits(bits) if version == 4 else rng.getrandbits(128))
        text = rng.choice([f"{addr}/{plen}", str(addr), f"  {addr}/{plen}  # why", f"\t{addr}\r"])
        lines.append(text)
        want.append(reference(text.split("#")[0].strip()))
    errs: list[ProfileError] = []
    rules = profile.parse_list("\n".join(lines).encode(), "l.txt", Rule("file", "l.txt"), errs)
    assert not errs
    (listed,) = [r.listed for r in rules if r.listed is not None]
    got = [(4, lo, hi) for lo, hi in listed.spans(4)] + [(6, lo, hi) for lo, hi in listed.spans(6)]
    assert got == [w for w in want if w and w[0] == 4] + [w for w in want if w and w[0] == 6]  # in file order


def test_a_list_becomes_one_rule_for_its_addresses_and_one_per_name(tmp_path: Path) -> None:
    p = load(tmp_path, "# a comment\n\n192.0.2.0/24\nads.example.com   # trailing comment\n2001:db8::/32\r\n"
                       "192.0.2.0/24\n*.tracker.example\n203.0.113.7\n", rule="{file: list.txt}")
    kinds = [(r.kind, r.value) for r in p.deny]
    assert kinds == [("file", "list.txt"), ("host", "ads.example.com"), ("host", "*.tracker.example")]
    listed = p.deny[0].listed
    assert listed is not None and len(listed) == 4  # a repeated line stays: `remove:` takes it whole
    assert listed_spans(p.deny) == {reference("192.0.2.0/24"), reference("2001:db8::/32"),
                                    reference("203.0.113.7")}
    assert p.deny[0].listed_in == str(tmp_path / "list.txt")
    assert p.deny[1].origin == f"{tmp_path / 'list.txt'}: line 4"


def test_a_list_of_names_only_has_no_address_rule(tmp_path: Path) -> None:
    p = load(tmp_path, "example.org\n", which="allow")
    assert [r.kind for r in p.allow] == ["host"]


def test_ports_and_proto_apply_to_every_entry(tmp_path: Path) -> None:
    p = load(tmp_path, "192.0.2.0/24\nexample.org\n", rule="{file: list.txt, ports: [443], proto: tcp}", which="allow")
    assert {(r.kind, r.proto, r.ports) for r in p.allow} == {("file", "tcp", ((443, 443),)),
                                                             ("host", "tcp", ((443, 443),))}


def test_the_list_counts_in_the_profiles_hash(tmp_path: Path) -> None:
    before = load(tmp_path, "192.0.2.1\n").sha256
    assert load(tmp_path, "192.0.2.2\n").sha256 != before
    assert load(tmp_path, "192.0.2.1\n").sha256 == before


# ---------------------------------------------------------------------------------------------- bad lists


def test_a_bad_line_names_the_file_and_the_line(tmp_path: Path) -> None:
    errs = errors(tmp_path, "192.0.2.1\n\n# fine\n192.0.2.300\nnot_a_name\n01.2.3.4\nfe80::1%eth0\n")
    where = tmp_path / "list.txt"
    assert [e.split(": ")[:2] for e in errs] == [[str(where), "line 4"], [str(where), "line 5"],
                                                  [str(where), "line 6"], [str(where), "line 7"]]
    assert all("is neither an address, a network nor a domain name" in e for e in errs)


def test_a_broken_list_reports_twenty_lines_and_a_count(tmp_path: Path) -> None:
    errs = errors(tmp_path, "".join(f"bad line {i}\n" for i in range(50)))
    assert len(errs) == 21 and errs[-1].endswith("30 more bad lines (fix the list)")


def test_a_list_that_is_not_utf8(tmp_path: Path) -> None:
    (err,) = errors(tmp_path, b"192.0.2.1\n\xff\xfe\n")
    assert "is not UTF-8 text" in err


def test_a_denied_name_with_ports_from_a_list_is_refused(tmp_path: Path) -> None:
    errs = errors(tmp_path, "192.0.2.1\nexample.org\n", rule="{file: list.txt, ports: [443], proto: tcp}")
    assert len(errs) == 1 and "line 2" in errs[0]


def test_a_missing_list(tmp_path: Path) -> None:
    (err,) = errors(tmp_path, "", rule="{file: nowhere.txt}")
    assert "names the list" in err and "nowhere.txt" in err


# ---------------------------------------------------------------------------------------------- remove:


def test_remove_a_list_whole_or_one_entry_of_it(tmp_path: Path) -> None:
    write(tmp_path, "list.txt", "192.0.2.0/24\n198.51.100.7\n198.51.100.7\n2001:db8::/32\nads.example.com\n")
    write(tmp_path, "base.yaml", "deny:\n  - {file: list.txt}\n  - 203.0.113.0/24\n")
    whole = profile.load(str(write(tmp_path, "a.yaml", "include: [base]\nremove: {deny: [{file: list.txt}]}\n")),
                         [tmp_path])
    assert [(r.kind, r.value) for r in whole.deny] == [("cidr", "203.0.113.0/24")]
    one = profile.load(str(write(tmp_path, "b.yaml", "include: [base]\nremove: {deny: [198.51.100.7/32]}\n")),
                       [tmp_path])
    assert listed_spans(one.deny) == {reference("192.0.2.0/24"), reference("2001:db8::/32")}
    assert [r.value for r in one.deny if r.kind == "host"] == ["ads.example.com"]
    six = profile.load(str(write(tmp_path, "c.yaml", "include: [base]\nremove: {deny: ['2001:db8::/32']}\n")),
                       [tmp_path])
    assert listed_spans(six.deny) == {reference("192.0.2.0/24"), reference("198.51.100.7")}


def test_remove_of_an_entry_in_no_list_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "list.txt", "192.0.2.0/24\n")
    write(tmp_path, "base.yaml", "deny:\n  - {file: list.txt, ports: [25], proto: tcp}\n")
    # not in the list, and in it but for other ports: neither matches
    for gone in ("198.51.100.0/24", "192.0.2.0/24"):
        path = write(tmp_path, "a.yaml", f"include: [base]\nremove: {{deny: [{gone}]}}\n")
        with pytest.raises(ProfileErrors) as info:
            profile.load(str(path), [tmp_path])
        assert "removes a rule that no included profile has in deny:" in str(info.value)
        assert "{file: list.txt, ports: [25], proto: tcp}" in str(info.value)
    ok = write(tmp_path, "b.yaml", "include: [base]\nremove: {deny: [{cidr: 192.0.2.0/24, ports: [25], proto: tcp}]}\n")
    assert not listed_spans(profile.load(str(ok), [tmp_path]).deny)


def test_listed_without() -> None:
    listed = Listed((1 << 32 | 1, 5 << 32 | 9, 1 << 32 | 1), (7 << 128 | 7,))
    assert listed.without(4, 1, 1) == Listed((5 << 32 | 9,), (7 << 128 | 7,))
    assert listed.without(4, 5, 8) == listed
    assert listed.without(6, 7, 7) == Listed(listed.v4, ())


# ---------------------------------------------------------------------------------------------- compiled


def as_rules(tmp_path: Path, lines: list[str], extra: str) -> Profile:
    """The same entries written in the profile, one rule each, instead of in a list."""
    body = "".join(f"  - {{cidr: '{ipaddress.ip_network(x, strict=False)}'{extra}}}\n" for x in lines)
    return profile.load(str(write(tmp_path, "inline.yaml", f"deny:\n{body}allow:\n  - internet\n")), [tmp_path])


def random_entries(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        if rng.random() < 0.8:
            plen = rng.choice([8, 16, 22, 24, 24, 28, 30, 32, 32])
            base = rng.choice([0x0A000000, 0xC6336400, rng.getrandbits(32)]) ^ rng.getrandbits(18)
            out.append(f"{ipaddress.IPv4Address(base)}/{plen}")
        else:
            plen = rng.choice([32, 48, 64, 127, 128])
            out.append(f"{ipaddress.IPv6Address(0x20010DB8 << 96 | rng.getrandbits(80))}/{plen}")
    return out


@pytest.mark.parametrize("extra", ["", ", ports: [22, '8000-8100'], proto: tcp", ", proto: udp"])
def test_a_list_compiles_like_the_same_rules_written_out(tmp_path: Path, extra: str) -> None:
    rng = random.Random(len(extra))
    entries = random_entries(rng, 400)
    write(tmp_path, "list.txt", "\n".join(entries) + "\n")
    text = f"deny:\n  - {{file: list.txt{extra}}}\nallow:\n  - internet\n"
    listed = profile.load(str(write(tmp_path, "p.yaml", text)), [tmp_path])
    inline = as_rules(tmp_path, entries, extra)
    gw = ["10.213.0.1", "fd6e:7366:7700::1"]
    assert nc.sandbox_ruleset(listed, gateways=gw) == nc.sandbox_ruleset(inline, gateways=gw)


def test_a_large_list_merges_into_the_fewest_elements(tmp_path: Path) -> None:
    rng = random.Random(3)
    entries = random_entries(rng, 3000)
    p = load(tmp_path, "\n".join(entries) + "\n")
    cmds = nc.sandbox_ruleset(p)
    for v in (4, 6):
        spans = [reference(e) for e in entries]
        want = merge_addresses((lo, hi) for ver, lo, hi in filter(None, spans) if ver == v)
        (s,) = [c["add"]["set"] for c in cmds if c.get("add", {}).get("set", {}).get("name") == f"denyaddr{v}"]
        assert s["elem"] == [nc._addr_elem(span, v) for span in want]


def elem_span(elem: Any, version: int) -> tuple[int, int]:
    if isinstance(elem, str):
        a = int(ipaddress.ip_address(elem))
        return a, a
    if "prefix" in elem:
        net = ipaddress.ip_network(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
        return int(net.network_address), int(net.broadcast_address)
    lo, hi = (int(ipaddress.ip_address(x)) for x in elem["range"])
    return lo, hi


@pytest.mark.parametrize("version", [4, 6])
def test_addr_elems_are_exact_and_shortest(version: int) -> None:
    bits = 32 if version == 4 else 128
    top = (1 << bits) - 1
    rng = random.Random(version)
    spans = [(0, top), (0, 0), (top, top), (0, top - 1), (1, top), (256, 511), (256, 510), (257, 511), (7, 7)]
    starts = [rng.randrange(top - 5000) for _ in range(300)]
    spans += [(lo, lo + rng.choice([0, 1, 3, 255, 1000, 4095])) for lo in starts]
    for span, elem in zip(spans, nc._addr_elems(spans, version), strict=True):
        assert elem_span(elem, version) == span
        size = span[1] - span[0] + 1
        one_prefix = size & (size - 1) == 0 and span[0] % size == 0
        assert isinstance(elem, str) == (size == 1)
        assert ("prefix" in elem) == (one_prefix and size > 1) if isinstance(elem, dict) else True


def test_merge_packed_is_merge_addresses() -> None:
    rng = random.Random(4)
    for bits in (6, 32, 128):
        for _ in range(300):
            spans = []
            for _ in range(rng.randrange(0, 12)):
                a, b = rng.randrange(1 << min(bits, 8)), rng.randrange(1 << min(bits, 8))
                shift = rng.choice([0, bits - min(bits, 8)])
                spans.append((min(a, b) << shift, (max(a, b) << shift) | ((1 << shift) - 1)))
            assert merge_packed([lo << bits | hi for lo, hi in spans], bits) == list(merge_addresses(spans))


# ---------------------------------------------------------------------------------------------- nsfw rules, large sets
# (tests/integration/test_compile_kernel.py holds format_elements equal to nft's own listing, through the kernel)


def test_format_elements_spells_and_wraps_as_nft() -> None:
    from nsfw.nft import format_elements

    elems: list[Any] = ["192.0.2.9", {"range": ["10.0.0.1", "10.0.0.6"]}, {"prefix": {"addr": "10.1.0.0", "len": 16}},
                       "0.0.0.0", {"range": ["192.0.2.0", "192.0.2.3"]}]
    assert format_elements(elems, "ipv4_addr") == (
        "\t\telements = { 0.0.0.0, 10.0.0.1-10.0.0.6,\n\t\t\t     10.1.0.0/16, 192.0.2.0/30,\n"
        "\t\t\t     192.0.2.9 }\n")
    assert format_elements(["::ffff:c000:201", {"prefix": {"addr": "2001:db8::", "len": 32}}], "ipv6_addr") == (
        "\t\telements = { ::ffff:192.0.2.1,\n\t\t\t     2001:db8::/32 }\n")


@pytest.mark.parametrize(("elems", "type_name"), [
    (["192.0.2.1", "192.0.2.2"], "ipv4_addr"),  # touching: the kernel's business
    (["192.0.2.1", {"prefix": {"addr": "192.0.2.0", "len": 24}}], "ipv4_addr"),  # overlapping
    ([{"prefix": {"addr": "192.0.2.1", "len": 24}}], "ipv4_addr"),  # host bits
    ([{"range": ["192.0.2.9", "192.0.2.1"]}], "ipv4_addr"),
    ([{"prefix": {"addr": "192.0.2.0", "len": 33}}], "ipv4_addr"),
    (["2001:db8::1"], "ipv4_addr"), (["192.0.2.1"], "ipv6_addr"), (["192.0.2.1"], "inet_service"),
    ([{"concat": ["192.0.2.1", "tcp"]}], "ipv4_addr"), ([5], "ipv4_addr"), ([], "ipv4_addr"),
])
def test_format_elements_leaves_the_rest_to_nft(elems: list[Any], type_name: str) -> None:
    from nsfw.nft import format_elements

    assert format_elements(elems, type_name) is None


# ---------------------------------------------------------------------------------------------- nsfw rules --json


GOLDEN_PROFILES = sorted((Path(__file__).resolve().parent.parent / "golden" / "profiles").glob("*.yaml"))


def reference_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True)


@pytest.mark.parametrize("path", GOLDEN_PROFILES, ids=[p.stem for p in GOLDEN_PROFILES])
def test_json_text_is_json_dumps_on_the_goldens(path: Path) -> None:
    data = nc.wrap(nc.sandbox_ruleset(profile.load(str(path), [path.parent]), gateways=["10.213.0.1", "fd00::1"]))
    assert json_text(data, above=0) == json_text(data) == reference_json(data)


def test_json_text_is_json_dumps_on_a_large_list(tmp_path: Path) -> None:
    p = load(tmp_path, "\n".join(random_entries(random.Random(8), 5000)) + "\n")
    data = nc.wrap(nc.sandbox_ruleset(p))
    assert json_text(data, above=0) == json_text(data) == reference_json(data)


def test_json_text_escapes_and_falls_back_like_json_dumps() -> None:
    odd: list[Any] = ['a"b\\c', "\u00e9\u2028\x00", {"prefix": {"addr": "\u00e9", "len": 7}}, {"range": ["\n", "x"]}]
    other: list[Any] = [{"concat": ["192.0.2.1", "tcp", 22]}, {"prefix": {"addr": "x", "len": True}}, 5]
    for elems in (odd, odd + other[:1], odd + other[1:2], odd + other[2:]):
        data = {"nftables": [{"add": {"set": {"name": "s", "elem": elems, "zz": [1, {"b": 2, "a": None}]}}},
                             {"add": {"set": {"name": "\0nsfw elements 0", "elem": list(elems)}}}]}
        assert json_text(data, above=0) == reference_json(data)


def test_ipv6_addresses_are_spelt_as_ipaddress_does() -> None:
    """compile spells IPv6 with inet_ntop where that agrees with ipaddress (the spelling of the goldens)."""
    rng = random.Random(6)
    values = [0, 1, (1 << 128) - 1, 0xFFFF << 32, (0xFFFF << 32) | 0xC0000201, 0xC0000201, 1 << 32, 0x10000]
    for _ in range(20000):
        words = [rng.choice([0, 0, 0, 1, 0xFFFF, rng.getrandbits(16)]) for _ in range(8)]
        values.append(int.from_bytes(b"".join(w.to_bytes(2, "big") for w in words), "big"))
        values.append(rng.getrandbits(rng.choice([16, 32, 33, 48, 64, 128])))
    for v in values:
        assert nc._addr(v, 6) == str(ipaddress.IPv6Address(v)), hex(v)
