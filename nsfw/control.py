"""`nsfw ps` and `nsfw stop`: what runs, and ending it. Records are the inventory; the kernel gives counters
and /proc gives the processes."""

from __future__ import annotations

import os
import time
from typing import Any

from . import keeper, nspath, state
from .errors import NsfwError

STOP_WAIT = 10.0


def _counters(record: state.Record) -> dict[str, dict[str, int]]:
    from . import nft
    from .granter import TABLE  # not compile: that would load the profile code and yaml for a constant

    try:
        with nspath.entered(record.netns):
            return nft.named_counters(TABLE)
    except OSError:
        return {}


def listing(counters: bool) -> list[dict[str, Any]]:
    """The running sandboxes, oldest first, as the documented `nsfw ps --json` objects."""
    now = time.time()
    out = []
    for r in sorted((r for r in state.records() if state.alive(r)), key=lambda r: r.started_at):
        found = _counters(r) if counters else {}
        zero = {"packets": 0, "bytes": 0}
        out.append({
            "id": r.id, "profile": r.profile, "profile_path": r.profile_path, "command": r.command,
            "user": r.user, "uid": r.uid, "pid": r.command_pid, "network": r.network,
            "addresses": r.addresses, "started_at": r.started_at, "uptime_seconds": round(now - r.started_at, 1),
            "allowed": found.get("allowed", zero) if counters else None,
            "denied": found.get("denied", zero) if counters else None,
        })
    return out


def matching(ref: str) -> list[state.Record]:
    """Sandboxes named by id (or an unambiguous prefix of one) or by profile name."""
    live = [r for r in state.records() if state.alive(r)]
    by_id = [r for r in live if r.id.startswith(ref)]
    if len(by_id) == 1:
        return by_id
    by_profile = [r for r in live if r.profile == ref]
    if by_profile:
        return by_profile
    if by_id:
        raise NsfwError(f"'{ref}' matches several sandboxes: {', '.join(r.id for r in by_id)}; give more of the id")
    raise NsfwError(f"no running sandbox has the id or profile '{ref}' (see `nsfw ps`)")


def stop(record: state.Record, grace: float) -> None:
    """End every process of the sandbox (TERM, then KILL after `grace`), then see it removed: by its keeper,
    or here when nobody owns it any more."""
    path = nspath.path(record.netns)
    if os.path.exists(path):
        keeper.kill_all(keeper.netns_id(path), grace)
    deadline = time.monotonic() + STOP_WAIT
    while state.load(record.id) is not None and state.alive(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    if state.load(record.id) is not None:
        from . import reconcile  # pyroute2: only when nobody else removed it

        with state.locked():
            reconcile.reap(record)
        reconcile.release(record)
