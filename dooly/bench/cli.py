"""`dooly groundtruth CONFIG... --out DIR`: record, on a GPU, the engine serving the ground-truth traces.

The recording is `dooly.bench.groundtruth`'s, in the files `dooly validate --groundtruth DIR` reads. A model's
file that already holds every asked-for trace is left alone, and new traces are added to what an earlier run
recorded, so an interrupted recording resumes model by model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..config import load_config
from ..environment import BACKENDS, detect
from ..errors import DoolyError, command
from ..limits import output_folder, parse_json, read_text
from .groundtruth import TRACE_KINDS, record_model, trace_kind

# flash attention refuses the engine's float mask, so the engine cannot serve with it forced
RECORDABLE = [backend for backend in BACKENDS if backend != "sdpa-flash"]


def recorded(path: Path) -> dict | None:
    """What an earlier run recorded for a model, or None: the file is extended, so it must be one of ours."""
    if not path.exists():
        return None
    done = parse_json(read_text(path, "ground truth"), str(path))
    if not isinstance(done, dict) or not isinstance(done.get("traces"), dict):
        raise DoolyError(f"{path}: not a ground-truth file (no 'traces' object); move it away to record anew")
    return done


@command
def groundtruth_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly groundtruth", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path, metavar="CONFIG", help="a model's config.json")
    parser.add_argument("--out", type=Path, required=True, help="ground-truth folder, e.g. data/groundtruth")
    parser.add_argument("--backend", default="sdpa", choices=RECORDABLE)
    parser.add_argument("--graphs", action="store_true", help="the engine with CUDA graphs on")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trace after its warm-up")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no model after this long")
    parser.add_argument("--traces", nargs="+", default=[], choices=TRACE_KINDS, metavar="KIND",
                        help=f"only these kinds of trace: {', '.join(TRACE_KINDS)} (default: all)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise DoolyError("--repeats must be at least 1")
    configs = [load_config(path) for path in args.configs]  # every config checked before the GPU is touched
    if not torch.cuda.is_available():
        raise DoolyError("dooly groundtruth runs the engine on a CUDA GPU, and this machine has none")
    folder = output_folder(args.out, "--out") / (args.backend + ("-graphs" if args.graphs else ""))
    folder.mkdir(parents=True, exist_ok=True)
    environment = dataclasses.asdict(detect(BACKENDS[args.backend]))
    wanted = set(args.traces) or set(TRACE_KINDS)
    start = time.monotonic()
    for config in configs:
        if time.monotonic() - start > args.budget_s:
            print(f"budget spent: {config.name} and the rest not run", flush=True)
            break
        path = folder / f"{config.name}.json"
        done = recorded(path)
        if done is not None and wanted <= {trace_kind(trace) for trace in done["traces"]}:
            continue
        t = time.perf_counter()
        result = record_model(config.name, config.data, args.backend, BACKENDS[args.backend].sdpa_kernel, args.graphs,
                              args.repeats, environment, lambda line: print(line, flush=True), tuple(args.traces))
        if done is not None:  # add the new traces to what an earlier run recorded
            result = {**done, "traces": {**done["traces"], **result["traces"]}}
        path.write_text(json.dumps(result))
        print(f"{config.name}: done in {time.perf_counter() - t:.0f} s", flush=True)
    return 0
