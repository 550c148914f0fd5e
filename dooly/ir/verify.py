"""The IR's contract: what every compiled graph holds, whoever built it.

The readers check each line or JSON value against the grammar; `verify` checks what holds across them: every dim
is an expression over the graph's config fields and request symbols with the kind those symbols give it, config
and const dims carry the values the config gives them, ops name earlier ops only, the meta is typed and its layer
counts add up to the model's layers. The compile pipeline runs it after every pass and the drivers when they load
an IR, so a pass that breaks the contract fails where it broke it.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

from .expr import ExprError, evaluate, names
from .graph import (
    COLLAPSED_LAYER,
    CONDITIONS,
    DTYPES,
    LAYER,
    META_FIELDS,
    MODEL_NAME,
    OP_NAME,
    RUNS_PER,
    SCOPE,
    Dim,
    Graph,
    GraphMeta,
    IRError,
    LayerGroup,
    Op,
    TensorSpec,
    When,
    attr_problem,
    dim_kind,
    is_int,
)

PER_REQUEST_SYMBOLS = {"q", "k"}  # one request's sizes: only ops the engine runs once per request read them
CONDITION_SYMBOLS = {"K", "T"}  # what every `When` compares


def verify(graph: Graph) -> None:
    """IRError naming the model and the first part of `graph` that breaks the IR's contract."""
    if not isinstance(graph.meta, GraphMeta):
        raise IRError(f"{graph.model}: meta: expected a GraphMeta, not {type(graph.meta).__name__}")
    problem = next(chain(_meta_problems(graph.model, graph.meta), _op_problems(graph), _layer_problems(graph)), None)
    if problem is not None:
        raise IRError(f"{graph.model}: {problem}")


def _meta_problems(model: str, meta: GraphMeta) -> Iterator[str]:
    if type(model) is not str or not MODEL_NAME.fullmatch(model):
        yield f"model {model!r}: expected a model name (letters, digits and _.+-)"
    if not all(isinstance(g, LayerGroup) and type(g.layers) is tuple for g in meta.layer_groups):
        yield "meta.layer_groups: expected LayerGroups"
        return
    as_json = meta.to_json()
    for key, (check, what) in META_FIELDS.items():
        if key in as_json and not check(as_json[key]):
            yield f"meta.{key}: expected {what}"
    if meta.config.get("tp", meta.tp) != meta.tp:
        yield f"meta.tp is {meta.tp}, the config's tp {meta.config['tp']}"
    if unknown := sorted(set(meta.pinned_fields) - set(meta.config)):
        yield f"meta.pinned_fields: {', '.join(unknown)} not in the config"
    if meta.layer_counts and sum(meta.layer_counts.values()) != meta.layers:
        yield f"meta.layer_counts add up to {sum(meta.layer_counts.values())} layers, the model has {meta.layers}"
    yield from _group_problems(meta)


def _group_problems(meta: GraphMeta) -> Iterator[str]:
    if not meta.layer_groups:
        return
    grouped = [layer for g in meta.layer_groups for layer in g.layers]
    if sum(g.count for g in meta.layer_groups) != meta.layers:
        yield (f"meta.layer_groups stand for {sum(g.count for g in meta.layer_groups)} layers, the model has "
               f"{meta.layers}")
    if len(set(grouped)) != len(grouped):
        yield "meta.layer_groups: a layer is in more than one group"
    traced = set(meta.layer_counts) or set(range(meta.layers))
    if strays := sorted(set(grouped) - traced):
        yield f"meta.layer_groups: layers {', '.join(map(str, strays))} were not traced"
    if meta.layer_counts and (missing := sorted(traced - set(grouped))):
        yield f"meta.layer_groups: traced layers {', '.join(map(str, missing))} are in no group"


def _layer_problems(graph: Graph) -> Iterator[str]:
    """Collapsed layers and layer groups come together: collapse rewrites every layer's scope to `layers.*`."""
    collapsed = [i for i, op in enumerate(graph.ops) if COLLAPSED_LAYER.search(op.scope)]
    if graph.meta.layer_groups:
        if not collapsed:
            yield "meta.layer_groups: no op is in a collapsed layer"
        for i, op in enumerate(graph.ops):
            if m := LAYER.search(op.scope):
                yield f"ops[{i}] ({op.name} at {op.scope}): in layer {m.group(3)}, which no collapse folded"
    elif collapsed:
        i = collapsed[0]
        yield f"ops[{i}] ({graph.ops[i].name} at {graph.ops[i].scope}): in a collapsed layer, but no layer groups"


def _op_problems(graph: Graph) -> Iterator[str]:
    config, request = graph.meta.config, frozenset(graph.meta.request_symbols)
    for i, op in enumerate(graph.ops):
        path = f"ops[{i}]"
        yield from (f"{path} ({op.name}): {p}" for p in _op_fields(op, request))
        for where, tensors in (("inputs", op.inputs), ("outputs", op.outputs)):
            for j, t in enumerate(tensors):
                yield from _tensor_problems(t, f"{path}.{where}[{j}]", i, op, config, request)


def _op_fields(op: Op, request: frozenset[str]) -> Iterator[str]:
    if type(op.name) is not str or not OP_NAME.fullmatch(op.name):
        yield "expected an op name (namespace.op or namespace.op.overload)"
    if type(op.scope) is not str or not SCOPE.fullmatch(op.scope):
        yield f"scope {op.scope!r}: expected a module scope (dotted names, digits or *)"
    if not is_int(op.count) or op.count < 1:
        yield f"count {op.count!r}: expected a positive count"
    if op.runs_per not in RUNS_PER:
        yield f"per {op.runs_per!r}: expected one of {', '.join(RUNS_PER)}"
    if op.when is not None and not isinstance(op.when, When):
        yield f"when {op.when!r}: expected a condition ({' or '.join(CONDITIONS)})"
    elif op.when is not None and not CONDITION_SYMBOLS <= request:
        yield f"when {op.when.value}: the graph's request symbols lack {', '.join(sorted(CONDITION_SYMBOLS - request))}"
    if type(op.attrs) is not dict:
        yield "attrs: expected an object of attributes"
    elif problem := next((p for k, v in op.attrs.items() if (p := attr_problem(v, f"attrs.{k}"))), None):
        yield f"{problem[0]}: expected {problem[1]}"


def _tensor_problems(t: TensorSpec, path: str, index: int, op: Op, config: dict[str, int],
                     request: frozenset[str]) -> Iterator[str]:
    if t.dtype not in DTYPES.values():
        yield f"{path}: dtype {t.dtype!r} is not one of {', '.join(DTYPES.values())}"
    if t.src is not None and not (is_int(t.src) and 0 <= t.src < index):
        yield f"{path}: made by op {t.src!r}, expected an earlier op (below {index})"
    if t.strides is not None and len(t.strides) != len(t.shape):
        yield f"{path}: {len(t.strides)} strides for {len(t.shape)} dims"
    dims = [(f"{path}.shape[{k}]", d) for k, d in enumerate(t.shape)]
    dims += [(f"{path}.strides[{k}]", d) for k, d in enumerate(t.strides or ())]
    for where, d in dims:
        if problem := _dim_problem(d, config, request, op.runs_per):
            yield f"{where}: dim {d.expr!r} {problem}"


def _dim_problem(d: Dim, config: dict[str, int], request: frozenset[str], per: str) -> str | None:
    try:
        kind = dim_kind(d.expr, config, request)
        value = evaluate(d.expr, config) if kind in ("config", "const") else None
    except (ExprError, TypeError, ArithmeticError) as e:
        return f"is not an expression over the graph's symbols ({e})"
    if d.kind != kind:
        return f"is labelled {d.kind!r}, its symbols make it {kind!r}"
    if kind in ("config", "const"):
        if not (is_int(d.value) and d.value == value):
            return f"has value {d.value!r}, the config gives {value}"
        return None if value >= 0 else "is negative: sizes and strides are never below 0"
    if d.value is not None:
        return f"is a {kind} dim with a value ({d.value!r}): only config and const dims have one"
    if per == "step" and names(d.expr) & PER_REQUEST_SYMBOLS:
        return "reads one request's sizes in an op that runs once a step"
    return None
