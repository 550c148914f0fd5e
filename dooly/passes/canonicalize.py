"""Canonical op signatures: what decides which kernel an op launches, and nothing else.

A signature holds the op name, dtypes, the values of config and const dims, the expressions of request dims, the
attributes that change the kernel, and, for attention, the backend. Model-specific names disappear: a config dim is
its value, and the request quantities an op depends on are renamed to sweep axes, so `mm [T, 4096] x [4096, 14336]`
is one signature in every model that runs it, whatever its fields are called.

- An op whose shapes depend on one request expression gets the axis `M` (`[R, 4096]` in the LM head and
  `[T, 4096]` in a layer are the same kernel at different M). Ops with several request expressions keep their
  symbols as axes (`T`, `K`; sliding-window keys `Ks` read as `K`: same kernel).
- Pointwise ops on dense tensors (casts, adds, activations, fills) run one flat kernel over all elements whatever
  the shape, so they become an axis `N` = elements of the output, with each operand marked full, scalar, or
  broadcast along inner or outer dims: the `mul` of an RMSNorm is one signature for every hidden size.

The signature's hash is a stable sha256 of its canonical JSON. Each op also gets a binding: how to compute each
axis of its signature from the IR's request symbols (`M = T`, `N = 4096*T`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..ir.expr import names, render, simplify, to_sympy
from ..ir.graph import Dim, Graph, Op, TensorSpec, When

POINTWISE = {
    "aten.mul.Tensor", "aten.add.Tensor", "aten.sub.Tensor", "aten.div.Tensor", "aten._to_copy", "aten.clone",
    "aten.rsqrt", "aten.pow.Tensor_Scalar", "aten.fill_.Scalar", "aten.zero_", "aten.neg", "aten.copy_",
    "aten.sin", "aten.cos", "aten.silu", "aten.gelu", "aten.tanh", "aten.masked_fill.Scalar",
    "aten.masked_fill_.Scalar", "aten.eq.Scalar", "aten.ge.Scalar", "aten.add_.Tensor", "aten.mul_.Tensor",
    "aten.div_.Tensor", "aten.floor_divide", "aten.clamp_", "aten.full", "aten.sigmoid", "aten.exp", "aten.relu",
}
FAMILIES = {
    "gemm": {"aten.mm", "aten.addmm", "aten.bmm"},
    "attention": {"aten.scaled_dot_product_attention", "vllm.unified_attention_with_output"},
    "moe": {"aten._grouped_mm"},
    "collective": {"_c10d_functional.all_reduce", "_c10d_functional.all_gather_into_tensor",
                   "_c10d_functional.reduce_scatter_tensor"},
    "reduction": {"aten.mean.dim", "aten.sum.dim_IntList", "aten.argmax", "aten._softmax", "aten.topk",
                  "aten.cumsum", "aten.sort", "aten.histc"},
}
# Attributes that are data, not kernel choice: the value filled, a scalar operand, eps, the softmax scale, the
# diagonal of a mask block, sizes that the output shape already gives.
DATA_ATTRS = {"value", "fill_value", "other", "scale", "eps", "diagonal", "end", "size", "min", "max"}
KEY_ALIASES = {"Ks": "K"}


def free_dims(op: Op) -> set[tuple[int, int]]:
    """(tensor index, dim) of dims whose size does not change the kernel's work: the table a gather reads rows
    from, the buffer a scatter writes rows into (the KV-cache pool, the vocabulary, the packed tokens). Tensor
    indices count inputs then outputs."""
    n_in = len(op.inputs)
    if op.name == "aten.index_select":
        return {(0, op.attrs.get("dim", 0))}
    if op.name == "aten.embedding":
        return {(0, 0)}
    if op.name == "aten.index_copy_":
        return {(0, op.attrs.get("dim", 0)), (n_in, op.attrs.get("dim", 0))}
    if op.name == "aten.index.Tensor" and op.outputs and len(op.inputs[0].shape) == len(op.outputs[0].shape):
        return {(0, i) for i, (a, b) in enumerate(zip(op.inputs[0].shape, op.outputs[0].shape)) if a != b}
    return set()


@dataclass(frozen=True)
class Signature:
    hash: str
    family: str
    axes: tuple[str, ...]
    canonical: dict

    @property
    def op(self) -> str:
        return self.canonical["op"]


@dataclass(frozen=True)
class Use:
    """One IR op seen through its signature: which axes values a request point gives it, and how often it runs."""

    op_index: int
    signature: Signature
    binding: dict[str, str]  # axis -> expression over the IR's request symbols
    count: int
    runs_per: str
    when: When | None


def family(name: str) -> str:
    if name in POINTWISE:
        return "pointwise"
    return next((f for f, ops in FAMILIES.items() if name in ops), "memory")


def _value(d: Dim, config: dict[str, int]) -> str | int:
    return d.value if d.kind in ("config", "const") else simplify(d.expr, config)


def _numel(t: TensorSpec, config) -> str:
    return simplify("*".join(f"({d.expr})" for d in t.shape) or "1", config)


def _operand(t: TensorSpec, out: TensorSpec, config) -> str | None:
    """How a pointwise operand maps onto the output, or None if the flat kernel does not apply: `full` (same
    elements), `scalar`, `inner` (repeats along outer dims, like a norm weight), `outer` (repeats along inner dims,
    like a per-row statistic)."""
    if t.strides is not None:
        return None
    full = [_value(d, config) for d in out.shape]
    shape = [1] * (len(full) - len(t.shape)) + [_value(d, config) for d in t.shape]
    if len(shape) != len(full) or any(s not in (1, f) for s, f in zip(shape, full)):
        return None
    repeats = [i for i, (s, f) in enumerate(zip(shape, full)) if s == 1 and f != 1]
    owns = [i for i, (s, f) in enumerate(zip(shape, full)) if s == f and f != 1]
    if not repeats:
        return "full"
    if not owns:
        return "scalar"
    if max(repeats) < min(owns):
        return "inner"
    if max(owns) < min(repeats):
        return "outer"
    return None


def _layout(op: Op, operands: list[str], out: TensorSpec, config) -> dict:
    """A 2-D [rows, cols] layout of N elements that reproduces the op's broadcast: which of rows and cols stays
    fixed (it is a config size) while N is swept. No broadcast: {}."""
    for t, kind in zip(op.inputs, operands):
        if kind in ("inner", "outer"):
            own, repeat = _numel(t, config), simplify(f"({_numel(out, config)})//({_numel(t, config)})")
            inner_size, outer_size = (own, repeat) if kind == "inner" else (repeat, own)
            if inner_size.isdigit():
                return {"cols": int(inner_size)}
            if outer_size.isdigit():
                return {"rows": int(outer_size)}
    return {}


def _attrs(op: Op, config, data: bool = False) -> dict:
    """The op's kernel attributes, or (`data`) the others: values a benchmark needs to call the op, which do not
    change its kernel and stay out of the hash."""
    def canon(v):
        if isinstance(v, dict) and "input" in v:
            return v
        if isinstance(v, dict) and "sym" in v:
            text = simplify(v["sym"], config)
            return int(text) if text.lstrip("-").isdigit() else {"sym": text}
        if isinstance(v, list):
            return [canon(x) for x in v]
        return v

    return {k: canon(v) for k, v in sorted(op.attrs.items()) if (k in DATA_ATTRS) == data}


def signature(op: Op, config: dict[str, int], attention: str, exact: bool = False) -> tuple[Signature, dict[str, str]]:
    """The op's signature and its binding. `exact`: keep shapes and request symbols as the IR has them (no flat
    pointwise kernels, no axis renaming), which is how a per-model profiler tells ops apart."""
    fam = family(op.name)
    out = op.outputs[0] if op.outputs else None
    if fam == "pointwise" and out is not None and out.strides is None and not exact:
        operands = [_operand(t, out, config) for t in op.inputs]
        if None not in operands:
            canonical = {"op": op.name, "family": fam, "dtypes": [t.dtype for t in op.tensors()],
                         "operands": operands, "attrs": _attrs(op, config),
                         "data": {**_attrs(op, config, data=True), **_layout(op, operands, out, config)}}
            return _make(canonical, fam, ("N",)), {"N": _numel(out, config)}
    free = free_dims(op)
    sized = [(i, t) for i, t in enumerate(op.tensors())]
    request = sorted({simplify(d.expr, config) for i, t in sized for j, d in enumerate(t.shape) if (i, j) not in free
                      and d.kind in ("request", "mix")} | {simplify(d.expr, config) for _, t in sized
                      for j, d in enumerate(t.strides or ())
                      if t.shape[j].expr != "1" and d.kind in ("request", "mix")})
    if exact:
        binding = {s: s for e in request for s in names(e)}
        axis_of = lambda text: text  # noqa: E731
    elif len(request) == 1:
        binding, axis_of = {"M": request[0]}, (lambda text: "M")
    else:
        symbols = sorted({s for e in request for s in names(e)})
        binding = {KEY_ALIASES.get(s, s): s for s in symbols}
        subs = {to_sympy(s): to_sympy(KEY_ALIASES[s]) for s in symbols if s in KEY_ALIASES}
        axis_of = (lambda text: render(to_sympy(text).subs(subs))) if subs else (lambda text: text)

    def dim(d: Dim):
        return d.value if d.kind in ("config", "const") else axis_of(simplify(d.expr, config))

    def tensor(i: int, t: TensorSpec) -> dict:
        out = {"dtype": t.dtype, "shape": ["*" if (i, j) in free else dim(d) for j, d in enumerate(t.shape)]}
        if t.strides is not None:  # the stride of a size-1 dim is never used
            out["strides"] = [0 if t.shape[j].expr == "1" else dim(d) for j, d in enumerate(t.strides)]
        return out

    tensors = [tensor(i, t) for i, t in sized]
    canonical = {"op": op.name, "family": fam, "inputs": tensors[:len(op.inputs)],
                 "outputs": tensors[len(op.inputs):], "attrs": _attrs(op, config),
                 "data": _attrs(op, config, data=True)}
    if fam == "attention":
        canonical["backend"] = attention  # the key stored signatures were hashed with
    return _make(canonical, fam, tuple(sorted(binding))), binding


def _make(canonical: dict, fam: str, axes: tuple[str, ...]) -> Signature:
    canonical = {**canonical, "axes": list(axes)}
    text = json.dumps({k: v for k, v in canonical.items() if k != "data"}, sort_keys=True, separators=(",", ":"))
    return Signature(hashlib.sha256(text.encode()).hexdigest()[:16], fam, axes, canonical)


def uses(graph: Graph, attention: str, exact: bool = False) -> list[Use]:
    config = graph.config_values
    out = []
    for i, op in enumerate(graph.ops):
        sig, binding = signature(op, config, attention, exact)
        out.append(Use(i, sig, binding, op.count, op.runs_per, op.when))
    return out


def unique(graph: Graph, attention: str, exact: bool = False) -> dict[str, Signature]:
    return {u.signature.hash: u.signature for u in uses(graph, attention, exact)}
