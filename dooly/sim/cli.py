"""`dooly simulate CONFIG --store PATH --trace F | --synthetic SPEC`: serve a workload in the simulated engine.

    dooly simulate configs/llama-3.1-8b.json --store data/h100.sqlite \\
        --synthetic poisson:rate=5,n=10000,prompt=lognormal:512:1,output=128

Writes per-request TTFT, TPOT and end-to-end latency (`requests.jsonl`), the summary (`summary.json`), and plots
(`latency_cdf.png`, `batch_size.png`) under `--out`; prints the summary as a table, or with `--json` as JSON.
The engine's settings default to what transformers continuous batching resolves on the store's GPU. A vLLM IR
(`dooly compile CONFIG --frontend vllm`) is served by vLLM v1's scheduler (chunked prefill, prefix caching, async
scheduling), each step timed as vLLM's compiled mode runs it (`dooly.predict.vllm_step`), from the store's vLLM
environment for `--backend` (default FLASH_ATTN).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import time
from pathlib import Path

from ..config import ModelConfig
from ..errors import DoolyError, command
from ..limits import add_limit_argument, output_folder, parse_limits
from . import workload

LIMITS = (*workload.LIMITS, "tokens-per-step", "requests-per-step", "steps")


def warn_beyond_context(requests: list, cfg: ModelConfig) -> None:
    """One warning line for the requests whose prompt and output run past the model's context: the engine serves
    them, a model was not trained for them."""
    context = cfg.data.get("max_position_embeddings")
    if not isinstance(context, int) or isinstance(context, bool):
        return
    beyond = [r.prompt + r.output for r in requests if r.prompt + r.output > context]
    if beyond:
        print(f"warning: {len(beyond)} of {len(requests)} requests run past the model's context "
              f"(max_position_embeddings {context}; prompt + output up to {max(beyond)} tokens): simulated as the "
              f"engine would serve them", file=sys.stderr)


def plots(outcome, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, what in zip(axes, ("ttft", "tpot", "e2e")):
        v = np.sort([r[what] * 1e3 for r in outcome.requests if r[what] is not None])
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v))
        ax.set_xlabel(f"{what.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: latency CDFs")
    fig.tight_layout()
    paths.append(out / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(10, 4))
    t = [s["time"] for s in outcome.steps]
    ax.plot(t, [s["requests"] for s in outcome.steps], lw=0.6, label="requests per step")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests per step")
    twin = ax.twinx()
    twin.plot(t, [s["tokens"] for s in outcome.steps], lw=0.6, color="tab:orange", alpha=0.6, label="tokens")
    twin.set_ylabel("tokens per step")
    fig.legend(loc="upper right")
    ax.set_title(f"{title}: batch size over time")
    fig.tight_layout()
    paths.append(out / "batch_size.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly simulate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Workloads: " + workload.__doc__)
    parser.add_argument("config", type=Path, help="a config.json (or a compiled IR, with --num-blocks)")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--backend", help="attention backend whose measurements to use (default: sdpa)")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--trace", type=Path, help="JSON lines of {arrival (s), prompt, output}")
    load.add_argument("--synthetic", help="e.g. poisson:rate=5,n=10000,prompt=512,output=128")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic workload")
    parser.add_argument("--scheduler", choices=("cb", "vllm"), default="cb",
                        help="cb: transformers continuous batching (default); vllm: vLLM v1's chunked prefill")
    parser.add_argument("--num-blocks", type=int, help="KV cache blocks (default: what the engine would allocate)")
    parser.add_argument("--block-size", type=int, help="tokens a block (default: 256 cb, 16 vllm)")
    parser.add_argument("--max-batch-tokens", type=int, help="tokens a step (default: 8192 cb, 16384 vllm)")
    parser.add_argument("--max-requests", type=int, help="requests a step (default: 1024 for both)")
    parser.add_argument("--gpu-memory-gib", type=float, help="GPU memory the engine sizes its cache from "
                        "(default: the H100's 79.6)")
    parser.add_argument("--cuda-graphs", action="store_true", help="the engine's use_cuda_graph")
    parser.add_argument("--async-batching", action="store_true", help="the engine's use_async_batching")
    parser.add_argument("--out", type=Path, help="where results go (default: out/simulate/<model>)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_limit_argument(parser, LIMITS)
    args = parser.parse_args(argv)
    limits = parse_limits(args.limit, LIMITS)
    if args.max_batch_tokens is None:  # each engine's own default
        args.max_batch_tokens = 8192 if args.scheduler == "cb" else 16384
    for name in ("num_blocks", "block_size", "max_batch_tokens", "max_requests", "gpu_memory_gib"):
        value = getattr(args, name)
        if value is not None and not (0 < value < math.inf):  # NaN fails both
            raise DoolyError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    limits.check("tokens-per-step", args.max_batch_tokens, "--max-batch-tokens")
    if args.max_requests is not None:
        limits.check("requests-per-step", args.max_requests, "--max-requests")
    out = output_folder(args.out, "--out") if args.out else None

    from ..compile import load_model
    from ..config import load_config
    from ..predict import environment_name, load_predictor
    from ..store import Store
    from . import (
        EngineSettings,
        StepTime,
        engine_scheduler,
        load_trace,
        simulate,
        summary,
        synthetic,
    )
    from .simulator import simulate_vllm
    from .transformers_cache import H100_BYTES, cache_size, weight_bytes
    from .vllm_cache import num_gpu_blocks

    requests = load_trace(args.trace, limits) if args.trace else synthetic(args.synthetic, args.seed, limits)
    graph = load_model(args.config)
    cfg = None if args.config.suffix == ".ir" or args.config.name == "model.json" else load_config(args.config)
    if cfg is not None:
        warn_beyond_context(requests, cfg)
    store = Store(args.store, readonly=True)
    vllm_ir = graph.meta.engine == "vllm"
    if vllm_ir:  # vLLM's compiled step, piece by piece, under its own scheduler
        from ..predict.vllm_step import step_model, vllm_environment

        args.scheduler = "vllm"
        env = vllm_environment(store, args.backend or "FLASH_ATTN")
        model = step_model(graph, store, args.backend or "FLASH_ATTN")
        extrapolated: set = set()
    else:
        env = environment_name(store, args.backend)
        predictor = load_predictor(graph, store, env)
        engine_settings = EngineSettings(use_cuda_graph=args.cuda_graphs, max_batch_tokens=args.max_batch_tokens,
                                         use_async_batching=args.async_batching)
        step_time = StepTime(predictor, engine_settings)
        extrapolated = step_time.extrapolated
    block = args.block_size or (256 if args.scheduler == "cb" else 16)
    blocks = args.num_blocks
    if blocks is None:
        if cfg is None:
            raise DoolyError("simulating a compiled IR needs --num-blocks (the cache size comes from the config)")
        gpu = int(args.gpu_memory_gib * 2**30) if args.gpu_memory_gib else H100_BYTES
        blocks = (num_gpu_blocks(cfg, gpu, weight_bytes(cfg)) if args.scheduler == "vllm"
                  else cache_size(cfg, gpu, 256, args.max_batch_tokens).num_blocks * 256 // block)
    scheduler = engine_scheduler(args.scheduler, blocks, block, args.max_batch_tokens, args.max_requests or 1024)
    serve = (functools.partial(simulate_vllm, requests, scheduler, model, limits["steps"]) if vllm_ir  # async: vLLM's
             else functools.partial(simulate, requests, scheduler, step_time, limits["steps"]))  # default
    started = time.perf_counter()
    if args.json:
        outcome = serve()
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"simulating {len(requests)} requests", total=len(requests))
            outcome = serve(progress=lambda done: bar.update(task, completed=done))
    seconds = time.perf_counter() - started
    result = summary(outcome)
    out = out or Path("out/simulate") / graph.model
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "requests.jsonl", "w") as f:
        for r in outcome.requests:
            f.write(json.dumps({"id": r["id"], "arrival_s": r["arrival"], "prompt": r["prompt"], "output": r["output"],
                                **{f"{k}_ms": None if r[k] is None else r[k] * 1e3 for k in ("ttft", "tpot", "e2e")}})
                    + "\n")
    settings = {"model": graph.model, "environment": env, "scheduler": args.scheduler, "num_blocks": blocks,
                "block_size": block, "max_batch_tokens": args.max_batch_tokens, "steps": len(outcome.steps),
                "simulated_in_s": seconds, "predictions_beyond_measured_range": sorted(extrapolated)}
    (out / "summary.json").write_text(json.dumps({**result, "settings": settings}, indent=1))
    figures = plots(outcome, out, f"{graph.model} ({args.scheduler})")
    if extrapolated:
        print(f"warning: some steps extrapolate beyond the measured range: {'; '.join(sorted(extrapolated))}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{graph.model}: {result['requests']} requests, {args.scheduler} scheduler, {blocks} blocks "
                        f"of {block} tokens", caption=env)
    for col in ("latency", "mean", "p50", "p90", "p99"):
        table.add_column(col, justify="left" if col == "latency" else "right")
    for what in ("ttft_ms", "tpot_ms", "e2e_ms"):
        row = result[what]
        table.add_row(what.replace("_ms", " (ms)").upper(),
                      *("-" if row[k] is None else f"{row[k]:.1f}" for k in ("mean", "p50", "p90", "p99")))
    console = Console()
    console.print(table)
    throughput = result["throughput_tok_s"]
    console.print(f"throughput {throughput:.0f} output tokens/s over {len(outcome.steps)} steps; simulated in "
                  f"{seconds:.1f} s" if throughput else f"{len(outcome.steps)} steps; simulated in {seconds:.1f} s")
    console.print(f"wrote {out / 'requests.jsonl'}, {out / 'summary.json'}, " + ", ".join(map(str, figures)))
    return 0


@command
def vidur_main(argv: list[str] | None = None) -> int:
    from . import vidur

    parser = argparse.ArgumentParser(prog="dooly export-vidur", description=vidur.__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a config.json, or a compiled IR (.ir, model.json)")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--backend", help="attention backend whose measurements to use (default: sdpa)")
    parser.add_argument("--out", type=Path, default=Path("out/vidur"), help="root of Vidur's profiling folders")
    parser.add_argument("--device", default="h100", help="Vidur's device name in the path (default: h100)")
    parser.add_argument("--model-name", help="Vidur's model name in the path (default: the model's file name)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", args.model_name or "x") or not re.fullmatch(r"[\w.-]+", args.device):
        raise DoolyError("--model-name and --device may hold letters, digits, '.', '_', '-' (and one '/')")
    from ..compile import load_model
    from ..environment import environment_name
    from ..predict import load_predictor
    from ..store import Store

    graph = load_model(args.config)
    store = Store(args.store, readonly=True)
    predictor = load_predictor(graph, store, environment_name(store, args.backend))
    folder = args.out / "compute" / args.device / (args.model_name or graph.model)
    result = vidur.export(graph, predictor, folder)
    print(f"wrote {folder / 'mlp.csv'} ({result['mlp_rows']} token counts) and {folder / 'attention.csv'} "
          f"({result['attention_rows']} prefill and decode shapes)")
    print(f"left out (no Vidur column): {100 * result['left_out_share']:.1f}% of the GPU time of a step, on average "
          "(final norm, LM head, sampling, batch preparation)")
    if result["extrapolated"]:
        print(f"warning: some rows extrapolate beyond the measured range: {'; '.join(result['extrapolated'])}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
