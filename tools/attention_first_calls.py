"""On the GPU: what the first SDPA call at a new shape costs the host, and which kernels it runs, over a grid.

The engine's float-mask attention `[1, heads, T, d] x [1, heads, K, d]` with a `[1, 1, T, K]` mask, called once at
each (T, K) of the grid on one thread: the first call's time (cuDNN builds its execution plan then) and the CUDA
kernels a second call launches (which backend runs). Written as JSON lines, one per point.

    python tools/attention_first_calls.py --out DIR [--heads 32x96 32x128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUERIES = (1, 2, 27, 48)
KEY_OFFSETS = range(8)  # one key count of each residue modulo 8: alignment could change the backend


def point(heads: int, dim: int, t: int, k: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dooly.bench.host import attention_inputs

    sdpa = torch.nn.functional.scaled_dot_product_attention
    *qkv, mask = attention_inputs(heads, dim, t, k)
    torch.cuda.synchronize()
    start = time.perf_counter()
    sdpa(*qkv, attn_mask=mask)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sdpa(*qkv, attn_mask=mask)
        torch.cuda.synchronize()
    kernels = sorted({e.key for e in prof.key_averages() if e.device_type.name == "CUDA"})
    return {"heads": heads, "head_dim": dim, "T": t, "K": k, "first_call_ms": first * 1e3, "kernels": kernels}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heads", nargs="+", default=["32x96", "32x128"], help="HEADSxHEAD_DIM")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "attention_first_calls.jsonl", "w") as f:
        for spec in args.heads:
            heads, dim = map(int, spec.split("x"))
            for t in QUERIES:
                for offset in KEY_OFFSETS:
                    row = point(heads, dim, t, 9000 + 64 * t + offset)
                    f.write(json.dumps(row) + "\n")
                    print(f"{spec} T={row['T']} K={row['K']}: first call {row['first_call_ms']:.1f} ms, "
                          f"{row['kernels'][0][:60]}", flush=True)


if __name__ == "__main__":
    main()
