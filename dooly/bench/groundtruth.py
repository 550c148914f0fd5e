"""Ground truth on the GPU: transformers continuous batching serving request traces, timed step by step.

For each model (random weights from its config, bf16; models too big for one GPU at reduced depth), each request
trace is served once to warm up (discarded), then `repeats` more times in the same process. Recorded, per run:

- every step's batch composition (per-request query and key lengths) and the model forward's GPU time, measured
  with CUDA events on the engine's compute stream around its own `ModelRunner.compute_batch`, plus the host phases;
- every request's arrival, first-token time and token timestamps, from the engine's own timestamps.

The engine's ContinuousBatchingConfig as resolved at run time and the environment are stored beside them, in
`<out>/<backend>[-graphs]/<model>.json`, the files `dooly validate` reads; nothing here is ever used to fit a
predictor. `dooly groundtruth` (`dooly.bench.cli`) is the command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

from .engine import Engine
from .traces import traces

# Models that do not fit one H100 in bf16 with room for a KV cache are run at this depth; predictions use the same
REDUCED_DEPTH = {"llama-3.1-70b": 20, "qwen2.5-32b": 32, "mixtral-8x7b": 8, "qwen3-30b-a3b": 24}
TRACE_KINDS = ("chat", "long", "burst", "decode", "longctx")
Request = tuple[float, int, int]  # arrival s, prompt tokens, output tokens


def model_traces(config: dict) -> dict[str, list[Request]]:
    """The traces a model is recorded on, named `kind@rate` (`burst@inf`, `chat@8`), capped by its context."""
    return traces(config.get("max_position_embeddings", 32768))


def trace_kind(trace: str) -> str:
    return trace.split("@")[0]


@contextlib.contextmanager
def warm_engine(config: dict, **options) -> Iterator[Engine]:
    """A model in the engine from its config (random weights), its process warmed up; its GPU memory given back
    after, before the next model asks for its own."""
    engine = Engine(config, **options)
    try:
        engine.run([(0.0, 64, 4), (0.0, 900, 4)])  # warm-up of the process: first kernels, allocator, handles
        yield engine
    finally:
        engine.close()


def record_model(name: str, config: dict, backend: str, sdpa_kernel: str | None, graphs: bool, repeats: int,
                 environment: dict, log: Callable[[str], None], only: tuple[str, ...] = ()) -> dict:
    """One model's ground truth: every trace (or the kinds in `only`) served `repeats` times after a warm-up."""
    layers = REDUCED_DEPTH.get(name)
    result = {"model": name, "layers": layers, "backend": backend, "cuda_graphs": graphs,
              "environment": environment, "traces": {}}
    with warm_engine(config, layers=layers, cb={"use_cuda_graph": True} if graphs else {},
                     sdpa_kernel=sdpa_kernel) as engine:
        for trace, requests in model_traces(config).items():
            if only and trace_kind(trace) not in only:
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
