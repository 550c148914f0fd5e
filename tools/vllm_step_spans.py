"""Where vLLM's measured steps part from the prediction by kind of step, per model and trace: the host-bound steps of
257-600 tokens (median GPU span and host span, measured, against the predicted span and GPU work) and the decode
steps of one request with under 1k tokens of context (median measured and predicted span), as `docs/findings.md`
quotes them.

    python tools/vllm_step_spans.py [--backend FLASH_ATTN] [--store data/h200.sqlite] MODEL...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dooly.compile import load_model
from dooly.predict.vllm_step import step_model
from dooly.store import Store
from dooly.vllm_validate import BACKEND_FOLDERS, host_ahead

ROOT = Path(__file__).resolve().parent.parent
MIDDLE = (257, 600)  # tokens: above the captured sizes, below a full chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--backend", default="FLASH_ATTN", choices=sorted(BACKEND_FOLDERS.values()))
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "h200.sqlite")
    args = parser.parse_args()
    folder = {v: k for k, v in BACKEND_FOLDERS.items()}[args.backend]
    store = Store(args.store, readonly=True)
    table = Table(title=f"{args.backend}: medians in ms, measured | predicted")
    for column in ("model", "trace", f"{MIDDLE[0]}-{MIDDLE[1]} tok steps", "GPU span", "host span", "predicted",
                   "GPU work", "1-request decodes", "measured", "predicted"):
        table.add_column(column, justify="left" if column in ("model", "trace") else "right")
    ms = lambda values: f"{statistics.median(values) * 1e3:.2f}" if values else "-"  # noqa: E731
    for name in args.models:
        truth = json.loads((ROOT / "data" / "groundtruth" / "vllm" / folder / f"{name}.json").read_text())
        model = step_model(load_model(ROOT / "data" / "vllm-ir" / f"{name}.ir"), store, args.backend)
        for trace_name, trace in truth["traces"].items():
            middle, decodes = [], []
            for run in trace["runs"]:
                for s, ahead_s in zip(run["steps"], host_ahead(run["steps"])):
                    batch = [(q, q + c) for q, c in zip(s["queries"], s["computed"])]
                    tokens = sum(s["queries"])
                    span = model.span_us(batch, ahead_s * 1e6) * 1e-6
                    if MIDDLE[0] <= tokens <= MIDDLE[1]:
                        middle.append((s["forward_s"], s["host_s"], span, model.gpu_us(batch) * 1e-6))
                    elif tokens == len(batch) == 1 and s["computed"][0] < 1000:
                        decodes.append((s["forward_s"], span))
            table.add_row(name, trace_name, str(len(middle)), *(ms([m[k] for m in middle]) for k in range(4)),
                          str(len(decodes)), *(ms([d[k] for d in decodes]) for k in range(2)))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
