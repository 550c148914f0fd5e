"""On the GPU: where the engine's host time goes, function by function, in the steps of a ground-truth trace.

For each model and trace of `tools/validate.py`, the trace is served once to warm up, then once with Python's
profiler on in the engine's serving thread around each step's forward, logits and sampling
(`ModelRunner._forward_process_and_sample`). Written per
(model, trace): the steps' median host launch time, and the functions with the most time per step (their own
time, and with what they call), the largest first. Comparing two traces of one model shows which functions make
the host time of a step differ when the kernels launched are the same.

    python tools/engine_profile.py --out DIR --models phi-3-mini --traces long@2 decode@inf
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def profile_trace(engine, requests, top: int) -> dict:
    from transformers.generation.continuous_batching.model_runner import ModelRunner

    engine.run(requests)  # warm-up: this process has served the trace once, as in the ground truth
    profiler = cProfile.Profile()
    # looked up on every step (the engine keeps its runner, and the runner's bound methods, between runs)
    forward = ModelRunner._forward_process_and_sample

    def profiled(self, *args):
        profiler.enable()  # the calling thread only: the engine's
        try:
            return forward(self, *args)
        finally:
            profiler.disable()

    ModelRunner._forward_process_and_sample = profiled
    try:
        steps, _ = engine.run(requests)
    finally:
        ModelRunner._forward_process_and_sample = forward
    n = len(steps)
    stats = pstats.Stats(profiler).stats
    rows = [{"function": f"{Path(file).name}:{line}:{name}", "calls_per_step": calls / n,
             "own_ms_per_step": own * 1e3 / n, "total_ms_per_step": total * 1e3 / n}
            for (file, line, name), (_, calls, own, total, _) in stats.items()]
    return {"steps": n, "launch_ms": statistics.median(s.launch_s for s in steps) * 1e3,
            "forward_ms": statistics.median(s.forward_s for s in steps) * 1e3,
            "by_own": sorted(rows, key=lambda r: -r["own_ms_per_step"])[:top],
            "by_total": sorted(rows, key=lambda r: -r["total_ms_per_step"])[:top]}


def main():
    from validate import model_traces, warm_engine, zoo

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--traces", nargs="+", required=True, help="trace names of tools/validate.py, e.g. long@2")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        wanted = model_traces(name)
        with warm_engine(zoo(name)) as engine:
            result = {trace: profile_trace(engine, wanted[trace], args.top) for trace in args.traces}
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        for trace, r in result.items():
            print(f"{name} {trace}: {r['steps']} steps, launch {r['launch_ms']:.1f} ms; own time per step: "
                  + ", ".join(f"{f['function']} {f['own_ms_per_step']:.1f}" for f in r["by_own"][:5]), flush=True)


if __name__ == "__main__":
    main()
