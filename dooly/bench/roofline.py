"""Work of a signature at a request point (FLOPs, bytes moved) and its roofline time on a GPU.

Used where no measurement exists yet: to estimate what profiling will cost, and as a feature of the regressors.
Ceilings are the H100's as measured on the lent one (docs/findings.md).
"""

from __future__ import annotations

import math

from ..ir.expr import evaluate
from .timer import MAX_LAUNCHES, MIN_REPLAY_S, REPLAYS

PEAK_FLOPS = {"bf16": 790e12, "f16": 790e12, "f32": 60e12}
BANDWIDTH = 3.0e12
LAUNCH_S = 2.5e-6  # one kernel in a CUDA-graph replay
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1, "bool": 1}


def _numel(shape, point) -> int:
    n = 1
    for d in shape:
        if d != "*":  # a dim that does not change the work (see canonicalize.free_dims)
            n *= d if isinstance(d, int) else int(evaluate(d, point))
    return n


def _bytes(t: dict, point) -> float:
    return _numel(t["shape"], point) * ITEMSIZE.get(t["dtype"], 2)


def work(canonical: dict, point: dict[str, int]) -> tuple[float, float]:
    """(FLOPs, bytes) of one launch."""
    op = canonical["op"]
    if "operands" in canonical:  # a flat pointwise kernel over N elements
        n = point["N"]
        full = [d for d, kind in zip(canonical["dtypes"], canonical["operands"]) if kind == "full"]
        outs = canonical["dtypes"][len(canonical["operands"]):]
        return float(n), n * sum(ITEMSIZE.get(d, 2) for d in full + outs)
    ins, outs = canonical["inputs"], canonical["outputs"]
    if op in ("aten.mm", "aten.addmm", "aten._grouped_mm", "aten.bmm"):
        a, b = ins[-2:] if op == "aten.addmm" else ins[:2]
        m, k = [_numel([d], point) for d in a["shape"][-2:]]
        n = _numel([b["shape"][-1]], point)
        batch = _numel(a["shape"][:-2], point) if op == "aten.bmm" else 1
        moved = sum(_bytes(t, point) for t in (a, b, outs[0]))
        return 2.0 * batch * m * k * n, moved
    if canonical["family"] == "attention":
        q, k = ins[0], ins[1]
        b_h, t_q, d = _numel(q["shape"][:-2], point), _numel([q["shape"][-2]], point), _numel([q["shape"][-1]], point)
        t_k = _numel([k["shape"][-2]], point)
        return 4.0 * b_h * t_q * t_k * d, sum(_bytes(t, point) for t in ins + outs)
    if op in ("aten.index_select", "aten.embedding", "aten.index.Tensor"):
        return 0.0, 2 * _bytes(outs[0], point) + sum(_bytes(t, point) for t in ins[1:])
    if op == "aten.index_copy_":
        return 0.0, 2 * _bytes(ins[2], point) + _bytes(ins[1], point)
    written = sum(_bytes(t, point) for t in outs)
    read = sum(_bytes(t, point) for t in ins) if not op.endswith("_") else written
    return 0.0, read + written


def roofline_s(canonical: dict, point: dict[str, int], dtype: str = "bf16") -> float:
    if canonical.get("family") == "piece":  # a compiled piece: its ops' work, fused into few launches
        from ..passes.canonicalize import family

        return sum(roofline_s({**m, "family": family(m["op"])}, point, dtype) - LAUNCH_S
                   for m in canonical["ops"]) + LAUNCH_S
    flops, moved = work(canonical, point)
    compute = flops / PEAK_FLOPS.get(dtype, PEAK_FLOPS["bf16"]) if canonical["family"] in (
        "gemm", "attention", "moe") else 0.0
    return max(compute, moved / BANDWIDTH) + LAUNCH_S


# What one measured point costs the profiler (see dooly.bench.timer): set-up and graph capture, then the timed
# replays and at least two warm-up ones, of a graph of enough launches to last MIN_REPLAY_S.
POINT_SETUP_S = 0.015
REFINED_SHARE = 0.3  # refinement adds about this share of the initial grid (measured: see README)


def point_cost_s(canonical: dict, point: dict[str, int]) -> float:
    t = roofline_s(canonical, point)
    launches = max(1, min(MAX_LAUNCHES, math.ceil(MIN_REPLAY_S / t)))
    return POINT_SETUP_S + (REPLAYS + 2) * launches * t
