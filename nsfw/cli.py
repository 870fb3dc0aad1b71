"""The command line: click only. Domain errors are caught once, in NsfwGroup, and become a one-line message.

Modules that pull in pyroute2 or libnftables are imported inside the commands that need them, so `nsfw check`
stays light and needs no root.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .cli_desktop import desktop
from .errors import NsfwError, PrivilegeError

if TYPE_CHECKING:
    from . import profile as profiles

RUN_FAILED = 125  # nsfw failed before COMMAND started


class NsfwCommand(click.Command):
    """click builds the --help option anew for every context, and its text through gettext, which looks for
    translation files on disk each time: a few file lookups on every launch's path. It never changes."""

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        cache: dict[tuple[str, ...], click.Option | None] = self.__dict__.setdefault("_help_options", {})
        key = tuple(ctx.help_option_names)
        if key not in cache:
            cache[key] = super().get_help_option(ctx)
        return cache[key]


class NsfwGroup(NsfwCommand, click.Group):
    command_class = NsfwCommand

    def invoke(self, ctx: click.Context) -> Any:
        run = bool(ctx.protected_args) and ctx.protected_args[0] == "run"
        try:
            return super().invoke(ctx)
        except NsfwError as e:
            click.echo(f"nsfw: {e}", err=True)
            code = e.exit_code if e.exit_code is not None else (RUN_FAILED if run else 1)
            ctx.exit(code)
        except click.ClickException as e:
            if run:  # a usage mistake is also a failure before COMMAND started
                e.exit_code = RUN_FAILED
            raise
        except (click.exceptions.Exit, click.exceptions.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # a bug of nsfw's, not the user's mistake: one line, and how to see more
            if os.environ.get("NSFW_DEBUG"):
                raise
            click.echo(f"nsfw: internal error: {type(e).__name__}: {e} (NSFW_DEBUG=1 shows the traceback; "
                       "please report it)", err=True)
            ctx.exit(RUN_FAILED if run else 1)


@click.group(cls=NsfwGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nsfw")
def cli() -> None:
    """nsfw: a per-application network firewall.

    Each application runs in its own network namespace, where the kernel enforces the rules of its profile.
    """


def _dirs(home: str | None = None) -> list[Path]:
    from . import profile as profiles  # yaml: only for commands that read profiles

    return profiles.search_path(os.environ, home or os.path.expanduser("~"))


def _complete_profile(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion: the profile names along the search path, or files once the word looks like a path."""
    from click.shell_completion import CompletionItem

    from . import profile as profiles  # yaml: only for commands that read profiles

    if profiles.is_path(incomplete):
        return [CompletionItem(incomplete, type="file")]
    try:
        return [CompletionItem(n) for n in profiles.available(_dirs()) if n.startswith(incomplete)]
    except OSError:
        return []


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-p", "--profile", "ref", metavar="NAME|PATH", help="Profile to apply (default: named after COMMAND).",
              shell_complete=_complete_profile)
@click.option("--new", is_flag=True, help="Start a separate sandbox instead of joining your running one.")
@click.option("--environment", "env_file", metavar="FILE", help="COMMAND's environment instead of nsfw's own: "
              "NUL-separated NAME=VALUE entries, read as you (nsfw-launch passes your session's this way).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(ref: str | None, new: bool, env_file: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND as you, inside a sandbox built from a profile.

    A second run of a profile you already run joins that sandbox (same namespace and rules), as
    single-instance applications hand new windows to their running process anyway; --new starts another.

    Exit status: COMMAND's own; 128+N when it died of signal N; 125 when nsfw failed before COMMAND started;
    126 when COMMAND is not executable; 127 when it is not found.
    """
    from . import launch
    from . import profile as profiles  # yaml: only for commands that read profiles

    if command[:1] == ("--",):
        command = command[1:]
    if os.geteuid() != 0:
        raise PrivilegeError("nsfw run needs root to build the sandbox: run `sudo nsfw run ...` "
                             "(the command itself still runs as you)")
    user = launch.invoking_user(os.environ, os.getuid())
    dirs = profiles.search_path(os.environ, user.home)

    def read(path: Path) -> bytes:
        return launch.read_as_user(path, user)

    if ref is None:
        if not command:
            raise click.UsageError("give a COMMAND, or --profile NAME for a profile that has a command:")
        base = os.path.basename(command[0])
        ref = base if profiles.find(base, dirs) and not profiles.is_path(base) else "default"
        if ref == "default":
            click.echo(f"nsfw: no profile named '{base}'; using the shipped profile 'default' "
                       "(internet yes, home network no)", err=True)
    prof = profiles.load(ref, dirs, read)
    argv = list(command) or list(prof.command)
    if not argv:
        raise click.UsageError(f"profile '{prof.name}' has no command: give one after --")

    from . import (
        sandbox,  # pyroute2 and libnftables: only a real run pays for them
        session,  # the session's environment for COMMAND, and what would keep it from working there
    )

    env = session.read_environment(env_file, read) if env_file is not None else os.environ
    for warning in session.check(argv, env, user.uid):
        click.echo(f"nsfw: warning: {warning}", err=True)
    sys.exit(sandbox.run(prof, argv, user, env, new=new))


@cli.command()
@click.argument("refs", nargs=-1, required=True, metavar="PROFILE...", shell_complete=_complete_profile)
def check(refs: tuple[str, ...]) -> None:
    """Validate profiles: exit 0 when all are valid, else 1 with one line per problem."""
    from . import profile as profiles  # yaml: only for commands that read profiles

    dirs = _dirs()
    bad = False
    for ref in refs:
        problems = profiles.check([ref], dirs)
        for problem in problems:
            click.echo(str(problem), err=True)
        if problems:
            bad = True
        else:
            click.echo(f"{ref}: ok")
    sys.exit(1 if bad else 0)


@cli.command()
@click.argument("ref", metavar="PROFILE", shell_complete=_complete_profile)
@click.option("--json", "as_json", is_flag=True, help="Print libnftables JSON instead of nft syntax.")
def rules(ref: str, as_json: bool) -> None:
    """Print the ruleset that `nsfw run` loads inside the sandbox for PROFILE.

    Shown for the first sandbox slot (gateway 10.213.0.1); at launch the host and lan sets also receive the
    host's own addresses and connected networks. Name rules, enforced through the sandbox's resolver, are
    listed as comments at the top.
    """
    from . import compile as rulesets
    from . import profile as profiles  # yaml: only for commands that read profiles
    from .names import Instance

    prof = profiles.load(ref, _dirs())
    example = Instance("0" * 8, slot=0, ipv6=True)  # the first sandbox's gateway: where its resolver listens
    gateways = [str(example.gateway4.ip), str(example.gateway6.ip)] if prof.network == "nat" and example.gateway6 \
        else []
    cmds = rulesets.sandbox_ruleset(prof, gateways=gateways)
    if as_json:
        click.echo(json_text(rulesets.wrap(cmds)))
        return
    from . import nft

    click.echo(_name_comments(prof) + nft.render(cmds), nl=False)


def json_text(data: dict[str, Any], above: int = 1000) -> str:
    """json.dumps(data, indent=1, sort_keys=True), byte for byte, with the element lists of sets larger than
    `above` spelt by _elem_lines: json's pure-Python indenting encoder took a quarter of a second on a
    100,000-line blocklist's set."""
    big: dict[str, list[Any]] = {}
    shallow: list[Any] = []
    for cmd in data.get("nftables", []):
        add = cmd.get("add") if isinstance(cmd, dict) and len(cmd) == 1 else None
        spec = add.get("set") if isinstance(add, dict) and len(add) == 1 else None
        if isinstance(spec, dict):
            elems = spec.get("elem")
            if isinstance(elems, list) and len(elems) > above and all(map(_plain_elem, elems)):
                mark = f"\0nsfw elements {len(big)}"
                big[json.dumps(mark)] = elems
                cmd = {"add": {"set": {**spec, "elem": mark}}}
        shallow.append(cmd)
    if not big:
        return json.dumps(data, indent=1, sort_keys=True)
    text = json.dumps({**data, "nftables": shallow}, indent=1, sort_keys=True)
    for mark, elems in big.items():
        at = text.find(f": {mark}")
        if at < 0 or text.count(mark) != 1:
            return json.dumps(data, indent=1, sort_keys=True)
        depth = at - text.rfind("\n", 0, at) - 1 - len('"elem"')  # the key's own indentation
        text = text[:at] + ": " + _elem_lines(elems, depth) + text[at + 2 + len(mark):]
    return text


def _plain_elem(e: Any) -> bool:
    """An element _elem_lines spells: an address, a prefix or a range, as the compiler writes them."""
    if isinstance(e, str):
        return True
    if isinstance(e, dict) and len(e) == 1:
        if "prefix" in e:
            p = e["prefix"]
            return (isinstance(p, dict) and set(p) == {"addr", "len"} and isinstance(p["addr"], str)
                    and type(p["len"]) is int)
        if "range" in e:
            r = e["range"]
            return isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)
    return False


def _elem_lines(elems: list[Any], depth: int) -> str:
    """A list of plain elements as json.dumps(indent=1) writes it when the list's key is indented `depth`."""
    quote = json.dumps
    i0, i1, i2 = (" " * (depth + k) for k in range(1, 4))
    items = []
    for e in elems:
        if isinstance(e, str):
            items.append(i0 + quote(e))
        elif "prefix" in e:
            items.append(f'{i0}{{\n{i1}"prefix": {{\n{i2}"addr": {quote(e["prefix"]["addr"])},\n'
                         f'{i2}"len": {e["prefix"]["len"]}\n{i1}}}\n{i0}}}')
        else:
            lo, hi = e["range"]
            items.append(f'{i0}{{\n{i1}"range": [\n{i2}{quote(lo)},\n{i2}{quote(hi)}\n{i1}]\n{i0}}}')
    return "[\n" + ",\n".join(items) + "\n" + " " * depth + "]"


def _name_comments(prof: profiles.Profile) -> str:
    """The name rules, which live in the sandbox's resolver rather than in the ruleset, as comments."""

    from .compile import grant_set, name_groups

    lines = [f"# profile {prof.name}, sha256 {prof.sha256[:16]}"]
    if prof.network == "nat":
        lines.append("# every DNS packet goes to the sandbox's resolver (redirected by its host table, inet nsfw-ID)")
    for i, group in enumerate(name_groups(prof)):
        names = ", ".join(r.value for r in group)
        lines.append(f"# names whose addresses go into @{grant_set(i, 4)}/@{grant_set(i, 6)}: {names}")
    denied = [r.value for r in prof.deny if r.kind == "host"]
    if denied:
        lines.append(f"# names refused (their addresses go into @dnsdeny4/@dnsdeny6): {', '.join(denied)}")
    return "\n".join(lines) + "\n"


@cli.command()
def daemon() -> None:
    """Keep nsfw warm: serve launches with everything already loaded, so `nsfw run` starts faster.

    Only launches with no terminal on stdin, stdout or stderr (menu entries, scripts) use it; the rest, and
    every launch when it is not running, work as before. Meant to run as a system service.
    """
    from . import warm

    _root("daemon")
    warm.serve()


@cli.command()
def schema() -> None:
    """Print the profile format as a JSON Schema, for editors (yaml-language-server)."""
    from .schema import json_schema

    click.echo(json.dumps(json_schema(), indent=1))


@cli.command()
def demo() -> None:
    """Show nsfw at work in a simulated world of network namespaces (needs root; touches no real network)."""
    from . import demo as demo_mod

    sys.exit(demo_mod.main())


def _root(what: str) -> None:
    if os.geteuid() != 0:
        raise PrivilegeError(f"nsfw {what} needs root: run `sudo nsfw {what}`")


def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="A stable list of objects (see the README).")
def ps(as_json: bool) -> None:
    """List running sandboxes, with what their rulesets allowed and denied (counters need root)."""
    from . import control

    rows = control.listing(counters=os.geteuid() == 0)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    head = ("ID", "PROFILE", "USER", "PID", "NET", "ADDRESSES", "UPTIME", "ALLOWED", "DENIED", "COMMAND")
    table = [head] + [(
        r["id"], r["profile"], r["user"], str(r["pid"] or "-"), r["network"], ",".join(r["addresses"]) or "-",
        _uptime(r["uptime_seconds"]),
        f"{r['allowed']['packets']}p/{_size(r['allowed']['bytes'])}" if r["allowed"] else "-",
        f"{r['denied']['packets']}p/{_size(r['denied']['bytes'])}" if r["denied"] else "-",
        " ".join(r["command"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


@cli.command()
@click.argument("ref", metavar="ID|PROFILE")
@click.option("--grace", default=5.0, show_default=True, metavar="SECONDS",
              help="How long processes get to exit after SIGTERM before SIGKILL.")
def stop(ref: str, grace: float) -> None:
    """End a sandbox's processes (TERM, then KILL after the grace period) and remove it."""
    from . import control

    _root("stop")
    for record in control.matching(ref):
        control.stop(record, grace)
        click.echo(f"stopped {record.id} ({record.profile})")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
def gc(dry_run: bool) -> None:
    """Remove everything of sandboxes whose processes are gone. Safe at any moment; a second run finds nothing."""
    from . import reconcile

    _root("gc")
    report = reconcile.gc(dry_run=dry_run)
    for record, removed in report:
        click.echo(f"{'would remove' if dry_run else 'removed'} {record.id} ({record.profile}): "
                   f"{', '.join(removed) or 'its record'}")
    if not report:
        click.echo("nothing to do")


@cli.command()
def doctor() -> None:
    """Check what this machine needs for nsfw and what gets in its way, each with the fix."""
    from . import doctor as doctor_mod

    sys.exit(doctor_mod.main())


cli.add_command(desktop)


def main() -> None:
    cli(prog_name="nsfw")
