"""Taint pass: label every dim with its origin, computed from how the dim was computed, never from its value.

Capture makes each config field and each request quantity a symbol, so a dim arrives as the expression torch built
it from (`num_key_value_heads*head_dim`). A field that torch pinned to a number while tracing (e.g. `int(head_dim *
partial_rotary_factor)` in rotary embeddings) is recovered by `attribute`: the step is traced again with that field
set to another value, and each dim that moved is solved for as a linear function of the field.
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from ..ir.expr import evaluate, names, render, to_sympy
from ..ir.graph import REQUEST_SYMBOLS, Dim, Graph, Op, TensorSpec, alignment, map_dims


class AttributionError(ValueError):
    pass


def _solve(base: str, moved: list[tuple[int, str]], field: str, value: int) -> str:
    """The expression of a dim that reads `base` when `field == value` and `moved[i][1]` when it is `moved[i][0]`."""
    e0 = to_sympy(base)
    slopes = {sympy.simplify((to_sympy(e) - e0) / (v - value)) for v, e in moved}
    if len(slopes) != 1:
        raise AttributionError(f"dim {base} is not linear in {field}")
    f = sympy.Symbol(field, integer=True, positive=True)
    return render(sympy.expand(e0 + slopes.pop() * (f - value)))


def _at(expr: str, field: str, value: int) -> str:
    """`expr` with `field` set to `value`: what it reads in a trace where the field is that number."""
    if field not in names(expr):
        return expr
    return render(to_sympy(expr).subs(sympy.Symbol(field, integer=True, positive=True), value))


def _in_layout_of(base: TensorSpec, moved: TensorSpec) -> list[str]:
    """The moved tensor's dims, one for each of the base's: strides the moved trace left out (it proved them
    contiguous, where the base could not) are the contiguous strides of its shape."""
    if len(moved.shape) != len(base.shape):
        raise AttributionError(f"a tensor of rank {len(base.shape)} has rank {len(moved.shape)} in the moved trace")
    exprs = [d.expr for d in moved.shape]
    if base.strides is None:
        return exprs
    if moved.strides is not None:
        return exprs + [d.expr for d in moved.strides]
    strides, stride = [], sympy.Integer(1)
    for d in reversed(moved.shape):
        strides.append(render(stride))
        stride = sympy.expand(stride * to_sympy(d.expr))
    return exprs + strides[::-1]


def _same(moved: str, base: str, others: dict) -> bool:
    return moved == base or sympy.simplify(to_sympy(moved) - to_sympy(base).subs(others)) == 0


def attribute(graph: Graph, perturbed: dict[str, list[tuple[int, list[Op]]]]) -> Graph:
    """Graph whose dims are written in terms of the perturbed fields too.

    `perturbed[field]` holds (value, ops) pairs: the same step traced with `field` set to `value`.
    """
    ops = list(graph.ops)
    for field, runs in perturbed.items():
        base_value = graph.config_values[field]
        # each moved trace holds the other perturbed fields at their values: a dim written with them is unmoved
        others = {to_sympy(f): graph.config_values[f] for f in perturbed if f != field}
        aligned = alignment(ops)
        for value, other in runs:
            if alignment(other) != aligned:
                raise AttributionError(f"tracing with {field}={value} ran other ops: cannot align the two steps")
        solved = []
        for i, op in enumerate(ops):
            flat = [d.expr for t in op.tensors() for d in t.dims()]
            moved = [[e for t, m in zip(op.tensors(), other[i].tensors()) for e in _in_layout_of(t, m)]
                     for _, other in runs]
            # a dim written with the field can still hold a number the field pinned (`head_dim - 64` past a partial
            # rotary slice of `int(0.5*head_dim)`): it is right as it is only where it gives each moved trace's dim
            exprs = iter([e if all(_same(m[j], _at(e, field, v), others) for (v, _), m in zip(runs, moved)) else
                          _solve(_at(e, field, base_value), [(v, m[j]) for (v, _), m in zip(runs, moved)], field,
                                 base_value)
                          for j, e in enumerate(flat)])
            solved.append(map_dims(op, lambda d: replace(d, expr=next(exprs))))
        ops = solved
    return graph.with_ops(ops)


def label(dim: Dim, config: dict[str, int]) -> Dim:
    used = names(dim.expr)
    unknown = used - config.keys() - REQUEST_SYMBOLS.keys()
    if unknown:
        raise AttributionError(f"dim {dim.expr} uses unknown symbols {sorted(unknown)}")
    request = used & REQUEST_SYMBOLS.keys()
    if not used:
        return Dim(dim.expr, "const", int(dim.expr))
    if not request:
        return Dim(dim.expr, "config", int(evaluate(dim.expr, config)))
    return Dim(dim.expr, "request" if used == request else "mix", None)


def taint(graph: Graph, perturbed: dict[str, list[tuple[int, list[Op]]]] | None = None) -> Graph:
    if perturbed:
        graph = attribute(graph, perturbed)
    config = graph.config_values
    return graph.with_ops([map_dims(op, lambda d: label(d, config)) for op in graph.ops])
