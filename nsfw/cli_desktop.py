"""`nsfw desktop`: menu launchers that start applications through nsfw. Click only: the work is in desktop.py."""

from __future__ import annotations

import click


@click.group()
def desktop() -> None:
    """Wrap menu entries (.desktop files) so that applications start inside their sandbox."""
