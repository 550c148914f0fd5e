"""`dooly transfer`: carry a store to a new GPU or environment: measure a few points there, predict the rest.

A target latency is the source's latency times a ratio, target / source. The ratio's prior is the two GPUs'
roofline times of the point (FLOPs at each GPU's peak, bytes at its bandwidth, plus a launch floor): a big
memory-bound kernel scales with bandwidth, a compute-bound one with FLOP/s, a launch-bound one by nothing. What
the prior misses (kernels that reach another share of the peaks, another kernel chosen for the same op) is
learned per op family from the calibration points: a Gaussian process over the point's size and intensity
regime, on the log of measured ratio over prior ratio.

The calibration points are chosen per op family and regime (launch-bound, memory-bound, compute-bound, or bound
differently on the two GPUs), in proportion to the points each has, and spread over each regime's sizes and op
shapes (farthest-point sampling from a seeded start), so that every family's ratio is pinned across its range.

    dooly transfer --store S --from ENV --to ENV --dry-run [--points-out F]   the points to measure on the target
    dooly transfer --store S --from ENV --to ENV                              write the rest, marked 'transferred'
    dooly transfer --store S --from sdpa --to sdpa-efficient --rehearse       check it where both were measured
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bench.roofline import LAUNCH_S, work
from ..environment import resolve_environment
from ..errors import DoolyError, command
from ..passes.canonicalize import Signature, _make
from ..store import Store
from ..store.db import BACKEND_FAMILIES, now, point_key
from .opmodel import AXIS_FEATURES, FAMILIES

# Dense bf16 tensor-core FLOP/s and memory bandwidth from the vendors' data sheets, matched by name in the
# environment's GPU; only their ratios between two GPUs are used.
GPU_PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12),
             "L40S": (362e12, 0.864e12), "B200": (2250e12, 8.0e12), "A10G": (125e12, 0.6e12)}
COMPUTE_FAMILIES = ("gemm", "attention", "moe")
LAUNCH_BOUND_S = 4 * LAUNCH_S  # below this roofline time a kernel is mostly its launch
REGIMES = ("launch", "memory", "compute", "crossing")
MIN_PER_STRATUM = 3
GP_SEARCH_STEPS = 40


def gpu_peaks(gpu: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of a GPU named like `NVIDIA H100 80GB HBM3`, or None for a GPU not in GPU_PEAKS."""
    name = gpu.upper().replace("-", " ")
    return next((peaks for key, peaks in GPU_PEAKS.items() if key in name), None)


@dataclass(frozen=True)
class Candidate:
    """One point to carry over: a source signature at a request point, and its counterpart in the target."""

    source: str  # signature hash in the source environment
    target: str  # signature hash in the target environment (differs for backend-dependent families)
    family: str
    axes: tuple[str, ...]
    canonical: dict  # the source signature's
    point: dict[str, int]
    source_us: float
    source_gpu_s: float = 0.0  # what measuring it cost on the source GPU

    @property
    def key(self) -> tuple[str, str]:
        return self.target, point_key(self.point)


class Roofline:
    """Roofline times of a point on the source and the target GPU (seconds), and the prior ratio between them."""

    def __init__(self, source_gpu: str, target_gpu: str):
        source, target = gpu_peaks(source_gpu), gpu_peaks(target_gpu)
        if source is None or target is None or source_gpu == target_gpu:
            source = target = GPU_PEAKS["H100"]  # unknown or same GPU: a prior ratio of 1, all learned
        self.source, self.target = source, target

    def times(self, c: Candidate, peaks: tuple[float, float]) -> tuple[float, float]:
        flops, moved = work(c.canonical, c.point)
        compute = flops / peaks[0] if c.family in COMPUTE_FAMILIES else 0.0
        return compute, moved / peaks[1]

    def regime(self, c: Candidate) -> str:
        (cs, ms), (ct, mt) = self.times(c, self.source), self.times(c, self.target)
        if max(cs, ms, ct, mt) < LAUNCH_BOUND_S:
            return "launch"
        if (cs > ms) != (ct > mt):
            return "crossing"
        return "compute" if cs > ms else "memory"

    def prior(self, c: Candidate) -> float:
        return (max(self.times(c, self.target)) + LAUNCH_S) / (max(self.times(c, self.source)) + LAUNCH_S)


def features(c: Candidate, roofline: Roofline) -> list[float]:
    """What the ratio depends on: the kernel's size (its measured time), how compute-bound it is, its request
    sizes, and for attention its head configuration."""
    compute, memory = roofline.times(c, roofline.source)
    intensity = max(-10.0, math.log2(compute / memory)) if compute and memory else -10.0
    shape = c.canonical["inputs"][0]["shape"] if c.family == "attention" else []
    heads = [math.log2(shape[-3]), math.log2(shape[-1])] if len(shape) >= 3 and isinstance(shape[-1], int) \
        and isinstance(shape[-3], int) else [0.0, 0.0]
    return [math.log2(c.source_us), intensity, *[math.log2(1 + c.point.get(a, 0)) for a in AXIS_FEATURES],
            float(c.point.get("dist", 0)), *heads]


def _standardise(x: np.ndarray) -> np.ndarray:
    spread = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(spread > 0, spread, 1.0)


def choose_calibration(candidates: list[Candidate], budget: int, roofline: Roofline, seed: int = 0) -> list[int]:
    """Indices of at most `budget` candidates to measure on the target: shared out over (family, regime) strata
    in proportion to their points (at least MIN_PER_STRATUM each while the budget lasts), then, inside each
    stratum, farthest-point sampling in the standardised feature space from a seeded random start."""
    if budget < 1 or not candidates:
        return []
    strata: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(candidates):
        strata.setdefault((c.family, roofline.regime(c)), []).append(i)
    order = sorted(strata, key=lambda s: (FAMILIES.index(s[0]) if s[0] in FAMILIES else len(FAMILIES),
                                          REGIMES.index(s[1])))
    share = {s: min(len(strata[s]), MIN_PER_STRATUM) for s in order}
    while sum(share.values()) > budget:  # too small a budget for the floor: the largest strata keep theirs
        smallest = min((s for s in order if share[s]), key=lambda s: (len(strata[s]), order.index(s)))
        share[smallest] -= 1
    left = budget - sum(share.values())
    room = {s: len(strata[s]) - share[s] for s in order}
    total = sum(room.values())
    if total and left > 0:
        extra = {s: int(left * room[s] / total) for s in order}
        for s in sorted(order, key=lambda s: -(left * room[s] / total - extra[s]))[:left - sum(extra.values())]:
            extra[s] += 1
        share = {s: share[s] + min(extra[s], room[s]) for s in order}
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for s in order:
        members = strata[s]
        if not share[s]:
            continue
        x = _standardise(np.array([features(candidates[i], roofline) for i in members]))
        picked = [int(rng.integers(len(members)))]
        distance = np.linalg.norm(x - x[picked[0]], axis=1)
        while len(picked) < share[s]:
            picked.append(int(np.argmax(distance)))
            distance = np.minimum(distance, np.linalg.norm(x - x[picked[-1]], axis=1))
        chosen += [members[i] for i in picked]
    return sorted(chosen)


class RatioModel:
    """target µs = source µs x prior ratio x 2^correction, the correction a Gaussian process per family over the
    calibration points' features (a family with too few calibration points takes their median correction)."""

    MIN_POINTS = 4

    def __init__(self, roofline: Roofline):
        self.roofline = roofline
        self.models: dict[str, tuple] = {}  # family -> (GP, feature columns used, their mean, their spread)
        self.offsets: dict[str, float] = {}
        self.calibration: dict[str, int] = {}

    def fit(self, candidates: list[Candidate], measured_us: list[float]) -> RatioModel:
        import warnings

        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        for family, members in _by_family(candidates).items():
            y = np.array([math.log2(measured_us[i] / (candidates[i].source_us * self.roofline.prior(candidates[i])))
                          for i in members])
            self.calibration[family] = len(members)
            self.offsets[family] = float(np.median(y))
            if len(members) < self.MIN_POINTS:
                continue
            x = np.array([features(candidates[i], self.roofline) for i in members])
            columns = np.flatnonzero(x.std(axis=0) > 0)  # a feature the family never varies tells it nothing
            mean, spread = x[:, columns].mean(axis=0), x[:, columns].std(axis=0)
            kernel = ConstantKernel(1.0, (1e-3, 1e2)) * RBF(np.ones(len(columns)), (1e-1, 1e2)) + \
                WhiteKernel(1e-3, (1e-6, 1.0))
            gp = GaussianProcessRegressor(kernel, normalize_y=True, optimizer=_bounded_search)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a length scale at its bound: a feature the ratio ignores
                gp.fit((x[:, columns] - mean) / spread, y)
            self.models[family] = (gp, columns, mean, spread)
        return self

    def predict(self, candidates: list[Candidate]) -> np.ndarray:
        """Target µs of each candidate."""
        out = np.empty(len(candidates))
        for family, members in _by_family(candidates).items():
            if family in self.models:
                gp, columns, mean, spread = self.models[family]
                x = np.array([features(candidates[i], self.roofline) for i in members])
                correction = gp.predict((x[:, columns] - mean) / spread)
            else:
                correction = np.full(len(members), self.offsets.get(family, 0.0))
            for i, r in zip(members, correction):
                out[i] = candidates[i].source_us * self.roofline.prior(candidates[i]) * 2.0 ** r
        return out


def _bounded_search(objective, start, bounds):
    """The GP's hyperparameter search, stopped after GP_SEARCH_STEPS: the ratio's smoothness needs no more."""
    from scipy.optimize import minimize

    found = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds,
                     options={"maxiter": GP_SEARCH_STEPS})
    return found.x, found.fun


def _by_family(candidates: list[Candidate]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        out.setdefault(c.family, []).append(i)
    return out


def target_signature(info: dict, target_attention: str) -> Signature:
    """The target environment's signature of a source signature (a store row): the same, but for families whose
    kernel depends on the attention backend, which is part of their signature."""
    canonical = info["canonical"]
    if info["family"] in BACKEND_FAMILIES and canonical.get("backend") != target_attention:
        return _make({**canonical, "backend": target_attention}, info["family"], tuple(info["axes"]))
    return Signature(info["hash"], info["family"], tuple(info["axes"]), canonical)


def candidates(store: Store, source: str, target_attention: str,
               swept: set[str] = frozenset()) -> tuple[list[Candidate], dict]:
    """Every measured point of `source` whose target signature is not in `swept` (those with a finished sweep
    usable in the target), and the target signatures by hash."""
    out, signatures = [], {}
    for sig_hash, rows in sorted(store.measured_points(source).items()):
        info = store.signature(sig_hash)
        sig = target_signature(info, target_attention)
        if sig.hash in swept:
            continue
        signatures[sig.hash] = sig
        for key, row in sorted(rows.items()):
            if row["status"] == "ok" and row["median_us"] and row["median_us"] > 0:
                out.append(Candidate(sig_hash, sig.hash, info["family"], tuple(info["axes"]), info["canonical"],
                                     json.loads(key), row["median_us"], row["gpu_s"]))
    return out, signatures


def target_rows(store: Store, target: str, cands: list[Candidate]) -> dict[tuple[str, str], dict]:
    """(target signature, point key) -> the target environment's own row there, for the candidates' signatures."""
    env_id, _ = store.environment(target)
    wanted = {c.target for c in cands}
    return {(r["signature"], r["point"]): dict(r) for r in store.db.execute(
        "SELECT signature, point, median_us, status, gpu_s FROM measurements WHERE environment = ?", (env_id,))
        if r["signature"] in wanted}


def _measured(row: dict | None) -> bool:
    return row is not None and row["status"] == "ok" and bool(row["median_us"]) and row["median_us"] > 0


@dataclass
class Plan:
    source: str
    target: str
    candidates: list[Candidate]
    signatures: dict[str, Signature]
    calibration: list[int]  # indices into candidates: the points to measure on the target
    roofline: Roofline

    def cost(self, indices) -> float:
        """What measuring these candidates cost on the source GPU: the estimate of what they cost on the target."""
        return sum(self.candidates[i].source_gpu_s for i in indices)


def plan(store: Store, source: str, target: str, fraction: float = 0.1, seed: int = 0, target_gpu: str | None = None,
         rehearsal: bool = False) -> Plan:
    """The points to carry from `source` to `target` and the calibration points among them. The target may be
    an environment not in the store yet when `target_gpu` names its GPU. A rehearsal keeps only the points the
    target has measured itself, so that the transfer can be checked against them."""
    if not 0 < fraction <= 1:
        raise DoolyError(f"the calibration budget must be a fraction in (0, 1], got {fraction}")
    _, source_env = store.environment(source)
    known = {e.name for e in store.environments()}
    if target not in known and target_gpu is None:
        store.environment(target)  # the error that names the store's environments
    if target == source:
        raise DoolyError("the source and target environments are the same")
    if target in known:
        _, target_env = store.environment(target)
        attention, gpu = target_env.attention_backend, target_gpu or target_env.gpu
        swept = set() if rehearsal else set(store.finished_sweeps(target))
    else:
        attention, gpu, swept = source_env.attention_backend, target_gpu, set()
    cands, signatures = candidates(store, source, attention, swept)
    if rehearsal:
        rows = target_rows(store, target, cands)
        cands = [c for c in cands if _measured(rows.get(c.key))]
    if not cands:
        raise DoolyError(f"nothing to carry from {source} to {target}: "
                         + ("the target measured none of the source's points" if rehearsal else
                            "every signature the source measured has a finished sweep in the target"))
    roofline = Roofline(source_env.gpu, gpu)
    chosen = choose_calibration(cands, int(fraction * len(cands)), roofline, seed)
    return Plan(source, target, cands, {c.target: signatures[c.target] for c in cands}, chosen, roofline)


def _errors(predicted: np.ndarray, measured: np.ndarray) -> dict:
    e = np.abs(predicted / measured - 1)
    return {"mape": float(e.mean()), "p90": float(np.percentile(e, 90))}


def rehearse(store: Store, p: Plan) -> dict:
    """Transfer from the calibration points alone and score it on every other point the target measured, next
    to copying the source's latency; with what the calibration cost against the target's full sweep."""
    rows = target_rows(store, p.target, p.candidates)
    measured = np.array([rows[c.key]["median_us"] for c in p.candidates])
    model = RatioModel(p.roofline).fit([p.candidates[i] for i in p.calibration], list(measured[p.calibration]))
    held = np.setdiff1d(np.arange(len(p.candidates)), p.calibration)
    predicted = model.predict([p.candidates[i] for i in held])
    copied = np.array([p.candidates[i].source_us for i in held])
    families = {}
    for family, members in _by_family([p.candidates[i] for i in held]).items():
        families[family] = {"points": len(members) + model.calibration.get(family, 0),
                            "calibration": model.calibration.get(family, 0),
                            "transfer": _errors(predicted[members], measured[held][members]),
                            "copy": _errors(copied[members], measured[held][members])}
    spent = [rows[c.key]["gpu_s"] or 0.0 for c in p.candidates]
    return {"source": p.source, "target": p.target, "points": len(p.candidates), "calibration": len(p.calibration),
            "transfer": _errors(predicted, measured[held]), "copy": _errors(copied, measured[held]),
            "families": families, "calibration_gpu_s": float(sum(spent[i] for i in p.calibration)),
            "full_gpu_s": float(sum(spent))}


def apply(store: Store, p: Plan) -> dict:
    """Fit the ratio model on every candidate the target measured itself (the calibration points at least) and
    write the others into the target as 'transferred' rows; a row the target measured (or skipped) is never
    replaced, a transferred one is replaced by the new transfer."""
    rows = target_rows(store, p.target, p.candidates)
    missing = [i for i in p.calibration if rows.get(p.candidates[i].key, {"status": "transferred"})["status"]
               == "transferred"]
    if missing:
        raise DoolyError(f"{len(missing)} of the {len(p.calibration)} calibration points are not measured in "
                         f"{p.target} yet: measure them first (--dry-run --points-out FILE lists them)")
    fitted = [i for i, c in enumerate(p.candidates) if _measured(rows.get(c.key))]
    model = RatioModel(p.roofline).fit([p.candidates[i] for i in fitted],
                                       [rows[p.candidates[i].key]["median_us"] for i in fitted])
    todo = [c for c in p.candidates if rows.get(c.key, {"status": "transferred"})["status"] == "transferred"]
    predicted = model.predict(todo) if todo else np.zeros(0)
    env_id, _ = store.environment(p.target)
    reason = json.dumps({"from": p.source, "model": "roofline prior x per-family GP correction",
                         "calibration_points": len(fitted)}, sort_keys=True)
    source_rows = {}
    with store.transaction():
        for sig_hash in {c.target for c in todo}:
            sig = p.signatures[sig_hash]
            store.db.execute("INSERT OR IGNORE INTO signatures (hash, op, family, axes, canonical) VALUES "
                             "(?,?,?,?,?)", (sig.hash, sig.op, sig.family, json.dumps(list(sig.axes)),
                                             json.dumps(sig.canonical, sort_keys=True)))
        for c, us in zip(todo, predicted):
            if c.source not in source_rows:
                source_rows[c.source] = store.points(c.source, p.source, c.family)
            src = source_rows[c.source][point_key(c.point)]
            ratio = float(us) / c.source_us
            store.db.execute(
                "INSERT INTO measurements (signature, environment, point, min_us, median_us, p90_us, std_us,"
                " repetitions, status, reason, measured_at, gpu_s) VALUES (?,?,?,?,?,?,?,0,'transferred',?,?,0)"
                " ON CONFLICT (signature, environment, point) DO UPDATE SET min_us = excluded.min_us,"
                " median_us = excluded.median_us, p90_us = excluded.p90_us, std_us = excluded.std_us,"
                " reason = excluded.reason, measured_at = excluded.measured_at"
                " WHERE measurements.status = 'transferred'",
                (c.target, env_id, point_key(c.point), src["min_us"] * ratio, float(us), src["p90_us"] * ratio,
                 src["std_us"] * ratio, reason, now()))
    return {"source": p.source, "target": p.target, "calibration": len(fitted), "written": len(todo),
            "kept": len(p.candidates) - len(todo), "families": model.calibration,
            "calibration_gpu_s": float(sum(rows[p.candidates[i].key]["gpu_s"] or 0.0 for i in fitted)),
            "source_gpu_s": p.cost(range(len(p.candidates)))}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dooly transfer", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                     epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--from", dest="source", required=True, help="environment (or backend name) to carry from")
    parser.add_argument("--to", dest="target", required=True, help="environment (or backend name) to carry to")
    parser.add_argument("--budget-fraction", type=float, default=0.1, help="share of the points measured on the "
                        "target (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="of the calibration points' choice")
    parser.add_argument("--gpu", help="the target's GPU, for a --dry-run before its environment is in the store")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="list the calibration points, write nothing")
    what.add_argument("--rehearse", action="store_true", help="both environments measured: score the transfer "
                      "from the calibration points against the target's own measurements")
    parser.add_argument("--points-out", type=Path, help="with --dry-run: write the calibration points as JSON lines")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.gpu and not args.dry_run:
        raise DoolyError("--gpu is for a --dry-run only: a transfer writes into an environment of the store")
    store = Store(args.store, create=False)
    source = resolve_environment(store, args.source)
    known = {e.name for e in store.environments()}
    target = args.target if args.gpu and args.target not in known else resolve_environment(store, args.target)
    p = plan(store, source, target, args.budget_fraction, args.seed, args.gpu, args.rehearse)
    if args.dry_run:
        result = _dry_run(p, args.points_out)
    elif args.rehearse:
        result = rehearse(store, p)
    else:
        result = apply(store, p)
    if args.json:
        print(json.dumps(result))
    else:
        _print(p, result, args)
    return 0


def _dry_run(p: Plan, points_out: Path | None) -> dict:
    strata: dict[str, list[int]] = {}
    for i in p.calibration:
        c = p.candidates[i]
        strata.setdefault(f"{c.family}/{p.roofline.regime(c)}", []).append(i)
    if points_out is not None:
        with open(points_out, "w") as f:
            for i in p.calibration:
                c = p.candidates[i]
                f.write(json.dumps({"signature": c.target, "op": c.canonical["op"], "family": c.family,
                                    "point": c.point, "canonical": p.signatures[c.target].canonical}) + "\n")
    return {"source": p.source, "target": p.target, "points": len(p.candidates), "calibration": len(p.calibration),
            "strata": {s: len(v) for s, v in sorted(strata.items())},
            "calibration_gpu_s": p.cost(p.calibration), "full_gpu_s": p.cost(range(len(p.candidates))),
            "points_out": None if points_out is None else str(points_out)}


def _print(p: Plan, result: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = f"{p.source}\n-> {p.target}"
    if args.dry_run:
        table = Table(title=f"{head}\ncalibration points to measure on the target")
        table.add_column("family/regime")
        table.add_column("points", justify="right")
        for stratum, n in result["strata"].items():
            table.add_row(stratum, str(n))
        console.print(table)
        console.print(f"{result['calibration']} of {result['points']} points "
                      f"({_pct(result['calibration'] / result['points'])}), about {result['calibration_gpu_s']:.1f} "
                      f"of the {result['full_gpu_s']:.1f} GPU-s the source's sweep of them cost"
                      + (f"; listed in {args.points_out}" if args.points_out else ""))
    elif args.rehearse:
        table = Table(title=f"{head}\nrehearsal: transfer from {result['calibration']} calibration points against "
                            f"the target's own {result['points']}")
        for col in ("family", "points", "calibration", "transfer MAPE", "p90", "copy MAPE", "p90 "):
            table.add_column(col, justify="left" if col == "family" else "right")
        for family, r in [*result["families"].items(), ("all", result)]:
            table.add_row(family, str(r["points"]), str(r["calibration"]), _pct(r["transfer"]["mape"]),
                          _pct(r["transfer"]["p90"]), _pct(r["copy"]["mape"]), _pct(r["copy"]["p90"]))
        console.print(table)
        console.print(f"errors on the points not used for calibration; calibration cost "
                      f"{result['calibration_gpu_s']:.1f} of the target's {result['full_gpu_s']:.1f} GPU-s")
    else:
        console.print(f"{head}: wrote {result['written']} transferred rows from {result['calibration']} measured "
                      f"points ({result['calibration_gpu_s']:.1f} GPU-s, against {result['source_gpu_s']:.1f} for "
                      f"the source's sweep); kept {result['kept']} measured rows")


if __name__ == "__main__":
    sys.exit(main())
