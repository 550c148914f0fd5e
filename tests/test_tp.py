"""Tensor parallelism on the CPU: the shard pass over the engine's TP plan, collectives as IR ops, dedup of
sharded compute against single-GPU signatures, and the collective microbenchmark run by two gloo processes."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, dooly, find, tiny_llama, zoo_graph

from dooly.compile import compile_model
from dooly.config import parse_config
from dooly.errors import DoolyError
from dooly.ir.text import dumps, loads
from dooly.passes import codegen
from dooly.passes.canonicalize import uses
from dooly.passes.shard import ALL_GATHER, ALL_REDUCE


def tp_graph(name: str, tp: int, **overrides):
    data = tiny_llama(**overrides) if name == "tiny" else json.loads((ROOT / "configs" / f"{name}.json").read_text())
    return compile_model(parse_config(data, name, name), tp=tp)


def shapes(op):
    return [[d.value for d in t.shape] for t in op.inputs]


def test_one_rank_of_llama_3_1_8b_at_tp2():
    g = tp_graph("llama-3.1-8b", 2)
    assert shapes(find(g, "self_attn.q_proj", "aten.mm")[0])[1] == [4096, 2048]
    assert shapes(find(g, "self_attn.k_proj", "aten.mm")[0])[1] == [4096, 512]
    assert shapes(find(g, "mlp.down_proj", "aten.mm")[0])[1] == [7168, 4096]
    q, k, *_ = shapes(find(g, "self_attn", "aten.scaled_dot_product_attention")[0])
    assert q[1] == 16 and k[1] == 16
    cache = find(g, "self_attn", "aten.index_copy_")[0]
    assert cache.inputs[0].shape[1].value == 4 and "tp" in cache.inputs[0].shape[1].expr  # the KV cache shards too
    reduces = [op for op in g.ops if op.name == ALL_REDUCE]
    assert sorted(op.scope for op in reduces) == ["model.layers.*.mlp.down_proj", "model.layers.*.self_attn.o_proj"]
    assert all(op.count == 32 and [d.expr for d in op.inputs[0].shape] == ["T", "hidden_size"] for op in reduces)
    (gather,) = [op for op in g.ops if op.name == ALL_GATHER]
    assert gather.inputs[0].shape[1].value == 128256 // 2
    embedding = find(g, "embed_tokens", "aten.embedding")[0]
    assert shapes(embedding)[0] == [128256, 4096]  # not sharded: the plan leaves it replicated
    # the residual add after o_proj reads the all-reduced sum, not the partial product
    after = g.ops[g.ops.index(reduces[0]) + 1]
    assert any(t.src == g.ops.index(reduces[0]) for t in after.inputs)
    assert loads(dumps(g)).to_json() == g.to_json()


def test_kv_heads_are_replicated_past_their_count():
    g = tp_graph("llama-3.1-8b", 16)
    q, k, *_ = shapes(find(g, "self_attn", "aten.scaled_dot_product_attention")[0])
    cache = find(g, "self_attn", "aten.index_copy_")[0]
    assert q[1] == 2 and cache.inputs[0].shape[1].value == 1 and k[1] == 2


def test_sharded_compute_dedups_against_a_single_gpu_model_of_those_shapes():
    ranked = tp_graph("tiny", 2, num_attention_heads=8, num_key_value_heads=4)
    single = tp_graph("tiny", 1, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
                      vocab_size=512)
    known = {u.signature.hash for u in uses(single, "paged|sdpa")}
    new = {ranked.ops[u.op_index].name for u in uses(ranked, "paged|sdpa") if u.signature.hash not in known}
    # left: the collectives, and the argmax over the gathered logits (the full vocabulary of 1024)
    assert new == {ALL_REDUCE, ALL_GATHER, "aten.argmax"}


@pytest.mark.parametrize("name, tp, message", [
    ("llama-3.1-8b", 3, "do not split over 3 ranks"),
    ("phi-3-mini", 2, "not supported yet"),
    ("mixtral-8x7b", 2, "not supported yet"),
])
def test_what_cannot_be_sharded_says_why(name, tp, message):
    with pytest.raises(DoolyError, match=message):
        tp_graph(name, tp)


def test_compile_cli_tp(tmp_path):
    r = dooly("compile", ROOT / "configs" / "llama-3.2-1b.json", "--tp", "2", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert ALL_REDUCE in (tmp_path / "model.ir").read_text()
    r = dooly("compile", ROOT / "configs" / "llama-3.2-1b.json", "--tp", "0", "--out", tmp_path)
    assert r.returncode == 2 and "positive" in r.stderr


def test_collective_benchmark_sums_across_two_gloo_ranks(tmp_path):
    g = tp_graph("tiny", 2)
    sigs = {u.signature.hash: u.signature for u in uses(g, "paged|sdpa") if u.signature.family == "collective"}
    paths = codegen.write(list(sigs.values()), tmp_path)
    for sig in sigs.values():
        runs = [subprocess.Popen([sys.executable, str(paths[sig.hash]), "--points", f"{sig.axes[0]}=1,8",
                                  "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=ROOT, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
                                                "MASTER_PORT": "29577"}) for rank in (0, 1)]
        for run in runs:
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, err
            lines = [json.loads(x) for x in out.splitlines()]
            assert [line["point"][sig.axes[0]] for line in lines] == [1, 8]
            assert all(line["median_us"] > 0 for line in lines)
    reduce = next(h for h, sig in sigs.items() if sig.op == ALL_REDUCE)
    alone = subprocess.run([sys.executable, str(paths[reduce]), "--points", "M=1", "--device", "cpu"],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MASTER_PORT": "29578"})
    assert alone.returncode != 0 and "runs over 2 ranks" in alone.stderr


def test_tp_prediction_needs_measured_collectives(shipped, tmp_path):
    r = dooly("compile", ROOT / "configs" / "llama-3.2-1b.json", "--tp", "2", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    r = dooly("predict", tmp_path / "model.ir", "--store", shipped, "--batch", "decode:4@128")
    assert r.returncode == 2 and "_c10d_functional.all_reduce" in r.stderr and "Traceback" not in r.stderr


def test_single_gpu_ir_is_unchanged_by_the_tp_machinery():
    assert not zoo_graph("llama-3.2-1b").meta.tp_plan
