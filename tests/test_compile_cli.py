"""`python -m dooly.compile`: the dumps it writes and its answer to bad input (one line, exit code 2)."""

import json
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from dooly.ir import Graph, loads


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dooly.compile", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def test_compile_writes_both_dumps_and_prints_a_summary(tmp_path):
    out = run(ROOT / "configs" / "llama-3.2-1b.json", "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "kernels per step" in out.stdout and "dim labels" in out.stdout
    text = (tmp_path / "model.ir").read_text()
    data = json.loads((tmp_path / "model.json").read_text())
    assert loads(text).to_json() == Graph.from_json(data).to_json()
    op = data["ops"][0]
    assert {"op", "count", "scope", "inputs", "attrs"} <= op.keys()
    dim = data["ops"][0]["inputs"][0]["shape"][0]
    assert dim["kind"] in ("config", "request", "mix", "const") and "expr" in dim and "value" in dim
    kinds = {d["kind"]: d["value"] for o in data["ops"] for t in o["inputs"] + o["outputs"]
             for d in t["shape"] + t.get("strides", [])}
    assert kinds["request"] is None and kinds["mix"] is None and isinstance(kinds["config"], int)


def test_json_flag_prints_the_ir(tmp_path):
    out = run(ROOT / "configs" / "llama-3.2-1b.json", "--out", tmp_path, "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["model"] == "llama-3.2-1b"


def _bad(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _llama(**changes):
    data = json.loads((ROOT / "configs" / "llama-3.2-1b.json").read_text())
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize("case,content,message", [
    ("missing", None, "no such file"),
    ("broken.json", '{"model_type": "llama", ', "invalid JSON at line 1"),
    ("list.json", "[1, 2]", "must hold a JSON object"),
    ("untyped.json", json.dumps(_llama(model_type=None)), "no 'model_type'"),
    ("unknown.json", json.dumps(_llama(model_type="not-a-model")), "unknown architecture 'not-a-model'"),
    ("nonutf8.json", b'{"model_type": "\xff"}', "not UTF-8 text (byte 16 is 0xff)"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("act.json", json.dumps(_llama(hidden_act="nope")), "llama: unknown activation hidden_act='nope'"),
    ("rope.json", json.dumps(_llama(rope_scaling={"rope_type": "bogus", "factor": 2.0})), "unknown rope_type 'bogus'"),
    ("dtype.json", json.dumps(_llama(torch_dtype="float77")), "transformers rejects this config"),
    ("theta.json", json.dumps(_llama(rope_theta="abc")), "'rope_theta' must be a number or a list of them, got 'abc'"),
    ("eps.json", json.dumps(_llama(rms_norm_eps="abc")), "field 'rms_norm_eps'"),
    ("thetas.json", json.dumps(_llama(layer_rope_theta=[1e4, "x"])), "field 'layer_rope_theta' must be a number or"),
    ("headdim.json", json.dumps(_llama(head_dim=7)), "llama: the engine's step raises: RuntimeError"),
    ("deep-model.json", json.dumps(_llama(num_hidden_layers=2**40)), "over the limit of 1024 (--max-layers"),
    ("composite.json", json.dumps({"model_type": "gemma3"}), "its text model ('text_config') is missing"),
    ("mamba.json", json.dumps({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
                               "num_attention_heads": 4}), "mamba: the engine cannot build this model: ValueError"),
    ("nohidden.json", json.dumps(_llama(hidden_size=None)), "'hidden_size' is missing"),
    ("zero.json", json.dumps(_llama(num_attention_heads=0)), "'num_attention_heads' must be a positive integer"),
    ("negative.json", json.dumps(_llama(vocab_size=-5)), "'vocab_size' must be a positive integer"),
    ("text.json", json.dumps(_llama(intermediate_size="8192")), "'intermediate_size' must be a positive integer"),
    ("gqa.json", json.dumps(_llama(num_key_value_heads=5)), "not a multiple of num_key_value_heads"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, case, content, message):
    path = tmp_path / case if content is None else _bad(tmp_path, case, content)
    start = time.perf_counter()
    out = run(path, "--out", tmp_path / "out")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 120  # refused before any unbounded work (2**40 layers)


def test_bad_options_exit_2(tmp_path):
    out = run(ROOT / "configs" / "llama-3.2-1b.json", "--frontend", "nope")
    assert out.returncode == 2 and "Traceback" not in out.stderr


TENSOR_DTYPE = '"dtype": "bf16",\n     "shape"'


@pytest.mark.parametrize("damage", [lambda t: t[: len(t) // 2],
                                    lambda t: t.replace(TENSOR_DTYPE, TENSOR_DTYPE.replace("bf16", "bf17"), 1)])
def test_a_damaged_cache_entry_is_compiled_again(tmp_path, monkeypatch, damage):
    from dooly.compile import cached_compile
    from dooly.config import load_config

    monkeypatch.setenv("DOOLY_CACHE", str(tmp_path))
    cfg = load_config(ROOT / "configs" / "llama-3.2-1b.json")
    graph = cached_compile(cfg)
    (entry,) = (tmp_path / "ir").glob("*.json")
    damaged = damage(entry.read_text())
    assert damaged != entry.read_text()
    entry.write_text(damaged)
    assert cached_compile(cfg).dumps_json() == graph.dumps_json()
    assert entry.read_text() == graph.dumps_json()
