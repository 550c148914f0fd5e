"""Timing one op at one request point, the way it runs inside a serving step.

A single event-timed launch has a floor of 30-50 µs on the lent H100 while many kernels take 2-5 µs, so an op is
timed as CUDA-graph replays of many launches: inputs are built in several copies whose total exceeds the L2
cache (50 MB), the graph cycles through them (as a forward's weights and activations would), it is warmed up,
then each of `REPLAYS` replays is timed with CUDA events and divided by its launch count. Points whose spread is
high are timed again. An op that cannot be captured (a host sync inside) falls back to timing a loop of eager
launches between two events.

On a machine without CUDA the same code runs eagerly on the CPU with wall-clock timing: that is how the CPU
tests exercise generated benchmarks, not a measurement anyone should store.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_BYTES = 50 * 2**20
ROTATE_BYTES = 2 * L2_BYTES
MAX_COPIES = 16
MIN_REPLAY_S = 200e-6
MAX_LAUNCHES = 64
WARMUP_S = 0.02  # replay for this long first: an idle GPU clocks down, and tiny kernels show it most
REPLAYS = 15
HIGH_SPREAD = 0.05  # std / median above which a point is timed again
MAX_ROUNDS = 3


@dataclass
class Timing:
    samples_us: list[float]  # per-launch time of each replay
    launches: int  # launches per replay
    copies: int  # input sets rotated through
    graph: bool  # timed as a CUDA graph (False: eager loop)
    gpu_s: float  # device time this point cost the profiler

    def stats(self):
        from ..store import Stats

        s = sorted(self.samples_us)
        p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]
        return Stats(s[0], statistics.median(s), p90, statistics.pstdev(s), len(s))


def _bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_bytes(x) for x in obj.values())
    return 0


def _cuda_samples(run: Callable, sets: list, launches: int, replays: int, graph: bool) -> list[float]:
    stream = torch.cuda.Stream()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            run(*sets[0])  # warm-up on the capture stream (lazy handles, workspaces)
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=stream):
            for i in range(launches):
                run(*sets[i % len(sets)])
        replay = g.replay
    else:
        def replay():
            for i in range(launches):
                run(*sets[i % len(sets)])
    start = time.perf_counter()
    while True:  # warm up for WARMUP_S of device time, at least two replays
        replay()
        replay()
        torch.cuda.synchronize()
        if time.perf_counter() - start > WARMUP_S:
            break
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends):
        s.record()
        replay()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 / launches for s, e in zip(starts, ends)]


def _agreed(value: int) -> int:
    """The largest `value` over the ranks of a collective benchmark (each rank must launch as often as the others,
    or they wait for each other forever); `value` itself outside one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([int(value)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def measure(make_inputs: Callable[[], tuple], run: Callable, device: str) -> Timing:
    """Time `run(*make_inputs())`; `make_inputs` is called once per rotated copy."""
    start = time.perf_counter()
    first = make_inputs()
    copies = 1 if device != "cuda" else max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(1, _bytes(first)))))
    sets = [first] + [make_inputs() for _ in range(copies - 1)]
    if device != "cuda":
        samples = []
        for _ in range(3):
            t = time.perf_counter()
            run(*first)
            samples.append((time.perf_counter() - t) * 1e6)
        return Timing(samples, 1, 1, False, time.perf_counter() - start)
    for s in sets:
        run(*s)  # eager warm-up of every copy: allocator, library handles, autotuning
    torch.cuda.synchronize()
    probe = _cuda_samples(run, sets, 1, 3, graph=False)
    launches = _agreed(max(1, min(MAX_LAUNCHES, math.ceil(MIN_REPLAY_S / max(1e-7, min(probe) * 1e-6)))))
    try:
        samples = _cuda_samples(run, sets, launches, REPLAYS, graph=True)
        graph = True
    except RuntimeError:  # not capturable: time a loop of eager launches instead
        torch.cuda.synchronize()
        samples = _cuda_samples(run, sets, max(launches, 20), REPLAYS, graph=False)
        graph = False
    for _ in range(MAX_ROUNDS - 1):
        if not _agreed(statistics.pstdev(samples) > HIGH_SPREAD * statistics.median(samples)):
            break
        samples += _cuda_samples(run, sets, launches if graph else max(launches, 20), REPLAYS, graph)
    torch.cuda.synchronize()
    return Timing(samples, launches, copies, graph, time.perf_counter() - start)
