"""Ground truth on the GPU: transformers continuous batching serving request traces, timed step by step.

For each model (random weights from its config, bf16; models too big for one GPU at reduced depth), each request
trace is served once to warm up (discarded), then `--repeats` more times in the same process. Recorded, per run:

- every step's batch composition (per-request query and key lengths) and the model forward's GPU time, measured
  with CUDA events on the engine's compute stream around its own `ModelRunner.compute_batch`, plus the host phases;
- every request's arrival, first-token time and token timestamps, from the engine's own timestamps.

The engine's ContinuousBatchingConfig as resolved at run time and the environment are stored beside them, in
`<out>/<backend>[-graphs]/<model>.json`. `dooly validate` compares them with Dooly's predictions; nothing here is
ever used to fit a predictor.

    python tools/validate.py --out data/groundtruth --models llama-3.2-1b qwen3-1.7b [--backend sdpa] [--graphs]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Models that do not fit one H100 in bf16 with room for a KV cache are run at this depth; predictions use the same
REDUCED_DEPTH = {"llama-3.1-70b": 20, "qwen2.5-32b": 32, "mixtral-8x7b": 8, "qwen3-30b-a3b": 24}
SDPA_KERNELS = {"sdpa": None, "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                "sdpa-math": "MATH"}


def zoo(name: str) -> dict:
    """A zoo model's config.json."""
    return json.loads((ROOT / "configs" / f"{name}.json").read_text())


def model_traces(name: str) -> dict[str, list[tuple[float, int, int]]]:
    from dooly.bench.traces import traces

    return traces(zoo(name).get("max_position_embeddings", 32768))


@contextlib.contextmanager
def warm_engine(config: dict, **options):
    """A model in the engine from its config (random weights), its process warmed up; its GPU memory given back
    after, before the next model asks for its own."""
    from dooly.bench.engine import Engine

    engine = Engine(config, **options)
    try:
        engine.run([(0.0, 64, 4), (0.0, 900, 4)])  # warm-up of the process: first kernels, allocator, handles
        yield engine
    finally:
        engine.close()


def run_model(name: str, backend: str, graphs: bool, repeats: int, log, only: tuple[str, ...] = ()) -> dict:
    from dooly.environment import BACKENDS, detect

    layers = REDUCED_DEPTH.get(name)
    result = {"model": name, "layers": layers, "backend": backend, "cuda_graphs": graphs,
              "environment": dataclasses.asdict(detect(BACKENDS.get(backend, BACKENDS["sdpa"]))),
              "traces": {}}
    with warm_engine(zoo(name), layers=layers, cb={"use_cuda_graph": True} if graphs else {},
                     sdpa_kernel=SDPA_KERNELS[backend]) as engine:
        for trace, requests in model_traces(name).items():
            if only and trace.split("@")[0] not in only:
                continue
            runs = []
            for repeat in range(repeats + 1):  # the first run of each trace is a warm-up, discarded
                t = time.perf_counter()
                steps, reqs = engine.run(requests)
                if repeat:
                    runs.append({"steps": [dataclasses.asdict(s) for s in steps],
                                 "requests": [dataclasses.asdict(r) for r in reqs]})
                log(f"  {name} {trace} run {repeat}: {len(steps)} steps, {len(reqs)}/{len(requests)} requests, "
                    f"{time.perf_counter() - t:.1f} s")
            result["traces"][trace] = {"requests": requests, "runs": runs}
        result["cb_config"] = engine.resolved_config()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--backend", default="sdpa", choices=list(SDPA_KERNELS))
    parser.add_argument("--graphs", action="store_true", help="the engine with CUDA graphs on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    parser.add_argument("--traces", nargs="+", default=[], choices=["chat", "long", "burst", "decode", "longctx"],
                        help="only these traces (default: all)")
    args = parser.parse_args()
    folder = args.out / (args.backend + ("-graphs" if args.graphs else ""))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for name in args.models:
        if time.monotonic() - start > args.budget_s:
            print(f"budget spent: {name} and the rest not run", flush=True)
            break
        path = folder / f"{name}.json"
        done = json.loads(path.read_text()) if path.exists() else None
        wanted = set(args.traces) or {t.split("@")[0] for t in model_traces(args.models[0])}
        if done is not None and wanted <= {t.split("@")[0] for t in done["traces"]}:
            continue
        t = time.perf_counter()
        result = run_model(name, args.backend, args.graphs, args.repeats, lambda m: print(m, flush=True),
                           tuple(args.traces))
        if done is not None:  # add the new traces to what an earlier run recorded
            result = {**done, "traces": {**done["traces"], **result["traces"]}}
        path.write_text(json.dumps(result))
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
