"""Canonical signatures: ops that launch the same kernel share a hash; ops that do not, do not."""

import subprocess
import sys

from helpers import ROOT, compile_dict, find, tiny_llama, zoo_graph

from dooly.passes.canonicalize import signature, unique, uses

BACKEND = "paged|sdpa"


def _sig(graph, scope, name=None):
    op = find(graph, scope, name)[0]
    return signature(op, graph.config_values, BACKEND)[0]


def test_llama_and_mistral_share_their_gemms():
    llama, mistral = zoo_graph("llama-3.1-8b"), zoo_graph("mistral-7b-v0.3")
    up_l, up_m = _sig(llama, "mlp.up_proj"), _sig(mistral, "mlp.up_proj")
    assert up_l.hash == up_m.hash
    assert up_l.canonical["inputs"][0]["shape"] == ["M", 4096]
    assert up_l.canonical["inputs"][1] == {"dtype": "bf16", "shape": [4096, 14336], "strides": [1, 4096]}
    assert _sig(llama, "mlp.down_proj").hash != up_l.hash  # [T, 14336] x [14336, 4096] is another kernel
    shared = set(unique(llama, BACKEND)) & set(unique(mistral, BACKEND))
    assert len(set(unique(mistral, BACKEND)) - shared) <= 3  # only the vocabulary differs


def test_lm_head_and_layer_gemm_are_one_kernel_at_different_rows():
    g = zoo_graph("llama-3.1-8b")
    lm = [u for u in uses(g, BACKEND) if g.ops[u.op_index].scope == "lm_head"][0]
    assert lm.binding == {"M": "R"} and lm.signature.axes == ("M",)
    q = [u for u in uses(g, BACKEND) if g.ops[u.op_index].scope.endswith("q_proj")][0]
    assert q.binding == {"M": "T"}


def test_pointwise_ops_of_any_hidden_size_are_one_flat_kernel():
    small = compile_dict(tiny_llama(hidden_size=256), "small")
    large = compile_dict(tiny_llama(hidden_size=384, num_attention_heads=12, num_key_value_heads=4), "large")
    ids = []
    for g in (small, large):
        (use,) = [u for u in uses(g, BACKEND) if g.ops[u.op_index].scope.endswith("layers.*.input_layernorm")
                  and g.ops[u.op_index].name == "aten.rsqrt"]
        ids.append(use.signature.hash)
        assert use.signature.axes == ("N",) and use.binding == {"N": "T"}
    assert ids[0] == ids[1]
    (weight_mul,) = [u for u in uses(large, BACKEND) if large.ops[u.op_index].scope.endswith("layers.*.input_layernorm")
                     and large.ops[u.op_index].name == "aten.mul.Tensor"
                     and u.signature.canonical["operands"][0] == "inner"]
    assert weight_mul.binding == {"N": "384*T"}


def test_a_strided_copy_is_not_a_flat_kernel():
    g = zoo_graph("llama-3.1-8b")
    (fill,) = [u for u in uses(g, BACKEND) if g.ops[u.op_index].name == "aten.fill_.Scalar"
               and u.signature.axes == ("K", "T")]
    assert fill.signature.canonical["inputs"][0]["strides"][2:] == [139264, 1]


def test_attention_signature_follows_what_the_kernel_sees():
    # paged|sdpa expands K/V to all query heads (repeat_kv) before SDPA, so SDPA itself is the same kernel for
    # any num_key_value_heads; the GQA group size changes the cache reads and the expansion, whose signatures differ.
    a = compile_dict(tiny_llama(num_key_value_heads=2), "gqa2")
    b = compile_dict(tiny_llama(num_key_value_heads=4), "gqa4")
    assert _sig(a, "self_attn", "aten.scaled_dot_product_attention").hash == _sig(
        b, "self_attn", "aten.scaled_dot_product_attention").hash
    assert _sig(a, "self_attn", "aten.index_select").hash != _sig(b, "self_attn", "aten.index_select").hash
    expand_a = {s.hash for u, s in [(u, u.signature) for u in uses(a, BACKEND)] if s.op == "aten.clone"}
    expand_b = {s.hash for u, s in [(u, u.signature) for u in uses(b, BACKEND)] if s.op == "aten.clone"}
    assert expand_a != expand_b
    # heads and head_dim are in the kernel's shapes; the backend is part of the signature
    c = compile_dict(tiny_llama(head_dim=64, num_attention_heads=4), "hd64")
    sdpa = find(a, "self_attn", "aten.scaled_dot_product_attention")[0]
    assert _sig(c, "self_attn", "aten.scaled_dot_product_attention").hash != _sig(
        a, "self_attn", "aten.scaled_dot_product_attention").hash
    assert signature(sdpa, a.config_values, "other")[0].hash != signature(sdpa, a.config_values, BACKEND)[0].hash


def test_sliding_window_keys_read_like_full_keys():
    g = zoo_graph("gemma-2-9b")
    reads = [u for u in uses(g, BACKEND) if g.ops[u.op_index].name == "aten.index_select"]
    assert {u.binding["M"] for u in reads} == {"K", "Ks"}
    assert len({u.signature.hash for u in reads}) == 1


def test_hash_is_stable_across_processes():
    code = ("import sys; sys.path.insert(0, 'tests'); from helpers import zoo_graph; "
            "from dooly.passes.canonicalize import unique; print(sorted(unique(zoo_graph('llama-3.2-1b'), 'x')))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] and len(runs[0]) > 100
