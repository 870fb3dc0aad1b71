"""Which names a sandbox may resolve, and into which grant sets their addresses go. Pure.

Patterns: `example.org` matches that name only; `*.example.org` matches any name below it, at any depth, but not
example.org itself. Matching ignores letter case and a trailing dot. A deny pattern wins over every allow pattern.

Names come from `dnsmsg` in its escaped text form, so a label holding a dot (or any byte outside [a-z0-9-_*])
reads `\\046` and can never line up with the labels of a pattern.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Literal

    Verdict = Literal["allow", "deny", "unlisted", "refuse"]


class Decision(NamedTuple):
    verdict: Verdict
    allow_sets: tuple[str, ...] = ()  # with "allow": every matching rule's set, deduplicated, in rule order


def _normalize(pattern: str) -> tuple[str, bool]:
    """(the name a pattern is about, whether it is a wildcard); ValueError when it is not a pattern."""
    text = pattern.strip().lower().rstrip(".")
    wild = text.startswith("*.")
    name = text[2:] if wild else text
    labels = name.split(".")
    if not name or "*" in name or any(not 0 < len(lb) <= 63 for lb in labels):
        raise ValueError(f"{pattern!r} is not a domain pattern (write example.org or *.example.org)")
    return name, wild


class _Patterns:
    """Exact names and wildcard suffixes, each mapped to the indexes of the rules that gave them."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.exact: dict[str, list[int]] = {}
        self.below: dict[str, list[int]] = {}
        for i, pattern in enumerate(patterns):
            name, wild = _normalize(pattern)
            (self.below if wild else self.exact).setdefault(name, []).append(i)

    def matches(self, name: str) -> list[int]:
        """Indexes of every pattern that matches `name` (normalized), in no particular order."""
        hits = list(self.exact.get(name, ()))
        if self.below:
            dot = name.find(".")
            while dot >= 0:
                hits += self.below.get(name[dot + 1:], ())
                dot = name.find(".", dot + 1)
        return hits

    def any(self, name: str) -> bool:
        if name in self.exact:
            return True
        if self.below:
            dot = name.find(".")
            while dot >= 0:
                if name[dot + 1:] in self.below:
                    return True
                dot = name.find(".", dot + 1)
        return False


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class Policy:
    """allow: (pattern, grant set name) pairs; deny: patterns; resolve_unlisted: whether a name that no pattern
    matches is resolved (granting nothing) or refused without asking anyone."""

    def __init__(self, allow: Sequence[tuple[str, str]], deny: Sequence[str], resolve_unlisted: bool) -> None:
        self._allow = _Patterns(p for p, _set in allow)
        self._sets = [s for _p, s in allow]
        self._deny = _Patterns(deny)
        self._unlisted = Decision("unlisted" if resolve_unlisted else "refuse")

    def decide(self, qname: str) -> Decision:
        name = _key(qname)
        if self._deny.any(name):
            return _DENY
        hits = self._allow.matches(name)
        if not hits:
            return self._unlisted
        # dict keeps the first occurrence: deduplicated, in the order of the rules
        return Decision("allow", tuple(dict.fromkeys(self._sets[i] for i in sorted(hits))))

    def check_chain(self, names: Iterable[str]) -> Literal["allow", "deny"]:
        """"deny" when any name of an answer's CNAME chain matches a deny pattern: deny wins, even when the
        name asked for is allowed (a tracker behind a CNAME of the site's own domain)."""
        return "deny" if any(self._deny.any(_key(n)) for n in names) else "allow"


_DENY = Decision("deny")
