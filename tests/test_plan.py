"""`dooly plan`: unique signatures per model against the store, and the GPU-seconds saved over per-model profiling."""

import json

from helpers import ROOT, dooly, zoo_graph
from test_store import env, stats

from dooly.passes.canonicalize import uses
from dooly.plan import plan
from dooly.store import Store

LLAMA, MISTRAL = ROOT / "configs" / "llama-3.1-8b.json", ROOT / "configs" / "mistral-7b-v0.3.json"




def test_mistral_after_llama_adds_almost_nothing(tmp_path):
    out = dooly("plan", LLAMA, MISTRAL, "--store", tmp_path / "s.sqlite", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    llama, mistral = result["models"]
    assert set(llama) >= {"model", "ops", "unique", "in_store", "new", "est_gpu_s"}
    assert llama["in_store"] == 0 and llama["new"] == llama["unique"] > 40
    assert mistral["new"] <= 3 and mistral["in_store"] == mistral["unique"] - mistral["new"]
    assert mistral["est_gpu_s"] < 0.1 * llama["est_gpu_s"]
    assert result["dooly_gpu_s"] < result["baseline_gpu_s"]
    assert abs(result["saving"] - (1 - result["dooly_gpu_s"] / result["baseline_gpu_s"])) < 1e-3


def test_rich_table(tmp_path):
    out = dooly("plan", LLAMA, MISTRAL, "--store", tmp_path / "s.sqlite")
    assert out.returncode == 0 and "mistral-7b-v0.3" in out.stdout and "saving of" in out.stdout


def test_measured_signatures_cost_what_they_cost(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.add_environment(env())
    g = zoo_graph("llama-3.1-8b")
    for u in uses(g, "paged|sdpa"):
        store.add_signature(u.signature)
        store.record(u.signature.hash, "h100/sdpa", {a: 1 for a in u.signature.axes}, stats(1.0))
        store.finish_sweep(u.signature.hash, "h100/sdpa", 0.25, 1)
    swept = store.finished_sweeps("h100/sdpa")
    rows, dooly_s, baseline_s = plan([g, zoo_graph("mistral-7b-v0.3")], "paged|sdpa", swept)
    assert rows[0].new == 0 and rows[0].est_gpu_s == 0 and rows[0].in_store == rows[0].unique
    assert 0 < rows[1].est_gpu_s == dooly_s < baseline_s
    out = dooly("plan", LLAMA, "--store", tmp_path / "s.sqlite", "--env", "h100/sdpa", "--json")
    assert json.loads(out.stdout)["models"][0]["new"] == 0


def test_unknown_environment_and_bad_store_exit_2(tmp_path):
    Store(tmp_path / "s.sqlite").close()
    out = dooly("plan", LLAMA, "--store", tmp_path / "s.sqlite", "--env", "nope")
    assert out.returncode == 2 and "no environment 'nope'" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "bad.sqlite").write_bytes(b"\x00junk" * 500)
    out = dooly("plan", LLAMA, "--store", tmp_path / "bad.sqlite")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
