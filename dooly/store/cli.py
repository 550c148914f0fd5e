"""`dooly store info|export|import`: look into a latency store and move it between machines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import command
from .db import Store
from .portable import export, merge, read_export


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
    args = parser.parse_args(argv)
    if args.action == "import":
        rows = read_export(args.file)  # a bad file is refused before a store is made for it
        store = Store(args.store)
        print(f"imported {merge(store, rows, args.file)} new rows into {args.store}")
        return 0
    store = Store(args.store, readonly=True)
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
            spent = store.db.execute("SELECT COALESCE(SUM(gpu_seconds), 0) FROM sweeps WHERE environment = ?",
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
