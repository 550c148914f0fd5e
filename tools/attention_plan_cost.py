"""What a new attention shape costs the host under cuDNN SDPA, call after call, in the conditions a serving thread
meets them (run on the GPU machine):

- `fresh`: a new thread, new decode-like shapes one after another (R requests, keys growing by R a call), with
  the GPU's memory free, as `dooly.bench.host.first_calls` measures them;
- `again`: another new thread, the same shapes: what a thread pays for shapes the process built in another one;
- `full`: a new thread, new shapes, with the caching allocator holding most of the GPU's memory, as the engine's
  KV cache does (it sizes the cache to fill the card).

Each call's extra host time is its first call's time minus the median of two repeats, with the GPU synchronised
before and after; printed per condition over successive slices of the sequence, and written as JSON lines.

    python tools/attention_plan_cost.py --out OUT [--heads 32x64 32x128] [--shapes 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REQUESTS = 16
FIRST_KEYS = 16 * 2000
SLICES = ((0, 10), (10, 50), (50, 100), (100, None))


def in_thread(heads: int, dim: int, keys: list[int]) -> list[float]:
    from dooly.bench.host import first_call_us

    out: list[float] = []
    worker = threading.Thread(target=lambda: out.extend(first_call_us(heads, dim, REQUESTS, k) / 1e3 for k in keys))
    worker.start()
    worker.join()
    return out


def main():
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heads", nargs="+", default=["32x64", "32x128"], help="HEADSxHEAD_DIM")
    parser.add_argument("--shapes", type=int, default=200)
    parser.add_argument("--fill", type=float, default=0.9, help="share of free GPU memory `full` holds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    print(env, flush=True)
    rows = []
    for n, spec in enumerate(args.heads):
        heads, dim = map(int, spec.split("x"))
        in_thread(heads, dim, [REQUESTS + 7 * i for i in range(8)])  # the process's one-time kernel loading
        keys = [FIRST_KEYS + 300_000 * n + REQUESTS * i for i in range(args.shapes)]
        runs = {"fresh": in_thread(heads, dim, keys), "again": in_thread(heads, dim, keys)}
        free, _ = torch.cuda.mem_get_info()
        held = torch.empty(int(free * args.fill), dtype=torch.uint8, device="cuda")
        runs["full"] = in_thread(heads, dim, [k + 50_000 for k in keys])
        del held
        torch.cuda.empty_cache()
        for condition, values in runs.items():
            rows.append({"heads": heads, "head_dim": dim, "condition": condition, "requests": REQUESTS,
                         "first_keys": keys[0], "extra_ms": values, **env})
            parts = [f"{a}-{b or len(values)}: {statistics.median(values[a:b]):.1f}" for a, b in SLICES
                     if values[a:b]]
            print(f"{spec} {condition:5s} median extra ms by call " + ", ".join(parts), flush=True)
    (args.out / "attention_plan_cost.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
