"""What a new attention shape costs the engine's forward, model by model: the same decode workload served with
the default SDPA (cuDNN on Hopper, which builds a plan for every new shape) and with the efficient kernel (no
plans), on models from the host calibration's tiny synthetic one to a full-size zoo model, so that what a full
model adds to the plan shows (run on the GPU machine).

    python tools/engine_plan_cost.py --out OUT [--models llama-3.2-1b tiny llama-3.2-1b:1 tiny-32x64]

A model is `tiny` (the host calibration's synthetic Llama, one layer), `tiny-HxD` (the same with H heads of D),
or a zoo name with an optional `:LAYERS`. Printed and written per model: the median forward of the decode steps
on each backend, and their difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORKLOAD = [(0.0, 1024, 24)] * 16  # 16 requests decoding at ~16k keys a step
BACKENDS = {"default": None, "efficient": "EFFICIENT_ATTENTION"}


def model(spec: str) -> tuple[dict, int | None]:
    from dooly.bench.host import synthetic
    from tools.validate import zoo

    if spec.startswith("tiny"):
        config = synthetic("llama", 1)
        if "-" in spec:
            heads, dim = map(int, spec.split("-")[1].split("x"))
            config.update(num_attention_heads=heads, num_key_value_heads=heads, head_dim=dim)
        return config, None
    name, _, layers = spec.partition(":")
    return zoo(name), int(layers) if layers else None


def decode_forward_ms(spec: str, kernel: str | None) -> float:
    from validate import warm_engine

    config, layers = model(spec)
    with warm_engine(config, layers=layers, sdpa_kernel=kernel) as engine:
        engine.run(WORKLOAD)
        steps, _ = engine.run(WORKLOAD)
    decode = [s.forward_s for s in steps if set(s.queries) == {1}]
    return statistics.median(decode) * 1e3 if decode else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["llama-3.2-1b", "tiny", "llama-3.2-1b:1", "tiny-32x64"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.models:
        ms = {backend: decode_forward_ms(spec, kernel) for backend, kernel in BACKENDS.items()}
        rows.append({"model": spec, "decode_forward_ms": ms, "plan_ms": ms["default"] - ms["efficient"]})
        (args.out / "engine_plan_cost.json").write_text(json.dumps(rows, indent=1))  # a model at a time
        print(f"{spec}: decode forward {ms['default']:.1f} ms default, {ms['efficient']:.1f} ms efficient: "
              f"{rows[-1]['plan_ms']:.1f} ms more", flush=True)


if __name__ == "__main__":
    main()
