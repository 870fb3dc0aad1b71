"""nsfw.intervals against brute force on small universes: 6-bit addresses, 3 protocols, 8 ports.

Every box is expanded into the set of points it covers, so "disjoint" and "covers exactly the union" are checked
point by point rather than by reasoning about spans.
"""

from __future__ import annotations

import itertools
import random

import pytest

from nsfw import intervals
from nsfw.intervals import Box, Cell, Span, disjoint, disjoint_cells, merge_addresses, span_to_prefixes

ADDR, PROTO, PORT = 64, 3, 8  # universe sizes
Point = tuple[int, int, int]


def rand_span(rng: random.Random, size: int) -> Span:
    a, b = rng.randrange(size), rng.randrange(size)
    return (min(a, b), max(a, b))


def rand_box(rng: random.Random) -> Box:
    return rand_span(rng, ADDR), (rand_span(rng, PROTO), rand_span(rng, PORT))


def points(box: Box) -> set[Point]:
    (alo, ahi), ((plo, phi), (qlo, qhi)) = box
    return set(itertools.product(range(alo, ahi + 1), range(plo, phi + 1), range(qlo, qhi + 1)))


def cell_points(cell: Cell) -> set[tuple[int, int]]:
    (plo, phi), (qlo, qhi) = cell
    return set(itertools.product(range(plo, phi + 1), range(qlo, qhi + 1)))


def valid(box: Box) -> bool:
    (alo, ahi), ((plo, phi), (qlo, qhi)) = box
    return 0 <= alo <= ahi < ADDR and 0 <= plo <= phi < PROTO and 0 <= qlo <= qhi < PORT


def random_inputs(seed: int, count: int = 300) -> list[list[Box]]:
    rng = random.Random(seed)
    cases: list[list[Box]] = [[]]
    for _ in range(count):
        boxes = [rand_box(rng) for _ in range(rng.randrange(1, 9))]
        if rng.random() < 0.3:  # repeated cells and repeated boxes, as overlapping profile rules make them
            boxes += [(rand_span(rng, ADDR), rng.choice(boxes)[1]) for _ in range(3)] + [rng.choice(boxes)]
        cases.append(boxes)
    return cases


# ---------------------------------------------------------------------------------------------- disjoint


@pytest.mark.parametrize("seed", range(4))
def test_disjoint_is_exact_and_disjoint(seed: int) -> None:
    for boxes in random_inputs(seed):
        out = disjoint(boxes)
        assert all(valid(b) for b in out), out
        want = set().union(*map(points, boxes)) if boxes else set()
        got: set[Point] = set()
        for box in out:
            pts = points(box)
            assert not (pts & got), f"overlap in {out} from {boxes}"
            got |= pts
        assert got == want, boxes
        # sorted by address, as the docstring promises (the kernel does not care, diffs of goldens do)
        assert [b[0] for b in out] == sorted(b[0] for b in out)


@pytest.mark.parametrize("seed", range(2))
def test_disjoint_address_segments_partition_the_axis(seed: int) -> None:
    """Boxes share their address span exactly or not at all: what makes the output a sweep, not a tangle."""
    for boxes in random_inputs(seed, 150):
        spans = sorted({b[0] for b in disjoint(boxes)})
        for (_, ahi), (blo, _) in itertools.pairwise(spans):
            assert ahi < blo


def test_disjoint_of_one_box_is_that_box() -> None:
    rng = random.Random(7)
    for _ in range(200):
        box = rand_box(rng)
        assert disjoint([box]) == [box]
        assert disjoint([box, box, box]) == [box]


def test_same_cell_overlapping_and_adjacent_spans_merge_to_the_fewest_boxes() -> None:
    rng = random.Random(11)
    for _ in range(300):
        cell = (rand_span(rng, PROTO), rand_span(rng, PORT))
        spans = [rand_span(rng, ADDR) for _ in range(rng.randrange(1, 8))]
        assert disjoint([(s, cell) for s in spans]) == [(s, cell) for s in merge_addresses(spans)]


def test_the_shortcut_for_lists_gives_the_sweeps_answer() -> None:
    """disjoint() skips the sweep when every cell covers the same addresses (one list with its ports): the
    answer must be the sweep's, box for box, and the shortcut must really be taken for such input."""
    rng = random.Random(12)
    taken = 0
    for _ in range(400):
        spans = [rand_span(rng, ADDR) for _ in range(rng.randrange(1, 8))]
        cells = list({(rand_span(rng, PROTO), rand_span(rng, PORT)) for _ in range(rng.randrange(1, 4))})
        boxes = [(s, c) for s in spans for c in cells]
        rng.shuffle(boxes)
        if rng.random() < 0.3:  # and sometimes not quite alike: the sweep's case
            boxes.append(rand_box(rng))
        by_cell = {c: intervals.merge_addresses(s for s, cc in boxes if cc == c) for _s, c in boxes}
        taken += len(set(by_cell.values())) == 1
        assert disjoint(boxes) == intervals._sweep(boxes)
    assert taken > 250


def test_adjacent_boxes_merge_across_a_touching_edge() -> None:
    cell = ((1, 1), (2, 5))
    assert disjoint([((0, 9), cell), ((10, 20), cell)]) == [((0, 20), cell)]
    assert disjoint([((0, 9), cell), ((11, 20), cell)]) == [((0, 9), cell), ((11, 20), cell)]


def test_neighbouring_protocols_with_equal_ports_merge() -> None:
    assert disjoint([((0, 3), ((0, 0), (1, 4))), ((0, 3), ((1, 1), (1, 4)))]) == [((0, 3), ((0, 1), (1, 4)))]
    assert disjoint_cells(frozenset({((0, 0), (1, 4)), ((2, 2), (1, 4))})) == (((0, 0), (1, 4)), ((2, 2), (1, 4)))


def test_large_values_do_not_need_a_small_universe() -> None:
    """Real IPv6-sized spans: a /8 and a /16 inside it with different cells become three address segments."""
    big = (0x0A00_0000, 0x0AFF_FFFF)
    small = (0x0A01_0000, 0x0A01_FFFF)
    tcp22, udp53 = ((6, 6), (22, 22)), ((17, 17), (53, 53))
    assert disjoint([(big, tcp22), (small, udp53)]) == [
        ((0x0A00_0000, 0x0A00_FFFF), tcp22),
        (small, tcp22),
        (small, udp53),
        ((0x0A02_0000, 0x0AFF_FFFF), tcp22),
    ]
    v6 = (1 << 127, (1 << 128) - 1)
    assert disjoint([(v6, tcp22), (v6, tcp22)]) == [(v6, tcp22)]


def test_neighbours_with_equal_cells_are_merged() -> None:
    """The docstring: 'merges neighbours that carry the same protocol/port cells'. A port range and a port
    inside it, over a /8 and a /16 inside it, carry tcp 80-90 everywhere: one box, not three."""
    tcp80_90, tcp85 = ((6, 6), (80, 90)), ((6, 6), (85, 85))
    assert disjoint([((0, 15), tcp80_90), ((4, 7), tcp85)]) == [((0, 15), tcp80_90)]


def test_neighbour_merging_property_where_it_holds() -> None:
    """For inputs in which no cell is redundant (disjoint cells), neighbouring address segments never carry
    the same cells: otherwise they would have been one segment."""
    rng = random.Random(5)
    for _ in range(300):
        cells = [((p, p), (q, q)) for p, q in rng.sample(list(itertools.product(range(PROTO), range(PORT))), 3)]
        boxes = [(rand_span(rng, ADDR), rng.choice(cells)) for _ in range(rng.randrange(1, 8))]
        out = disjoint(boxes)
        by_span: dict[Span, set[tuple[int, int]]] = {}
        for span, cell in out:
            by_span.setdefault(span, set()).update(cell_points(cell))
        spans = sorted(by_span)
        for a, b in itertools.pairwise(spans):
            if a[1] + 1 == b[0]:
                assert by_span[a] != by_span[b], (boxes, out)


# ---------------------------------------------------------------------------------------------- disjoint_cells


def test_disjoint_cells_against_brute_force() -> None:
    rng = random.Random(3)
    for _ in range(500):
        cells = frozenset((rand_span(rng, PROTO), rand_span(rng, PORT)) for _ in range(rng.randrange(1, 6)))
        out = disjoint_cells(cells)
        want = set().union(*map(cell_points, cells))
        got: set[tuple[int, int]] = set()
        for cell in out:
            pts = cell_points(cell)
            assert pts and not (pts & got), (cells, out)
            got |= pts
        assert got == want, (cells, out)
        # within one protocol row, port spans are merged (not adjacent, not overlapping)
        rows: dict[Span, list[Span]] = {}
        for proto, port in out:
            rows.setdefault(proto, []).append(port)
        for ports in rows.values():
            assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ports)), out


def test_disjoint_cells_of_nothing() -> None:
    assert disjoint_cells(frozenset()) == ()
    assert disjoint([]) == []


# ---------------------------------------------------------------------------------------------- merge_addresses


def test_merge_addresses_examples() -> None:
    assert merge_addresses([]) == ()
    assert merge_addresses([(5, 9), (0, 3)]) == ((0, 3), (5, 9))
    assert merge_addresses([(0, 3), (4, 5)]) == ((0, 5),)  # adjacent
    assert merge_addresses([(0, 10), (2, 3)]) == ((0, 10),)  # contained
    assert merge_addresses([(0, 4), (3, 8), (8, 8), (20, 30)]) == ((0, 8), (20, 30))  # overlapping


def test_merge_addresses_against_brute_force() -> None:
    rng = random.Random(9)
    for _ in range(500):
        spans = [rand_span(rng, ADDR) for _ in range(rng.randrange(0, 8))]
        out = merge_addresses(spans)
        want = {a for lo, hi in spans for a in range(lo, hi + 1)}
        assert {a for lo, hi in out for a in range(lo, hi + 1)} == want
        assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(out)), out  # neither touching nor overlapping
        assert all(lo <= hi for lo, hi in out)


# ---------------------------------------------------------------------------------------------- span_to_prefixes


def fewest_prefixes(lo: int, hi: int, bits: int) -> list[tuple[int, int]]:
    """The minimal CIDR cover, by descending the binary trie: a node fully inside is one prefix."""
    out: list[tuple[int, int]] = []

    def walk(base: int, length: int) -> None:
        end = base + (1 << (bits - length)) - 1
        if end < lo or base > hi:
            return
        if lo <= base and end <= hi:
            out.append((base, length))
            return
        half = 1 << (bits - length - 1)
        walk(base, length + 1)
        walk(base + half, length + 1)

    walk(0, 0)
    return out


@pytest.mark.parametrize("bits", [1, 4, 6, 8])
def test_span_to_prefixes_every_span(bits: int) -> None:
    size = 1 << bits
    for lo in range(size):
        for hi in range(lo, size):
            out = span_to_prefixes(lo, hi, bits)
            covered: list[int] = []
            for addr, length in out:
                assert 0 <= length <= bits
                assert addr % (1 << (bits - length)) == 0, f"{addr}/{length} is not aligned"
                covered += range(addr, addr + (1 << (bits - length)))
            assert covered == list(range(lo, hi + 1)), (lo, hi, out)  # exact, in order, no overlap
            assert out == fewest_prefixes(lo, hi, bits), (lo, hi)


@pytest.mark.parametrize("bits", [32, 128])
def test_span_to_prefixes_full_width(bits: int) -> None:
    top = (1 << bits) - 1
    assert span_to_prefixes(0, top, bits) == [(0, 0)]
    assert span_to_prefixes(top, top, bits) == [(top, bits)]
    assert span_to_prefixes(0, 0, bits) == [(0, bits)]
    assert span_to_prefixes(1, top, bits) == fewest_prefixes(1, top, bits)
    assert len(span_to_prefixes(1, top - 1, bits)) == 2 * (bits - 1)
    rng = random.Random(bits)
    for _ in range(200):
        a, b = rng.randrange(1 << bits), rng.randrange(1 << bits)
        lo, hi = min(a, b), max(a, b)
        out = span_to_prefixes(lo, hi, bits)
        assert out == fewest_prefixes(lo, hi, bits)
        assert out[0][0] == lo
        last, length = out[-1]
        assert last + (1 << (bits - length)) - 1 == hi
