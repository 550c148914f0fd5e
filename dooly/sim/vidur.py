"""`dooly export-vidur CONFIG --store PATH --out DIR`: Vidur's profiling files for a model, from Dooly's predictions.

Vidur (microsoft/vidur) simulates from per-operator profiles: `compute/<device>/<model>/mlp.csv` (one row per token
count: the decoder layer's ops, one column group each) and `attention.csv` (prefill rows by chunk and cached
context, decode rows by batch size and context; the KV-cache write by tokens), times in milliseconds. Dooly fills
them for any model its store can predict, profiled as such or not: each of the layer's IR ops goes to the Vidur op
whose role it plays, per layer; the engine's attention mask, built once a step for the whole batch, is spread over
the layers' attention. Vidur keeps one statistic, the median: Dooly's prediction is that median, and min, max and
mean repeat it (std 0). Ops outside the decoder layers that Vidur has no column for (final norm, LM head,
sampling, batch preparation) are left out, and their share of the step is printed. Mixture-of-experts layers have
no place in Vidur's layout and are refused.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from ..errors import DoolyError

MLP_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
ATTENTION_OPS = ("attn_prefill", "attn_decode", "attn_kv_cache_save")
STATS = ("min", "max", "mean", "median", "std")
MLP_KEYS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp", "num_tokens",
            "num_tensor_parallel_workers")
ATTENTION_KEYS = ("n_embd", "n_q_head", "n_kv_head", "block_size", "num_tensor_parallel_workers", "batch_size",
                  "prefill_chunk_size", "kv_cache_size", "is_prefill")
ATTENTION_KERNELS = ("aten.scaled_dot_product_attention", "aten.index_select", "aten.clone")

# (scope under model.layers.*, op names or None for any) -> Vidur op; the first match wins
LAYER_ROLES = (
    (r"input_layernorm", None, "input_layernorm"),
    (r"(post_attention|pre_feedforward|post_feedforward)_layernorm", None, "post_attention_layernorm"),
    (r"self_attn\.(o_proj|dense)", None, "attn_post_proj"),
    (r"self_attn\.\w*proj", None, "attn_pre_proj"),
    (r"self_attn\.(q_norm|k_norm|rotary_emb)", None, "attn_rope"),
    (r"self_attn", ("aten.index_copy_",), "attn_kv_cache_save"),
    (r"self_attn", ATTENTION_KERNELS, "attention"),
    (r"self_attn", None, "attn_rope"),
    (r"mlp\.(gate_proj|up_proj|gate_up_proj)", None, "mlp_up_proj"),
    (r"mlp\.down_proj", None, "mlp_down_proj"),
    (r"mlp(\.act_fn|\.activation_fn)?", None, "mlp_act"),
    (r"", None, "add"),
)
TOKENS = sorted({*range(1, 65), *range(72, 513, 8), *range(576, 4097, 64), *range(4352, 16385, 256)})
CHUNKS = list(range(32, 4097, 32))
CONTEXTS = [0, *range(256, 16385, 256)]
DECODE_BATCHES = sorted({*range(1, 33), *range(40, 257, 8)})


def role(scope: str, name: str) -> str | None:
    """The Vidur op that an IR op of the serving step plays a part of, per layer (None: Vidur has no column)."""
    if scope == "model.embed_tokens":
        return "emb"
    if scope.startswith("engine.attention_mask"):
        return "attention"
    if not scope.startswith("model.layers.*"):
        return None
    inner = scope[len("model.layers.*"):].lstrip(".")
    for pattern, names, vidur_op in LAYER_ROLES:
        if re.fullmatch(pattern, inner) and (names is None or name in names):
            return vidur_op
    raise DoolyError(f"no Vidur op plays the part of {name} at {scope} (Vidur's layout has no mixture-of-experts "
                     "or other layer parts)")


def model_fields(graph) -> dict:
    c = graph.meta.config
    if "num_local_experts" in c or "num_experts" in c:
        raise DoolyError(f"{graph.model} is a mixture-of-experts model: Vidur's profile layout has no expert ops")
    gated = any(op.scope.endswith(("mlp.gate_proj", "mlp.gate_up_proj")) for op in graph.ops)
    return {"n_head": c["num_attention_heads"], "n_kv_head": c["num_key_value_heads"], "n_embd": c["hidden_size"],
            "n_expanded_embd": c["intermediate_size"], "vocab_size": c["vocab_size"], "use_gated_mlp": gated}


def _per_layer(p, layers: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each Vidur op's µs per layer in each batch, and the µs of ops Vidur has no column for."""
    out = {op: np.zeros(len(p.parts.gpu_us)) for op in (*MLP_OPS, "attention", "attn_kv_cache_save")}
    left_out = np.zeros(len(p.parts.gpu_us))
    for name, scope, _, us in p.ops:
        vidur_op = role(scope, name)
        if vidur_op is None:
            left_out += us
            continue
        out[vidur_op] += us if vidur_op == "emb" else us / layers
    return out, left_out


def _stat_columns(ops) -> list[str]:
    return [f"time_stats.{op}.{s}" for op in ops for s in STATS]


def _write(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _times(op: str, ms: float) -> dict:
    return {f"time_stats.{op}.{s}": (0.0 if s == "std" else ms) for s in STATS}


def export(graph, predictor, out: Path, block_size: int = 256) -> dict:
    """Write mlp.csv and attention.csv for `graph` into `out`; returns what was written and left out."""
    layers = graph.meta.layers
    fields = model_fields(graph)
    out.mkdir(parents=True, exist_ok=True)
    p = predictor.predict([[(n, n)] for n in TOKENS])
    per_layer, left_out = _per_layer(p, layers)
    mlp_rows = []
    for i, n in enumerate(TOKENS):
        row = {k: v for op in MLP_OPS for k, v in _times(op, float(per_layer[op][i]) / 1e3).items()}
        mlp_rows.append(row | fields | {"num_tokens": n, "num_tensor_parallel_workers": 1})
    _write(out / "mlp.csv", _stat_columns(MLP_OPS) + list(MLP_KEYS), mlp_rows)

    cases = [(1, c, kv, True) for c in CHUNKS for kv in CONTEXTS] + \
            [(b, 0, kv, False) for b in DECODE_BATCHES for kv in CONTEXTS[1:]]
    batches = [[(c, kv + c)] if prefill else [(1, kv + 1)] * b for b, c, kv, prefill in cases]
    a = predictor.predict(batches)
    attention, _ = _per_layer(a, layers)
    attention_rows = []
    for i, (b, c, kv, prefill) in enumerate(cases):
        ms = float(attention["attention"][i]) / 1e3
        row = _times("attn_prefill", ms if prefill else 0.0) | _times("attn_decode", 0.0 if prefill else ms)
        row |= _times("attn_kv_cache_save", float(attention["attn_kv_cache_save"][i]) / 1e3)
        attention_rows.append(row | {"n_embd": fields["n_embd"], "n_q_head": fields["n_head"],
                                     "n_kv_head": fields["n_kv_head"], "block_size": block_size,
                                     "num_tensor_parallel_workers": 1, "batch_size": b, "prefill_chunk_size": c,
                                     "kv_cache_size": kv, "is_prefill": prefill})
    _write(out / "attention.csv", _stat_columns(ATTENTION_OPS) + list(ATTENTION_KEYS), attention_rows)
    model = {"name": graph.model, "num_layers": layers, **fields, "max_model_len": CONTEXTS[-1],
             "block_size": block_size}
    (out / "model.json").write_text(json.dumps(model, indent=1))
    share = float(np.mean(left_out / p.parts.gpu_us))
    return {"mlp_rows": len(mlp_rows), "attention_rows": len(attention_rows), "left_out_share": share,
            "extrapolated": sorted(set(p.extrapolated) | set(a.extrapolated))}
