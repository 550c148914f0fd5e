"""The vLLM harness's CPU-side pieces, and the ground truth it recorded on the GPU."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from dooly.bench.vllm_engine import CALIBRATION_PROMPTS, REPEATS, _composition, calibration_runs, model_folder

ROOT = Path(__file__).resolve().parent.parent
TRUTH = sorted((ROOT / "data" / "groundtruth" / "vllm").glob("*/*.json"))


def test_composition_reads_new_and_running_requests_and_skips_idle_ones():
    so = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="a", num_computed_tokens=32)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=["b", "c"], num_computed_tokens=[100, 7]),
        num_scheduled_tokens={"a": 480, "b": 1, "c": 0})
    assert _composition(so) == ([480, 1], [32, 100])


def test_model_folder_cuts_every_per_layer_list_to_the_reduced_depth(tmp_path):
    config = {"num_hidden_layers": 4, "layer_types": ["sliding", "full"] * 2, "mlp_only_layers": [0, 1, 2, 3],
              "vocab_size": 10, "eos_token_id": [1, 2]}
    written = json.loads((model_folder(config, 2, tmp_path) / "config.json").read_text())
    assert written["num_hidden_layers"] == 2
    assert written["layer_types"] == ["sliding", "full"] and written["mlp_only_layers"] == [0, 1]
    assert written["eos_token_id"] == [1, 2]  # a list, but not one per layer


@pytest.mark.parametrize("path", TRUTH, ids=[f"{p.parent.name}/{p.stem}" for p in TRUTH])
def test_recorded_ground_truth_is_consistent(path):
    truth = json.loads(path.read_text())
    assert truth["environment"]["engine"] == "vllm" and truth["environment"]["engine_version"] == "0.24.0"
    budget = truth["engine_config"]["max_num_batched_tokens"]
    for name, trace in truth["traces"].items():
        assert len(trace["runs"]) >= 3, name
        for run in trace["runs"]:
            for step in run["steps"]:
                assert len(step["queries"]) == len(step["computed"]) and 0 < sum(step["queries"]) <= budget
                assert step["forward_s"] > 0
            for request, (_, prompt, output) in zip(run["requests"], trace["requests"]):
                assert (request["prompt"], request["output"]) == (prompt, output)
                assert len(request["token_times"]) == output
                assert request["first_token"] >= request["arrival"]
        if name.endswith("@inf"):  # everything arrives at once: the scheduler repeats itself exactly
            steps = [[(s["queries"], s["computed"]) for s in run["steps"]] for run in trace["runs"]]
            assert all(s == steps[0] for s in steps), name


CALIBRATION = sorted((ROOT / "data" / "host" / "vllm-calibration").glob("*/*.json"))


def test_calibration_rows_are_each_compositions_median_in_the_profiled_environment(tmp_path):
    import shutil
    import statistics

    from dooly.bench.vllm_engine import record_calibration
    from dooly.store import Store

    store_path = tmp_path / "h200.sqlite"
    shutil.copy(ROOT / "data" / "h200.sqlite", store_path)
    raw = json.loads(CALIBRATION[0].read_text())
    spans, cycles = {}, {}
    for run in raw["runs"]:
        for s, after in zip(run["steps"], run["steps"][1:] + [None]):
            key = (sum(s["queries"]), len(s["queries"]))
            spans.setdefault(key, []).append(s["host_s"] * 1e6)
            if after is not None:
                cycles.setdefault(key, []).append((after["start"] - s["start"]) * 1e6)
    record_calibration(store_path, CALIBRATION[0])
    store = Store(store_path)
    env = next(e.name for e in store.environments() if e.attention_backend == "FLASH_ATTN")
    rows = {(r["point"]["T"], r["point"]["R"]): r for r in store.host(env)
            if r["phase"] == "vllm-launch" and r["point"].get("layers") == raw["layers"]}
    seen = {k for k, v in spans.items() if len(v) >= 3}
    assert set(rows) == seen and (1, 1) in seen  # once-seen compositions are left out
    t, r = next(k for k in seen if k[0] > k[1] > 1)  # a prefill among decodes
    assert rows[t, r]["median_us"] == pytest.approx(statistics.median(spans[t, r]))
    assert rows[t, r]["repetitions"] == len(spans[t, r])
    cycle = {(r["point"]["T"], r["point"]["R"]): r["median_us"] for r in store.host(env)
             if r["phase"] == "vllm-cycle" and r["point"].get("layers") == raw["layers"]}
    assert set(cycle) == {k for k, v in cycles.items() if len(v) >= 3}
    assert cycle[8, 8] == pytest.approx(statistics.median(cycles[8, 8]))  # a step's start to the next one's
    admit = {(r["point"]["T"], r["point"]["R"]): r["median_us"] for r in store.host(env)
             if r["phase"] == "vllm-admit" and r["point"].get("layers") == raw["layers"]}
    bursts = [run for run in raw["runs"] if len(run["requests"]) == 64 and all(a == 0 for a, _, _ in run["requests"])]
    assert admit[16 * 64, 64] == pytest.approx(statistics.median(run["steps"][0]["start"] * 1e6 for run in bursts))
    assert admit[16 * 64, 64] > admit[16 * 8, 8]  # each request is taken in before any is scheduled


def test_calibration_of_an_environment_the_store_lacks_is_refused(tmp_path):
    from dooly.bench.vllm_engine import record_calibration
    from dooly.errors import DoolyError
    from dooly.store import Store

    Store(tmp_path / "empty.sqlite").close()
    with pytest.raises(DoolyError, match="no environment"):
        record_calibration(tmp_path / "empty.sqlite", CALIBRATION[0])


@pytest.mark.parametrize("text", ["not json", "{}", '{"environment": {}, "layers": 2, "runs": []}',
                                  json.dumps({"environment": {k: "x" for k in ("gpu", "torch", "engine_version",
                                                                                "attention_backend", "mode")},
                                              "layers": 2, "runs": [{"steps": [{"queries": [1], "forward_s": "1",
                                                                                "host_s": 0.1}]}]})])
def test_a_malformed_calibration_file_is_one_error_line_and_exit_code_2(tmp_path, text, capsys):
    from dooly.bench.vllm_engine import main

    (tmp_path / "raw.json").write_text(text)
    assert main(["record", str(tmp_path / "raw.json"), "--store", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "calibration file" in err[0]


def test_ground_truth_refuses_a_missing_config_before_any_engine_starts(tmp_path, capsys):
    from dooly.bench.vllm_engine import main

    args = ["groundtruth", "--models", str(ROOT / "configs" / "llama-3.1-8b.json"), str(tmp_path / "nope.json"),
            "--out", str(tmp_path / "gt")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope.json: no such file" in err[0]
    assert not (tmp_path / "gt").exists()


def test_several_models_record_their_ground_truth_one_process_each(tmp_path, monkeypatch):
    """A closed engine keeps its GPU memory: the second model's engine in the same process found 10 of 140 GiB."""
    from dooly.bench import vllm_engine

    children = []
    monkeypatch.setattr(vllm_engine.subprocess, "run", lambda cmd, check: children.append(cmd))
    configs = [str(ROOT / "configs" / f"{m}.json") for m in ("qwen3-8b", "mistral-7b-v0.3")]
    assert vllm_engine.main(["groundtruth", "--models", *configs, "--out", str(tmp_path), "--backend", "FLASHINFER",
                             "--traces", "chat", "--layers", "qwen3-8b=4"]) == 0
    assert [c[c.index("--models") + 1] for c in children] == configs
    for c in children:
        assert c[c.index("--backend") + 1] == "FLASHINFER" and c[c.index("--traces") + 1] == "chat"
        assert c[c.index("--layers") + 1] == "qwen3-8b=4" and "--eager" not in c
    children.clear()
    assert vllm_engine.main(["groundtruth", "--models", *configs, "--out", str(tmp_path), "--budget-s", "0"]) == 0
    assert children == []


def test_a_v1_runner_calibration_is_kept_apart_from_the_v2_one(tmp_path):
    import shutil

    from dooly.bench.vllm_engine import record_calibration
    from dooly.errors import DoolyError
    from dooly.store import Store

    store_path = tmp_path / "h200.sqlite"
    shutil.copy(ROOT / "data" / "h200.sqlite", store_path)
    raw = json.loads(CALIBRATION[0].read_text())
    (tmp_path / "v1-16.json").write_text(json.dumps({**raw, "runner": "v1"}))
    store = Store(store_path)
    env = next(e.name for e in store.environments() if e.attention_backend == "FLASH_ATTN")
    before = {(r["phase"], json.dumps(r["point"])): r["median_us"] for r in store.host(env)
              if "runner" not in r["point"]}
    store.close()
    record_calibration(store_path, tmp_path / "v1-16.json")
    store = Store(store_path)
    after = {(r["phase"], json.dumps(r["point"])): r["median_us"] for r in store.host(env)}
    store.close()
    added = {k: v for k, v in after.items() if k not in before}
    assert added and all(json.loads(point)["runner"] == 1 for _, point in added)
    assert {k: after[k] for k in before} == before  # the V2 rows stay as they were
    (tmp_path / "bad.json").write_text(json.dumps({**raw, "runner": "v3"}))
    with pytest.raises(DoolyError, match="a runner"):
        record_calibration(store_path, tmp_path / "bad.json")


def test_a_recalibration_replaces_its_depths_rows_whole(tmp_path):
    import shutil

    from dooly.bench.vllm_engine import record_calibration
    from dooly.store import Store

    store_path = tmp_path / "h200.sqlite"
    shutil.copy(ROOT / "data" / "h200.sqlite", store_path)
    raw = json.loads(CALIBRATION[0].read_text())
    # the same depth again without its decode batches of one request: those compositions are no longer seen
    kept = [run for run in raw["runs"] if len(run["requests"]) != 1 or run["requests"][0][2] != 48]
    (tmp_path / "again.json").write_text(json.dumps({**raw, "runs": kept}))

    def rows():
        store = Store(store_path)
        env = next(e.name for e in store.environments() if e.attention_backend == "FLASH_ATTN")
        found = {(r["phase"], json.dumps(r["point"], sort_keys=True)) for r in store.host(env)}
        store.close()
        return found

    record_calibration(store_path, CALIBRATION[0])
    first = rows()
    record_calibration(store_path, tmp_path / "again.json")
    second = rows()
    depth = lambda found: {k for k in found if json.loads(k[1]).get("layers") == raw["layers"]}  # noqa: E731
    assert second - depth(second) == first - depth(first)  # other depths and runners stay
    assert depth(second) < depth(first)  # the compositions only the first file had are gone


def test_calibration_repetitions_take_turns():
    prefills = [tuple(map(tuple, r)) for r in calibration_runs() if any(out == 1 for _, _, out in r)]
    n = 3 * len(CALIBRATION_PROMPTS)  # lone at once, lone after an idle spell, among decodes
    assert len(prefills) == n * REPEATS and len(set(prefills[:n])) == n
    assert all(prefills[i] == prefills[i + n] for i in range(len(prefills) - n))
