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


def test_partial_rotary_halves_are_both_written_with_head_dim():
    g = zoo_graph("glm-4-9b-0414")  # THUDM/GLM-4-9B-0414: 32 heads of 128, 2 KV heads, rotary over half of each head
    assert g.meta.pinned_fields == ("head_dim",)  # int(head_dim * partial_rotary_factor) pins it
    for cat in find(g, "self_attn", "aten.cat"):
        rotated, passed = (exprs(t)[-1] for t in cat.inputs)
        assert (rotated, passed, exprs(cat.outputs[0])[-1]) == ("(head_dim//2)", "(head_dim//2)", "head_dim")
        assert cat.inputs[1].shape[-1].value == 64
    kv = [op for op in find(g, "self_attn.k_proj") if op.name == "aten.addmm"][0]  # attention_bias: an addmm
    assert exprs(kv.outputs[0]) == ["T", "head_dim*num_key_value_heads"] and kv.outputs[0].shape[1].value == 256
    assert not [d.expr for op in g.ops for t in op.tensors() for d in t.dims() if "head_dim -" in d.expr]


def test_a_quarter_rotary_keeps_three_quarters_written_with_head_dim():
    g = compile_dict({**tiny_llama(), "model_type": "glm4", "head_dim": 64, "partial_rotary_factor": 0.25,
                      "pad_token_id": None})
    (cat, _) = find(g, "self_attn", "aten.cat")
    assert [exprs(t)[-1] for t in cat.inputs] == ["(head_dim//4)", "(3*head_dim//4)"]
    assert [t.shape[-1].value for t in cat.inputs] == [16, 48]


def test_a_composite_config_runs_its_text_part():
    g = zoo_graph("gemma-3-4b")  # google/gemma-3-4b-it: its text_config leaves 8 heads of 256, 4 KV heads to defaults
    assert g.meta.model_type == "gemma3" and g.meta.sliding_window == 1024
    assert g.meta.config["num_attention_heads"] == 8 and g.meta.config["num_key_value_heads"] == 4
    # five sliding layers to each full one: 29 and 5 of 34
    assert g.meta.layer_groups == (LayerGroup((0, 1, 2, 3, 4), 29), LayerGroup((5,), 5))
    keys = {exprs(op.inputs[1])[2]: op.count for op in find(g, "self_attn", "aten.scaled_dot_product_attention")}
    assert keys == {"Ks": 29, "K": 5}
    norm = find(g, "self_attn.q_norm", "aten.pow.Tensor_Scalar")[0]
    assert exprs(norm.inputs[0]) == ["1", "num_attention_heads", "T", "head_dim"]
    assert norm.inputs[0].shape[3].value == 256
    assert len(find(g, "model.rotary_emb", "aten.bmm")) == 2  # local and global rotary frequencies


def test_a_composite_part_leaves_defaults_out():
    from dooly.config import parse_config

    cfg = parse_config({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 256,
                                                               "num_hidden_layers": 2}}, "tiny", "tiny")
    assert cfg.num_layers == 2
    with pytest.raises(DoolyError, match="required field 'num_attention_heads' is missing"):
        parse_config({**tiny_llama(), "num_attention_heads": None}, "tiny", "tiny")


def test_sparsemixer_routes_two_experts_whatever_the_config_says():
    g = zoo_graph("phi-3.5-moe")  # microsoft/Phi-3.5-MoE-instruct: 16 experts of 6400, 8 KV heads
    router = _mm(g, "mlp.router")
    assert exprs(router.outputs[0]) == ["T", "num_local_experts"] and router.outputs[0].shape[1].value == 16
    # its router picks the best expert, then the best of the rest: two rounds in code, not num_experts_per_tok
    assert len(find(g, "mlp.router", "aten.max.dim")) == 2
    up = find(g, "mlp.experts", "aten._grouped_mm")[0]
    assert exprs(up.inputs[0]) == ["2*T", "hidden_size"]
    assert exprs(up.inputs[1]) == ["num_local_experts", "hidden_size", "2*intermediate_size"]
    assert up.inputs[1].shape[2].value == 2 * 6400
    (lm,) = find(g, "lm_head", "aten.addmm")  # lm_head_bias
    assert exprs(lm.outputs[0]) == ["R", "vocab_size"]
    assert g.meta.sliding_window == 131072


def test_layer_norm_with_bias_and_every_layer_sliding():
    g = zoo_graph("starcoder2-7b")  # bigcode/starcoder2-7b: 36 heads of 128, 4 KV heads, window 4096
    norms = find(g, "input_layernorm", "aten.native_layer_norm")
    assert [exprs(t) for t in norms[0].inputs[1:]] == [["hidden_size"], ["hidden_size"]]  # weight and bias
    assert norms[0].inputs[1].shape[0].value == 4608
    assert g.meta.layer_groups == (LayerGroup((0,), 32),) and g.meta.sliding_window == 4096
    (sdpa,) = find(g, "self_attn", "aten.scaled_dot_product_attention")
    assert exprs(sdpa.inputs[0]) == ["1", "num_attention_heads", "T", "head_dim"] and exprs(sdpa.inputs[1])[2] == "Ks"
    assert exprs(sdpa.inputs[1])[1] == "num_key_value_heads*(num_attention_heads//num_key_value_heads)"
    fc = [op for op in find(g, "mlp.c_fc") if op.name == "aten.addmm"][0]
    assert exprs(fc.outputs[0]) == ["T", "intermediate_size"] and fc.outputs[0].shape[1].value == 18432


def test_nope_layers_are_a_layer_kind_of_their_own():
    g = zoo_graph("smollm3-3b")  # HuggingFaceTB/SmolLM3-3B: every fourth layer without rotary embeddings
    assert g.meta.layer_groups == (LayerGroup((0, 1, 2), 27), LayerGroup((3,), 9))
    rotations = [op.count for op in find(g, "self_attn", "aten.neg")]
    assert rotations == [27, 27]  # rotate_half of q and k, in the 27 layers that rotate
    (q,) = [op for op in find(g, "self_attn.q_proj") if op.count == 9]
    assert exprs(q.outputs[0]) == ["T", "head_dim*num_attention_heads"] and q.outputs[0].shape[1].value == 2048
    assert g.meta.config["num_key_value_heads"] == 4


def test_olmoe_routes_over_its_own_expert_fields():
    g = zoo_graph("olmoe-1b-7b-0924")  # allenai/OLMoE-1B-7B-0924: 64 experts of 1024, top 8
    gate = _mm(g, "mlp.gate")
    assert exprs(gate.outputs[0]) == ["T", "num_experts"] and gate.outputs[0].shape[1].value == 64
    (topk,) = find(g, "mlp.gate", "aten.topk")
    assert exprs(topk.outputs[0]) == ["T", "num_experts_per_tok"] and topk.outputs[0].shape[1].value == 8
    up = find(g, "mlp.experts", "aten._grouped_mm")[0]
    assert exprs(up.inputs[1]) == ["num_experts", "hidden_size", "2*intermediate_size"]
    # its k_norm is sized by the code's own hidden_size // num_attention_heads, not by head_dim
    weight = find(g, "self_attn.k_norm", "aten.mul.Tensor")[-1].inputs[0]
    assert exprs(weight) == ["num_key_value_heads*(hidden_size//num_attention_heads)"]


def test_shared_experts_multiply_their_width_and_the_first_layer_is_dense():
    g = zoo_graph("ernie-4.5-21b-a3b")  # baidu/ERNIE-4.5-21B-A3B: 64 experts of 1536, top 6, 2 shared
    assert g.meta.layer_groups == (LayerGroup((0,), 1), LayerGroup((1,), 27))  # moe_layer_start_index 1
    (dense,) = [op for op in find(g, "mlp.gate_proj") if op.name == "aten.mm"]
    assert dense.count == 1 and exprs(dense.outputs[0]) == ["T", "intermediate_size"]
    shared = _mm(g, "mlp.shared_experts.gate_proj")
    assert exprs(shared.outputs[0]) == ["T", "moe_intermediate_size*moe_num_shared_experts"]
    assert shared.outputs[0].shape[1].value == 2 * 1536 and shared.count == 27
    # the class reads moe_num_experts and moe_k under their common names
    router = _mm(g, "mlp.gate")
    assert exprs(router.outputs[0]) == ["T", "num_experts"] and router.outputs[0].shape[1].value == 64
    (topk,) = find(g, "mlp.gate", "aten.topk")
    assert exprs(topk.outputs[0]) == ["T", "num_experts_per_tok"] and topk.outputs[0].shape[1].value == 6
    (bias,) = find(g, "mlp.gate.moe_statics", "aten.add.Tensor")  # its expert-score correction
    assert exprs(bias.inputs[1]) == ["num_experts"]


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


def test_a_field_numpy_reads_stays_a_symbol():
    # CTRL scales its embeddings by np.sqrt(d_model): numpy asks the SymInt for its square root
    g = compile_dict({"model_type": "ctrl", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 256, "dff": 128},
                     name="tiny-ctrl")
    (scale,) = find(g, "transformer", "aten.mul_.Tensor")
    assert scale.attrs["other"] == 8.0 and exprs(scale.outputs[0]) == ["1", "T", "hidden_size"]


def test_a_moved_trace_that_proves_strides_contiguous_still_aligns():
    # Laguna's attention: a clone's strides print where torch cannot prove them contiguous, and not in the trace
    # with head_dim moved, where it can
    from dooly.ir.graph import Dim, Graph, GraphMeta, Op, TensorSpec
    from dooly.passes.taint import attribute

    base = TensorSpec("bf16", (Dim("T", None), Dim("64", None)), (Dim("64", None), Dim("1", None)))
    moved = TensorSpec("bf16", (Dim("T", None), Dim("128", None)))
    graph = Graph("m", GraphMeta(config={"head_dim": 64}, request_symbols=("T",)), [Op("aten.clone", (base,), (base,))])
    out = attribute(graph, {"head_dim": [(128, [Op("aten.clone", (moved,), (moved,))])]}).ops[0].outputs[0]
    assert [d.expr for d in out.shape] == ["T", "head_dim"] and [d.expr for d in out.strides] == ["head_dim", "1"]


def test_the_causal_lm_of_a_composite_family_takes_its_text_config():
    # MllamaForCausalLM is registered for MllamaConfig and built from its text part, MllamaTextConfig
    g = compile_dict({"model_type": "mllama", "text_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 256, "cross_attention_layers": [], "pad_token_id": 0}},
        name="tiny-mllama")
    assert g.meta.architecture == "MllamaForCausalLM"
    # its attention derives the head size from hidden_size, as the config has no head_dim
    q = _mm(g, "self_attn.q_proj").outputs[0]
    assert exprs(q) == ["T", "num_attention_heads*(hidden_size//num_attention_heads)"]


def test_per_layer_rope_thetas_are_accepted():
    g = compile_dict({"model_type": "granite_swa", "hidden_size": 64, "intermediate_size": 128,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
                      "layer_rope_theta": [10000.0, 500000.0]}, name="tiny-granite-swa")
    assert g.meta.attention == "paged|eager" and sum(grp.count for grp in g.meta.layer_groups) == 2


def test_a_model_that_bypasses_the_paged_cache_is_refused():
    with pytest.raises(DoolyError, match="never writes the engine's paged KV cache"):
        compile_dict({"model_type": "gptj", "n_embd": 128, "n_head": 4, "n_layer": 2, "vocab_size": 512,
                      "rotary_dim": 16, "n_positions": 256}, name="tiny-gptj")


@pytest.mark.parametrize("is_decoder", [False, True])
def test_an_encoder_is_refused_and_its_decoder_compiles(is_decoder):
    bert = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 256, "is_decoder": is_decoder}
    if is_decoder:
        g = compile_dict(bert, name="tiny-bert")
        assert any(op.name == "aten.index_copy_" for op in g.ops)
    else:
        with pytest.raises(DoolyError, match="BertSelfAttention.*bidirectional"):
            compile_dict(bert, name="tiny-bert")


def test_coverage_tool_on_a_sample():
    sys.path.insert(0, str(ROOT / "tools"))
    from architectures import one

    assert one("olmo2", engine=False)["status"] == "compiled"
    assert one("gptj", engine=False)["status"] == "refused"


def test_a_pinned_field_whose_moved_trace_runs_other_ops_stays_a_number():
    """The same op names with other tensor counts (a concat over a field's worth of tensors, say) are other ops:
    the field is a setting of the model's code, kept a number, as taint could not align the two traces."""
    from dooly.capture.common import Trace, trace_with_fallback
    from dooly.ir.graph import Dim, Op, TensorSpec

    def tensor(n):
        return TensorSpec("bf16", (Dim(str(n), value=n),))

    def trace(pinned):
        width, parts = pinned.get("hidden_size", 64), pinned.get("num_parts", 2)
        ops = [Op("aten.mm", (tensor(width), tensor(width)), (tensor(width),)),
               Op("aten.cat", tuple(tensor(width) for _ in range(parts)), (tensor(parts * width),))]
        return Trace(ops, {"hidden_size": width, "num_parts": parts}, [], {"hidden_size", "num_parts"})

    step, perturbed = trace_with_fallback(trace)
    assert set(perturbed) == {"hidden_size"}  # num_parts moved changes how many tensors aten.cat takes
    (value, ops), = perturbed["hidden_size"]
    assert value != 64 and ops[0].inputs[0].shape[0].value == value


@pytest.mark.parametrize("second_scope, refused", [("model.layers.0.self_attn", True),
                                                    ("model.layers.1.self_attn", False)])
def test_a_layer_writing_its_cache_slots_twice_is_refused(second_scope, refused):
    """DiffLlama calls the paged attention twice a layer with two halves of its values: the second call overwrites
    the first's cache slots. Layers of different attention groups share cache tensors in blocks of their own."""
    from dooly.capture.transformers_cb import check_serving_step
    from dooly.ir.graph import Dim, Op, TensorSpec

    def spec(dtype, *dims, src=None):
        return TensorSpec(dtype, tuple(Dim(d) for d in dims), src=src)

    cache, rows, index = spec("bf16", "4096", "8", "64"), spec("bf16", "T", "8", "64"), spec("i64", "T")
    keys = spec("bf16", "1", "8", "K", "64")
    first = Op("aten.index_copy_", (cache, index, rows), (cache,), scope="model.layers.0.self_attn")
    again = Op("aten.index_copy_", (spec("bf16", "4096", "8", "64", src=0), index, rows), (cache,), scope=second_scope)
    attention = Op("aten.scaled_dot_product_attention", (keys, keys, keys), (keys,), scope=second_scope)
    if refused:
        with pytest.raises(DoolyError, match="writes the same KV-cache slots twice"):
            check_serving_step([first, again, attention], "m", "diffllama")
    else:
        check_serving_step([first, again, attention], "m", "cohere2")


def test_experts_looping_over_their_routed_tokens_run_an_even_share_each():
    # Aria's experts slice the routed tokens at bounds counted from the routing (a data-dependent count each), and
    # read their top-k only as they run
    g = compile_dict({"model_type": "aria_text", "hidden_size": 64, "intermediate_size": 128,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
                      "moe_num_experts": 4, "moe_topk": 2, "moe_num_shared_experts": 1}, name="tiny-aria")
    up = [op for op in find(g, "mlp.experts.fc1", "aten.mm")]
    assert len(up) == 4  # one GEMM an expert
    assert {tuple(exprs(op.inputs[0])) for op in up} == {("((T*moe_topk + 3)//4)", "hidden_size")}
    writes = find(g, "mlp.experts.fc1", "aten.copy_")
    assert {tuple(exprs(op.inputs[1])) for op in writes} == {("((T*moe_topk + 3)//4)", "2*intermediate_size")}
    (topk,) = find(g, "mlp.experts", "aten.topk")
    assert topk.attrs["k"] == {"sym": "moe_topk"} and g.meta.config["moe_topk"] == 2
