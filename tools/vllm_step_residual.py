"""What is left of vLLM's 2,048-token steps once their predicted attention is taken off: per model, trace and
context length (largest cached tokens of a prefill in the step, in 8k bins), the median measured step, the predicted
pieces and ops around attention, the predicted attention, and the residual (measured less both), also per layer. A
residual constant across context lengths is outside attention; one that grows with context is attention's.

    python tools/vllm_step_residual.py [--backend FLASH_ATTN] [--store data/h200.sqlite] MODEL...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dooly.compile import load_model
from dooly.predict.vllm_step import AttentionCurve, step_model
from dooly.store import Store
from dooly.vllm_validate import BACKEND_FOLDERS

ROOT = Path(__file__).resolve().parent.parent
TRACES = ("burst@inf", "long@2", "longctx@inf")
FULL = 2000  # tokens: a step of (nearly) max_num_batched_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--backend", default="FLASH_ATTN", choices=sorted(BACKEND_FOLDERS.values()))
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "h200.sqlite")
    args = parser.parse_args()
    folder = {v: k for k, v in BACKEND_FOLDERS.items()}[args.backend]
    store = Store(args.store, readonly=True)
    table = Table(title=f"{args.backend}: steps of {FULL}+ tokens, measured against predicted")
    for column in ("model", "trace", "context", "steps", "measured", "pieces etc.", "attention", "residual",
                   "per layer"):
        table.add_column(column, justify="left" if column in ("model", "trace") else "right")
    for name in args.models:
        graph = load_model(ROOT / "data" / "vllm-ir" / f"{name}.ir")
        model = step_model(graph, store, args.backend)
        truth = json.loads((ROOT / "data" / "groundtruth" / "vllm" / folder / f"{name}.json").read_text())
        bins: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for trace in TRACES:
            for run in truth["traces"][trace]["runs"][1:]:  # the first run warms the engine up
                for s in run["steps"]:
                    if sum(s["queries"]) < FULL:
                        continue
                    batch = [(q, q + c) for q, c in zip(s["queries"], s["computed"])]
                    context = max(c for q, c in zip(s["queries"], s["computed"]) if q > 1)
                    attention = sum(count * curve(batch) for _, count, curve, _ in model.terms
                                    if isinstance(curve, AttentionCurve))
                    bins.setdefault((trace, min(context // 8192 * 8192, 16384)), []).append(
                        (s["forward_s"] * 1e3, (model.gpu_us(batch) - attention) / 1e3, attention / 1e3))
        for (trace, context), rows in sorted(bins.items()):
            measured, rest, attention = (statistics.median(r[i] for r in rows) for i in range(3))
            residual = measured - rest - attention
            table.add_row(name, trace, f"{context:,}+", str(len(rows)), f"{measured:.1f} ms", f"{rest:.1f} ms",
                          f"{attention:.1f} ms", f"{residual:.1f} ms", f"{residual / graph.meta.layers * 1e3:.0f} us")
    Console().print(table)


if __name__ == "__main__":
    main()
