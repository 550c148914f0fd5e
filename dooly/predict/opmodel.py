"""Latency of any op signature at any request point, from the store.

- A measured signature is interpolated in its own grid: piecewise linear along its axis (along keys, then across
  queries, for two-axis signatures). Below the grid a kernel cannot be faster than its smallest point (the launch
  floor); above it latency grows linearly from the last two points, and the prediction says it extrapolated.
- A signature the store never measured goes to its op family's LightGBM regressor, trained on every measured
  point of that family (features: request sizes, FLOPs, bytes, roofline time, dtype, op).

Fitted models are saved beside the store (`<store>.models/<environment hash>/`) in formats that loading cannot run
code from: `model.json` (grids, canonical signatures, cross-validation, the digest of the measurements they were
fitted on, and the sha256 of each regressor file) and one LightGBM text model per family (`regressor-<family>.txt`),
each file written whole or not at all. They are reloaded without refitting while the store is unchanged; a folder
that is missing, truncated, corrupt or stale is fitted again and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bench.roofline import ITEMSIZE, roofline_s, work
from ..bench.sweep import refine_axis
from ..passes.canonicalize import Signature
from ..store import Store

FAMILIES = ("gemm", "attention", "moe", "pointwise", "reduction", "memory")
AXIS_FEATURES = ("M", "N", "T", "K", "q", "k", "R", "Kmax", "Tmax")
DEFAULT_ROUTING = 0  # expert GEMMs: tokens spread evenly over experts unless asked otherwise
SAVED_FORMAT = 1


class Extrapolation(UserWarning):
    pass


def features(canonical: dict, point: dict[str, int]) -> list[float]:
    flops, moved = work(canonical, point)
    dtypes = canonical.get("dtypes") or [t["dtype"] for t in canonical.get("inputs", [])]
    op = int(hashlib.sha256(canonical["op"].encode()).hexdigest()[:6], 16)
    return [math.log2(1 + flops), math.log2(1 + moved), math.log2(roofline_s(canonical, point) * 1e6),
            *[math.log2(1 + point.get(a, 0)) for a in AXIS_FEATURES], float(point.get("dist", 0)),
            float(max([ITEMSIZE.get(d, 2) for d in dtypes] or [2])), float(op % 997)]


@dataclass
class Grid:
    """A signature's measured points, ready for interpolation: lines along one axis, one line per value of the
    other axis of a two-axis grid (or per routing distribution of an expert GEMM)."""

    axes: tuple[str, ...]
    along: str | None
    outer: str | None
    lines: dict[int, tuple[np.ndarray, np.ndarray]]  # outer value (routing, or 0) -> (xs along `along`, median µs)

    @staticmethod
    def build(axes: tuple[str, ...], rows: list[tuple[dict, float]]) -> Grid:
        along = refine_axis(axes) if axes else None
        outer = next((a for a in axes if a != along), None)
        lines: dict[int, list[tuple[int, float]]] = {}
        for point, us in rows:
            lines.setdefault(point[outer] if outer else point.get("dist", 0), []).append((point.get(along, 0), us))
        return Grid(axes, along, outer, {k: (np.array([x for x, _ in sorted(v)], dtype=np.float64),
                                             np.array([y for _, y in sorted(v)], dtype=np.float64))
                                         for k, v in sorted(lines.items())})

    @staticmethod
    def _line(xs: np.ndarray, ys: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = np.interp(x, xs, ys)
        beyond = x > xs[-1]
        if beyond.any() and len(xs) > 1:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            out[beyond] = ys[-1] + max(slope, 0.0) * (x[beyond] - xs[-1])
        return out, beyond

    def __call__(self, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Median µs at each query (arrays of axis values), and which queries lie beyond the measured grid."""
        n = len(next(iter(values.values()))) if values else 1
        if self.along is None:
            (_, ys), = self.lines.values()
            return np.full(n, ys[0]), np.zeros(n, dtype=bool)
        x = values[self.along].astype(np.float64)
        if self.outer is None:
            return self._line(*self.lines.get(DEFAULT_ROUTING, next(iter(self.lines.values()))), x)
        ts = np.array(list(self.lines), dtype=np.float64)
        t = values[self.outer].astype(np.float64)
        lo = np.clip(np.searchsorted(ts, t, side="right") - 1, 0, len(ts) - 1)
        hi = np.minimum(lo + 1, len(ts) - 1)
        y_lo, b_lo = self._at(ts, lo, x)
        y_hi, b_hi = self._at(ts, hi, x)
        w = np.where(hi > lo, (t - ts[lo]) / np.where(hi > lo, ts[hi] - ts[lo], 1.0), 0.0)
        out = y_lo + (y_hi - y_lo) * np.clip(w, 0.0, 1.0)
        beyond = t > ts[-1]
        out[beyond] = y_lo[beyond] * t[beyond] / ts[lo[beyond]]  # more queries than measured: grows with them
        return out, beyond | b_lo | b_hi

    def _at(self, ts: np.ndarray, index: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y, b = np.empty_like(x), np.zeros(len(x), dtype=bool)
        for i in np.unique(index):
            sel = index == i
            y[sel], b[sel] = self._line(*self.lines[int(ts[i])], x[sel])
        return y, b


class OpModel:
    """Per-signature grids for measured signatures, per-family regressors for the rest."""

    def __init__(self, grids: dict[str, Grid], regressors: dict, canonicals: dict[str, dict], cv: dict):
        self.grids, self.regressors, self.canonicals, self.cv = grids, regressors, canonicals, cv

    def predict(self, sig: Signature, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, str]:
        """(µs, beyond-the-grid flags, source) for one signature at many points."""
        grid = self.grids.get(sig.hash)
        if grid is not None:
            us, beyond = grid(values)
            return us, beyond, "measured"
        model = self.regressors.get(sig.family)
        if model is None:
            raise KeyError(f"no measurements of family {sig.family} to predict {sig.op} from")
        n = len(next(iter(values.values()))) if values else 1
        rows = [features(sig.canonical, {a: int(values[a][i]) for a in values}) for i in range(n)]
        return np.exp2(model.predict(np.array(rows))), np.zeros(n, dtype=bool), "regressor"


def _measurements(store: Store, env: str) -> tuple[dict, dict]:
    """signature -> [(point, median µs)] and signature -> (family, axes, canonical), for `env`."""
    data = store.measured_points(env)
    sigs = {}
    rows: dict[str, list] = {}
    for sig_hash, points in data.items():
        info = store.signature(sig_hash)
        sigs[sig_hash] = (info["family"], tuple(info["axes"]), info["canonical"])
        rows[sig_hash] = [(json.loads(k), r["median_us"]) for k, r in points.items()
                          if r["status"] in ("ok", "transferred")]
    return rows, sigs


def digest(rows: dict) -> str:
    h = hashlib.sha256()
    for sig_hash in sorted(rows):
        h.update(sig_hash.encode())
        h.update(json.dumps(sorted((json.dumps(p, sort_keys=True), round(us, 4)) for p, us in rows[sig_hash])).encode())
    return h.hexdigest()[:16]


def _lgbm():
    import lightgbm

    return lightgbm.LGBMRegressor(n_estimators=300, learning_rate=0.05, num_leaves=31, min_child_samples=5,
                                  subsample=0.8, subsample_freq=1, colsample_bytree=0.9, verbose=-1, random_state=0)


def _loo_mape(grid: Grid) -> list[float]:
    """Interpolation error of each interior grid point predicted from its two neighbours along its line (an upper
    bound: a real query sits between points half as far apart)."""
    errs = []
    for xs, ys in grid.lines.values():
        for i in range(1, len(xs) - 1):
            guess = ys[i - 1] + (ys[i + 1] - ys[i - 1]) * (xs[i] - xs[i - 1]) / (xs[i + 1] - xs[i - 1])
            errs.append(abs(guess - ys[i]) / ys[i])
    return errs


def _held_out_mape(X, y, splits) -> float:
    """Mean relative error of regressors fitted on each split's training rows, on its held-out rows (y is log2 µs)."""
    errors = []
    for train, test in splits:
        model = _lgbm().fit(X[train], y[train])
        errors += list(np.abs(np.exp2(model.predict(X[test]) - y[test]) - 1))
    return float(np.mean(errors))


def fit(rows: dict, sigs: dict, folds: int = 5) -> OpModel:
    """Grids and regressors from `_measurements`' rows and signatures."""
    from sklearn.model_selection import GroupKFold, KFold

    grids = {h: Grid.build(sigs[h][1], r) for h, r in rows.items() if r}
    regressors, cv = {}, {}
    for family in FAMILIES:
        X, y, groups = [], [], []
        for h, r in rows.items():
            if sigs[h][0] != family:
                continue
            for point, us in r:
                X.append(features(sigs[h][2], point))
                y.append(math.log2(us))
                groups.append(h)
        if len(X) < 20:
            continue
        X, y = np.array(X), np.array(y)
        n_sigs = len(set(groups))
        regressors[family] = _lgbm().fit(X, y).booster_  # what a saved model reloads as
        interp = [e for h in grids if sigs[h][0] == family for e in _loo_mape(grids[h])]
        cv[family] = {"points": len(X), "signatures": n_sigs,
                      "regressor_mape": _held_out_mape(X, y, KFold(folds, shuffle=True, random_state=0).split(X)),
                      # each signature's points predicted by a regressor that saw none of them: an op before it is
                      # profiled, which the point-shuffled folds above do not tell
                      "unseen_signature_mape": _held_out_mape(X, y, GroupKFold(min(folds, n_sigs)).split(X, y, groups))
                      if n_sigs > 1 else None,
                      "interpolation_mape": float(np.mean(interp)) if interp else None}
    return OpModel(grids, regressors, {h: s[2] for h, s in sigs.items()}, cv)


def model_dir(store_path: Path, env: str) -> Path:
    safe = hashlib.sha256(env.encode()).hexdigest()[:10]
    return Path(f"{store_path}.models") / safe


def _grid_json(grid: Grid) -> dict:
    return {"axes": list(grid.axes), "along": grid.along, "outer": grid.outer,
            "lines": [[k, xs.tolist(), ys.tolist()] for k, (xs, ys) in grid.lines.items()]}


def _grid(d: dict) -> Grid:
    return Grid(tuple(d["axes"]), d["along"], d["outer"],
                {int(k): (np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)) for k, xs, ys in d["lines"]})


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader finds the old file or the new one, never a part (a crash or a full
    disk leaves a temporary file beside it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the models from everyone else who reads the store
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: OpModel, folder: Path, stamp: str, env: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for family, booster in sorted(model.regressors.items()):
        text = booster.model_to_string()
        files[family] = {"file": f"regressor-{family}.txt", "sha256": _sha256(text)}
        _write_whole(folder / files[family]["file"], text)
    body = {"format": SAVED_FORMAT, "digest": stamp, "environment": env, "cv": model.cv, "regressors": files,
            "grids": {h: _grid_json(g) for h, g in model.grids.items()}, "canonicals": model.canonicals}
    _write_whole(folder / "model.json", json.dumps({"sha256": _sha256(json.dumps(body, sort_keys=True)),
                                                   "model": body}, sort_keys=True))
    for stale in ("model.pkl", "digest.json"):  # what earlier versions saved: pickles, which loading would run
        (folder / stale).unlink(missing_ok=True)


def load(folder: Path, stamp: str) -> OpModel | None:
    """The model saved in `folder` if it is whole and was fitted on measurements of digest `stamp`, else None."""
    import lightgbm

    try:
        saved = json.loads((folder / "model.json").read_text())
        body = saved["model"]
        if saved["sha256"] != _sha256(json.dumps(body, sort_keys=True)) or body["format"] != SAVED_FORMAT \
                or body["digest"] != stamp:
            return None
        regressors = {}
        for family, entry in body["regressors"].items():
            if family not in FAMILIES:
                return None
            text = (folder / entry["file"]).read_text() if entry["file"] == f"regressor-{family}.txt" else ""
            if _sha256(text) != entry["sha256"]:
                return None
            regressors[family] = lightgbm.Booster(model_str=text)
        return OpModel({h: _grid(g) for h, g in body["grids"].items()}, regressors, body["canonicals"], body["cv"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError, lightgbm.basic.LightGBMError):
        return None


def load_or_fit(store: Store, env: str, refit: bool = False) -> tuple[OpModel, bool]:
    """The fitted model of `env`: from disk if it was fitted on exactly the store's current measurements, else
    fitted now and saved."""
    rows, sigs = _measurements(store, env)
    stamp = digest(rows)
    folder = model_dir(store.path, env)
    model = None if refit else load(folder, stamp)
    if model is not None:
        return model, False
    model = fit(rows, sigs)
    try:
        save(model, folder, stamp, env)
    except OSError as e:  # a store others share, in a folder this user cannot write: use the fit, keep nothing
        warnings.warn(f"{folder}: fitted models not saved ({e.strerror}); they will be fitted again next time")
    return model, True
