"""Removing sandboxes by name: after a normal end, after a crash, and as `nsfw gc`.

Everything here works from records alone (names derived from the instance id) plus live process state, never
from what happens to exist in the kernel: nsfw never touches a namespace, interface or table it did not
record. Every step treats "already gone" as done, so any of it can run twice, or concurrently with a launch.
"""

from __future__ import annotations

import os
import time

from . import forwarding, keeper, netns, nft, state


def remove_objects(record: state.Record) -> list[str]:
    """Delete by name everything a record describes, in reverse order of creation. Idempotent, never raises."""
    removed = []
    if record.table and nft.delete_table(record.table):
        removed.append(f"table inet {record.table}")
    if record.veth and netns.delete_link(record.veth):
        removed.append(f"link {record.veth}")
    if netns.remove(record.netns):
        removed.append(f"netns {record.netns}")
    if state.drop_dir(record.id):
        removed.append(f"files {state.sandbox_dir(record.id)}")
    return removed


def release(record: state.Record) -> None:
    """The record goes last, and with the last record, nsfw's changes to forwarding. Takes the lock."""
    with state.locked():
        state.drop(record.id)
        if not state.records(include_pool=True):
            forwarding.restore()


def teardown(record: state.Record) -> list[str]:
    removed = remove_objects(record)
    release(record)
    return removed


def kill_processes(record: state.Record) -> int:
    """Kill what still runs in a sandbox nobody owns any more. Returns how many there were."""
    path = netns.path(record.netns)
    if not os.path.exists(path):
        return 0
    ns = keeper.netns_id(path)
    found = len(keeper.processes_in(ns))
    keeper.kill_all(ns)
    return found


def dead(records: list[state.Record] | None = None) -> list[state.Record]:
    return [r for r in (state.records(include_pool=True) if records is None else records) if not state.alive(r)]


def reap(record: state.Record) -> list[str]:
    """Remove one dead sandbox entirely: its stray processes, its kernel objects, its files, its record.
    Caller holds the lock."""
    stray = kill_processes(record)
    removed = remove_objects(record)
    state.drop(record.id)
    return ([f"{stray} process(es)"] if stray else []) + removed


def reap_dead() -> list[state.Record]:
    """What every launch runs first: cheap when nothing is dead. Caller holds the lock."""
    gone = dead()
    for record in gone:
        reap(record)
    if gone and not state.records(include_pool=True):
        forwarding.restore()
    return gone


def gc(dry_run: bool = False) -> list[tuple[state.Record, list[str]]]:
    """`nsfw gc`: reconcile records with /proc and the kernel. A second run finds nothing to do.

    Done in batches, because a thousand stale sandboxes must not cost a thousand of everything: one scan of
    /proc finds their processes, one transaction removes their tables, and removing their namespaces lets the
    kernel destroy their veths together (gc waits until they are gone, so it returns with nothing left)."""
    with state.locked():
        gone = dead()
        if dry_run:
            return [(r, ["would remove"]) for r in gone]
        report = _reap_all(gone)
        if not state.records(include_pool=True):
            forwarding.restore()  # also a leftover from a crash between the last record and the restore
    return report


def _reap_all(gone: list[state.Record]) -> list[tuple[state.Record, list[str]]]:
    if not gone:
        return []
    removed: dict[str, list[str]] = {r.id: [] for r in gone}
    by_ns = {}
    for r in gone:
        p = netns.path(r.netns)
        if os.path.exists(p):
            by_ns[keeper.netns_id(p)] = r
    for ns, pids in keeper.processes_by_namespace(set(by_ns)).items():
        keeper.kill_all(ns)
        removed[by_ns[ns].id].append(f"{len(pids)} process(es)")
    tables = set(nft.tables())
    doomed = [r for r in gone if r.table and r.table in tables]
    if doomed and nft.delete_tables([r.table for r in doomed if r.table]):
        for r in doomed:
            removed[r.id].append(f"table inet {r.table}")
    for r in gone:
        if netns.remove(r.netns):
            removed[r.id].append(f"netns {r.netns}")
    _await_links_gone({r.veth: r for r in gone if r.veth}, removed)
    for r in gone:
        if state.drop_dir(r.id):
            removed[r.id].append(f"files {state.sandbox_dir(r.id)}")
        state.drop(r.id)
    return [(r, removed[r.id]) for r in gone]


def _await_links_gone(veths: dict[str, state.Record], removed: dict[str, list[str]], timeout: float = 5.0) -> None:
    """The kernel destroys a veth with its namespace, asynchronously; what is still there after `timeout` (a
    namespace something else still holds) is deleted by name."""
    existed = left = set(veths) & set(netns.link_names())
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = left & set(netns.link_names())
    for name in left:
        netns.delete_link(name)
    for name in existed:
        removed[veths[name].id].append(f"link {name}")
