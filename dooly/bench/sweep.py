"""Which request points a signature is measured at.

One axis (`M` rows, `N` elements, or one request symbol): a geometric grid, every power of two from 1 to the
axis limit, then adaptive refinement (`refine`): where a measured point is missed by more than
`REFINE_TOLERANCE` by linear interpolation between its neighbours, the intervals beside it get their midpoints
measured, again and again, so points gather where latency bends (wave quantisation of GEMMs, the end of the launch
floor of small kernels) and flat or linear stretches cost nothing beyond the grid.

Two axes (attention's queries `T` and keys `K`; a request's `q` and `k`): the grid of powers of two with `K >= T`
within the limits; refinement runs along the keys at each query count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from ..ir.expr import evaluate

# Largest request quantities profiled: tokens in a step, requests, keys (past + new) of all requests in a step,
# a request's keys (32k context plus its chunk), and elements of a pointwise op.
LIMITS = {"T": 16384, "R": 1024, "K": 262144, "Ks": 262144, "Kmax": 32768 + 16384, "Tmax": 16384, "q": 16384,
          "k": 32768 + 16384}
MAX_ELEMENTS = 1 << 31  # 4 GiB of bf16: above this a single op's inputs no longer fit beside a model
ATTENTION_WORK = 1 << 28  # T*K bound for two-axis points: a [T, K] bf16 mask of 512 MiB, ~15 ms of attention
KEY_STEP = 4  # keys grow by this factor along a two-axis grid; refinement fills in where latency bends
REFINE_TOLERANCE = 0.02
NOISE = 3.0  # a miss must also exceed this many times the measured spread (p90 - min) of the points involved
MIN_GAP = 1.25  # do not refine between points closer than this ratio
MAX_REFINED = 1.0  # refinement adds at most this share of a line's grid points


def powers_of_two(lo: int, hi: int) -> list[int]:
    out, v = [], 1
    while v <= hi:
        if v >= lo:
            out.append(v)
        v *= 2
    if out and out[-1] != hi and hi > lo:
        out.append(hi)
    return out or [lo]


def axis_limit(binding: dict[str, str], axis: str) -> int:
    """Largest value an axis takes when the IR's request symbols are at their limits."""
    expr = binding[axis]
    return max(1, int(evaluate(expr, LIMITS)))


def key_steps(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= KEY_STEP
    return out + [hi]


def initial_points(axes: tuple[str, ...], limits: dict[str, int], work: int = ATTENTION_WORK) -> list[dict[str, int]]:
    if not axes:
        return [{}]
    if len(axes) == 1:
        (a,) = axes
        return [{a: v} for v in powers_of_two(1, min(limits[a], MAX_ELEMENTS))]
    if len(axes) == 2:
        outer, inner = _pair(axes)
        out = []
        for t in powers_of_two(1, limits[outer]):
            for k in key_steps(t, max(t, min(limits[inner], work // t))):
                out.append({outer: t, inner: k})
        return out
    # more axes: the corners and centre of the box is all that is measured
    return [dict(zip(axes, c)) for c in _corners([powers_of_two(1, limits[a]) for a in axes])]


def _pair(axes: tuple[str, ...]) -> tuple[str, str]:
    """(outer, inner): queries outside, keys inside, so that keys >= queries."""
    for q, k in (("T", "K"), ("q", "k"), ("M", "K")):
        if set(axes) == {q, k}:
            return q, k
    return axes[0], axes[1]


def refine_axis(axes: tuple[str, ...]) -> str:
    """The axis refinement runs along: the only one, or the keys of a (queries, keys) pair."""
    return axes[0] if len(axes) == 1 else _pair(axes)[1]


def _corners(grids: list[list[int]]) -> list[tuple[int, ...]]:
    import itertools

    picks = [sorted({g[0], g[len(g) // 2], g[-1]}) for g in grids]
    return list(itertools.product(*picks))


def refine(measure: Callable[[dict[str, int]], float | None], along: str, points: dict[str, float | None],
           spread: dict[str, float] | None = None) -> int:
    """Add points along one axis where latency bends; `points` maps point keys to median µs (None: could not be
    measured) and grows in place; `spread` maps point keys to their measured p90 - min. Lines of points that agree
    on every other key are refined separately.

    A measured point that linear interpolation between its two neighbours misses by more than `REFINE_TOLERANCE`
    (and by more than `NOISE` times the spread of the three, so that timing noise is not chased) marks both of its
    intervals; each marked interval gets its (geometric) midpoint measured, and the test runs again, until no
    interval wider than `MIN_GAP` is marked or the line has grown by `MAX_REFINED`. Flat and linear stretches cost
    nothing beyond the grid. Returns how many points were added.
    """
    from ..store.db import point_key

    spread = spread if spread is not None else {}
    lines: dict[tuple, list[tuple[int, float, str]]] = {}
    for key, us in points.items():
        p = json.loads(key)
        if us is not None and along in p:
            lines.setdefault(tuple(sorted((k, v) for k, v in p.items() if k != along)), []).append((p[along], us, key))
    added = 0
    for at, line in lines.items():
        line.sort()
        allowance = max(1, int(MAX_REFINED * len(line)))
        while allowance > 0:
            marked = set()
            for (x0, y0, k0), (x1, y1, k1), (x2, y2, k2) in zip(line, line[1:], line[2:]):
                guess = y0 + (y2 - y0) * (x1 - x0) / (x2 - x0)
                noise = NOISE * max(spread.get(k, 0.0) for k in (k0, k1, k2))
                if abs(guess - y1) > max(REFINE_TOLERANCE * y1, noise):
                    marked |= {(x0, x1), (x1, x2)}
            todo = [(a, b) for a, b in sorted(marked) if b / a >= MIN_GAP and b - a >= 2][:allowance]
            if not todo:
                break
            for a, b in todo:
                mid = int(round(math.sqrt(a * b)))
                point = dict(at) | {along: mid}
                key = point_key(point)
                y = measure(point)
                added += 1
                allowance -= 1
                points[key] = y
                if y is not None:
                    line.append((mid, y, key))
            line.sort()
    return added
