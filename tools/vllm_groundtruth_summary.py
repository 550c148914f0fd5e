"""What vLLM's ground truth on the GPU says before any prediction: per mode and model, how many step compositions
repeat, the engine's own spread over them, median decode and prefill steps; and, for one model measured in
several modes, each mode's step time over the default's (compiled + CUDA graphs, FLASH_ATTN) on the same
compositions; full 2,048-token steps by the SM clock the GPU ran them at (files that sampled it); and, in files
that stamped it, each step's lead to the model's first kernel, on the GPU and on the host, for steps that started
on an idle GPU and steps launched while the last one ran.

    python tools/vllm_groundtruth_summary.py [--groundtruth data/groundtruth/vllm] [--model llama-3.1-8b]
    python tools/vllm_groundtruth_summary.py --groundtruth data/host/vllm-lead-h200 --leads
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dooly.vllm_validate import host_ahead

DEFAULT = "flash_attn"


def kind(queries: tuple[int, ...]) -> str:
    if max(queries) == 1:
        return "decode"
    return "prefill" if sum(queries) >= 512 else "mixed"


def compositions(truth: dict) -> dict[tuple, list[float]]:
    """Step time (s) of each batch composition, over every run of every trace."""
    times = defaultdict(list)
    for trace in truth["traces"].values():
        for run in trace["runs"]:
            for step in run["steps"]:
                times[(tuple(step["queries"]), tuple(step["computed"]))].append(step["forward_s"])
    return times


def clocked_full_steps(truth: dict, tokens: int = 2048) -> dict[str, list[tuple[float, float]]]:
    """(step ms, watts) of every step of `tokens` tokens, by whether the SM clock sampled in it was at full speed
    (>= 1,900 MHz) or throttled (< 1,700 MHz)."""
    out: dict[str, list[tuple[float, float]]] = {"full": [], "throttled": []}
    for trace in truth["traces"].values():
        for run in trace["runs"]:
            clocks = run.get("clocks")
            if not clocks or not clocks["samples"]:
                continue
            for step in run["steps"]:
                if sum(step["queries"]) != tokens:
                    continue
                t0 = step["start"] + clocks["origin"]
                inside = [(mhz, w) for t, mhz, w in clocks["samples"] if t0 <= t <= t0 + step["forward_s"]]
                if inside:
                    mhz, watts = min(inside)
                    band = "full" if mhz >= 1900 else "throttled" if mhz < 1700 else None
                    if band:
                        out[band].append((step["forward_s"] * 1e3, watts))
    return out


def lead_table(paths: list[Path]) -> Table:
    table = Table(title="A step's lead from execute_model to the model's first kernel (medians)")
    for col in ("model", "steps", "started", "count", "on the GPU", "on the host", "step"):
        table.add_column(col, justify="left" if col in ("model", "steps", "started") else "right")
    for path in paths:
        truth = json.loads(path.read_text())
        groups: dict[tuple[str, bool], list[tuple[float, float, float]]] = defaultdict(list)
        for trace in truth["traces"].values():
            for run in trace["runs"]:
                steps = run["steps"]
                if not steps or steps[0].get("lead_s") is None:
                    continue
                for step, ahead in zip(steps, host_ahead(steps)):
                    queries = tuple(step["queries"])
                    size = "decode" if max(queries) == 1 else "2,048 tokens" if sum(queries) >= 2048 else "other"
                    groups[size, ahead <= 0].append((step["lead_s"], step["host_lead_s"], step["forward_s"]))
        for (size, idle), rows in sorted(groups.items()):
            ms = lambda i: f"{statistics.median(r[i] for r in rows) * 1e3:.2f} ms"  # noqa: E731
            table.add_row(truth["model"], size, "idle GPU" if idle else "GPU busy", str(len(rows)), ms(0), ms(1),
                          ms(2))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groundtruth", type=Path, default=Path("data/groundtruth/vllm"))
    parser.add_argument("--model", default="llama-3.1-8b", help="the model compared across modes")
    parser.add_argument("--leads", action="store_true", help="only the table of each step's lead")
    args = parser.parse_args()
    console = Console()
    if args.leads:
        console.print(lead_table(sorted(args.groundtruth.glob("*.json"))))
        return
    table = Table(title="vLLM on the GPU: the engine's own repeatability")
    for col in ("mode", "model", "compositions (>=3 runs)", "spread (median)", "decode step", "prefill step"):
        table.add_column(col, justify="left" if col in ("mode", "model") else "right")
    repeated: dict[str, dict[tuple, float]] = {}
    for path in sorted(args.groundtruth.glob("*/*.json")):
        truth, mode = json.loads(path.read_text()), path.parent.name
        times = {k: v for k, v in compositions(truth).items() if len(v) >= 3}
        spread = [(max(v) - min(v)) / statistics.median(v) for v in times.values()]
        by_kind = defaultdict(list)
        for (queries, _), v in times.items():
            by_kind[kind(queries)].append(statistics.median(v) * 1e3)
        ms = lambda xs: f"{statistics.median(xs):.2f} ms" if xs else "-"  # noqa: E731
        table.add_row(mode, truth["model"], str(len(times)), f"{100 * statistics.median(spread):.1f}%",
                      ms(by_kind["decode"]), ms(by_kind["prefill"]))
        if truth["model"] == args.model:
            repeated[mode] = {k: statistics.median(v) for k, v in times.items()}
    console.print(table)
    clocked = Table(title="2,048-token steps by the SM clock they ran at (sampled every 20 ms)")
    for col in ("mode", "model", "at >= 1900 MHz", "below 1700 MHz", "power below 1700 MHz"):
        clocked.add_column(col, justify="left" if col in ("mode", "model") else "right")
    for path in sorted(args.groundtruth.glob("*/*.json")):
        truth = json.loads(path.read_text())
        bands = clocked_full_steps(truth)
        if bands["full"] and bands["throttled"]:
            cell = lambda xs: f"{statistics.median(x for x, _ in xs):.1f} ms ({len(xs)})"  # noqa: E731
            clocked.add_row(path.parent.name, truth["model"], cell(bands["full"]), cell(bands["throttled"]),
                            f"{statistics.median(w for _, w in bands['throttled']):.0f} W")
    console.print(clocked)
    if DEFAULT not in repeated:
        return
    ratios = Table(title=f"{args.model}: step time over {DEFAULT} (compiled + CUDA graphs), same compositions")
    for col in ("mode", "decode", "prefill", "mixed"):
        ratios.add_column(col, justify="left" if col == "mode" else "right")
    for mode, times in repeated.items():
        if mode == DEFAULT:
            continue
        by_kind = defaultdict(list)
        for key, t in times.items():
            if key in repeated[DEFAULT]:
                by_kind[kind(key[0])].append(t / repeated[DEFAULT][key])
        cell = lambda xs: f"{statistics.median(xs):.2f}x ({len(xs)})" if xs else "-"  # noqa: E731
        ratios.add_row(mode, cell(by_kind["decode"]), cell(by_kind["prefill"]), cell(by_kind["mixed"]))
    console.print(ratios)


if __name__ == "__main__":
    main()
