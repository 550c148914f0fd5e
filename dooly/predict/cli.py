"""`dooly fit` and `dooly predict`: the regressors over a store, and the latency of engine steps.

    dooly fit --store data/h100.sqlite
    dooly predict configs/llama-3.1-8b.json --store data/h100.sqlite --batch "prefill:512x4,decode:128@2048"
    dooly predict configs/llama-3.1-8b.json --store data/h100.sqlite --batch-file steps.jsonl --json

A batch spec lists groups of requests: `prefill:QxN` is N requests with Q new tokens and nothing cached,
`prefill:QxN+P` the same with P tokens already cached (a later chunk of a long prompt), `decode:N@C` is N requests
each decoding one token with C keys (its context, the new token included). A batch file holds one batch a line,
as a JSON list of [query_tokens, kv_tokens] per request.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from ..errors import DoolyError, command
from ..limits import Limits, add_limit_argument, parse_json, parse_limits, read_lines

_GROUP = re.compile(r"prefill:([0-9]+)x([0-9]+)(?:\+([0-9]+))?|decode:([0-9]+)@([0-9]+)")
LIMITS = ("tokens-per-step", "requests-per-step", "context-tokens", "requests")


def parse_batch(spec: str, limits: Limits | None = None) -> list[tuple[int, int]]:
    """`prefill:512x4,decode:128@2048` -> [(query tokens, keys)] per request, checked against `limits` before the
    groups are expanded."""
    limits = limits or Limits()
    groups = []  # (query tokens, keys, requests)
    for part in spec.replace(" ", "").split(","):
        m = _GROUP.fullmatch(part)
        if not m:
            raise DoolyError(f"bad batch group {part!r}: expected prefill:QxN, prefill:QxN+PAST or decode:N@CONTEXT")
        try:
            q, n, past, decodes, context = (int(x) if x else None for x in m.groups())
        except ValueError:  # more digits than Python converts
            raise DoolyError(f"bad batch group {part[:40]!r}...: a number too long to read") from None
        groups.append((q, q + (past or 0), n) if q is not None else (1, context, decodes))
    where = f"batch {spec[:80]!r}"
    limits.check("requests-per-step", sum(n for _, _, n in groups), f"{where}: requests in one step")
    limits.check("tokens-per-step", sum(q * n for q, _, n in groups), f"{where}: new tokens in one step")
    limits.check("context-tokens", max(keys for _, keys, _ in groups), f"{where}: keys of one request")
    batch = [(q, keys) for q, keys, n in groups for _ in range(n)]
    if not batch or any(q < 1 for q, _ in batch):
        raise DoolyError(f"batch {spec[:80]!r} has no requests, or a request with no new token")
    return batch


def read_batches(path: Path, limits: Limits | None = None) -> list[list[tuple]]:
    """The batch file's batches, read a line at a time and refused once their requests pass the `requests` limit;
    `Batches.of` checks each request."""
    limits = limits or Limits()
    batches, requests = [], 0
    for n, line in read_lines(path, "batch file"):
        if not line.strip():
            continue
        rows = parse_json(line, f"{path}: line {n}")
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise DoolyError(f"{path}: line {n}: expected a list of [query_tokens, kv_tokens] pairs")
        requests += len(rows)
        limits.check("requests", requests, f"{path}: requests up to line {n}")
        batches.append([tuple(r) for r in rows])
    if not batches:
        raise DoolyError(f"{path}: no batches")
    return batches


def breakdown(p, i: int) -> list[dict]:
    """The ops of batch `i` (summed over layers and signatures) and the engine's host time, largest first: their
    `us` add up to the step's total."""
    ops: dict[tuple[str, str], list] = {}
    for name, scope, count, us in p.ops:
        row = ops.setdefault((name, scope), [0.0, 0.0])
        row[0] += count
        row[1] += float(us[i])
    rows = [{"op": name, "scope": scope, "count": round(c, 3), "us": us} for (name, scope), (c, us) in ops.items()]
    parts = p.parts
    host = {"prepare batch": parts.prepare_us[i], "attention plans": parts.plans_us[i],
            "launch-bound": parts.launch_bound_us[i], "read back tokens": parts.update_us[i],
            "rest of step": parts.rest_us[i]}
    rows += [{"op": what, "scope": "host", "count": 1, "us": float(us)} for what, us in host.items() if us > 0]
    return sorted(rows, key=lambda r: -r["us"])


@command
def fit_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly fit", description="fit (or reload) the regressors of a store and "
                                     "print their held-out error")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--backend", help="only this backend's environment (default: every environment)")
    parser.add_argument("--refit", action="store_true", help="fit again even when saved models are current")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from ..environment import environment_name
    from ..store import Store
    from .opmodel import load_or_fit, model_dir

    store = Store(args.store, readonly=True)
    envs = [environment_name(store, args.backend)] if args.backend else [e.name for e in store.environments()]
    if not envs:
        raise DoolyError(f"{args.store}: the store has no measurements")
    results = {}
    for env in envs:
        model, fitted = load_or_fit(store, env, args.refit)
        results[env] = {"fitted": fitted, "saved": str(model_dir(store.path, env)), "families": model.cv}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for env, r in results.items():
        table = Table(title=f"{env}\n({'fitted now' if r['fitted'] else 'reloaded'}; saved in {r['saved']})")
        for col in ("family", "signatures", "points", "LightGBM 5-fold MAPE", "unseen-signature MAPE",
                    "interpolation leave-one-out MAPE"):
            table.add_column(col, justify="left" if col == "family" else "right")
        for family, cv in r["families"].items():
            table.add_row(family, str(cv["signatures"]), str(cv["points"]), pct(cv["regressor_mape"]),
                          pct(cv.get("unseen_signature_mape")), pct(cv["interpolation_mape"]))
        console.print(table)
    console.print("LightGBM predicts signatures the store never measured (the unseen-signature column: each "
                  "signature's points predicted with none of them fitted, up to five groups of signatures in turn); "
                  "measured ones are interpolated in their own grid (the leave-one-out column: each interior point "
                  "predicted from its neighbours).")
    return 0


@command
def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly predict", description="predicted latency of engine steps",
                                     epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", type=Path, help="a config.json, or a compiled IR (.ir, model.json)")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--backend", help="attention backend whose measurements to use (default: sdpa)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--batch", help='e.g. "prefill:512x4,decode:128@2048"')
    what.add_argument("--batch-file", type=Path, help="JSON lines, each a list of [query_tokens, kv_tokens]")
    parser.add_argument("--top", type=int, default=12, help="ops to show per step")
    parser.add_argument("--json", action="store_true", help="one JSON object per batch, a line each")
    add_limit_argument(parser, LIMITS)
    args = parser.parse_args(argv)
    limits = parse_limits(args.limit, LIMITS)
    if args.top < 0:
        raise DoolyError("--top must be 0 or more")
    from ..compile import load_model
    from ..environment import environment_name
    from ..store import Store
    from .step import Batches, load_predictor

    batches = [parse_batch(args.batch, limits)] if args.batch is not None else read_batches(args.batch_file, limits)
    b = Batches.of(batches, limits)
    graph = load_model(args.config)
    store = Store(args.store, readonly=True)
    env = environment_name(store, args.backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictor = load_predictor(graph, store, env)
    p = predictor.predict(b)
    if p.extrapolated:
        print(f"warning: extrapolating beyond the measured range of {len(p.extrapolated)} op signature(s): "
              f"{'; '.join(p.extrapolated)}", file=sys.stderr)
    if predictor.host is None:
        print(f"warning: {env} has no host calibration: GPU time only", file=sys.stderr)
    if args.json:
        for i in range(b.n):
            print(json.dumps({"total_us": float(p.parts.total_us[i]), "gpu_us": float(p.parts.gpu_us[i]),
                              "ops": breakdown(p, i)}))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if b.n > 1:
        table = Table(title=f"{graph.model}: {b.n} steps", caption=env)
        for col in ("step", "requests", "tokens", "keys", "GPU ms", "total ms"):
            table.add_column(col, justify="right")
        step, _ = predictor.symbols(b)
        for i in range(b.n):
            table.add_row(str(i), str(step["R"][i]), str(step["T"][i]), str(step["K"][i]),
                          f"{p.parts.gpu_us[i] / 1e3:.3f}", f"{p.parts.total_us[i] / 1e3:.3f}")
        console.print(table)
        console.print(f"mean step {np.mean(p.parts.total_us) / 1e3:.3f} ms")
        return 0
    rows = breakdown(p, 0)
    total_us = p.parts.total_us[0]
    table = Table(title=f"{graph.model}: one step of {len(batches[0])} requests, {int(b.queries.sum())} tokens",
                  caption=env)
    for col in ("op", "scope", "count", "µs", "share"):
        table.add_column(col, justify="left" if col in ("op", "scope") else "right", overflow="fold")
    for r in rows[:args.top]:
        table.add_row(r["op"], r["scope"], f"{r['count']:g}", f"{r['us']:.1f}", f"{100 * r['us'] / total_us:.1f}%")
    if len(rows) > args.top:
        rest = sum(r["us"] for r in rows[args.top:])
        table.add_row(f"({len(rows) - args.top} more)", "", "", f"{rest:.1f}", f"{100 * rest / total_us:.1f}%")
    console.print(table)
    console.print(f"total {total_us / 1e3:.3f} ms (GPU {p.parts.gpu_us[0] / 1e3:.3f} ms; the rest is the engine's "
                  f"host time, with a plan stall for each attention shape new to the engine)")
    return 0
