"""What profiling costs with Dooly against a per-model profiler, both from measurements made in one run on this GPU.

The per-model baseline (the research's comparison) profiles each model alone, into a store of its own
(`dooly profile IR --engine vllm`, resumable: a call cut off by `--budget-s` goes on where it stopped in the next).
Dooly measures each signature once, whichever models share it: its cost is the GPU-seconds of the distinct
signatures over those stores, each counted once (signatures are equal exactly when their hashes are). Prints both
and the ratio.

    python tools/bench_profile_cost.py data/vllm-ir/llama-3.1-8b.ir data/vllm-ir/mistral-7b-v0.3.ir \\
        data/vllm-ir/qwen3-8b.ir --work /tmp/cost [--budget-s 300] [--report out/profile_cost.json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def signature_costs(store: Path) -> dict[str, float]:
    """GPU-seconds each signature's points cost, finished sweeps or not."""
    if not store.exists():
        return {}
    db = sqlite3.connect(store)
    return dict(db.execute("SELECT signature, SUM(gpu_s) FROM measurements GROUP BY signature"))


def profile(ir: Path, store: Path, deadline: float) -> bool:
    """True when this model's profile ran to its end (all measured, or only what needs vLLM left where it is
    absent) before the deadline."""
    left = deadline - time.monotonic()
    if left <= 1:
        return False
    out = subprocess.run([sys.executable, "-m", "dooly", "profile", str(ir), "--engine", "vllm", "--store",
                          str(store), "--budget-s", f"{left:.0f}"], capture_output=True, text=True)
    tail = out.stdout.strip().splitlines()[-1:] or out.stderr.strip().splitlines()[-1:]
    print(f"  {ir.stem}: {' '.join(tail)}", flush=True)
    return out.returncode == 0 and time.monotonic() < deadline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("irs", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    stores = {ir.stem: args.work / f"{ir.stem}.sqlite" for ir in args.irs}
    finished = all([profile(ir, stores[ir.stem], deadline) for ir in args.irs])
    costs = {name: signature_costs(store) for name, store in stores.items()}
    once: dict[str, float] = {}
    for per_signature in costs.values():
        for sig, spent in per_signature.items():
            once.setdefault(sig, spent)
    baseline, dooly = sum(sum(c.values()) for c in costs.values()), sum(once.values())
    for name, c in costs.items():
        print(f"  per-model {name}: {sum(c.values()):7.1f} GPU-s over {len(c)} signatures")
    print(f"per-model baseline {baseline:.1f} GPU-s over {sum(map(len, costs.values()))} signatures, Dooly "
          f"{dooly:.1f} GPU-s over {len(once)}: {dooly / baseline if baseline else float('nan'):.3f}x"
          + ("" if finished else " (incomplete: run again)"))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({"models": list(stores), "per_model_gpu_s": {
            n: sum(c.values()) for n, c in costs.items()}, "baseline_gpu_s": baseline, "dooly_gpu_s": dooly,
            "signatures": {n: len(c) for n, c in costs.items()}, "distinct": len(once), "complete": finished}))


if __name__ == "__main__":
    main()
