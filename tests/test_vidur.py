"""The Vidur export: Vidur's column names and units, rows Vidur's filters keep for the model, and (where Vidur's
venv exists, as .ci/run makes it) Vidur simulating from the exported files."""

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, dooly

# Vidur's own column lists (vidur/profiling and its sklearn execution-time predictor), written out here so that a
# change on Dooly's side cannot silently agree with itself
STATS = ("min", "max", "mean", "median", "std")
MLP_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
MLP_COLUMNS = [f"time_stats.{op}.{s}" for op in MLP_OPS for s in STATS] + [
    "n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp", "num_tokens",
    "num_tensor_parallel_workers"]
ATTENTION_COLUMNS = [f"time_stats.{op}.{s}" for op in ("attn_prefill", "attn_decode", "attn_kv_cache_save")
                     for s in STATS] + [
    "n_embd", "n_q_head", "n_kv_head", "block_size", "num_tensor_parallel_workers", "batch_size",
    "prefill_chunk_size", "kv_cache_size", "is_prefill"]
VIDUR_PYTHON = Path(os.environ.get("DOOLY_VIDUR_PYTHON", ROOT / ".venv-vidur" / "bin" / "python"))


@pytest.fixture(scope="module")
def exported(shipped, tmp_path_factory):
    out = tmp_path_factory.mktemp("vidur")
    r = dooly("export-vidur", ROOT / "configs" / "qwen2.5-7b.json", "--store", shipped, "--out", out)
    assert r.returncode == 0, r.stderr
    return out, out / "compute" / "h100" / "qwen2.5-7b"


def read(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return list(rows[0].keys()), rows


def test_mlp_csv_has_vidurs_columns_and_the_models_rows(exported):
    _, folder = exported
    columns, rows = read(folder / "mlp.csv")
    assert columns == MLP_COLUMNS
    config = json.loads((ROOT / "configs" / "qwen2.5-7b.json").read_text())
    # the rows Vidur's filter keeps for this model: all of them
    for row in rows:
        assert (int(row["n_head"]), int(row["n_kv_head"]), int(row["n_embd"]), int(row["n_expanded_embd"]),
                int(row["vocab_size"]), row["use_gated_mlp"], row["num_tensor_parallel_workers"]) == (
            config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"],
            config["intermediate_size"], config["vocab_size"], "True", "1")
    tokens = [int(r["num_tokens"]) for r in rows]
    assert tokens[0] == 1 and 4096 in tokens and tokens == sorted(set(tokens))
    by_tokens = {int(r["num_tokens"]): r for r in rows}
    small, big = by_tokens[1], by_tokens[4096]
    for op in ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"):
        assert 0 < float(small[f"time_stats.{op}.median"]) < float(big[f"time_stats.{op}.median"])
    # milliseconds: a 4096 x 3584 x 37888 GEMM pair on an H100 takes about a millisecond, not a microsecond
    assert 0.3 < float(big["time_stats.mlp_up_proj.median"]) < 5


def test_attention_csv_has_prefill_and_decode_rows(exported):
    _, folder = exported
    columns, rows = read(folder / "attention.csv")
    assert columns == ATTENTION_COLUMNS
    prefill = [r for r in rows if r["is_prefill"] == "True"]
    decode = [r for r in rows if r["is_prefill"] == "False"]
    assert prefill and decode
    assert all(r["batch_size"] == "1" and float(r["time_stats.attn_decode.median"]) == 0 for r in prefill)
    assert all(r["prefill_chunk_size"] == "0" and float(r["time_stats.attn_prefill.median"]) == 0 for r in decode)
    longer = {int(r["kv_cache_size"]): float(r["time_stats.attn_decode.median"]) for r in decode
              if r["batch_size"] == "8"}
    assert longer[8192] > longer[256] > 0


def test_moe_models_are_refused(shipped, tmp_path):
    r = dooly("export-vidur", ROOT / "configs" / "mixtral-8x7b.json", "--store", shipped, "--out", tmp_path)
    assert r.returncode == 2 and "mixture-of-experts" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.vidur
@pytest.mark.skipif(not VIDUR_PYTHON.exists(), reason="no Vidur venv (.ci/run makes .venv-vidur)")
def test_vidur_simulates_from_the_export(exported, tmp_path):
    out, _ = exported
    r = subprocess.run([str(VIDUR_PYTHON), str(ROOT / "tests" / "vidur_run.py"), str(out), "--model", "qwen2.5-7b",
                        "--requests", "24", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["requests"] == 24 and result["mean_e2e_s"] > result["mean_ttft_s"] > 0
