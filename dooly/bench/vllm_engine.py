"""vLLM 0.24 run for real on the GPU from a config alone (dummy weights, prompts as token ids), timed step by step.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that hooks on its model runner see
every step: the batch composition the scheduler chose (per request: tokens scheduled now, tokens already
computed) and the step's time on the GPU (CUDA events on the runner's stream from `execute_model` to the end of
`sample_tokens`, read only after the run, so the hooks add no synchronisation). Per-request arrival, first-token
and token times are taken where a user of the offline engine sees them, after each `LLMEngine.step()`.

    python -m dooly.bench.vllm_engine check                      # a tiny model: bring-up and per-step times
    python -m dooly.bench.vllm_engine calibrate --store S        # the engine's own cost per step, into the store
    python -m dooly.bench.vllm_engine groundtruth --models configs/llama-3.1-8b.json --out DIR [--backend FLASH_ATTN]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..environment import VLLM_BACKENDS as BACKENDS
from ..errors import command

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}


@dataclass
class MeasuredStep:
    queries: list[int]  # tokens scheduled for each request in this step
    computed: list[int]  # tokens each request had computed before it (prefix-cache hits included)
    forward_s: float  # execute_model to the end of sample_tokens, on the GPU stream (events)
    host_s: float  # the same span on the host clock
    start: float  # perf_counter at execute_model, seconds after the run started
    # from execute_model to the model's first launch, on the GPU stream (the GPU idle while the host prepares the
    # inputs, once no earlier step's work is left on it) and on the host clock (the preparation itself)
    lead_s: float | None = None
    host_lead_s: float | None = None

    @property
    def keys(self) -> list[int]:
        return [q + c for q, c in zip(self.queries, self.computed)]


@dataclass
class Result:
    request_id: str
    prompt: int
    output: int
    arrival: float
    first_token: float
    token_times: list[float] = field(default_factory=list)


class _Hooks:
    """Wraps the two step methods of both model runners, class-wide, for as long as an engine is being timed: 0.24
    runs the V2 runner for the architectures it lists (Llama, Mistral, Qwen3, ...) and the V1 runner for the rest
    (Qwen2, Phi-3, Gemma-2, ...)."""

    def __init__(self):
        import torch
        from vllm.v1.worker.gpu.kv_connector import KVConnector
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

        self.torch = torch
        self.pending: list = []  # (summary, start event, end event, host start, host end, model event, host model)
        self.origin = time.perf_counter()
        self.open = None
        self.model_start = None  # (event, perf_counter) at the first model launch of the step being executed
        self.saved = {cls: (cls.execute_model, cls.sample_tokens) for cls in (V1Runner, V2Runner)}
        for cls, (execute, sample) in self.saved.items():
            cls.execute_model, cls.sample_tokens = self._timed_execute(execute), self._timed_sample(sample)
        # the last host call before a step's model runs: V1 calls the model through `_model_forward`, V2 tells its
        # (no-op) KV connector `pre_forward` right before a graph replay or a forward
        self.saved_forward = [(V1Runner, "_model_forward", V1Runner._model_forward),
                              (KVConnector, "pre_forward", KVConnector.pre_forward)]
        for cls, name, method in self.saved_forward:
            setattr(cls, name, self._stamped(method))

    def _stamped(self, method):
        def stamped(*args, **kwargs):
            if self.model_start is None:
                event = self.torch.cuda.Event(enable_timing=True)
                event.record()
                self.model_start = (event, time.perf_counter())
            return method(*args, **kwargs)

        return stamped

    def _timed_execute(self, execute):
        def timed_execute(runner, scheduler_output, *args, **kwargs):
            if kwargs.get("dummy_run"):
                return execute(runner, scheduler_output, *args, **kwargs)
            summary = _composition(scheduler_output)
            start = self.torch.cuda.Event(enable_timing=True)
            start.record()
            t = time.perf_counter()
            self.model_start = None
            out = execute(runner, scheduler_output, *args, **kwargs)
            if summary[0]:
                self.open = (summary, start, t, self.model_start)
                if out is not None:  # the step sampled inside execute_model
                    self._close()
            return out

        return timed_execute

    def _timed_sample(self, sample):
        def timed_sample(runner, *args, **kwargs):
            out = sample(runner, *args, **kwargs)
            if self.open is not None:
                self._close()
            return out

        return timed_sample

    def _close(self):
        end = self.torch.cuda.Event(enable_timing=True)
        end.record()
        summary, start, t, model_start = self.open
        self.pending.append((summary, start, end, t, time.perf_counter(), model_start))
        self.open = None

    def steps(self) -> list[MeasuredStep]:
        self.torch.cuda.synchronize()
        out = []
        for (q, c), start, end, t0, t1, model_start in self.pending:
            lead = (start.elapsed_time(model_start[0]) / 1e3, model_start[1] - t0) if model_start else (None, None)
            out.append(MeasuredStep(q, c, start.elapsed_time(end) / 1e3, t1 - t0, t0 - self.origin, *lead))
        self.pending = []
        return out

    def restart(self) -> None:
        self.pending, self.origin = [], time.perf_counter()

    def remove(self) -> None:
        for cls, (execute, sample) in self.saved.items():
            cls.execute_model, cls.sample_tokens = execute, sample
        for cls, name, method in self.saved_forward:
            setattr(cls, name, method)


def _composition(so) -> tuple[list[int], list[int]]:
    computed = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
    cached = so.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens))
    ids = [rid for rid, n in so.num_scheduled_tokens.items() if n]
    return [so.num_scheduled_tokens[r] for r in ids], [computed.get(r, 0) for r in ids]


def model_folder(config: dict, layers: int | None, root: Path) -> Path:
    data = dict(config)
    if layers is not None:
        data["num_hidden_layers"] = layers
        for key, value in config.items():
            if isinstance(value, list) and len(value) == config.get("num_hidden_layers"):
                data[key] = value[:layers]
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(data))
    return root


class VllmEngine:
    def __init__(self, config: dict, layers: int | None = None, backend: str = "FLASH_ATTN", eager: bool = False,
                 prefix_caching: bool | None = None, max_model_len: int | None = None, seed: int = 0):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import EngineArgs, LLMEngine

        self.vocab = config["vocab_size"]
        self.max_len = max_model_len or min(config.get("max_position_embeddings", 32768), 32768)
        self.folder = tempfile.TemporaryDirectory()
        options = {} if prefix_caching is None else {"enable_prefix_caching": prefix_caching}
        args = EngineArgs(model=str(model_folder(config, layers, Path(self.folder.name))), load_format="dummy",
                          skip_tokenizer_init=True, dtype="bfloat16", max_model_len=self.max_len, seed=seed,
                          attention_backend=backend, enforce_eager=eager, **options)
        t = time.perf_counter()
        self.engine = LLMEngine.from_engine_args(args)
        self.startup_s = time.perf_counter() - t
        self.hooks = _Hooks()
        self.rng = random.Random(seed)
        self.runs = 0

    def run(self, requests: list[tuple[float, int, int]],
            shared_prefix: int = 0) -> tuple[list[MeasuredStep], list[Result]]:
        """Serves (arrival s, prompt tokens, output tokens) requests, each arriving at its time."""
        from vllm import SamplingParams

        prefix = [self.rng.randrange(self.vocab) for _ in range(shared_prefix)]
        # drawn before the run starts: drawing 15k ids takes ~5 ms, which is no part of the engine's time
        prompts = [prefix[:prompt] + [self.rng.randrange(self.vocab) for _ in range(prompt - min(prompt, len(prefix)))]
                   for _, prompt, _ in requests]
        order = sorted(range(len(requests)), key=lambda i: requests[i][0])
        results: dict[str, Result] = {}
        self.hooks.restart()
        origin, nxt, tag = self.hooks.origin, 0, f"run{self.runs}-"
        self.runs += 1
        while nxt < len(order) or self.engine.has_unfinished_requests():
            now = time.perf_counter() - origin
            while nxt < len(order) and requests[order[nxt]][0] <= now:
                i = order[nxt]
                arrival, prompt, output = requests[i]
                params = SamplingParams(max_tokens=output, ignore_eos=True, temperature=0, detokenize=False)
                self.engine.add_request(f"{tag}{i}", {"prompt_token_ids": prompts[i]}, params)
                results[f"{tag}{i}"] = Result(f"r{i}", prompt, output, now, -1.0)
                nxt += 1
            if not self.engine.has_unfinished_requests():
                time.sleep(max(0.0, requests[order[nxt]][0] - (time.perf_counter() - origin)))
                continue
            outputs = self.engine.step()
            now = time.perf_counter() - origin
            for out in outputs:
                r = results[out.request_id]
                new = len(out.outputs[0].token_ids) - len(r.token_times)
                r.token_times += [now] * new
                if r.first_token < 0 and r.token_times:
                    r.first_token = now
        return self.hooks.steps(), [results[f"{tag}{i}"] for i in range(len(requests))]

    def resolved_config(self) -> dict:
        vc = self.engine.vllm_config
        sc, cc, cache = vc.scheduler_config, vc.compilation_config, vc.cache_config
        return {"max_num_batched_tokens": sc.max_num_batched_tokens, "max_num_seqs": sc.max_num_seqs,
                "chunked_prefill": sc.enable_chunked_prefill, "async_scheduling": sc.async_scheduling,
                "compilation_mode": str(cc.mode), "cudagraph_mode": str(cc.cudagraph_mode),
                "cudagraph_capture_sizes": list(cc.cudagraph_capture_sizes or []),
                "num_gpu_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                "prefix_caching": cache.enable_prefix_caching, "max_model_len": vc.model_config.max_model_len,
                "attention_backend": str(vc.attention_config.backend),
                "model_runner": "v2" if vc.use_v2_model_runner else "v1", "startup_s": round(self.startup_s, 1)}

    def close(self) -> None:
        import gc

        import torch

        self.hooks.remove()
        del self.engine
        gc.collect()
        torch.cuda.empty_cache()
        self.folder.cleanup()


def environment(backend: str, eager: bool) -> dict:
    import torch
    import triton
    import vllm

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    # the host's speed sets every host-bound step: a calibration holds for ground truth of the same machine only,
    # which one CPU name does not tell apart (every lent machine says "Intel(R) Xeon(R) Processor")
    return {"gpu": torch.cuda.get_device_name(), "cpu": cpu, "cpus": os.cpu_count(), "host": socket.gethostname(),
            "host_probe_ms": host_probe_ms(), "driver": driver,
            "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": triton.__version__, "engine": "vllm",
            "engine_version": vllm.__version__, "dtype": "bfloat16", "attention_backend": backend,
            "mode": "eager" if eager else "compiled+cudagraphs"}


def host_probe_ms() -> float:
    """The best of five runs of a fixed pure-Python loop (tens of milliseconds): the host's single-thread speed,
    which sets every host-bound step, comparable across machines."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        total = 0
        for i in range(400_000):
            total += i % 7
        best = min(best, time.perf_counter() - t)
    return round(best * 1e3, 2)


def check() -> None:
    """Brings up vLLM on a tiny model and prints each step of a small mixed workload."""
    t = time.perf_counter()
    engine = VllmEngine(TINY, max_model_len=2048)
    print(f"engine up in {engine.startup_s:.1f} s ({time.perf_counter() - t:.1f} s with the import); "
          f"{json.dumps(engine.resolved_config())}")
    engine.run([(0.0, 64, 4)])
    steps, results = engine.run([(0.0, 500, 8), (0.0, 40, 16), (0.01, 1200, 8), (0.02, 8, 24)])
    for s in steps:
        print(f"  T={sum(s.queries):5d} R={len(s.queries):2d} keys={sum(s.keys):6d}  "
              f"gpu {s.forward_s * 1e3:8.3f} ms  host {s.host_s * 1e3:8.3f} ms")
    for r in results:
        print(f"  {r.request_id}: prompt {r.prompt}, TTFT {(r.first_token - r.arrival) * 1e3:.1f} ms, "
              f"{len(r.token_times)} tokens")
    engine.close()


CALIBRATION_R = (1, 2, 4, 8, 16, 32, 64, 128)
CALIBRATION_PROMPTS = (16, 64, 256, 512, 1024, 2048)
CALIBRATION_LAYERS = (16, 32)  # every vLLM model of the zoo has 16 layers or more
IDLE_S = 0.05  # a request arriving at an engine idle this long: nothing on the GPU to hide the host's launches
REPEATS = 5
# the host table's phases a calibration records (`record_calibration` says what each is)
STEP_PHASE, LAUNCH_PHASE, CYCLE_PHASE, LEAD_PHASE, ADMIT_PHASE = CALIBRATION_PHASES = (
    "vllm-step", "vllm-launch", "vllm-cycle", "vllm-lead", "vllm-admit")


def calibration_runs() -> list[list[tuple[float, int, int]]]:
    """What the tiny model serves: decode batches of each size, lone prefills at once and after an idle spell, and a
    prefill among decodes, each prefill run REPEATS times (a composition counts once it is seen three times).

    The repetitions take turns: the host's speed moves within minutes, and a slow spell then slows one repetition of
    several compositions, which their medians drop, instead of every repetition of one."""
    runs = [[(0.0, 16, 48)] * r for r in CALIBRATION_R]
    for _ in range(REPEATS):
        for p in CALIBRATION_PROMPTS:
            runs += [[(0.0, p, 1)], [(IDLE_S, p, 1)], [(0.0, 16, 48)] * 8 + [(0.005, p, 1)]]
    return runs


def _in_own_process(*argv: str) -> None:
    """This module's command in a process of its own: a closed engine does not give its GPU memory back."""
    subprocess.run([sys.executable, "-m", "dooly.bench.vllm_engine", *argv], check=True)


def calibrate(store_path: Path, backend: str, eager: bool, depths: tuple[int, ...], raw: Path,
              runner: str = "v2") -> None:
    """The engine's own cost per step, apart from any model: a tiny model (`TINY`, whose forward takes microseconds)
    at each depth, on the model runner given (vLLM serves some architectures on its V1 runner, whose host work
    differs), serving `calibration_runs()`, every step kept in `raw/[v1-]<depth>.json` and recorded into the store
    (`record_calibration`). One process a depth."""
    raw.mkdir(parents=True, exist_ok=True)
    if len(depths) > 1:
        for layers in depths:
            _in_own_process("calibrate", "--store", str(store_path), "--backend", backend,
                            *(["--eager"] if eager else []), "--layers", str(layers), "--raw", str(raw),
                            "--runner", runner)
        return
    (layers,) = depths
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
    # prefix caching as the engine defaults it (on): its block hashing is part of the host's cost per request, and the
    # calibration's prompts, drawn at random, never hit the cache
    engine = VllmEngine({**TINY, "num_hidden_layers": layers}, backend=backend, eager=eager, max_model_len=4096)
    resolved = engine.resolved_config()
    runs, ran_on = [], resolved["model_runner"]
    try:
        engine.run([(0.0, 64, 8)] * 4)  # warm-up
        for requests in calibration_runs():
            steps, _ = engine.run(requests)
            runs.append({"requests": requests, "steps": [asdict(s) for s in steps]})
    finally:
        engine.close()
    path = raw / f"{'' if ran_on == 'v2' else ran_on + '-'}{layers}.json"
    path.write_text(json.dumps({"environment": environment(backend, eager), "layers": layers, "runner": ran_on,
                                "engine_config": resolved, "runs": runs}))
    record_calibration(store_path, path)


def _calibration_file(path: Path) -> dict:
    """A raw calibration file as `calibrate` writes it, or one DoolyError saying what is wrong with it."""
    from ..errors import DoolyError

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DoolyError(f"{path}: not a readable JSON calibration file ({type(e).__name__})") from None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e3  # noqa: E731
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**6  # noqa: E731
    env = data.get("environment") if isinstance(data, dict) else None
    ok = (isinstance(env, dict) and all(isinstance(env.get(k), str) for k in
                                        ("gpu", "torch", "engine_version", "attention_backend", "mode"))
          and count(data.get("layers")) and data.get("runner", "v2") in ("v1", "v2")
          and isinstance(data.get("runs"), list)
          and all(isinstance(run, dict) and isinstance(run.get("steps"), list) and all(
              isinstance(st, dict) and isinstance(st.get("queries"), list) and st["queries"]
              and all(map(count, st["queries"])) and number(st.get("forward_s")) and number(st.get("host_s"))
              and number(st.get("start"))
              for st in run["steps"]) and isinstance(run.get("requests"), list) and all(
              isinstance(q, list) and len(q) == 3 and number(q[0]) and count(q[1]) and count(q[2])
              for q in run["requests"]) for run in data["runs"]))
    if not ok:
        raise DoolyError(f"{path}: a calibration file holds environment (gpu, torch, engine_version, "
                         "attention_backend, mode), layers, a runner (v1 or v2) and runs of requests (arrival, "
                         "prompt, output) and of steps (queries, forward_s, host_s, start)")
    return data


def record_calibration(store_path: Path, path: Path) -> None:
    """One depth's calibration steps (`calibrate`'s raw file) into the store's host table for its environment: each
    (T, R, layers) composition seen at least three times, its median GPU span (phase `vllm-step`: what a step costs
    when the GPU waits on the host), its median host span from `execute_model` to the end of `sample_tokens`
    (phase `vllm-launch`: input preparation, attention metadata, launches — one graph and one attention call a
    layer in piecewise steps, every kernel of a layer above the captured sizes —, sampling) and its median host
    cycle, from its `execute_model` to the next step's (phase `vllm-cycle`: the launch span plus scheduling and
    output processing, which is how often a host-bound engine steps); and, for requests that arrived together at an
    idle engine, the time to their first step (phase `vllm-admit`, by requests and prompt tokens: input processing
    of each request before it can be scheduled); where the file has them, the host's time from `execute_model` to
    the model's first launch (phase `vllm-lead`: input preparation, which a step starting on an idle GPU waits for)."""

    from ..environment import vllm_environment_name
    from ..errors import DoolyError
    from ..store import Store

    data = _calibration_file(path)
    env_info, layers = data["environment"], data["layers"]
    where = {"layers": layers, **({"runner": 1} if data.get("runner") == "v1" else {})}  # V2 rows name none
    samples: dict[tuple[int, int], dict[str, list[float]]] = {}
    admitted: dict[tuple[int, int], list[float]] = {}
    for run in data["runs"]:
        steps = run["steps"]
        arrivals = run["requests"]
        if steps and arrivals and all(a == 0.0 for a, _, _ in arrivals):
            admitted.setdefault((sum(p for _, p, _ in arrivals), len(arrivals)), []).append(steps[0]["start"] * 1e6)
        for i, s in enumerate(steps):
            spans = samples.setdefault((sum(s["queries"]), len(s["queries"])),
                                       {STEP_PHASE: [], LAUNCH_PHASE: [], CYCLE_PHASE: []})
            spans[STEP_PHASE].append(s["forward_s"] * 1e6)
            spans[LAUNCH_PHASE].append(s["host_s"] * 1e6)
            if s.get("host_lead_s") is not None:
                spans.setdefault(LEAD_PHASE, []).append(s["host_lead_s"] * 1e6)
            if i + 1 < len(steps):
                spans[CYCLE_PHASE].append((steps[i + 1]["start"] - s["start"]) * 1e6)
    store = Store(store_path)
    try:
        name = vllm_environment_name(env_info["gpu"], env_info["torch"], env_info["mode"] == "eager",
                                     env_info["engine_version"], env_info["attention_backend"])
        if name not in {e.name for e in store.environments()}:
            raise DoolyError(f"{store_path}: no environment {name} (calibrate where it was profiled)")
        store.forget_host(name, CALIBRATION_PHASES, where)
        for (t, r), spans in sorted(samples.items()):
            point = {"T": t, "R": r, **where}
            medians = {phase: store.record_host_samples(name, phase, point, values)
                       for phase, values in spans.items() if len(values) >= 3}
            if STEP_PHASE in medians:
                cycle = f", cycle {medians[CYCLE_PHASE]:8.0f} us" if CYCLE_PHASE in medians else ""
                print(f"  layers={layers:2d} T={t:5d} R={r:3d}: GPU span {medians[STEP_PHASE]:8.0f} us, host "
                      f"{medians[LAUNCH_PHASE]:8.0f} us{cycle} over {len(spans['vllm-step'])} steps", flush=True)
        for (t, r), values in sorted(admitted.items()):
            store.record_host_samples(name, ADMIT_PHASE, {"T": t, "R": r, **where}, values)
    finally:
        store.close()  # a WAL store is whole in its one file only once its last connection has closed


class Clocks:
    """The GPU's SM clock (MHz) and power (W) every 20 ms while a run lasts, each reading stamped on the run's
    clock, so a step's clocks can be looked up by its start: a long prefill may run below the clocks a short
    benchmark sees."""

    def __init__(self, origin: float):
        import threading

        self.origin, self.samples = origin, []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,"
                                          "nounits", "-lms", "20"], stdout=subprocess.PIPE, text=True)
        except OSError:
            self.proc = None
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                sm, watts = (float(x) for x in line.split(","))
                self.samples.append((round(time.perf_counter() - self.origin, 3), sm, watts))

    def stop(self) -> list[tuple[float, float, float]]:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=1)
        return self.samples


def _vllm_traces(max_context: int) -> dict[str, tuple[list[tuple[float, int, int]], int]]:
    """The engine-independent traces, each prompt cut to fit the model's context (vLLM refuses a longer one; nothing
    changes for models of 8k context and more), and one whose 32 prompts share their first 2,048 tokens: prefix-cache
    hits (vLLM caches prefixes by default)."""
    from .traces import traces

    shared = [(0.0, 2048 + 64 * (i % 4 + 1), 16) for i in range(32)]
    fit = lambda reqs: [(a, min(p, max_context - 32 - o), o) for a, p, o in reqs]  # noqa: E731 - vLLM refuses longer
    return {**{name: (fit(reqs), 0) for name, reqs in traces(max_context).items()}, "prefix@inf": (shared, 2048)}


def groundtruth(models: list[Path], out: Path, backend: str, eager: bool, repeats: int, budget_s: float,
                only: tuple[str, ...], layers: dict[str, int]) -> None:
    """Each model (a config.json, named by its file's stem) served on every trace, into out/vllm-<backend>/; one
    process a model."""
    from ..config import load_config

    configs = [load_config(path) for path in models]  # every config checked before the first engine starts
    if len(models) > 1:
        start = time.monotonic()
        for path in models:
            left = budget_s - (time.monotonic() - start)
            if left <= 0:
                print(f"budget spent: {path.stem} and the rest not run", flush=True)
                break
            _in_own_process("groundtruth", "--models", str(path), "--out", str(out), "--backend", backend,
                            *(["--eager"] if eager else []), "--repeats", str(repeats), "--budget-s", str(left),
                            *(["--traces", *only] if only else []),
                            *(["--layers", *(f"{k}={v}" for k, v in layers.items())] if layers else []))
        return
    folder = out / f"vllm-{backend.lower()}{'-eager' if eager else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for cfg in configs:
        name, config = cfg.name, cfg.data
        path = folder / f"{name}.json"
        if path.exists():
            continue
        if time.monotonic() - start > budget_s:
            print(f"budget spent: {name} and the rest not run", flush=True)
            break
        engine = VllmEngine(config, layers=layers.get(name), backend=backend, eager=eager)
        result = {"model": name, "layers": layers.get(name), "environment": environment(backend, eager),
                  "engine_config": engine.resolved_config(), "traces": {}}
        print(f"{name}: up in {engine.startup_s:.0f} s {json.dumps(result['engine_config'])}", flush=True)
        with contextlib.ExitStack() as stack:
            stack.callback(engine.close)
            engine.run([(0.0, 64, 4), (0.0, 900, 4)])
            for trace, (requests, prefix) in _vllm_traces(engine.max_len).items():
                if only and trace.split("@")[0] not in only:
                    continue
                runs = []
                for repeat in range(repeats + 1):  # the first run of each trace warms up, discarded
                    t = time.perf_counter()
                    clocks = Clocks(t)
                    steps, reqs = engine.run(requests, shared_prefix=prefix)
                    readings = clocks.stop()
                    if repeat:
                        runs.append({"steps": [asdict(s) for s in steps], "requests": [asdict(r) for r in reqs],
                                     "clocks": {"origin": round(engine.hooks.origin - t, 4), "samples": readings}})
                    print(f"  {name} {trace} run {repeat}: {len(steps)} steps, {time.perf_counter() - t:.1f} s",
                          flush=True)
                result["traces"][trace] = {"requests": requests, "shared_prefix": prefix, "runs": runs}
        path.write_text(json.dumps(result))
        print(f"{name}: done, {time.monotonic() - start:.0f} s so far", flush=True)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check")
    c = sub.add_parser("calibrate")
    c.add_argument("--store", type=Path, required=True)
    c.add_argument("--backend", default="FLASH_ATTN", choices=BACKENDS)
    c.add_argument("--eager", action="store_true")
    c.add_argument("--layers", nargs="+", type=int, default=list(CALIBRATION_LAYERS), help="the tiny model's depths")
    c.add_argument("--runner", choices=["v2", "v1"], default="v2", help="vLLM's model runner to calibrate")
    c.add_argument("--raw", type=Path, help="folder for every calibration step, one JSON file a depth (default "
                   "data/host/vllm-calibration/<backend>[-eager])")
    r = sub.add_parser("record", help="record calibration steps kept by calibrate into a store")
    r.add_argument("raw", nargs="+", type=Path)
    r.add_argument("--store", type=Path, required=True)
    g = sub.add_parser("groundtruth")
    g.add_argument("--models", nargs="+", type=Path, required=True, metavar="CONFIG", help="the models' config.json")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--backend", default="FLASH_ATTN", choices=BACKENDS)
    g.add_argument("--eager", action="store_true", help="enforce_eager: no torch.compile, no CUDA graphs")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--budget-s", type=float, default=float("inf"))
    g.add_argument("--traces", nargs="+", default=[], choices=["chat", "long", "burst", "decode", "longctx", "prefix"])
    g.add_argument("--layers", nargs="*", default=[], metavar="MODEL=N", help="run MODEL at reduced depth N")
    args = parser.parse_args(argv)
    if args.command == "check":
        check()
    elif args.command == "calibrate":
        raw = args.raw or Path("data/host/vllm-calibration") / f"{args.backend.lower()}{'-eager' if args.eager else ''}"
        calibrate(args.store, args.backend, args.eager, tuple(args.layers), raw, args.runner)
    elif args.command == "record":
        for path in args.raw:
            record_calibration(args.store, path)
    else:
        layers = {k: int(v) for k, v in (item.split("=") for item in args.layers)}
        groundtruth(args.models, args.out, args.backend, args.eager, args.repeats, args.budget_s,
                    tuple(args.traces), layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
