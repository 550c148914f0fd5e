"""`dooly explore`: SLO and grid parsing, the Pareto front, stopping a simulation once its SLO is lost, local
workers, resuming an interrupted search, and bad input."""

import argparse
import json
import random

import pytest
from helpers import ROOT, dooly

from dooly.errors import DoolyError
from dooly.sim import explore
from dooly.sim.simulator import EngineSettings, StepTime, simulate, summary

MODEL = ROOT / "configs" / "llama-3.2-1b.json"
WORKLOAD = "poisson:rate=6,n=60,prompt=lognormal:384:0.6,output=lognormal:48:0.4"
SLO = "ttft_p90=400ms,tpot_p90=120ms"


def setting_for(store, grid: str, slo: str = SLO):
    """A search's setting and configurations on the default backend of `store`."""
    from dooly.explore import build

    args = argparse.Namespace(config=MODEL, store=[store], workload=None, synthetic=WORKLOAD, seed=0, slo=slo,
                              gpu_memory_gib=None)
    return build(args, explore.parse_grid(f"backend=sdpa;max_tokens=2048;{grid}"))[:2]


def test_slo_parses_metrics_statistics_and_units():
    got = explore.parse_slo("ttft_p90=500ms, tpot_p99=0.05s,e2e_mean=20s")
    assert [(o.name, o.limit_ms) for o in got] == [("ttft_p90", 500.0), ("tpot_p99", 50.0), ("e2e_mean", 20000.0)]


@pytest.mark.parametrize("text", ["ttft_p90", "ttft_p90=500", "ttft_p95=1s", "latency_p90=1s", "ttft_p90=-1ms",
                                  "ttft_p90=fastms", "ttft_p90=infs", "", "ttft_p90=1s,ttft_p90=2s"])
def test_an_slo_that_does_not_parse_is_refused(text):
    with pytest.raises(DoolyError):
        explore.parse_slo(text)


def test_grid_parses_axes_and_expands_their_product():
    grid = explore.parse_grid("max_seqs=64,128;cuda_graphs=on,off; scheduler=vllm")
    assert grid == {"max_seqs": [64, 128], "cuda_graphs": [True, False], "scheduler": ["vllm"]}
    full = {**explore.DEFAULT_GRID, "gpu": ["h100"], "engine": ["e"], "backend": ["sdpa", "sdpa-math"], **grid}
    configs = explore.expand(full)
    assert len(configs) == 2 * 2 * 2 * len(explore.DEFAULT_GRID["max_tokens"]) == len({c.key() for c in configs})


@pytest.mark.parametrize("spec", ["colour=red", "max_seqs=0", "max_seqs=", "cuda_graphs=maybe", "scheduler=sglang",
                                  "tp=two", "max_seqs=8;max_seqs=16"])
def test_a_grid_that_does_not_parse_is_refused(spec):
    with pytest.raises(DoolyError):
        explore.parse_grid(spec)


def test_the_front_is_every_undominated_row_meeting_the_slo():
    rng = random.Random(3)
    latency = explore.Objective("ttft", "p90", 1.0)
    for _ in range(50):
        rows = [{"meets_slo": rng.random() < 0.7, "throughput_per_gpu": float(rng.randint(1, 8)),
                 "ttft_ms": {"p90": float(rng.randint(1, 8))}, "id": i, "max_seqs": i}
                for i in range(rng.randint(0, 30))]
        front = explore.pareto(rows, latency)
        assert explore.pareto(rng.sample(rows, len(rows)), latency) == front  # whichever worker finished first

        def beats(a, b):
            (ta, la), (tb, lb) = ((r["throughput_per_gpu"], r["ttft_ms"]["p90"]) for r in (a, b))
            return ta >= tb and la <= lb and (ta, la) != (tb, lb)

        ok = [r for r in rows if r["meets_slo"]]
        assert {r["id"] for r in front} == {r["id"] for r in ok if not any(beats(o, r) for o in ok)}
        assert [r["ttft_ms"]["p90"] for r in front] == sorted(r["ttft_ms"]["p90"] for r in front)


def test_a_simulation_stopped_once_its_slo_is_lost_agrees_with_the_full_run(shipped):
    setting, configs = setting_for(shipped, "max_seqs=2,8,64;cuda_graphs=off,on")
    rows = explore.evaluate_all(setting, configs)
    assert {r["meets_slo"] for r in rows} == {True, False}
    for config, row in zip(configs, rows):
        engine_settings = EngineSettings(use_cuda_graph=config.cuda_graphs, max_batch_tokens=config.max_tokens)
        scheduler = explore.scheduler_for(config, setting.cache_tokens[config.gpu, config.tp, config.max_tokens])
        step_time = StepTime(setting.predictors[config.deployment], engine_settings)
        full = summary(simulate(setting.requests, scheduler, step_time))
        missed = [o.name for o in setting.objectives if o.value(full) > o.limit_ms]
        assert row["meets_slo"] == (not missed)
        if missed:
            assert row["missed"] in missed
        else:
            assert row["ttft_ms"] == full["ttft_ms"] and row["throughput_per_gpu"] == full["throughput_tok_s"]
    assert any("steps" not in r for r in rows)  # some stopped early


def test_local_workers_give_the_rows_of_one_process(shipped):
    setting, configs = setting_for(shipped, "max_seqs=8,64;scheduler=cb,vllm")
    tasks = explore.chunks(configs, 2)
    assert len(tasks) > 1 and sorted(c.key() for t in tasks for c in t) == sorted(c.key() for c in configs)
    forked = [r for batch in explore.local_map(setting, tasks, 2) for r in batch]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(forked, key=key) == sorted(explore.evaluate_all(setting, configs), key=key)


def _explore(shipped, out, *extra):
    result = dooly("explore", MODEL, "--store", shipped, "--synthetic", WORKLOAD, "--slo", SLO, "--grid",
                   "backend=sdpa;max_tokens=2048;max_seqs=8,64;cuda_graphs=off,on", "--out", out, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_explore_reports_the_front_and_resumes_an_interrupted_search(shipped, tmp_path):
    out = tmp_path / "out"
    report = _explore(shipped, out)
    assert report["configurations"] == report["simulated"] == 8 and report["resumed"] == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    assert len(rows) == 8 and report["front"] == explore.pareto(rows, explore.parse_slo(SLO)[0])
    assert report["front"] and all(r["meets_slo"] for r in report["front"])
    assert (out / "pareto.png").stat().st_size > 10_000
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])  # killed while writing a row
    again = _explore(shipped, out)
    assert again["simulated"] == 5 and again["resumed"] == 3 and again["front"] == report["front"]
    other = _explore(shipped, out, "--seed", "1")  # another workload: nothing to resume
    assert other["simulated"] == 8


def test_explore_prints_the_front_as_a_table(shipped, tmp_path):
    result = dooly("explore", MODEL, "--store", shipped, "--synthetic", WORKLOAD, "--slo", SLO, "--grid",
                   "backend=sdpa;max_tokens=2048;max_seqs=8;cuda_graphs=off;scheduler=cb,vllm", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Pareto front" in result.stdout and "tok/s/GPU" in result.stdout and "scheduler" in result.stdout
    assert "2 configurations x 60 requests" in result.stdout and "0 tasks retried" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--slo", "ttft=fast"], "SLO 'ttft=fast' does not parse"),
    (["--slo", SLO, "--grid", "backend=sdpa-flash"], "grid: backend sdpa-flash is in none of the stores"),
    (["--slo", SLO, "--grid", "backend=sdpa;tp=1,2"], "grid: tp=2 is not in"),
    (["--slo", SLO, "--grid", "warp=9"], "grid: 'warp=9' is not AXIS=VALUE"),
    (["--slo", SLO, "--latency", "ttft_p95"], "--latency ttft_p95: expected METRIC_STAT"),
])
def test_bad_input_is_one_error_line(shipped, tmp_path, args, message):
    result = dooly("explore", MODEL, "--store", shipped, "--synthetic", WORKLOAD, "--out", tmp_path, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
