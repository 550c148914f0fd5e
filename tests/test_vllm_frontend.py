"""vLLM's serving step captured, labelled and collapsed: every label checked here follows from vLLM's model code.

Needs the `vllm` extra (its own venv); skipped elsewhere.
"""

import functools
import os

import pytest

vllm = pytest.importorskip("vllm")

from helpers import ROOT, exprs, find, tiny_llama, zoo_graph  # noqa: E402
from helpers import compile_dict as compile_helper  # noqa: E402

from dooly.ir import LayerGroup, dumps, loads  # noqa: E402

VLLM_ONLY = sorted(p.stem for p in (ROOT / "configs" / "vllm").glob("*.json"))  # what only vLLM runs
GOLDEN = ROOT / "golden" / "vllm"
HEADER = "Dooly IR of a vLLM serving step. Regenerate: DOOLY_UPDATE_GOLDEN=1 pytest -m vllm tests/test_vllm_frontend.py"

pytestmark = pytest.mark.vllm

QKV = "head_dim*num_attention_heads + 2*head_dim*num_key_value_heads"
PADDED_VOCAB = "64*((vocab_size + 63)//64)"  # VocabParallelEmbedding / ParallelLMHead pad the vocabulary to 64


def vllm_graph(name: str):
    return zoo_graph(name, "vllm")


@functools.lru_cache(maxsize=None)
def vllm_only_graph(name: str):
    from dooly.compile import compile_model
    from dooly.config import load_config

    return compile_model(load_config(ROOT / "configs" / "vllm" / f"{name}.json"), frontend="vllm")


def compile_dict(data: dict):
    return compile_helper(data, frontend="vllm")


def _mm(graph, scope):
    (op,) = [o for o in find(graph, scope) if o.name in ("aten.mm", "aten.addmm")]
    return op


def _each(graph, scope, name):
    """The op at `scope`, the same in every kind of layer it appears in, and how many times a step runs it."""
    ops = find(graph, scope, name)
    assert len({tuple(tuple(exprs(t)) for t in op.tensors()) for op in ops}) == 1
    return ops[0], sum(op.count for op in ops)


def _attention(graph):
    (op,) = find(graph, "self_attn.attn", "vllm.unified_attention_with_output")
    return op


def test_llama_serving_step():
    g = vllm_graph("llama-3.1-8b")
    assert g.meta.frontend == "vllm" and g.meta.engine == "vllm" and g.meta.attention == "FLASH_ATTN"
    assert g.meta.engine_version == vllm.__version__
    qkv = _mm(g, "self_attn.qkv_proj")
    assert exprs(qkv.inputs[0]) == ["T", "hidden_size"]
    assert exprs(qkv.outputs[0]) == ["T", QKV] and qkv.outputs[0].shape[1].value == 6144
    gate_up, down = _mm(g, "mlp.gate_up_proj"), _mm(g, "mlp.down_proj")
    assert exprs(gate_up.outputs[0]) == ["T", "2*intermediate_size"] and gate_up.outputs[0].shape[1].value == 28672
    assert exprs(down.inputs[0]) == ["T", "intermediate_size"] and exprs(down.outputs[0]) == ["T", "hidden_size"]
    logits = _mm(g, "logits_processor")  # on the R rows the runner selects: one per request
    assert exprs(logits.inputs[0]) == ["R", "hidden_size"] and exprs(logits.outputs[0]) == ["R", PADDED_VOCAB]
    assert logits.outputs[0].shape[1].value == 128256
    (argmax,) = find(g, "engine.sample", "aten.argmax")  # the cut back to vocab_size keeps all: 128256 % 64 == 0
    assert exprs(argmax.inputs[0]) == ["R", PADDED_VOCAB] and argmax.inputs[0].dtype == "f32"


def test_llama_attention_carries_the_batch_layout():
    g = vllm_graph("llama-3.1-8b")
    attn = _attention(g)
    q, k, v, out = attn.inputs[:4]
    assert exprs(q) == ["T", "num_attention_heads", "head_dim"]
    assert exprs(k) == exprs(v) == ["T", "num_key_value_heads", "head_dim"]
    assert exprs(out) == ["T", "num_attention_heads", "head_dim"] and exprs(attn.outputs[0]) == exprs(out)
    query_start_loc, seq_lens, block_table = attn.inputs[-3:]
    assert exprs(query_start_loc) == ["R + 1"] and exprs(seq_lens) == ["R"] and query_start_loc.dtype == "i32"
    assert exprs(block_table) == ["R", str(131072 // 16)]  # max_model_len / block size: the runner's BlockTable
    assert {d.kind for t in attn.inputs[-3:] for d in t.shape[:1]} == {"request"}
    assert attn.attrs["max_seq_len"] == {"sym": "Kmax"} and attn.attrs["seq_lens_sum"] == {"sym": "K"}
    assert attn.attrs["max_query_len"] == {"sym": "Tmax"}
    assert "layer_name" not in attn.attrs
    (write,) = find(g, "self_attn.attn", "vllm.unified_kv_cache_update")
    assert exprs(write.inputs[-1]) == ["T"] and write.inputs[-1].dtype == "i64"  # slot_mapping
    o_proj = _mm(g, "self_attn.o_proj")  # reads what the attention op wrote into its `output` argument
    assert g.ops[o_proj.inputs[0].src] is attn and exprs(o_proj.inputs[0]) == ["T", "head_dim*num_attention_heads"]
    assert g.meta.request_symbols == ("K", "Kmax", "R", "T", "Tmax")


def test_llama_layers_collapse():
    g = vllm_graph("llama-3.1-8b")
    assert g.meta.layer_groups == (LayerGroup((0,), 32),)
    down = _mm(g, "mlp.down_proj")
    assert down.count == 32 and down.scope == "model.layers.*.mlp.down_proj"
    assert _attention(g).count == 32 and _mm(g, "logits_processor").count == 1


def test_qwen2_head_size_comes_from_hidden_size():
    # vLLM's Qwen2Attention takes hidden_size // num_heads as its head size; it never reads config.head_dim
    g = vllm_graph("qwen2.5-7b")
    head = "(hidden_size//num_attention_heads)"
    qkv = _mm(g, "self_attn.qkv_proj")
    assert qkv.name == "aten.addmm"  # the fused projection keeps Qwen2's bias
    width = f"num_attention_heads*{head} + 2*num_key_value_heads*{head}"
    assert exprs(qkv.outputs[0]) == ["T", width] and qkv.outputs[0].shape[1].value == 28 * 128 + 2 * 4 * 128
    assert exprs(qkv.inputs[0]) == [width]  # the bias
    assert exprs(_attention(g).inputs[0]) == ["T", "num_attention_heads", head]
    assert exprs(_mm(g, "mlp.gate_up_proj").outputs[0]) == ["T", "2*intermediate_size"]
    assert exprs(_mm(g, "mlp.down_proj").inputs[0]) == ["T", "intermediate_size"]
    assert exprs(_mm(g, "logits_processor").outputs[0]) == ["R", PADDED_VOCAB]
    assert g.meta.layer_groups == (LayerGroup((0,), 28),)


def test_mixtral_experts_run_as_one_op():
    g = vllm_graph("mixtral-8x7b")
    assert exprs(_mm(g, "self_attn.qkv_proj").outputs[0]) == ["T", QKV]
    router = _mm(g, "block_sparse_moe.gate")
    assert exprs(router.outputs[0]) == ["T", "num_local_experts"] and router.outputs[0].shape[1].value == 8
    (moe,) = find(g, "block_sparse_moe.experts", "vllm.moe_forward")
    assert g.ops[moe.inputs[1].src] is router
    w13, w2 = moe.inputs[2:]
    assert exprs(w13) == ["num_local_experts", "2*intermediate_size", "hidden_size"]
    assert exprs(w2) == ["num_local_experts", "hidden_size", "intermediate_size"]
    assert moe.attrs["top_k"] == {"sym": "num_experts_per_tok"} and exprs(moe.outputs[0]) == ["T", "hidden_size"]
    assert exprs(_attention(g).inputs[-3]) == ["R + 1"]
    assert exprs(_mm(g, "logits_processor").outputs[0]) == ["R", PADDED_VOCAB]
    assert moe.count == 32 and g.meta.layer_groups == (LayerGroup((0,), 32),)


def test_gemma2_sliding_and_full_layers_stay_apart():
    g = vllm_graph("gemma-2-2b")
    assert [grp.count for grp in g.meta.layer_groups] == [13, 13]
    windows = [op.attrs.get("sliding_window") for op in g.ops if op.name == "vllm.unified_attention_with_output"]
    assert windows == [4096, None] and g.meta.sliding_window == 4096


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "mixtral-8x7b"])
def test_ir_round_trips(name):
    g = vllm_graph(name)
    assert loads(dumps(g)).to_json() == g.to_json()


def test_equal_numbers_get_their_own_fields():
    # hidden_size == intermediate_size == num_attention_heads*head_dim: only how a dim is computed can tell them apart
    g = compile_dict(tiny_llama(hidden_size=256, intermediate_size=256, num_attention_heads=4, head_dim=64,
                                num_key_value_heads=2))
    assert exprs(_mm(g, "mlp.gate_up_proj").outputs[0]) == ["T", "2*intermediate_size"]
    assert exprs(_mm(g, "mlp.down_proj").inputs[0]) == ["T", "intermediate_size"]
    o_proj = _mm(g, "self_attn.o_proj")
    assert exprs(o_proj.inputs[0]) == ["T", "head_dim*num_attention_heads"]
    assert exprs(o_proj.outputs[0]) == ["T", "hidden_size"]
    assert g.meta.pinned_fields == ()  # every field stayed a symbol, the head size included


def test_request_dims_do_not_depend_on_trace_sizes(monkeypatch):
    import dooly.capture.vllm_frontend as frontend

    first = dumps(compile_dict(tiny_llama()))
    monkeypatch.setattr(frontend, "TRACE_SIZES", {"T": 613, "R": 41, "K": 5009, "Kmax": 777, "Tmax": 101})
    assert dumps(compile_dict(tiny_llama())) == first


@pytest.mark.parametrize("name", VLLM_ONLY)
def test_vllm_only_goldens(name):
    text = dumps(vllm_only_graph(name), HEADER)
    golden = GOLDEN / f"{name}.ir"
    if os.environ.get("DOOLY_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()
    assert loads(text).to_json() == vllm_only_graph(name).to_json()


def test_deepseek_mla_dims_come_from_the_lora_ranks():
    g = vllm_only_graph("deepseek-r1")
    # the H100's fused A-GEMM for DeepSeek-V3's shapes
    a_proj, _ = _each(g, "self_attn.fused_qkv_a_proj", "vllm.min_latency_fused_qkv_a_proj")
    assert exprs(a_proj.outputs[0]) == ["T", "kv_lora_rank + q_lora_rank + qk_rope_head_dim"]
    assert a_proj.outputs[0].shape[1].value == 1536 + 512 + 64
    q_norm, _ = _each(g, "self_attn.q_a_layernorm", "vllm_ir.rms_norm")
    assert exprs(q_norm.outputs[0]) == ["T", "q_lora_rank"]
    q_b, _ = _each(g, "self_attn.q_b_proj", "aten.mm")
    assert exprs(q_b.outputs[0]) == ["T", "num_attention_heads*(qk_nope_head_dim + qk_rope_head_dim)"]
    assert q_b.outputs[0].shape[1].value == 128 * (128 + 64)
    attn, count = _each(g, "mla_attn", "vllm.unified_mla_attention_with_output")
    q, kv_c, k_pe, out = attn.inputs[:4]
    assert exprs(q) == ["T", "num_attention_heads", "qk_nope_head_dim + qk_rope_head_dim"]
    assert exprs(kv_c) == ["T", "kv_lora_rank"] and exprs(k_pe) == ["T", "1", "qk_rope_head_dim"]
    assert exprs(out) == ["T", "num_attention_heads*v_head_dim"]
    assert [exprs(t) for t in attn.inputs[-3:]] == [["R + 1"], ["R"], ["R", str(163840 // 16)]]
    assert attn.attrs["seq_lens_sum"] == {"sym": "K"} and count == 61
    write, _ = _each(g, "mla_attn", "vllm.unified_mla_kv_cache_update")  # the latent cache: kv_c and k_pe only
    assert exprs(write.inputs[0]) == ["T", "kv_lora_rank"] and exprs(write.inputs[-1]) == ["T"]
    o_proj, _ = _each(g, "self_attn.o_proj", "aten.mm")
    assert exprs(o_proj.inputs[0]) == ["T", "num_attention_heads*v_head_dim"]


def test_deepseek_dense_first_layers_and_shared_experts():
    g = vllm_only_graph("deepseek-r1")
    gate_up, dense = _each(g, "mlp.gate_up_proj", "aten.mm")
    assert dense == 3 and exprs(gate_up.outputs[0]) == ["T", "2*intermediate_size"]  # first_k_dense_replace
    moe, count = _each(g, "mlp.experts", "vllm.moe_forward_shared")
    assert count == 61 - 3 and moe.attrs["top_k"] == {"sym": "num_experts_per_tok"}
    weights = [exprs(t) for t in moe.inputs[3:]]
    assert ["n_routed_experts"] in weights  # the router's correction bias (noaux_tc)
    assert ["n_routed_experts", "2*moe_intermediate_size", "hidden_size"] in weights
    assert ["n_routed_experts", "hidden_size", "moe_intermediate_size"] in weights
    assert ["2*moe_intermediate_size*n_shared_experts", "hidden_size"] in weights  # n_shared_experts=1: moved
    assert ["hidden_size", "moe_intermediate_size*n_shared_experts"] in weights
    assert g.meta.pinned_fields == ("n_shared_experts",)


def test_qwen3_next_gated_delta_net_layers():
    g = vllm_only_graph("qwen3-next-80b-a3b")
    assert [grp.count for grp in g.meta.layer_groups][-1] == 12  # every 4th layer is full attention
    qkvz, count = _each(g, "linear_attn.in_proj_qkvz", "aten.mm")
    assert count == 36 and qkvz.outputs[0].shape[1].value == 2 * 16 * 128 + 2 * 32 * 128
    assert exprs(qkvz.outputs[0]) == [
        "T", "2*linear_key_head_dim*linear_num_key_heads + 2*linear_num_value_heads*linear_value_head_dim"]
    core, count = _each(g, "linear_attn", "vllm.qwen_gdn_attention_core")
    assert count == 36
    qkv, b, a, out = core.inputs[:4]
    # q, k, v regrouped per key head, as vLLM's fix_query_key_value_ordering does: 2*128*16 + 16*128*(32//16)
    per_key_head = "(linear_num_value_heads//linear_num_key_heads)"
    assert exprs(qkv) == ["T", f"2*linear_key_head_dim*linear_num_key_heads + "
                               f"linear_num_key_heads*linear_value_head_dim*{per_key_head}"]
    assert qkv.shape[1].value == 8192
    assert exprs(b) == exprs(a) == ["T", f"linear_num_key_heads*{per_key_head}"]
    assert exprs(out) == ["T", "linear_num_value_heads", "linear_value_head_dim"]
    assert [exprs(t) for t in core.inputs[-2:]] == [["R + 1"], ["R"]]  # request starts, recurrent-state slots
    attn, count = _each(g, "self_attn.attn", "vllm.unified_attention_with_output")
    assert count == 12 and exprs(attn.inputs[0]) == ["T", "num_attention_heads", "head_dim"]
    assert not any(op.name.startswith("vllm.cpu_") for op in g.ops)  # the GPU's ops, not the CPU build's


def test_llama4_chunked_attention_layers():
    g = vllm_only_graph("llama-4-scout-17b-16e")
    attns = [op for op in g.ops if op.name == "vllm.unified_attention_with_output"]
    chunked = [op for op in attns if "attention_chunk_size" in op.attrs]
    assert sum(op.count for op in chunked) == 36 and sum(op.count for op in attns) == 48  # no_rope_layers: 3 of 4
    assert {op.attrs["attention_chunk_size"] for op in chunked} == {8192}
    assert exprs(chunked[0].inputs[0]) == ["T", "num_attention_heads", "head_dim"]
    moe, count = _each(g, "feed_forward.experts", "vllm.moe_forward_shared")
    assert count == 48 and exprs(moe.inputs[3]) == ["num_local_experts", "2*intermediate_size", "hidden_size"]
    assert ["2*intermediate_size", "hidden_size"] in [exprs(t) for t in moe.inputs[5:]]  # Llama-4's shared expert
    router, _ = _each(g, "feed_forward.router", "aten.mm")
    assert exprs(router.outputs[0]) == ["T", "num_local_experts"]
