"""On the GPU: where the engine's host time goes, op by op, in the steps of a ground-truth trace.

For each model and trace of `tools/validate.py`, the trace is served once to warm up, then once under the torch
profiler (CPU activity of every thread, the engine's included). Written per (model, trace): the steps' median
host launch time, and each op's self CPU time and calls per step, the largest first. Comparing two traces of one
model shows which ops make the host time of a step differ when the kernels launched are the same.

    python tools/engine_profile.py --out DIR --models phi-3-mini --traces long@2 decode@inf
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def profile_trace(engine, requests, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    engine.run(requests)  # warm-up: this process has served the trace once, as in the ground truth
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps, _ = engine.run(requests)
    n = len(steps)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"steps": n, "launch_ms": statistics.median(s.launch_s for s in steps) * 1e3,
            "forward_ms": statistics.median(s.forward_s for s in steps) * 1e3,
            "ops": [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / n, "calls_per_step":
                     e.count / n} for e in ops]}


def main():
    import torch
    from validate import traces

    from dooly.bench.engine import Engine, zoo

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--traces", nargs="+", required=True, help="trace names of tools/validate.py, e.g. long@2")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        engine = Engine(zoo(name))
        engine.run([(0.0, 64, 4), (0.0, 900, 4)])
        wanted = traces(zoo(name).get("max_position_embeddings", 32768))
        result = {trace: profile_trace(engine, wanted[trace], args.top) for trace in args.traces}
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        for trace, r in result.items():
            print(f"{name} {trace}: {r['steps']} steps, launch {r['launch_ms']:.1f} ms, forward {r['forward_ms']:.1f}"
                  f" ms; top: " + ", ".join(f"{o['op']} {o['self_cpu_ms_per_step']:.1f}" for o in r["ops"][:6]),
                  flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()  # the engine's KV cache, before the next model asks for its own


if __name__ == "__main__":
    main()
