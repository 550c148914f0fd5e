"""`dooly validate`: errors are taken against the measured ground truth, composition by composition."""

import json
import shutil

import numpy as np
import pytest
from helpers import ROOT, dooly

from dooly.compile import load_model
from dooly.predict import environment_name, load_predictor
from dooly.sim import EngineSettings, StepTime
from dooly.store import Store
from dooly.validate import validate_model

TRUTH = ROOT / "data" / "groundtruth" / "sdpa" / "llama-3.2-1b.json"


def test_step_errors_are_against_each_compositions_median(shipped):
    """Ground truth rewritten to twice what Dooly predicts for each step of each run: every error is exactly 1/2."""
    truth = json.loads(TRUTH.read_text())
    store = Store(shipped, create=False)
    graph = load_model(ROOT / "golden" / "llama-3.2-1b.ir")
    predictor = load_predictor(graph, store, environment_name(store))
    for trace in truth["traces"].values():
        for run in trace["runs"]:
            step_time = StepTime(predictor, EngineSettings())  # a fresh engine thread each run, as validate replays
            for step in run["steps"]:
                batch = [(int(q), int(k)) for q, k in zip(step["queries"], step["keys"])]
                step["forward_s"] = 2e-6 * step_time.forward_us(batch)[0]
    row = validate_model(truth, graph, store, log=lambda message: None)
    assert len(row.step_errors) >= 100
    assert np.allclose(row.step_errors, 0.5)


def test_validate_command_reports_every_model_with_plots(shipped, tmp_path):
    (tmp_path / "gt" / "sdpa").mkdir(parents=True)
    shutil.copy(TRUTH, tmp_path / "gt" / "sdpa")
    r = dooly("validate", "--groundtruth", tmp_path / "gt", "--store", shipped, "--models", "golden", "--json",
              "--plots", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert row["model"] == "llama-3.2-1b" and row["backend"] == "sdpa"
    assert row["n_steps"] >= 100 and row["n_requests"] >= 100
    for key in ("step_mape", "ttft_mape", "tpot_mape"):
        assert 0 <= row[key] < 1
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"parity_step.png", "parity_ttft.png", "parity_tpot.png"}


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no ground-truth files"),
    (lambda d: (d / "sdpa-flash").mkdir() or shutil.copy(TRUTH, d / "sdpa-flash" / "x.json"), None),
])
def test_validate_refuses_bad_input(shipped, tmp_path, setup, message):
    gt = tmp_path / "gt"
    gt.mkdir()
    setup(gt)
    if message is None:  # a file claiming a backend the store never measured
        data = json.loads((gt / "sdpa-flash" / "x.json").read_text())
        data["backend"] = "sdpa-flash"
        (gt / "sdpa-flash" / "x.json").write_text(json.dumps(data))
        message = "no measurements for the sdpa-flash backend"
    r = dooly("validate", "--groundtruth", gt, "--store", shipped, "--models", "golden")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_requests_ttft_counts_from_its_arrival_in_the_trace_not_from_when_the_harness_added_it():
    from dooly.validate import request_truth

    # the harness could add r1 only after a 20 ms step: its stamp is late, its wait is part of its TTFT
    trace = {"requests": [[0.0, 8, 2], [0.005, 8, 2]],
             "runs": [{"requests": [{"request_id": "r1", "arrival": 0.025, "first_token": 0.040,
                                     "token_times": [0.040, 0.045]},
                                    {"request_id": "r0", "arrival": 0.0, "first_token": 0.020,
                                     "token_times": [0.020, 0.030]}]}]}
    ttft, tpot, _, _ = request_truth(trace)
    assert ttft == pytest.approx([0.020, 0.035]) and tpot == pytest.approx([0.010, 0.005])


def test_a_trace_is_simulated_as_the_harness_served_it_rows_in_trace_order():
    from dooly.sim import ContinuousBatching
    from dooly.validate import simulate_trace

    # arriving together, the harness adds the 16-token prompt before the 900-token one: with room for one prefill a
    # step, the short one's first token comes first; each row is still the trace's request of its index
    trace = {"requests": [[0.0, 900, 2], [0.0, 16, 2], [0.5, 64, 1]]}
    rows = simulate_trace(trace, ContinuousBatching(64, 256, 1024, 1), lambda sizes: 0.01, 1000)
    assert [(r["prompt"], r["output"]) for r in rows] == [(900, 2), (16, 2), (64, 1)]
    assert rows[1]["ttft"] < rows[0]["ttft"]
