"""Desktop entries (.desktop files): parse and rewrite them per the Desktop Entry Specification. Pure: text in,
text out; finding, reading and writing the files is desktop_store.py's job.

The rewrite keeps every line it does not have to change, byte for byte, so translations, comments, unknown keys
and the author's layout survive. Only three things change: each Exec line (main entry and actions) gets nsfw's
launcher put in front of it, DBusActivatable=true becomes false, and keys recording the wrap are added.

Why prefixing is safe: the launcher's own arguments come first and end with `--`, each one a complete quoted
token, so however a launcher tokenizes the line (the spec's rules, or GLib's and KDE's shell-like ones), the
original's text starts after our `--`: nothing in it can become an option of nsfw, and its field codes and
quoting reach the desktop environment exactly as they were.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import NsfwError

MAIN_GROUP = "Desktop Entry"
ACTION_PREFIX = "Desktop Action "

# Keys that record the wrap. X- keys are the spec's extension space: every consumer ignores what it does not know.
KEY_ORIGINAL = "X-Nsfw-Original"
KEY_SHA256 = "X-Nsfw-Original-SHA256"
KEY_PROFILE = "X-Nsfw-Profile"
KEY_VERSION = "X-Nsfw-Wrap-Version"
WRAP_VERSION = "1"
HEADER = ("# Written by `nsfw desktop wrap`: it starts this application inside its nsfw sandbox.\n"
          "# `nsfw desktop unwrap ID` removes it; `nsfw desktop sync` renews it when the original changes.\n")

# Reserved characters of the Exec key: an argument holding one must be quoted.
_EXEC_RESERVED = frozenset(" \t\n\"'\\><~|&;$*?#()`")
# Inside double quotes these take a backslash.
_EXEC_QUOTE_ESCAPED = frozenset('"`$\\')
_STRING_ESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_KEY = re.compile(r"^([A-Za-z0-9-]+)(?:\[([^\]\s]+)\])?[ \t]*=[ \t]*(.*?)(\r?\n)?\Z", re.DOTALL)
_GROUP = re.compile(r"^\[([^\[\]\x00-\x1f\x7f]+)\]\s*(\r?\n)?$")
FIELD_CODES = frozenset("fFuUdDnNickvm%")
_DEPRECATED = frozenset(("%d", "%D", "%n", "%N", "%v", "%m"))


class DesktopError(NsfwError):
    """A desktop entry that cannot be read, or cannot be wrapped; the message says which and why."""


# ---------------------------------------------------------------------------------------------- string values


def unescape(raw: str) -> str:
    r"""A string value as the spec means it: \s \n \t \r \\ undone. Other backslashes stay as they are (the
    Exec key gives them a meaning of its own, after this step)."""
    out, i = [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] in _STRING_ESCAPES:
            out.append(_STRING_ESCAPES[raw[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def escape(value: str) -> str:
    r"""The inverse of unescape(): what to write in the file so that readers get `value` back."""
    return (value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r"))


# ---------------------------------------------------------------------------------------------- Exec


@dataclass(frozen=True)
class Arg:
    """One argument of an Exec value, quoting undone. `quoted`: it was written in double quotes, where field
    codes have no defined meaning (the spec), so they are left alone."""

    text: str
    quoted: bool = False


def split_exec(command: str) -> list[Arg]:
    """Split an (already unescaped) Exec value into arguments by the spec's quoting rules.

    Raises DesktopError for a quote left open or a backslash at the end. Reserved characters outside quotes
    are invalid by the spec but common in the wild; they are kept literally, as GLib and KDE do.
    """
    args: list[Arg] = []
    cur: list[str] = []
    in_word = quoted = in_quote = False
    i = 0
    while i < len(command):
        ch = command[i]
        if in_quote:
            if ch == "\\" and i + 1 < len(command) and command[i + 1] in _EXEC_QUOTE_ESCAPED:
                cur.append(command[i + 1])
                i += 2
                continue
            if ch == '"':
                in_quote = False
            else:
                cur.append(ch)
        elif ch in " \t\n":
            if in_word:
                args.append(Arg("".join(cur), quoted))
                cur, in_word, quoted = [], False, False
        elif ch == '"':
            in_quote = in_word = quoted = True
        else:
            cur.append(ch)
            in_word = True
        i += 1
    if in_quote:
        raise DesktopError(f"Exec={command!r}: a double quote is never closed")
    if in_word:
        args.append(Arg("".join(cur), quoted))
    return args


def quote_arg(text: str) -> str:
    """One argument as an Exec value needs it: double-quoted when it holds a reserved character, and with every
    `%` doubled (a lone `%` would start a field code)."""
    text = text.replace("%", "%%")
    if text and not _EXEC_RESERVED.intersection(text):
        return text
    return '"' + "".join("\\" + ch if ch in _EXEC_QUOTE_ESCAPED else ch for ch in text) + '"'


def join_exec(args: Sequence[str]) -> str:
    """Literal arguments (no field codes) as an Exec value, before string escaping."""
    return " ".join(quote_arg(a) for a in args)


@dataclass(frozen=True)
class Launch:
    """What a desktop environment knows when it starts an entry: the files or URLs, the icon, the name, where
    the entry's file is."""

    files: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    icon: str = ""
    name: str = ""
    location: str = ""


def expand(args: Sequence[Arg], launch: Launch) -> list[str]:
    """The argv a desktop environment runs for these Exec arguments (the spec's field codes).

    %f/%u take the first file/URL, %F/%U all of them (and, as whole arguments, vanish when there are none);
    %i becomes `--icon ICON` when there is an icon; %c the name, %k the location; %% a percent sign; the
    deprecated %d %D %n %N %v %m are removed.
    """
    files = list(launch.files) or list(launch.urls)
    urls = list(launch.urls) or list(launch.files)
    argv: list[str] = []
    for arg in args:
        if "%" not in arg.text:
            argv.append(arg.text)
            continue
        # Inside quotes the spec leaves field codes undefined; GLib and KDE expand them in place, so do we
        # (it is how a literal `%%` in a quoted argument becomes one `%`).
        whole = {"%F": files, "%U": urls, "%i": ["--icon", launch.icon] if launch.icon else []}
        if arg.text in whole and not arg.quoted:
            argv.extend(whole[arg.text])
            continue
        if not arg.quoted and (arg.text in _DEPRECATED or (arg.text in ("%f", "%u") and not
                                                           (files if arg.text == "%f" else urls))):
            continue  # an argument that is only a field code with nothing to give is left out, not left empty
        out, i, text = [], 0, arg.text
        while i < len(text):
            if text[i] == "%" and i + 1 < len(text):
                code = text[i + 1]
                out.append({"f": files[0] if files else "", "u": urls[0] if urls else "",
                            "F": " ".join(files), "U": " ".join(urls), "c": launch.name, "k": launch.location,
                            "i": launch.icon, "%": "%"}.get(code, "" if code in FIELD_CODES else "%" + code))
                i += 2
            else:
                out.append(text[i])
                i += 1
        argv.append("".join(out))
    return argv


# ---------------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class Line:
    """One line of the file. Groups and keys are parsed; comments, blank and unparsable lines are kept as text."""

    text: str  # with its line ending
    group: str | None  # the group this line is in (a group header: its own name); None before the first
    key: str | None = None
    locale: str | None = None
    value: str = ""  # raw: string escapes not undone
    header: bool = False


class DesktopEntry:
    """A desktop entry file as a list of lines, so that rendering it back gives the same bytes."""

    def __init__(self, text: str, source: str = "<desktop entry>") -> None:
        self.source = source
        self.lines: list[Line] = []
        group: str | None = None
        for number, raw in enumerate(text.splitlines(keepends=True), 1):
            if "\x00" in raw:
                raise DesktopError(f"{source}:{number}: a NUL byte: this is not a desktop entry")
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                self.lines.append(Line(raw, group))
                continue
            m = _GROUP.match(raw)
            if m:
                group = m.group(1)
                self.lines.append(Line(raw, group, header=True))
                continue
            m = _KEY.match(raw)
            if m and group is not None:
                self.lines.append(Line(raw, group, m.group(1), m.group(2), m.group(3)))
                continue
            raise DesktopError(f"{source}:{number}: neither a [group], a Key=value nor a comment: {stripped[:60]!r}")
        if self.groups()[:1] != [MAIN_GROUP]:
            raise DesktopError(f"{source}: the first group must be [{MAIN_GROUP}]")

    def render(self) -> str:
        return "".join(line.text for line in self.lines)

    def groups(self) -> list[str]:
        return [line.group for line in self.lines if line.header and line.group is not None]

    def get(self, group: str, key: str, locale: str | None = None) -> str | None:
        """The raw value of the first such key in the group, or None."""
        for line in self.lines:
            if line.group == group and line.key == key and line.locale == locale:
                return line.value
        return None

    def value(self, group: str, key: str) -> str | None:
        """The unescaped value of an unlocalized key."""
        raw = self.get(group, key)
        return None if raw is None else unescape(raw)


def _newline(entry: DesktopEntry) -> str:
    return "\r\n" if any(line.text.endswith("\r\n") for line in entry.lines) else "\n"


def _is_true(raw: str | None) -> bool:
    return raw is not None and raw.strip() == "true"


@dataclass(frozen=True)
class WrapInfo:
    """What a wrapped entry records about where it came from."""

    original: str
    sha256: str
    profile: str | None


def wrap_info(entry: DesktopEntry) -> WrapInfo | None:
    """The record of a wrap, or None when nsfw did not write this entry."""
    original = entry.value(MAIN_GROUP, KEY_ORIGINAL)
    if original is None:
        return None
    return WrapInfo(original, (entry.value(MAIN_GROUP, KEY_SHA256) or "").strip(),
                    entry.value(MAIN_GROUP, KEY_PROFILE) or None)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_profile_ref(profile: str) -> None:
    """A profile given to wrap goes into the launcher's argv; one that looks like an option, or holds a line
    break or a NUL, is refused here rather than half-understood later."""
    if not profile or profile.startswith("-") or any(c in profile for c in "\x00\n\r"):
        raise DesktopError(f"--profile {profile!r}: not a profile name or path (give NAME or a path to a .yaml)")


def launcher_args(launcher: str, profile: str | None) -> list[str]:
    """What goes before the original command line: the launcher, its options, and the `--` that ends them."""
    if not launcher.startswith("/"):
        raise DesktopError(f"the launcher must be an absolute path, not {launcher!r}")
    if profile is not None:
        check_profile_ref(profile)
        return [launcher, "--profile", profile, "--"]
    return [launcher, "--"]


def wrap(original: str, *, source: str, digest: str, launcher: str, profile: str | None) -> str:
    """The wrapped copy of an original entry's text.

    source: the original's path, recorded; digest: the sha256 of its bytes, recorded so that `list` and `sync`
    can tell when it changed; launcher: the absolute path of nsfw-launch; profile: recorded and passed on (None:
    nsfw picks the profile from the command, as `nsfw run` does).
    """
    entry = DesktopEntry(original, source)
    if wrap_info(entry) is not None:
        raise DesktopError(f"{source}: already written by nsfw (it has {KEY_ORIGINAL}): wrap the original instead")
    if _is_true(entry.get(MAIN_GROUP, "Hidden")):
        raise DesktopError(f"{source}: Hidden=true: the entry counts as deleted, so there is nothing to wrap")
    kind = entry.value(MAIN_GROUP, "Type")
    if kind is not None and kind.strip() != "Application":
        raise DesktopError(f"{source}: Type={kind.strip()}, not an application: there is nothing to start")
    prefix = escape(join_exec(launcher_args(launcher, profile)))
    nl = _newline(entry)

    groups = entry.groups()
    actions = [g for g in groups if g.startswith(ACTION_PREFIX)]
    has_exec = {g for g in groups if entry.get(g, "Exec") is not None}
    if MAIN_GROUP not in has_exec:
        why = " (it starts only through D-Bus activation, which would bypass nsfw)" \
            if _is_true(entry.get(MAIN_GROUP, "DBusActivatable")) else ""
        raise DesktopError(f"{source}: no Exec line to wrap{why}")
    # An action without Exec can only be started by D-Bus activation, which the wrap turns off: it would be a
    # way around the sandbox, so it goes, along with its mention in Actions=.
    dropped = {g for g in actions if g not in has_exec}

    out: list[str] = [HEADER.replace("\n", nl)]
    last_main = max(i for i, line in enumerate(entry.lines) if line.group == MAIN_GROUP and not line.text.isspace()
                    and (line.key is not None or line.header))
    for i, line in enumerate(entry.lines):
        if line.group in dropped:
            continue
        text = line.text
        end = text[len(text.rstrip("\r\n")):] or nl
        if line.key == "Exec" and (line.group == MAIN_GROUP or line.group in actions):
            _check_exec(line.value, source)
            text = f"{line.key}{_locale(line)}={prefix} {line.value.lstrip()}{end}"
        elif line.key == "DBusActivatable" and line.group == MAIN_GROUP and line.locale is None:
            text = f"DBusActivatable=false{end}"
        elif line.key == "Actions" and line.group == MAIN_GROUP and dropped:
            kept = [a for a in line.value.split(";") if a and ACTION_PREFIX + a not in dropped]
            text = f"Actions={''.join(a + ';' for a in kept)}{end}"
        elif line.key is not None and line.key.startswith("X-Nsfw-") and line.group == MAIN_GROUP:
            continue  # the original cannot pre-empt the record of the wrap
        if not text.endswith(("\n", "\r")):
            text += nl
        out.append(text)
        if i == last_main:
            out.append(f"{KEY_ORIGINAL}={escape(source)}{nl}{KEY_SHA256}={digest}{nl}"
                       f"{KEY_PROFILE}={escape(profile or '')}{nl}{KEY_VERSION}={WRAP_VERSION}{nl}")
    return "".join(out)


def _locale(line: Line) -> str:
    return f"[{line.locale}]" if line.locale else ""


def _check_exec(raw: str, source: str) -> None:
    try:
        args = split_exec(unescape(raw))
    except DesktopError as e:
        raise DesktopError(f"{source}: {e}: fix the original entry first") from None
    if not args:
        raise DesktopError(f"{source}: an empty Exec line: there is nothing to start")


def original_args(wrapped: DesktopEntry, group: str = MAIN_GROUP) -> list[Arg]:
    """The original command line of a wrapped entry's Exec: what follows the launcher's `--`."""
    raw = wrapped.get(group, "Exec")
    if raw is None:
        raise DesktopError(f"{wrapped.source}: no Exec line in [{group}]")
    args = split_exec(unescape(raw))
    ends = [i for i, a in enumerate(args) if a.text == "--" and not a.quoted]
    if not ends:
        raise DesktopError(f"{wrapped.source}: [{group}] Exec does not go through nsfw's launcher")
    return args[ends[0] + 1:]
