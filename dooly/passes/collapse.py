"""Layer collapse: identical decoder layers become one layer whose ops carry the layer count.

Two layers are identical when they run the same ops on the same dims with the same attributes, reading the same
positions inside the layer. Layers that differ (sliding-window vs full attention, dense vs MoE) stay apart. A layer
traced once on behalf of many (capture traces one layer of each kind) brings its multiplicity from
`meta.layer_counts`.
"""

from __future__ import annotations

import json
from dataclasses import replace

from ..ir.graph import LAYER, Graph, LayerGroup, Op


def layer_of(op: Op) -> int | None:
    m = LAYER.search(op.scope)
    return None if m is None else int(m.group(3))


def _layer_key(ops: list[Op], start: int) -> tuple:
    """Content of a layer's ops, with producers inside the layer numbered from its first op.

    A tensor from outside the layer (the previous layer's output, a weight, a KV-cache buffer that the engine's
    layer groups share) counts as just that: from outside.
    """
    end = start + len(ops)

    def tensor(t):
        src = t.src - start if t.src is not None and start <= t.src < end else None
        return (t.dtype, t.shape, t.strides, src)

    return tuple((op.name, LAYER.sub(r"\1\2.*", op.scope), json.dumps(op.attrs, sort_keys=True),
                  tuple(map(tensor, op.inputs)), tuple(map(tensor, op.outputs)), op.runs_per, op.when) for op in ops)


def collapse(graph: Graph) -> Graph:
    multiplicity = graph.meta.layer_counts
    runs: dict[int, list[int]] = {}  # layer -> indices of its ops
    for i, op in enumerate(graph.ops):
        layer = layer_of(op)
        if layer is not None:
            runs.setdefault(layer, []).append(i)
    for layer, idx in runs.items():
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise ValueError(f"ops of layer {layer} are not contiguous: cannot collapse")

    keep: dict[int, int] = {}  # representative layer -> total count
    same_as: dict[int, int] = {}  # layer -> its representative
    groups: dict[tuple, int] = {}
    for layer in sorted(runs):
        idx = runs[layer]
        key = _layer_key([graph.ops[i] for i in idx], idx[0])
        rep = groups.setdefault(key, layer)
        same_as[layer] = rep
        keep[rep] = keep.get(rep, 0) + multiplicity.get(layer, 1)

    new_index: dict[int, int] = {}
    out: list[Op] = []
    for i, op in enumerate(graph.ops):
        layer = layer_of(op)
        if layer is not None and same_as[layer] != layer:
            continue  # ops of a dropped layer map onto the same position of its representative
        new_index[i] = len(out)
        if layer is not None:
            op = replace(op, scope=LAYER.sub(r"\1\2.*", op.scope), count=op.count * keep[layer])
        out.append(op)
    for layer, rep in same_as.items():
        for offset, i in enumerate(runs[layer]):
            new_index.setdefault(i, new_index[runs[rep][offset]])

    fix = lambda t: t if t.src is None else replace(t, src=new_index[t.src])  # noqa: E731
    out = [replace(op, inputs=tuple(map(fix, op.inputs))) for op in out]
    layer_groups = tuple(LayerGroup(tuple(sorted(lyr for lyr, r in same_as.items() if r == rep)), n)
                         for rep, n in keep.items())
    return graph.with_ops(out, layer_groups=layer_groups)
