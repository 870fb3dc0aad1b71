"""A check's result, and what the doctor's checks share. Not on `nsfw run`'s path: only `nsfw doctor` makes
checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["APT_FIX", "GC_FIX", "ROOT_ONLY", "Check", "Status"]

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


APT_FIX = "apt-get install nftables python3-nftables python3-pyroute2"
ROOT_ONLY = ("firewall: forward", "firewall: input", "leftovers")
GC_FIX = "nsfw gc"


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _guard(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """A check that crashes is a finding, not a traceback: the rest of the report still matters."""
    try:
        return fn()
    except Exception as e:
        return [Check(name, "warn", f"the check itself failed: {type(e).__name__}: {e}",
                      "report this as a bug in nsfw doctor")]
