"""Repeatability of stored measurements: re-measure a random sample of stored points on this GPU.

Prints the median and p90 relative deviation of the new medians from the stored ones (target: median <= 3%).

    python tools/bench_repeat.py --store data/h100.sqlite [--env NAME] [--points 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from dooly.bench.timer import measure
    from dooly.environment import BACKENDS, DEFAULT_BACKEND, backend_name, sdpa_context
    from dooly.passes import codegen
    from dooly.passes.canonicalize import Signature
    from dooly.profile import load
    from dooly.store import Store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--env", help="environment (default: the store's first)")
    parser.add_argument("--points", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    store = Store(args.store)
    env = store.environment(args.env or store.environments()[0].name)[1]
    backend = BACKENDS[backend_name(env.attention_backend)]
    rows = store.db.execute(
        "SELECT m.signature, m.point, m.median_us, g.family, g.axes, g.canonical FROM measurements m JOIN signatures g"
        " ON g.hash = m.signature JOIN environments e ON e.id = m.environment WHERE e.name = ? AND m.status = 'ok'",
        (env.name,)).fetchall()
    sample = random.Random(args.seed).sample(rows, min(args.points, len(rows)))
    out, folder = [], Path(tempfile.mkdtemp())
    for r in sample:
        sig = Signature(r["signature"], r["family"], tuple(json.loads(r["axes"])), json.loads(r["canonical"]))
        module = load(codegen.write([sig], folder)[sig.hash])
        point = json.loads(r["point"])
        with sdpa_context(backend if sig.family == "attention" else DEFAULT_BACKEND):
            again = measure(lambda: module.make_inputs(point, "cuda"), module.run, "cuda").stats().median_us
        out.append({"op": sig.op, "point": point, "stored_us": r["median_us"], "again_us": again,
                    "deviation": abs(again - r["median_us"]) / r["median_us"]})
        print(f"{sig.op:40s} {json.dumps(point):28s} stored {r['median_us']:10.2f} µs  again {again:10.2f} µs  "
              f"{100 * out[-1]['deviation']:5.1f}%", flush=True)
    devs = sorted(o["deviation"] for o in out)
    print(f"{len(devs)} points: median deviation {100 * statistics.median(devs):.2f}%, "
          f"p90 {100 * devs[min(len(devs) - 1, int(0.9 * len(devs)))]:.2f}%")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
