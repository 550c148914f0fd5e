"""Ray as the engine that fans Dooly's work out over many CPUs and GPUs (the `ray` extra: `pip install 'dooly[ray]'`).

- `dooly explore --ray [ADDRESS]`: each task simulates a few configurations on a CPU worker; the search's shared
  setting (workload, predictors) goes once into Ray's object store, and a worker keeps it, with its predictors'
  memos, for every later task of the same search.
- `dooly profile --ray [ADDRESS]`: the driver plans on its own CPU; the signatures to measure are split into groups
  of about equal estimated cost, one task per group holding one GPU (`num_gpus=1`). Every measured point goes to
  one writer, an actor on the driver's machine that owns the store: points are committed as they are measured,
  and a point the store already has is never written again.

Tasks run with Ray's own retries off, so that the driver sees a worker die: it submits the task again (a profiling
task then starts from what the store already has) and counts it in the report.
"""

from __future__ import annotations

import socket
import tempfile
import time
import uuid
from pathlib import Path

from .environment import DEFAULT_BACKEND, Backend, backend
from .errors import DoolyError

CONNECT_TIMEOUT_S = 10.0
MAX_RETRIES = 3  # resubmissions of one task whose worker died
GROUPS_PER_GPU = 4


def _ray():
    try:
        import ray
    except ImportError:
        raise DoolyError("--ray needs Ray: pip install 'dooly[ray]'") from None
    return ray


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (host:port, ray://host:port, auto), or start a local one ("local");
    an unreachable address is an error within `CONNECT_TIMEOUT_S`."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        return
    target = address.removeprefix("ray://")
    if address != "auto":
        host, _, port = target.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except ValueError:
            raise DoolyError(f"--ray {address}: expected host:port, ray://host:port or auto") from None
        except OSError as e:
            raise DoolyError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"py_modules": [str(Path(__file__).parent)]})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DoolyError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None


class FanOut:
    """The results of Ray tasks, as they finish; a task whose worker died is submitted again (at most
    `max_retries` times), and `retried` counts how often."""

    def __init__(self, remote, calls: list[tuple], max_retries: int = MAX_RETRIES):
        self.remote, self.calls, self.max_retries, self.retried = remote, calls, max_retries, 0

    def __iter__(self):
        ray = _ray()
        from ray.exceptions import NodeDiedError, ObjectLostError, RayTaskError, WorkerCrashedError

        pending = {self.remote.remote(*call): (i, 0) for i, call in enumerate(self.calls)}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, tries = pending.pop(ref)
            try:
                result = ray.get(ref)
            except (WorkerCrashedError, NodeDiedError, ObjectLostError) as e:
                if tries >= self.max_retries:
                    raise DoolyError(f"a task failed {tries + 1} times, its worker dying each time: "
                                     f"{str(e).splitlines()[0]}") from None
                self.retried += 1
                pending[self.remote.remote(*self.calls[i])] = (i, tries + 1)
                continue
            except RayTaskError as e:
                if isinstance(e.cause, DoolyError):
                    raise DoolyError(str(e.cause)) from None
                raise
            yield result


# exploration

_SEARCHES: dict = {}  # in a worker: the setting of the search it serves, by search id


def _explore_task(search_id: str, holder: list, configs: list) -> list[dict]:
    from .sim.explore import evaluate_all

    if search_id not in _SEARCHES:
        _SEARCHES.clear()
        _SEARCHES[search_id] = _ray().get(holder[0])
    return evaluate_all(_SEARCHES[search_id], configs)


def explore_map(setting, tasks: list[list]) -> FanOut:
    """`dooly explore`'s tasks as Ray tasks on CPU workers (the setting is passed inside a list, so that a worker
    that has it already does not fetch it again)."""
    ray = _ray()
    holder = [ray.put(setting)]
    remote = ray.remote(num_cpus=1, max_retries=0)(_explore_task)
    search_id = uuid.uuid4().hex
    return FanOut(remote, [(search_id, holder, t) for t in tasks])


# profiling

class Writer:
    """The one process that writes a profiling run's measurements into the store."""

    def __init__(self, path: str):
        from .store import Store

        self.store, self.written, self.refused = Store(path), 0, 0

    def points(self, signatures: list[tuple[str, str]], env: str) -> dict[str, dict[str, dict]]:
        return {h: self.store.points(h, env, family) for h, family in signatures}

    def _fresh(self, sig_hash: str, env: str, family: str, point: dict) -> bool:
        from .store import point_key

        if point_key(point) in self.store.points(sig_hash, env, family):
            self.refused += 1
            return False
        self.written += 1
        return True

    def record(self, sig_hash: str, env: str, family: str, point: dict, stats, gpu_s: float) -> None:
        if self._fresh(sig_hash, env, family, point):
            self.store.record(sig_hash, env, point, stats, gpu_s)

    def record_skip(self, sig_hash: str, env: str, family: str, point: dict, reason: str, gpu_s: float) -> None:
        if self._fresh(sig_hash, env, family, point):
            self.store.record_skip(sig_hash, env, point, reason, gpu_s)

    def finish_sweep(self, sig_hash: str, env: str, gpu_s: float, points: int) -> None:
        self.store.finish_sweep(sig_hash, env, gpu_s, points)

    def counts(self) -> tuple[int, int]:
        return self.written, self.refused


class WriterStore:
    """What a `Sweeper` needs of a store, inside a task: the points the store had when the task started, and each
    new one written through the writer before the next is measured."""

    def __init__(self, writer, env: str, signatures: list):
        self.writer, self.family = writer, {s.hash: s.family for s in signatures}
        self.rows = _ray().get(writer.points.remote([(s.hash, s.family) for s in signatures], env))

    def points(self, sig_hash: str, env: str, family: str) -> dict[str, dict]:
        return self.rows.setdefault(sig_hash, {})

    def record(self, sig_hash: str, env: str, point: dict, stats, gpu_s: float = 0.0) -> None:
        from .store import point_key

        _ray().get(self.writer.record.remote(sig_hash, env, self.family[sig_hash], point, stats, gpu_s))
        self.rows.setdefault(sig_hash, {})[point_key(point)] = {
            "status": "ok", "median_us": stats.median_us, "p90_us": stats.p90_us, "min_us": stats.min_us,
            "gpu_s": gpu_s}

    def record_skip(self, sig_hash: str, env: str, point: dict, reason: str, gpu_s: float = 0.0) -> None:
        from .store import point_key

        _ray().get(self.writer.record_skip.remote(sig_hash, env, self.family[sig_hash], point, reason, gpu_s))
        self.rows.setdefault(sig_hash, {})[point_key(point)] = {"status": "skipped", "median_us": None,
                                                                 "gpu_s": gpu_s}

    def finish_sweep(self, sig_hash: str, env: str, gpu_s: float, points: int) -> None:
        _ray().get(self.writer.finish_sweep.remote(sig_hash, env, gpu_s, points))


def _environment_task(backend: Backend):
    from . import profile as profiler

    return profiler.detect(backend)


def _profile_task(writer, env_name: str, backend: Backend, group: list, device: str, budget_end: float) -> int:
    """Sweep a group of (signature, benchmark source, limits); returns how many signatures it finished."""
    from . import profile as profiler

    found = profiler.detect(backend).name
    if found != env_name:
        raise DoolyError(f"a GPU of the cluster is {found}, not {env_name}: profile one kind of GPU at a time")
    deadline = time.monotonic() + (budget_end - time.time())
    sweeper = profiler.Sweeper(WriterStore(writer, env_name, [sig for sig, _, _ in group]), env_name, backend,
                               deadline, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        for finished, (sig, source, limits) in enumerate(group):
            path = Path(tmp) / f"bench_{sig.hash}.py"
            path.write_text(source)
            try:
                sweeper.sweep(profiler.load(path), sig, limits)
            except profiler.Budget:
                return finished
    return len(group)


def groups_of(todo: list, costs: dict[str, float], n: int) -> list[list]:
    """`todo` in `n` groups of about equal cost (the dearest signature first into the cheapest group)."""
    bins: list[tuple[float, list]] = [(0.0, []) for _ in range(max(1, min(n, len(todo))))]
    for sig in sorted(todo, key=lambda s: -costs[s.hash]):
        i = min(range(len(bins)), key=lambda j: bins[j][0])
        bins[i] = (bins[i][0] + costs[sig.hash], bins[i][1] + [sig])
    return [group for _, group in bins if group]


def profile(store_path: Path, graphs: list, backend: Backend, budget_s: float = float("inf"),
            device: str = "cuda") -> dict:
    """Measure the signatures of `graphs` that the store lacks on the cluster's GPUs (Ray must be connected)."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .passes import codegen
    from .plan import estimate_s, signature_uses, sweep_limits
    from .store import Store

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise DoolyError("the Ray cluster has no GPU: profiling tasks each need one")
    budget_end = time.time() + budget_s
    env = ray.get(ray.remote(num_gpus=1, max_retries=0)(_environment_task).remote(backend))
    store = Store(store_path)
    store.add_environment(env)
    used = signature_uses(graphs, env.attention_backend)
    done = store.finished_sweeps(env.name)
    todo = [s for h, (s, _) in used.items() if h not in done and s.family != "collective"]
    for sig in todo:
        store.add_signature(sig)
    limits = {s.hash: sweep_limits(s, used[s.hash][1]) for s in todo}
    costs = {s.hash: estimate_s(s, limits[s.hash]) for s in todo}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    writer = ray.remote(num_cpus=0)(Writer).options(scheduling_strategy=here).remote(str(store_path))
    remote = ray.remote(num_gpus=1, max_retries=0)(_profile_task)
    groups = groups_of(todo, costs, GROUPS_PER_GPU * gpus)
    calls = [(writer, env.name, backend, [(s, codegen.generate(s), limits[s.hash]) for s in g], device, budget_end)
             for g in groups]
    fan = FanOut(remote, calls)
    finished = sum(fan)
    written, refused = ray.get(writer.counts.remote())
    ray.kill(writer)
    return {"environment": env.name, "signatures": len(used), "in_store": len(done & used.keys()),
            "profiled": finished, "left": len(todo) - finished, "tasks": len(groups), "gpus": gpus,
            "retried_tasks": fan.retried, "points_written": written, "points_refused": refused}


def profile_command(args) -> int:
    """`dooly profile CONFIG... --store PATH --ray [ADDRESS]`: what `dooly profile` does, on the cluster's GPUs."""
    import json

    from .compile import load_model

    connect(args.ray)
    report = profile(args.store, [load_model(p) for p in args.config], backend(args.backend or DEFAULT_BACKEND.name),
                     args.budget_s)
    print(f"{report['environment']}: {report['signatures']} signatures, {report['in_store']} in the store; profiled "
          f"{report['profiled']} in {report['tasks']} tasks on {report['gpus']} GPUs "
          f"({report['retried_tasks']} tasks retried), {report['left']} left")
    print(json.dumps(report))
    return 0
