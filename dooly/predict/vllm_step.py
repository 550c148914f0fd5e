"""Latency of one vLLM 0.24 step from the store: what its compiled mode runs, piece by piece, as the engine pads it.

A step of T tokens from R requests runs, in vLLM's default mode (`FULL_AND_PIECEWISE`), as CUDA-graph replays at the
smallest captured size P >= T when T is at most the largest one, and as the compiled pieces at T otherwise:

- every compiled piece at P (`dooly.passes.pieces`, measured at every captured size);
- every layer's KV-cache write at P and its attention on the batch as it is: decoding requests (one new token)
  from the decode grid at their count and mean context, each other request from the prefill grid at its new and
  cached tokens, one launch floor shared;
- the ops vLLM runs outside the model (the logits of the R sampled rows, sampling) at R.

The engine's own work per step, measured on a tiny model (`python -m dooly.bench.vllm_engine calibrate`), runs on a
timeline of its own: with asynchronous scheduling the host enters a step's `execute_model` while the GPU may still
run the last one, prepares its inputs (the lead, before the model's first launch), launches it (the launch span, to
its sampling), and then, once the step before's output is back, processes that output and schedules the next (the
rest of a decode step's cycle, launch to next launch). So a step's GPU span depends on how far ahead of the GPU the
host entered it (`StepModel.span_us`): its first kernel runs once both the GPU is free and the inputs are ready, and
it cannot end before its last launch; a host entering long before the GPU is free hides its whole work.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..bench.vllm_engine import ADMIT_PHASE, CYCLE_PHASE, LAUNCH_PHASE, LEAD_PHASE
from ..environment import CAPTURE_SIZES, vllm_model_runner
from ..errors import DoolyError
from ..ir.expr import evaluate
from ..ir.graph import Graph

CALIBRATION_DEPTH = 2  # the tiny model's layers, for host rows that do not say theirs
ATTENTION_OPS = {"vllm.unified_attention_with_output"}


def padded(tokens: int, sizes=CAPTURE_SIZES) -> int:
    """The token count vLLM runs a step of `tokens` at: the next captured size, or itself above them all."""
    if tokens > sizes[-1]:
        return tokens
    return sizes[bisect.bisect_left(sizes, tokens)]


class Curve:
    """Piecewise linear in the axis, flat below the first point, the last segment's slope above the last."""

    def __init__(self, xs, ys):
        order = np.argsort(xs)
        self.xs, self.ys = np.asarray(xs, float)[order], np.asarray(ys, float)[order]
        if not len(self.xs):
            raise DoolyError("no measured points")

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[-1] or len(xs) == 1:
            return float(np.interp(x, xs, ys))
        return float(ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (x - xs[-1]))


class AttentionCurve:
    """Attention time of a batch from the uniform decode (R, c) and prefill (q, c) grids, log-spaced in R and q."""

    def __init__(self, rows: dict[tuple[int, int, int], float]):
        self.decode: dict[int, Curve] = {}
        self.prefill: dict[int, Curve] = {}
        by_r, by_q = {}, {}
        for (r, q, c), us in rows.items():
            if q == 1:
                by_r.setdefault(r, []).append((c, us))
            elif r == 1:
                by_q.setdefault(q, []).append((c, us))
        self.decode = {r: Curve(*zip(*v)) for r, v in by_r.items()}
        self.prefill = {q: Curve(*zip(*v)) for q, v in by_q.items()}
        if not self.decode or not self.prefill:
            raise DoolyError("the attention sweep has no decode or no prefill points")
        self.floor = min(rows.values())

    @staticmethod
    def _across(curves: dict[int, Curve], level: float, c: float) -> float:
        levels = sorted(curves)
        if level <= levels[0]:
            return curves[levels[0]](c)
        hi = next((i for i, v in enumerate(levels) if v >= level), len(levels) - 1)
        lo = max(hi - 1, 0)
        a, b = levels[lo], levels[hi]
        ya, yb = curves[a](c), curves[b](c)
        if a == b:
            return ya
        w = (math.log2(level) - math.log2(a)) / (math.log2(b) - math.log2(a))
        return ya + w * (yb - ya)

    def __call__(self, batch: list[tuple[int, int]]) -> float:
        decodes = [k - 1 for q, k in batch if q == 1]
        parts = []
        if decodes:
            parts.append(self._across(self.decode, len(decodes), sum(decodes) / len(decodes)))
        parts += [self._across(self.prefill, q, k - q) for q, k in batch if q > 1]
        return sum(parts) - self.floor * (len(parts) - 1)


class ByMode:
    """A host cost by tokens, apart on each side of the largest captured size: up to it a step replays CUDA graphs
    (one launch a piece), above it every kernel is launched from Python, so the cost jumps there and a curve through
    points on both sides would blur the jump. Each side reads its own points, or the other side's where it has none."""

    def __init__(self, points: list[tuple[int, float]], edge: int = CAPTURE_SIZES[-1]):
        points = sorted(points)
        graphs, eager = [p for p in points if p[0] <= edge], [p for p in points if p[0] > edge]
        self.edge = edge
        self.graphs = Curve(*zip(*(graphs or eager)))
        self.eager = Curve(*zip(*(eager or graphs)))

    def __call__(self, x: float) -> float:
        return (self.graphs if x <= self.edge else self.eager)(x)


@dataclass
class HostCost:
    """The engine's own cost of a step at one model depth: decode batches by requests, other steps by tokens."""

    decode: Curve | None
    prefill: ByMode | None  # one request
    mixed: ByMode | None  # a prefill among decodes

    def __call__(self, t: int, r: int) -> float:
        curve = self.decode if t == r else self.mixed if r > 1 and self.mixed else self.prefill
        return curve(r if t == r else t) if curve else 0.0


class PieceTerm(NamedTuple):
    """One use of a piece or of attention in the step, and how the step's sizes reach its curve: `kind` "padded" for
    a piece run at the step's padded token count (inside a CUDA graph), "rows" at the step's own sizes, "attention"
    over each request."""

    kind: str
    count: int
    curve: Curve | AttentionCurve
    binding: dict  # the piece's one axis -> its expression over T and R (empty for attention)


@dataclass
class StepModel:
    """A model's vLLM step, every use bound to its measured curve; the host's costs by the depth of the model they
    were measured on."""

    terms: list[PieceTerm]
    layers: int
    cycle: dict[int, Curve] = field(default_factory=dict)  # a decode step's launch to the next one's, by requests
    launch: dict[int, HostCost] = field(default_factory=dict)  # the host's span from execute_model to sampled
    admit: dict[int, Curve] = field(default_factory=dict)  # requests arriving together to their first step
    lead: dict[int, HostCost] = field(default_factory=dict)  # the host's span from execute_model to the model
    host_runner: str = "v2"  # the model runner the host costs were calibrated on

    def gpu_us(self, batch: list[tuple[int, int]]) -> float:
        t, r = sum(q for q, _ in batch), len(batch)
        p = padded(t)
        total = 0.0
        for kind, count, curve, binding in self.terms:
            if isinstance(curve, AttentionCurve):
                total += count * curve(batch)
            else:
                values = {"T": p, "R": r} if kind == "padded" else {"T": t, "R": r}
                (axis, expr), = binding.items()
                total += count * curve(evaluate(expr, values))
        return total

    def _at_depth(self, by_depth: dict, cost) -> float:
        """`cost` of a calibration (a depth's value in `by_depth`) at this model's depth: between the two calibrated
        depths around it, or along the line through the two nearest (piecewise steps launch per layer); one depth
        alone stands for all."""
        depths = sorted(by_depth)
        if not depths:
            return 0.0
        if len(depths) == 1:
            return cost(by_depth[depths[0]])
        hi = next((i for i, d in enumerate(depths) if d >= self.layers), len(depths) - 1)
        a, b = depths[max(hi - 1, 0)], depths[max(hi, 1)]
        ya, yb = cost(by_depth[a]), cost(by_depth[b])
        return max(0.0, ya + (yb - ya) * (self.layers - a) / (b - a))

    def launch_us(self, tokens: int, requests: int) -> float:
        """The host's time from a step's execute_model to its sampling launched, at this model's depth."""
        return self._at_depth(self.launch, lambda cost: cost(tokens, requests))

    def rest_us(self, requests: int) -> float:
        """The host's time after launching a step before it enters the next: the step before's output read and
        processed, the next step scheduled (a decode batch's cycle less its launch span)."""
        cycle = self._at_depth(self.cycle, lambda curve: curve(requests))
        return max(0.0, cycle - self.launch_us(requests, requests))

    def admit_us(self, requests: int) -> float:
        """The host's time from `requests` arriving together at an idle engine to its first step."""
        return self._at_depth(self.admit, lambda curve: curve(requests))

    def lead_us(self, tokens: int, requests: int) -> float:
        """The host's time from a step's execute_model to the model's first launch, at this model's depth."""
        return self._at_depth(self.lead, lambda cost: cost(tokens, requests))

    def span_us(self, batch: list[tuple[int, int]], ahead_us: float) -> float:
        """The step's GPU span when the host enters its execute_model `ahead_us` before the GPU finishes the work
        queued before it (negative: the GPU has idled that long): the span starts once the GPU is free, its first
        kernel waits for the host's input preparation too, and it ends no sooner than the host's last launch."""
        t, r = sum(q for q, _ in batch), len(batch)
        first = max(ahead_us, self.lead_us(t, r))
        return max(first + self.gpu_us(batch), self.launch_us(t, r)) - max(ahead_us, 0.0)


def vllm_environment(store, backend: str) -> str:
    names = [e.name for e in store.environments() if e.engine == "vllm" and e.attention_backend == backend]
    if not names:
        known = sorted({e.attention_backend for e in store.environments() if e.engine == "vllm"})
        raise DoolyError(f"{store.path}: no vLLM environment for {backend} (it has: {', '.join(known) or 'none'})")
    return names[0]


def _medians(store, env: str, sig) -> dict[str, float]:
    return {k: r["median_us"] for k, r in store.points(sig.hash, env, sig.family).items() if r["status"] == "ok"}


def _as_run(points: dict[str, float], axis: str) -> dict[int, float]:
    """A curve's points as vLLM runs them: above the captured sizes the eagerly launched timing (`"graph": 0`)
    where the store has it, else the replayed one."""
    out: dict[int, float] = {}
    for key, us in sorted(points.items(), key=lambda kv: "graph" not in kv[0]):
        point = json.loads(key)
        if point.get("graph", 1) == 0 and point[axis] <= CAPTURE_SIZES[-1]:
            continue
        out.setdefault(point[axis], us)
    return out


def step_model(graph: Graph, store, backend: str) -> StepModel:
    """Each use of the graph's compiled step bound to its measurements in the store's vLLM environment."""
    from ..passes.pieces import piece_uses

    env = vllm_environment(store, backend)
    terms: list[PieceTerm] = []
    for use in piece_uses(graph, backend):
        sig = use.signature
        points = _medians(store, env, sig)
        if not points:
            raise DoolyError(f"{graph.model}: {sig.family} signature {sig.hash} ({sig.op}) has no measurement in "
                             f"{env}: dooly profile --engine vllm --backend {backend} measures it")
        if sig.op in ATTENTION_OPS:
            batches = {(p["R"], p["q"], p["c"]): us for p, us in ((json.loads(k), v) for k, v in points.items())}
            terms.append(PieceTerm("attention", use.count, AttentionCurve(batches), {}))
            continue
        (axis,) = sig.axes
        xs, ys = zip(*sorted(_as_run(points, axis).items()))
        inside = sig.family == "piece" or graph.ops[use.op_index].scope.startswith("model.")
        terms.append(PieceTerm("padded" if inside else "rows", use.count, Curve(xs, ys), use.binding))
    launches: dict[int, dict[str, list]] = {}
    leads: dict[int, dict[str, list]] = {}
    cycles: dict[int, list] = {}
    admits: dict[int, dict[int, list]] = {}
    rows = store.host(env)
    calibrated_on = lambda row: f"v{row['point'].get('runner', 2)}"  # noqa: E731 - V2 rows name no runner
    runner = vllm_model_runner(graph.meta.architecture)
    if not any(calibrated_on(row) == runner for row in rows):
        runner = "v2"  # the runner calibrated first; `dooly validate` says where a model's own is missing
    for row in rows:
        point = row["point"]
        if calibrated_on(row) != runner:
            continue
        t, r = point["T"], point["R"]
        depth = point.get("layers", CALIBRATION_DEPTH)
        kind = "decode" if t == r else "prefill" if r == 1 else "mixed"
        if row["phase"] in (LAUNCH_PHASE, LEAD_PHASE):
            into = {LAUNCH_PHASE: launches, LEAD_PHASE: leads}[row["phase"]]
            into.setdefault(depth, {}).setdefault(kind, []).append((r if t == r else t, row["median_us"]))
        elif row["phase"] == CYCLE_PHASE and t == r:
            cycles.setdefault(depth, []).append((r, row["median_us"]))
        elif row["phase"] == ADMIT_PHASE:  # the shortest prompts: drawing their ids cost the harness least
            admits.setdefault(depth, {}).setdefault(r, []).append((t, row["median_us"]))
    curve = lambda v: Curve(*zip(*sorted(v))) if v else None  # noqa: E731
    by_mode = lambda v: ByMode(v) if v else None  # noqa: E731
    by_depth = lambda rows: {depth: HostCost(curve(k.get("decode")), by_mode(k.get("prefill")),  # noqa: E731
                                              by_mode(k.get("mixed"))) for depth, k in rows.items()}
    admit = {depth: Curve(*zip(*sorted((r, min(v)[1]) for r, v in by_r.items()))) for depth, by_r in admits.items()}
    return StepModel(terms, graph.meta.layers, {depth: curve(v) for depth, v in cycles.items()},
                     launch=by_depth(launches), admit=admit, lead=by_depth(leads), host_runner=runner)
