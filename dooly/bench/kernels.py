"""How many kernels one engine step launches from the host, counted on a model's IR.

The host calibration stores these counts for each synthetic model it runs, and the host-time fit reads them back,
so the launch time per kernel carries over to any model through its own IR.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..environment import MATH
from ..ir.graph import When


@dataclass(frozen=True)
class KernelCount:
    """Kernels the forward launches (not the batch preparation): fixed, per request, and those launched only
    when some request reads past keys (K > T) or only when none does; and how many attention types (masks)."""

    fixed: float
    per_request: float
    reading: float
    fresh: float
    types: int

    @staticmethod
    def of(graph, attention: str) -> KernelCount:
        n: dict[When | str, float] = {"": 0.0, "request": 0.0, When.PAST_KEYS: 0.0, When.NO_PAST_KEYS: 0.0}
        per_attention = attention_launches(attention)
        for op in graph.ops:
            if not op.scope.startswith(("engine.reset", "engine.attention_mask")):
                launches = per_attention if op.name == "aten.scaled_dot_product_attention" else 1
                n[op.when or ("request" if op.runs_per == "request" else "")] += op.count * launches
        return KernelCount(n[""], n["request"], n[When.PAST_KEYS], n[When.NO_PAST_KEYS], len(attention_keys(graph)))

    def __call__(self, R, reads):
        return self.fixed + self.per_request * R + np.where(reads, self.reading, self.fresh)


VIEWS = {"aten.view", "aten.expand", "aten.transpose", "aten._unsafe_view", "aten.unsqueeze", "aten.permute"}


@functools.cache
def attention_launches(attention: str) -> int:
    """Kernels one attention call launches: one for a fused kernel; torch's math kernel is a decomposition into
    casts, scaling, two batched GEMMs and a softmax, counted here by running it on the CPU (views launch nothing)."""
    if attention != MATH:
        return 1
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        launches = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.launches += func.overloadpacket._qualified_op_name.replace("::", ".") not in VIEWS
            return func(*args, **(kwargs or {}))

    q, k = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16), torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    with Count():
        torch.ops.aten._scaled_dot_product_attention_math(q, k, k, torch.zeros(1, 1, 3, 5, dtype=torch.bfloat16))
    return Count.launches


def attention_keys(graph) -> list[str]:
    """The key symbols the model's attention ops read: ["K"], ["Ks"] (sliding-window layers only), or both."""
    keys = {d.expr for op in graph.ops if op.name == "aten.scaled_dot_product_attention"
            for d in op.inputs[1].shape if d.expr in ("K", "Ks")}
    return sorted(keys) or ["K"]

