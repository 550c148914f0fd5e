"""How fast prediction and simulation run here, measured in one run against the shipped store.

    python tools/bench_predict.py [--store data/h100.sqlite] [--model configs/llama-3.1-8b.json]

Prints op predictions per second (the vectorised path: many batches at once, each op of the IR at each batch's
sizes), single-step predictions per second (the simulator's memoised path, warm and cold), and the seconds that
`dooly simulate` spends on 10,000 requests. Targets: >= 1 million op predictions/s; 10,000 requests < 10 s.
"""

from __future__ import annotations

import argparse
import random
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def random_batches(n: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        batch = [(1, rng.randint(2, 8192)) for _ in range(rng.randint(0, 64))]
        batch += [(q, q + rng.choice([0, rng.randint(1, 4096)])) for q in
                  (rng.randint(1, 2048) for _ in range(rng.randint(0 if batch else 1, 2)))]
        out.append(batch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "h100.sqlite")
    parser.add_argument("--model", type=Path, default=ROOT / "configs" / "llama-3.1-8b.json")
    args = parser.parse_args()
    from dooly.compile import load_model
    from dooly.config import load_config
    from dooly.predict import Batches, environment_name, load_predictor
    from dooly.sim import ContinuousBatching, EngineSettings, StepTime, simulate, synthetic
    from dooly.sim.transformers_cache import cache_size
    from dooly.store import Store

    store = Store(args.store, readonly=True)
    graph = load_model(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictor = load_predictor(graph, store, environment_name(store))
    batches = Batches.of(random_batches(20_000))
    start = time.perf_counter()
    predictor.predict(batches)
    seconds = time.perf_counter() - start
    per_request = sum(1 for g in predictor.groups if g.runs_per == "request")
    ops = (len(predictor.groups) - per_request) * batches.n + per_request * len(batches.queries)
    print(f"vectorised: {ops:,} op predictions ({batches.n:,} steps, {len(predictor.groups)} op groups) in "
          f"{seconds:.2f} s = {ops / seconds / 1e6:.2f} million op predictions/s (target >= 1)")

    steps = random_batches(3_000, seed=1)
    start = time.perf_counter()
    for b in steps:
        predictor.step(b)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for b in steps:
        predictor.step(b)
    warm = time.perf_counter() - start
    print(f"single steps: {len(steps) / cold:,.0f} steps/s cold, {len(steps) / warm:,.0f} steps/s from the memo")

    blocks = cache_size(load_config(args.model)).num_blocks
    for spec in ("poisson:rate=5,n=10000,prompt=512,output=128",
                 "poisson:rate=2,n=10000,prompt=lognormal:512:1,output=lognormal:128:1"):
        requests = synthetic(spec)
        start = time.perf_counter()
        out = simulate(requests, ContinuousBatching(blocks, 256, 8192, 1024), StepTime(predictor, EngineSettings()))
        seconds = time.perf_counter() - start
        print(f"simulate {spec}: {len(out.steps):,} steps in {seconds:.1f} s (target < 10 s)")


if __name__ == "__main__":
    main()
