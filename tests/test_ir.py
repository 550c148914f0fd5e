import json

import numpy as np
import pytest
from helpers import zoo_graph

from dooly.ir import Dim, Graph, GraphMeta, Op, TensorSpec, When, dumps, loads
from dooly.ir.expr import ExprError, evaluate, names, render, simplify, to_sympy
from dooly.ir.graph import IRError
from dooly.ir.text import ParseError


def test_expression_names_and_values():
    assert names("num_key_value_heads*head_dim + 2*T") == {"num_key_value_heads", "head_dim", "T"}
    assert evaluate("(head_dim//2)*max(K, 3) % 7", {"head_dim": 128, "K": 5}) == (64 * 5) % 7
    vec = evaluate("32*T + K", {"T": np.array([1, 2, 3]), "K": np.array([10, 20, 30])})
    assert vec.tolist() == [42, 84, 126]
    assert evaluate("min(T, 4)", {"T": np.array([2, 9])}).tolist() == [2, 4]


@pytest.mark.parametrize("bad", ["__import__('os')", "T.real", "f(T)", "T if K else R", "1.5*T", "T[0]", "max(T)"])
def test_expression_rejects_anything_but_integer_arithmetic(bad):
    with pytest.raises(ExprError):
        evaluate(bad, {"T": 1, "K": 1, "R": 1})


@pytest.mark.parametrize("text", ["T", "T + 1", "32*T", "head_dim*num_attention_heads", "(head_dim//2)",
                                  "K - T", "max(1, (num_attention_heads//num_key_value_heads))", "(T % 8)",
                                  "(T*head_dim//2)", "-T + 2*K"])
def test_render_is_the_inverse_of_parse(text):
    assert simplify(render(to_sympy(text))) == simplify(text)
    env = {"T": 37, "K": 901, "head_dim": 128, "num_attention_heads": 32, "num_key_value_heads": 8}
    assert evaluate(render(to_sympy(text)), env) == evaluate(text, env)


def test_simplify_substitutes_values():
    assert simplify("T*num_attention_heads", {"num_attention_heads": 32}) == "32*T"
    assert simplify("head_dim*num_key_value_heads", {"head_dim": 128, "num_key_value_heads": 8}) == "1024"


def _hand_graph() -> Graph:
    t = Dim("T", "request")
    h = Dim("hidden_size", "config", 64)
    i = Dim("intermediate_size", "config", 128)
    mix = Dim("T*num_attention_heads", "mix")
    one = Dim("1", "const", 1)
    ops = [
        Op("aten.mm", (TensorSpec("bf16", (t, h)), TensorSpec("bf16", (h, i), (one, h))),
           (TensorSpec("bf16", (t, i)),), {}, "model.layers.*.mlp.up_proj", 32),
        Op("aten.mean.dim", (TensorSpec("f32", (one, mix), src=0),), (TensorSpec("f32", (one, one)),),
           {"dim": [-1], "keepdim": True, "note": "a, b"}, "model.norm", 1, "step", When.PAST_KEYS),
        Op("aten.triu", (TensorSpec("bf16", (Dim("q", "request"), Dim("k", "request"))),),
           (TensorSpec("bf16", (Dim("q", "request"), Dim("k", "request"))),), {"diagonal": {"sym": "k - q + 1"}},
           "engine.attention_mask", 1, "request"),
        Op("aten.split", (TensorSpec("bf16", (t, h)),), (TensorSpec("bf16", (t,)), TensorSpec("bf16", (t,))),
           {}, "engine", 2),
    ]
    meta = GraphMeta(engine="x", config={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
                     request_symbols=("K", "R", "T", "k", "q"))
    return Graph("hand", meta, ops)


def test_text_round_trip_of_every_feature():
    g = _hand_graph()
    text = dumps(g, "a header\nwith two lines")
    assert text.startswith("# a header\n# with two lines\n")
    assert "%1 = aten.mean.dim(%0:f32[1, T*num_attention_heads])" in text
    assert "bf16[hidden_size=64, intermediate_size=128]{1, hidden_size=64}" in text
    assert text.splitlines()[-2].endswith("x1 per-request")
    back = loads(text)
    assert back.to_json() == g.to_json()


def test_json_round_trip():
    g = _hand_graph()
    assert Graph.from_json(json.loads(g.dumps_json())).to_json() == g.to_json()


def test_real_ir_round_trips_through_text_and_json():
    g = zoo_graph("llama-3.1-8b")
    assert loads(dumps(g)).to_json() == g.to_json()
    assert Graph.from_json(json.loads(g.dumps_json())).to_json() == g.to_json()


@pytest.mark.parametrize("line", [
    "%0 = aten.mm(bf16[T, hidden_size=64) -> bf16[T] @x x1",
    "%0 = aten.mm(bf16[T, nosuchfield]) -> bf16[T] @x x1",
    "%0 = aten.mm(bf16[T]) -> bf16[T] @x",
    "%0 = aten.mm(bf16[T]) -> bf16[T] @x x1 trailing",
    "bogus line",
])
def test_parse_errors_name_the_line(line):
    text = "ir 1\nmodel m\nmeta {}\nconfig hidden_size=64\nrequest T\n" + line + "\n"
    with pytest.raises(ParseError, match="line 6"):
        loads(text)


def test_newer_ir_version_is_refused():
    with pytest.raises(ParseError, match="newer"):
        loads("ir 99\nmodel m\n")


V1_TEXT = ('ir 1\nmodel m\nmeta {"engine": "x", "layers": 2, "layer_counts": {"0": 2}, "note": "any"}\n'
           'config hidden_size=64\nrequest T\n'
           '%0 = aten.relu(bf16[T, hidden_size=64]) -> bf16[T, hidden_size=64] @x x1\n')


def test_a_version_1_meta_reads_as_a_typed_one():
    g = loads(V1_TEXT)  # a free dict then: fields it lacks take their defaults, keys no field has are left out
    assert g.meta == GraphMeta(engine="x", config={"hidden_size": 64}, request_symbols=("T",), layers=2,
                               layer_counts={0: 2})
    data = json.loads(g.dumps_json())
    data["ir_version"], data["meta"] = 1, {"config": {"hidden_size": 64}, "request_symbols": ["T"]}
    assert Graph.from_json(data).meta == GraphMeta(config={"hidden_size": 64}, request_symbols=("T",))
    assert dumps(g).startswith("ir 3\n")


def test_a_version_2_meta_reads_its_pinned_fields_under_their_old_name():
    text = dumps(loads(V1_TEXT)).replace("ir 3", "ir 2")
    text = text.replace('"pinned_fields": []', '"concrete_fields": ["head_dim"]')
    assert loads(text).meta.pinned_fields == ("head_dim",)
    with pytest.raises(ParseError, match="concrete_fields: expected no such field"):
        loads(text.replace("ir 2", "ir 3"))


def test_a_current_meta_is_checked_field_by_field():
    text = dumps(loads(V1_TEXT))
    for old, new, error in [
        ('"layers": 2', '"layers": 0', r"^line 3: meta\.layers: expected a positive number of layers"),
        ('"layers": 2, ', "", r"^line 3: meta\.layers: expected"),  # every field is written, so one missing is a fault
        ('"layers": 2', '"layers": 2, "note": 1', r"^line 3: meta\.note: expected no such field"),
        ('"layer_groups": []', '"layer_groups": [{"count": 2}]', r"^line 3: meta\.layer_groups: expected a list"),
        ('meta {', 'meta {"config": {}, ', r"^line 3, column \d+: expected a JSON object without config"),
    ]:
        assert old in text
        with pytest.raises(ParseError, match=error):
            loads(text.replace(old, new, 1))
    data = json.loads(loads(V1_TEXT).dumps_json())
    data["meta"]["layer_counts"] = {"first": 2}
    with pytest.raises(IRError, match=r"^meta\.layer_counts: expected an object of layer index"):
        Graph.from_json(data)
    with pytest.raises(ParseError, match="no 'meta' line"):
        loads("\n".join(line for line in text.splitlines() if not line.startswith("meta")))


def test_a_product_divisor_keeps_its_parentheses():
    # OLMoE's rotate_half halves hidden_size // (hidden_size // head_dim)
    text = render(to_sympy("hidden_size//(2*(hidden_size//head_dim))"))
    assert evaluate(text, {"hidden_size": 2048, "head_dim": 128}) == 64
