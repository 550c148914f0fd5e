"""Generated microbenchmarks: golden text for a few signatures, and every zoo signature imports and runs (CPU)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, ZOO, zoo_graph

from dooly.passes import codegen
from dooly.passes.canonicalize import Signature, unique

GOLDEN = ROOT / "golden" / "bench"
BACKEND = "paged|sdpa"


def zoo_signatures() -> dict[str, Signature]:
    sigs = {}
    for name in ZOO:
        sigs.update(unique(zoo_graph(name), BACKEND))
    return sigs


def golden_picks() -> dict[str, Signature]:
    """One signature of each kind worth reading: a GEMM, a flat pointwise op with a broadcast, attention,
    an expert GEMM, a cache read, a per-request mask op."""
    sigs = unique(zoo_graph("mixtral-8x7b"), BACKEND)
    pick = {}
    for s in sigs.values():
        c = s.canonical
        kind = {"aten.mm": "gemm", "aten.scaled_dot_product_attention": "attention", "aten._grouped_mm": "moe",
                "aten.index_select": "cache-read", "aten.triu": "mask-block"}.get(s.op)
        if s.op == "aten.mul.Tensor" and c.get("operands") == ["full", "outer"]:
            kind = "pointwise-broadcast"
        if kind and kind not in pick:
            pick[kind] = s
    return pick


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["gemm", "attention", "moe", "cache-read", "mask-block", "pointwise-broadcast"])
def test_generated_text_matches_golden(kind):
    """`DOOLY_UPDATE_GOLDEN=1 pytest tests/test_codegen.py -k golden` writes golden/bench anew."""
    text = codegen.generate(golden_picks()[kind])
    if os.environ.get("DOOLY_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        (GOLDEN / f"{kind}.py").write_text(text)
    assert text == (GOLDEN / f"{kind}.py").read_text()


def _small_point(sig):
    point = {a: 3 for a in sig.axes}
    if "N" in point:
        point["N"] = 3 * 4096
    if "k" in point:
        point["k"] = 7
    if sig.family == "attention":
        point = {"T": 2, "K": 5}
    return point


def test_every_zoo_signature_generates_and_imports(tmp_path):
    sigs = zoo_signatures()
    paths = codegen.write(list(sigs.values()), tmp_path)
    assert len(paths) == len(sigs) > 200
    for h, path in paths.items():
        module = _load(path)
        assert module.SIGNATURE == h and tuple(module.AXES) == sigs[h].axes


def op_kind(sig: Signature) -> tuple:
    """What a signature's benchmark code depends on beyond its sizes: the op, its operands' ranks, layouts and
    dtypes, its attributes (sinks, causality, reduction dims)."""
    c = sig.canonical
    layout = lambda ts: tuple((len(t["shape"]), "strides" in t, t["dtype"]) for t in ts)  # noqa: E731
    return (c["op"], layout(c.get("inputs", [])), layout(c.get("outputs", [])),
            json.dumps(c.get("attrs"), sort_keys=True), tuple(sorted(c.get("data") or {})),
            tuple(c.get("operands") or ()))


def test_every_op_kind_of_the_zoo_runs(tmp_path):
    """One benchmark of each op kind that any zoo model brings, run at a small point on the CPU, so a new family's
    op (sinks, shared experts, a new router) is exercised as soon as its config joins the zoo."""
    smallest: dict[tuple, tuple[int, Signature]] = {}
    for sig in zoo_signatures().values():
        size = sum(math.prod(d for d in t["shape"] if isinstance(d, int)) for t in sig.canonical.get("inputs", []))
        kind = op_kind(sig)
        if kind not in smallest or size < smallest[kind][0]:
            smallest[kind] = (size, sig)
    sigs = {sig.hash: sig for _, sig in smallest.values()}
    assert len(sigs) > 50
    for h, path in codegen.write(list(sigs.values()), tmp_path).items():
        module = _load(path)
        out = module.run(*module.make_inputs(_small_point(sigs[h]), "cpu"))
        assert out is not None, sigs[h].op


def test_a_generated_file_runs_alone(tmp_path):
    sig = golden_picks()["gemm"]
    path = codegen.write([sig], tmp_path)[sig.hash]
    out = subprocess.run([sys.executable, str(path), "--points", "M=1,3", "--device", "cpu"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["point"] for r in rows] == [{"M": 1}, {"M": 3}] and all(r["median_us"] > 0 for r in rows)


def test_attention_mask_comes_from_the_engine():
    from dooly.bench import harness

    queries, keys = harness.composition(3, 10)
    assert queries == [1, 1, 1] and sum(keys) == 10
    mask = harness.engine_batch(queries, keys, "cpu")["attention_mask"]
    assert tuple(mask.shape) == (1, 1, 3, 10)
    allowed = (mask[0, 0] == 0).tolist()
    # block-diagonal: each decoding request sees exactly its own keys
    assert [sum(row) for row in allowed] == keys
    assert [row.index(True) for row in allowed] == [0, keys[0], keys[0] + keys[1]]


def test_routing_offsets_cover_every_row():
    from dooly.bench import harness

    for skewed in (False, True):
        offs = harness.routed_offsets(1000, 8, skewed, "cpu")
        counts = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int32), offs])).tolist()
        assert offs[-1] == 1000 and min(counts) >= 0
        assert (max(counts) > 3 * min(counts) + 1) == skewed


@pytest.mark.parametrize("bad", ["aten.mm; import os", "os.system", "aten.no_such_op", "aten.mm.nope"])
def test_only_known_ops_are_generated(bad):
    sig = golden_picks()["gemm"]
    forged = Signature(sig.hash, sig.family, sig.axes, {**sig.canonical, "op": bad})
    with pytest.raises(codegen.CodegenError):
        codegen.generate(forged)


def test_strings_from_elsewhere_are_not_pasted():
    sig = golden_picks()["gemm"]
    forged = Signature(sig.hash, sig.family, sig.axes, {**sig.canonical, "attrs": {"dtype": "bf16); import os; ("}})
    with pytest.raises(codegen.CodegenError):
        codegen.generate(forged)
    shape = {**sig.canonical["inputs"][0], "shape": ["__import__('os')", 4096]}
    forged = Signature(sig.hash, sig.family, sig.axes, {**sig.canonical, "inputs": [shape, sig.canonical["inputs"][1]]})
    with pytest.raises(Exception):
        codegen.generate(forged)
