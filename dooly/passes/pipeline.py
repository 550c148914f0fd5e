"""The compiler's stages in order: capture one serving step, label its dims, collapse its layers, shard it; the
IR's contract (`verify`) checked after each pass."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import DoolyError
from ..ir import Graph
from ..ir.verify import verify
from .collapse import collapse
from .taint import AttributionError, taint


def compile_model(cfg: ModelConfig, frontend: str = "transformers", dtype: str = "bf16", tp: int = 1) -> Graph:
    from ..capture import capture

    if tp < 1:
        raise DoolyError(f"--tp must be a positive integer, got {tp}")
    if tp > 1 and frontend != "transformers":
        raise DoolyError("tensor parallelism is captured with the transformers frontend only (its TP plan)")
    captured = capture(cfg, frontend=frontend, dtype=dtype)
    try:
        graph = _verified(collapse(_verified(taint(captured.graph, captured.perturbed))))
    except AttributionError as e:
        raise DoolyError(f"{cfg.name}: {e}") from None
    if tp == 1:
        return graph
    from ..capture.transformers_cb import tp_plan
    from .shard import shard

    return _verified(shard(graph, tp, tp_plan(cfg)))


def _verified(graph: Graph) -> Graph:
    verify(graph)
    return graph
