"""Disjoint boxes over (address, protocol, port) for nftables concatenated interval sets.

The kernel's concatenated-range sets (pipapo) refuse an element whose start or end falls inside an element
already there, so overlapping profile rules (a /8 and a /16 inside it, a port range and a port inside it, a
blocklist with overlapping and adjacent ranges) must become disjoint elements before they reach the kernel.
A sweep over the address axis does that in O(n log n) and merges neighbours that carry the same
protocol/port cells, so a large blocklist shrinks instead of growing.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from itertools import pairwise

Span = tuple[int, int]  # inclusive
Cell = tuple[Span, Span]  # (protocol span, port span)
Box = tuple[Span, Cell]  # (address span, cell)


def _merge_spans(spans: Iterable[Span]) -> tuple[Span, ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


@cache
def disjoint_cells(cells: frozenset[Cell]) -> tuple[Cell, ...]:
    """The union of (protocol x port) boxes as disjoint boxes, neighbouring protocols merged when alike."""
    cuts = sorted({p for (plo, phi), _ in cells for p in (plo, phi + 1)})
    rows: list[tuple[Span, tuple[Span, ...]]] = []
    for lo, nxt in pairwise(cuts):
        hi = nxt - 1
        ports = _merge_spans(q for (plo, phi), q in cells if plo <= lo and hi <= phi)
        if not ports:
            continue
        if rows and rows[-1][1] == ports and rows[-1][0][1] + 1 == lo:
            rows[-1] = ((rows[-1][0][0], hi), ports)
        else:
            rows.append(((lo, hi), ports))
    return tuple((proto, port) for proto, ports in rows for port in ports)


def disjoint(boxes: Iterable[Box]) -> list[Box]:
    """Disjoint boxes covering exactly the union of `boxes`, sorted by address."""
    boxes = list(boxes)
    by_cell: dict[Cell, list[Span]] = {}
    for span, cell in boxes:
        by_cell.setdefault(cell, []).append(span)
    groups = [merge_addresses(spans) for spans in by_cell.values()]
    if groups and all(g == groups[0] for g in groups[1:]):
        # Every address covered carries the same cells (one list with its ports, the usual large case): the
        # sweep's answer without its per-point work, which cost a second for a 100,000-line list.
        key = disjoint_cells(frozenset(by_cell))
        return [(span, cell) for span in groups[0] for cell in key]
    return _sweep(boxes)


def _sweep(boxes: list[Box]) -> list[Box]:
    events: dict[int, list[tuple[int, Cell]]] = {}
    for (lo, hi), cell in boxes:
        events.setdefault(lo, []).append((1, cell))
        events.setdefault(hi + 1, []).append((-1, cell))
    active: dict[Cell, int] = {}
    segments: list[tuple[Span, tuple[Cell, ...]]] = []
    points = sorted(events)
    for here, nxt in pairwise(points):
        for delta, cell in events[here]:
            active[cell] = active.get(cell, 0) + delta
            if not active[cell]:
                del active[cell]
        if not active:
            continue
        # neighbours merge when what they cover is the same, however differently the rules said it
        key = disjoint_cells(frozenset(active))
        if segments and segments[-1][1] == key and segments[-1][0][1] + 1 == here:
            segments[-1] = ((segments[-1][0][0], nxt - 1), key)
        else:
            segments.append(((here, nxt - 1), key))
    return [(span, cell) for span, key in segments for cell in key]


def merge_addresses(spans: Iterable[Span]) -> tuple[Span, ...]:
    """Overlapping and adjacent address spans merged: what a plain interval set accepts."""
    return _merge_spans(spans)


def merge_packed(packed: Iterable[int], bits: int) -> list[Span]:
    """merge_addresses for spans packed as FIRST << bits | LAST (profile.Listed): sorting ints is twice as quick
    as sorting pairs, which counts on a list of a hundred thousand networks."""
    mask = (1 << bits) - 1
    out: list[Span] = []
    lo = hi = -2
    for key in sorted(packed):
        first = key >> bits
        if first <= hi + 1:
            last = key & mask
            if last > hi:
                hi = last
            continue
        if hi >= 0:
            out.append((lo, hi))
        lo, hi = first, key & mask
    if hi >= 0:
        out.append((lo, hi))
    return out


def span_to_prefixes(lo: int, hi: int, bits: int) -> list[tuple[int, int]]:
    """A span as the fewest (address, prefix length) pairs, for readable output."""
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = (lo & -lo).bit_length() - 1 if lo else bits
        while size and lo + (1 << size) - 1 > hi:
            size -= 1
        out.append((lo, bits - size))
        lo += 1 << size
    return out
