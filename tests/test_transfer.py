"""Calibrated transfer (`dooly transfer`): the shipped store's default attention carried to the efficient backend,
checked against the efficient backend's own sweep, and a synthetic new GPU whose latencies follow a roofline model
the transfer's prior does not know, carried through the store end to end."""

import json
import shutil
import sqlite3

import numpy as np
import pytest
from helpers import ROOT, dooly
from test_store import env

from dooly.bench.roofline import BANDWIDTH, PEAK_FLOPS, work
from dooly.environment import resolve_environment
from dooly.predict.transfer import (
    COMPUTE_FAMILIES,
    MIN_PER_STRATUM,
    Roofline,
    apply,
    choose_calibration,
    plan,
    rehearse,
)
from dooly.store import Stats, Store

SOURCE = "h100-80gb-hbm3/torch-2.11.0+cu130/transformers-5.17.0/bf16/paged|sdpa"
TARGET = "h200/sdpa"
KEEP_EVERY = 4  # signatures of the shipped store kept for the synthetic GPU: a quarter, to fit in seconds


def synthetic_h200_us(c, rng) -> float:
    """A made-up H200: 1.3x the H100's effective bandwidth (the data sheets say 1.43x), a 3 µs launch floor
    (2.5 µs on the H100), GEMMs 5% faster, and 3% timing noise."""
    flops, moved = work(c.canonical, c.point)
    compute = flops / PEAK_FLOPS["bf16"] if c.family in COMPUTE_FAMILIES else 0.0
    ratio = (max(compute, moved / BANDWIDTH / 1.3) + 3e-6) / (max(compute, moved / BANDWIDTH) + 2.5e-6)
    return c.source_us * ratio * (0.95 if c.family == "gemm" else 1.0) * float(np.exp(rng.normal(0, 0.03)))


@pytest.fixture(scope="module")
def h200(tmp_path_factory):
    """A quarter of the shipped store's default-backend signatures, an H200 environment beside it with the
    calibration points measured (synthetically), and the transfer applied; with the truth at every point."""
    path = tmp_path_factory.mktemp("h200") / "store.sqlite"
    shutil.copy(ROOT / "data" / "h100.sqlite", path)
    db = sqlite3.connect(path)
    hashes = [h for h, in db.execute("SELECT hash FROM signatures ORDER BY family, hash")]
    db.execute(f"DELETE FROM measurements WHERE signature NOT IN ({','.join('?' * len(hashes[::KEEP_EVERY]))})",
               hashes[::KEEP_EVERY])
    db.commit()
    db.close()
    store = Store(path, create=False)
    store.add_environment(env(TARGET, gpu="NVIDIA H200"))
    p = plan(store, SOURCE, TARGET)
    rng = np.random.default_rng(0)
    truth = {c.key: synthetic_h200_us(c, rng) for c in p.candidates}
    for i in p.calibration:
        c = p.candidates[i]
        us = truth[c.key]
        store.record(c.target, TARGET, c.point, Stats(us * 0.98, us, us * 1.05, us * 0.02, 15), gpu_s=0.02)
    return store, p, truth, apply(store, p)


def test_calibration_is_a_tenth_spread_over_every_family_and_regime(h200):
    store, p, _, _ = h200
    assert len(p.calibration) <= 0.1 * len(p.candidates)
    strata = {}
    for c in p.candidates:
        strata.setdefault((c.family, p.roofline.regime(c)), []).append(c)
    picked = {(p.candidates[i].family, p.roofline.regime(p.candidates[i])) for i in p.calibration}
    assert picked == {s for s, members in strata.items() if members}
    for s, members in strata.items():
        n = sum(1 for i in p.calibration if (p.candidates[i].family, p.roofline.regime(p.candidates[i])) == s)
        assert n >= min(MIN_PER_STRATUM, len(members))
    ops = {p.candidates[i].source for i in p.calibration if p.candidates[i].family == "gemm"}
    assert len(ops) > 0.5 * len({c.source for c in p.candidates if c.family == "gemm"})  # spread over shapes


def test_choice_is_deterministic_and_seeded(h200):
    _, p, _, _ = h200
    sample = p.candidates[::7]
    first = choose_calibration(sample, 40, p.roofline, seed=1)
    assert first == choose_calibration(sample, 40, p.roofline, seed=1)
    assert first != choose_calibration(sample, 40, p.roofline, seed=2)
    assert len(first) == 40 and len(set(first)) == 40


def test_prior_follows_each_gpus_roofline(h200):
    _, p, _, _ = h200
    roofline = Roofline("NVIDIA H100 80GB HBM3", "NVIDIA H200")
    by_regime = {}
    for c in p.candidates:
        by_regime.setdefault(roofline.regime(c), []).append(roofline.prior(c))
    assert np.median(by_regime["memory"]) < 0.85  # bandwidth-bound: faster on the H200
    assert np.median(by_regime["compute"]) > 0.95  # same FLOP/s
    assert np.median(by_regime["launch"]) > 0.9  # a launch costs what it costs
    assert all(Roofline("NVIDIA H100", "NVIDIA H100").prior(c) == 1.0 for c in p.candidates[::50])


def test_transferred_new_gpu_recovers_the_synthetic_latencies(h200):
    store, p, truth, result = h200
    env_id, _ = store.environment(TARGET)
    rows = {(r["signature"], r["point"]): r for r in store.db.execute(
        "SELECT * FROM measurements WHERE environment = ? AND status = 'transferred'", (env_id,))}
    assert len(rows) == result["written"] == len(p.candidates) - len(p.calibration)
    transferred = np.array([rows[c.key]["median_us"] for c in p.candidates if c.key in rows])
    real = np.array([truth[c.key] for c in p.candidates if c.key in rows])
    copied = np.array([c.source_us for c in p.candidates if c.key in rows])
    prior = np.array([c.source_us * p.roofline.prior(c) for c in p.candidates if c.key in rows])
    error = np.mean(np.abs(transferred / real - 1))
    assert error < 0.06  # the noise alone is 2.4%
    assert error < 0.5 * np.mean(np.abs(copied / real - 1))
    assert error < 0.5 * np.mean(np.abs(prior / real - 1))  # the calibration corrects what the prior misses


def test_rows_are_marked_and_measured_ones_never_replaced(h200):
    store, p, truth, _ = h200
    env_id, _ = store.environment(TARGET)
    statuses = dict(store.db.execute("SELECT status, COUNT(*) FROM measurements WHERE environment = ? GROUP BY 1",
                                     (env_id,)).fetchall())
    assert statuses["ok"] == len(p.calibration)
    reason = json.loads(store.db.execute("SELECT reason FROM measurements WHERE environment = ? AND status = "
                                         "'transferred' LIMIT 1", (env_id,)).fetchone()[0])
    assert reason["from"] == SOURCE and reason["calibration_points"] == len(p.calibration)
    measured = {c.key: truth[c.key] for c in (p.candidates[i] for i in p.calibration)}
    again = apply(store, plan(store, SOURCE, TARGET))  # a second run replaces only transferred rows
    assert again["written"] == len(p.candidates) - len(p.calibration)
    for (sig, point), us in measured.items():
        row = store.db.execute("SELECT status, median_us FROM measurements WHERE signature = ? AND environment = ?"
                               " AND point = ?", (sig, env_id, point)).fetchone()
        assert row["status"] == "ok" and row["median_us"] == pytest.approx(us)


def test_default_attention_carried_to_the_efficient_backend(shipped):
    store = Store(shipped, create=False)
    p = plan(store, resolve_environment(store, "sdpa"), resolve_environment(store, "sdpa-efficient"),
             rehearsal=True)
    result = rehearse(store, p)
    assert set(result["families"]) == {"attention"}
    assert result["calibration"] <= 0.1 * result["points"]
    assert result["transfer"]["mape"] < 0.10
    assert result["transfer"]["mape"] < 0.5 * result["copy"]["mape"]
    assert result["transfer"]["p90"] < result["copy"]["p90"]
    assert 0 < result["calibration_gpu_s"] < 0.2 * result["full_gpu_s"]


def test_transfer_command(shipped, tmp_path):
    out = dooly("transfer", "--store", shipped, "--from", "sdpa", "--to", "h200/new", "--gpu", "NVIDIA H200",
                "--dry-run", "--points-out", tmp_path / "points.jsonl", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    points = [json.loads(line) for line in (tmp_path / "points.jsonl").read_text().splitlines()]
    assert len(points) == result["calibration"] <= 0.1 * result["points"]
    assert {p["family"] for p in points} == {"gemm", "attention", "moe", "pointwise", "reduction", "memory"}
    assert sum(result["strata"].values()) == result["calibration"]
    out = dooly("transfer", "--store", shipped, "--from", "sdpa", "--to", "sdpa-efficient", "--rehearse")
    assert out.returncode == 0, out.stderr
    assert "transfer MAPE" in out.stdout and "copy MAPE" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--from", "sdpa", "--to", "nowhere"], "no environment 'nowhere'"),
    (["--from", "sdpa", "--to", "sdpa"], "the same"),
    (["--from", "sdpa", "--to", "sdpa-efficient", "--budget-fraction", "0"], "fraction"),
    (["--from", "sdpa", "--to", "sdpa-efficient"], "calibration points are not measured"),  # a signature unswept
    (["--from", "sdpa", "--to", "nowhere", "--gpu", "NVIDIA H200"], "--dry-run only"),
])
def test_bad_input_is_one_error_line(shipped, args, message):
    out = dooly("transfer", "--store", shipped, *args)
    assert out.returncode == 2 and out.stderr.startswith("error:") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_missing_store(tmp_path):
    out = dooly("transfer", "--store", tmp_path / "none.sqlite", "--from", "sdpa", "--to", "sdpa-efficient")
    assert out.returncode == 2 and out.stderr.startswith("error:") and "no such store" in out.stderr
