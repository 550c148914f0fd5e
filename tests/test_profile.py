"""The profiler's sweep logic with a fake timer: grid, adaptive refinement, resume after a crash, skipped points,
and `dooly profile`'s refusals."""

import json
import time

import pytest
import torch
from helpers import ROOT, dooly
from test_store import env

from dooly.bench import sweep as sweep_mod
from dooly.bench.timer import Timing
from dooly.environment import BACKENDS
from dooly.passes.canonicalize import Signature
from dooly.profile import Budget, Sweeper
from dooly.store import Store

ENV = "h100/sdpa"


class FakeOp:
    """A 'kernel' whose latency is flat (launch-bound) up to a knee, then linear: refinement must find the knee."""

    knee, calls = 512, []

    def make_inputs(self, point, device):
        if point.get("M", 0) > 1 << 20:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return (point,)

    def run(self, point):
        return point


def fake_measure(make_inputs, run, device):
    (point,) = make_inputs()
    FakeOp.calls.append(dict(point))
    m = point.get("M", point.get("T", 1) * point.get("K", 1))
    us = 5.0 + max(0, m - FakeOp.knee) * 0.01
    return Timing([us] * 15, 1, 1, True, 0.01)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr("dooly.bench.timer.measure", fake_measure)
    FakeOp.calls = []
    store = Store(tmp_path / "s.sqlite")
    store.add_environment(env())
    sig = Signature("ab" * 8, "gemm", ("M",), {"op": "aten.mm", "family": "gemm"})
    store.add_signature(sig)
    return store, sig


def sweeper(store, deadline=float("inf")):
    return Sweeper(store, ENV, BACKENDS["sdpa"], time.monotonic() + deadline if deadline != float("inf") else deadline,
                   device="cpu")


def test_sweep_measures_the_grid_then_refines_where_latency_bends(setup):
    store, sig = setup
    sweeper(store).sweep(FakeOp(), sig, {"M": 16384})
    ms = sorted(p["M"] for p in FakeOp.calls)
    grid = sweep_mod.powers_of_two(1, 16384)
    assert set(grid) <= set(ms) and len(ms) > len(grid)
    extra = [m for m in ms if m not in grid]
    assert extra and all(256 < m < 1024 for m in extra)  # only around the knee at 512
    assert store.finished_sweeps(ENV)[sig.hash] == pytest.approx(0.01 * len(ms))
    rows = store.points(sig.hash, ENV, "gemm")
    assert rows[json.dumps({"M": 64}, separators=(",", ":"))]["median_us"] == 5.0


def test_a_killed_sweep_resumes_with_only_the_rest(setup):
    store, sig = setup
    first = sweeper(store)
    calls = 0

    def crash_after_five(make_inputs, run, device):
        nonlocal calls
        calls += 1
        if calls > 5:
            raise KeyboardInterrupt  # a kill: no chance to clean up
        return fake_measure(make_inputs, run, device)

    import dooly.bench.timer as timer

    real = timer.measure
    timer.measure = crash_after_five
    with pytest.raises(KeyboardInterrupt):
        first.sweep(FakeOp(), sig, {"M": 16384})
    timer.measure = real
    assert len(store.points(sig.hash, ENV, "gemm")) == 5 and sig.hash not in store.finished_sweeps(ENV)
    FakeOp.calls = []
    sweeper(Store(store.path)).sweep(FakeOp(), sig, {"M": 16384})
    remeasured = [p["M"] for p in FakeOp.calls]
    assert not {1, 2, 4, 8, 16} & set(remeasured)  # the five committed points are not measured again
    assert sig.hash in store.finished_sweeps(ENV)


def test_budget_stops_between_points_and_keeps_them(setup):
    store, sig = setup
    s = sweeper(store, deadline=0)
    with pytest.raises(Budget):
        s.sweep(FakeOp(), sig, {"M": 16})
    assert store.points(sig.hash, ENV, "gemm") == {} and sig.hash not in store.finished_sweeps(ENV)


def test_out_of_memory_point_is_skipped_and_the_sweep_goes_on(setup):
    store, sig = setup
    sweeper(store).sweep(FakeOp(), sig, {"M": 1 << 24})
    rows = store.points(sig.hash, ENV, "gemm")
    skipped = [r for r in rows.values() if r["status"] == "skipped"]
    assert skipped and all(r["reason"] == "out of memory" for r in skipped)
    assert sum(r["status"] == "ok" for r in rows.values()) >= 21 and sig.hash in store.finished_sweeps(ENV)


def test_two_axis_grid_keeps_keys_at_least_queries():
    points = sweep_mod.initial_points(("K", "T"), {"T": 64, "K": 1024})
    assert all(p["K"] >= p["T"] for p in points)
    assert {p["T"] for p in points} == {1, 2, 4, 8, 16, 32, 64} and max(p["K"] for p in points) == 1024
    assert all(p["T"] * p["K"] <= sweep_mod.ATTENTION_WORK for p in sweep_mod.initial_points(
        ("K", "T"), {"T": 16384, "K": 262144}))




@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_profile_refuses_without_a_gpu(tmp_path):
    out = dooly("profile", ROOT / "configs" / "llama-3.2-1b.json", "--store", tmp_path / "s.sqlite")
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr and "Traceback" not in out.stderr


def test_profile_refuses_an_unknown_backend(tmp_path):
    out = dooly("profile", ROOT / "configs" / "llama-3.2-1b.json", "--store", tmp_path / "s.sqlite",
                 "--backend", "warp-drive")
    assert out.returncode == 2 and "unknown attention backend 'warp-drive'" in out.stderr


def test_refinement_costs_nothing_on_flat_or_linear_stretches():
    measured, calls = {}, []

    def line(point):
        calls.append(point)
        return 3.0 + 0.5 * point["M"] if point["M"] > 64 else 35.0

    for m in sweep_mod.powers_of_two(1, 4096):
        measured[json.dumps({"M": m}, separators=(",", ":"))] = line({"M": m})
    calls.clear()
    assert sweep_mod.refine(line, "M", measured) == len(calls) > 0
    assert all(32 < p["M"] < 256 for p in calls)  # flat below 64, linear above: only the bend is refined


def test_generated_benchmarks_sweep_into_the_store_on_the_cpu(tmp_path):
    """The whole chain without a GPU: IR -> signatures -> generated files -> sweeps -> store rows."""
    from helpers import zoo_graph

    from dooly.passes import codegen
    from dooly.passes.canonicalize import uses
    from dooly.profile import sweep_all

    store = Store(tmp_path / "s.sqlite")
    store.add_environment(env())
    picked = {}
    for u in uses(zoo_graph("llama-3.2-1b"), "paged|sdpa"):
        picked.setdefault(u.signature.family, u.signature)
    todo = list(picked.values())
    for sig in todo:
        store.add_signature(sig)
    limits = {s.hash: {a: 8 for a in s.axes} | ({"N": 4096} if "N" in s.axes else {}) for s in todo}
    done = sweep_all(sweeper(store), todo, codegen.write(todo, tmp_path / "bench"), limits)
    assert done == len(todo) >= 5
    assert set(store.finished_sweeps(ENV)) == {s.hash for s in todo}
    for sig in todo:
        rows = store.points(sig.hash, ENV, sig.family)
        assert rows and all(r["status"] == "ok" and r["median_us"] > 0 for r in rows.values())
