"""Hostile IR files and graphs: a reader either gives a graph in Dooly's grammar or one IRError line, and no
generated benchmark ever carries text that came from outside Dooly's grammar."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ROOT, dooly
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dooly.ir import DTYPES, Dim, Graph, GraphMeta, Op, TensorSpec, dumps, loads
from dooly.ir.graph import IRError
from dooly.passes import codegen
from dooly.passes.canonicalize import Signature, unique

GOLDEN_TEXT = (ROOT / "golden" / "llama-3.2-1b.ir").read_text()
GOLDEN = loads(GOLDEN_TEXT)
INJECTION = "\"\"\"; __import__('os').system('touch P'); \"\"\""
HEADER = "ir 1\nmodel m\nmeta {}\nconfig hidden_size=64\nrequest T K\n"
GOOD_LINE = ("%0 = aten.mm(bf16[T, hidden_size=64], bf16[hidden_size=64, hidden_size=64]) -> bf16[T, hidden_size=64]"
             " @x x1")


def test_the_good_line_parses():
    (op,) = loads(HEADER + GOOD_LINE + "\n").ops
    assert op.name == "aten.mm" and op.outputs[0].shape[1] == Dim("hidden_size", "config", 64)


@pytest.mark.parametrize("old, new, at", [  # at: the text that the error's column points to
    ("-> bf16[", f"-> bf16{INJECTION}[", "bf16\"\"\""),  # the output dtype
    ("aten.mm(", "aten.mm;import os(", "aten.mm;"),  # the op name
    ("aten.mm(", "os.system(", None),  # a name of the grammar that torch has not: refused by codegen, not here
    ("@x x1", "@x;import x1", None),
    ("@x x1", "@a'b x1", "a'b"),  # the scope
    ("[T, hidden", "[__import__('os'), hidden", "__import__"),  # a dim
    ("[T, hidden", "[T.real, hidden", "T.real"),
    ("hidden_size=64]", "hidden_size=6x4]", None),
    ("hidden_size=64]", "hidden_size=99999999999999999999999]", None),
    ("[T, hidden", "[" + "9" * 5000 + ", hidden", "9999"),
    ("[T, hidden", "[9**9**9**9, hidden", "9**"),
    ("[T, hidden", "[nosuch, hidden", "nosuch"),
    ("[T, hidden", "[2*3, hidden", "2*3"),  # a const dim needs its size
    ("hidden_size=64]) ->", "hidden_size]) ->", None),  # so does a config dim
    ("bf16[T, hidden_size=64],", "%0:bf16[T, hidden_size=64],", "%0:"),  # made by itself
    ("%0 =", "%3 =", "3 ="),  # numbered out of order
    (" x1", " x0", None),
    (" x1", " x99999999999999999999", None),
    (" x1", " x1 per-token", None),
    (" x1", " x1 when __import__('os')", None),
    (" x1", " x1 when K > T; T", None),
    ("]) ->", "]{1}) ->", None),  # strides of another rank
    ("]) ->", ']) {"dim": "1\\"); import os; (\\""} ->', None),  # attributes
    ("]) ->", ') {"dim": {"__class__": 1}} ->', None),
    ("]) ->", ']) {"dim": ' + "[" * 50000 + "]" * 50000 + "} ->", None),
    ("]) ->", ']) {"dim": ' + "9" * 5000 + "} ->", None),
    ("]) ->", ']) {"dim": 1 ->', None),
    ("]) ->", ']) {"a b": 1} ->', None),
    ("]) ->", ']) [1] ->', None),
])
def test_hostile_op_lines_are_refused_with_their_line_and_column(old, new, at):
    line = GOOD_LINE.replace(old, new, 1)
    assert line != GOOD_LINE
    text = HEADER + line + "\n"
    if old == "aten.mm(" and "system" in new:  # in the grammar: the reader accepts it, codegen refuses it
        with pytest.raises(codegen.CodegenError, match="torch has no such op"):
            codegen.generate(next(iter(unique(loads(text), "paged|sdpa").values())))
        return
    column = line.index(at) + 1 if at else "[0-9]+"
    with pytest.raises(IRError, match=rf"^line 6, column {column}: expected ") as error:
        loads(text)
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


@pytest.mark.parametrize("header", [
    "ir one", "ir 99", "ir 1 2", "model ../../etc", "model a b", "model ", 'meta {"a": ', "meta [1]",
    "meta " + "[" * 50000, "meta {\"a\": " + "9" * 5000 + "}", "config hidden_size=-1", "config a=1 b", "config 1a=2",
    "config hidden_size=" + "9" * 30, "request T Q", "request T __import__",
])
def test_hostile_header_lines_are_refused(header):
    with pytest.raises(IRError, match=r"^line [0-9]+"):
        loads(header + "\nmodel m\n")


def _mutations():
    chars = st.sampled_from(list("\"'{}[](),:=*%@#\\ -+.0123456789TKRaxz_\n\x00é") + ["bf16", "aten.", "=1"])
    return st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 3), st.lists(chars, max_size=4).map("".join)),
                    min_size=1, max_size=4)


def _mutate(text: str, edits) -> str:
    for pos, cut, insert in edits:
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + cut:]
    return text


GOLDEN_OPS = [line for line in GOLDEN_TEXT.splitlines() if line.startswith("%")]
GOLDEN_HEAD = "\n".join(line for line in GOLDEN_TEXT.splitlines() if not line.startswith("%"))


def _valid(graph: Graph) -> None:
    """What every graph a reader returns satisfies, whatever its file held."""
    for op in graph.ops:
        assert re.fullmatch(r"[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", op.name)
        assert all(t.dtype in DTYPES.values() for t in op.tensors())
        assert not set(op.scope) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.*")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(GOLDEN_OPS) - 1), edits=_mutations())
def test_mutated_golden_lines_parse_or_fail_with_one_line(index, edits):
    line = _mutate(GOLDEN_OPS[index], edits)
    text = GOLDEN_HEAD + "\n" + "\n".join(GOLDEN_OPS[:index] + [line]) + "\n"
    try:
        graph = loads(text)
    except IRError as e:
        assert "\n" not in str(e)
        return
    _valid(graph)
    assert loads(dumps(graph)).to_json() == graph.to_json()
    for sig in unique(graph, "paged|sdpa").values():
        try:
            compile(codegen.generate(sig), "bench.py", "exec")
        except codegen.CodegenError:
            pass


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=12)


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


GOLDEN_JSON = GOLDEN.to_json()
GOLDEN_PATHS = list(_paths(GOLDEN_JSON))


def _replaced(value, path, new):
    if not path:
        return new
    head, *rest = path
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replaced(value[head], rest, new)
    return copy


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(GOLDEN_PATHS) - 1), new=JSON_VALUES)
def test_any_part_of_a_model_json_replaced_reads_or_fails_with_one_line(index, new):
    data = _replaced(GOLDEN_JSON, GOLDEN_PATHS[index], new)
    try:
        graph = Graph.from_json(json.loads(json.dumps(data)))
    except IRError as e:
        assert "\n" not in str(e)
        return
    _valid(graph)


@settings(max_examples=200, deadline=None)
@given(data=JSON_VALUES)
def test_random_json_reads_or_fails_with_one_line(data):
    try:
        _valid(Graph.from_json(data))
    except IRError as e:
        assert "\n" not in str(e)


def test_json_faults_name_their_path():
    data = GOLDEN.to_json()
    data["ops"][27]["outputs"][0]["dtype"] = "bf16" + INJECTION
    with pytest.raises(IRError, match=r"^ops\[27\]\.outputs\[0\]\.dtype: expected a dtype"):
        Graph.from_json(data)
    data = GOLDEN.to_json()
    data["ops"][3]["inputs"][0]["shape"][1]["expr"] = "__import__('os')"
    with pytest.raises(IRError, match=r"^ops\[3\]\.inputs\[0\]\.shape\[1\]\.expr"):
        Graph.from_json(data)
    data = GOLDEN.to_json()
    data["ops"][3]["attrs"] = {"value": {"__reduce__": "os.system"}}
    with pytest.raises(IRError, match=r"^ops\[3\]\.attrs\.value: expected"):
        Graph.from_json(data)
    del data["ops"][3]["inputs"]
    with pytest.raises(IRError, match=r"^ops\[3\]\.inputs: expected a list of tensors"):
        Graph.from_json(data)


def _forged_graph(**output) -> Graph:
    """A graph built in Python, past every reader, whose one op's output spec carries `output`."""
    t, h = Dim("T", "request"), Dim("hidden_size", "config", 64)
    out = replace(TensorSpec("bf16", (t, h)), **output)
    op = Op("aten.mm", (TensorSpec("bf16", (t, h)), TensorSpec("bf16", (h, h))), (out,), {}, "x", 1)
    return Graph("forged", GraphMeta(config={"hidden_size": 64}, request_symbols=("T",)), [op])


class Sneaky(str):
    """A string whose formatting differs from its value: what a check on the value alone would miss."""

    def __format__(self, spec=""):
        return "__import__('os').system('touch P')"

    __str__ = __repr__ = __format__


@pytest.mark.parametrize("output", [
    {"dtype": "bf16" + INJECTION}, {"dtype": Sneaky("bf16")},
    {"shape": (Dim("T", "request"), Dim("hidden_size", "config", "64); __import__('os'"))},
    {"shape": (Dim("T", "request"), Dim("hidden_size", "config", 64.5))},
    {"strides": (Dim("hidden_size", "config", 64), Dim("1", "const", "1)#"))},
])
def test_a_forged_graph_generates_no_benchmark(output):
    (sig,) = {s.hash: s for s in unique(_forged_graph(**output), "paged|sdpa").values()}.values()
    with pytest.raises(codegen.CodegenError):
        codegen.generate(sig)


def test_forged_signatures_generate_no_benchmark():
    sig = next(iter(unique(_forged_graph(), "paged|sdpa").values()))
    text = codegen.generate(sig)
    assert "__import__" not in text
    c = sig.canonical
    forged = [
        replace(sig, hash="../../evil"), replace(sig, family="gemm; import os"), replace(sig, axes=("M; import os",)),
        replace(sig, axes=("device",)),
        replace(sig, canonical={**c, "attrs": {"alpha": codegen.Code("__import__('os')")}}),
        replace(sig, canonical={**c, "attrs": {"alpha": Sneaky("x")}}),
        replace(sig, canonical={**c, "attrs": {"alpha": {"sym": "__import__('os')"}}}),
        replace(sig, canonical={**c, "inputs": [{**c["inputs"][0], "shape": [Sneaky("M"), 64]}, c["inputs"][1]]}),
        replace(sig, canonical={**c, "outputs": [{**c["outputs"][0], "dtype": "bf16" + INJECTION}]}),
        replace(sig, canonical={**c, "inputs": "x"}), replace(sig, canonical=[]),
    ]
    for bad in forged:
        with pytest.raises(codegen.CodegenError):
            codegen.generate(bad)
    assert isinstance(forged[0], Signature)


def test_non_finite_attribute_floats_are_written_as_python():
    assert eval(codegen._literal(float("-inf"))) == float("-inf")  # noqa: S307 - Dooly's own output
    assert codegen._literal(-3.3895313892515355e+38) == "-3.3895313892515355e+38"


def _hostile_files(tmp_path: Path) -> list[Path]:
    ir = tmp_path / "hostile.ir"
    ir.write_text(GOLDEN_TEXT.replace("-> bf16[T, head_dim*num_attention_heads=2048]",
                                      f"-> bf16{INJECTION}[T, head_dim*num_attention_heads=2048]", 1))
    assert INJECTION in ir.read_text()
    data = GOLDEN.to_json()
    data["ops"][27]["outputs"][0]["dtype"] = "bf16" + INJECTION
    model = tmp_path / "model.json"
    model.write_text(json.dumps(data))
    deep = tmp_path / "deep" / "model.json"
    deep.parent.mkdir()
    deep.write_text('{"ir_version": 1, "ops": ' + "[" * 100000 + "]" * 100000 + "}")
    return [ir, model, deep]


def test_hostile_files_stop_every_command_with_one_line(tmp_path):
    for path in _hostile_files(tmp_path):
        for command in (["plan", path], ["profile", path]):
            out = dooly(*command, "--store", tmp_path / "s.sqlite", timeout=120)
            assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert not (ROOT / "P").exists() and not (tmp_path / "P").exists()


def test_profile_refuses_a_hostile_ir_before_generating_anything(tmp_path, monkeypatch):
    """Past its GPU check (faked here), `dooly profile` reads the models first: nothing is generated or run."""
    import torch

    from dooly import profile
    from dooly.store import Environment

    env = Environment("fake", "gpu", "9.0", "1", "12", "2", "3", "transformers-cb", "5", "bf16", "bf16", 256,
                      "paged|sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(profile, "detect", lambda backend: env)
    monkeypatch.chdir(tmp_path)
    for path in _hostile_files(tmp_path):
        code = profile.main([str(path), "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "bench")])
        assert code == 2
    assert not (tmp_path / "P").exists() and not (tmp_path / "bench").exists()
