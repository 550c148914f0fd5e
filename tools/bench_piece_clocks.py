"""Does a compiled piece run slower inside a long step than in its benchmark? Times one model's layer piece (on the
GPU) as `dooly profile` does (`dooly.bench.timer.measure`: a short warm-up, then replays), and as a step runs it: a
burst of one launch per layer, back to back, after the GPU idled, the SM clock and power read every 20 ms
throughout. Prints, per token count, the ratio of the burst's per-launch time to the benchmark's, measured in one
run.

    python tools/bench_piece_clocks.py data/vllm-ir/llama-3.1-8b.ir --out out/piece_clocks.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dooly.bench.timer import measure
from dooly.bench.vllm_engine import Clocks
from dooly.compile import load_model
from dooly.passes import codegen
from dooly.passes.pieces import piece_uses
from dooly.profile import load

TOKENS = (128, 512, 2048)
BURSTS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    graph = load_model(args.ir)
    layer = max((u for u in piece_uses(graph, "FLASH_ATTN") if u.signature.family == "piece"), key=lambda u: u.count)
    folder = Path(tempfile.mkdtemp())
    module = load(codegen.write([layer.signature], folder)[layer.signature.hash])
    rows = []
    for tokens in TOKENS:
        point = {"M": tokens}
        bench = measure(lambda: module.make_inputs(point, "cuda"), module.run, "cuda").stats()
        sets = [module.make_inputs(point, "cuda") for _ in range(4)]
        bursts = []
        origin = time.perf_counter()
        clocks = Clocks(origin)
        for _ in range(BURSTS):
            time.sleep(0.3)  # idle, as the engine is between arrivals
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter() - origin
            start.record()
            for i in range(layer.count):
                module.run(*sets[i % len(sets)])
            end.record()
            torch.cuda.synchronize()
            bursts.append((t, start.elapsed_time(end) * 1e3 / layer.count))
        readings = clocks.stop()
        per_launch = statistics.median(us for _, us in bursts)
        sm = [s for t, s, _ in readings if any(b <= t <= b + 0.2 for b, _ in bursts)]
        rows.append({"tokens": tokens, "benchmark_median_us": bench.median_us, "burst_median_us": per_launch,
                     "ratio": per_launch / bench.median_us, "launches": layer.count, "bursts": bursts,
                     "clocks": readings, "sm_mhz_in_bursts": sorted(sm)})
        print(f"M={tokens:5d}: benchmark {bench.median_us:8.1f} us, in a burst of {layer.count} "
              f"{per_launch:8.1f} us ({per_launch / bench.median_us:.3f}x); SM clock in bursts "
              f"{min(sm, default=0):.0f}-{max(sm, default=0):.0f} MHz", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ir": str(args.ir), "piece": layer.signature.hash, "gpu":
                                    torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
