"""`dooly plan CONFIG... --store PATH [--env ENV]`: what profiling these models would cost, with and without Dooly.

Models are taken in the order given, each against the store as the models before it would leave it: an op
signature measured for an earlier model (or already in the store) is not profiled again. The cost of a signature is
the GPU time its sweep took, from the store where it has been measured, otherwise an estimate: its sweep points,
each costed from a roofline time of the op (`dooly.bench.roofline`).

The baseline is a per-model profiler: each model profiles each of its own distinct ops (its exact shapes, one
decoder layer) over the same request grid, and shares nothing with other models.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .bench.compiled import PIECE_POINTS, points_left
from .bench.roofline import REFINED_SHARE, point_cost_s
from .bench.sweep import axis_limit, initial_points
from .compile import load_model
from .environment import DEFAULT_BACKEND
from .errors import command
from .ir import Graph
from .limits import output_file
from .passes.canonicalize import Signature, uses
from .passes.dedup import dedup


def step_uses(graph: Graph, attention: str, exact: bool = False) -> list:
    """What the graph's engine profiles: compiled pieces and the ops around them for a vLLM IR (vLLM's default
    mode), every op otherwise; `exact` for a per-model profiler, which tells ops of other shapes apart."""
    if graph.meta.engine == "vllm":
        from .passes.pieces import piece_uses

        return piece_uses(graph, attention, exact)
    return uses(graph, attention, exact)


def signature_uses(graphs: list[Graph], attention: str, exact: bool = False) -> dict[str, tuple[Signature, list]]:
    """Each signature the graphs use, by hash, with the request-dim bindings of all its uses (what its sweep must
    cover)."""
    out: dict[str, tuple[Signature, list[dict[str, str]]]] = {}
    for g in graphs:
        for u in step_uses(g, attention, exact):
            out.setdefault(u.signature.hash, (u.signature, []))[1].append(u.binding)
    return out


def sweep_limits(sig: Signature, bindings: list[dict[str, str]]) -> dict[str, int]:
    return {a: max(axis_limit(b, a) for b in bindings) for a in sig.axes}


def estimate_s(sig: Signature, limits: dict[str, int], points: list[dict] | None = None) -> float:
    """What sweeping `sig` costs: its grid (a compiled piece's is fixed, `PIECE_POINTS`, and never refined), or
    only `points` of it where given."""
    if sig.family == "piece":
        return sum(point_cost_s(sig.canonical, p) for p in (PIECE_POINTS if points is None else points))
    grid = initial_points(sig.axes, limits) if points is None else points
    return (1 + REFINED_SHARE * (len(sig.axes) > 0)) * sum(point_cost_s(sig.canonical, p) for p in grid)


@dataclass
class ModelPlan:
    model: str
    ops: int
    unique: int
    in_store: int
    new: int
    est_gpu_s: float
    baseline_signatures: int
    baseline_gpu_s: float


def plan(graphs: list[Graph], attention: str, measured_cost: dict[str, float],
         points_left: dict[str, list[dict]] | None = None) -> tuple[list[ModelPlan], float, float]:
    """Per-model rows, Dooly's total GPU-seconds, the baseline's; `points_left`: the points a signature the store
    holds in part still needs (it is costed for those only)."""
    left = points_left or {}
    costs = {h: measured_cost[h] if h in measured_cost else estimate_s(s, sweep_limits(s, b), left.get(h))
             for h, (s, b) in signature_uses(graphs, attention).items()}
    have = set(measured_cost)
    rows, total = [], 0.0
    for g in graphs:
        split = dedup(g, attention, have, step_uses(g, attention))
        new = sum(costs[h] for h in split.to_profile)
        exact = signature_uses([g], attention, exact=True)
        baseline = sum(estimate_s(s, sweep_limits(s, b)) for s, b in exact.values())
        ops = sum(u.count for u in split.uses)
        rows.append(ModelPlan(g.model, ops, len(split.measured) + len(split.to_profile), len(split.measured),
                              len(split.to_profile), new, len(exact), baseline))
        total += new
        have |= set(split.to_profile)
    return rows, total, sum(r.baseline_gpu_s for r in rows)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="+", type=Path, help="config.json files, or compiled IRs (.ir, model.json)")
    parser.add_argument("--store", type=Path, required=True, help="latency store (created if missing)")
    parser.add_argument("--env", help="environment whose measurements count as done (default: none; a compiled "
                        "piece lacking points of today's grid counts as not done)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from .store import Store

    output_file(args.store, "--store")
    graphs = [load_model(p) for p in args.config]
    store = Store(args.store, readonly=args.store.exists())
    if args.env:
        _, env = store.environment(args.env)
        attention, finished = env.attention_backend, store.finished_sweeps(args.env)
        used = signature_uses(graphs, attention)
        left = {h: points for h in finished.keys() & used.keys()
                if (points := points_left(store, args.env, used[h][0]))}
        measured = {h: s for h, s in finished.items() if h not in left}
    else:
        attention, measured, left = DEFAULT_BACKEND.attention, {}, {}
    rows, dooly_s, baseline_s = plan(graphs, attention, measured, left)
    saving = 1 - dooly_s / baseline_s if baseline_s else 0.0
    if args.json:
        out = {"models": [{"model": r.model, "ops": r.ops, "unique": r.unique, "in_store": r.in_store, "new": r.new,
                           "est_gpu_s": round(r.est_gpu_s, 3), "baseline_signatures": r.baseline_signatures,
                           "baseline_gpu_s": round(r.baseline_gpu_s, 3)}
                          for r in rows],
               "dooly_gpu_s": round(dooly_s, 3), "baseline_gpu_s": round(baseline_s, 3), "saving": round(saving, 4)}
        print(json.dumps(out, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"profiling plan ({args.store}, environment: {args.env or 'none: empty store'})")
    for col in ("model", "kernels/step", "unique ops", "in store", "new", "Dooly GPU-s", "baseline ops",
                "baseline GPU-s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r.model, str(r.ops), str(r.unique), str(r.in_store), str(r.new), f"{r.est_gpu_s:.1f}",
                      str(r.baseline_signatures), f"{r.baseline_gpu_s:.1f}")
    table.add_row("[b]total", "", "", "", str(sum(r.new for r in rows)), f"[b]{dooly_s:.1f}",
                  str(sum(r.baseline_signatures for r in rows)), f"[b]{baseline_s:.1f}")
    Console().print(table)
    Console().print(f"Dooly profiles for [b]{dooly_s:.0f}[/b] GPU-s where per-model profiling needs "
                    f"[b]{baseline_s:.0f}[/b]: a saving of [b]{100 * saving:.1f}%[/b].")
    return 0


if __name__ == "__main__":
    sys.exit(main())
