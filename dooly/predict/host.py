"""The engine's host-side time per step, fitted from the environment's calibration (`dooly.bench.host`).

    prepare = a + b*R + c*T + d*K + e*R*(attention types - 1)   scheduling, input lists, mask blocks
    launch  = a + b*kernels                                       Python launching the forward, kernel by kernel
    plan    = p * attention shapes                                cuDNN builds an execution plan for every new
                                                                  attention shape, and a step nearly always brings
                                                                  one: the host stalls and the GPU idles meanwhile
    forward = plan + max(launch, GPU time)
    update  = a + b*R                                             reading the new tokens back
    step    = forward + g                                         the rest of the engine's generation step

`dooly.predict.step.compose_step` puts a step together from them.

`p` is the median of the first calls `dooly.bench.host.first_calls` measured, over all head configurations
together, leaving out the calls that also compiled a kernel, which a serving process has long done. Pooled,
because the cost is not the head configuration's: it comes in spells whatever the heads, so the few calls of one
head configuration, made back to back, share a spell, and their cheapest is the floor of the spell, not the typical
cost (docs/findings.md has the measurements). Without first calls, the figure that comes out of the launch fit is
used (the synthetic Gemma-2 has two attention shapes a step, the synthetic Llama one). Where attention builds no
plans (the efficient and math kernels) both are near zero.

Kernel counts come from the IR of each synthetic calibration model, stored with its calibration, so the fitted
costs carry over to any model through its own IR. Coefficients are least squares on the calibration medians, kept
non-negative.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..bench.kernels import KernelCount


@dataclass
class HostModel:
    prepare: np.ndarray
    launch: np.ndarray
    update: np.ndarray
    plan_us: float
    step_extra: float
    rows: int

    def prepare_us(self, R, T, K, types: int):
        return self.prepare @ np.array([np.ones_like(R), R, T, K, R * (types - 1)], dtype=np.float64)

    def launch_us(self, kernels):
        return self.launch @ np.array([np.ones_like(kernels), kernels], dtype=np.float64)

    def update_us(self, R):
        return self.update @ np.array([np.ones_like(R), R], dtype=np.float64)


NO_HOST = HostModel(np.zeros(5), np.zeros(2), np.zeros(2), 0.0, 0.0, 0)  # an environment without host calibration


def _nonneg_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients clipped at zero (refitting without the clipped ones)."""
    keep = np.ones(X.shape[1], dtype=bool)
    for _ in range(X.shape[1]):
        coef = np.zeros(X.shape[1])
        coef[keep] = np.linalg.lstsq(X[:, keep], y, rcond=None)[0]
        if (coef >= 0).all():
            return coef
        keep &= coef >= 0
    return np.clip(coef, 0, None)


def plan_cost(first_calls: list[float]) -> float:
    """The typical plan among first calls: their median, leaving out those that also compiled a kernel (more than
    three times the median of all)."""
    typical = float(np.median(first_calls))
    return max(0.0, float(np.median([us for us in first_calls if us <= 3 * typical]))) if typical > 0 else 0.0


def fit(store, env: str) -> HostModel:
    from ..bench.host import SYNTHETIC

    rows = store.host(env)
    if not any("layers" in r["point"] for r in rows):
        raise ValueError(f"environment {env} has no host calibration (run python -m dooly.bench.host on its GPU)")
    kernels = {(r["point"]["model"], r["point"]["layers"]): KernelCount(*(r[f.name] for f in fields(KernelCount)))
               for r in store.host_kernels(env)}
    names = list(SYNTHETIC)
    by_phase: dict[str, list[tuple[dict, float]]] = {}
    for r in rows:
        by_phase.setdefault(r["phase"], []).append((r["point"], r["median_us"]))
    prep_X, prep_y, launch_X, launch_y, upd_X, upd_y, extra = [], [], [], [], [], [], []
    for point, us in by_phase.get("prepare", []):
        types = 2 if names[point["model"]] == "gemma2" else 1
        prep_X.append([1, point["R"], point["T"], point["K"], point["R"] * (types - 1)])
        prep_y.append(us)
    for point, us in by_phase.get("launch", []):
        count = kernels.get((point["model"], point["layers"]))
        if count is None:
            raise ValueError(f"environment {env}: no kernel counts stored for its host calibration (count them: "
                             f"python -m dooly.bench.host --store {store.path} --kernels-only)")
        launch_X.append([1, float(count(point["R"], point["K"] > point["T"])), count.types])
        launch_y.append(us)
    for point, us in by_phase.get("update", []):
        upd_X.append([1, point["R"]])
        upd_y.append(us)
    forward = {(p["model"], p["layers"], p["R"], p["T"], p["K"]): us for p, us in by_phase.get("forward", [])}
    for p, us in by_phase.get("step", []):
        f = forward.get((p["model"], p["layers"], p["R"], p["T"], p["K"]))
        if f is not None:
            extra.append(us - f)
    launch = _nonneg_lstsq(np.array(launch_X, float), np.array(launch_y))
    firsts = [us for _, us in by_phase.get("attention_first_call", [])]
    return HostModel(_nonneg_lstsq(np.array(prep_X, float), np.array(prep_y)), launch[:2],
                     _nonneg_lstsq(np.array(upd_X, float), np.array(upd_y)),
                     plan_cost(firsts) if firsts else float(launch[2]),
                     float(np.median(extra)) if extra else 0.0, len(rows))
