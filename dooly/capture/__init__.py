"""Capture frontends: an engine's serving step, traced on the CPU from a model config alone.

`capture` is the one driver: it asks a `Frontend` (one per engine) for its layer kinds, traces the fewest first
layers that hold every kind, traces again each field torch pinned to a number, and returns a `Capture`: the lowered
IR graph (dims as expressions over config fields and request symbols) and those moved traces.
"""

from __future__ import annotations

from ..config import ModelConfig, first_line
from ..errors import DoolyError
from ..ir.graph import Graph, GraphMeta
from .common import Capture, Frontend, layer_counts, trace_with_fallback

FRONTENDS = ("transformers", "vllm")


def frontend_of(name: str, cfg: ModelConfig, dtype: str) -> Frontend:
    if name == "vllm":
        try:
            from .vllm_frontend import VllmFrontend
        except ImportError as e:
            raise DoolyError(f"the vllm frontend needs the 'vllm' extra installed ({e})") from None
        return VllmFrontend(cfg, dtype)
    from .transformers_cb import TransformersFrontend

    return TransformersFrontend(cfg, dtype)


def capture(cfg: ModelConfig, frontend: str = "transformers", dtype: str = "bf16") -> Capture:
    if frontend not in FRONTENDS:
        raise DoolyError(f"unknown frontend {frontend!r} (choose from {', '.join(FRONTENDS)})")
    if dtype not in ("bf16", "f16"):
        raise DoolyError(f"unsupported dtype {dtype!r} (bf16 or f16)")
    try:
        return _capture(frontend_of(frontend, cfg, dtype), cfg, dtype)
    except DoolyError:
        raise
    except Exception as e:  # noqa: BLE001 - the model's or the engine's own reason, as one line
        raise DoolyError(f"{cfg.name}: {cfg.model_type}: the engine cannot run this model: {first_line(e)}") from None


def _capture(engine: Frontend, cfg: ModelConfig, dtype: str) -> Capture:
    kinds = engine.layer_kinds(None)
    n = max(kinds.index(kind) for kind in kinds) + 1  # the fewest first layers that hold every kind
    if engine.layer_kinds(n) != kinds[:n]:
        raise DoolyError(f"{cfg.name}: a model cut to {n} layers is not the full model's first {n} layers")
    step, perturbed = trace_with_fallback(lambda pinned: engine.trace(n, pinned))
    engine.check(step)
    meta = GraphMeta(model_type=cfg.model_type, frontend=engine.name, dtype=dtype, tp=1,
                     pinned_fields=tuple(sorted(perturbed)), request_symbols=tuple(sorted(engine.trace_sizes)),
                     layers=cfg.num_layers, layer_counts=layer_counts(kinds, n), assumes=tuple(step.guards),
                     **engine.engine_meta(step, perturbed))
    return Capture(Graph(cfg.name, meta, step.ops), perturbed)
