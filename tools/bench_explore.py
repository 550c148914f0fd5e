"""How fast `dooly explore` searches: a grid of 1,008 configurations, each serving 2,000 requests.

    python tools/bench_explore.py [--store data/h100.sqlite] [--model configs/llama-3.1-8b.json] [--workers 2]

The grid: the store's three attention backends x both schedulers x CUDA graphs on/off x async batching on/off x
7 request limits x 6 token budgets; the workload and SLO of the README's example. Prints the seconds the search
took (predictors loaded, every configuration simulated or stopped once it lost its SLO), the configurations per
second, how many ran to the end, and the machine's load while it ran. Target: minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRID = ("backend=sdpa,sdpa-efficient,sdpa-math;scheduler=cb,vllm;cuda_graphs=off,on;async_batching=off,on;"
        "max_seqs=8,16,32,64,128,256,512;max_tokens=512,1024,2048,4096,8192,16384")
WORKLOAD = "poisson:rate=2,n=2000,prompt=lognormal:512:0.8,output=lognormal:128:0.5"
SLO = "ttft_p90=1s,tpot_p90=200ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "h100.sqlite")
    parser.add_argument("--model", type=Path, default=ROOT / "configs" / "llama-3.1-8b.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "dooly", "explore", str(args.model), "--store", str(args.store),
                   "--synthetic", WORKLOAD, "--slo", SLO, "--grid", GRID, "--workers", str(args.workers),
                   "--out", out, "--json"]
        load = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        if done.returncode:
            sys.exit(done.stderr)
        report = json.loads(done.stdout)
        rows = [json.loads(line) for line in Path(out, "results.jsonl").read_text().splitlines()[1:]]
    full = sum("steps" in r for r in rows)
    print(f"{report['configurations']} configurations x {report['requests']} requests, {args.workers} workers: "
          f"{seconds:.0f} s ({report['configurations'] / seconds:.1f} configurations/s); {full} simulated to the "
          f"end, {len(rows) - full} stopped once they missed the SLO; {report['meet_slo']} meet it, "
          f"{len(report['front'])} on the front; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
