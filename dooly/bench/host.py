"""Calibrating the engine's host-side time per step, on the GPU, into the store's `host_overhead` table.

A step of transformers' continuous batching is not only GPU kernels: the host schedules the batch and builds its
inputs (`prepare`), launches the forward kernel by kernel from Python (`launch`: while the GPU is faster than the
launches, the step waits on the host), and reads the new tokens back (`update`). These phases are measured on small
synthetic models whose GPU work is negligible, so what is timed is the host alone: models of 1 to 16 layers (the
launch time grows with the number of kernels) and of one or two attention types (two masks to build), over
batches of 1 to 256 requests. `dooly.predict.host` fits them; no zoo model is run here, so this calibration never
sees a model it will later be validated on. The kernels a step of each synthetic model launches are counted on its
IR and stored beside its timings (`--kernels-only` counts them for a store calibrated without them; no GPU needed).

    python -m dooly.bench.host --store data/h100.sqlite --backend sdpa
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from dataclasses import asdict

from ..environment import BACKENDS, Backend, detect, sdpa_context
from .kernels import KernelCount

SYNTHETIC = {  # a Llama and a Gemma-2 in miniature: same code paths, negligible GPU work
    "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 65536},
    "gemma2": {"model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096, "sliding_window": 256,
               "max_position_embeddings": 65536},
}
LAYERS = {"llama": (1, 4, 16), "gemma2": (2, 8)}
WORKLOADS = [(r, p) for r in (1, 8, 32, 128, 256) for p in (16, 512, 2048) if r * p <= 131072]
OUTPUT_TOKENS = 12
REPEATS = 3


def synthetic(name: str, layers: int) -> dict:
    return {**SYNTHETIC[name], "num_hidden_layers": layers}


@functools.cache
def synthetic_graph(name: str, layers: int):
    """The IR of a synthetic model, compiled once per process."""
    from ..config import parse_config
    from ..passes.pipeline import compile_model

    return compile_model(parse_config(synthetic(name, layers), f"synthetic-{name}-{layers}", name))


def count_kernels(store, env_name: str, attention: str, runs: list[tuple[str, int]]) -> int:
    """Store the kernels a step of each synthetic model (name, layers) launches with the environment's attention
    backend, counted on its IR."""
    for name, layers in runs:
        graph = synthetic_graph(name, layers)
        store.record_host_kernels(env_name, {"model": list(SYNTHETIC).index(name), "layers": layers},
                                  asdict(KernelCount.of(graph, attention)))
    return len(runs)


def calibrate(store, env_name: str, device: str = "cuda", budget_s: float = 120.0, models=tuple(LAYERS),
              sdpa_kernel: str | None = None, log=print) -> int:
    """Run the synthetic models, record each phase's median per (model, layers, batch composition)."""
    from .engine import Engine

    runs = [(m, layers) for m in models for layers in LAYERS[m]]
    rows = 0
    for name, layers in runs:
        deadline = time.monotonic() + budget_s / len(runs)  # every model gets its share of the budget
        engine = Engine(synthetic(name, layers), cb={"max_batch_tokens": 8192, "num_blocks": 1024}, device=device,
                        sdpa_kernel=sdpa_kernel)
        engine.run([(0.0, 32, 4)])  # warm-up: first calls, allocator, cuBLAS handles
        samples: dict[tuple, dict[str, list[float]]] = {}
        for r, prompt in WORKLOADS:
            if time.monotonic() > deadline:
                break
            for _ in range(REPEATS):
                steps, _ = engine.run([(0.0, prompt, OUTPUT_TOKENS)] * r)
                for s in steps:
                    key = (s.R, s.T, s.K)
                    phases = samples.setdefault(key, {})
                    for phase in ("prepare", "launch", "forward", "step", "update"):
                        phases.setdefault(phase, []).append(getattr(s, f"{phase}_s") * 1e6)
        for (R, T, K), phases in samples.items():
            point = {"model": list(SYNTHETIC).index(name), "layers": layers, "R": R, "T": T, "K": K}
            for phase, values in phases.items():
                store.record_host_samples(env_name, phase, point, values)
                rows += 1
        log(f"host calibration: {name} x{layers} layers, {len(samples)} batch compositions")
        del engine
    return rows


def attention_inputs(heads: int, head_dim: int, t: int, k: int, device: str = "cuda") -> tuple:
    """The engine's float-mask SDPA call at `t` queries and `k` keys: query, key and value `[1, heads, n,
    head_dim]`, and the mask `[1, 1, t, k]`, in bf16."""
    import torch

    qkv = [torch.randn(1, heads, n, head_dim, dtype=torch.bfloat16, device=device) for n in (t, k, k)]
    return (*qkv, torch.zeros(1, 1, t, k, dtype=torch.bfloat16, device=device))


def first_call_us(heads: int, head_dim: int, t: int, k: int) -> float:
    """Host time of the first attention call at a shape above the median of two repeats, the GPU synchronised
    before and after each."""
    import torch

    *qkv, mask = attention_inputs(heads, head_dim, t, k)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(*qkv, attn_mask=mask)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return (times[0] - statistics.median(times[1:])) * 1e6


def first_calls(store, env_name: str, backend: Backend, shapes: int = 6) -> int:
    """Host time of an attention call at a shape the process has not seen, above its steady time.

    cuDNN's attention builds an execution plan for every new shape, and a serving step nearly always brings a new
    (T, K): each step pays it once per attention shape. Measured per head count and head size of the store's
    attention signatures, at decode-like and prefill-like shapes."""
    import random

    rng, rows, seen = random.Random(0), 0, set()
    sigs = store.db.execute("SELECT canonical FROM signatures WHERE family = 'attention'").fetchall()
    for (canonical,) in sigs:
        q = json.loads(canonical)["inputs"][0]["shape"]
        heads, dim = q[1], q[3]
        if (heads, dim) in seen:
            continue
        seen.add((heads, dim))
        for i in range(shapes):
            t = rng.randint(1, 64) if i % 2 == 0 else rng.randint(300, 3000)
            k = t + rng.randint(1000, 30000)
            with sdpa_context(backend):
                extra = first_call_us(heads, dim, t, k)
            store.record_host(env_name, "attention_first_call", {"heads": heads, "head_dim": dim, "T": t, "K": k},
                              extra, extra, 1)
            rows += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from ..store import Store

    parser = argparse.ArgumentParser(prog="python -m dooly.bench.host", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--backend", default="sdpa", choices=list(BACKENDS))
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--kernels-only", action="store_true",
                        help="only count the kernels of the models each environment of the store was calibrated on")
    args = parser.parse_args(argv)
    store = Store(args.store)
    if args.kernels_only:
        for env in store.environments():
            runs = sorted({(list(SYNTHETIC)[r["point"]["model"]], r["point"]["layers"]) for r in store.host(env.name)
                           if r["phase"] == "launch"})
            rows = count_kernels(store, env.name, env.attention_backend, runs)
            print(f"recorded the kernel counts of {rows} calibration models for {env.name}")
        return 0
    chosen = BACKENDS[args.backend]
    env = store.add_environment(detect(chosen))
    rows = calibrate(store, env.name, budget_s=args.budget_s, models=args.models, sdpa_kernel=chosen.sdpa_kernel)
    rows += first_calls(store, env.name, chosen)
    runs = [(m, layers) for m in args.models for layers in LAYERS[m]]
    rows += count_kernels(store, env.name, chosen.attention, runs)
    print(f"recorded {rows} host rows for {env.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
