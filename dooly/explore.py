"""`dooly explore CONFIG --store PATH... --workload F | --synthetic SPEC --slo SLO [--grid SPEC] [--ray [ADDRESS]]`:
search engine configurations for the ones that serve a workload best under latency SLOs.

    dooly explore configs/llama-3.1-8b.json --store data/h100.sqlite \\
        --synthetic poisson:rate=2,n=2000,prompt=lognormal:512:0.8,output=lognormal:128:0.5 \\
        --slo ttft_p90=1s,tpot_p90=200ms --grid "max_seqs=32,64,128;cuda_graphs=on,off"

Every configuration of the grid (GPU, engine and attention backend as the stores hold them, TP degree, scheduler,
batch limits, CUDA graphs, async batching) serves the workload in the simulated engine, over local processes or Ray
tasks; the table and `pareto.png` give the configurations that meet the SLO and that no other beats on both
throughput per GPU and latency. Each finished configuration is appended to `results.jsonl` under `--out`, so an
interrupted search started again with the same arguments simulates only the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from .environment import GPU_BYTES, backend_name, gpu_of
from .errors import DoolyError, command
from .sim import explore as search
from .sim import workload
from .store import Environment, Store


def deployments(store_paths: list[Path], grid: dict) -> dict[tuple[str, str, str], tuple]:
    """(gpu, engine, backend) -> (store, environment) for each environment of the stores that the grid asks for."""
    found: dict[tuple[str, str, str], tuple] = {}
    for path in store_paths:
        store = Store(path, create=False)
        for env in store.environments():
            key = (gpu_of(env), env.engine, backend_name(env.attention_backend))
            if key in found:
                raise DoolyError(f"{found[key][0].path} and {path} both hold {'/'.join(key)}: give one of them")
            found[key] = (store, env)
    for i, axis in enumerate(("gpu", "engine", "backend")):
        present = sorted({k[i] for k in found})
        absent = [v for v in grid.get(axis, []) if v not in present]
        if absent:
            raise DoolyError(f"grid: {axis} {', '.join(absent)} is in none of the stores (they have: "
                             f"{', '.join(present) or 'nothing'})")
    return {k: v for k, v in found.items() if all(k[i] in grid.get(a, [k[i]]) for i, a in
                                                  enumerate(("gpu", "engine", "backend")))}


def tp_degrees(store: Store, env: Environment) -> set[int]:
    """TP degrees the environment can predict: 1, and those whose collectives it has measured."""
    out = {1}
    for h in store.finished_sweeps(env.name):
        sig = store.signature(h)
        if sig and sig["family"] == "collective":
            out.add(int(sig["canonical"]["attrs"]["group_size"]))
    return out


def build(args, grid: dict) -> tuple[search.Setting, list[search.Config], str]:
    """The shared setting, the configurations to simulate, and the model's name."""
    from .compile import cached_compile
    from .config import load_config
    from .predict import load_predictor
    from .sim.transformers_cache import cache_size

    cfg = load_config(args.config)
    requests = workload.load_trace(args.workload) if args.workload else workload.synthetic(args.synthetic, args.seed)
    objectives = search.parse_slo(args.slo)
    found = deployments(args.store, grid)
    predictors, cache, configs = {}, {}, []
    setting_grid = {a: grid.get(a, search.DEFAULT_GRID.get(a)) for a in search.GRID_AXES[4:]}
    for (gpu, engine, backend), (store, env) in found.items():
        present = tp_degrees(store, env)
        absent = sorted(set(grid.get("tp", [])) - present)
        if absent:
            raise DoolyError(f"grid: tp={','.join(map(str, absent))} is not in {store.path} for {gpu}/{backend} "
                             f"(its collectives are not measured; TP degrees there: {', '.join(map(str, present))})")
        if args.gpu_memory_gib:
            memory = int(args.gpu_memory_gib * 2**30)
        elif env.gpu in GPU_BYTES:
            memory = GPU_BYTES[env.gpu]
        else:
            raise DoolyError(f"no memory size known for {env.gpu}: give --gpu-memory-gib")
        for tp in grid.get("tp", sorted(present)):
            predictors[gpu, engine, backend, tp] = load_predictor(cached_compile(cfg, tp=tp), store, env.name)
            # the cache of one rank holds 1/tp of every block: count tokens
            for tokens in setting_grid["max_tokens"]:
                if (gpu, tp, tokens) not in cache:
                    cache[gpu, tp, tokens] = cache_size(cfg, memory * tp, 256, tokens).num_blocks * 256
            configs += search.expand({"gpu": [gpu], "engine": [engine], "backend": [backend], "tp": [tp],
                                      **setting_grid})
    return search.Setting(requests, objectives, predictors, cache), configs, cfg.name


def run_digest(args, setting: search.Setting) -> str:
    """What a search's results depend on besides the configuration: resumed rows must share it."""
    parts = [Path(args.config).read_text(), [(r.arrival, r.prompt, r.output) for r in setting.requests],
             [(o.name, o.limit_ms) for o in setting.objectives], args.gpu_memory_gib,
             [(str(p), Store(p, create=False).counts()) for p in args.store]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def resumed(path: Path, digest: str) -> dict[str, dict]:
    """Rows of an earlier run of the same search, by configuration key; none if it was another search."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]).get("run") != digest:
            return {}
        rows = [json.loads(line) for line in lines[1:] if line.strip()]
    except json.JSONDecodeError:  # the line being written when the run was killed
        rows = [json.loads(line) for line in lines[1:-1] if line.strip()]
    keys = {f.name for f in fields(search.Config)}
    return {search.Config(**{k: r[k] for k in keys}).key(): r for r in rows}


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly explore", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Grids and SLOs: " + search.__doc__.split("\n\n")[1])
    parser.add_argument("config", type=Path, help="the model's config.json")
    parser.add_argument("--store", type=Path, action="append", required=True, help="a latency store (repeatable)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--workload", type=Path, help="JSON lines of {arrival (s), prompt, output}")
    load.add_argument("--synthetic", help="e.g. poisson:rate=2,n=2000,prompt=lognormal:512:0.8,output=128")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic workload")
    parser.add_argument("--slo", required=True, help="e.g. ttft_p90=500ms,tpot_p90=50ms")
    parser.add_argument("--grid", action="append", help="e.g. 'max_seqs=64,128;cuda_graphs=on,off' (repeatable)")
    parser.add_argument("--latency", help="the front's latency axis, e.g. tpot_p90 (default: the SLO's first)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="local processes (default: cores)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run the simulations as Ray tasks: on a new local Ray instance, or the cluster at "
                             "ADDRESS (host:port, ray://host:port, auto)")
    parser.add_argument("--gpu-memory-gib", type=float, help="GPU memory the engine sizes its cache from "
                        "(default: the store's GPU's)")
    parser.add_argument("--out", type=Path, help="where results go (default: out/explore/<model>)")
    parser.add_argument("--json", action="store_true", help="print the front as JSON")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.gpu_memory_gib is not None and args.gpu_memory_gib <= 0):
        raise DoolyError("--workers and --gpu-memory-gib must be positive")
    grid = search.parse_grid(";".join(args.grid or []))
    latency = None
    if args.latency:
        metric, _, statistic = args.latency.partition("_")
        if metric not in search.METRICS or statistic not in search.STATISTICS:
            raise DoolyError(f"--latency {args.latency}: expected METRIC_STAT, e.g. tpot_p90")
        latency = search.Objective(metric, statistic, float("inf"))
    if args.ray is not None:
        from .ray_backend import connect

        connect(args.ray)  # before the slow part: an unreachable cluster is an error at once
    started = time.perf_counter()
    setting, configs, model = build(args, grid)
    latency = latency or setting.objectives[0]
    out = args.out or Path("out/explore") / model
    out.mkdir(parents=True, exist_ok=True)
    digest = run_digest(args, setting)
    done = resumed(out / "results.jsonl", digest)
    todo = [c for c in configs if c.key() not in done]
    rows = [done[c.key()] for c in configs if c.key() in done]
    tasks = search.chunks(todo, args.workers)
    if args.ray is not None:
        from .ray_backend import explore_map

        results = explore_map(setting, tasks)
    else:
        results = search.local_map(setting, tasks, args.workers)
    with open(out / "results.jsonl", "w") as f:  # rewritten whole: a killed run may have left half a line
        f.write("".join(json.dumps(r) + "\n" for r in [{"run": digest}, *rows]))
        rows += _collect(results, f, len(todo), quiet=args.json)
    front = search.pareto(rows, latency)
    retried = results.retried if args.ray is not None else 0
    seconds = time.perf_counter() - started
    report = {"model": model, "configurations": len(configs), "simulated": len(todo), "resumed": len(done),
              "meet_slo": sum(r["meets_slo"] for r in rows), "front": front, "latency": latency.name,
              "slo": {o.name: o.limit_ms for o in setting.objectives}, "retried_tasks": retried,
              "seconds": round(seconds, 1), "requests": len(setting.requests)}
    (out / "front.json").write_text(json.dumps(report, indent=1))
    from .sim.explore_report import plot, table

    figure = plot(rows, front, latency, setting.objectives, out / "pareto.png", model)
    if args.json:
        print(json.dumps(report))
    else:
        table(report, rows, out, figure)
    return 0


def _collect(results, f, total: int, quiet: bool) -> list[dict]:
    rows: list[dict] = []
    if quiet:
        for batch in results:
            _append(rows, batch, f)
        return rows
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"simulating {total} configurations", total=total)
        for batch in results:
            _append(rows, batch, f)
            bar.update(task, completed=len(rows))
    return rows


def _append(rows: list[dict], batch: list[dict], f) -> None:
    rows += batch
    f.write("".join(json.dumps(r) + "\n" for r in batch))
    f.flush()


if __name__ == "__main__":
    sys.exit(main())
