"""The step-time model's paths, on a zoo IR and the shipped store: the vectorised prediction, the memoised single
step, the simulator's step time and the per-op breakdown give one total for the same batch."""

import warnings

import pytest
from helpers import ROOT

from dooly.compile import load_model
from dooly.predict import environment_name, load_predictor
from dooly.predict.cli import breakdown
from dooly.sim import EngineSettings, StepTime
from dooly.store import Store

BATCHES = [[(512, 512), (512, 512), (1, 1024)], [(1, 300)] * 6 + [(1, 9000)], [(4096, 4096)], [(200, 900), (5, 5)]]


@pytest.fixture(scope="module")
def predictor(shipped):
    store = Store(shipped, create=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Gemma-2: two attention shapes a step (full and sliding window), so plans and kernel counts both matter
        return load_predictor(load_model(ROOT / "golden" / "gemma-2-2b.ir"), store, environment_name(store))


def test_every_path_gives_the_same_total(predictor):
    p = predictor.predict(BATCHES)
    for i, batch in enumerate(BATCHES):
        total = p.parts.total_us[i]
        assert total > p.parts.gpu_us[i]  # the host's time is in it
        assert predictor.step(batch).parts.total_us == pytest.approx(total, rel=1e-12)
        fresh = StepTime(predictor, EngineSettings())  # a fresh engine thread
        assert fresh(batch) * 1e6 == pytest.approx(total, rel=1e-12)
        assert sum(row["us"] for row in breakdown(p, i)) == pytest.approx(total, rel=1e-12)


def test_a_run_pays_the_plans_of_an_attention_shape_once(predictor):
    step_time = StepTime(predictor, EngineSettings())
    batch = BATCHES[0]
    first = predictor.predict([batch]).parts
    assert step_time(batch) * 1e6 == pytest.approx(first.total_us[0], rel=1e-12)
    assert first.plans_us[0] > 0
    assert step_time(batch) * 1e6 == pytest.approx(first.total_us[0] - first.plans_us[0], rel=1e-12)
