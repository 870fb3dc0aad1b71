"""`nsfw desktop`: menu launchers that start applications through nsfw. Click only: the work is in desktop.py
(the text of entries) and desktop_store.py (where they live)."""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

import click

from .desktop import DesktopError

if TYPE_CHECKING:
    from . import desktop_store

_SYSTEM_HELP = "Act on the system-wide entries in /usr/local/share/applications (root) instead of yours."


def _store() -> ModuleType:
    """Loaded when a desktop command runs, not on every `nsfw` invocation."""
    from . import desktop_store

    return desktop_store


def _scope(system: bool) -> desktop_store.Scope:
    scope: desktop_store.Scope = _store().scope(system, os.environ, os.path.expanduser("~"))
    return scope


@click.group()
def desktop() -> None:
    """Wrap menu entries (.desktop files) so that applications start inside their sandbox."""


@desktop.command()
@click.argument("apps", nargs=-1, required=True, metavar="APP...")
@click.option("-p", "--profile", metavar="NAME|PATH", help="Profile to apply (default: as `nsfw run` picks it).")
@click.option("--system", is_flag=True, help=_SYSTEM_HELP)
def wrap(apps: tuple[str, ...], profile: str | None, system: bool) -> None:
    """Make APP's menu entry (firefox for firefox.desktop) start it through nsfw.

    A wrapped copy goes where it shadows the original; the original is never changed.
    """
    sc = _scope(system)
    failed = False
    for app in apps:
        try:
            done = _store().wrap(sc, app, profile)
        except (DesktopError, OSError) as e:
            click.echo(f"nsfw: {app}: {e}", err=True)
            failed = True
            continue
        how = f"profile {done.profile}" if done.profile else "the profile nsfw picks for its command"
        click.echo(f"{done.id}: wrapped with {how}: {done.path} (from {done.original})")
        for note in done.notes:
            click.echo(f"nsfw: note: {note}", err=True)
    if not system and not failed:
        problem = _store().group_note(os.environ.get("USER") or str(os.getuid()), os.getgroups())
        if problem:
            click.echo(f"nsfw: note: {problem}", err=True)
    sys.exit(1 if failed else 0)


@desktop.command()
@click.argument("apps", nargs=-1, required=True, metavar="APP...")
@click.option("--system", is_flag=True, help=_SYSTEM_HELP)
def unwrap(apps: tuple[str, ...], system: bool) -> None:
    """Remove the wrapped copy of APP's entry, so that the original is used again."""
    sc = _scope(system)
    failed = False
    for app in apps:
        try:
            for line in _store().unwrap(sc, app):
                click.echo(f"{app}: {line}")
        except (DesktopError, OSError) as e:
            click.echo(f"nsfw: {app}: {e}", err=True)
            failed = True
    sys.exit(1 if failed else 0)


@desktop.command(name="list")
@click.option("--system", is_flag=True, help="Only the system-wide entries.")
def list_(system: bool) -> None:
    """The wrapped entries: id, profile, whether the original changed since (then run `nsfw desktop sync`)."""
    scopes = [_scope(True)] if system else [_scope(False), _scope(True)]
    rows = [(st.id[:-len(".desktop")], st.profile or "(by command)", sc.name, st.state, st.original)
            for sc in scopes for st in _store().wrapped(sc)]
    if not rows:
        click.echo("no wrapped entries (`nsfw desktop wrap APP` makes one)", err=True)
        return
    header = ("APP", "PROFILE", "SCOPE", "ORIGINAL", "FROM")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header[:4], widths, strict=True)) + "  " + header[4])
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])


@desktop.command()
@click.option("--system", is_flag=True, help=_SYSTEM_HELP)
def sync(system: bool) -> None:
    """Wrap again the entries whose original changed (a package upgrade); drop those whose original is gone."""
    done = _store().sync(_scope(system))
    for line in done:
        click.echo(line)
    if not done:
        click.echo("every wrapped entry is up to date", err=True)
