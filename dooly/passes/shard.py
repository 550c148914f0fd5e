"""Shard pass: the IR of one rank of a tensor-parallel engine, from the single-GPU IR and the engine's TP plan.

The taint labels say which config field every dim comes from, so sharding is a rewrite of labels, scoped by the
plan (transformers' `base_model_tp_plan` and the model's `_tp_plan`):
- a column-parallel projection of attention shards the heads: inside `self_attn`, `num_attention_heads` becomes
  `num_attention_heads//tp` and `num_key_value_heads` becomes `max(num_key_value_heads//tp, 1)` (KV heads are
  replicated when there are fewer than ranks), the paged KV cache included;
- a column-parallel projection of the MLP shards `intermediate_size` inside `mlp`;
- a row-parallel projection sums its partial outputs across ranks: an all-reduce op follows it;
- `colwise_gather_output` on the LM head shards `vocab_size` there and gathers the logits after it;
- `embedding_rowwise` splits the embedding table by rows: each rank looks up its part, an all-reduce sums them.
Collectives are IR ops like any other (`_c10d_functional.*`), their message size labelled by the same taint
(`T x hidden_size`, `R x vocab_size//tp`). Compute ops at sharded shapes get the signatures a single GPU would give
ops of those shapes, so they dedup against single-GPU measurements.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ..errors import DoolyError
from ..ir.expr import evaluate
from ..ir.graph import Dim, Graph, Op, TensorSpec, map_dims

ALL_REDUCE, ALL_GATHER = "_c10d_functional.all_reduce", "_c10d_functional.all_gather_into_tensor"
SHARDED = {  # module under each decoder layer -> the config fields a column-parallel split divides there
    "self_attn": {"num_attention_heads": "(num_attention_heads//tp)",
                  "num_key_value_heads": "max(num_key_value_heads//tp, 1)"},
    "mlp": {"intermediate_size": "(intermediate_size//tp)"},
}
IGNORED = {"replicated_with_grad_allreduce"}  # training-only: inference runs it as a plain replicated module


def _region(key: str) -> str | None:
    m = re.fullmatch(r"layers\.\*\.(self_attn|mlp)\.\w+", key)
    return m.group(1) if m else None


def _rename(text: str, fields: dict[str, str]) -> str:
    for name, sharded in fields.items():
        text = re.sub(rf"\b{name}\b", sharded, text)
    return text


def shard(graph: Graph, tp: int, plan: dict[str, str]) -> Graph:
    """`graph` as one of `tp` ranks runs it under `plan` ({module pattern: style}, as transformers writes it)."""
    config = dict(graph.config_values)
    for need in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        if need not in config:
            raise DoolyError(f"{graph.model}: the IR has no {need}, which tensor parallelism divides")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    if heads % tp or (kv % tp and tp % kv) or config["intermediate_size"] % tp:
        raise DoolyError(f"{graph.model}: {heads} heads, {kv} KV heads and intermediate size "
                         f"{config['intermediate_size']} do not split over {tp} ranks")
    regions: dict[str, dict[str, str]] = {}
    reduce_after, gather_after = [], []
    for key, style in plan.items():
        region = _region(key)
        module = f"model.{key}" if key.startswith("layers.") else key
        if style == "colwise" and region:
            regions[f"model.layers.*.{region}"] = SHARDED[region]
        elif style == "rowwise" and region:
            reduce_after.append(module)
        elif style == "embedding_rowwise" and key == "embed_tokens":  # each rank looks up its part of the table
            regions["model.embed_tokens"] = {"vocab_size": "(vocab_size//tp)"}
            reduce_after.append("model.embed_tokens")
        elif style == "colwise_gather_output" and key == "lm_head":
            if config["vocab_size"] % tp:
                raise DoolyError(f"{graph.model}: vocabulary {config['vocab_size']} does not split over {tp} ranks")
            regions["lm_head"] = {"vocab_size": "(vocab_size//tp)"}
            gather_after.append(module)
        elif style not in IGNORED:
            raise DoolyError(f"{graph.model}: tensor-parallel style {style!r} of {key} is not supported yet")
    values = {**config, "tp": tp}

    def sharded(op: Op) -> Op:
        fields = next((f for scope, f in regions.items() if op.scope == scope or op.scope.startswith(scope + ".")),
                      None)
        if fields is None:
            return op

        def dim(d: Dim) -> Dim:
            if d.kind not in ("config", "mix"):
                return d
            text = _rename(d.expr, fields)
            return Dim(text, d.kind, int(evaluate(text, values)) if d.kind == "config" else None)

        return map_dims(op, dim)

    ops: list[Op] = []
    moved: dict[int, int] = {}  # old op index -> index of the op that now produces its output
    for index, op in enumerate(graph.ops):
        op = sharded(op)
        op = replace(op, inputs=tuple(t if t.src is None else replace(t, src=moved[t.src]) for t in op.inputs))
        ops.append(op)
        moved[index] = len(ops) - 1
        if op.name not in ("aten.mm", "aten.addmm", "aten.linear", "aten.embedding"):
            continue
        out = replace(op.outputs[0], src=len(ops) - 1)
        if op.scope in reduce_after:
            collective = Op(ALL_REDUCE, (out,), (replace(out, src=None),), {"reduce_op": "sum", "group_size": tp},
                            op.scope, op.count, op.runs_per, op.when)
        elif op.scope in gather_after:
            rows, cols = out.shape
            gathered = TensorSpec(out.dtype, (Dim(f"({rows.expr})*tp", "mix" if rows.kind != "config" else "config",
                                                  None), cols))
            collective = Op(ALL_GATHER, (out,), (gathered,), {"group_size": tp}, op.scope, op.count, op.runs_per,
                            op.when)
        else:
            continue
        ops.append(collective)  # its output now stands for the projection's
        moved[index] = len(ops) - 1
    if not any(op.name == ALL_REDUCE for op in ops):
        raise DoolyError(f"{graph.model}: the TP plan names no row-parallel projection this IR has")
    return graph.with_ops(ops, tp=tp, config=values, tp_plan=dict(plan))
