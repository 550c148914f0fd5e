"""Configuration-agnostic capture: families Dooly has no code for, labelled from the fields their dims came from."""

import sys

import pytest
from helpers import ROOT, compile_dict, exprs, find, tiny_llama, zoo_graph

from dooly.errors import DoolyError
from dooly.ir import LayerGroup


def _mm(graph, scope):
    (op,) = [o for o in find(graph, scope) if o.name in ("aten.mm", "aten.addmm")]
    return op


def test_shared_expert_and_routed_experts_keep_their_own_fields():
    g = zoo_graph("qwen1.5-moe-a2.7b")  # Qwen/Qwen1.5-MoE-A2.7B: 60 experts of 1408, top 4, one shared of 5632
    shared = _mm(g, "mlp.shared_expert.gate_proj")
    assert exprs(shared.outputs[0]) == ["T", "shared_expert_intermediate_size"]
    assert shared.outputs[0].shape[1].value == 5632
    gate = _mm(g, "mlp.gate")
    assert exprs(gate.outputs[0]) == ["T", "num_experts"] and gate.outputs[0].shape[1].value == 60
    up = [op for op in g.ops if op.name == "aten._grouped_mm"][0]
    assert exprs(up.inputs[1]) == ["num_experts", "hidden_size", "2*moe_intermediate_size"]
    assert up.inputs[1].shape[2].value == 2 * 1408
    (topk,) = find(g, "mlp.gate", "aten.topk")
    assert exprs(topk.outputs[0]) == ["T", "num_experts_per_tok"] and topk.outputs[0].shape[1].value == 4


def test_attention_sinks_run_in_the_engines_eager_fallback():
    g = zoo_graph("gpt-oss-20b")  # openai/gpt-oss-20b: 64 heads of 64, 8 KV heads, 32 experts, top 4, window 128
    assert g.meta.attention == "paged|eager"  # the class refuses sdpa; the engine runs paged|eager
    assert sorted(grp.count for grp in g.meta.layer_groups) == [12, 12]
    sinks = [op for op in find(g, "self_attn", "aten.cat") if exprs(op.outputs[0])[-1] in ("K + 1", "Ks + 1")]
    assert sorted(exprs(op.outputs[0])[-1] for op in sinks) == ["K + 1", "Ks + 1"]  # one sink column per head
    assert all(exprs(op.outputs[0])[:3] == ["1", "num_attention_heads", "T"] for op in sinks)
    scores = [op for op in find(g, "self_attn", "aten.bmm") if exprs(op.outputs[0])[-1] in ("K", "Ks")]
    assert all(exprs(op.inputs[0]) == ["num_attention_heads", "T", "head_dim"] for op in scores)
    assert scores[0].inputs[0].shape[2].value == 64
    routers = [op for op in find(g, "mlp.router") if op.name in ("aten.mm", "aten.addmm")]
    assert {tuple(exprs(op.outputs[0])) for op in routers} == {("T", "num_local_experts")}
    assert routers[0].outputs[0].shape[1].value == 32
    assert g.meta.sliding_window == 128


def test_olmo2_normalises_the_whole_projection():
    g = zoo_graph("olmo-2-0425-1b")  # allenai/OLMo-2-0425-1B: q/k norms over all heads at once
    norm = find(g, "self_attn.q_norm", "aten.pow.Tensor_Scalar")[0]
    assert exprs(norm.inputs[0]) == ["1", "T", "head_dim*num_attention_heads"]
    assert norm.inputs[0].shape[2].value == 2048
    assert g.meta.layer_groups == (LayerGroup((0,), 16),)


def test_a_quarter_rotary_keeps_three_quarters_written_with_head_dim():
    g = compile_dict({**tiny_llama(), "model_type": "glm4", "head_dim": 64, "partial_rotary_factor": 0.25,
                      "pad_token_id": None})
    (cat, _) = find(g, "self_attn", "aten.cat")
    assert [exprs(t)[-1] for t in cat.inputs] == ["(head_dim//4)", "(3*head_dim//4)"]
    assert [t.shape[-1].value for t in cat.inputs] == [16, 48]


def test_a_composite_part_leaves_defaults_out():
    from dooly.config import parse_config

    cfg = parse_config({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 256,
                                                               "num_hidden_layers": 2}}, "tiny", "tiny")
    assert cfg.num_layers == 2
    with pytest.raises(DoolyError, match="required field 'num_attention_heads' is missing"):
        parse_config({**tiny_llama(), "num_attention_heads": None}, "tiny", "tiny")


def test_a_field_missing_from_any_list_is_still_a_symbol():
    # an integer field the model reads, under a name Dooly never listed
    g = compile_dict({**tiny_llama(), "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                      "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96})
    shared = _mm(g, "mlp.shared_expert.down_proj")
    assert exprs(shared.inputs[0]) == ["T", "shared_expert_intermediate_size"]
    assert "shared_expert_intermediate_size" in g.meta.config


def test_gpt2_style_fields_are_labelled_by_their_common_names():
    # GPT-2 stores hidden_size as n_embd and never reads a head_dim: none is injected
    g = compile_dict({"model_type": "gpt2", "n_embd": 128, "n_head": 4, "n_layer": 2, "vocab_size": 512,
                      "n_positions": 256}, name="tiny-gpt2")
    assert "head_dim" not in g.meta.config and g.meta.config["hidden_size"] == 128
    assert g.meta.layer_groups == (LayerGroup((0,), 2),)  # one layer traced for both, counted once
    (qkv,) = find(g, "attn.c_attn", "aten.addmm")
    assert exprs(qkv.outputs[0]) == ["T", "3*hidden_size"]


def test_a_depth_stored_under_its_own_name_is_not_a_size():
    from dooly.capture.common import size_fields, text_config
    from dooly.config import parse_config

    cfg = parse_config({"model_type": "gpt2", "n_embd": 128, "n_head": 4, "n_layer": 2, "vocab_size": 512},
                       "tiny-gpt2", "tiny-gpt2")
    fields = size_fields(text_config(cfg), {"n_layer", "n_embd", "n_head"})
    assert fields == {"hidden_size": 128, "num_attention_heads": 4}  # the trace cuts the depth, no field sets it


def test_a_model_that_bypasses_the_paged_cache_is_refused():
    with pytest.raises(DoolyError, match="never writes the engine's paged KV cache"):
        compile_dict({"model_type": "gptj", "n_embd": 128, "n_head": 4, "n_layer": 2, "vocab_size": 512,
                      "rotary_dim": 16, "n_positions": 256}, name="tiny-gptj")


def test_coverage_tool_on_a_sample():
    sys.path.insert(0, str(ROOT / "tools"))
    from architectures import one

    assert one("olmo2", engine=False)["status"] == "compiled"
    assert one("gptj", engine=False)["status"] == "refused"
