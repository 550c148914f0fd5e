"""`dooly compare`: Llama-3.1-8B on the shipped store's default and efficient attention, side by side."""

import json

import pytest
from helpers import dooly

from dooly.environment import resolve_environment
from dooly.predict import load_predictor, step_latency
from dooly.store import Store

CONFIG = "configs/llama-3.1-8b.json"
BATCH = "prefill:512x2,decode:32@1024"


@pytest.fixture(scope="module")
def compared(shipped, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    run = dooly("compare", CONFIG, "--store", shipped, "--env", "sdpa", "--env", "sdpa-efficient", "--batch", BATCH,
                "--synthetic", "poisson:rate=2,n=60,prompt=256,output=16", "--out", out, "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), shipped


def test_step_side_by_side_matches_each_environments_prediction(compared):
    from dooly.compile import load_model
    from dooly.predict.cli import parse_batch

    result, shipped = compared
    store = Store(shipped, create=False)
    graph = load_model(CONFIG)
    for side, backend in enumerate(("sdpa", "sdpa-efficient")):
        expected = step_latency(graph, parse_batch(BATCH), store, backend)
        assert result["step"]["total_us"][side] == pytest.approx(expected, rel=1e-6)
        assert sum(r["us"][side] for r in result["step"]["ops"]) == pytest.approx(expected, rel=1e-6)
    attention = [r for r in result["step"]["ops"] if r["op"] == "aten.scaled_dot_product_attention"]
    assert len(attention) == 1 and attention[0]["us"][0] != attention[0]["us"][1]  # the backends differ there
    mm = [r for r in result["step"]["ops"] if r["op"] == "aten.mm"]
    assert mm and all(r["us"][0] == r["us"][1] for r in mm)  # and share their GEMM measurements
    env = resolve_environment(store, "sdpa-efficient")
    assert result["sides"][1]["environment"] == env
    assert load_predictor(graph, store, env).predict([parse_batch(BATCH)]).parts.total_us[0] == pytest.approx(
        result["step"]["total_us"][1], rel=1e-6)


def test_simulation_side_by_side_with_one_plot(compared):
    from pathlib import Path

    result, _ = compared
    sim = result["simulation"]
    a, b = sim["summaries"]
    assert a["requests"] == b["requests"] == sim["requests"] == 60
    assert a["ttft_ms"]["mean"] > 0 and b["ttft_ms"]["mean"] > 0 and a["ttft_ms"] != b["ttft_ms"]
    assert a["throughput_tok_s"] > 0 and b["throughput_tok_s"] > 0
    assert Path(sim["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(shipped):
    run = dooly("compare", CONFIG, "--store", shipped, "--env", "sdpa", "--env", "sdpa-efficient", "--batch", BATCH)
    assert run.returncode == 0, run.stderr
    assert "B/A" in run.stdout and "aten.scaled_dot_product_attention" in run.stdout and "total" in run.stdout


@pytest.mark.parametrize("args, message", [
    (["--env", "sdpa", "--env", "nowhere", "--batch", BATCH], "no environment 'nowhere'"),
    (["--env", "sdpa", "--batch", BATCH], "two --env"),
    (["--env", "sdpa", "--env", "sdpa-efficient", "--batch", "decode:-1@5"], "bad batch group"),
    (["--env", "sdpa", "--env", "sdpa-efficient"], "nothing to compare"),
])
def test_bad_input_is_one_error_line(shipped, args, message):
    run = dooly("compare", CONFIG, "--store", shipped, *args)
    assert run.returncode == 2 and run.stderr.startswith("error:") and message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_missing_store(tmp_path):
    run = dooly("compare", CONFIG, "--store", tmp_path / "none.sqlite", "--env", "sdpa", "--env", "sdpa-efficient",
                "--batch", BATCH)
    assert run.returncode == 2 and "no such store" in run.stderr
