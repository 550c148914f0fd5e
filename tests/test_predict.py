"""Prediction from a store filled by a fake timer (the latency of every point known exactly), and the `dooly fit` /
`dooly predict` commands on a copy of the shipped H100 store."""

import json
import random
import time
import warnings

import numpy as np
import pytest
from helpers import ROOT, compile_dict, dooly, tiny_llama
from test_store import env

from dooly.environment import BACKENDS
from dooly.errors import DoolyError
from dooly.ir import When
from dooly.ir.expr import evaluate
from dooly.passes.canonicalize import uses
from dooly.predict import Batches, environment_name, load_predictor
from dooly.predict.cli import parse_batch
from dooly.predict.opmodel import Grid
from dooly.profile import Sweeper
from dooly.store import Store

ENV = "h100/sdpa"


def fake_us(point: dict) -> float:
    """Linear in every request size: piecewise-linear interpolation of a grid reproduces it exactly."""
    work = 1
    for axis, v in point.items():
        if axis != "dist":
            work *= v
    return 3.0 + 1e-4 * work


class FakeBench:
    def make_inputs(self, point, device):
        return (point,)

    def run(self, point):
        return point


@pytest.fixture(scope="module")
def fake(tmp_path_factory, monkeypatch_module):
    from dooly.bench.timer import Timing
    from dooly.plan import signature_uses, sweep_limits

    monkeypatch_module.setattr("dooly.bench.timer.measure",
                               lambda make_inputs, run, device: Timing([fake_us(make_inputs()[0])] * 15, 1, 1, True,
                                                                       0.0))
    graph = compile_dict(tiny_llama(), "tiny-llama")
    store = Store(tmp_path_factory.mktemp("fake") / "fake.sqlite")
    store.add_environment(env())
    sweeper = Sweeper(store, ENV, BACKENDS["sdpa"], float("inf"), device="cpu")
    for sig, bindings in signature_uses([graph], "paged|sdpa").values():
        store.add_signature(sig)
        sweeper.sweep(FakeBench(), sig, sweep_limits(sig, bindings))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake store has no host calibration
        predictor = load_predictor(graph, store, ENV)
    return graph, store, predictor


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def expected_gpu_us(graph, batch) -> float:
    """The step's GPU time computed straight from the IR: each op's count x the fake latency at its sizes."""
    T, R, K = sum(q for q, _ in batch), len(batch), sum(k for _, k in batch)
    step = {"T": T, "R": R, "K": K, "Ks": K, "Kmax": max(k for _, k in batch)}
    total = 0.0
    for u in uses(graph, "paged|sdpa"):
        if (u.when is When.PAST_KEYS and K <= T) or (u.when is When.NO_PAST_KEYS and K > T):
            continue
        envs = [{"q": q, "k": k} for q, k in batch] if u.runs_per == "request" else [step]
        for e in envs:
            total += u.count * fake_us({axis: evaluate(expr, e) for axis, expr in u.binding.items()})
    return total


BATCHES = [[(128, 128)], [(1, 300)] * 7, [(64, 64), (1, 1000), (1, 17), (32, 96)], [(200, 900), (5, 5)]]


def test_step_gpu_time_is_the_sum_of_the_ops_at_their_sizes(fake):
    graph, _, predictor = fake
    p = predictor.predict(BATCHES)
    for i, batch in enumerate(BATCHES):
        # exact but for prefill attention (keys == queries) between two query lines, where the upper line's first
        # point has more keys than asked (grids keep keys >= queries); any op missed or doubled costs >= 3 µs
        assert p.parts.gpu_us[i] == pytest.approx(expected_gpu_us(graph, batch), rel=1e-4)
    assert not p.extrapolated


def test_the_fast_single_step_path_agrees_with_the_vectorised_one(fake):
    _, _, predictor = fake
    rng = random.Random(1)
    batches = [[(q, q + rng.choice([0, rng.randint(1, 3000)])) for q in
                (rng.choice([1, 1, rng.randint(2, 700)]) for _ in range(rng.randint(1, 12)))] for _ in range(60)]
    p = predictor.predict(batches)
    for _ in range(2):  # the second pass answers from the memo
        got = [predictor.step(b).parts.gpu_us for b in batches]
        assert got == pytest.approx(list(p.parts.gpu_us), rel=1e-9)


def test_predictions_beyond_the_grid_say_so(fake):
    _, _, predictor = fake
    p = predictor.predict([[(60000, 60000)], [(1, 100)]])
    assert p.extrapolated and all("beyond its measured grid" in x for x in p.extrapolated)
    assert not predictor.predict([[(1, 100)]]).extrapolated  # a batch inside the grid says nothing
    # the single-step path says it of the step that went beyond, not of the memo's neighbouring rows
    assert predictor.step([(60000, 60000)]).extrapolated == set(p.extrapolated)
    assert not predictor.step([(1, 100)]).extrapolated
    from dooly.sim.simulator import EngineSettings, StepTime

    run = StepTime(predictor, EngineSettings())
    run([(1, 100)])
    assert not run.extrapolated
    run([(60000, 60000)])
    assert run.extrapolated == set(p.extrapolated)


def test_grid_interpolates_between_points_floors_below_and_grows_above():
    grid = Grid.build(("T",), [({"T": 4}, 10.0), ({"T": 8}, 20.0), ({"T": 16}, 30.0)])
    us, beyond = grid({"T": np.array([1, 4, 6, 12, 16, 24])})
    assert list(us) == pytest.approx([10, 10, 15, 25, 30, 40])
    assert list(beyond) == [False] * 5 + [True]


def test_batches_reject_what_is_not_a_batch():
    for bad in ([[]], [[(0, 5)]], [[(5, 4)]], [[(1.5, 3)]], [[(True, 3)]], [[(1, 2, 3)]]):
        with pytest.raises(DoolyError):
            Batches.of(bad)


def test_batch_specs():
    batch = parse_batch("prefill:512x4,decode:128@2048")
    assert batch == [(512, 512)] * 4 + [(1, 2048)] * 128
    assert parse_batch("prefill:100x2+50") == [(100, 150)] * 2
    for bad in ("prefill:512", "decode:4", "prefill:0x2", "mixed:1x1", ""):
        with pytest.raises(DoolyError):
            parse_batch(bad)


def test_a_store_without_the_backend_is_refused(fake):
    _, store, _ = fake
    with pytest.raises(DoolyError, match="no measurements for the sdpa-efficient backend"):
        environment_name(store, "sdpa-efficient")
    with pytest.raises(DoolyError, match="unknown attention backend"):
        environment_name(store, "flash9")


# --- the commands, on a copy of the shipped store (fitting writes beside the store) -------------------------------

def test_fit_prints_cross_validation_and_reloads_without_refitting(shipped):
    first = dooly("fit", "--store", shipped, "--backend", "sdpa", "--json", "--refit")
    assert first.returncode == 0, first.stderr
    (env_result,) = json.loads(first.stdout).values()
    families = env_result["families"]
    assert {"gemm", "attention", "pointwise"} <= families.keys()
    for cv in families.values():
        assert 0 < cv["regressor_mape"] < 1 and cv["points"] >= 20
        # signatures held out whole: a number of its own wherever a family has two to hold out in turn
        assert (cv["unseen_signature_mape"] is None) == (cv["signatures"] < 2)
        assert cv["unseen_signature_mape"] is None or cv["unseen_signature_mape"] > 0
    started = time.perf_counter()
    again = dooly("fit", "--store", shipped, "--backend", "sdpa", "--json")
    (reloaded,) = json.loads(again.stdout).values()
    assert env_result["fitted"] and not reloaded["fitted"] and reloaded["families"] == families
    assert time.perf_counter() - started < 60


def test_predict_json_breaks_the_total_down_into_ops_and_host_time(shipped, tmp_path):
    steps = tmp_path / "steps.jsonl"
    steps.write_text("[[512, 512], [1, 2048]]\n\n[[1, 100], [1, 200], [1, 300]]\n")
    r = dooly("predict", ROOT / "golden" / "llama-3.2-1b.ir", "--store", shipped, "--batch-file", steps, "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert sum(op["us"] for op in line["ops"]) == pytest.approx(line["total_us"], rel=1e-9)
        assert line["total_us"] > line["gpu_us"] > 0
        assert {"op", "scope", "count", "us"} <= line["ops"][0].keys()
    assert lines[0]["gpu_us"] > lines[1]["gpu_us"]  # 513 tokens, against 3
    table = dooly("predict", ROOT / "golden" / "llama-3.2-1b.ir", "--store", shipped, "--batch", "decode:8@512")
    assert table.returncode == 0 and "total" in table.stdout and "aten.mm" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--batch", "decode:8"], "bad batch group"),
    (["--batch-file", "{bad}"], "not JSON"),
    (["--batch-file", "{neg}"], "need 1 <= query_tokens <= kv_tokens"),
    (["--batch", "decode:8@512", "--backend", "sdpa-flash"], "no measurements for the sdpa-flash backend"),
])
def test_predict_refuses_bad_input_in_one_line(shipped, tmp_path, args, message):
    (tmp_path / "bad").write_text("[[1, 2]\n")
    (tmp_path / "neg").write_text("[[4, -1]]\n")
    args = [a.format(bad=tmp_path / "bad", neg=tmp_path / "neg") for a in args]
    r = dooly("predict", ROOT / "golden" / "llama-3.2-1b.ir", "--store", shipped, *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
