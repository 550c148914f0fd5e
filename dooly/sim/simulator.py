"""Discrete-event simulation of a continuous-batching engine serving a workload.

At each step the engine takes the requests that have arrived, the scheduler picks the batch, and the step lasts
what `StepTime` predicts for it; tokens are stamped when the step ends (the engine reads them back in
`update_batch`), so a request's first token comes at the end of the step that finishes its prompt.

`StepTime` models what the engine's settings do to a step (`ContinuousBatchingConfig`):
- eager (default): host preparation, then the forward at the batch's own shapes, launched from Python;
- CUDA graphs: shapes padded to `q_padding_interval_size` query tokens and `kv_padding_interval_size` keys; a
  padded shape seen for the first time is run and captured (twice the eager forward), later ones replay the graph
  (no Python launches, no per-shape attention plans);
- async batching: the host prepares step N+1 while the GPU runs step N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import DoolyError
from ..limits import LIMITS
from ..predict.step import Forward, Predictor, Step
from .schedulers import Scheduled
from .workload import Request


@dataclass
class EngineSettings:
    use_cuda_graph: bool = False
    q_padding_interval_size: int = 64
    kv_padding_interval_size: int = 16384
    max_batch_tokens: int = 8192
    use_async_batching: bool = False


class StepTime:
    """Seconds of each step of one serving run (one engine thread: its attention plan cache starts empty)."""

    def __init__(self, predictor: Predictor, engine_settings: EngineSettings):
        self.predictor, self.engine_settings = predictor, engine_settings
        self.graphs: set[tuple[int, int]] = set()
        self.plans: set[tuple[int, int]] = set()
        self.extrapolated: set[str] = set()  # signatures this run's steps were predicted beyond their grid

    def _padded(self, batch: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        k = self.engine_settings
        t = sum(q for q, _ in batch)
        read = sum(keys for _, keys in batch) - t
        t_pad = min(math.ceil(t / k.q_padding_interval_size) * k.q_padding_interval_size, k.max_batch_tokens)
        read_pad = math.ceil(read / k.kv_padding_interval_size) * k.kv_padding_interval_size if read else 0
        extra_q, extra_k = max(0, t_pad - t), max(0, read_pad - read)
        padded = batch + ([(extra_q, extra_q + extra_k)] if extra_q else [])
        return padded, (t_pad, read_pad)

    def step(self, batch: list[tuple[int, int]]) -> Step:
        """The prediction of a step serving `batch` [(query tokens, keys)] as this run's engine serves it."""
        k = self.engine_settings
        if k.use_cuda_graph:
            padded, shape = self._padded(batch)
            forward = Forward.REPLAY if shape in self.graphs else Forward.CAPTURE
            self.graphs.add(shape)
            step = self.predictor.step(padded, forward=forward, overlap_host=k.use_async_batching)
        else:
            step = self.predictor.step(batch, self.plans, overlap_host=k.use_async_batching)
            self.plans |= step.shapes
        self.extrapolated |= step.extrapolated
        return step

    def forward_us(self, batch: list[tuple[int, int]]) -> tuple[float, Step]:
        """The forward of a step (µs), and the prediction it came from."""
        step = self.step(batch)
        return step.parts.forward_us, step

    def __call__(self, batch: list[tuple[int, int]]) -> float:
        """Seconds the engine spends on a step serving `batch` [(query tokens, keys)]."""
        return self.step(batch).parts.total_us * 1e-6


@dataclass
class Outcome:
    requests: list[dict]
    steps: list[dict] = field(default_factory=list)  # start and end time, batch size, tokens


def ready_times(pending: list[Request], admission_s: Callable[[int], float] | None) -> list[float]:
    """When each request (in arrival order) can first be scheduled: requests arriving together are taken in by the
    host as one batch of `admission_s(count)` seconds, one batch after another."""
    ready: list[float] = []
    i = 0
    while i < len(pending):
        j = i
        while j < len(pending) and pending[j].arrival == pending[i].arrival:
            j += 1
        done = pending[i].arrival + (admission_s(j - i) if admission_s else 0.0)
        ready += [max(done, ready[-1] if ready else done)] * (j - i)
        i = j
    return ready


@dataclass
class Host:
    """An engine's host on a timeline of its own beside the GPU's: it enters a step (schedules and launches it),
    `launch_s(batch)` its span from entering a step to its last launch, then waits for a step's output and
    `rest_s(batch)` processes it and schedules the next. With asynchronous scheduling the output it waits for is
    the step before's, so it enters a step while the GPU may still run the last one."""

    launch_s: Callable[[list], float]
    rest_s: Callable[[list], float]
    asynchronous: bool = True


def simulate(requests: list[Request], scheduler, step_time, max_steps: int = LIMITS["steps"].default,
             progress=None, admission_s: Callable[[int], float] | None = None, host: Host | None = None) -> Outcome:
    """Serve `requests` with `scheduler`; `step_time(batch)` gives each step's seconds, one after another, or, with
    a `host` running ahead of the GPU, `step_time(batch, ahead_s)` the GPU span of a step the host entered `ahead_s`
    before the GPU finished the last (negative: the GPU idled); `admission_s(n)` the host's time to take in n
    requests arriving together before any can be scheduled (none if not given); `progress(finished)` is told every
    few hundred steps how many requests have finished. A run is stopped after `max_steps` steps (the steps limit),
    so that its record of steps stays bounded."""
    pending = sorted(requests, key=lambda r: (r.arrival, r.id))
    ready = ready_times(pending, admission_s)
    now, i, states, steps, finished = 0.0, 0, {}, [], 0
    gpu_end = -math.inf  # with a host: when the GPU finishes what it was given; `now` is when the host is free
    for n in range(max_steps):
        if progress and n % 512 == 0:
            progress(finished)
        while i < len(pending) and ready[i] <= now:
            scheduler.add(pending[i])
            i += 1
        if not scheduler.pending():
            if i == len(pending):
                break
            now = ready[i]
            continue
        batch: list[Scheduled] = scheduler.schedule()
        if not batch:
            if i == len(pending):
                raise DoolyError("the scheduler can serve none of the pending requests: a request needs more KV cache "
                                 "than the engine has")
            now = ready[i]
            continue
        sizes = [(s.tokens, s.keys) for s in batch]
        if host is None:
            start, now = now, now + step_time(sizes)
            end = now
        else:
            start = max(now, gpu_end)
            end = start + step_time(sizes, gpu_end - now)
            now = max(now + host.launch_s(sizes), gpu_end if host.asynchronous else end) + host.rest_s(sizes)
            gpu_end = end
        steps.append({"start": start, "time": end, "requests": len(batch), "tokens": sum(s.tokens for s in batch)})
        for s in batch:
            state = s.state
            makes = s.produces_token
            state.cached += s.tokens
            states[state.request.id] = state
            if makes:
                state.generated += 1
                state.token_times.append(end)
                if state.generated >= state.request.output:
                    scheduler.finish(state)
                    finished += 1
    else:
        raise DoolyError(f"the workload did not finish within {max_steps:,} steps, the steps limit (raise it with "
                         f"--limit steps=N)")
    rows = []
    for r in requests:
        s = states[r.id]
        times = s.token_times
        rows.append({"id": r.id, "arrival": r.arrival, "prompt": r.prompt, "output": r.output,
                     "ttft": times[0] - r.arrival,
                     "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
                     "e2e": times[-1] - r.arrival})
    return Outcome(rows, steps)


def seen_when_read(outcome: Outcome, launch_s: Callable[[int, int], float]) -> Outcome:
    """The outcome as the caller of an engine with asynchronous scheduling sees it. The host launches step N+1
    before it waits on step N's output, so a first token computed in step N is read when N's GPU work ends or, if
    the host is the slower, once N+1 is launched: host work from N's start of `launch_s(tokens, requests)` for N and
    for N+1, back to back. Where no step follows at once, nothing delays the read."""
    steps = outcome.steps
    ends = np.array([s["time"] for s in steps])
    rows = []
    for r in outcome.requests:
        first = r["arrival"] + r["ttft"]
        n = int(np.searchsorted(ends, first - 1e-12))
        if n + 1 < len(steps) and steps[n + 1]["start"] == steps[n]["time"]:
            step, after = steps[n], steps[n + 1]
            host = launch_s(step["tokens"], step["requests"]) + launch_s(after["tokens"], after["requests"])
            first += min(max(0.0, host - (step["time"] - step["start"])), after["time"] - after["start"])
        rows.append({**r, "ttft": first - r["arrival"]})
    return Outcome(rows, outcome.steps)


def simulate_vllm(requests: list[Request], scheduler, model, max_steps: int = LIMITS["steps"].default,
                  progress=None, async_scheduling: bool = True) -> Outcome:
    """vLLM serving `requests` on `model` (a `predict.vllm_step.StepModel`): the host takes in arrivals and runs
    each step's host work on its own timeline, each step's GPU span follows from how far ahead of the GPU the host
    entered it, and, with asynchronous scheduling, first tokens are seen when the host reads them."""
    host = Host(lambda batch: model.launch_us(sum(q for q, _ in batch), len(batch)) * 1e-6,
                lambda batch: model.rest_us(len(batch)) * 1e-6, async_scheduling)
    outcome = simulate(requests, scheduler, lambda batch, ahead_s: model.span_us(batch, ahead_s * 1e6) * 1e-6,
                       max_steps, progress, admission_s=lambda n: model.admit_us(n) * 1e-6, host=host)
    return seen_when_read(outcome, lambda t, r: model.launch_us(t, r) * 1e-6) if async_scheduling else outcome


def summary(outcome: Outcome) -> dict:
    def stats(values):
        v = np.array([x for x in values if x is not None], dtype=float) * 1e3
        if not len(v):
            return {"mean": None, "p50": None, "p90": None, "p99": None}
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
                "p99": float(np.percentile(v, 99))}

    rows = outcome.requests
    span = max(r["arrival"] + r["e2e"] for r in rows) - min(r["arrival"] for r in rows)
    return {"requests": len(rows), "ttft_ms": stats(r["ttft"] for r in rows),
            "tpot_ms": stats(r["tpot"] for r in rows), "e2e_ms": stats(r["e2e"] for r in rows),
            "throughput_tok_s": sum(r["output"] for r in rows) / span if span > 0 else None}
