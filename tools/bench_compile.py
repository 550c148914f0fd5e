"""Compile every zoo config in one process and print seconds per model (the first pays torch's warm-up)."""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

start = time.perf_counter()
from dooly.compile import compile_model  # noqa: E402
from dooly.config import load_config  # noqa: E402

print(f"{'import':<18} {time.perf_counter() - start:6.2f} s")
total = 0.0
for path in sorted((ROOT / "configs").glob("*.json")):
    t = time.perf_counter()
    graph = compile_model(load_config(path))
    dt = time.perf_counter() - t
    total += dt
    print(f"{path.stem:<18} {dt:6.2f} s  ({len(graph.ops)} IR ops, fields pinned: "
          f"{', '.join(graph.meta.pinned_fields) or '-'})")
print(f"{'zoo':<18} {total:6.2f} s")
