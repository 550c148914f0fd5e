"""`dooly validate --groundtruth DIR --store PATH`: Dooly's predictions against the engine's measured ground truth.

Ground truth (`dooly groundtruth` on the GPU) holds, per model and attention backend, request traces each served
once to warm up and then repeatedly. Compared here:

- step latency: the model forward's GPU time of every batch composition measured in at least `MIN_REPEATS`
  runs (their median), against `Predictor` on that composition;
- TTFT and TPOT: each request's median over the runs, against the simulator serving the same trace with the
  engine's resolved ContinuousBatchingConfig.

The engine's own spread is reported beside each error: (max - min) / median of a step over its repeats, and of
a request's TTFT/TPOT over the runs. Ground truth is never used to fit anything.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DoolyError, command
from .limits import Limits, add_limit_argument, output_folder, parse_json, parse_limits, read_text
from .store import Store

MIN_REPEATS = 3


@dataclass
class Row:
    model: str
    backend: str
    graphs: bool
    step_errors: np.ndarray
    step_spread: np.ndarray
    ttft_errors: np.ndarray
    ttft_spread: np.ndarray
    tpot_errors: np.ndarray
    tpot_spread: np.ndarray
    parity: dict

    def to_json(self) -> dict:
        mape = lambda e: float(np.mean(e)) if len(e) else None  # noqa: E731
        return {"model": self.model, "backend": self.backend + ("+graphs" if self.graphs else ""),
                "step_mape": mape(self.step_errors), "ttft_mape": mape(self.ttft_errors),
                "tpot_mape": mape(self.tpot_errors), "n_steps": int(len(self.step_errors)),
                "n_requests": int(len(self.ttft_errors)),
                "step_median_ape": _pct(self.step_errors, 50), "step_p90_ape": _pct(self.step_errors, 90),
                "ttft_median_ape": _pct(self.ttft_errors, 50), "ttft_p90_ape": _pct(self.ttft_errors, 90),
                "tpot_median_ape": _pct(self.tpot_errors, 50), "tpot_p90_ape": _pct(self.tpot_errors, 90),
                "step_spread": _pct(self.step_spread, 50), "ttft_spread": _pct(self.ttft_spread, 50),
                "tpot_spread": _pct(self.tpot_spread, 50)}


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def steps_of(truth: dict, forward=None) -> tuple[list[list[tuple[int, int]]], np.ndarray, np.ndarray, np.ndarray]:
    """Compositions seen in at least MIN_REPEATS runs of a trace: their batches, median measured forward (s), its
    spread, and (given `forward`, a factory of per-run step models) the median predicted forward over the same
    runs, each run's steps predicted in the order it ran them. A step marked `idle` (it started on an idle GPU, as
    vLLM's ground truth says) is a composition of its own; a step that says how far ahead of the GPU the host
    entered it (`ahead_s`) is predicted for that."""
    batches, medians, spreads, predicted = [], [], [], []
    for trace in truth["traces"].values():
        seen: dict[tuple, list[float]] = {}
        guessed: dict[tuple, list[float]] = {}
        for run in trace["runs"]:
            step_time = forward() if forward else None
            for step in run["steps"]:
                key = (tuple(zip(step["queries"], step["keys"])), step.get("idle", False))
                seen.setdefault(key, []).append(step["forward_s"])
                if step_time:
                    batch = [(int(q), int(k)) for q, k in key[0]]
                    us = step_time.forward_us(batch, *([step["ahead_s"]] if "ahead_s" in step else []))
                    guessed.setdefault(key, []).append(us[0])
        for key, values in seen.items():
            if len(values) >= MIN_REPEATS:
                batches.append([(int(q), int(k)) for q, k in key[0]])
                medians.append(float(np.median(values)))
                spreads.append((max(values) - min(values)) / float(np.median(values)))
                predicted.append(float(np.median(guessed[key])) * 1e-6 if step_time else np.nan)
    return batches, np.array(medians), np.array(spreads), np.array(predicted)


def request_truth(trace: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per request (in trace order): median TTFT and TPOT over the runs, and their spreads.

    A TTFT counts from the request's arrival in the trace, as the simulator's does and a client's would, not from
    when the harness handed it to the engine: vLLM's harness can only add a request between steps, up to a step's
    length (30 ms) after it arrived."""
    ttft, tpot = [], []
    arrivals = [a for a, _, _ in trace["requests"]]
    for run in trace["runs"]:
        by_id = {r["request_id"]: r for r in run["requests"]}
        rows = [by_id.get(f"r{i}") for i in range(len(trace["requests"]))]
        ttft.append([r["first_token"] - a if r and r["token_times"] else np.nan for r, a in zip(rows, arrivals)])
        tpot.append([(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
                     if r and len(r["token_times"]) > 1 else np.nan for r in rows])
    ttft, tpot = np.array(ttft), np.array(tpot)
    spread = lambda a: (np.nanmax(a, 0) - np.nanmin(a, 0)) / np.nanmedian(a, 0)  # noqa: E731
    return np.nanmedian(ttft, 0), np.nanmedian(tpot, 0), spread(ttft), spread(tpot)


LIMITS = ("tokens-per-step", "requests-per-step", "context-tokens", "requests", "prompt-tokens", "output-tokens",
          "workload-tokens", "steps")
CB_FIELDS = ("num_blocks", "block_size", "max_batch_tokens", "max_requests_per_batch", "q_padding_interval_size",
             "kv_padding_interval_size")


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_groundtruth(path: Path, limits: Limits, models: set[str]) -> dict:
    """A ground-truth file with everything `validate_model` reads checked: its structure, a model among `models`,
    every step composition as `Batches.of` checks user batches, every request as a trace's, all within `limits`.
    vLLM's files (`dooly.vllm_validate`) are checked as theirs."""
    truth = parse_json(read_text(path, "ground truth"), str(path))

    def need(ok, what: str) -> None:
        if not ok:
            raise DoolyError(f"{path}: not a ground-truth file: {what}")

    need(isinstance(truth, dict), "expected a JSON object")
    need(isinstance(truth.get("model"), str) and truth["model"] in models, "model must name a model of --models")
    if isinstance(truth.get("environment"), dict) and truth["environment"].get("engine") == "vllm":
        from .vllm_validate import check_vllm

        return check_vllm(truth, path, limits, need)
    need(isinstance(truth.get("backend"), str), "backend must be a string")
    need(truth.get("layers") is None or _count(truth["layers"]), "layers must be a positive integer")
    cb = truth.get("cb_config")
    need(isinstance(cb, dict) and all(_count(cb.get(k)) for k in CB_FIELDS),
         f"cb_config must hold positive integers {', '.join(CB_FIELDS)}")
    need(cb.get("safety_margin") is None or (_seconds(cb["safety_margin"]) and 0 <= cb["safety_margin"] < 1),
         "cb_config.safety_margin must be a number from 0 to 1")
    limits.check("tokens-per-step", cb["max_batch_tokens"], f"{path}: cb_config.max_batch_tokens")
    limits.check("requests-per-step", cb["max_requests_per_batch"], f"{path}: cb_config.max_requests_per_batch")
    check_traces(truth, path, limits, need)
    return truth


def check_traces(truth: dict, path: Path, limits: Limits, need) -> None:
    """Every trace's requests and runs, each step's composition as `Batches.of` checks user batches."""
    from .predict import Batches
    from .sim.workload import request

    need(isinstance(truth.get("traces"), dict) and truth["traces"], "traces must be a non-empty object")
    for name, trace in truth["traces"].items():
        where = f"{path}: trace {name[:40]!r}"
        need(isinstance(trace, dict) and isinstance(trace.get("requests"), list) and trace["requests"]
             and isinstance(trace.get("runs"), list) and trace["runs"], f"trace {name[:40]!r} needs requests and runs")
        limits.check("requests", len(trace["requests"]), f"{where}: requests")
        for i, row in enumerate(trace["requests"]):
            need(isinstance(row, list) and len(row) == 3 and _seconds(row[0]),
                 f"trace {name[:40]!r}: a request is [arrival, prompt, output]")
            request(i, row[0], row[1], row[2], limits, f"{where}: request {i}")
        limits.check("workload-tokens", sum(p + o for _, p, o in trace["requests"]), f"{where}: prompt plus output "
                     "tokens")
        for run in trace["runs"]:
            need(isinstance(run, dict) and isinstance(run.get("steps"), list) and isinstance(run.get("requests"), list),
                 f"trace {name[:40]!r}: a run holds steps and requests")
            for step in run["steps"]:
                need(isinstance(step, dict) and isinstance(step.get("queries"), list)
                     and isinstance(step.get("keys"), list) and len(step["queries"]) == len(step["keys"])
                     and _seconds(step.get("forward_s")) and step["forward_s"] > 0,
                     f"trace {name[:40]!r}: a step holds queries, keys (as many) and a positive forward_s")
            try:
                Batches.of([list(zip(step["queries"], step["keys"])) for step in run["steps"]], limits)
            except DoolyError as e:
                raise DoolyError(f"{where}, a run's steps: {e}") from None
            for r in run["requests"]:
                need(isinstance(r, dict) and isinstance(r.get("request_id"), str) and _seconds(r.get("arrival"))
                     and isinstance(r.get("token_times"), list) and all(_seconds(t) for t in r["token_times"])
                     and (not r["token_times"] or _seconds(r.get("first_token"))),
                     f"trace {name[:40]!r}: a run's request holds request_id, arrival, token_times and (with tokens) "
                     "first_token")
                # its measurements are compared with the trace's request of that index: it must be that request
                named = re.fullmatch(r"r(\d+)", r["request_id"])
                index = int(named[1]) if named else len(trace["requests"])
                asked = trace["requests"][index] if index < len(trace["requests"]) else None
                need(asked is not None and r.get("prompt") == asked[1] and r.get("output") == asked[2],
                     f"trace {name[:40]!r}: a run's request {r['request_id'][:20]!r} is not r<i> with the prompt and "
                     "output of the trace's request i")


def simulate_trace(trace: dict, scheduler, step_time, max_steps: int) -> list[dict]:
    """A transformers trace served in the simulator as the harness served it, one row a request in trace order: the
    harness adds the requests arriving together smallest first, and names each by its place in the trace."""
    from .bench.traces import admission_order
    from .sim import Request, simulate

    asked = trace["requests"]
    rank = {i: k for k, i in enumerate(admission_order(asked))}
    return simulate([Request(rank[i], *asked[i]) for i in range(len(asked))], scheduler, step_time, max_steps).requests


def validate_model(truth: dict, graph, store: Store, log=print, max_steps: int = Limits()["steps"]) -> Row:
    """The errors of predicting the ground truth of one model (`graph`, its compiled IR) from the store."""
    from .environment import environment_name
    from .predict import load_predictor
    from .sim import ContinuousBatching, EngineSettings, StepTime

    name, backend = truth["model"], truth["backend"]
    env = environment_name(store, backend)
    predictor = load_predictor(graph, store, env, truth.get("layers"))
    cb = truth["cb_config"]
    graphs = bool(truth.get("cuda_graphs"))
    engine_settings = EngineSettings(use_cuda_graph=graphs, q_padding_interval_size=cb["q_padding_interval_size"],
                                     kv_padding_interval_size=cb["kv_padding_interval_size"],
                                     max_batch_tokens=cb["max_batch_tokens"],
                                     use_async_batching=bool(cb.get("use_async_batching")))
    if graphs:  # the warm-up run captured the graphs: repeats replay them
        warm = StepTime(predictor, engine_settings)
        for trace in truth["traces"].values():
            for step in trace["runs"][0]["steps"]:
                warm.forward_us(list(zip(step["queries"], step["keys"])))
        runs = lambda: copy.deepcopy(warm)  # noqa: E731
    else:
        runs = lambda: StepTime(predictor, engine_settings)  # noqa: E731  a fresh engine thread every run
    batches, measured, spread, pred = steps_of(truth, runs)
    step_errors = np.abs(pred - measured) / measured
    t_err, p_err, t_spr, p_spr, ttft_pairs, tpot_pairs = [], [], [], [], [], []
    for trace_name, trace in truth["traces"].items():
        m_ttft, m_tpot, s_ttft, s_tpot = request_truth(trace)
        scheduler = ContinuousBatching(cb["num_blocks"], cb["block_size"], cb["max_batch_tokens"],
                                       cb["max_requests_per_batch"], cb.get("safety_margin") or 0.15)
        out = simulate_trace(trace, scheduler, runs(), max_steps)
        p_ttft = np.array([r["ttft"] for r in out])
        p_tpot = np.array([r["tpot"] if r["tpot"] is not None else np.nan for r in out], dtype=float)
        ok = ~np.isnan(m_ttft)
        t_err += list(np.abs(p_ttft[ok] - m_ttft[ok]) / m_ttft[ok])
        t_spr += list(s_ttft[ok])
        ok = ~np.isnan(m_tpot) & ~np.isnan(p_tpot)
        p_err += list(np.abs(p_tpot[ok] - m_tpot[ok]) / m_tpot[ok])
        p_spr += list(s_tpot[ok])
        ttft_pairs += list(zip(m_ttft[~np.isnan(m_ttft)], p_ttft[~np.isnan(m_ttft)]))
        tpot_pairs += list(zip(m_tpot[ok], p_tpot[ok]))
        log(f"  {name} {backend}{'+graphs' if graphs else ''} {trace_name}: TTFT {np.nanmean(m_ttft) * 1e3:.0f} ms "
            f"measured, {np.mean(p_ttft) * 1e3:.0f} ms predicted")
    parity = {"step": list(zip(measured, pred)), "ttft": ttft_pairs, "tpot": tpot_pairs}
    return Row(name, backend, graphs, step_errors, spread, np.array(t_err), np.array(t_spr), np.array(p_err),
               np.array(p_spr), parity)


def parity_plots(rows: list[Row], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for what, unit, scale in (("step", "forward (ms)", 1e3), ("ttft", "TTFT (ms)", 1e3), ("tpot", "TPOT (ms)", 1e3)):
        fig, ax = plt.subplots(figsize=(6, 6))
        top = 0.0
        for row in rows:
            pairs = np.array(row.parity[what]) * scale
            if not len(pairs):
                continue
            label = f"{row.model} ({row.backend}{'+graphs' if row.graphs else ''})"
            ax.scatter(pairs[:, 0], pairs[:, 1], s=8, alpha=0.6, label=label)
            top = max(top, pairs.max())
        ax.plot([0, top], [0, top], "k--", lw=1)
        ax.set_xlabel(f"measured {unit}")
        ax.set_ylabel(f"predicted {unit}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"Dooly vs transformers continuous batching on H100: {what}")
        ax.legend(fontsize=6)
        path = out / f"parity_{what}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly validate", description=__doc__.splitlines()[0])
    parser.add_argument("--groundtruth", type=Path, required=True, help="folder of <backend>/<model>.json files")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True,
                        help="folder of the models' compiled IRs, <model>.ir (golden/ holds the zoo's; "
                             "data/vllm-ir/ the vLLM IRs that vLLM's ground truth needs)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plots", type=Path, help="where the parity plots go (default: out/validate)")
    add_limit_argument(parser, LIMITS)
    args = parser.parse_args(argv)
    limits = parse_limits(args.limit, LIMITS)
    plots_folder = output_folder(args.plots, "--plots") if args.plots else Path("out/validate")
    from .compile import load_model

    files = sorted(args.groundtruth.glob("*/*.json"))
    if not files:
        raise DoolyError(f"{args.groundtruth}: no ground-truth files (<backend>/<model>.json)")
    models = {p.stem: p for p in args.models.glob("*.ir")}
    if not models:
        raise DoolyError(f"{args.models}: no compiled IRs (<model>.ir)")
    truths = [read_groundtruth(f, limits, set(models)) for f in files]
    store = Store(args.store, readonly=True)
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    from .vllm_validate import is_vllm, validate_vllm_model

    rows = [(validate_vllm_model if is_vllm(truth) else validate_model)(truth, load_model(models[truth["model"]]),
                                                                         store, log, limits["steps"])
            for truth in truths]
    rows = [row for row in rows if row is not None]
    plots = parity_plots(rows, plots_folder)
    if args.json:
        print(json.dumps({"rows": [r.to_json() for r in rows]}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Dooly vs the engine (APE = absolute percentage error; spread = the engine's "
                        "own (max - min) / median over repeats)")
    for col in ("model", "backend", "steps", "step MAPE", "med / p90", "spread", "requests", "TTFT MAPE",
                "med / p90", "spread", "TPOT MAPE", "med / p90", "spread"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in (row.to_json() for row in rows):
        table.add_row(r["model"], r["backend"], str(r["n_steps"]), pct(r["step_mape"]),
                      f"{pct(r['step_median_ape'])} / {pct(r['step_p90_ape'])}", pct(r["step_spread"]),
                      str(r["n_requests"]), pct(r["ttft_mape"]),
                      f"{pct(r['ttft_median_ape'])} / {pct(r['ttft_p90_ape'])}", pct(r["ttft_spread"]),
                      pct(r["tpot_mape"]), f"{pct(r['tpot_median_ape'])} / {pct(r['tpot_p90_ape'])}",
                      pct(r["tpot_spread"]))
    console = Console()
    console.print(table)
    console.print("parity plots: " + ", ".join(map(str, plots)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
