"""Serving-configuration search: every engine configuration of a grid serves one workload in the simulated engine;
the configurations that meet the latency SLOs are kept, and of those the Pareto front of throughput per GPU against
latency is the answer.

A grid is `axis=value,value;axis=value...` over `GRID_AXES`; an axis left out takes its `DEFAULT_GRID` values (the
deployments, GPU x engine x attention backend, default to every one the stores hold). An SLO is
`ttft_p90=500ms,tpot_p90=50ms`: a metric (ttft, tpot, e2e), a statistic (mean, p50, p90, p99), a limit in ms or s.

A simulation whose SLO is already lost (enough finished requests over a limit that the percentile, or the mean,
cannot come back under it) stops there: it is not on the front whatever the rest of the run does, and an overloaded
configuration, the slowest to simulate, is the first to lose it.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields

from ..errors import DoolyError
from ..predict.step import Predictor
from .schedulers import engine_scheduler
from .simulator import EngineSettings, StepTime, simulate, summary
from .workload import Request

METRICS = ("ttft", "tpot", "e2e")
STATISTICS = {"mean": None, "p50": 0.5, "p90": 0.9, "p99": 0.99}
UNITS_MS = {"ms": 1.0, "s": 1e3}
BLOCK_SIZES = {"cb": 256, "vllm": 16}  # the engines' defaults, as `dooly simulate` takes them


@dataclass(frozen=True)
class Objective:
    metric: str
    statistic: str
    limit_ms: float

    @property
    def name(self) -> str:
        return f"{self.metric}_{self.statistic}"

    def value(self, result: dict) -> float | None:
        return result[f"{self.metric}_ms"][self.statistic]


def parse_slo(text: str) -> list[Objective]:
    """`ttft_p90=500ms,tpot_p90=50ms` -> objectives."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, limit = part.partition("=")
        metric, _, statistic = name.strip().partition("_")
        unit = next((u for u in sorted(UNITS_MS, key=len, reverse=True) if limit.strip().endswith(u)), None)
        try:
            value = float(limit.strip()[: -len(unit)]) if unit else math.nan
        except ValueError:
            value = math.nan
        if not sep or metric not in METRICS or statistic not in STATISTICS or not value > 0 or math.isinf(value):
            raise DoolyError(f"SLO {part!r} does not parse: expected METRIC_STAT=LIMIT with METRIC one of "
                             f"{', '.join(METRICS)}, STAT one of {', '.join(STATISTICS)}, LIMIT a positive number "
                             f"with a unit ({', '.join(UNITS_MS)}), e.g. ttft_p90=500ms,tpot_p90=50ms")
        out.append(Objective(metric, statistic, value * UNITS_MS[unit]))
    if not out:
        raise DoolyError("an SLO needs at least one objective, e.g. ttft_p90=500ms")
    if len({o.name for o in out}) < len(out):
        raise DoolyError(f"SLO {text!r} gives an objective twice")
    return out


@dataclass(frozen=True)
class Config:
    """One engine configuration: where it runs (GPU, engine, attention backend, TP degree) and its batching settings."""

    gpu: str
    engine: str
    backend: str
    tp: int
    scheduler: str
    max_seqs: int  # max_requests_per_batch (cb) / max_num_seqs (vllm)
    max_tokens: int  # max_batch_tokens / max_num_batched_tokens: also the largest prefill chunk
    cuda_graphs: bool
    async_batching: bool

    @property
    def deployment(self) -> tuple[str, str, str, int]:
        return self.gpu, self.engine, self.backend, self.tp

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


GRID_AXES = tuple(f.name for f in fields(Config))
DEFAULT_GRID = {"tp": [1], "scheduler": ["cb", "vllm"], "max_seqs": [16, 32, 64, 128, 256],
                "max_tokens": [1024, 2048, 4096, 8192], "cuda_graphs": [False, True], "async_batching": [False]}
_BOOLEANS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


def _grid_value(axis: str, text: str):
    kind = next(f.type for f in fields(Config) if f.name == axis)
    if kind == "bool":
        if text.lower() not in _BOOLEANS:
            raise DoolyError(f"grid: {axis}={text}: expected on or off")
        return _BOOLEANS[text.lower()]
    if kind == "int":
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise DoolyError(f"grid: {axis}={text}: expected a positive integer")
        return value
    if axis == "scheduler" and text not in BLOCK_SIZES:
        raise DoolyError(f"grid: unknown scheduler {text!r} (cb, vllm)")
    return text


def parse_grid(spec: str | None) -> dict[str, list]:
    """`max_seqs=64,128;cuda_graphs=on,off` -> {axis: values}, only the axes given."""
    out: dict[str, list] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        axis, sep, values = part.partition("=")
        axis = axis.strip()
        if not sep or axis not in GRID_AXES:
            raise DoolyError(f"grid: {part!r} is not AXIS=VALUE,... with AXIS one of {', '.join(GRID_AXES)}")
        if axis in out:
            raise DoolyError(f"grid: {axis} is given twice")
        parsed = [_grid_value(axis, v.strip()) for v in values.split(",") if v.strip()]
        if not parsed:
            raise DoolyError(f"grid: {axis} has no values")
        out[axis] = list(dict.fromkeys(parsed))
    return out


def expand(grid: dict[str, list]) -> list[Config]:
    """Every configuration of a grid that gives all axes."""
    missing = [a for a in GRID_AXES if a not in grid]
    if missing:
        raise DoolyError(f"grid: no values for {', '.join(missing)}")
    return [Config(*values) for values in itertools.product(*(grid[a] for a in GRID_AXES))]


@dataclass
class Setting:
    """What every simulation of a search shares: the workload, the SLO, a predictor per deployment, and the KV cache
    each GPU holds (in tokens, by (gpu, tp, max_tokens))."""

    requests: list[Request]
    objectives: list[Objective]
    predictors: dict[tuple[str, str, str, int], Predictor]
    cache_tokens: dict[tuple[str, int, int], int]


class Missed(Exception):
    def __init__(self, objective: Objective):
        self.objective = objective


class _Watch:
    """A scheduler that checks the SLO as requests finish, and raises `Missed` once an objective cannot be met."""

    def __init__(self, scheduler, requests: list[Request], objectives: list[Objective]):
        self.scheduler = scheduler
        self.add, self.pending, self.schedule = scheduler.add, scheduler.pending, scheduler.schedule
        counts = {"ttft": len(requests), "e2e": len(requests), "tpot": sum(r.output > 1 for r in requests)}
        self.checks = []
        for o in objectives:
            n, q = counts[o.metric], STATISTICS[o.statistic]
            # the sorted values' index the percentile interpolates up from: once that many are over the limit, so
            # is the percentile; for the mean, a sum over n times the limit (values are never negative)
            allowed = n * o.limit_ms if q is None else n - math.floor(q * (n - 1))
            self.checks.append([o, q is None, allowed, 0.0])

    def finish(self, state) -> None:
        self.scheduler.finish(state)
        times, arrival = state.token_times, state.request.arrival
        value = {"ttft": times[0] - arrival, "e2e": times[-1] - arrival,
                 "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None}
        for check in self.checks:
            objective, mean, allowed, _ = check
            v = value[objective.metric]
            if v is None:
                continue
            check[3] += v * 1e3 if mean else v * 1e3 > objective.limit_ms
            if check[3] >= allowed and (not mean or check[3] > allowed):
                raise Missed(objective)


def scheduler_for(config: Config, cache_tokens: int):
    block = BLOCK_SIZES[config.scheduler]
    return engine_scheduler(config.scheduler, cache_tokens // block, block, config.max_tokens, config.max_seqs)


def evaluate(setting: Setting, config: Config) -> dict:
    """One configuration serving the workload: its latency statistics and throughput per GPU, or which objective it
    missed when the simulation stopped early."""
    predictor = setting.predictors[config.deployment]
    scheduler = _Watch(scheduler_for(config, setting.cache_tokens[config.gpu, config.tp, config.max_tokens]),
                       setting.requests, setting.objectives)
    engine_settings = EngineSettings(use_cuda_graph=config.cuda_graphs, max_batch_tokens=config.max_tokens,
                                     use_async_batching=config.async_batching)
    row = asdict(config)
    try:
        outcome = simulate(setting.requests, scheduler, StepTime(predictor, engine_settings))
    except Missed as e:
        return row | {"meets_slo": False, "missed": e.objective.name}
    except DoolyError as e:  # this configuration cannot serve the workload (a request outgrows its KV cache)
        return row | {"meets_slo": False, "missed": str(e)}
    result = summary(outcome)
    failed = [o.name for o in setting.objectives if (v := o.value(result)) is not None and v > o.limit_ms]
    throughput = result["throughput_tok_s"] or 0.0
    return row | {"meets_slo": not failed, "missed": failed[0] if failed else None, "steps": len(outcome.steps),
                  **{k: result[k] for k in ("ttft_ms", "tpot_ms", "e2e_ms")}, "throughput_tok_s": throughput,
                  "throughput_per_gpu": throughput / config.tp}


def evaluate_all(setting: Setting, configs: list[Config]) -> list[dict]:
    return [evaluate(setting, c) for c in configs]


def chunks(configs: list[Config], workers: int) -> list[list[Config]]:
    """Tasks of a few configurations each, of one deployment each (a worker keeps its predictor's memo warm)."""
    size = max(1, min(16, len(configs) // (4 * max(1, workers))))
    by_deployment: dict[tuple, list[Config]] = {}
    for c in configs:
        by_deployment.setdefault(c.deployment, []).append(c)
    return [group[i:i + size] for group in by_deployment.values() for i in range(0, len(group), size)]


_FORKED: Setting | None = None  # the setting local worker processes inherit


def _evaluate_forked(configs: list[Config]) -> list[dict]:
    return evaluate_all(_FORKED, configs)


def local_map(setting: Setting, tasks: list[list[Config]], workers: int) -> Iterator[list[dict]]:
    """Each task's rows as it finishes, over `workers` processes forked from this one (predictors and memos shared
    until they diverge)."""
    global _FORKED
    if workers <= 1 or len(tasks) <= 1:
        yield from (evaluate_all(setting, t) for t in tasks)
        return
    _FORKED = setting
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
            yield from pool.imap_unordered(_evaluate_forked, tasks)
    finally:
        _FORKED = None


def pareto(rows: Iterable[dict], latency: Objective | Callable[[dict], float]) -> list[dict]:
    """The rows meeting the SLO that no other such row beats on both throughput per GPU and latency (ties kept),
    by latency; ties in one fixed order of their configurations, so the front does not depend on which worker
    finished first."""
    value = latency.value if isinstance(latency, Objective) else latency
    ok = sorted((r for r in rows if r["meets_slo"] and value(r) is not None),
                key=lambda r: (value(r), -r["throughput_per_gpu"], [str(r.get(axis)) for axis in GRID_AXES]))
    front: list[dict] = []
    for r in ok:
        if not front or r["throughput_per_gpu"] > front[-1]["throughput_per_gpu"] or (
                r["throughput_per_gpu"] == front[-1]["throughput_per_gpu"] and value(r) == value(front[-1])):
            front.append(r)
    return front
