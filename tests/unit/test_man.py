"""The man pages and shell completion, against the CLI they describe.

nsfw.1 must document every command and option the CLI has: the tests walk click's command tree (the desktop
group's subcommands included), so a new command or option fails here until the page has it. Every page in man/
must pass mandoc's linter and groff's warnings, and render with man -l. The completion scripts in completion/ must
be what click (Debian's, which the product runs on) generates for this CLI; NSFW_UPDATE_GOLDEN=1 rewrites them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from nsfw import __version__
from nsfw import cli as cli_mod
from nsfw import profile as profiles
from nsfw.cli import cli

ROOT = Path(__file__).resolve().parents[2]
MAN1 = ROOT / "man" / "nsfw.1"
MAN5 = ROOT / "man" / "nsfw-profile.5"
PAGES = tuple(sorted((ROOT / "man").glob("*.[1-8]")))
NSFW = ROOT / "bin" / "nsfw"
PYTHON = "/usr/bin/python3"  # the product's interpreter, and so the click that generates its completion
COMPLETION = ROOT / "completion"
SCRIPTS = {"bash": COMPLETION / "nsfw.bash", "zsh": COMPLETION / "nsfw.zsh", "fish": COMPLETION / "nsfw.fish"}
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# click 8.1.3 (Debian 12) ends its zsh script with a bare compdef, so a script autoloaded from $fpath (where
# packages install it, as _nsfw) completes nothing on the first TAB. click 8.1.4 fixed it with this ending;
# ours is click's script with that fix, until Debian's click has it.
ZSH_OLD_END = "\ncompdef _nsfw_completion nsfw;\n"
ZSH_FIXED_END = """
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    # autoload from fpath, call function directly
    _nsfw_completion "$@"
else
    # eval/source/. command, register function for later
    compdef _nsfw_completion nsfw
fi
"""


# ---------------------------------------------------------------------------------------------- the CLI


def _commands(cmd: click.Command = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands())
SUBCOMMANDS = sorted(p for p in COMMANDS if p)


def _id(path: tuple[str, ...]) -> str:
    return " ".join(path)


def _help_names(path: tuple[str, ...]) -> list[str]:
    """The help option's names as the command has them at run time (a subcommand's context inherits them)."""
    ctx = click.Context(cli, info_name="nsfw")
    for i, name in enumerate(path):
        ctx = click.Context(COMMANDS[path[:i + 1]], parent=ctx, info_name=name)
    option = ctx.command.get_help_option(ctx)
    return [*option.opts, *option.secondary_opts] if option is not None else []


# ---------------------------------------------------------------------------------------------- the pages

_ESCAPES = [(re.compile(r"\\f(\[[^]]*\]|\(..|.)"), ""), (re.compile(r"\\\(dq"), '"'), (re.compile(r"\\\(aq"), "'"),
            (re.compile(r"\\\(bu"), "*"), (re.compile(r"\\&"), ""), (re.compile(r"\\-"), "-"),
            (re.compile(r"\\e"), "\\\\")]
_ARG = re.compile(r'"([^"]*)"|(\S+)')
_FONT_MACROS = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB"}


def _plain(text: str) -> str:
    for rx, sub in _ESCAPES:
        text = rx.sub(sub, text)
    return text


def _sections(page: Path) -> dict[str, str]:
    """The page as {header: plain text of its body}, for .SH and .SS headers alike (a .SS is also part of
    the .SH it is in)."""
    out: dict[str, list[str]] = {}
    sh = ss = None
    for raw in page.read_text().splitlines():
        if raw.startswith(('.\\"', "'\\\"")):
            continue
        if raw.startswith("."):
            name, _, rest = raw[1:].partition(" ")
            args = [m.group(1) if m.group(1) is not None else m.group(2) for m in _ARG.finditer(rest)]
            # .B and .I set their words apart; .BR, .IR and the like alternate fonts, with nothing between
            words = _plain((" " if len(name) == 1 or name in ("SH", "SS") else "").join(args))
            if name == "SH":
                sh, ss = words, None
                out[sh] = []
                continue
            if name == "SS":
                ss = words
                out[ss] = []
                continue
            if name not in _FONT_MACROS and name not in ("IP", "TP"):
                continue
            line = words
        else:
            line = _plain(raw)
        for header in (sh, ss):
            if header is not None:
                out[header].append(line)
    return {h: "\n".join(lines) for h, lines in out.items()}


def _command_of(header: str) -> tuple[str, ...] | None:
    """("desktop", "wrap") for the header "nsfw desktop wrap [-p NAME|PATH] [--system] APP...", else None."""
    words = header.split()
    if not words or words[0] != "nsfw":
        return None
    path = []
    for word in words[1:]:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
            break
        path.append(word)
    return tuple(path)


MAN1_SECTIONS = _sections(MAN1)
COMMAND_SECTIONS = {_command_of(h): body for h, body in MAN1_SECTIONS.items() if _command_of(h)}
COMMAND_HEADERS = {_command_of(h): h for h in MAN1_SECTIONS if _command_of(h)}


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# ---------------------------------------------------------------------------------------------- nsfw.1 vs CLI


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=_id)
def test_every_command_has_its_section(path: tuple[str, ...]) -> None:
    assert path in COMMAND_SECTIONS, f"man/nsfw.1 has no `.SS nsfw {_id(path)} ...` section under COMMANDS"


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=_id)
def test_every_command_is_in_the_synopsis(path: tuple[str, ...]) -> None:
    if isinstance(COMMANDS[path], click.Group):
        return  # a group is in the synopsis through its subcommands
    synopsis = MAN1_SECTIONS["SYNOPSIS"]
    assert re.search(rf"^nsfw {re.escape(_id(path))}(?![\w-])", synopsis, re.M), \
        f"man/nsfw.1's SYNOPSIS has no line for `nsfw {_id(path)}`"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: _id(p) or "nsfw")
def test_every_option_is_documented(path: tuple[str, ...]) -> None:
    cmd = COMMANDS[path]
    where = MAN1_SECTIONS["OPTIONS"] if not path else COMMAND_SECTIONS.get(path)
    if where is None:
        pytest.skip("no section for this command (test_every_command_has_its_section says so)")
    missing = []
    for param in cmd.params:
        if not isinstance(param, click.Option):
            continue
        for name in [*param.opts, *param.secondary_opts]:
            if not _mentions(where, name):
                missing.append(name)
        if not param.is_flag and param.metavar and param.metavar not in where:
            missing.append(f"{param.opts[-1]} {param.metavar}")
    assert not missing, f"man/nsfw.1 does not document {', '.join(missing)} of `nsfw {_id(path)}`"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: _id(p) or "nsfw")
def test_help_option_is_documented(path: tuple[str, ...]) -> None:
    names = _help_names(path)
    assert names, f"`nsfw {_id(path)}` has no help option"
    missing = [n for n in names if not _mentions(MAN1_SECTIONS["OPTIONS"], n)]
    assert not missing, f"man/nsfw.1's OPTIONS does not document {', '.join(missing)}"


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=_id)
def test_arguments_are_in_the_header(path: tuple[str, ...]) -> None:
    header = COMMAND_HEADERS.get(path)
    if header is None:
        pytest.skip("no section for this command (test_every_command_has_its_section says so)")
    for param in COMMANDS[path].params:
        if isinstance(param, click.Argument):
            name = (param.metavar or (param.name or "").upper()).strip("[]").removesuffix("...")
            assert name in header, f"man/nsfw.1: `{header}` does not name the argument {name}"


def test_no_section_for_a_command_that_does_not_exist() -> None:
    stale = [h for p, h in COMMAND_HEADERS.items() if p not in COMMANDS]
    assert not stale, f"man/nsfw.1 documents commands the CLI does not have: {stale}"


def test_run_exit_statuses() -> None:
    text = MAN1_SECTIONS["EXIT STATUS"]
    for status in (str(cli_mod.RUN_FAILED), "126", "127", "128+N"):
        assert _mentions(text, status), f"man/nsfw.1's EXIT STATUS does not say what {status} means"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_version_in_title(page: Path) -> None:
    th = next(line for line in page.read_text().splitlines() if line.startswith(".TH "))
    assert f'"nsfw {__version__}"' in th, f"{page.name}: .TH should say nsfw {__version__}: {th}"


# ---------------------------------------------------------------------------------------------- nsfw-profile.5

MAN5_SECTIONS = _sections(MAN5)


def _tags(section: str) -> set[str]:
    """The `key:` words that begin lines of a section (the .TP tags and bullet items)."""
    return {m.group(1) for m in re.finditer(r"^([a-z0-9]+):", MAN5_SECTIONS[section], re.M)}


def test_profile_keys_documented() -> None:
    assert set(profiles.TOP_KEYS) <= _tags("KEYS"), "nsfw-profile.5's KEYS lacks " + \
        ", ".join(sorted(set(profiles.TOP_KEYS) - _tags("KEYS")))
    assert set(profiles.RULE_KEYS) <= _tags("RULES"), "nsfw-profile.5's RULES lacks " + \
        ", ".join(sorted(set(profiles.RULE_KEYS) - _tags("RULES")))


def test_profile_choices_documented() -> None:
    for zone in profiles.ZONES:
        assert re.search(rf"^{zone}$", MAN5_SECTIONS["ZONES"], re.M), f"nsfw-profile.5's ZONES lacks {zone}"
    for key, choices in [("proto", profiles.PROTOS), *profiles.CHOICES.items()]:
        line = next(line for line in MAN5_SECTIONS["KEYS"].splitlines() + MAN5_SECTIONS["RULES"].splitlines()
                    if line.startswith(f"{key}:"))
        assert line.replace(" ", "") == f"{key}:" + "|".join(choices), f"nsfw-profile.5: {line!r}"


def _examples(page: Path) -> list[str]:
    text = page.read_text().split("\n.SH EXAMPLES\n", 1)[1].split("\n.SH ", 1)[0]
    return [_plain(block) for block in re.findall(r"^\.EX\n(.*?)^\.EE$", text, re.M | re.S)]


@pytest.mark.parametrize("index", range(len(_examples(MAN5))))
def test_profile_examples_are_valid(index: int, tmp_path: Path) -> None:
    """Each example in nsfw-profile.5 loads, against the shipped profiles it includes."""
    text = _examples(MAN5)[index]
    (tmp_path / "trackers.txt").write_text("# a blocklist\n203.0.113.0/24\nads.example\n")
    path = tmp_path / f"example{index}.yaml"
    path.write_text(text)
    profiles.load(str(path), [tmp_path, profiles.SHIPPED_DIR])


# ---------------------------------------------------------------------------------------------- linters


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60, env=env)


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc is missing (apt-get install mandoc)")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_mandoc_lint_clean(page: Path) -> None:
    done = _run(["mandoc", "-T", "lint", "-W", "all", str(page)])
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is missing (apt-get install groff-base)")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_groff_warnings_clean(page: Path) -> None:
    done = _run(["groff", "-ww", "-z", "-man", str(page)])
    assert done.returncode == 0 and not done.stderr, done.stderr


@pytest.mark.skipif(shutil.which("man") is None, reason="man is missing (apt-get install man-db)")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_renders(page: Path) -> None:
    done = _run(["man", "-l", str(page)], env={"PATH": TOOL_PATH, "MANWIDTH": "80", "MANPAGER": "cat",
                                                 "LANG": "C.UTF-8"})
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert "NAME" in done.stdout and "SEE ALSO" in done.stdout


# ---------------------------------------------------------------------------------------------- completion


def _generated(shell: str) -> str:
    done = _run([PYTHON, "-I", str(NSFW)], env={"PATH": TOOL_PATH, "_NSFW_COMPLETE": f"{shell}_source"})
    assert done.returncode == 0, done.stderr
    script = done.stdout
    if shell == "zsh" and "loadautofunc" not in script:
        assert script.count(ZSH_OLD_END) == 1, "click's zsh script changed: review ZSH_OLD_END"
        script = script.replace(ZSH_OLD_END, ZSH_FIXED_END)
    return script


@pytest.mark.parametrize("shell", sorted(SCRIPTS))
def test_completion_script_is_clicks(shell: str) -> None:
    expected = _generated(shell)
    if os.environ.get("NSFW_UPDATE_GOLDEN"):
        SCRIPTS[shell].write_text(expected)
    assert SCRIPTS[shell].read_text() == expected, \
        f"{SCRIPTS[shell].relative_to(ROOT)} is not what click generates: NSFW_UPDATE_GOLDEN=1 rewrites it"


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """nsfw on PATH, and a profile directory of our own first on the search path."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nsfw").symlink_to(NSFW)
    mine = tmp_path / "profiles"
    mine.mkdir()
    (mine / "zz-mine.yaml").write_text("network: none\n")
    return {"PATH": f"{bindir}:{TOOL_PATH}", "HOME": str(tmp_path), "NSFW_PROFILE_PATH": str(mine),
            "LANG": "C.UTF-8"}


@pytest.mark.parametrize("words", ["nsfw run --profile zz", "nsfw run -p zz", "nsfw check zz", "nsfw check x zz",
                                   "nsfw rules zz"])
def test_profile_names_complete(words: str, shell_env: dict[str, str]) -> None:
    done = _run([PYTHON, "-I", str(NSFW)], env={**shell_env, "_NSFW_COMPLETE": "bash_complete",
                                                  "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)})
    assert done.stdout.split() == ["plain,zz-mine"], done.stdout + done.stderr


def test_shipped_profiles_complete(shell_env: dict[str, str]) -> None:
    done = _run([PYTHON, "-I", str(NSFW)], env={**shell_env, "_NSFW_COMPLETE": "bash_complete",
                                                  "COMP_WORDS": "nsfw run -p ", "COMP_CWORD": "3"})
    names = [line.removeprefix("plain,") for line in done.stdout.split()]
    assert "zz-mine" in names and "default" in names and "offline" in names, done.stdout + done.stderr


def test_profile_paths_complete_as_files(shell_env: dict[str, str]) -> None:
    done = _run([PYTHON, "-I", str(NSFW)], env={**shell_env, "_NSFW_COMPLETE": "bash_complete",
                                                  "COMP_WORDS": "nsfw check ./my", "COMP_CWORD": "2"})
    assert done.stdout.split() == ["file,./my"], done.stdout + done.stderr


def test_bash_completes(shell_env: dict[str, str]) -> None:
    script = f"""source {SCRIPTS['bash']}
COMP_WORDS=(nsfw run --profile zz); COMP_CWORD=3; _nsfw_completion nsfw; printf '%s\\n' "${{COMPREPLY[@]}}"
COMPREPLY=(); COMP_WORDS=(nsfw desktop w); COMP_CWORD=2; _nsfw_completion nsfw; printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = _run(["bash", "--norc", "--noprofile", "-c", script], env=shell_env)
    assert done.stdout.split() == ["zz-mine", "wrap"], done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes(shell_env: dict[str, str]) -> None:
    script = f"source {SCRIPTS['fish']}; complete -C 'nsfw rules zz'; complete -C 'nsfw desktop w'"
    done = _run(["fish", "--no-config", "-c", script], env=shell_env)
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == ["zz-mine", "wrap"], \
        done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes(shell_env: dict[str, str]) -> None:
    """The completion function, with compsys's builtins stubbed to print what they were given."""
    script = f"""compdef() {{ }}
compadd() {{ print -l -- ${{(P)${{argv[-1]}}}} }}
_describe() {{ print -l -- ${{(P)3}} }}
source {SCRIPTS['zsh']}
words=(nsfw check zz); CURRENT=3; _nsfw_completion
words=(nsfw desktop w); CURRENT=3; _nsfw_completion
"""
    done = _run(["zsh", "-f", "-c", script], env=shell_env)
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["zz-mine", "wrap"], \
        done.stdout + done.stderr
