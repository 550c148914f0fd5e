"""`python -m dooly.compile CONFIG`: capture a model's serving step, label its dims, collapse its layers, dump the IR.

Writes `model.ir` (annotated text) and `model.json` under --out (default `out/<model>/`), and prints a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from .config import MAX_LAYERS, ModelConfig, load_config
from .errors import DoolyError, command
from .ir import Graph, dumps
from .ir.graph import IRError
from .ir.verify import verify
from .passes.pipeline import compile_model

GOLDEN = Path("golden")  # --update-golden runs in a checkout: its golden IRs and its zoo
ZOO = Path("configs")
HEADER = "Dooly IR of one serving step. Regenerate: python -m dooly.compile --update-golden"


def _source_digest() -> str:
    """Digest of the code that decides the IR: a change to it invalidates every cached IR."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    sources = [pkg / "config.py", pkg / "transformers_engine.py", *pkg.glob("capture/*.py"), *pkg.glob("ir/*.py"),
               *pkg.glob("passes/*.py")]
    for path in sorted(sources):
        h.update(path.read_bytes())
    return h.hexdigest()


def cached_compile(cfg: ModelConfig, frontend: str = "transformers", dtype: str = "bf16", tp: int = 1) -> Graph:
    """`compile_model`, remembered in $DOOLY_CACHE (default ~/.cache/dooly) by config, options, versions, code."""
    import torch
    import transformers

    key = json.dumps([cfg.data, frontend, dtype, tp, torch.__version__, transformers.__version__, _source_digest()],
                     sort_keys=True)
    cache = Path(os.environ.get("DOOLY_CACHE", Path.home() / ".cache" / "dooly")) / "ir"
    path = cache / f"{cfg.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    try:
        graph = Graph.from_json(json.loads(path.read_text()))
        verify(graph)
        return graph
    except (OSError, ValueError, RecursionError, DoolyError):  # none yet, or one cut short or edited: compile it
        pass
    graph = compile_model(cfg, frontend, dtype, tp)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(graph.dumps_json())
    tmp.replace(path)
    return graph


def load_model(path: Path) -> Graph:
    """A model for the later stages: a compiled IR (`.ir` text or `model.json`), or a config.json to compile."""
    path = Path(path)
    if path.suffix == ".ir":
        from .ir.text import ParseError, loads

        try:
            graph = loads(path.read_text())
        except (OSError, UnicodeDecodeError, ParseError) as e:
            raise DoolyError(f"{path}: not a readable IR dump ({e})") from None
        return _verified(graph, path)
    if path.exists() and path.is_file() and path.stat().st_size > 0:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        except (ValueError, RecursionError) as e:  # a number too long for Python, or nesting too deep
            raise DoolyError(f"{path}: unreadable JSON ({e})") from None
        if isinstance(data, dict) and "ops" in data and "ir_version" in data:
            try:
                graph = Graph.from_json(data)
            except IRError as e:
                raise DoolyError(f"{path}: not a readable IR ({e})") from None
            return _verified(graph, path)
    return cached_compile(load_config(path))


def _verified(graph: Graph, path: Path) -> Graph:
    try:
        verify(graph)
    except IRError as e:
        raise DoolyError(f"{path}: not a valid IR ({e})") from None
    return graph


def label_histogram(graph: Graph) -> Counter:
    return Counter(d.kind for op in graph.ops for t in op.tensors() for d in t.dims())


def summary(graph: Graph, seconds: float, written: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    per_step = sum(op.count for op in graph.ops if op.runs_per == "step")
    per_request = sum(op.count for op in graph.ops if op.runs_per == "request")
    meta = graph.meta
    head = Table(title=f"{graph.model}: one serving step ({meta.engine} {meta.engine_version}, "
                       f"{meta.attention}, {meta.dtype})", show_header=False)
    head.add_row("architecture", f"{meta.architecture} ({meta.layers} layers)")
    head.add_row("layer groups", ", ".join(f"{len(g.layers)} traced x{g.count}" for g in meta.layer_groups))
    head.add_row("IR ops", f"{len(graph.ops)} ({len({op.name for op in graph.ops})} distinct op names)")
    head.add_row("kernels per step", f"{per_step} + {per_request} per request")
    hist = label_histogram(graph)
    head.add_row("dim labels", "  ".join(f"{k} {hist.get(k, 0)}" for k in ("config", "request", "mix", "const")))
    head.add_row("request symbols", " ".join(meta.request_symbols))
    head.add_row("compiled in", f"{seconds:.1f} s")
    for path in written:
        head.add_row("wrote", str(path))
    console.print(head)
    ops = Counter()
    for op in graph.ops:
        ops[op.name] += op.count
    table = Table(title="kernels per step by op")
    table.add_column("op")
    table.add_column("count", justify="right")
    for name, n in ops.most_common(12):
        table.add_row(name, str(n))
    console.print(table)


def write(graph: Graph, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.ir").write_text(dumps(graph, HEADER))
    (out / "model.json").write_text(graph.dumps_json() + "\n")
    return [out / "model.ir", out / "model.json"]


def update_golden(paths: list[Path]) -> None:
    GOLDEN.mkdir(exist_ok=True)
    for path in paths:
        cfg = load_config(path)
        (GOLDEN / f"{cfg.name}.ir").write_text(dumps(compile_model(cfg), HEADER))
        print(f"golden/{cfg.name}.ir")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dooly.compile", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="*", type=Path, help="HF config.json file(s)")
    parser.add_argument("--out", type=Path, help="output folder (default: out/<model>)")
    parser.add_argument("--json", action="store_true", help="print the IR as JSON instead of the summary")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: the IR of one rank")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    parser.add_argument("--frontend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--max-layers", type=int, default=MAX_LAYERS,
                        help=f"refuse a config of more decoder layers (default {MAX_LAYERS})")
    parser.add_argument("--update-golden", action="store_true",
                        help="regenerate golden/<model>.ir in this folder (a checkout) for the given configs "
                             "(default: its configs/*.json)")
    args = parser.parse_args(argv)
    if args.update_golden:
        if os.environ.get("PYTHONHASHSEED") != "0":  # the seed the goldens are written under (tests/conftest.py)
            os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONHASHSEED": "0"})
        update_golden(args.config or sorted(ZOO.glob("*.json")))
        return 0
    if len(args.config) != 1:
        parser.error("give one CONFIG (or --update-golden)")
    start = time.perf_counter()
    cfg = load_config(args.config[0], args.max_layers)
    graph = compile_model(cfg, args.frontend, args.dtype, args.tp)
    written = write(graph, args.out or Path("out") / cfg.name)
    if args.json:
        json.dump(graph.to_json(), sys.stdout, indent=1, sort_keys=True)
        print()
    else:
        summary(graph, time.perf_counter() - start, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
