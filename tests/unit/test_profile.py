"""Profile format v1: every valid rule form, every kind of mistake, includes, lookup and a small fuzz.

Each error case asserts what the user reads: str(ProfileError) names the file, the key (with its line where
there is one) and a fix. Cases marked xfail(strict=True) are known bugs in nsfw/profile.py; they start
failing (XPASS) once the bug is fixed, so the marker gets removed with the fix.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nsfw import profile
from nsfw.errors import NsfwError, ProfileError, ProfileErrors
from nsfw.profile import Profile, Rule

# ---------------------------------------------------------------------------------------------- helpers


def write(d: Path, name: str, text: str | bytes) -> Path:
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def errors_of(tmp_path: Path, text: str | bytes, name: str = "p.yaml") -> list[ProfileError]:
    path = write(tmp_path, name, text)
    errs = profile.check([str(path)], [tmp_path])
    assert all(isinstance(e, ProfileError) for e in errs)
    return errs


def one_error(tmp_path: Path, text: str | bytes, name: str = "p.yaml") -> ProfileError:
    errs = errors_of(tmp_path, text, name)
    assert len(errs) == 1, [str(e) for e in errs]
    return errs[0]


def load_text(tmp_path: Path, text: str, name: str = "p.yaml") -> Profile:
    return profile.load(str(write(tmp_path, name, text)), [tmp_path])


def bare(rule: Rule) -> tuple[str, str, str, tuple[tuple[int, int], ...]]:
    return rule.kind, rule.value, rule.proto, rule.ports


def parse_one(tmp_path: Path, rule_yaml: str) -> Rule:
    p = load_text(tmp_path, f"allow:\n  - {rule_yaml}\n")
    assert len(p.allow) == 1
    return p.allow[0]


# ---------------------------------------------------------------------------------------------- valid forms


@pytest.mark.parametrize(
    ("rule_yaml", "expected"),
    [
        ("internet", ("zone", "internet", "any", ())),
        ("lan", ("zone", "lan", "any", ())),
        ("host", ("zone", "host", "any", ())),
        ("any", ("zone", "any", "any", ())),
        ("LAN", ("zone", "lan", "any", ())),
        ("192.0.2.1", ("cidr", "192.0.2.1/32", "any", ())),
        ("192.0.2.0/24", ("cidr", "192.0.2.0/24", "any", ())),
        ("0.0.0.0/0", ("cidr", "0.0.0.0/0", "any", ())),
        ("'2001:db8::1'", ("cidr", "2001:db8::1/128", "any", ())),
        ("'2001:DB8::/32'", ("cidr", "2001:db8::/32", "any", ())),
        ("'::/0'", ("cidr", "::/0", "any", ())),
        ("example.org", ("host", "example.org", "any", ())),
        ("Example.ORG.", ("host", "example.org", "any", ())),
        ("'*.example.org'", ("host", "*.example.org", "any", ())),
        ("xn--bcher-kva.example", ("host", "xn--bcher-kva.example", "any", ())),
        ("{zone: lan}", ("zone", "lan", "any", ())),
        ("{zone: Internet, proto: TCP}", ("zone", "internet", "tcp", ())),
        ("{zone: host, ports: [631], proto: tcp}", ("zone", "host", "tcp", ((631, 631),))),
        ("{zone: lan, proto: icmp}", ("zone", "lan", "icmp", ())),
        ("{zone: any, proto: any}", ("zone", "any", "any", ())),
        ("{cidr: 10.0.0.0/8, ports: [443, '8000-8100', 22]}",
         ("cidr", "10.0.0.0/8", "any", ((22, 22), (443, 443), (8000, 8100)))),
        ("{cidr: 10.0.0.0/8, ports: 53, proto: udp}", ("cidr", "10.0.0.0/8", "udp", ((53, 53),))),
        ("{cidr: 10.0.0.0/8, ports: '1-65535'}", ("cidr", "10.0.0.0/8", "any", ((1, 65535),))),
        ("{cidr: 10.0.0.0/8, ports: [' 80 - 90 ', '25']}", ("cidr", "10.0.0.0/8", "any", ((25, 25), (80, 90)))),
        ("{cidr: 10.0.0.0/8, ports: [80, 80, '80-80']}", ("cidr", "10.0.0.0/8", "any", ((80, 80),))),
        ("{cidr: 10.0.0.0/8, ports: [1, 65535]}", ("cidr", "10.0.0.0/8", "any", ((1, 1), (65535, 65535)))),
        ("{cidr: '2001:db8::/48', proto: udp}", ("cidr", "2001:db8::/48", "udp", ())),
        ("{cidr: 198.51.100.7}", ("cidr", "198.51.100.7/32", "any", ())),
        ("{host: example.org, ports: [443], proto: tcp}", ("host", "example.org", "tcp", ((443, 443),))),
        ("{host: '*.Example.org'}", ("host", "*.example.org", "any", ())),
    ],
)
def test_valid_rule_forms(tmp_path: Path, rule_yaml: str, expected: tuple[Any, ...]) -> None:
    rule = parse_one(tmp_path, rule_yaml)
    assert bare(rule) == expected
    assert rule.origin.endswith("allow[0]")
    if rule.kind == "cidr":
        assert str(rule.network) == rule.value


def test_empty_file_has_the_documented_defaults(tmp_path: Path) -> None:
    p = load_text(tmp_path, "")
    assert (p.network, p.default, p.ipv6, p.log, p.allow, p.deny, p.command, p.description) == (
        "nat", "deny", True, "denied", (), (), (), "")
    assert p.name == "p" and p.files == (str(tmp_path / "p.yaml"),)


def test_every_top_key(tmp_path: Path) -> None:
    p = load_text(tmp_path, """\
version: 1
description: "a browser"
command: [firefox, --new-window, 8080]
network: none
default: allow
allow: [internet]
deny: [lan]
ipv6: false
log: all
""")
    assert p.description == "a browser"
    assert p.command == ("firefox", "--new-window", "8080")
    assert (p.network, p.default, p.ipv6, p.log) == ("none", "allow", False, "all")
    assert [bare(r) for r in p.allow] == [("zone", "internet", "any", ())]
    assert [bare(r) for r in p.deny] == [("zone", "lan", "any", ())]


def test_scalar_command_and_include_become_lists(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "allow: [lan]\n")
    p = load_text(tmp_path, "command: firefox\ninclude: base\n")
    assert p.command == ("firefox",)
    assert [bare(r) for r in p.allow] == [("zone", "lan", "any", ())]


@pytest.mark.parametrize("text", ["log: off", "log: Off", "log: 'off'", "log: OFF"])
def test_log_off_although_yaml_reads_it_as_false(tmp_path: Path, text: str) -> None:
    assert load_text(tmp_path, text + "\n").log == "off"


@pytest.mark.parametrize("text", ["allow:", "allow: []", "deny:\n"])
def test_empty_rule_lists(tmp_path: Path, text: str) -> None:
    p = load_text(tmp_path, text + "\n")
    assert p.allow == () and p.deny == ()


def test_host_rules_property(tmp_path: Path) -> None:
    p = load_text(tmp_path, "allow: [example.org, internet]\ndeny: ['*.ads.example']\n")
    assert [r.value for r in p.host_rules] == ["example.org", "*.ads.example"]


# ---------------------------------------------------------------------------------------------- mistakes


# (document, key as str() shows it, words of the problem, words of the fix)
MISTAKES: list[tuple[str, str, str, str]] = [
    ("alow: [internet]\n", "alow (line 1)", "unknown key 'alow'", "did you mean 'allow'?"),
    ("network: nat\nipv7: true\n", "ipv7 (line 2)", "unknown key 'ipv7'", "did you mean 'ipv6'?"),
    ("allow:\n  - {cidr: 10.0.0.0/8, port: [80]}\n", "allow[0].port (line 2)", "unknown key 'port'",
     "did you mean 'ports'?"),
    ("allow:\n  - {zone: lna}\n", "allow[0].zone (line 2)", "unknown zone 'lna'", "did you mean 'lan'?"),
    ("allow:\n  - {zone: 5}\n", "allow[0].zone (line 2)", "must be a string", "quote it"),
    ("allow:\n  - 10.0.0.0/33\n", "allow[0] (line 2)", "'10.0.0.0/33' is not an IP address", "192.0.2.0/24"),
    ("allow:\n  - 300.1.2.3\n", "allow[0] (line 2)", "'300.1.2.3' is not an IP address", "192.0.2.0/24"),
    ("allow:\n  - '2001:db8::g'\n", "allow[0] (line 2)", "is not an IP address", "2001:db8::/32"),
    ("allow:\n  - {cidr: example.org}\n", "allow[0].cidr (line 2)", "is not an IP address", "192.0.2.0/24"),
    ("allow:\n  - 10.1.2.3/8\n", "allow[0] (line 2)", "'10.1.2.3/8' has host bits set", "did you mean 10.0.0.0/8?"),
    ("deny:\n  - {cidr: '2001:db8::1/32'}\n", "deny[0].cidr (line 2)", "has host bits set",
     "did you mean 2001:db8::/32?"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: [0]}\n", "allow[0].ports[0] (line 2)", "'0' is out of range",
     "1-65535"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: [65536]}\n", "allow[0].ports[0] (line 2)", "out of range", "1-65535"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: ['90-80']}\n", "allow[0].ports[0] (line 2)", "'90-80' is out of range",
     "LOW <= HIGH"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: ['1-70000']}\n", "allow[0].ports[0] (line 2)", "out of range",
     "1-65535"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: [http]}\n", "allow[0].ports[0] (line 2)", "'http' is not a port",
     "8000-8100"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: ['80-']}\n", "allow[0].ports[0] (line 2)", "is not a port", "1-65535"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: [-5]}\n", "allow[0].ports[0] (line 2)", "out of range", "1-65535"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: [1.5]}\n", "allow[0].ports[0] (line 2)", "is not a port", "1-65535"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: [true]}\n", "allow[0].ports[0] (line 2)", "is not a port", "1-65535"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: []}\n", "allow[0].ports (line 2)", "must be a list of ports",
     "ports: [443"),
    ("allow:\n  - {cidr: 10.0.0.0/8, ports: {a: 1}}\n", "allow[0].ports (line 2)", "must be a list of ports",
     "ports: [443"),
    ("allow:\n  - {zone: lan, proto: icmp, ports: [8]}\n", "allow[0].ports (line 2)", "ICMP has no ports",
     "drop ports:"),
    ("allow:\n  - {zone: lan, proto: tpc}\n", "allow[0].proto (line 2)", "unknown protocol 'tpc'",
     "did you mean 'tcp'?"),
    ("allow:\n  - {zone: lan, cidr: 10.0.0.0/8}\n", "allow[0] (line 2)", "exactly one of zone:, cidr:, host:",
     "found zone, cidr"),
    ("allow:\n  - {cidr: 10.0.0.0/8, host: example.org, zone: lan}\n", "allow[0] (line 2)", "exactly one of",
     "found zone, cidr, host"),
    ("allow:\n  - {proto: tcp, ports: [80]}\n", "allow[0] (line 2)", "exactly one of", "found none"),
    ("allow:\n  - {host: 'exa mple.org'}\n", "allow[0].host (line 2)", "is not a domain name", "*.example.org"),
    ("allow:\n  - 'exa mple'\n", "allow[0] (line 2)", "neither a zone, an address nor a domain name",
     "192.0.2.0/24"),
    ("allow:\n  - [internet]\n", "allow[0] (line 2)", "a rule must be a string or a mapping", "'- internet'"),
    ("allow:\n  - 443\n", "allow[0] (line 2)", "a rule must be a string or a mapping", "'- internet'"),
    ("allow: internet\n", "allow (line 1)", "must be a list of rules", "starting with '- '"),
    ("deny: {zone: lan}\n", "deny (line 1)", "must be a list of rules", "under deny:"),
    ("network: bridge\n", "network (line 1)", "'bridge' is not allowed here", "none, nat"),
    ("network: nta\n", "network (line 1)", "'nta' is not allowed here", "did you mean 'nat'?"),
    ("network: [nat]\n", "network (line 1)", "is not allowed here", "nat"),
    ("default: alow\n", "default (line 1)", "'alow' is not allowed here", "did you mean 'allow'?"),
    ("default: true\n", "default (line 1)", "'True' is not allowed here", "allow, deny"),
    ("log: on\n", "log (line 1)", "'True' is not allowed here", "off, denied, all"),
    ("log: denyed\n", "log (line 1)", "'denyed' is not allowed here", "did you mean 'denied'?"),
    ("ipv6: 'yes'\n", "ipv6 (line 1)", "'yes' is not true or false", "ipv6: true or ipv6: false"),
    ("ipv6: 1\n", "ipv6 (line 1)", "'1' is not true or false", "ipv6: false"),
    ("command: {exe: firefox}\n", "command (line 1)", "must be a list", "command: [firefox"),
    ("command: []\n", "command (line 1)", "must be a list", "command: [firefox"),
    ("command: [[firefox]]\n", "command (line 1)", "must be a list", "command: [firefox"),
    ("include: 5\n", "include (line 1)", "must be a list of profile names", "include: [browser-base]"),
    ("include: ['']\n", "include (line 1)", "must be a list of profile names", "include: [browser-base]"),
    ("include: [{a: b}]\n", "include (line 1)", "must be a list of profile names", "include: [browser-base]"),
    ("description: [a, b]\n", "description (line 1)", "must be text", "quote it"),
    ("version: 2\n", "version (line 1)", "unsupported version '2'", "set it to 1"),
]


@pytest.mark.parametrize(("text", "key", "problem", "fix"), MISTAKES, ids=[m[1] + ":" + m[2] for m in MISTAKES])
def test_each_mistake_is_one_precise_error(tmp_path: Path, text: str, key: str, problem: str, fix: str) -> None:
    err = one_error(tmp_path, text)
    path = str(tmp_path / "p.yaml")
    assert err.file == path
    assert err.key == key
    assert problem in err.problem
    assert fix in err.fix
    assert str(err).startswith(f"{path}: {key}: ")
    assert problem in str(err) and fix in str(err)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("allow: [internet\nnetwork: nat\n", "line 2, column 8"),
        ("allow:\n  - internet\n bad: indentation\n", "line 3, column 2"),
        ("network: nat\nallow:\n\t- internet\n", "line 3, column 1"),
        ("a: 1\n---\nb: 2\n", "line 2, column 1"),
        ('description: "unterminated\n', "line 2, column 1"),
        ("allow: [*nowhere]\n", "line 1, column 9"),
    ],
)
def test_invalid_yaml_names_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    err = one_error(tmp_path, text)
    assert err.file == str(tmp_path / "p.yaml")
    assert err.key == where
    assert "is not valid YAML" in err.problem
    assert err.fix and err.fix in str(err)


@pytest.mark.parametrize("text", ["- internet\n", "just text\n", "42\n", "[a, b]\n"])
def test_document_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    err = one_error(tmp_path, text)
    assert err.file == str(tmp_path / "p.yaml")
    assert "must be a mapping" in err.problem
    assert err.key == "line 1"
    assert err.fix


@pytest.mark.parametrize("data", [b"allow: [caf\xe9]\n", b"\xff\xfeallow: []\n", b"description: \x80\n"])
def test_not_utf8(tmp_path: Path, data: bytes) -> None:
    err = one_error(tmp_path, data)
    assert err.file == str(tmp_path / "p.yaml")
    assert "not UTF-8" in err.problem
    assert "UTF-8" in err.fix


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    p = load_text(tmp_path, "\ufeffallow: [internet]\n")
    assert [r.value for r in p.allow] == ["internet"]


def test_nul_byte_is_an_error_not_a_crash(tmp_path: Path) -> None:
    err = one_error(tmp_path, b"allow: [inter\x00net]\n")
    assert "not valid YAML" in err.problem


def test_error_line_points_at_the_offending_line(tmp_path: Path) -> None:
    text = """\
# a comment
description: example

allow:
  - internet
  - lan
  - {cidr: 192.0.2.0/24,
     ports: [22, 99999]}
"""
    err = one_error(tmp_path, text)
    assert err.key == "allow[2].ports[1] (line 8)"


def test_all_problems_in_one_file_are_reported(tmp_path: Path) -> None:
    text = """\
netwrk: nat
default: maybe
log: loud
ipv6: perhaps
allow:
  - intrnet.example.org
  - {zone: lna}
  - 10.0.0.1/8
  - {cidr: 10.0.0.0/8, ports: [0, '9-1', x]}
  - {zone: lan, proto: icmp, ports: [1]}
deny:
  - {zone: lan, cidr: 10.0.0.0/8}
  - {prot: tcp, zone: lan}
command: {}
"""
    errs = errors_of(tmp_path, text)
    keys = [e.key for e in errs]
    assert keys == [
        "netwrk (line 1)",
        "default (line 2)",
        "log (line 3)",
        "ipv6 (line 4)",
        "allow[1].zone (line 7)",
        "allow[2] (line 8)",
        "allow[3].ports[0] (line 9)",
        "allow[3].ports[1] (line 9)",
        "allow[3].ports[2] (line 9)",
        "allow[4].ports (line 10)",
        "deny[0] (line 12)",
        "deny[1].prot (line 13)",
        "command (line 14)",
    ]
    assert all(e.file == str(tmp_path / "p.yaml") and e.fix for e in errs)
    with pytest.raises(ProfileErrors) as info:
        profile.load(str(tmp_path / "p.yaml"), [tmp_path])
    assert len(info.value.errors) == len(errs)
    assert str(info.value).count("\n") == len(errs) - 1  # one line per problem


def test_check_covers_every_profile_and_every_included_file(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "allow: [{zone: lna}]\n")
    write(tmp_path, "a.yaml", "include: [base]\ndefault: maybe\n")
    write(tmp_path, "b.yaml", "network: nat\nlog: loud\n")
    write(tmp_path, "good.yaml", "allow: [internet]\n")
    errs = profile.check(["a", "good", "b"], [tmp_path])
    assert sorted((Path(e.file).name, e.key) for e in errs) == [
        ("a.yaml", "default (line 2)"),
        ("b.yaml", "log (line 2)"),
        ("base.yaml", "allow[0].zone (line 1)"),
    ]
    assert profile.check(["good"], [tmp_path]) == []


def test_errors_are_nsfw_errors_with_exit_code() -> None:
    e = ProfileError("f.yaml", "allow[0] (line 2)", "bad", "fix it")
    assert isinstance(e, NsfwError) and e.exit_code != 0
    assert str(e) == "f.yaml: allow[0] (line 2): bad (fix it)"
    assert str(ProfileError("f.yaml", "", "bad")) == "f.yaml: bad"


def test_zone_typo_as_plain_string_is_an_error(tmp_path: Path) -> None:
    # `- intenret` parses as Rule("host", "intenret"): a one-label "domain" that never matches, so the
    # profile that meant to open the internet opens nothing and check() says nothing.
    err = one_error(tmp_path, "allow:\n  - intenret\n")
    assert "internet" in err.fix


# ---------------------------------------------------------------------------------------------- reading


def test_unreadable_file_via_reader(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "allow: [internet]\n")

    def deny(p: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(p))

    errs = profile.check([str(path)], [tmp_path], deny)
    assert len(errs) == 1
    assert errs[0].file == str(path)
    assert "cannot be read" in errs[0].problem and "chmod" in errs[0].fix


def test_reader_is_used_for_included_files_too(tmp_path: Path) -> None:
    write(tmp_path, "secret.yaml", "allow: [lan]\n")
    top = write(tmp_path, "top.yaml", "include: [secret]\n")

    def read(p: Path) -> bytes:
        if p.name == "secret.yaml":
            raise PermissionError(13, "Permission denied", str(p))
        return p.read_bytes()

    errs = profile.check([str(top)], [tmp_path], read)
    assert [(Path(e.file).name, "cannot be read" in e.problem) for e in errs] == [("secret.yaml", True)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_for_real(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "allow: [internet]\n")
    path.chmod(0)
    errs = profile.check([str(path)], [tmp_path])
    assert len(errs) == 1 and "cannot be read" in errs[0].problem


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").mkdir()
    errs = profile.check([str(tmp_path / "d.yaml")], [tmp_path])
    assert len(errs) == 1 and "is a directory" in errs[0].problem and errs[0].fix


def test_missing_path(tmp_path: Path) -> None:
    errs = profile.check([str(tmp_path / "nope.yaml")], [tmp_path])
    assert len(errs) == 1
    assert errs[0].file == str(tmp_path / "nope.yaml") and "does not exist" in errs[0].problem and errs[0].fix


def test_missing_name_lists_what_is_available(tmp_path: Path) -> None:
    write(tmp_path, "alpha.yaml", "")
    write(tmp_path, "beta.yml", "")
    write(tmp_path, "notes.txt", "")
    with pytest.raises(ProfileErrors) as info:
        profile.load("gamma", [tmp_path])
    (err,) = info.value.errors
    assert err.file == "gamma"
    assert str(tmp_path) in err.problem
    assert "available: alpha, beta" in err.fix
    assert f"{tmp_path}/gamma.yaml" in err.fix


def test_missing_name_with_nothing_installed(tmp_path: Path) -> None:
    errs = profile.check(["gamma"], [tmp_path / "none"])
    assert len(errs) == 1 and "none are installed" in errs[0].fix


def test_symlink_loop_is_an_error_not_a_crash(tmp_path: Path) -> None:
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    errs = profile.check([str(loop)], [tmp_path])
    assert len(errs) == 1 and errs[0].file == str(loop)


def test_date_like_values_stay_text(tmp_path: Path) -> None:
    # YAML 1.1 would read these as dates (and crash on Feb 30); profiles read them as plain text
    (tmp_path / "p.yaml").write_text("command: [app, 2024-02-30]\ndescription: 2020-13-45\n")
    prof = profile.load(str(tmp_path / "p.yaml"), [tmp_path])
    assert prof.command == ("app", "2024-02-30") and prof.description == "2020-13-45"


@pytest.mark.parametrize("text", [
    "allow: [!!int llow]\n",
    "description: !!float x\n",
    "description: !!timestamp x\n",
    "ipv6: !!bool x\n",
    "description: !!float\n",
])
def test_yaml_constructor_failures_are_errors_not_crashes(tmp_path: Path, text: str) -> None:
    err = one_error(tmp_path, text)
    assert err.file == str(tmp_path / "p.yaml") and "line 1" in err.key


@pytest.mark.parametrize("text", ["allow: &x [*x]\n", "&x {allow: *x}\n", "deny: &x [{zone: *x}]\n"])
def test_recursive_alias_is_an_error_not_a_crash(tmp_path: Path, text: str) -> None:
    errs: list[ProfileError] | None = None
    with contextlib.suppress(RecursionError):  # fail outside the handler: a chained 1000-frame traceback
        errs = errors_of(tmp_path, text)  # takes pytest seconds to format
    assert errs, "RecursionError"


@pytest.mark.parametrize("port", ["²", "①"])
def test_unicode_digit_port_is_an_error_not_a_crash(tmp_path: Path, port: str) -> None:
    err = one_error(tmp_path, f"allow:\n  - {{cidr: 10.0.0.0/8, ports: ['{port}']}}\n")
    assert err.key == "allow[0].ports[0] (line 2)"


def test_alias_bomb_is_checked_quickly(tmp_path: Path) -> None:
    # 6 levels of 10 references: 10**6 paths through 7 small nodes. safe_load shares the objects; the line
    # table in _node_lines walks every path (2.5 s here; each further level costs 10x), so a few hundred bytes
    # keep `nsfw check` busy for hours.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    path = write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    code = f"from nsfw import profile; print(len(profile.check([{str(path)!r}], [])))"
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=1)
    except subprocess.TimeoutExpired:
        pytest.fail("check() took more than 1 s on a 350-byte file")
    assert out.stdout.strip() == "7", out.stderr


# ---------------------------------------------------------------------------------------------- includes


def test_includes_merge_in_order(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", """\
description: base
command: [base-cmd]
network: none
default: allow
log: all
ipv6: false
allow: [lan]
deny: [192.0.2.0/24]
""")
    write(tmp_path, "mid.yaml", """\
default: deny
allow: [internet]
deny: ['2001:db8::/32']
""")
    top = write(tmp_path, "top.yaml", """\
include: [base, mid]
network: nat
allow: [example.org]
""")
    p = profile.load(str(top), [tmp_path])
    assert [r.value for r in p.allow] == ["lan", "internet", "example.org"]
    assert [r.value for r in p.deny] == ["192.0.2.0/24", "2001:db8::/32"]
    assert p.network == "nat"  # this file's key wins
    assert p.default == "deny"  # the later include wins over the earlier
    assert (p.description, p.command, p.log, p.ipv6) == ("base", ("base-cmd",), "all", False)
    assert p.files == (str(tmp_path / "base.yaml"), str(tmp_path / "mid.yaml"), str(top))
    assert p.name == "top" and p.path == str(top)
    assert p.allow[0].origin.startswith(str(tmp_path / "base.yaml"))
    assert p.allow[2].origin.startswith(str(top))


def test_nested_includes_merge_depth_first(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "allow: [1.1.1.1]\nlog: all\n")
    write(tmp_path, "b.yaml", "include: [a]\nallow: [2.2.2.2]\nlog: off\n")
    write(tmp_path, "c.yaml", "allow: [3.3.3.3]\n")
    p = load_text(tmp_path, "include: [b, c]\nallow: [4.4.4.4]\n", "top.yaml")
    assert [r.value for r in p.allow] == ["1.1.1.1/32", "2.2.2.2/32", "3.3.3.3/32", "4.4.4.4/32"]
    assert p.log == "off"


def test_this_files_scalar_beats_every_include(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "default: allow\nipv6: false\n")
    p = load_text(tmp_path, "include: [a]\ndefault: deny\nipv6: true\n", "top.yaml")
    assert (p.default, p.ipv6) == ("deny", True)


def test_include_by_path(tmp_path: Path) -> None:
    base = write(tmp_path / "elsewhere", "base.yml", "allow: [lan]\n")
    p = load_text(tmp_path, f"include: [{base}]\n", "top.yaml")
    assert [r.value for r in p.allow] == ["lan"]


def test_relative_include_path_is_relative_to_the_including_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    write(tmp_path / "profiles", "common.yaml", "allow: [lan]\n")
    top = write(tmp_path / "profiles", "top.yaml", "include: [common.yaml]\n")
    monkeypatch.chdir(tmp_path)
    assert [r.value for r in profile.load(str(top), []).allow] == ["lan"]


def test_diamond_include_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path, "common.yaml", "deny: [lan]\n")
    write(tmp_path, "a.yaml", "include: [common]\n")
    write(tmp_path, "b.yaml", "include: [common]\n")
    p = load_text(tmp_path, "include: [a, b]\n", "top.yaml")
    assert [r.value for r in p.deny] == ["lan", "lan"]


def test_missing_include(tmp_path: Path) -> None:
    top = write(tmp_path, "top.yaml", "allow: [internet]\ninclude: [base, nope]\n")
    write(tmp_path, "base.yaml", "allow: [lan]\n")
    errs = profile.check([str(top)], [tmp_path])
    assert len(errs) == 1
    err = errs[0]
    assert err.file == str(top)
    assert err.key.startswith("include[1]")
    assert "'nope'" in err.problem and "not found" in err.problem
    assert str(tmp_path) in err.fix
    assert str(err).startswith(f"{top}: include[1]")


def test_missing_include_names_its_line(tmp_path: Path) -> None:
    err = one_error(tmp_path, "allow: [internet]\ninclude: [nope]\n", "top.yaml")
    assert err.key == "include[0] (line 2)"


def test_missing_include_by_path_names_the_including_file(tmp_path: Path) -> None:
    top = write(tmp_path, "top.yaml", f"include: [{tmp_path}/nope.yaml]\n")
    (err,) = profile.check([str(top)], [tmp_path])
    assert err.file == str(top) and err.key.startswith("include[0]")


def test_include_cycle(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "include: [b]\n")
    write(tmp_path, "b.yaml", "include: [a]\n")
    errs = profile.check(["a"], [tmp_path])
    assert len(errs) == 1
    err = errs[0]
    assert err.file == str(tmp_path / "b.yaml")
    assert err.key.startswith("include[0]")
    assert "cycle: a -> b -> a" in err.problem
    assert err.fix


def test_include_cycle_of_itself_by_path(tmp_path: Path) -> None:
    top = write(tmp_path, "a.yaml", f"include: [{tmp_path}/a.yaml]\n")
    errs = profile.check([str(top)], [tmp_path])
    assert len(errs) == 1 and "cycle: a -> a" in errs[0].problem


def test_include_cycle_is_reported_once_and_other_errors_still(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "include: [b]\nlog: loud\n")
    write(tmp_path, "b.yaml", "include: [c]\n")
    write(tmp_path, "c.yaml", "include: [a]\nallow: [{zone: lna}]\n")
    errs = profile.check(["a"], [tmp_path])
    assert sorted((Path(e.file).name, e.key.split(" ")[0]) for e in errs) == [
        ("a.yaml", "log"), ("c.yaml", "allow[0].zone"), ("c.yaml", "include[0]")]


def _chain(d: Path, levels: int) -> None:
    """p0 includes p1 includes ... p<levels>: `levels` nested includes below p0."""
    for i in range(levels):
        write(d, f"p{i}.yaml", f"include: [p{i + 1}]\nallow: [10.0.0.{i}]\n")
    write(d, f"p{levels}.yaml", f"allow: [10.0.0.{levels}]\n")


def test_include_depth_within_limit(tmp_path: Path) -> None:
    _chain(tmp_path, 7)
    p = profile.load("p0", [tmp_path])
    assert [r.value for r in p.allow] == [f"10.0.0.{i}/32" for i in range(7, -1, -1)]


@pytest.mark.parametrize("levels", [9, 12, 30])
def test_include_depth_over_8_is_an_error(tmp_path: Path, levels: int) -> None:
    _chain(tmp_path, levels)
    errs = profile.check(["p0"], [tmp_path])
    assert len(errs) == 1
    assert "deeper than 8" in errs[0].problem and errs[0].key.startswith("include[0]") and errs[0].fix


def test_include_depth_of_exactly_8_is_allowed(tmp_path: Path) -> None:
    _chain(tmp_path, 8)
    assert profile.check(["p0"], [tmp_path]) == []


# ---------------------------------------------------------------------------------------------- lookup


def test_search_path_from_nsfw_profile_path(tmp_path: Path) -> None:
    env = {"NSFW_PROFILE_PATH": f"{tmp_path}/a::{tmp_path}/b:", "XDG_CONFIG_HOME": f"{tmp_path}/xdg"}
    assert profile.search_path(env, str(tmp_path / "home")) == [
        tmp_path / "a", tmp_path / "b", profile.SYSTEM_DIR, profile.SHIPPED_DIR]


def test_search_path_from_xdg_config_home(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": f"{tmp_path}/xdg", "NSFW_PROFILE_PATH": ""}
    assert profile.search_path(env, str(tmp_path / "home")) == [
        tmp_path / "xdg" / "nsfw" / "profiles", profile.SYSTEM_DIR, profile.SHIPPED_DIR]


def test_search_path_from_home(tmp_path: Path) -> None:
    assert profile.search_path({}, str(tmp_path)) == [
        tmp_path / ".config" / "nsfw" / "profiles", Path("/etc/nsfw/profiles"), profile.SHIPPED_DIR]
    shipped = Path(profile.__file__).resolve().parent.parent / "profiles"
    assert shipped == profile.SHIPPED_DIR


@pytest.mark.parametrize(("ref", "is_path"), [("firefox", False), ("my-app", False), ("./firefox", True),
                                              ("firefox.yaml", True), ("firefox.yml", True),
                                              ("/etc/nsfw/profiles/x", True), ("sub/x", True)])
def test_is_path(ref: str, is_path: bool) -> None:
    assert profile.is_path(ref) is is_path


def test_find_takes_the_first_directory_that_has_the_name(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write(b, "app.yml", "allow: [lan]\n")
    write(c, "app.yaml", "allow: [internet]\n")
    write(a, "app.txt", "")
    (a / "app.yaml").mkdir()  # a directory is not a profile
    assert profile.find("app", [a, b, c]) == b / "app.yml"
    write(b, "app.yaml", "")
    assert profile.find("app", [a, b, c]) == b / "app.yaml"  # .yaml before .yml in one directory
    assert profile.find("other", [a, b, c]) is None
    assert profile.find("x/app.yaml", [a, b, c]) == Path("x/app.yaml")


def test_nsfw_profile_path_wins_over_everything(tmp_path: Path) -> None:
    env = {"NSFW_PROFILE_PATH": f"{tmp_path}/first:{tmp_path}/second", "XDG_CONFIG_HOME": f"{tmp_path}/xdg"}
    write(tmp_path / "xdg" / "nsfw" / "profiles", "default.yaml", "allow: [1.1.1.1]\n")
    write(tmp_path / "second", "default.yaml", "allow: [2.2.2.2]\n")
    dirs = profile.search_path(env, str(tmp_path))
    assert [r.value for r in profile.load("default", dirs).allow] == ["2.2.2.2/32"]
    write(tmp_path / "first", "default.yml", "allow: [3.3.3.3]\n")
    assert [r.value for r in profile.load("default", dirs).allow] == ["3.3.3.3/32"]
    # the user's config dir is not searched when NSFW_PROFILE_PATH is set
    write(tmp_path / "xdg" / "nsfw" / "profiles", "useronly.yaml", "")
    assert profile.find("useronly", dirs) is None


def test_user_config_shadows_shipped_profile(tmp_path: Path) -> None:
    dirs = profile.search_path({"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, str(tmp_path))
    if (profile.SYSTEM_DIR / "default.yaml").exists():
        pytest.skip("an installed /etc/nsfw/profiles/default.yaml would shadow the shipped one")
    shipped = profile.load("default", dirs)
    assert shipped.path == str(profile.SHIPPED_DIR / "default.yaml")
    write(tmp_path / "xdg" / "nsfw" / "profiles", "default.yaml", "network: none\n")
    mine = profile.load("default", dirs)
    assert mine.path == str(tmp_path / "xdg" / "nsfw" / "profiles" / "default.yaml")
    assert mine.network == "none"


def test_same_named_include_reaches_the_shipped_profile(tmp_path: Path) -> None:
    if (profile.SYSTEM_DIR / "default.yaml").exists():
        pytest.skip("an installed /etc/nsfw/profiles/default.yaml would be found first")
    home = tmp_path / "home"
    user = write(home / ".config" / "nsfw" / "profiles", "default.yaml", "include: [default]\nallow: [192.0.2.1]\n")
    dirs = profile.search_path({}, str(home))
    p = profile.load("default", dirs)
    assert p.path == str(user)
    shipped = profile.load(str(profile.SHIPPED_DIR / "default.yaml"), [])
    assert p.allow == (*shipped.allow, p.allow[-1])
    assert p.allow[-1].value == "192.0.2.1/32"
    assert p.deny == shipped.deny
    assert p.files == (str(profile.SHIPPED_DIR / "default.yaml"), str(user))


def test_same_named_include_reaches_the_next_one_down(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    write(d1, "base.yaml", "include: [base]\nallow: [1.1.1.1]\n")
    write(d2, "base.yaml", "allow: [2.2.2.2]\n")
    p = profile.load("base", [d1, d2])
    assert [r.value for r in p.allow] == ["2.2.2.2/32", "1.1.1.1/32"]


def test_same_named_include_with_nothing_below_is_not_found(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "include: [base]\n")
    errs = profile.check(["base"], [tmp_path])
    assert len(errs) == 1 and "'base', which was not found" in errs[0].problem


def test_same_named_include_from_a_path_ref_finds_the_name(tmp_path: Path) -> None:
    write(tmp_path / "lib", "app.yaml", "allow: [lan]\n")
    top = write(tmp_path / "mine", "app.yaml", "include: [app]\nallow: [internet]\n")
    p = profile.load(str(top), [tmp_path / "lib"])
    assert [r.value for r in p.allow] == ["lan", "internet"]


def test_same_named_include_chain_through_three_directories(tmp_path: Path) -> None:
    d1, d2, d3 = tmp_path / "d1", tmp_path / "d2", tmp_path / "d3"
    write(d1, "base.yaml", "include: [base]\nallow: [1.1.1.1]\n")
    write(d2, "base.yaml", "include: [base]\nallow: [2.2.2.2]\n")
    write(d3, "base.yaml", "allow: [3.3.3.3]\n")
    p = profile.load("base", [d1, d2, d3])
    assert [r.value for r in p.allow] == ["3.3.3.3/32", "2.2.2.2/32", "1.1.1.1/32"]


# ---------------------------------------------------------------------------------------------- sha256


def test_sha256_follows_every_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "allow: [lan]\n")
    top = write(tmp_path, "top.yaml", "include: [base]\n")
    first = profile.load("top", [tmp_path]).sha256
    assert len(first) == 64 and int(first, 16) >= 0
    assert profile.load("top", [tmp_path]).sha256 == first
    base.write_text("allow: [lan]\n# a comment changes the bytes\n")
    second = profile.load("top", [tmp_path]).sha256
    assert second != first
    top.write_text("include: [base]\n\n")
    assert profile.load("top", [tmp_path]).sha256 not in (first, second)


def test_sha256_of_a_lone_file_differs_from_its_includer(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "allow: [lan]\n")
    write(tmp_path, "top.yaml", "include: [base]\n")
    write(tmp_path, "other.yaml", "include: [base]\n")
    base, top, other = (profile.load(n, [tmp_path]).sha256 for n in ("base", "top", "other"))
    assert len({base, top}) == 2
    assert top == other  # same bytes everywhere: the digest covers content, not names


# ---------------------------------------------------------------------------------------------- fuzz

KEYS = [*profile.TOP_KEYS, "alow", "ports", "zone", "cidr", "", "include"]
STRINGS = ["internet", "lan", "host", "any", "lna", "10.0.0.0/8", "10.0.0.1/8", "::1", "2001:db8::/32",
           "example.org", "*.example.org", "*", "80-90", "90-80", "off", "nat", "none", "allow", "deny",
           "tcp", "udp", "icmp", "fuzz0", "fuzz1", "fuzz2", "fuzz3", "./fuzz1.yaml", "/nonexistent/x.yaml",
           "-", ":", "%", "a b", "é", "300.1.1.1", "0", "65536", "1-65535", "fe80::/10"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return rng.choice(STRINGS)
    if kind == 1:
        return rng.choice([0, 1, -1, 22, 443, 65535, 65536, 10**30])
    if kind == 2:
        return rng.choice([True, False, None, 1.5, float("inf")])
    if kind in (3, 4, 5):
        return rng.choice(STRINGS)
    if kind in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice([*profile.RULE_KEYS, *KEYS]): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _document(rng: random.Random) -> dict[Any, Any]:
    doc: dict[Any, Any] = {}
    for _ in range(rng.randrange(7)):
        key = rng.choice(KEYS)
        if key in ("allow", "deny") and rng.random() < 0.7:
            doc[key] = [_value(rng, 1) for _ in range(rng.randrange(5))]
        elif key == "include" and rng.random() < 0.7:
            doc[key] = [f"fuzz{rng.randrange(4)}" for _ in range(rng.randrange(3))]
        else:
            doc[key] = _value(rng)
    return doc


NOISE = [":", "-", " ", "\n", "[", "]", "{", "}", ",", "'", '"', "#", "!", "? ", "|", ">", "\t",
         "\\", "%YAML 1.1\n", "---\n", "...\n", "\x00", "\x85", "\u2028", "é"]


def _mutate(rng: random.Random, text: str) -> bytes:
    chars = list(text)
    for _ in range(rng.randrange(1, 5)):
        if not chars:
            break
        i = rng.randrange(len(chars))
        op = rng.randrange(3)
        if op == 0:
            del chars[i]
        elif op == 1:
            chars.insert(i, rng.choice(NOISE))
        else:
            j = rng.randrange(len(chars))
            chars[i], chars[j] = chars[j], chars[i]
    data = "".join(chars).encode()
    if rng.random() < 0.05:
        data = data[: rng.randrange(len(data) + 1)] + b"\xff" + data[rng.randrange(len(data) + 1):]
    return data


def test_fuzz_check_only_ever_reports_profile_errors(tmp_path: Path) -> None:
    """Hundreds of random and mutated documents: check() returns ProfileErrors and never raises.

    Anchors/aliases, explicit !!tags and non-ASCII digits are left out: they have their own (xfail) tests above
    (an earlier version of this fuzz found the !!int crash)."""
    rng = random.Random(20240611)
    crashes: list[str] = []
    seen_ok = seen_err = 0
    for n in range(400):
        for k in range(4):  # includable neighbours, regenerated now and then
            if n % 25 == 0 or not (tmp_path / f"fuzz{k}.yaml").exists():
                write(tmp_path, f"fuzz{k}.yaml", yaml.safe_dump(_document(rng)))
        text = yaml.safe_dump(_document(rng), default_flow_style=rng.random() < 0.5, allow_unicode=True)
        data = _mutate(rng, text) if n % 2 else text.encode()
        path = write(tmp_path, "case.yaml", data)
        try:
            errs = profile.check([str(path), "fuzz0"], [tmp_path])
        except Exception as e:  # any exception at all is the finding
            crashes.append(f"{type(e).__name__}: {e} <- {data!r}")
            continue
        assert isinstance(errs, list)
        for e in errs:
            assert type(e) is ProfileError, e
            assert e.file and e.problem
            assert e.fix, f"no fix offered: {e}"
        if errs:
            seen_err += 1
        else:
            seen_ok += 1
    assert not crashes, "\n".join(crashes[:5])
    assert seen_ok >= 2 and seen_err > 100  # the generator explores both sides
