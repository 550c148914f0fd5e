"""`dooly validate --groundtruth data/groundtruth/vllm --store data/h200.sqlite --models data/vllm-ir`: Dooly against
vLLM 0.24.

Ground truth (`python -m dooly.bench.vllm_engine groundtruth` on the GPU) holds per model and attention backend the
traces vLLM served, each step's composition and GPU time, each request's token times. Compared, as for
transformers' engine (`dooly.validate`): the step time of every composition seen in at least three runs (median)
against `dooly.predict.vllm_step`, and each request's TTFT and TPOT against the simulator serving the trace with
vLLM's V1 scheduler under the engine's resolved settings (token budget, sequences, KV blocks, prefix caching, async
scheduling). The models' vLLM IRs (`dooly compile CONFIG --frontend vllm`) come from `--models`, `<model>.ir`.
Ground truth is never used to fit anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .environment import CAPTURE_SIZES
from .errors import DoolyError

BACKEND_FOLDERS = {"flash_attn": "FLASH_ATTN", "triton_attn": "TRITON_ATTN", "flashinfer": "FLASHINFER"}


def is_vllm(truth: dict) -> bool:
    return truth.get("environment", {}).get("engine") == "vllm"


ENGINE_FIELDS = ("num_gpu_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs")


def check_vllm(truth: dict, path: Path, limits, need) -> dict:
    """A vLLM ground-truth file checked as `dooly.validate.read_groundtruth` checks transformers' (the same
    traces, with each step's keys made from its computed tokens), returned with those keys."""
    from .ir.graph import MODEL_NAME
    from .validate import check_traces

    need(isinstance(truth.get("model"), str) and MODEL_NAME.fullmatch(truth["model"]), "model must be a model name")
    env = truth["environment"]
    need(env.get("attention_backend") in BACKEND_FOLDERS.values(),
         f"environment.attention_backend must be one of {', '.join(BACKEND_FOLDERS.values())}")
    config = truth.get("engine_config")
    need(isinstance(config, dict) and all(isinstance(config.get(k), int) and not isinstance(config.get(k), bool)
                                          and config[k] > 0 for k in ENGINE_FIELDS)
         and all(isinstance(config.get(k), bool) for k in ("prefix_caching", "async_scheduling")),
         f"engine_config must hold positive integers {', '.join(ENGINE_FIELDS)} and booleans prefix_caching, "
         "async_scheduling")
    limits.check("tokens-per-step", config["max_num_batched_tokens"], f"{path}: engine_config.max_num_batched_tokens")
    limits.check("requests-per-step", config["max_num_seqs"], f"{path}: engine_config.max_num_seqs")
    need(isinstance(truth.get("traces"), dict) and truth["traces"], "traces must be a non-empty object")
    for name, trace in truth["traces"].items():
        need(isinstance(trace, dict) and isinstance(trace.get("shared_prefix"), int)
             and trace["shared_prefix"] >= 0 and isinstance(trace.get("runs"), list), f"trace {name[:40]!r} needs "
             "runs and a shared_prefix of tokens")
        for run in trace["runs"]:
            need(isinstance(run, dict) and isinstance(run.get("steps"), list) and all(
                isinstance(s, dict) and isinstance(s.get("queries"), list) and isinstance(s.get("computed"), list)
                and len(s["queries"]) == len(s["computed"])
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in s["computed"])
                and all(isinstance(q, int) and not isinstance(q, bool) for q in s["queries"])
                for s in run["steps"]), f"trace {name[:40]!r}: a step holds queries and computed tokens (as many)")
    truth = _with_keys(truth)
    check_traces(truth, path, limits, need)
    return truth


def _with_keys(truth: dict) -> dict:
    """The ground truth with each step's keys (new plus computed tokens), as `dooly.validate.steps_of` reads them,
    how far ahead of the GPU the host entered it (`ahead_s`) and whether it started on an idle GPU (`idle`)."""
    traces = {}
    for name, trace in truth["traces"].items():
        runs = [{**run, "steps": [{**s, "keys": [q + c for q, c in zip(s["queries"], s["computed"])],
                                   "ahead_s": ahead, "idle": ahead <= 0}
                                  for s, ahead in zip(run["steps"], host_ahead(run["steps"]))]}
                for run in trace["runs"]]
        traces[name] = {**trace, "runs": runs}
    return {**truth, "traces": traces}


def host_ahead(steps: list[dict]) -> list[float]:
    """How long before the GPU finished the work queued before it the host entered each step (negative: how long
    the GPU had idled). A step's GPU span runs from an event recorded as the host enters execute_model, which fires
    once the GPU is done with what was queued before: so a step's GPU work ends at the later of its launch and the
    previous step's end, plus its span."""
    ahead, end = [], -math.inf
    for s in steps:
        ahead.append(end - s["start"])
        end = max(s["start"], end) + s["forward_s"]
    return ahead


class _StepTime:
    def __init__(self, model):
        self.model = model

    def forward_us(self, batch, ahead_s=-math.inf):
        return self.model.span_us(batch, ahead_s * 1e6), None


def _prompt_tokens(requests, shared: int) -> dict[int, list[int]]:
    """Token ids as the harness drew them: a prefix shared by every request, the rest never repeated."""
    return {r.id: [-1 - j for j in range(min(shared, r.prompt))]
            + [(r.id + 1) * 10**6 + j for j in range(r.prompt - min(shared, r.prompt))] for r in requests}


def by_regime(batches, measured: np.ndarray, predicted: np.ndarray) -> str:
    """Step errors apart for what vLLM runs differently: decode batches (full CUDA graphs), other steps up to the
    largest captured size (piecewise graphs, eager attention) and above it (every kernel launched eagerly)."""
    tokens = np.array([sum(q for q, _ in b) for b in batches])
    decode = tokens == np.array([len(b) for b in batches])
    parts = []
    for label, k in (("decode", decode), (f"prefill <= {CAPTURE_SIZES[-1]}", ~decode & (tokens <= CAPTURE_SIZES[-1])),
                     (f"> {CAPTURE_SIZES[-1]} tokens", tokens > CAPTURE_SIZES[-1])):
        if k.any():
            e = (predicted[k] - measured[k]) / measured[k]
            parts.append(f"{label} {k.sum()} MAPE {np.mean(np.abs(e)):.1%} bias {np.median(e):+.1%}")
    return "; ".join(parts)


def validate_vllm_model(truth: dict, graph, store, log=print, max_steps: int = 10**6):
    """The errors of predicting one model's vLLM ground truth (`graph`, its vLLM IR) from the store; None (said in
    the log) where the store lacks what its environment runs."""
    from .environment import vllm_model_runner
    from .predict.vllm_step import step_model
    from .sim.schedulers import VLLMv1
    from .sim.simulator import simulate_vllm
    from .sim.workload import Request
    from .validate import Row, request_truth, steps_of

    name = truth["model"]
    backend = truth["environment"]["attention_backend"]
    if truth["environment"].get("mode", "").startswith("eager"):
        log(f"  {name} vllm {backend} eager: skipped, the eager environment is not profiled yet")
        return None
    try:
        model = step_model(graph, store, backend)
    except DoolyError as e:
        log(f"  {name} vllm {backend}: skipped, {e}")
        return None
    runner = vllm_model_runner(graph.meta.architecture)
    if model.host_runner != runner:
        log(f"  {name} vllm {backend}: runs on vLLM's {runner} model runner, its host costs are the "
            f"{model.host_runner} runner's (calibrate --runner {runner} measures its own)")
    batches, measured, spread, pred = steps_of(truth, lambda: _StepTime(model))
    step_errors = np.abs(pred - measured) / measured if len(measured) else np.array([])
    log(f"  {name} vllm {backend} steps: {by_regime(batches, measured, pred)}")
    config = truth["engine_config"]
    t_err, p_err, t_spr, p_spr, ttft_pairs, tpot_pairs = [], [], [], [], [], []
    for trace_name, trace in truth["traces"].items():
        m_ttft, m_tpot, s_ttft, s_tpot = request_truth(trace)
        reqs = [Request(i, a, p, o) for i, (a, p, o) in enumerate(map(tuple, trace["requests"]))]
        scheduler = VLLMv1(config["num_gpu_blocks"], config["block_size"], config["max_num_batched_tokens"],
                           config["max_num_seqs"], config["prefix_caching"], config["async_scheduling"],
                           prompt_tokens=_prompt_tokens(reqs, trace["shared_prefix"]))
        outcome = simulate_vllm(reqs, scheduler, model, max_steps, async_scheduling=config["async_scheduling"])
        out = outcome.requests
        p_ttft = np.array([r["ttft"] for r in out])
        p_tpot = np.array([r["tpot"] if r["tpot"] is not None else np.nan for r in out], dtype=float)
        ok = ~np.isnan(m_ttft)
        t_err += list(np.abs(p_ttft[ok] - m_ttft[ok]) / m_ttft[ok])
        t_spr += list(s_ttft[ok])
        ttft_pairs += list(zip(m_ttft[ok], p_ttft[ok]))
        ok = ~np.isnan(m_tpot) & ~np.isnan(p_tpot)
        p_err += list(np.abs(p_tpot[ok] - m_tpot[ok]) / m_tpot[ok])
        p_spr += list(s_tpot[ok])
        tpot_pairs += list(zip(m_tpot[ok], p_tpot[ok]))
        log(f"  {name} vllm {backend} {trace_name}: TTFT {np.nanmean(m_ttft) * 1e3:.1f} ms measured, "
            f"{np.mean(p_ttft) * 1e3:.1f} ms predicted; TPOT {np.nanmean(m_tpot) * 1e3:.2f} / "
            f"{np.nanmean(p_tpot) * 1e3:.2f} ms")
    parity = {"step": list(zip(measured, pred)), "ttft": ttft_pairs, "tpot": tpot_pairs}
    return Row(name, f"vllm {backend}", True, step_errors, spread, np.array(t_err), np.array(t_spr),
               np.array(p_err), np.array(p_spr), parity)
