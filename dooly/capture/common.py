"""What the capture frontends share: the `Frontend` protocol the driver (`dooly.capture.capture`) runs, trace
results, layer kinds and counts, symbolic config fields and the pinned-field fallback."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from ..config import SHAPE_FIELDS, ModelConfig, build, hf_config
from ..errors import DoolyError
from ..ir.graph import Graph, Op, alignment

# Rotary embeddings split each head in two halves: a head_dim known to be even stays a symbol through them.
EVEN_FIELDS = {"head_dim"}
# Attributes that name a layer rather than configure it (vLLM modules keep their own path in `prefix`)
IDENTITY_ATTRS = {"layer_idx", "layer_id", "layer_index", "idx", "prefix", "layer_name"}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


@dataclass
class Trace:
    ops: list[Op]
    values: dict[str, int]  # config field values of this trace
    guards: list[str]
    pinned: set[str]  # config fields torch pinned to numbers while tracing
    reads: frozenset[str] = frozenset()  # config attributes read as the step ran


@dataclass
class Capture:
    graph: Graph
    # field -> (value, ops) of the step traced with that field moved, for fields torch pinned while tracing
    perturbed: dict[str, list[tuple[int, list[Op]]]]


class Frontend(Protocol):
    """An engine's serving step as the capture driver takes it, built for one model config and dtype."""

    name: ClassVar[str]  # the frontend, as `--frontend` and the IR's meta name it
    trace_sizes: ClassVar[dict[str, int]]  # each request symbol's value while tracing; the IR does not use them

    def layer_kinds(self, n_layers: int | None) -> list[tuple]:
        """The `structure` of each decoder layer of the model cut to `n_layers` (None: the full model)."""

    def trace(self, n_layers: int, pinned: dict[str, int]) -> Trace:
        """One step of the engine on the model cut to `n_layers`, the `pinned` fields set to those numbers."""

    def check(self, step: Trace) -> None:
        """Refuse, with the engine's reason, a step the engine would not serve this way."""

    def engine_meta(self, step: Trace, moved: Collection[str]) -> dict[str, Any]:
        """The IR meta fields only the engine knows: architecture, engine, its version, attention, the config
        fields the step reads (`moved`: the pinned fields traced again), sliding window, engine settings."""


def structure(layer: nn.Module) -> tuple:
    """What makes two decoder layers run the same ops: module classes, their scalar settings, parameter shapes."""
    parts = []
    for name, m in layer.named_modules():
        scalars = tuple(sorted((k, v) for k, v in vars(m).items()
                               if not k.startswith("_") and k not in IDENTITY_ATTRS
                               and isinstance(v, (int, float, str, bool, type(None)))))
        params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in m.named_parameters(recurse=False))
        parts.append((name, type(m).__name__, scalars, params))
    return tuple(parts)


def layer_counts(kinds: list[tuple], n: int) -> dict[int, int]:
    """How many layers of the full model each of the first `n` (traced) layers stands for."""
    counts = {}
    for i in range(n):
        same = [j for j in range(n) if kinds[j] == kinds[i]]
        total = sum(k == kinds[i] for k in kinds)
        counts[i] = total // len(same) + (total % len(same) if i == same[0] else 0)
    return counts


def perturbed_value(field: str, value: int) -> int:
    """Another valid value for a field: counts double (heads stay divisible), sizes grow by 64 (stay even)."""
    counts = {"num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts"}
    return value * 2 if field in counts else value + 64


def in_parallel(first, second):
    """first() and second(), the first in a forked process when a second core is free (traces are CPU-bound)."""
    if (os.cpu_count() or 1) < 2 or multiprocessing.parent_process() is not None:
        return first(), second()
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        try:
            send.send(("ok", first()))
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            send.send(("error", e))

    process = ctx.Process(target=child)
    process.start()
    result = second()
    status, value = receive.recv()
    process.join()
    if status == "error":
        raise value
    return value, result


def trace_with_fallback(trace: Callable[[dict[str, int]], Trace]) -> tuple[Trace, dict]:
    """`trace({})`, plus, for each field torch pinned to a number in it, the trace with that field moved.

    A pinned field is already a number throughout the first trace; the moved traces let the taint pass solve for
    how every dim depends on it.
    """
    step = trace({})
    pinned = {f: step.values[f] for f in step.pinned}
    perturbed = {}
    for field, value in pinned.items():
        try:
            moved = trace({**pinned, field: perturbed_value(field, value)})
        except DoolyError:
            continue  # the model refuses the field moved: a setting of its code rather than a size, kept a number
        if alignment(moved.ops) == alignment(step.ops):  # else it chose the ops: a setting too
            perturbed[field] = [(moved.values[field], moved.ops)]
    return step, perturbed


def shape_values(config) -> dict[str, int]:
    """The shape fields of a transformers config object, defaults included (e.g. a `head_dim` it derived)."""
    aliases = getattr(config, "attribute_map", {})  # e.g. num_experts -> num_local_experts: one field, one name
    return {f: getattr(config, f) for f in SHAPE_FIELDS if f not in aliases and type(getattr(config, f, None)) is int}


def decoder_layers(model: nn.Module, n: int) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise DoolyError(f"{type(model).__name__}: cannot find its {n} decoder layers")


def prefix_config(cfg: ModelConfig, n: int, **overrides):
    """The config cut to its first `n` layers, its per-layer lists too (`layer_types`, Llama-4's `no_rope_layers`)."""
    per_layer = {k: v[:n] for k, v in cfg.data.items() if isinstance(v, list) and len(v) == cfg.num_layers}
    return hf_config(cfg, num_hidden_layers=n, **{**per_layer, **overrides})


# Integer fields that are not sizes of the step's tensors: token ids, the depth (cut for tracing), the sliding
# window (the engine sizes its cache groups by it, outside the traced step).
NOT_SIZES = re.compile(r"(_token_id|_token_index|_id)$|^num_hidden_layers$|^sliding_window$")


def text_config(cfg: ModelConfig, n_layers: int | None = None, /, **overrides):
    """The config of the text model the engine runs (a composite config's `get_text_config()`), cut to its first
    `n_layers` decoder layers: every per-layer list is cut with the depth."""
    full = build(cfg.model_type, cfg.data, cfg.name).get_text_config()
    if n_layers is None and not overrides:
        return full
    data = full.to_dict()
    stored = getattr(full, "attribute_map", {})
    if n_layers is not None:
        depth = full.num_hidden_layers
        data.update({k: v[:n_layers] for k, v in data.items() if isinstance(v, list) and len(v) == depth})
        overrides = {"num_hidden_layers": n_layers, **overrides}
    data.update({stored.get(k, k): v for k, v in overrides.items()})
    return build(full.model_type, data, cfg.name)


@contextlib.contextmanager
def recorded_reads(config):
    """The names of the config attributes read while the block runs (a model reading its config as it is built)."""
    names: set[str] = set()
    cls = type(config)

    def getattribute(self, name):
        names.add(name)
        return cls.__getattribute__(self, name)

    config.__class__ = type(cls.__name__, (cls,), {"__getattribute__": getattribute})
    try:
        yield names
    finally:
        config.__class__ = cls


def size_fields(config, reads: set[str]) -> dict[str, int]:
    """Every integer field of a text config that its model reads, under its standard name (GPT-2's `n_embd` is
    `hidden_size`).

    A model that reads `head_dim` with a fallback (`getattr(config, "head_dim", hidden_size // heads)`) gets it as a
    field of its own, which the taint pass can recover where rotary embeddings pin it to a number.
    """
    alias = {stored: name for name, stored in getattr(config, "attribute_map", {}).items()}
    out = {}
    for attr, value in vars(config).items():
        standard = alias.get(attr, attr)
        # the common name where the class stores a field under its own (GPT-2's n_embd): one field, one name
        name = standard if attr not in SHAPE_FIELDS and standard in SHAPE_FIELDS else attr
        read = attr in reads or standard in reads
        # judged by the standard name too: GPT-2's n_layer is the depth, which tracing cuts
        sized = not NOT_SIZES.search(attr) and not NOT_SIZES.search(standard)
        if type(value) is int and not attr.startswith("_") and read and sized:
            out[name] = value
    if "head_dim" in reads and getattr(config, "head_dim", None) is None:
        out["head_dim"] = config.hidden_size // config.num_attention_heads
    return out


def symbolic_fields(config, values: dict[str, int], pinned: dict[str, int], symbols) -> None:
    """Set each field of `values` on `config` as a SymInt of `symbols`, but the `pinned` ones, which stay numbers."""
    for field, value in values.items():
        if field not in pinned:
            set_field(config, field, symbols.symint(field, value, even=field in EVEN_FIELDS))


def set_field(config, name: str, value) -> None:
    """Set a field under the name the config class stores it as, bypassing its validation (a SymInt value)."""
    object.__setattr__(config, getattr(config, "attribute_map", {}).get(name, name), value)
