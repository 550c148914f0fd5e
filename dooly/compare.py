"""`dooly compare CONFIG --store A --env X [--store B] --env Y --batch SPEC [--synthetic SPEC | --trace F]`: one
model on two environments (two GPUs, two attention backends; one store or two) side by side.

    dooly compare configs/llama-3.1-8b.json --store data/h100.sqlite --env sdpa --env sdpa-efficient \\
        --batch "prefill:512x2,decode:32@1024" --synthetic poisson:rate=2,n=200,prompt=512,output=64

`--batch` gives one step's latency op by op on both, with the ratio B/A; `--synthetic` or `--trace` serves one
workload in the simulated engine (transformers continuous batching) on both: TTFT, TPOT, end-to-end latency and
throughput side by side, and their CDFs in one plot (`latency_cdf.png` under `--out`). An environment is named in
full or by its `dooly profile --backend` name.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .errors import DoolyError, command

LATENCIES = ("ttft", "tpot", "e2e")


def step_rows(predictors: list, batch: list[tuple[int, int]]) -> dict:
    """One step on each predictor: the ops (and host phases) of both, matched by op and scope, and the totals."""
    from .predict.cli import breakdown

    predictions = [p.predict([batch]) for p in predictors]
    ops: dict[tuple[str, str], list[float]] = {}
    for side, prediction in enumerate(predictions):
        for row in breakdown(prediction, 0):
            ops.setdefault((row["op"], row["scope"]), [0.0, 0.0])[side] += row["us"]
    rows = [{"op": op, "scope": scope, "us": us} for (op, scope), us in ops.items()]
    return {"ops": sorted(rows, key=lambda r: -max(r["us"])),
            "total_us": [float(p.parts.total_us[0]) for p in predictions],
            "gpu_us": [float(p.parts.gpu_us[0]) for p in predictions],
            "extrapolated": sorted({e for p in predictions for e in p.extrapolated})}


def serve(predictor, requests, num_blocks: int):
    """The workload in transformers' continuous batching with its default settings."""
    from .sim import EngineSettings, StepTime, engine_scheduler, simulate

    engine_settings = EngineSettings()
    return simulate(requests, engine_scheduler("cb", num_blocks, 256, engine_settings.max_batch_tokens, 1024),
                    StepTime(predictor, engine_settings))


def plot(outcomes: list, labels: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, what in zip(axes, LATENCIES):
        for outcome, label in zip(outcomes, labels):
            v = np.sort([r[what] * 1e3 for r in outcome.requests if r[what] is not None])
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
        ax.set_xlabel(f"{what.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly compare", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", type=Path, help="a config.json")
    parser.add_argument("--store", type=Path, action="append", required=True, help="once for both sides, or twice")
    parser.add_argument("--env", action="append", required=True, help="twice: the environment of each side")
    parser.add_argument("--batch", help='one step, e.g. "prefill:512x4,decode:128@2048"')
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--synthetic", help="a workload to simulate, e.g. poisson:rate=2,n=500,prompt=512,output=128")
    load.add_argument("--trace", type=Path, help="JSON lines of {arrival (s), prompt, output}")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic workload")
    parser.add_argument("--num-blocks", type=int, help="KV cache blocks of 256 tokens (default: what the engine "
                        "allocates on the H100)")
    parser.add_argument("--top", type=int, default=12, help="ops to show")
    parser.add_argument("--out", type=Path, help="where the plot goes (default: out/compare/<model>)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if len(args.env) != 2 or len(args.store) not in (1, 2):
        raise DoolyError("compare needs two --env and one --store (for both) or two")
    if not (args.batch or args.synthetic or args.trace):
        raise DoolyError("nothing to compare: give --batch, --synthetic or --trace")
    if args.num_blocks is not None and args.num_blocks <= 0:
        raise DoolyError("--num-blocks must be positive")
    from .compile import load_model
    from .environment import resolve_environment
    from .predict import load_predictor
    from .predict.cli import parse_batch
    from .sim import load_trace, summary, synthetic
    from .store import Store

    batch = parse_batch(args.batch) if args.batch else None
    requests = (load_trace(args.trace) if args.trace else synthetic(args.synthetic, args.seed)) if (
        args.trace or args.synthetic) else None
    graph = load_model(args.config)
    paths = args.store * 2 if len(args.store) == 1 else args.store
    stores = {path: Store(path, create=False) for path in dict.fromkeys(paths)}
    envs = [resolve_environment(stores[path], env) for path, env in zip(paths, args.env)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictors = [load_predictor(graph, stores[path], env) for path, env in zip(paths, envs)]
    sides = [{"store": str(path), "environment": env} for path, env in zip(paths, envs)]
    result: dict = {"model": graph.model, "sides": sides}
    if batch is not None:
        result["step"] = step_rows(predictors, batch)
    if requests is not None:
        blocks = args.num_blocks
        if blocks is None:
            from .config import load_config
            from .sim.transformers_cache import cache_size

            blocks = cache_size(load_config(args.config), max_batch_tokens=8192).num_blocks
        outcomes = [serve(p, requests, blocks) for p in predictors]
        out = args.out or Path("out/compare") / graph.model
        out.mkdir(parents=True, exist_ok=True)
        labels = [f"{chr(65 + i)}: {s['environment']}" for i, s in enumerate(sides)]
        figure = plot(outcomes, labels, out / "latency_cdf.png", graph.model)
        result["simulation"] = {"requests": len(requests), "num_blocks": blocks,
                                "summaries": [summary(o) for o in outcomes], "plot": str(figure)}
    if args.json:
        print(json.dumps(result))
    else:
        _print(result, args.top)
    return 0


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}" if a and b is not None else "-"


def _print(result: dict, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    caption = "\n".join(f"{chr(65 + i)}: {s['environment']} ({s['store']})" for i, s in enumerate(result["sides"]))
    step = result.get("step")
    if step:
        table = Table(title=f"{result['model']}: one step on A and B", caption=caption)
        for col in ("op", "scope", "A µs", "B µs", "B/A"):
            table.add_column(col, justify="left" if col in ("op", "scope") else "right", overflow="fold")
        for r in step["ops"][:top]:
            table.add_row(r["op"], r["scope"], f"{r['us'][0]:.1f}", f"{r['us'][1]:.1f}", _ratio(*r["us"]))
        rest = [sum(r["us"][i] for r in step["ops"][top:]) for i in (0, 1)]
        if len(step["ops"]) > top:
            table.add_row(f"({len(step['ops']) - top} more)", "", f"{rest[0]:.1f}", f"{rest[1]:.1f}", _ratio(*rest))
        table.add_row("GPU", "", *(f"{v:.1f}" for v in step["gpu_us"]), _ratio(*step["gpu_us"]))
        table.add_row("total", "", *(f"{v:.1f}" for v in step["total_us"]), _ratio(*step["total_us"]))
        console.print(table)
        if step["extrapolated"]:
            console.print(f"[yellow]beyond the measured range: {'; '.join(step['extrapolated'])}[/yellow]")
    sim = result.get("simulation")
    if sim:
        table = Table(title=f"{result['model']}: {sim['requests']} requests, {sim['num_blocks']} blocks",
                      caption=caption)
        for col in ("latency", "A mean", "B mean", "A p90", "B p90", "A p99", "B p99", "B/A mean"):
            table.add_column(col, justify="left" if col == "latency" else "right")
        a, b = sim["summaries"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        for what in LATENCIES:
            x, y = a[f"{what}_ms"], b[f"{what}_ms"]
            table.add_row(f"{what.upper()} (ms)", fmt(x["mean"]), fmt(y["mean"]), fmt(x["p90"]), fmt(y["p90"]),
                          fmt(x["p99"]), fmt(y["p99"]), _ratio(x["mean"], y["mean"]))
        table.add_row("throughput (tok/s)", fmt(a["throughput_tok_s"]), fmt(b["throughput_tok_s"]), "", "", "", "",
                      _ratio(a["throughput_tok_s"], b["throughput_tok_s"]))
        console.print(table)
        console.print(f"wrote {sim['plot']}")


if __name__ == "__main__":
    sys.exit(main())
