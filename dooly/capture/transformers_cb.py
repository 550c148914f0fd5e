"""Frontend: one serving step of transformers' continuous-batching engine (`paged|sdpa`), on fake tensors.

The step is driven through the engine's own objects, built from the config alone: its `PagedAttentionCache`,
`ContinuousBatchingIOs` (static buffers, mask reset) and `ModelRunner` (forward, logits selection, sampling). Only
the batch bookkeeping that the engine does in Python (which requests, which cache slots) is replaced by symbols:

- T tokens packed in `input_ids[1, T]`, R requests (`logits_indices[R]`, `cu_seq_lens_q[R + 1]`),
- K keys for full-attention layers (`read_index[K]`, mask `[T, K]`), Ks for sliding-window layers,
- q, k for the per-request mask blocks the engine builds one request at a time.

Model config fields are symbols too, so every dim comes out as the expression torch computed it from.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import replace

import torch
import torch.nn as nn

from ..config import ModelConfig, first_line
from ..errors import DoolyError
from ..ir.expr import names, render, to_sympy
from ..ir.graph import Op, When, map_dims
from ..transformers_engine import (
    ATTENTION,
    BLOCK_SIZE,
    ENGINE,
    FALLBACK_ATTENTION,
    model_class,
    no_weight_init,
    paged_cache,
)
from .common import (
    DTYPES,
    Trace,
    decoder_layers,
    in_parallel,
    recorded_reads,
    size_fields,
    structure,
    symbolic_fields,
    text_config,
)
from .lower import lower
from .recorder import Recorder
from .symbolic import SymbolTable

# Engine settings used while tracing: the engine's defaults where they exist (its block size, 8192 tokens per
# batch); the cache pool is a fixed size so that cache-reading ops of different models can share signatures.
NUM_BLOCKS, MAX_BATCH_TOKENS = 512, 8192
TRACE_SIZES = {"T": 37, "R": 5, "K": 901, "Ks": 263, "q": 11, "k": 397}  # the IR does not use them
ATTENTION_OPS = {"aten.scaled_dot_product_attention", "aten.bmm", "aten.matmul", "aten.mm", "aten.baddbmm"}
KEY_SYMBOLS = {"K", "Ks"}


def full_model(config) -> tuple[nn.Module, set[str]]:
    """The full-depth model on the meta device, and the config fields it read while being built."""
    cls = model_class(config)
    with torch.device("meta"), no_weight_init(), recorded_reads(config) as reads:
        model = cls(config)
    return model, reads


def check_causal(model: nn.Module, cfg: ModelConfig) -> None:
    """Refuse an encoder: a layer whose attention module attends both ways (BERT-like families with `is_decoder`
    false, the default of their configs). The engine's paged attention is causal whatever the module asks, so it would
    serve another model than the one `generate` runs."""
    for layer in decoder_layers(model, cfg.num_layers):
        both_ways = next((m for m in layer.modules() if getattr(m, "is_causal", None) is False), None)
        if both_ways is not None:
            raise DoolyError(f"{cfg.name}: {cfg.model_type}: its attention ({type(both_ways).__name__}) is "
                             f"bidirectional, an encoder's: the engine's paged attention is causal, so it would serve "
                             f"another model (set is_decoder to true to run it as a causal LM)")


def attention_of(model: nn.Module) -> str:
    """The engine's attention for this model: `paged|sdpa`, or `paged|eager` where the class refuses sdpa."""
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, ImportError):
        return FALLBACK_ATTENTION
    return ATTENTION


def _set_io_sizes(io, cache, T, R, K, Ks):
    group_keys = [K if cache.sliding_windows[group[0]] == 1 else Ks for group in _groups(cache)]
    io.num_q_tokens, io.max_kv_read, io.num_request_in_batch = T, K - T, R
    io.true_write_sizes = [T] * cache.num_groups
    io.true_read_sizes = group_keys
    io.total_seqlen_k = {t: (K if t == "full_attention" else Ks) for t in io.cumulative_seqlens_k}
    io.max_seqlen_q, io.max_seqlen_k = 1, dict.fromkeys(io.cumulative_seqlens_k, 1)


def _groups(cache) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for layer, (g, _) in cache.layer_index_to_group_indices.items():
        groups.setdefault(g, []).append(layer)
    return [groups[g] for g in sorted(groups)]


def trace_step(cfg: ModelConfig, n_layers: int, dtype: str, pinned: dict[str, int], reads_cache: bool,
               fields: dict[str, int], attention: str = ATTENTION) -> Trace:
    """Record one step of the engine on a model cut to its first `n_layers` decoder layers."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.continuous_batching.initialization import resolve_continuous_batching_config
    from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs
    from transformers.generation.continuous_batching.model_runner import ModelRunner
    from transformers.generation.continuous_batching.utils import build_attention_mask
    from transformers.generation.logits_process import LogitsProcessorList

    symbols = SymbolTable()
    config = text_config(cfg, n_layers, **pinned)
    values = {**fields, **pinned}
    symbolic_fields(config, values, pinned, symbols)
    T, R, K, Ks, q, k = (symbols.symint(n, TRACE_SIZES[n]) for n in ("T", "R", "K", "Ks", "q", "k"))
    torch_dtype = DTYPES[dtype]

    saved_dtype = torch.get_default_dtype()
    try:
        with symbols.fake_mode, no_weight_init():
            torch.set_default_dtype(torch_dtype)
            model = model_class(config)(config).eval()
            torch.set_default_dtype(saved_dtype)
            model.set_attn_implementation(attention)
            logits = ContinuousBatchingLogitsProcessorList(LogitsProcessorList())
            cb = resolve_continuous_batching_config(
                config=config, has_logit_processors=False, workload_hints=None,
                cb_config=ContinuousBatchingConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                                                   max_batch_tokens=MAX_BATCH_TOKENS))
            cache = paged_cache(config, cb, "cpu", torch_dtype)
            io = ContinuousBatchingIOs(cache, config, cb, torch.device("cpu"), torch_dtype, logits)
            runner = ModelRunner(logits, cb, io, cache, do_sample=False, return_logprobs=False)
    except DoolyError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's or the engine's own reason, as one line
        raise DoolyError(f"{cfg.name}: {cfg.model_type}: the engine cannot build this model: {first_line(e)}") from None
    finally:
        torch.set_default_dtype(saved_dtype)

    rec = Recorder("engine")
    rec.name_tensors({f"model.{n}" if not n.startswith("model.") else n: t
                      for n, t in [*model.named_parameters(), *model.named_buffers()]})
    rec.name_tensors({f"cache.key.{i}": t for i, t in enumerate(cache.key_cache)})
    rec.name_tensors({f"cache.value.{i}": t for i, t in enumerate(cache.value_cache)})

    def set_sizes():
        if reads_cache:
            _set_io_sizes(io, cache, T, R, K, Ks)
        else:
            _set_io_sizes(io, cache, T, R, T, T)
            io.max_kv_read, io.true_read_sizes = 0, [0] * cache.num_groups

    set_sizes()
    try:
        # a field the model reads only as the step runs counts too (Aria's experts read their top-k there)
        with (symbols.fake_mode, torch.no_grad(), rec, rec.whole_ops(), rec.module_scopes(model),
              recorded_reads(config) as reads):
            with rec.scope("engine.reset_static_tensors"):
                io._reset_static_tensors()
            set_sizes()  # the reset zeroes the per-batch totals, which the engine then fills in
            if io.attention_mask is not None:
                window = getattr(config, "sliding_window", None) or 1
                for layer_type, mask in io.attention_mask.items():
                    with rec.scope(f"engine.attention_mask.{layer_type}"):
                        build_attention_mask(mask, [0, q], [0, k], window if layer_type == "sliding_attention" else 1)
            batch = io.get_model_kwargs()
            with rec.scope("engine.compute_batch"):
                runner.compute_batch(model, batch)
    except Exception as e:  # noqa: BLE001 - the model's or the engine's own reason, as one line
        raise DoolyError(f"{cfg.name}: {cfg.model_type}: the engine's step raises: {first_line(e)}") from None
    ops = [replace(op, runs_per="request") if op.scope.startswith("engine.attention_mask") else op
           for op in lower(rec.graph, symbols)]
    return Trace(ops, values, symbols.guards(set(TRACE_SIZES), set(values)), symbols.pinned() & set(values),
                 frozenset(reads))


def _substitute(op: Op, mapping: dict[str, str]) -> Op:
    subs = {to_sympy(k): to_sympy(v) for k, v in mapping.items()}
    return map_dims(op, lambda d: replace(d, expr=render(to_sympy(d.expr).subs(subs))))


def _key(op: Op) -> tuple:
    return (op.name, op.scope, tuple((t.dtype, tuple(d.expr for d in t.dims())) for t in op.tensors()))


def merge_variants(general: list[Op], no_past: list[Op]) -> list[Op]:
    """One op list for both paths of the engine: ops only one path runs carry the condition of that path (the
    engine reads the cache only when some request has past tokens)."""
    flat = [_substitute(op, {"K": "T", "Ks": "T"}) for op in general]
    matcher = difflib.SequenceMatcher(None, [_key(o) for o in flat], [_key(o) for o in no_past], autojunk=False)
    merged: list[tuple[Op, When | None, int | None, int | None]] = []  # op, path, index in general, index in no_past
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            merged += [(general[a0 + i], None, a0 + i, b0 + i) for i in range(a1 - a0)]
            continue
        merged += [(general[i], When.PAST_KEYS, i, None) for i in range(a0, a1)]
        merged += [(no_past[i], When.NO_PAST_KEYS, None, i) for i in range(b0, b1)]
    from_general = {a: i for i, (_, _, a, _) in enumerate(merged) if a is not None}
    from_no_past = {b: i for i, (_, _, _, b) in enumerate(merged) if b is not None}
    out = []
    for op, when, a, _ in merged:
        remap = from_general if a is not None else from_no_past
        fix = lambda t: replace(t, src=None if t.src is None else remap[t.src])  # noqa: E731
        out.append(replace(op, when=when, inputs=tuple(map(fix, op.inputs))))
    return out


def trace_both(cfg: ModelConfig, n_layers: int, dtype: str, pinned: dict[str, int], fields: dict[str, int],
               attention: str = ATTENTION) -> Trace:
    """The step traced on both of the engine's paths (reading the cache or not), merged into one op list."""
    general, no_past = in_parallel(
        lambda: trace_step(cfg, n_layers, dtype, pinned, True, fields, attention),
        lambda: trace_step(cfg, n_layers, dtype, pinned, False, fields, attention))
    return Trace(merge_variants(general.ops, no_past.ops), general.values,
                 sorted(set(general.guards) | set(no_past.guards)), general.pinned | no_past.pinned,
                 general.reads | no_past.reads)


def tp_plan(cfg: ModelConfig) -> dict[str, str]:
    """How transformers splits the model over tensor-parallel ranks: the config's plan and the model class's."""
    config = text_config(cfg)
    return {**(config.base_model_tp_plan or {}), **(getattr(model_class(config), "_tp_plan", None) or {})}


def check_serving_step(ops: list[Op], name: str, model_type: str) -> None:
    """Refuse a step that bypasses the engine's paged interface: the model never writes the KV cache, runs no
    attention over its keys, or writes a layer's cache slots twice (each paged attention call writes its keys and
    values, and a second call with other values overwrites the first's)."""
    layer_ops = [op for op in ops if not op.scope.startswith("engine")]
    if not any(op.name == "aten.index_copy_" for op in layer_ops):
        raise DoolyError(f"{name}: {model_type}: it never writes the engine's paged KV cache (the model "
                         f"does not go through transformers' attention interface): the engine cannot serve it")
    if not any(op.name in ATTENTION_OPS and any(names(d.expr) & KEY_SYMBOLS for t in op.tensors() for d in t.shape)
               for op in layer_ops):
        raise DoolyError(f"{name}: {model_type}: it runs no attention over the cached keys: the engine "
                         f"cannot serve it")
    for op in layer_ops:
        if op.name != "aten.index_copy_" or op.inputs[0].src is None:
            continue
        before = ops[op.inputs[0].src]
        # layers of different attention groups share cache tensors, in blocks of their own: a rewrite within one layer
        if before.name == "aten.index_copy_" and before.scope == op.scope:
            raise DoolyError(f"{name}: {model_type}: its step writes the same KV-cache slots twice ({op.scope}: one "
                             f"layer calls attention twice over its cache with other values): the cache keeps the "
                             f"second write, so the first call reads the other's values in later steps and the "
                             f"engine serves it wrong")


class TransformersFrontend:
    """The `Frontend` of transformers' continuous-batching engine."""

    name = "transformers"
    trace_sizes = TRACE_SIZES

    def __init__(self, cfg: ModelConfig, dtype: str):
        self.cfg, self.dtype = cfg, dtype
        self.config = text_config(cfg)
        self.model, reads = full_model(self.config)
        check_causal(self.model, cfg)
        self.attention = attention_of(self.model)
        self.fields = size_fields(self.config, reads)

    def layer_kinds(self, n_layers: int | None) -> list[tuple]:
        if n_layers is None:
            return [structure(layer) for layer in decoder_layers(self.model, self.config.num_hidden_layers)]
        return [structure(layer) for layer in _traced_layers(self.cfg, n_layers)]

    def trace(self, n_layers: int, pinned: dict[str, int]) -> Trace:
        step = trace_both(self.cfg, n_layers, self.dtype, pinned, self.fields, self.attention)
        # fields read only as the step runs (Aria's experts read their top-k there); a head_dim derived for a model
        # that reads none (the engine asks for one with a fallback) is not one
        ran = {f: v for f, v in size_fields(self.config, step.reads).items()
               if f not in self.fields and getattr(self.config, f, None) is not None}
        if ran:
            self.fields = {**self.fields, **ran}
            step = trace_both(self.cfg, n_layers, self.dtype, pinned, self.fields, self.attention)
        return step

    def check(self, step: Trace) -> None:
        check_serving_step(step.ops, self.cfg.name, self.cfg.model_type)

    def engine_meta(self, step: Trace, moved: Collection[str]) -> dict:
        import transformers

        used = set(moved) | {n for op in step.ops for t in op.tensors() for d in t.dims() for n in names(d.expr)} | {
            n for op in step.ops for text in _sym_attrs(op.attrs) for n in names(text)}
        return dict(
            architecture=(self.cfg.data.get("architectures") or [type(self.model).__name__])[0],
            engine=ENGINE, engine_version=transformers.__version__, attention=self.attention,
            config={f: v for f, v in step.values.items() if f in used},
            # the engine reads through a window for the layers it groups as sliding (whatever the module says)
            sliding_window=self.config.sliding_window if any(
                d.expr == "Ks" for op in step.ops for t in op.tensors() for d in t.shape) else None,
            engine_config={"block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS, "max_batch_tokens": MAX_BATCH_TOKENS,
                           "sampling": "greedy"})


def _sym_attrs(value):
    """The dim expressions inside an op's attributes (`{"sym": "head_dim*num_key_value_heads"}`)."""
    if isinstance(value, dict):
        if set(value) == {"sym"}:
            yield value["sym"]
        else:
            for v in value.values():
                yield from _sym_attrs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _sym_attrs(v)


def _traced_layers(cfg: ModelConfig, n: int) -> nn.ModuleList:
    config = text_config(cfg, n)
    with torch.device("meta"), no_weight_init():
        model = model_class(config)(config)
    return decoder_layers(model, n)
