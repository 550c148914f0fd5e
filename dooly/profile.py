"""`dooly profile CONFIG... --store PATH [--backend B] [--budget-s S]`: measure, on this GPU, every op signature of
these models that the store does not have yet.

plan -> codegen -> measure: the models' signatures are deduplicated against the store for this machine's
environment, a microbenchmark is generated for each one left, and each is timed over its request grid with
adaptive refinement. Every point is committed as soon as it is measured, so a run that crashes or is killed
resumes where it stopped; a point that runs out of memory is recorded as skipped, with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Protocol

from .bench.sweep import ATTENTION_WORK
from .environment import BACKENDS, DEFAULT_BACKEND, Backend, backend, detect, sdpa_context
from .errors import DoolyError, command
from .limits import output_file, output_folder
from .passes.canonicalize import Signature
from .store import Stats, Store

ROUTINGS = (0, 1)  # expert GEMMs: tokens spread evenly over experts, and skewed


def attention_work(backend: Backend) -> int:
    """The T*K bound of the backend's attention sweeps."""
    return ATTENTION_WORK // backend.sweep_divisor


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Budget(Exception):
    pass


class MeasurementSink(Protocol):
    """What a `Sweeper` reads and writes: a `Store`, or, inside a Ray task, `ray_backend.WriterStore`."""

    def points(self, sig_hash: str, env: str, family: str, /) -> dict[str, dict]: ...

    def record(self, sig_hash: str, env: str, point: dict, stats: Stats, gpu_s: float = 0.0, /) -> None: ...

    def record_skip(self, sig_hash: str, env: str, point: dict, reason: str, gpu_s: float = 0.0, /) -> None: ...

    def finish_sweep(self, sig_hash: str, env: str, gpu_s: float, points: int, /) -> None: ...


class Sweeper:
    """Measures signatures into the store, point by point."""

    def __init__(self, store: MeasurementSink, env_name: str, backend: Backend, deadline: float, on_point=None,
                 device: str = "cuda"):
        self.store, self.env, self.backend, self.deadline = store, env_name, backend, deadline
        self.on_point, self.device = on_point or (lambda: None), device
        self.spread: dict[str, float] = {}  # point key -> p90 - min µs, for refinement

    def point(self, module, sig: Signature, point: dict[str, int]) -> float | None:
        """Median µs at a point, measuring it unless the store has it."""
        from .store import point_key

        key = point_key(point)
        done = self.store.points(sig.hash, self.env, sig.family).get(key)
        if done is not None and done["status"] != "transferred":  # a transferred point is measured when reached
            if done["status"] == "ok":
                self.spread[key] = done["p90_us"] - done["min_us"]
            return done["median_us"]
        if time.monotonic() > self.deadline:
            raise Budget
        import torch

        from .bench.timer import measure

        start = time.perf_counter()
        try:
            with sdpa_context(self.backend) if sig.family == "attention" else contextlib.nullcontext():
                timing = measure(lambda: module.make_inputs(point, self.device), module.run, self.device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            self.store.record_skip(sig.hash, self.env, point, "out of memory", time.perf_counter() - start)
            self.on_point()
            return None
        except RuntimeError as e:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            reason = str(e).strip().splitlines()[0][:300]
            self.store.record_skip(sig.hash, self.env, point, reason, time.perf_counter() - start)
            self.on_point()
            return None
        stats = timing.stats()
        self.store.record(sig.hash, self.env, point, stats, timing.gpu_s)
        self.spread[key] = stats.p90_us - stats.min_us
        self.on_point()
        return stats.median_us

    def sweep(self, module, sig: Signature, limits: dict[str, int]) -> None:
        from .bench.sweep import initial_points, refine, refine_axis
        from .store import point_key

        grid = initial_points(sig.axes, limits, attention_work(self.backend))
        if sig.family == "moe":
            grid = [p | {"dist": d} for p in grid for d in ROUTINGS]
        measured = {point_key(p): self.point(module, sig, p) for p in grid}
        if sig.axes:
            refine(lambda p: self.point(module, sig, p), refine_axis(sig.axes), measured, self.spread)
        rows = self.store.points(sig.hash, self.env, sig.family)
        spent = sum(r["gpu_s"] for r in rows.values())
        self.store.finish_sweep(sig.hash, self.env, spent, len(rows))


def sweep_all(sweeper: Sweeper, todo: list, paths: dict, limits: dict, on_signature=lambda sig: None) -> int:
    """Sweep each signature with its generated benchmark until the budget runs out; returns how many finished."""
    for finished, sig in enumerate(todo):
        on_signature(sig)
        try:
            sweeper.sweep(load(paths[sig.hash]), sig, limits[sig.hash])
        except Budget:
            return finished
    return len(todo)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly profile", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="+", type=Path, help="config.json files, or compiled IRs (.ir, model.json)")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="whose step to profile: transformers' continuous batching, or vLLM 0.24 (IRs compiled "
                             "with --frontend vllm)")
    parser.add_argument("--backend", help=f"attention backend: {', '.join(BACKENDS)} (transformers, default sdpa); "
                                          "FLASH_ATTN, TRITON_ATTN, FLASHINFER (vllm, default FLASH_ATTN)")
    parser.add_argument("--eager", action="store_true", help="vllm: its enforce_eager mode (ops one by one)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop after this many seconds")
    parser.add_argument("--out", type=Path, help="folder for the generated microbenchmarks (default: next to "
                                                   "the store)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="one Ray task per GPU per signature group, on a new local Ray instance or the cluster "
                             "at ADDRESS (the ray extra)")
    args = parser.parse_args(argv)
    return run(args)


def run(args) -> int:
    if not args.budget_s > 0:  # NaN is refused too
        raise DoolyError(f"--budget-s must be a positive number of seconds (inf: no budget), got {args.budget_s}")
    if getattr(args, "engine", "transformers") == "vllm":
        from .vllm_profile import run as run_vllm

        args.backend = args.backend or "FLASH_ATTN"
        return run_vllm(args)
    chosen = backend(args.backend or DEFAULT_BACKEND.name)
    output_file(args.store, "--store")
    bench = output_folder(args.out, "--out") if args.out else args.store.parent / "bench"
    from .compile import load_model

    graphs = [load_model(path) for path in args.config]  # bad input is refused before looking for a GPU
    if getattr(args, "ray", None) is not None:
        from .ray_backend import profile_command

        return profile_command(args)
    import torch

    if not torch.cuda.is_available():
        raise DoolyError("no CUDA GPU here: dooly profile measures on a GPU (plan, predict and simulate run "
                         "anywhere)")
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from .bench.sweep import initial_points
    from .passes import codegen
    from .plan import signature_uses, sweep_limits

    start = time.monotonic()
    store = Store(args.store)
    env = store.add_environment(detect(chosen))
    console = Console()
    used = signature_uses(graphs, env.attention_backend)
    signatures = {h: sig for h, (sig, _) in used.items()}
    done = store.finished_sweeps(env.name)
    collectives = [s for h, s in signatures.items() if h not in done and s.family == "collective"]
    if collectives:  # they run in several processes, one a GPU: not from this single process
        written = codegen.write(collectives, bench)
        console.print(f"[yellow]skipping {len(collectives)} collective signature(s): they need one process a GPU on "
                      f"a machine with several, which dooly profile does not drive yet; their benchmarks run under "
                      f"torchrun: {', '.join(map(str, written.values()))}[/yellow]")
    todo = [s for h, s in signatures.items() if h not in done and s.family != "collective"]
    for sig in todo:
        store.add_signature(sig)
    paths = codegen.write(todo, bench)
    limits = {s.hash: sweep_limits(s, used[s.hash][1]) for s in todo}
    total = sum(len(initial_points(s.axes, limits[s.hash], attention_work(chosen)))
                * (len(ROUTINGS) if s.family == "moe" else 1) for s in todo)
    console.print(f"[b]{env.name}[/b]: {len(signatures)} signatures, {len(done & signatures.keys())} in the store, "
                  f"{len(todo)} to profile ({total} grid points before refinement)")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("points", total=total)
        sweeper = Sweeper(store, env.name, chosen, start + args.budget_s, lambda: progress.advance(task))
        finished = sweep_all(sweeper, todo, paths, limits,
                             lambda sig: progress.update(task, description=f"{sig.op} {sig.hash[:8]}"))
    left = len(todo) - finished
    console.print(f"profiled {finished} signatures in {time.monotonic() - start:.0f} s; "
                  + (f"{left} left for the next run (the budget ran out)" if left else "all done"))
    print(json.dumps({"environment": env.name, "profiled": finished, "left": left}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
