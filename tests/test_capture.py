"""Capture + taint + collapse on real and synthetic configs: every label checked here follows from the model code."""

import pytest
from helpers import compile_dict, exprs, find, tiny_llama, zoo_graph

from dooly.ir import LayerGroup, When, dumps


def _mm(graph, scope):
    (op,) = [o for o in find(graph, scope) if o.name in ("aten.mm", "aten.addmm")]
    return op


def test_equal_numbers_get_their_own_fields():
    # hidden_size == intermediate_size == num_attention_heads*head_dim: only how a dim is computed can tell them apart
    g = compile_dict(tiny_llama(hidden_size=256, intermediate_size=256, num_attention_heads=4, head_dim=64,
                                num_key_value_heads=2))
    up, down = _mm(g, "mlp.up_proj"), _mm(g, "mlp.down_proj")
    assert exprs(up.inputs[0]) == ["T", "hidden_size"] and exprs(up.outputs[0]) == ["T", "intermediate_size"]
    assert exprs(down.inputs[0]) == ["T", "intermediate_size"] and exprs(down.outputs[0]) == ["T", "hidden_size"]
    q, o = _mm(g, "self_attn.q_proj"), _mm(g, "self_attn.o_proj")
    assert exprs(q.outputs[0]) == ["T", "head_dim*num_attention_heads"]
    assert exprs(o.inputs[0]) == ["T", "head_dim*num_attention_heads"] and exprs(o.outputs[0]) == ["T", "hidden_size"]
    assert {d.value for d in up.inputs[0].shape[1:] + up.outputs[0].shape[1:]} == {256}


def test_head_dim_is_not_derived_when_the_config_gives_it():
    g = compile_dict(tiny_llama(hidden_size=256, num_attention_heads=4, head_dim=48, num_key_value_heads=2))
    q = _mm(g, "self_attn.q_proj")
    assert q.outputs[0].shape[1].expr == "head_dim*num_attention_heads" and q.outputs[0].shape[1].value == 192
    (sdpa,) = find(g, "self_attn", "aten.scaled_dot_product_attention")
    assert exprs(sdpa.inputs[0]) == ["1", "num_attention_heads", "T", "head_dim"]


def test_request_dims_do_not_depend_on_trace_sizes(monkeypatch):
    import dooly.capture.transformers_cb as cb

    first = dumps(compile_dict(tiny_llama()))
    monkeypatch.setattr(cb, "TRACE_SIZES", {"T": 613, "R": 41, "K": 5009, "Ks": 777, "q": 29, "k": 1999})
    assert dumps(compile_dict(tiny_llama())) == first


def test_serving_step_of_the_engine():
    g = zoo_graph("llama-3.1-8b")
    (sdpa,) = find(g, "self_attn", "aten.scaled_dot_product_attention")
    assert exprs(sdpa.inputs[0]) == ["1", "num_attention_heads", "T", "head_dim"]
    assert exprs(sdpa.inputs[1])[2] == "K" and exprs(sdpa.inputs[3]) == ["1", "1", "T", "K"]
    reads = find(g, "self_attn", "aten.index_select")
    assert len(reads) == 2 and all(op.when is When.PAST_KEYS and exprs(op.outputs[0])[0] == "K" for op in reads)
    writes = find(g, "self_attn", "aten.index_copy_")
    assert len(writes) == 2 and all(exprs(op.inputs[1]) == ["T"] and op.when is None for op in writes)
    lm = _mm(g, "lm_head")
    assert exprs(lm.inputs[0]) == ["R", "hidden_size"] and exprs(lm.outputs[0]) == ["R", "vocab_size"]
    (argmax,) = find(g, "engine.compute_batch", "aten.argmax")
    assert exprs(argmax.inputs[0]) == ["R", "vocab_size"]
    (fill,) = [op for op in find(g, "engine.reset_static_tensors") if exprs(op.inputs[0]) == ["1", "1", "T", "K"]]
    assert fill.name == "aten.fill_.Scalar"
    mask = find(g, "engine.attention_mask.full_attention")
    assert {op.runs_per for op in mask} == {"request"} and exprs(mask[0].outputs[0]) == ["1", "1", "q", "k"]
    assert g.meta.pinned_fields == ("head_dim",)  # pinned by rotary embeddings, recovered by perturbation
    (inv_freq,) = find(g, "model.rotary_emb", "aten.bmm")
    assert exprs(inv_freq.inputs[0]) == ["1", "(head_dim//2)", "1"]


def test_llama_down_proj_and_layer_count():
    g = zoo_graph("llama-3.1-70b")
    down = _mm(g, "mlp.down_proj")
    assert exprs(down.inputs[0]) == ["T", "intermediate_size"] and down.inputs[0].shape[1].value == 28672
    assert down.count == 80 and down.scope == "model.layers.*.mlp.down_proj"
    assert g.meta.layer_groups == (LayerGroup((0,), 80),)


def test_mistral_explicit_head_dim():
    g = zoo_graph("mistral-7b-v0.3")
    k = _mm(g, "self_attn.k_proj")
    assert exprs(k.outputs[0]) == ["T", "head_dim*num_key_value_heads"] and k.outputs[0].shape[1].value == 1024


def test_qwen2_projections_carry_their_bias():
    g = zoo_graph("qwen2.5-7b")
    q = _mm(g, "self_attn.q_proj")
    assert q.name == "aten.addmm"
    assert exprs(q.inputs[0]) == ["head_dim*num_attention_heads"]  # the bias
    assert _mm(g, "mlp.down_proj").name == "aten.mm"


def test_qwen3_normalises_each_head():
    g = zoo_graph("qwen3-8b")
    norm = find(g, "self_attn.q_norm", "aten.mean.dim")[0]
    assert exprs(norm.inputs[0]) == ["1", "T", "num_attention_heads", "head_dim"]


def test_gemma2_sliding_and_full_layers_stay_apart():
    g = zoo_graph("gemma-2-9b")
    assert sorted(grp.count for grp in g.meta.layer_groups) == [21, 21]
    keys = sorted(exprs(op.inputs[1])[2] for op in g.ops if op.name == "aten.scaled_dot_product_attention")
    assert keys == ["K", "Ks"]
    (tanh,) = find(g, "engine.compute_batch", "aten.tanh")  # final logit soft-capping, on the R selected rows
    assert exprs(tanh.inputs[0]) == ["1", "R", "vocab_size"]


def test_phi3_fused_projections():
    g = zoo_graph("phi-3-mini")
    qkv, gate_up = _mm(g, "self_attn.qkv_proj"), _mm(g, "mlp.gate_up_proj")
    assert exprs(qkv.outputs[0]) == ["T", "head_dim*num_attention_heads + 2*head_dim*num_key_value_heads"]
    assert exprs(gate_up.outputs[0]) == ["T", "2*intermediate_size"]


def test_cohere2_three_sliding_layers_to_one_full():
    g = zoo_graph("command-r7b")
    assert g.meta.layer_groups == (LayerGroup((0, 1, 2), 24), LayerGroup((3,), 8))
    centred = find(g, "input_layernorm", "aten.sub.Tensor")  # LayerNorm, not RMSNorm
    assert exprs(centred[0].inputs[0]) == ["1", "T", "hidden_size"]


@pytest.mark.parametrize("name,experts,width", [("mixtral-8x7b", 8, "intermediate_size"),
                                                ("qwen3-30b-a3b", 128, "moe_intermediate_size")])
def test_moe_experts_run_as_grouped_gemms(name, experts, width):
    g = zoo_graph(name)
    up, down = [op for op in g.ops if op.name == "aten._grouped_mm"]
    assert exprs(up.inputs[0]) == ["T*num_experts_per_tok", "hidden_size"]
    assert exprs(up.inputs[1]) == ["num_local_experts", "hidden_size", f"2*{width}"]
    assert up.inputs[1].shape[0].value == experts and up.inputs[0].shape[0].kind == "mix"
    assert exprs(down.outputs[0]) == ["T*num_experts_per_tok", "hidden_size"]
    assert "num_local_experts" in g.meta.pinned_fields  # histc(bins=...) pins it; perturbation recovers it


def test_collapse_of_a_full_depth_trace_equals_the_traced_prefix():
    from dooly.capture import capture
    from dooly.capture.common import size_fields, text_config
    from dooly.capture.transformers_cb import full_model, trace_both
    from dooly.config import parse_config
    from dooly.passes.collapse import collapse
    from dooly.passes.taint import taint

    data = {"model_type": "gemma2", "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 6, "vocab_size": 512,
            "sliding_window": 64}
    cfg = parse_config(data, "tiny-gemma2", "tiny-gemma2")
    prefix = capture(cfg)
    assert prefix.graph.meta.layer_counts == {0: 3, 1: 3}
    config = text_config(cfg)
    fields = size_fields(config, full_model(config)[1])
    full = trace_both(cfg, 6, "bf16", {}, fields)
    moved = {f: [(v, trace_both(cfg, 6, "bf16", {**{x: full.values[x] for x in full.pinned}, f: v}, fields).ops)]
             for f, [(v, _)] in prefix.perturbed.items()}
    full_graph = prefix.graph.with_ops(full.ops, layer_counts={})
    a = collapse(taint(prefix.graph, prefix.perturbed))
    b = collapse(taint(full_graph, moved))
    assert dumps(a.with_ops(a.ops, layer_counts={}, layer_groups=())) == dumps(
        b.with_ops(b.ops, layer_counts={}, layer_groups=()))
    assert [grp.count for grp in b.meta.layer_groups] == [3, 3]
