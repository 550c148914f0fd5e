"""Step latency of any batch: the model's ops at the batch's sizes, plus the engine's host time.

A batch is a list of requests, each (query tokens, keys): keys are what the request's queries attend to in this
step, past plus new tokens, as the engine's `cu_seq_lens_k` counts them. From it come the IR's request symbols:
T = sum of queries, R = requests, K = sum of keys, Ks = the same seen through a sliding window, and per request
q, k. The forward's GPU time is the sum over the IR's ops of count x latency at those sizes (ops the engine runs
only when some request has past tokens count only then); the engine launches it from Python, so the forward
takes max(GPU time, launch time), after a host stall for each attention shape whose execution plan the serving
thread has not built yet (cuDNN caches plans per thread and shape; `dooly.sim.StepTime` keeps track of which
shapes a run has seen, a lone prediction takes them as new); the step adds batch preparation and the token
read-back.

Everything is vectorised over batches: thousands of recorded steps predict in one call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ..bench.kernels import KernelCount, attention_keys
from ..errors import DoolyError
from ..ir.expr import evaluator, names
from ..ir.graph import Graph, When
from ..limits import Limits
from ..passes.canonicalize import Signature, uses
from .host import NO_HOST, HostModel
from .opmodel import Extrapolation, OpModel


def _shown(pair) -> str:
    text = repr(pair)
    return text if len(text) <= 80 else text[:80] + "..."


@dataclass
class Batches:
    """Many batches at once: request arrays and, per request, the index of its batch."""

    queries: np.ndarray
    keys: np.ndarray
    batch: np.ndarray
    n: int

    @staticmethod
    def of(batches: list[list[tuple[int, int]]], limits: Limits | None = None) -> Batches:
        """Batches of user input, each request checked, each step within `limits`."""
        limits = limits or Limits()
        q, k, b = [], [], []
        for i, requests in enumerate(batches):
            if not requests:
                raise DoolyError(f"batch {i} has no requests")
            limits.check("requests-per-step", len(requests), f"batch {i}: requests in one step")
            for pair in requests:
                if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
                    raise DoolyError(f"batch {i}: a request must be [query_tokens, kv_tokens] integers, got "
                                     f"{_shown(pair)}")
                query, keys = pair
                if query < 1 or keys < query:
                    raise DoolyError(f"batch {i}: need 1 <= query_tokens <= kv_tokens, got {_shown(pair)}")
                limits.check("context-tokens", keys, f"batch {i}: keys of one request")
                q.append(query)
                k.append(keys)
                b.append(i)
            limits.check("tokens-per-step", sum(q[len(q) - len(requests):]), f"batch {i}: new tokens in one step")
        return Batches(np.array(q, np.int64), np.array(k, np.int64), np.array(b, np.int64), len(batches))

    def sums(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.batch, weights=values, minlength=self.n)


Times = Any  # µs: a number for one step, an array of one per step for many (a number stands for every step)

REPLAY_US = 30.0  # the host launching a captured CUDA graph


class Forward(Enum):
    """How the engine runs a step's forward."""

    EAGER = "eager"  # launched from Python op by op, after a plan for each attention shape new to the engine
    CAPTURE = "capture"  # a CUDA graph's first step at its padded shape: run eagerly twice (warm-up, capture), replayed
    REPLAY = "replay"  # a captured graph replayed: no Python launches, no attention plans


@dataclass(frozen=True)
class StepParts:
    """Where the time of a step goes (µs). The launch-bound and graph parts are what the forward leaves once its GPU
    work and plans are taken, and the rest of the step what the total leaves once the host's work and the forward
    are taken: the parts add up to the total."""

    gpu_us: Times  # the forward's GPU work
    plans_us: Times  # the host stalling while cuDNN builds a plan for each attention shape new to the engine
    launch_bound_us: Times  # the forward's Python launches outlasting its GPU work
    graph_us: Times  # launching a captured CUDA graph, and capturing it on its first step
    prepare_us: Times  # the host preparing the batch
    update_us: Times  # the host reading the new tokens back
    rest_us: Times  # the rest of the engine's generation step
    forward_us: Times
    total_us: Times


def compose_step(host: HostModel, gpu_us: Times, kernels: Times, new_shapes: Times, requests: Times, tokens: Times,
                 keys: Times, attention_types: int, forward: Forward = Forward.EAGER,
                 overlap_host: bool = False) -> StepParts:
    """The time of a step from its forward's GPU work, the kernels the forward launches, how many of its attention
    shapes are new to the engine, and its requests, tokens and keys (numbers, or arrays of one per step). With
    `overlap_host` (async batching) the host prepares a step while the GPU runs the one before."""
    new_plans = host.plan_us * new_shapes
    eager = new_plans + np.maximum(host.launch_us(kernels), gpu_us)
    if forward is Forward.EAGER:
        forward_us, plans, graph = eager, new_plans, 0.0
        launch_bound = forward_us - plans - gpu_us
    else:
        replayed = gpu_us + REPLAY_US
        forward_us = replayed + 2 * eager if forward is Forward.CAPTURE else replayed
        plans, launch_bound, graph = 0.0, 0.0, forward_us - gpu_us
    prepare, update = host.prepare_us(requests, tokens, keys, attention_types), host.update_us(requests)
    if overlap_host:
        total = np.maximum(prepare + update, forward_us) + host.step_extra
    else:
        total = prepare + forward_us + host.step_extra + update
    return StepParts(gpu_us, plans, launch_bound, graph, prepare, update, total - prepare - forward_us - update,
                     forward_us, total)


@dataclass
class Prediction:
    parts: StepParts  # arrays, one per batch, every attention shape of a step taken as new to the engine
    shapes: list[set]  # the attention shapes of each step
    ops: list[tuple[str, str, int, np.ndarray]]  # (op, scope, count, µs per batch)
    extrapolated: list[str]


@dataclass
class Step:
    """One batch's prediction, as `Predictor.step` gives it."""

    parts: StepParts
    shapes: set  # the step's attention shapes
    extrapolated: frozenset = frozenset()  # signatures predicted beyond their measured grid


@dataclass
class OpGroup:
    """The IR's ops of one signature at the same sizes under the same condition: predicted once, counted for all."""

    signature: Signature
    axes: tuple[str, ...]
    sizes: Callable[[dict], tuple]  # the axes' values from the step's (or the request's) symbols
    runs_per: str
    when: When | None
    count: float = 0.0
    sites: dict[tuple[str, str], float] = field(default_factory=dict)  # count per (op, scope): the op breakdown


@dataclass
class Term:
    """The groups of one condition that read the same symbols (`needs`): what `Predictor.step` predicts together
    and remembers by those symbols' values."""

    runs_per: str
    when: When | None
    needs: tuple[str, ...]
    members: list[OpGroup]
    memo: dict[tuple, tuple[float, frozenset]] = field(default_factory=dict)  # values -> (GPU µs, warnings)


def runs(when: When | None, reads):
    """Whether the engine runs an op of condition `when` in steps that read past keys (`reads`) or not: a bool, or
    an array of them for an array of steps."""
    if when is When.PAST_KEYS:
        return reads
    return np.logical_not(reads) if when is When.NO_PAST_KEYS else True


MEMO_BLOCK = 256


class Predictor:
    def __init__(self, graph: Graph, ops: OpModel, host: HostModel | None, attention: str, layers: int | None = None):
        """`layers`: predict the model cut to this many decoder layers (how too-big models are validated)."""
        self.graph, self.ops, self.host = graph, ops, host
        scale = 1.0 if layers is None else layers / graph.meta.layers
        self.window = graph.meta.sliding_window or 0
        groups: dict[tuple, OpGroup] = {}
        terms: dict[tuple, list[OpGroup]] = {}
        for u in uses(graph, attention):
            op = graph.ops[u.op_index]
            count = u.count * scale if "layers.*" in op.scope else u.count
            key = (u.signature.hash, tuple(sorted(u.binding.items())), u.runs_per, u.when)
            if key not in groups:
                groups[key] = OpGroup(u.signature, tuple(u.binding), evaluator(tuple(u.binding.values())), u.runs_per,
                                      u.when)
                needs = tuple(sorted(set().union(*map(names, u.binding.values()))))
                terms.setdefault((u.runs_per, u.when, needs), []).append(groups[key])
            group = groups[key]
            group.count += count
            group.sites[(op.name, op.scope)] = group.sites.get((op.name, op.scope), 0.0) + count
        self.groups = list(groups.values())
        self.terms = [Term(per, when, needs, members) for (per, when, needs), members in terms.items()]
        self.layer_scale = scale
        self.keys = attention_keys(graph)
        self.kernels = KernelCount.of(graph, attention)

    def symbols(self, b: Batches) -> tuple[dict, dict]:
        """Per-batch symbols (T, R, K, Ks) and per-request symbols (q, k)."""
        past = b.keys - b.queries
        window = self.window or np.iinfo(np.int64).max
        ks = b.queries + np.minimum(past, window - 1)
        step = {"T": b.sums(b.queries), "R": np.bincount(b.batch, minlength=b.n), "K": b.sums(b.keys),
                "Ks": b.sums(ks), "Kmax": np.maximum.reduceat(b.keys, _starts(b)) if b.n else np.zeros(0)}
        return {k: v.astype(np.int64) for k, v in step.items()}, {"q": b.queries, "k": b.keys}

    def _gpu(self, groups: list, n: int, step: dict, request: dict, batch: np.ndarray | None = None,
             reads: np.ndarray | None = None,
             ops: list | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """GPU µs of `groups` in each of `n` batches, from step symbols (arrays of n) and request symbols (arrays
        over requests, `batch` giving each one's batch; default: one request a batch). With `reads` (K > T per
        batch), ops the engine runs only when some request has past keys, or only when none has, count only then.
        Each group's share goes to `ops` when given. Also the batches each signature was predicted beyond its
        measured grid in, by warning."""
        gpu = np.zeros(n)
        beyond_grid: dict[str, np.ndarray] = {}
        for group in groups:
            per_request = group.runs_per == "request"
            env = request if per_request else step
            m = len(request["q"]) if per_request else n
            values = {axis: np.broadcast_to(np.asarray(v, dtype=np.int64), (m,))
                      for axis, v in zip(group.axes, group.sizes(env))}
            sig = group.signature
            us, beyond, _ = self.ops.predict(sig, values or {"_": np.zeros(m, dtype=np.int64)})
            if per_request and batch is not None:
                us = np.bincount(batch, weights=us, minlength=n)
                beyond = np.bincount(batch, weights=beyond, minlength=n) > 0
            if beyond.any():
                warning = f"{sig.op} ({sig.hash[:8]}) beyond its measured grid"
                beyond_grid[warning] = beyond_grid.get(warning, np.zeros(n, dtype=bool)) | beyond
            if reads is not None and group.when:
                us = us * runs(group.when, reads)
            gpu += group.count * us
            if ops is not None:
                ops += [(name, scope, count, count * us) for (name, scope), count in group.sites.items()]
        return gpu, beyond_grid

    def predict(self, batches: list[list[tuple[int, int]]] | Batches) -> Prediction:
        """Every batch at once, with the per-op breakdown."""
        b = batches if isinstance(batches, Batches) else Batches.of(batches)
        step, request = self.symbols(b)
        ops: list = []
        gpu, beyond_grid = self._gpu(self.groups, b.n, step, request, b.batch, step["K"] > step["T"], ops)
        shapes = [{(int(t), int(step[key][i])) for key in self.keys} for i, t in enumerate(step["T"])]
        parts = compose_step(self.host or NO_HOST, gpu, self._launches(step["R"], step["K"] > step["T"]),
                             np.array([len(x) for x in shapes]), step["R"].astype(float), step["T"].astype(float),
                             step["K"].astype(float), self.kernels.types)
        return Prediction(parts, shapes, ops, sorted(beyond_grid))

    def step(self, batch: list[tuple[int, int]], planned: set | frozenset = frozenset(),
             forward: Forward = Forward.EAGER, overlap_host: bool = False) -> Step:
        """One valid batch (as a scheduler makes them; `Batches.of` checks user input), fast: what a simulator asks
        at every step, on an engine that has built the plans of the attention shapes `planned` and runs the forward
        as `forward`, overlapping the host's work with the GPU's or not. The ops reading the same symbols are predicted
        together and remembered by the symbols' values, a block of `MEMO_BLOCK` key counts at a time (keys grow
        step by step as requests decode); attention by each request's (queries, keys)."""
        queries, keys = np.array(batch, dtype=np.int64).T
        b = Batches(queries, keys, np.zeros(len(queries), dtype=np.int64), 1)
        values = {k: int(v[0]) for k, v in self.symbols(b)[0].items()}
        reads = values["K"] > values["T"]
        gpu, extrapolated = 0.0, frozenset()
        for term in self.terms:
            if not runs(term.when, reads):
                continue
            rows = batch if term.runs_per == "request" else [tuple(values[s] for s in term.needs)]
            missing = {r for r in rows if r not in term.memo}
            if missing:
                self._remember(term, missing)
            for r in rows:
                us, beyond_grid = term.memo[r]
                gpu += us
                if beyond_grid:  # seldom: most rows lie inside their grids
                    extrapolated |= beyond_grid
        shapes = {(values["T"], values[key]) for key in self.keys}
        R = float(values["R"])
        parts = compose_step(self.host or NO_HOST, gpu, self._launches(R, reads), len(shapes - planned), R,
                             float(values["T"]), float(values["K"]), self.kernels.types, forward, overlap_host)
        return Step(parts, shapes, extrapolated)

    def _launches(self, requests, reads):
        """Kernels the forward launches, scaled as the model's layers are."""
        return self.kernels(requests, reads) * self.layer_scale

    def _remember(self, term: Term, missing: set) -> None:
        per = term.runs_per
        names = ("q", "k") if per == "request" else term.needs
        running = next((i for i, s in enumerate(names) if s in ("k", "K", "Ks")), 0 if len(names) == 1 else None)
        rows = set()
        for key in missing:
            if running is None or (per == "request" and key[0] > 1):  # prefill chunks seldom come back
                rows.add(key)
                continue
            # a step's keys grow by its requests each step: where nothing else varies, blocks widen with the keys
            size = MEMO_BLOCK if len(key) > 1 else max(MEMO_BLOCK, 1 << (key[running] // 16).bit_length())
            first = max(key[running] - key[running] % size, 1)
            rows.update(key[:running] + (v,) + key[running + 1:] for v in range(first, first + size))
        rows = sorted(rows)
        cols = {s: np.array(c, dtype=np.int64) for s, c in zip(names, zip(*rows))} if names else {}
        us, beyond_grid = self._gpu(term.members, len(rows), {} if per == "request" else cols,
                                    cols if per == "request" else {})
        for i, row in enumerate(rows):  # each row with the warnings of its own prediction
            term.memo[row] = (float(us[i]), frozenset(w for w, mask in beyond_grid.items() if mask[i]))


def _starts(b: Batches) -> np.ndarray:
    return np.flatnonzero(np.r_[True, b.batch[1:] != b.batch[:-1]])


def load_predictor(graph: Graph, store, env: str, layers: int | None = None) -> Predictor:
    """A predictor for `graph` from the store's measurements of the environment `env`."""
    from . import host as host_model
    from .opmodel import load_or_fit

    _, environment = store.environment(env)
    if graph.meta.engine not in ("", environment.engine):  # "": an IR that did not record its engine
        raise DoolyError(f"{graph.model} was captured for {graph.meta.engine}, the environment {env} "
                         f"measured {environment.engine}")
    ops, _ = load_or_fit(store, env)
    try:
        host = host_model.fit(store, env)
    except ValueError:
        warnings.warn(f"{env}: no host calibration, predicting GPU time only", stacklevel=2)
        host = None
    missing = {u.signature.op for u in uses(graph, environment.attention_backend)
               if u.signature.hash not in ops.grids and u.signature.family not in ops.regressors}
    if missing:
        hint = " (collectives are measured on a machine with several GPUs)" if any(
            m.startswith("_c10d_functional.") for m in missing) else ""
        raise DoolyError(f"{graph.model}: the store has nothing to predict {', '.join(sorted(missing))} from in "
                         f"{env}{hint}")
    return Predictor(graph, ops, host, environment.attention_backend, layers)


__all__ = ["Batches", "Extrapolation", "Forward", "Prediction", "Predictor", "Signature", "Step", "StepParts",
           "compose_step", "load_predictor"]
