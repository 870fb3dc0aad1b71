"""Profile format v1: find, load (with includes), validate. Pure: no kernel, no root.

Every problem is collected rather than stopping at the first, so `nsfw check` can list them all, each naming
the file, the key (with its line) and what would fix it.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ProfileError, ProfileErrors

Zone = Literal["internet", "lan", "host", "any"]
Proto = Literal["tcp", "udp", "icmp", "any"]
ZONES: tuple[str, ...] = ("internet", "lan", "host", "any")
PROTOS: tuple[str, ...] = ("tcp", "udp", "icmp", "any")
TOP_KEYS = ("version", "description", "include", "command", "network", "default", "allow", "deny", "remove", "ipv6",
            "log")
RULE_KEYS = ("zone", "cidr", "host", "file", "ports", "proto")
TARGET_KEYS = ("zone", "cidr", "host", "file")
MAX_LIST_BYTES = 64 << 20
MAX_INCLUDE_DEPTH = 8
# Next to the package in a checkout or under /usr/local/lib/nsfw; /usr/share/nsfw/profiles from the .deb.
_BESIDE = Path(__file__).resolve().parent.parent / "profiles"
SHIPPED_DIR = _BESIDE if _BESIDE.is_dir() else Path("/usr/share/nsfw/profiles")
SYSTEM_DIR = Path("/etc/nsfw/profiles")

CHOICES: dict[str, tuple[str, ...]] = {"network": ("none", "nat"), "default": ("allow", "deny"),
                                        "log": ("off", "denied", "all")}
DEFAULTS = {"network": "nat", "default": "deny", "ipv6": True, "log": "denied"}
# What each key means: the JSON Schema (`nsfw schema`) and the documentation say it the same way.
DESCRIPTIONS = {
    "version": "Profile format version; 1 when given.",
    "description": "What the profile is for, one line.",
    "include": "Profiles merged first, in order; this file's keys win; allow and deny lists concatenate. "
               "A profile's own name reaches the next profile of that name down the search path.",
    "command": "What `nsfw run -p NAME` runs when no command follows.",
    "network": "none: loopback only; nat: a veth pair to the host, NAT'd.",
    "default": "The verdict for outbound traffic that no rule matches.",
    "allow": "Outbound destinations permitted.",
    "deny": "Outbound destinations refused; deny wins over allow.",
    "remove": "Rules to drop from what include: brought in, written as the included profile writes them.",
    "ipv6": "IPv6 through the host when the host has an IPv6 default route.",
    "log": "Which verdicts to log.",
    "zone": "internet, lan, host (only where named) or any (internet and lan).",
    "cidr": "An IPv4 or IPv6 address or network, without host bits.",
    "host": "A domain name of two labels or more, or *.NAME for its subdomains at any depth.",
    "file": "A list file (relative to the profile): one address, network or domain name a line; # comments.",
    "ports": "Ports 1-65535 or \"LOW-HIGH\" ranges.",
    "proto": "tcp, udp, icmp or any (with ports, any means tcp and udp).",
}
LABEL_PATTERN = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_LABEL = re.compile(f"^{LABEL_PATTERN}$")
_PORT_RANGE = re.compile(r"^\s*([0-9]+)\s*-\s*([0-9]+)\s*$", re.ASCII)
_PORT = re.compile(r"^\s*([0-9]+)\s*$", re.ASCII)


BITS = {4: 32, 6: 128}


@dataclass(frozen=True)
class Listed:
    """The addresses and networks of one list file: one integer per line that names one, FIRST << BITS | LAST
    (BITS is 32 for IPv4, 128 for IPv6; host bits cleared), in the order of the file, repeats kept.

    A list of a hundred thousand networks is then a tuple of ints rather than a hundred thousand Rule objects,
    and sorting those ints sorts by first address, then last, so one pass merges them (intervals.merge_packed).
    """

    v4: tuple[int, ...] = ()
    v6: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)

    def packed(self, version: int) -> tuple[int, ...]:
        return self.v4 if version == 4 else self.v6

    def spans(self, version: int) -> list[tuple[int, int]]:
        """(first, last) of each entry of one IP version."""
        bits = BITS[version]
        mask = (1 << bits) - 1
        return [(k >> bits, k & mask) for k in self.packed(version)]

    def without(self, version: int, lo: int, hi: int) -> Listed:
        """The same list less every entry that names exactly lo..hi (what `remove:` of a cidr rule means)."""
        gone = lo << BITS[version] | hi
        kept = tuple(k for k in self.packed(version) if k != gone)
        return Listed(kept, self.v6) if version == 4 else Listed(self.v4, kept)


@dataclass(frozen=True)
class Rule:
    """One allow or deny entry. `value` is a zone name, a normalized network, a lower-case domain name, or the
    path of a list file as the profile wrote it."""

    # "file": until its list is read, the reference; then the list's addresses, in `listed` (the list's names
    # become "host" rules of their own, since the resolver handles each name)
    kind: Literal["zone", "cidr", "host", "file"]
    value: str
    proto: Proto = "any"
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; empty = every port
    origin: str = ""  # "file: allow[2]" so later messages can point back at the source
    listed_in: str = field(default="", compare=False)  # the list file an entry came from, for `remove:`
    listed: Listed | None = None  # a read list's addresses (kind "file")

    @cached_property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.value)

    @cached_property
    def span(self) -> tuple[int, int, int]:
        """(IP version, first address, last address) as integers: what the compiler works with, computed
        without ipaddress objects, which cost microseconds each on a list of 100,000 networks."""
        return cidr_span(self.value)

    @property
    def key(self) -> tuple[str, str, str, tuple[tuple[int, int], ...]]:
        """What the rule means, whatever file it came from: `remove:` matches on this."""
        return self.kind, self.value, self.proto, self.ports


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    description: str = ""
    command: tuple[str, ...] = ()
    network: Literal["none", "nat"] = "nat"
    default: Literal["allow", "deny"] = "deny"
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    ipv6: bool = True
    log: Literal["off", "denied", "all"] = "denied"
    sha256: str = ""
    files: tuple[str, ...] = field(default=(), compare=False)

    @property
    def host_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.allow + self.deny if r.kind == "host")


Reader = Callable[[Path], bytes]


def _read_plain(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------- lookup


def search_path(environ: Mapping[str, str], home: str) -> list[Path]:
    """$NSFW_PROFILE_PATH when set, else the user's config dir; then /etc, then the shipped profiles."""
    if environ.get("NSFW_PROFILE_PATH"):
        first = [Path(p) for p in environ["NSFW_PROFILE_PATH"].split(":") if p]
    else:
        config = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        first = [Path(config) / "nsfw" / "profiles"]
    return [*first, SYSTEM_DIR, SHIPPED_DIR]


def is_path(ref: str) -> bool:
    return "/" in ref or ref.endswith((".yaml", ".yml"))


def find(ref: str, dirs: Sequence[Path], *, after: Path | None = None, base: Path | None = None) -> Path | None:
    """Where a profile reference points. A path is taken as it is (relative to `base`, the including file's
    directory, when given). A NAME is the first NAME.yaml / NAME.yml along `dirs`, or, with `after`, along the
    directories after the one holding `after`: that is how a profile includes the namesake it overrides."""
    if is_path(ref):
        return base / ref if base is not None and not os.path.isabs(ref) else Path(ref)
    start = 0
    if after is not None:  # a file outside the search path (given by path) skips only itself
        here = after.resolve().parent
        start = next((i + 1 for i, d in enumerate(dirs) if d.resolve() == here), 0)
    for d in dirs[start:]:
        for ext in (".yaml", ".yml"):
            candidate = d / f"{ref}{ext}"
            if candidate.is_file() and (after is None or candidate.resolve() != after.resolve()):
                return candidate
    return None


def available(dirs: Sequence[Path]) -> list[str]:
    names: set[str] = set()
    for d in dirs:
        if d.is_dir():
            names.update(p.stem for p in d.iterdir() if p.suffix in (".yaml", ".yml"))
    return sorted(names)


# ---------------------------------------------------------------------------------------------- parsing


class _Collector:
    """Accumulates problems for one file, with line numbers looked up from the YAML node tree."""

    def __init__(self, file: str, lines: dict[tuple[Any, ...], int]) -> None:
        self.file, self.lines = file, lines
        self.errors: list[ProfileError] = []

    def add(self, path: tuple[Any, ...], problem: str, fix: str = "") -> None:
        key = _format_key(path)
        line = self.lines.get(path) or self.lines.get(tuple(p if isinstance(p, int) else str(p) for p in path))
        if line is None and path:
            line = self.lines.get(path[:1])
        if line is not None:
            key = f"{key} (line {line})" if key else f"line {line}"
        self.errors.append(ProfileError(self.file, key, problem, fix))


def _format_key(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# libyaml's parser when present (ten times faster on a profile of a hundred rules), the same safe constructor
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[misc]
    """YAML as profiles need it: no timestamps (`2024-02-30` in a command stays text, and cannot crash us)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


_CONSTRUCT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, yaml.YAMLError)


def _unconstructible_line(root: yaml.Node | None) -> int | None:
    """The line of the first scalar that YAML cannot turn into a value."""
    todo = [root] if root is not None else []
    seen: set[int] = set()
    while todo:
        node = todo.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                _Loader("").construct_object(node)
            except _CONSTRUCT_ERRORS:
                return int(node.start_mark.line) + 1
        elif isinstance(node, yaml.MappingNode):
            todo += [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value
    return None


def _node_lines(root: yaml.Node | None) -> tuple[dict[tuple[Any, ...], int], list[tuple[tuple[Any, ...], int]]]:
    """Line numbers by key path, and the keys given twice. Each node is walked once, so aliases can neither
    recurse forever nor blow up exponentially."""
    lines: dict[tuple[Any, ...], int] = {}
    duplicates: list[tuple[tuple[Any, ...], int]] = []
    seen: set[int] = set()
    todo: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())] if root is not None else []
    while todo:
        node, path = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    sub = (*path, k.value)
                    if k.value in keys:
                        duplicates.append((sub, k.start_mark.line + 1))
                    keys.add(k.value)
                    lines[sub] = k.start_mark.line + 1
                    todo.append((v, sub))
        elif isinstance(node, yaml.SequenceNode):
            todo += [(v, (*path, i)) for i, v in enumerate(node.value)]
    return lines, duplicates


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean '{close[0]}'?" if close else f"use one of: {', '.join(choices)}"


def parse_ports(value: Any, c: _Collector, path: tuple[Any, ...]) -> tuple[tuple[int, int], ...]:
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        c.add(path, "must be a list of ports", 'write e.g. ports: [443, "8000-8100"]')
        return ()
    out: list[tuple[int, int]] = []
    for i, item in enumerate(value):
        low = high = None
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str):
            m = _PORT_RANGE.match(item)
            if m:
                low, high = int(m[1]), int(m[2])
            elif _PORT.match(item):
                low = high = int(item)
        if low is None or high is None:
            c.add((*path, i), f"'{item}' is not a port", 'write a number 1-65535 or a range in quotes, "8000-8100"')
        elif not (1 <= low <= high <= 65535):
            c.add((*path, i), f"'{item}' is out of range",
                  "ports are 1-65535, and a range is LOW-HIGH with LOW <= HIGH")
        else:
            out.append((low, high))
    return tuple(sorted(set(out)))


def parse_domain(text: str) -> str | None:
    """A lower-case domain name of two labels or more (optionally '*.'-prefixed), or None if `text` is not one.
    One label is refused: it is far more often a misspelt zone (`intenret`) than a host of a search domain."""
    name = text.strip().lower().rstrip(".")
    wild = name.startswith("*.")
    labels = (name[2:] if wild else name).split(".")
    if len(labels) < 2 or len(name) > 253 or not all(_LABEL.match(lab) for lab in labels):
        return None
    if labels[-1].isdigit():  # 300.1.2.3 is a broken address, not a name
        return None
    return name


def parse_network(text: str, c: _Collector, path: tuple[Any, ...]) -> str | None:
    if "%" in text:
        c.add(path, f"'{text}' has a scope id", "rules name networks, not interfaces: drop the %... part")
        return None
    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        c.add(path, f"'{text}' is not an IP address or network", "write e.g. 192.0.2.0/24 or 2001:db8::/32")
        return None
    c.add(path, f"'{text}' has host bits set", f"did you mean {loose}?")
    return None


def _looks_like_address(text: str) -> bool:
    return ":" in text or "/" in text or text.replace(".", "").isdigit()


def parse_rule(item: Any, c: _Collector, path: tuple[Any, ...]) -> Rule | None:
    origin = f"{c.file}: {_format_key(path)}"
    if isinstance(item, str):
        text = item.strip()
        if text.lower() in ZONES:
            return Rule("zone", text.lower(), origin=origin)
        if _looks_like_address(text):
            net = parse_network(text, c, path)
            return Rule("cidr", net, origin=origin) if net else None
        domain = parse_domain(text)
        if domain:
            return Rule("host", domain, origin=origin)
        close = difflib.get_close_matches(text.lower(), ZONES, n=1)
        c.add(path, f"'{item}' is neither a zone, an address nor a domain name",
              f"did you mean '{close[0]}'?" if close else
              f"use {', '.join(ZONES)}, a CIDR such as 192.0.2.0/24, or a name such as example.org")
        return None
    if not isinstance(item, dict):
        c.add(path, "a rule must be a string or a mapping", "write e.g. '- internet' or '- {cidr: 192.0.2.0/24}'")
        return None
    ok = True
    for key in item:
        if key not in RULE_KEYS:
            c.add((*path, key), f"unknown key '{key}'", _suggest(str(key), RULE_KEYS))
            ok = False
    targets = [k for k in TARGET_KEYS if k in item]
    if len(targets) != 1:
        c.add(path, "a rule needs exactly one of zone:, cidr:, host:, file:",
              f"found {', '.join(targets) or 'none'}; split it into one rule per destination")
        return None
    kind = targets[0]
    raw = item[kind]
    value: str | None = None
    if not isinstance(raw, str):
        c.add((*path, kind), f"'{raw}' must be a string", "quote it")
    elif kind == "zone":
        value = raw.strip().lower()
        if value not in ZONES:
            c.add((*path, kind), f"unknown zone '{raw}'", _suggest(value, ZONES))
            value = None
    elif kind == "cidr":
        value = parse_network(raw, c, (*path, kind))
    elif kind == "file":
        value = raw.strip() or None
        if value is None:
            c.add((*path, kind), "names no file", "write the path of a list, relative to this profile")
    else:
        value = parse_domain(raw)
        if value is None:
            c.add((*path, kind), f"'{raw}' is not a domain name",
                  "write a name of two labels or more, e.g. example.org or *.example.org")
    proto: str = "any"
    if "proto" in item:
        p = item["proto"]
        if not isinstance(p, str) or p.lower() not in PROTOS:
            c.add((*path, "proto"), f"unknown protocol '{p}'", _suggest(str(p), PROTOS))
            ok = False
        else:
            proto = p.lower()
    ports: tuple[tuple[int, int], ...] = ()
    if "ports" in item:
        ports = parse_ports(item["ports"], c, (*path, "ports"))
        if proto == "icmp":
            c.add((*path, "ports"), "ICMP has no ports", "drop ports:, or use proto: tcp or udp")
            ok = False
    if value is None or not ok:
        return None
    return Rule(kind, value, proto, ports, origin)  # type: ignore[arg-type]


@dataclass
class _Raw:
    """One file's validated keys, before includes are merged."""

    path: Path
    data: bytes
    keys: dict[str, Any]
    includes: list[tuple[str, tuple[Any, ...], int]]  # name, key path, line
    lines: dict[tuple[Any, ...], int]


def parse_mapping(data: bytes, file: str) -> tuple[dict[str, Any] | None, list[ProfileError]]:
    """A YAML document that must be a mapping, with the same error reporting as profiles."""
    try:
        node = yaml.compose(data.decode("utf-8"), Loader=_Loader)
        doc = _Loader("").construct_document(node) if node is not None else {}
    except UnicodeDecodeError:
        return None, [ProfileError(file, "", "is not UTF-8 text", "save it as UTF-8")]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return None, [ProfileError(file, where, f"is not valid YAML: {getattr(e, 'problem', None) or e}",
                                   "check the indentation and quoting near that line")]
    except _CONSTRUCT_ERRORS as e:
        return None, [ProfileError(file, "", f"has a value YAML cannot convert: {e}", "write plain values")]
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        return None, [ProfileError(file, "", "must be a mapping of keys", "see man nsfw")]
    return doc, []


def suggest(word: str, choices: Sequence[str]) -> str:
    return _suggest(word, choices)


def parse_file(path: Path, data: bytes) -> tuple[_Raw | None, list[ProfileError]]:
    file = str(path)
    try:
        text = data.decode("utf-8")
        node = yaml.compose(text, Loader=_Loader)
        doc = _Loader("").construct_document(node) if node is not None else None
    except UnicodeDecodeError:
        return None, [ProfileError(file, "", "is not UTF-8 text", "save it as UTF-8")]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        return None, [ProfileError(file, where, f"is not valid YAML: {problem}",
                                   "check the indentation and quoting near that line")]
    except _CONSTRUCT_ERRORS as e:  # an explicit tag PyYAML cannot construct (`!!int llow`, `!!bool x`)
        line = _unconstructible_line(node)
        return None, [ProfileError(file, f"line {line}" if line else "", f"has a value YAML cannot convert: {e}",
                                   "remove the explicit !!tag and write a plain value")]
    lines, duplicates = _node_lines(node)
    c = _Collector(file, lines)
    for key_path, line in duplicates:
        c.errors.append(ProfileError(file, f"{_format_key(key_path)} (line {line})", "is given twice",
                                     "keep one of them: YAML would silently use the last"))
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        c.add((), "must be a mapping of keys such as network:, allow:, deny:", "see man nsfw-profile")
        return None, c.errors
    keys: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in TOP_KEYS:
            c.add((key,), f"unknown key '{key}'", _suggest(str(key), TOP_KEYS))
            continue
        parsed = _parse_top(str(key), value, c)
        if parsed is not _INVALID:
            keys[str(key)] = parsed
    includes: list[tuple[str, tuple[Any, ...], int]] = []
    for i, name in enumerate(keys.pop("include", [])):
        includes.append((name, ("include", i), lines.get(("include", i), lines.get(("include",), 0))))
    return _Raw(path, data, keys, includes, lines), c.errors


_INVALID = object()


def _parse_top(key: str, value: Any, c: _Collector) -> Any:
    path: tuple[Any, ...] = (key,)
    if key == "version":
        if type(value) is not int or value != 1:
            c.add(path, f"unsupported version '{value}'", "this nsfw reads version 1; remove the key or set it to 1")
            return _INVALID
        return value
    if key == "description":
        if not isinstance(value, str):
            c.add(path, "must be text", "quote it")
            return _INVALID
        return value
    if key == "include":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
            c.add(path, "must be a list of profile names", "write e.g. include: [browser-base]")
            return _INVALID
        return [x.strip() for x in items]
    if key == "command":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(x, (str, int)) for x in items):
            c.add(path, "must be a list: the program and its arguments", "write e.g. command: [firefox, --new-window]")
            return _INVALID
        return tuple(str(x) for x in items)
    if key in CHOICES:
        if key == "log" and value is False:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if not isinstance(value, str) or value.lower() not in CHOICES[key]:
            c.add(path, f"'{value}' is not allowed here", _suggest(str(value), CHOICES[key]))
            return _INVALID
        return value.lower()
    if key == "remove":
        if not isinstance(value, dict) or not set(value) <= {"allow", "deny"}:
            c.add(path, "must be a mapping with allow: and/or deny: lists",
                  "write e.g. remove: {allow: [{zone: host, ports: [631], proto: tcp}]}")
            return _INVALID
        out: dict[str, list[tuple[Rule, tuple[Any, ...]]]] = {}
        for which, items in value.items():
            if not isinstance(items, list):
                c.add((*path, which), "must be a list of rules", "write the rules as they are written where included")
                return _INVALID
            parsed = [(parse_rule(item, c, (key, which, i)), (key, which, i)) for i, item in enumerate(items)]
            out[which] = [(r, p) for r, p in parsed if r is not None]
        return out
    if key == "ipv6":
        if not isinstance(value, bool):
            c.add(path, f"'{value}' is not true or false", "write ipv6: true or ipv6: false")
            return _INVALID
        return value
    # allow / deny
    if value is None:
        return []
    if not isinstance(value, list):
        c.add(path, "must be a list of rules", f"write each rule on its own line under {key}:, starting with '- '")
        return _INVALID
    rules = [parse_rule(item, c, (key, i)) for i, item in enumerate(value)]
    if key == "deny":
        for i, rule in enumerate(rules):
            if rule is not None and rule.kind == "host" and (rule.ports or rule.proto != "any"):
                c.add((key, i), f"a denied name ('{rule.value}') is refused whole, so ports: and proto: mean "
                      "nothing here", "drop them, or deny the name's addresses by cidr: with ports")
                rules[i] = None
    return [r for r in rules if r is not None]


# ---------------------------------------------------------------------------------------------- loading


def load(ref: str, dirs: Sequence[Path], read: Reader = _read_plain) -> Profile:
    """Find, read (through `read`, which applies the invoking user's permissions), merge and validate a profile."""
    path = find(ref, dirs)
    if path is None:
        names = available(dirs)
        hint = f"available: {', '.join(names)}" if names else "none are installed"
        raise ProfileErrors([ProfileError(ref, "", "no such profile in " + ":".join(map(str, dirs)),
                                          f"give a path, or create {dirs[0]}/{ref}.yaml; {hint}")])
    errors: list[ProfileError] = []
    merged = _load_tree(path, dirs, read, [], errors)
    if errors or merged is None:
        raise ProfileErrors(errors)
    keys, files, digest = merged
    name = path.stem
    return Profile(
        name=name,
        path=str(path),
        description=keys.get("description", ""),
        command=tuple(keys.get("command", ())),
        network=keys.get("network", DEFAULTS["network"]),
        default=keys.get("default", DEFAULTS["default"]),
        allow=tuple(keys.get("allow", ())),
        deny=tuple(keys.get("deny", ())),
        ipv6=keys.get("ipv6", DEFAULTS["ipv6"]),
        log=keys.get("log", DEFAULTS["log"]),
        sha256=digest.hexdigest(),
        files=tuple(files),
    )


def _load_tree(path: Path, dirs: Sequence[Path], read: Reader, stack: list[Path],
               errors: list[ProfileError]) -> tuple[dict[str, Any], list[str], Any] | None:
    try:
        data = read(path)
    except FileNotFoundError:
        errors.append(ProfileError(str(path), "", "does not exist", "check the path or the profile's name"))
        return None
    except PermissionError:
        errors.append(ProfileError(str(path), "", "cannot be read by you",
                                   "make it readable to the user running the application (chmod or chown)"))
        return None
    except IsADirectoryError:
        errors.append(ProfileError(str(path), "", "is a directory", "name a .yaml file"))
        return None
    except OSError as e:
        if e.errno == errno.EFBIG:
            errors.append(ProfileError(str(path), "", "is too large (or endless) for a profile",
                                       "name the profile's YAML file; long lists go in files of their own"))
        else:
            errors.append(ProfileError(str(path), "", f"cannot be read: {e.strerror or e}", "check the file"))
        return None
    raw, problems = parse_file(path, data)
    errors.extend(problems)
    if raw is None:
        return None
    digest = hashlib.sha256()
    for which in ("allow", "deny"):
        if any(r.kind == "file" for r in raw.keys.get(which, ())):
            raw.keys[which] = _expand_lists(raw.keys[which], path, which, read, errors, digest)
    keys: dict[str, Any] = {}
    files: list[str] = []
    for name, key_path, line in raw.includes:
        where = f"{_format_key(key_path)} (line {line})"
        if len(stack) + 1 > MAX_INCLUDE_DEPTH:
            errors.append(ProfileError(str(path), where, f"includes nest deeper than {MAX_INCLUDE_DEPTH}",
                                       "flatten the chain of includes"))
            continue
        own_name = name == path.stem and not is_path(name)
        target = find(name, dirs, after=path if own_name else None, base=path.parent)
        if target is None or (is_path(name) and not target.exists()):
            looked = f"{target}" if target is not None else ":".join(map(str, dirs))
            errors.append(ProfileError(str(path), where, f"includes '{name}', which was not found",
                                       f"create it or fix the name; looked in {looked}"))
            continue
        chain = [*stack, path]
        if any(target.resolve() == p.resolve() for p in chain):
            cycle = " -> ".join(p.stem for p in chain) + f" -> {target.stem}"
            errors.append(ProfileError(str(path), where, f"include cycle: {cycle}", "remove one of the includes"))
            continue
        sub = _load_tree(target, dirs, read, chain, errors)
        if sub is None:
            continue
        sub_keys, sub_files, sub_digest = sub
        keys = _merge(keys, sub_keys)
        files += sub_files
        digest.update(sub_digest.digest())
    for which, removals in raw.keys.pop("remove", {}).items():
        inherited: list[Rule] = keys.get(which, [])
        for rule, key_path in removals:
            if rule.kind == "file":  # a list goes whole: every entry that came from it
                name = os.path.basename(rule.value)
                kept = [r for r in inherited if os.path.basename(r.listed_in) != name or not r.listed_in]
                found = len(kept) != len(inherited)
            else:
                kept = [r for r in inherited if r.key != rule.key]
                found = len(kept) != len(inherited)
                if rule.kind == "cidr":  # and the same entry in an included list, as if it were a rule of its own
                    kept, in_list = _unlist(kept, rule)
                    found = found or in_list
            if not found:
                have = "; ".join(describe(r) for r in inherited) or "nothing"
                errors.append(ProfileError(str(path), f"{_format_key(key_path)} (line {raw.lines.get(key_path, '?')})",
                                           f"removes a rule that no included profile has in {which}:",
                                           f"the included profiles' {which}: rules are: {have}"))
            inherited = kept
        keys[which] = inherited
    keys = _merge(keys, raw.keys)
    digest.update(raw.data)
    return keys, [*files, str(path)], digest


def _unlist(rules: list[Rule], rule: Rule) -> tuple[list[Rule], bool]:
    """`rules` with the cidr `rule` taken out of every list of the same protocol and ports; whether it was in one."""
    version, lo, hi = rule.span
    out: list[Rule] = []
    found = False
    for r in rules:
        if r.kind == "file" and r.listed is not None and (r.proto, r.ports) == (rule.proto, rule.ports):
            less = r.listed.without(version, lo, hi)
            if len(less) != len(r.listed):
                found = True
                r = replace(r, listed=less)
        out.append(r)
    return out, found


def _expand_lists(rules: list[Rule], profile: Path, which: str, read: Reader, errors: list[ProfileError],
                  digest: Any) -> list[Rule]:
    """Replace each `file:` rule by the entries of the list it names: one address, network or domain name a
    line, `#` starting a comment; the rule's ports and proto apply to every entry. The list is read like the
    profile (with the invoking user's permissions), and counts in the profile's hash."""
    out: list[Rule] = []
    for rule in rules:
        if rule.kind != "file":
            out.append(rule)
            continue
        target = Path(rule.value) if os.path.isabs(rule.value) else profile.parent / rule.value
        try:
            data = read(target)
        except OSError as e:
            errors.append(ProfileError(rule.origin.split(": ")[0], rule.origin.split(": ", 1)[-1],
                                       f"names the list {target}, which cannot be read: {e.strerror or e}",
                                       "check the path (relative to the profile) and its permissions"))
            continue
        if len(data) > MAX_LIST_BYTES:
            errors.append(ProfileError(str(target), "", f"is larger than {MAX_LIST_BYTES >> 20} MiB", "split it"))
            continue
        digest.update(data)
        out += parse_list(data, str(target), rule, errors, deny=which == "deny")
    return out


def cidr_span(text: str) -> tuple[int, int, int]:
    """A normalized address or network (no host bits) as (version, first, last)."""
    addr, _, length = text.partition("/")
    family, bits, version = (socket.AF_INET6, 128, 6) if ":" in addr else (socket.AF_INET, 32, 4)
    lo = int.from_bytes(socket.inet_pton(family, addr), "big")
    return version, lo, lo | ((1 << (bits - (int(length) if length else bits))) - 1)


# Prefix lengths as a list writes them ("/24"): a dict lookup is stricter than int(), which takes " 24", "+24",
# "2_4" and non-ASCII digits; anything else ("/024", a netmask) goes the slow way, through ipaddress.
_LENGTHS = {4: {str(n): n for n in range(33)}, 6: {str(n): n for n in range(129)}}
_HOSTMASKS = {v: tuple((1 << (bits - n)) - 1 for n in range(bits + 1)) for v, bits in BITS.items()}
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def list_entry(entry: str) -> tuple[int, int, int] | None:
    """A list line's address or network as (version, first, last), host bits cleared; None if it is neither.
    inet_pton and a table of prefix lengths take the usual spellings; ipaddress the rest (netmasks, /024)."""
    addr, slash, length = entry.partition("/")
    version = 6 if ":" in addr else 4
    try:
        value = int.from_bytes(socket.inet_pton(_FAMILIES[version], addr), "big")
        hostmask = _HOSTMASKS[version][_LENGTHS[version][length] if slash else BITS[version]]
    except (OSError, ValueError, KeyError):
        if "%" in entry:  # a scope id names an interface, not a network
            return None
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return None
        return net.version, int(net.network_address), int(net.broadcast_address)
    return version, value & ~hostmask, value | hostmask


def parse_list(data: bytes, file: str, rule: Rule, errors: list[ProfileError], deny: bool = False) -> list[Rule]:
    """A list file's entries: its addresses and networks as one "file" rule (Listed), each name as a host rule.
    Bad lines are errors naming the file and the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        errors.append(ProfileError(file, "", "is not UTF-8 text", "save it as UTF-8"))
        return []
    packed: dict[int, list[int]] = {4: [], 6: []}
    v4 = packed[4]
    names: list[Rule] = []
    bad = 0
    comments = "#" in text
    # The usual line, an IPv4 address or network, is taken inline (a hundred thousand of them are the point):
    # a function call per line would cost a third of the time.
    pton, af4, from_bytes, lengths, hostmasks = socket.inet_pton, socket.AF_INET, int.from_bytes, _LENGTHS[4], \
        _HOSTMASKS[4]
    for number, line in enumerate(text.splitlines(), 1):
        entry = (line.split("#", 1)[0] if comments else line).strip()
        if not entry:
            continue
        addr, slash, length = entry.partition("/")
        try:
            hostmask = hostmasks[lengths[length] if slash else 32]
            value = from_bytes(pton(af4, addr), "big")
        except (OSError, ValueError, KeyError):
            pass
        else:
            v4.append((value & ~hostmask) << 32 | value | hostmask)
            continue
        if _looks_like_address(entry):
            span = list_entry(entry)
            if span:
                version, lo, hi = span
                packed[version].append(lo << BITS[version] | hi)
                continue
        else:
            name = parse_domain(entry)
            if name and not (deny and (rule.ports or rule.proto != "any")):
                names.append(Rule("host", name, rule.proto, rule.ports, f"{file}: line {number}", file))
                continue
        bad += 1
        if bad <= 20:  # a broken list says so, without a million lines of it
            errors.append(ProfileError(file, f"line {number}", f"'{entry}' is neither an address, a network "
                                       "nor a domain name", "fix or remove the line, or comment it out with #"))
    if bad > 20:
        errors.append(ProfileError(file, "", f"{bad - 20} more bad lines", "fix the list"))
    if not (packed[4] or packed[6]):
        return names
    listed = Listed(tuple(packed[4]), tuple(packed[6]))
    return [Rule("file", rule.value, rule.proto, rule.ports, rule.origin, file, listed), *names]


def describe(rule: Rule) -> str:
    """A rule as a profile would write it, for messages and `nsfw rules`."""
    parts = [f"{rule.kind}: {rule.value}"]
    if rule.ports:
        parts.append("ports: [" + ", ".join(str(a) if a == b else f'"{a}-{b}"' for a, b in rule.ports) + "]")
    if rule.proto != "any":
        parts.append(f"proto: {rule.proto}")
    return "{" + ", ".join(parts) + "}"


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = [*out.get(key, []), *value] if key in ("allow", "deny") else value
    return out


def check(refs: Sequence[str], dirs: Sequence[Path], read: Reader = _read_plain) -> list[ProfileError]:
    """Every problem of every profile named, for `nsfw check`."""
    problems: list[ProfileError] = []
    for ref in refs:
        try:
            load(ref, dirs, read)
        except ProfileErrors as e:
            problems += e.errors
    return problems
