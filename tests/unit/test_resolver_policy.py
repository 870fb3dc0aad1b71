"""nsfw.resolver.policy: which names resolve, into which grant sets, and deny winning everywhere."""

from __future__ import annotations

import pytest

from nsfw.resolver.policy import Decision, Policy

POLICY = Policy(
    allow=[("example.org", "dns_0"), ("*.example.org", "dns_1"), ("*.cdn.example.org", "dns_2"),
           ("*.example.org", "dns_1"), ("shop.test", "dns_3"), ("*.test", "dns_4")],
    deny=["ads.example.org", "*.tracker.example.org", "*.evil.test"],
    resolve_unlisted=False,
)


@pytest.mark.parametrize("qname, expected", [
    ("example.org", Decision("allow", ("dns_0",))),
    ("www.example.org", Decision("allow", ("dns_1",))),
    ("a.b.c.example.org", Decision("allow", ("dns_1",))),  # any depth
    ("img.cdn.example.org", Decision("allow", ("dns_1", "dns_2"))),  # every matching rule, in rule order, once
    ("cdn.example.org", Decision("allow", ("dns_1",))),  # *.cdn.example.org does not match its apex
    ("shop.test", Decision("allow", ("dns_3", "dns_4"))),
    ("test", Decision("refuse")),  # *.test does not match the apex
    ("ads.example.org", Decision("deny")),  # deny wins over *.example.org
    ("x.ads.example.org", Decision("allow", ("dns_1",))),  # an exact deny is exact
    ("a.tracker.example.org", Decision("deny")),
    ("tracker.example.org", Decision("allow", ("dns_1",))),
    ("x.evil.test", Decision("deny")),
    ("example.com", Decision("refuse")),
    ("notexample.org", Decision("refuse")),  # a suffix match is by whole labels
    ("xexample.org", Decision("refuse")),
    (".", Decision("refuse")),
    ("org", Decision("refuse")),
])
def test_decide(qname: str, expected: Decision) -> None:
    assert POLICY.decide(qname) == expected


def test_case_and_trailing_dot_do_not_matter() -> None:
    assert POLICY.decide("WWW.Example.ORG.") == Decision("allow", ("dns_1",))
    assert POLICY.decide("ADS.example.org") == Decision("deny")
    upper = Policy([("*.Example.ORG.", "s")], ["Bad.Example.Org"], False)
    assert upper.decide("a.example.org") == Decision("allow", ("s",))
    assert upper.decide("bad.example.org.") == Decision("deny")


def test_unlisted_resolves_when_told_to() -> None:
    open_policy = Policy([("a.test", "s")], ["b.test"], resolve_unlisted=True)
    assert open_policy.decide("c.test") == Decision("unlisted")
    assert open_policy.decide("b.test") == Decision("deny")
    assert open_policy.decide("a.test").verdict == "allow"
    assert Policy([], [], resolve_unlisted=False).decide("a.test") == Decision("refuse")


def test_escaped_labels_never_line_up_with_a_pattern() -> None:
    # the single label "example.org" under "x" arrives from dnsmsg as example\046org.x
    assert POLICY.decide("www.example\\046org").verdict == "refuse"
    assert Policy([("*.test", "s")], [], False).decide("a\\046b.test").verdict == "allow"  # still below test


def test_check_chain_denies_if_any_name_is_denied() -> None:
    assert POLICY.check_chain(["www.example.org", "www.example.org.cdn.test", "edge.cdn.test"]) == "allow"
    assert POLICY.check_chain(["www.example.org", "x.tracker.example.org", "edge.cdn.test"]) == "deny"
    assert POLICY.check_chain(["www.example.org", "ADS.Example.Org."]) == "deny"
    assert POLICY.check_chain([]) == "allow"


@pytest.mark.parametrize("pattern", ["", "*", "*.", ".", "a..b", "a.*.b", "*.*.a", "x" * 64 + ".org"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        Policy([(pattern, "s")], [], False)
    with pytest.raises(ValueError):
        Policy([], [pattern], False)
