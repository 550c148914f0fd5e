"""Torch-profiler traces of single vLLM steps, to see where a step's time goes on the host and on the GPU.

Each scenario is served four times by one engine (three warm-ups, then one profiled run); each profiled run is kept
as a gzipped Chrome trace beside the hooks' view of its steps (`<out>/<model>-<scenario>.json.gz`,
`<out>/<model>-steps.json`). A model is a zoo name or `tiny:N`, the calibration model at depth N.

    PYTHONPATH=. python tools/vllm_step_trace.py llama-3.1-8b --out DIR     # on the GPU machine
    python tools/vllm_step_trace.py --summary data/host/vllm-traces/*.json.gz   # anywhere: where the time went
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

# a request arriving at an idle engine (piecewise graphs at 220 tokens, eager launches at 600) and a full chunk
SCENARIOS = {"idle-220": [(0.05, 220, 1)], "idle-600": [(0.05, 600, 1)], "chunk-2048": [(0.0, 2048, 1)]}
# the host's stages of a step, each shown as a range on the trace's CPU timeline
SCOPES = {"vllm.v1.worker.gpu.model_runner:GPUModelRunner": ("add_requests", "update_requests", "prepare_inputs",
                                                           "prepare_attn", "sample", "postprocess_sampled",
                                                           "execute_model", "sample_tokens"),
          "vllm.v1.core.sched.scheduler:Scheduler": ("schedule", "update_from_output"),
          "vllm.v1.engine.core:EngineCore": ("step", "step_with_batch_queue"),
          "vllm.v1.engine.llm_engine:LLMEngine": ("step",)}


def _scoped(method, label):
    from torch.profiler import record_function

    def scoped(*args, **kwargs):
        with record_function(label):
            return method(*args, **kwargs)

    return scoped


def add_scopes() -> None:
    import importlib

    for where, names in SCOPES.items():
        module, cls_name = where.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        for name in names:
            if hasattr(cls, name):
                setattr(cls, name, _scoped(getattr(cls, name), f"{cls_name}.{name}"))


def summary(path: Path) -> str:
    """A trace's step in a few numbers: its kernels' busy time against their span, the GPU's idle time before the
    first kernel of the model (input preparation on the host) and after it, and the longest kernels."""
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    first_model = next(i for i, e in enumerate(kernels) if e["name"].startswith("triton_"))
    idle = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(kernels, kernels[1:])]
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy = sum(e["dur"] for e in kernels)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e["name"][:60]] = by_name.get(e["name"][:60], 0.0) + e["dur"]
    top = ", ".join(f"{n} {us / 1e3:.2f} ms" for n, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:3])
    return (f"{path.name}: {len(kernels)} kernels, busy {busy / 1e3:.2f} of {span / 1e3:.2f} ms; GPU idle "
            f"{sum(max(0, g) for g in idle[:first_model]) / 1e3:.2f} ms before the model's first kernel, "
            f"{sum(max(0, g) for g in idle[first_model:]) / 1e3:.2f} ms after; longest: {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summary", nargs="+", type=Path, metavar="TRACE")
    args = parser.parse_args()
    if args.summary:
        for path in args.summary:
            print(summary(path))
        return
    if not (args.model and args.out):
        parser.error("a model and --out, or --summary TRACE...")
    os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"  # vLLM's own record_function scopes in the V1 runner
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dooly.bench.vllm_engine import CONFIGS, TINY, VllmEngine

    if args.model.startswith("tiny:"):
        config = {**TINY, "num_hidden_layers": int(args.model.split(":")[1])}
    else:
        config = json.loads((CONFIGS / f"{args.model}.json").read_text())
    name = args.model.replace(":", "")
    args.out.mkdir(parents=True, exist_ok=True)
    add_scopes()  # before the engine: its core binds its step method when it is built
    engine = VllmEngine(config, prefix_caching=False, max_model_len=4096)
    kept = {}
    try:
        engine.run([(0.0, 64, 8)] * 4)
        for scenario, requests in SCENARIOS.items():
            for _ in range(3):
                engine.run(requests)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                steps, _ = engine.run(requests)
            torch.cuda.synchronize()
            kept[scenario] = [asdict(s) for s in steps]
            raw = args.out / f"{name}-{scenario}.json"
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
            print(scenario, [(sum(s["queries"]), round(s["forward_s"] * 1e3, 2), round(s["host_s"] * 1e3, 2))
                             for s in kept[scenario]], flush=True)
    finally:
        engine.close()
    (args.out / f"{name}-steps.json").write_text(json.dumps(kept))


if __name__ == "__main__":
    main()
