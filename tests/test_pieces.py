"""The pieces pass and the generated benchmarks of compiled vLLM pieces, on the shipped vLLM IRs."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from dooly.compile import load_model
from dooly.ir.graph import Graph, map_dims
from dooly.passes import codegen
from dooly.passes.canonicalize import Signature
from dooly.passes.pieces import SPLITTING_OPS, PieceError, dump, piece_uses, pieces

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "vllm"
MODELS = ["llama-4-scout-17b-16e", "deepseek-r1", "qwen3-next-80b-a3b"]


@pytest.mark.parametrize("name", MODELS)
def test_every_layer_boundary_is_one_piece(name):
    g = load_model(GOLDEN / f"{name}.ir")
    cut = pieces(g, "FLASH_ATTN")
    assert [p.role for p in (cut[0], cut[-1])] == ["first", "last"] and cut[0].count == cut[-1].count == 1
    assert sum(p.count for p in cut if p.role == "layer") == g.meta.layers - 1
    inside = [i for p in cut for i in p.ops]
    assert not any(g.ops[i].name in SPLITTING_OPS for i in inside)
    assert all(g.ops[i].scope.startswith("model.") for i in inside)
    for p in cut:  # a piece runs its ops in the order of the layer they come from
        assert dump(g, [p]).count(p.signature.hash) == 1


def test_a_step_is_its_pieces_and_the_ops_around_them():
    g = load_model(GOLDEN / "llama-4-scout-17b-16e.ir")
    used = piece_uses(g, "FLASH_ATTN")
    names = {u.signature.op for u in used}
    assert "dooly.piece" in names and "vllm.unified_attention_with_output" in names and "aten.argmax" in names
    assert not names & {"aten.embedding", "vllm_ir.rms_norm"}  # inside the pieces now
    attention = next(u for u in used if u.signature.op == "vllm.unified_attention_with_output")
    assert attention.count == 12  # one use per attention template; the pieces hold the rest


def _edited(g: Graph, dim, config: dict) -> Graph:
    return Graph(g.model, replace(g.meta, config=config), [map_dims(op, dim) for op in g.ops])


def test_pieces_dedup_across_field_names_not_across_sizes():
    g = load_model(GOLDEN / "llama-4-scout-17b-16e.ir")
    hashes = lambda graph: [p.signature.hash for p in pieces(graph, "FLASH_ATTN")]  # noqa: E731
    word = re.compile(r"\bhidden_size\b")
    config = g.meta.config
    renamed = _edited(g, lambda d: replace(d, expr=word.sub("n_embd", d.expr)),
                      {("n_embd" if k == "hidden_size" else k): v for k, v in config.items()})
    assert hashes(renamed) == hashes(g)  # another family's name for the same size
    smaller = _edited(g, lambda d: replace(d, value=1024) if d.expr == "hidden_size" else d,
                      {**config, "hidden_size": 1024})
    assert not set(hashes(smaller)) & set(hashes(g))  # every piece reads the hidden size


def test_other_request_dims_inside_a_compiled_region_are_refused():
    g = load_model(GOLDEN / "llama-4-scout-17b-16e.ir")
    i = next(i for i, op in enumerate(g.ops) if op.name == "aten.mm" and op.scope.startswith("model.layers"))
    bad = g.ops[i].inputs[0]
    ops = list(g.ops)
    ops[i] = replace(g.ops[i], inputs=(replace(bad, shape=(replace(bad.shape[0], expr="K", kind="request"),
                                                         *bad.shape[1:])),) + g.ops[i].inputs[1:])
    with pytest.raises(PieceError, match="only the token count"):
        pieces(Graph(g.model, g.meta, ops), "FLASH_ATTN")


def _dense_piece() -> Signature:
    g = load_model(GOLDEN / "llama-4-scout-17b-16e.ir")
    return next(p.signature for p in pieces(g, "FLASH_ATTN") if p.role == "first")  # no MoE op in it


def test_generated_piece_runs_at_any_token_count(tmp_path):
    sig = _dense_piece()
    path = codegen.write([sig], tmp_path)[sig.hash]
    from dooly.profile import load

    module = load(path)
    for m in (5, 1, 17):  # one graph for all sizes, size 1 included
        outputs = module.run(*module.make_inputs({"M": m}, "cpu"))
        assert outputs and all(o.shape[0] == m for o in outputs)


def test_piece_codegen_refuses_what_is_not_in_the_grammar():
    sig = _dense_piece()
    ops = [dict(m) for m in sig.canonical["ops"]]
    for tamper, message in [
        ({"op": "os.system"}, "torch has no such op"),
        ({"from": [len(ops)] * len(ops[0]["inputs"])}, "does not come before"),
        ({"attrs": {"epsilon": "1e-5'); import os; ('"}}, "attribute"),
    ]:
        bad = [dict(ops[0], **tamper), *ops[1:]]
        with pytest.raises(codegen.CodegenError, match=message):
            codegen.generate_piece(Signature(sig.hash, "piece", ("M",), {**sig.canonical, "ops": bad}))
