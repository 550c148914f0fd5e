"""`dooly store info|export|import|recheck`: look into a latency store, move it between machines, and re-measure a
sample of its points on this GPU."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from ..errors import DoolyError, command
from ..limits import output_file
from .db import Store
from .portable import export, merge, read_export


def recheck(store: Store, env_name: str | None, points: int, seed: int) -> list[dict]:
    """Re-measure a seeded random sample of the stored points of one environment (default: the store's first) on
    this GPU: [{op, point, stored_us, again_us, deviation}], printed as they come."""
    # the GPU side of Dooly, imported only by the one subcommand that runs kernels
    import torch

    from ..bench.timer import measure
    from ..environment import BACKENDS, DEFAULT_BACKEND, sdpa_context
    from ..passes import codegen
    from ..passes.canonicalize import Signature
    from ..profile import load

    if not torch.cuda.is_available():
        raise DoolyError("dooly store recheck re-measures on a CUDA GPU, and this machine has none")
    if not store.environments():
        raise DoolyError(f"{store.path} has no environment to recheck")
    env = store.environment(env_name or store.environments()[0].name)[1]
    backend = next((b for b in BACKENDS.values() if b.attention == env.attention_backend), None)
    if backend is None:
        raise DoolyError(f"environment {env.name!r}: attention backend {env.attention_backend!r} is none of "
                         f"{', '.join(BACKENDS)}, so its attention cannot be run again here")
    rows = store.db.execute(
        "SELECT m.signature, m.point, m.median_us, g.family, g.axes, g.canonical FROM measurements m JOIN signatures g"
        " ON g.hash = m.signature JOIN environments e ON e.id = m.environment WHERE e.name = ? AND m.status = 'ok'",
        (env.name,)).fetchall()
    sample = random.Random(seed).sample(rows, min(points, len(rows)))
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
    return out


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly store", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="environments and row counts")
    info.add_argument("store", type=Path)
    out = sub.add_parser("export", help="write the store as JSON lines")
    out.add_argument("store", type=Path)
    out.add_argument("file", type=Path)
    into = sub.add_parser("import", help="merge a JSON-lines export into a store (created if missing)")
    into.add_argument("store", type=Path)
    into.add_argument("file", type=Path)
    again = sub.add_parser("recheck", help="re-measure a random sample of stored points on this GPU: repeatability")
    again.add_argument("store", type=Path)
    again.add_argument("--env", help="environment (default: the store's first)")
    again.add_argument("--points", type=int, default=30, help="how many stored points to re-measure")
    again.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    again.add_argument("--out", type=Path, help="write the re-measured points as JSON here")
    args = parser.parse_args(argv)
    if args.action == "import":
        rows = read_export(args.file)  # a bad file is refused before a store is made for it
        store = Store(args.store)
        print(f"imported {merge(store, rows, args.file)} new rows into {args.store}")
        return 0
    store = Store(args.store, readonly=True)
    if args.action == "recheck":
        if args.points < 1:
            raise DoolyError("--points must be at least 1")
        out_path = args.out and output_file(args.out, "--out")
        rows = recheck(store, args.env, args.points, args.seed)
        deviations = sorted(row["deviation"] for row in rows)
        if deviations:
            print(f"{len(deviations)} points: median deviation {100 * statistics.median(deviations):.2f}%, "
                  f"p90 {100 * deviations[min(len(deviations) - 1, int(0.9 * len(deviations)))]:.2f}%")
        if out_path:
            out_path.write_text(json.dumps(rows, indent=1))
        return 0
    if args.action == "info":
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.store}")
        for col in ("environment", "GPU", "torch / CUDA", "engine", "dtype", "attention", "signatures",
                    "points", "GPU-s"):
            table.add_column(col)
        for env in store.environments():
            env_id, _ = store.environment(env.name)
            sigs, points = store.db.execute(
                "SELECT COUNT(DISTINCT signature), COUNT(*) FROM measurements WHERE environment = ? AND "
                "status = 'ok'", (env_id,)).fetchone()
            spent = store.db.execute("SELECT COALESCE(SUM(gpu_s), 0) FROM sweeps WHERE environment = ?",
                                     (env_id,)).fetchone()[0]
            table.add_row(env.name, env.gpu, f"{env.torch} / {env.cuda}", f"{env.engine} {env.engine_version}",
                          env.dtype, env.attention_backend, str(sigs), str(points), f"{spent:.1f}")
        console = Console()
        console.print(table)
        console.print("rows: " + ", ".join(f"{k} {v}" for k, v in store.counts().items()))
    else:
        print(f"wrote {export(store, args.file)} rows to {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
