"""Pieces pass: a vLLM step as the units its compiled mode runs, each with a canonical signature.

With torch.compile on, vLLM cuts the model's forward at its splitting ops (attention, the KV-cache write, the
linear-attention cores) and hands each graph between two cuts to inductor, which fuses it into a few kernels; at
batch sizes up to the largest captured one each such piece replays as a CUDA graph. Per-op timings of the eager
graph do not add up to that, so in the compiled mode the profiled unit is the piece:

- `first`: the embedding and the first layer's ops up to its first splitting op, once a step;
- `layer`: one layer's ops after its last splitting op followed by the next layer's ops before its first, once per
  layer boundary, and ops between two splitting ops of one layer, if any;
- `last`: the last layer's ops after attention and the final norm, once a step.

A piece's signature is its ops' exact signatures (config dims as values, the token count as the axis `M`), their
data attributes and how they feed each other: two models whose pieces do the same work on the same sizes share
it, whatever their fields are called. Splitting ops and the ops vLLM runs outside the compiled model (attention
metadata, logits, sampling) stay per-op signatures. A piece holds only ops sized by the token count `T`; a graph
with any other request dim inside a compiled region is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import DoolyError
from ..ir.expr import names, render, to_sympy
from ..ir.graph import Graph, Op
from .canonicalize import Signature, Use, signature, uses

# vLLM 0.24's default `compilation_config.splitting_ops` that Dooly's vLLM frontend captures
SPLITTING_OPS = frozenset({
    "vllm.unified_attention_with_output", "vllm.unified_mla_attention_with_output", "vllm.unified_kv_cache_update",
    "vllm.unified_mla_kv_cache_update", "vllm.qwen_gdn_attention_core", "vllm.mamba_mixer2", "vllm.linear_attention",
    "vllm.short_conv",
})
COMPILED_SCOPE = "model."  # the module vLLM compiles; ops outside it run eagerly around it
LAYER_SCOPE = "model.layers.*"


class PieceError(DoolyError):
    pass


@dataclass(frozen=True)
class Piece:
    role: str  # first, layer or last
    ops: tuple[int, ...]  # IR op indices, in the order the piece runs them
    count: int  # times a step
    signature: Signature


def _compiled(op: Op) -> bool:
    return op.scope.startswith(COMPILED_SCOPE) and op.name not in SPLITTING_OPS


def _runs(graph: Graph) -> tuple[list[int], list[tuple[int, list[list[int]]]], list[int]]:
    """The compiled ops before the layers, the layer ops as runs of one count (each cut at its splitting ops into
    segments), and the compiled ops after the layers."""
    prefix, runs, suffix = [], [], []
    for i, op in enumerate(graph.ops):
        if op.scope == LAYER_SCOPE or op.scope.startswith(LAYER_SCOPE + "."):
            if suffix:
                raise PieceError(f"op %{i} of a layer comes after the final ops: the layers are not contiguous")
            if not runs or runs[-1][0] != op.count:
                runs.append((op.count, [[]]))
            if op.name in SPLITTING_OPS:
                runs[-1][1].append([])
            else:
                runs[-1][1][-1].append(i)
        elif _compiled(op):
            (suffix if runs else prefix).append(i)
    if not runs:
        raise PieceError("no decoder layers in the IR: nothing to cut into pieces")
    if any(len(segments) < 2 for _, segments in runs):
        raise PieceError("a run of layers without a splitting op: the compiled region is not cut there")
    return prefix, runs, suffix


def partition(graph: Graph) -> list[tuple[str, list[int], int]]:
    """(role, op indices, count) of each piece, before signatures.

    The collapsed IR lists each layer group's template once, in layer order, with its count. The layers cycle
    through the runs of equal count: `cycles` times, the fewest of any run, so a run of count c passes from its
    last layer to the next run's first `cycles` times and from one of its own layers to the next c - cycles times,
    and the last run wraps to the first `cycles - 1` times: L - 1 layer boundaries in all.
    """
    prefix, runs, suffix = _runs(graph)
    cycles = min(count for count, _ in runs)
    out = [("first", prefix + runs[0][1][0], 1)]
    for n, (count, segments) in enumerate(runs):
        out += [("layer", s, count) for s in segments[1:-1]]
        if count > cycles:
            out.append(("layer", segments[-1] + segments[0], count - cycles))
        if n + 1 < len(runs):
            out.append(("layer", segments[-1] + runs[n + 1][1][0], cycles))
    out.append(("layer", runs[-1][1][-1] + runs[0][1][0], cycles - 1))
    out.append(("last", runs[-1][1][-1] + suffix, 1))
    return [p for p in out if p[1] and p[2]]


def _axis(dim):
    """A dim of a piece: a value, the free marker, or an expression of the token count renamed to the axis M."""
    if not isinstance(dim, str) or dim == "*":
        return dim
    used = names(dim)
    if used - {"T"}:
        raise PieceError(f"a compiled piece holds a dim {dim!r} over {', '.join(sorted(used - {'T'}))}: only the "
                         "token count T can size a piece")
    return render(to_sympy(dim).subs(to_sympy("T"), to_sympy("M"))) if used else dim


def _tensor(t: dict) -> dict:
    return {k: [_axis(d) for d in v] if k in ("shape", "strides") else v for k, v in t.items()}


def _attr(value):
    if isinstance(value, dict) and "sym" in value:
        return {"sym": _axis(value["sym"])}
    if isinstance(value, list):
        return [_attr(v) for v in value]
    return value


def piece_signature(graph: Graph, ops: list[int], attention: str) -> Signature:
    config = graph.config_values
    position = {i: n for n, i in enumerate(ops)}
    members = []
    for n, i in enumerate(ops):
        op = graph.ops[i]
        sig, _ = signature(op, config, attention, exact=True)
        c = sig.canonical
        members.append({
            "op": op.name, "inputs": [_tensor(t) for t in c["inputs"]], "outputs": [_tensor(t) for t in c["outputs"]],
            "attrs": {k: _attr(v) for k, v in {**c["attrs"], **c["data"]}.items()},
            # the earlier op of the piece feeding each input, else None: an input made before the piece (an op of the
            # same layer's part before attention, read after it, as Cohere's parallel MLP does, is one)
            "from": [position[t.src] if position.get(t.src, n) < n else None for t in op.inputs],
        })
    canonical = {"op": "dooly.piece", "family": "piece", "ops": members, "axes": ["M"]}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return Signature(hashlib.sha256(text.encode()).hexdigest()[:16], "piece", ("M",), canonical)


def pieces(graph: Graph, attention: str) -> list[Piece]:
    return [Piece(role, tuple(ops), count, piece_signature(graph, ops, attention))
            for role, ops, count in partition(graph)]


def piece_uses(graph: Graph, attention: str, exact: bool = False) -> list[Use]:
    """The step as compiled vLLM runs it: one use per piece, and per-op uses of everything outside the pieces
    (`exact`: their exact signatures, as a per-model profiler keeps them)."""
    cut = pieces(graph, attention)
    inside = {i for p in cut for i in p.ops}
    out = [Use(p.ops[0], p.signature, {"M": "T"}, p.count, "step", None) for p in cut]
    return out + [u for u in uses(graph, attention, exact) if u.op_index not in inside]


def dump(graph: Graph, cut: list[Piece]) -> str:
    """What compiled vLLM runs a step, as profiled: one line per piece with the IR ops it fuses."""
    lines = [f"# pieces of {graph.model}: the units profiled for vLLM's compiled mode (IR op numbers)"]
    for p in cut:
        spans, start = [], p.ops[0]
        for a, b in zip(p.ops, p.ops[1:] + (None,)):
            if b != a + 1:
                spans.append(f"%{start}" if start == a else f"%{start}..%{a}")
                start = b
        lines.append(f"piece {p.signature.hash} {p.role} x{p.count} ops {', '.join(spans)}")
    return "\n".join(lines) + "\n"
