"""The IR's contract: every shipped IR keeps it, and a graph altered to break any part of it is refused by name."""

from dataclasses import replace

import pytest
from helpers import ROOT, compile_dict, tiny_llama

from dooly.compile import load_model
from dooly.errors import DoolyError
from dooly.ir import Dim, Graph, LayerGroup, Op, TensorSpec, loads
from dooly.ir.graph import IRError
from dooly.ir.verify import verify

SHIPPED = sorted([*ROOT.glob("golden/*.ir"), *ROOT.glob("golden/vllm/*.ir"), *ROOT.glob("data/vllm-ir/*.ir")])
GOLDEN = loads((ROOT / "golden" / "gemma-2-2b.ir").read_text())  # two layer groups, sliding and full attention


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_ir_keeps_the_contract(path):
    verify(loads(path.read_text()))


def _index(graph: Graph, name: str, scope: str = "") -> int:
    return next(i for i, op in enumerate(graph.ops) if op.name == name and scope in op.scope)


def _with_op(graph: Graph, index: int, **changes) -> Graph:
    ops = list(graph.ops)
    ops[index] = replace(ops[index], **changes)
    return graph.with_ops(ops)


def _with_dim(graph: Graph, index: int, dim: Dim) -> Graph:
    """The graph with the first dim of op `index`'s first input replaced."""
    first = graph.ops[index].inputs[0]
    return _with_op(graph, index, inputs=(replace(first, shape=(dim, *first.shape[1:])), *graph.ops[index].inputs[1:]))


MM = _index(GOLDEN, "aten.mm", "mlp.up_proj")  # reads [T, hidden_size] from the layer's norm
MASK = _index(GOLDEN, "aten.triu")  # a per-request op of the attention mask


def _numbered_layer(graph: Graph) -> Graph:
    return _with_op(graph, MM, scope=graph.ops[MM].scope.replace("layers.*", "layers.3"))


BROKEN = {
    "a config dim with another value": (
        _with_dim(GOLDEN, MM, Dim("hidden_size", "config", 4000)),
        r"dim 'hidden_size' has value 4000, the config gives 2304"),
    "a request dim labelled config": (
        _with_dim(GOLDEN, MM, Dim("T", "config", 1)), r"dim 'T' is labelled 'config', its symbols make it 'request'"),
    "a dim over an unknown symbol": (
        _with_dim(GOLDEN, MM, Dim("T*n_embd", "mix")), r"dim 'T\*n_embd' is not an expression over the graph's "
                                                       r"symbols \(unknown symbols n_embd"),
    "a config field missing from the meta": (
        GOLDEN.with_ops(GOLDEN.ops, config={k: v for k, v in GOLDEN.meta.config.items() if k != "vocab_size"}),
        r"unknown symbols vocab_size"),
    "a negative size": (_with_dim(GOLDEN, MM, Dim("hidden_size - 4096", "config", -1792)),
                        r"dim 'hidden_size - 4096' is negative"),
    "a request dim with a value": (_with_dim(GOLDEN, MM, Dim("T", "request", 8)), r"is a request dim with a value"),
    "one request's size in a per-step op": (_with_dim(GOLDEN, MM, Dim("q", "request")), r"reads one request's sizes"),
    "an input made by a later op": (
        _with_op(GOLDEN, MM, inputs=(replace(GOLDEN.ops[MM].inputs[0], src=MM + 1), *GOLDEN.ops[MM].inputs[1:])),
        rf"ops\[{MM}\]\.inputs\[0\]: made by op {MM + 1}, expected an earlier op"),
    "a count of zero": (_with_op(GOLDEN, MASK, count=0), rf"ops\[{MASK}\] \(aten.triu\): count 0: expected a positive"),
    "a condition as a string": (_with_op(GOLDEN, MM, when="K > T"), r"when 'K > T': expected a condition"),
    "layer groups that miss a layer": (
        GOLDEN.with_ops(GOLDEN.ops, layer_groups=(LayerGroup((0,), 13), LayerGroup((1,), 12))),
        r"meta.layer_groups stand for 25 layers, the model has 26"),
    "a layer group of an untraced layer": (
        GOLDEN.with_ops(GOLDEN.ops, layer_groups=(LayerGroup((0,), 13), LayerGroup((2,), 13))),
        r"meta.layer_groups: layers 2 were not traced"),
    "layer counts that miss a layer": (
        GOLDEN.with_ops(GOLDEN.ops, layer_counts={0: 13, 1: 12}), r"meta.layer_counts add up to 25 layers"),
    "a layer that collapse left numbered": (_numbered_layer(GOLDEN), r"in layer 3, which no collapse folded"),
    "collapsed layers without groups": (GOLDEN.with_ops(GOLDEN.ops, layer_groups=()), r"but no layer groups"),
    "a pinned field that is no config field": (
        GOLDEN.with_ops(GOLDEN.ops, pinned_fields=("n_embd",)), r"meta.pinned_fields: n_embd not in the config"),
    "a meta field of the wrong type": (
        GOLDEN.with_ops(GOLDEN.ops, sliding_window="4096"), r"meta.sliding_window: expected null or a window size"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_graph_is_refused_naming_what_is_wrong(case):
    graph, message = BROKEN[case]
    with pytest.raises(IRError, match=rf"^gemma-2-2b: .*{message}"):
        verify(graph)


def test_a_sharded_graph_records_its_ranks_alike_in_meta_and_config():
    sharded = GOLDEN.with_ops(GOLDEN.ops, config={**GOLDEN.meta.config, "tp": 1}, tp=2)
    with pytest.raises(IRError, match=r"meta.tp is 2, the config's tp 1"):
        verify(sharded)


def test_a_hand_built_graph_in_python_is_checked_too():
    op = Op("aten.relu", (TensorSpec("bf16", (Dim("T", "request"),)),), (TensorSpec("bf16", (Dim("T", None),)),))
    with pytest.raises(IRError, match=r"ops\[0\]\.outputs\[0\]\.shape\[0\]: dim 'T' is labelled None"):
        verify(Graph("hand", GOLDEN.meta, [op]))


def test_loading_an_ir_that_reads_but_breaks_the_contract_is_refused(tmp_path):
    text = (ROOT / "golden" / "gemma-2-2b.ir").read_text()
    path = tmp_path / "edited.ir"
    path.write_text(text.replace("hidden_size=2304]", "hidden_size=2000]", 1))  # the reader takes any size
    with pytest.raises(DoolyError, match=r"edited.ir: not a valid IR \(gemma-2-2b: .*has value 2000, the config"):
        load_model(path)


def test_the_compiler_checks_each_pass(monkeypatch):
    import dooly.passes.pipeline as pipeline

    collapse = pipeline.collapse

    def miscounting_collapse(graph):
        collapsed = collapse(graph)
        return collapsed.with_ops(collapsed.ops, layer_groups=(LayerGroup((0,), 3),))

    monkeypatch.setattr(pipeline, "collapse", miscounting_collapse)
    with pytest.raises(IRError, match=r"meta.layer_groups stand for 3 layers, the model has 2"):
        compile_dict(tiny_llama())
