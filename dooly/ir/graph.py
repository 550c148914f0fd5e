"""The IR: a model's serving step as a list of op nodes, each with tensor specs whose dims carry their origin.

An op is one kernel-launching dispatcher call of the serving engine. Its tensor specs hold dims written as
expressions (see `dooly.ir.expr`); after the taint pass each dim also has a `kind`:

- ``config``: fixed by the model configuration (`hidden_size`, `num_key_value_heads*head_dim`), with its value;
- ``request``: set by the batch being served (`T`, `K`, `R + 1`), no value;
- ``mix``: both (`T*num_attention_heads`), no value;
- ``const``: neither (`1`, the engine's static buffer sizes), with its value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

from ..errors import DoolyError
from .expr import ExprError, names

IR_VERSION = 3  # 3: the meta names its pinned fields `pinned_fields` (2: `concrete_fields`); 2: the meta is a
# GraphMeta, each field typed and required; 1: a free dict, read leniently
KINDS = ("config", "request", "mix", "const")
RUNS_PER = ("step", "request")

REQUEST_SYMBOLS = {
    "T": "query tokens of the step, all requests packed",
    "R": "requests in the step",
    "K": "keys the full-attention layers attend to: past plus new tokens of all requests",
    "Ks": "keys the sliding-window layers attend to: new tokens plus at most window-1 past ones per request",
    "Kmax": "keys of the longest request in the step (varlen attention kernels size their grid by it)",
    "Tmax": "new tokens of the longest request in the step (likewise)",
    "q": "query tokens of one request (ops run once per request)",
    "k": "keys of one request (ops run once per request)",
}

DTYPES = {
    "torch.bfloat16": "bf16", "torch.float16": "f16", "torch.float32": "f32", "torch.float64": "f64",
    "torch.int64": "i64", "torch.int32": "i32", "torch.int16": "i16", "torch.int8": "i8", "torch.uint8": "u8",
    "torch.bool": "bool", "torch.float8_e4m3fn": "f8e4m3fn", "torch.float8_e5m2": "f8e5m2",
    "torch.complex64": "c64",
}

# The grammar of names an IR may hold: whatever a reader accepts can be written into a generated benchmark, so
# each is a fixed table or a pattern with no quotes, spaces or brackets.
OP_NAME = re.compile(r"[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")  # namespace.op[.overload]
SCOPE = re.compile(r"((?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+|\*)(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+|\*))*)?")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")
FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
ATTR_STRING = re.compile(r"[A-Za-z0-9_.:,+ -]{0,100}")  # "tanh", "contiguous_format", "bf16", "cuda:0"
META_NAME = re.compile(r"[A-Za-z0-9_.|+-]{0,100}")  # "LlamaForCausalLM", "paged|sdpa", "transformers-cb", "5.17.0"
GUARD = re.compile(r"[A-Za-z0-9_.,+*/%()<>=! -]{1,2000}")  # a relation torch assumed of the symbols, as sympy prints it
LAYER_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")
# a decoder layer in a scope, whatever the model calls their ModuleList (GPT-2's `transformer.h.3`), and one that
# the collapse pass made stand for a layer group (`model.layers.*`)
LAYER = re.compile(r"(^|\.)(layers|h|blocks|block|layer)\.(\d+)(?=\.|$)")
COLLAPSED_LAYER = re.compile(r"(^|\.)(layers|h|blocks|block|layer)\.\*(?=\.|$)")
INT_LIMIT = 2**63  # sizes, strides, counts and attribute integers are int64 for torch
ATTR_DEPTH = 4


class When(Enum):
    """A condition on the step under which the engine runs an op at all, its value as the IR prints it."""

    PAST_KEYS = "K > T"  # some request of the step reads keys cached by earlier steps
    NO_PAST_KEYS = "K == T"  # every request is new: no past keys to read


CONDITIONS = tuple(w.value for w in When)


class IRError(DoolyError, ValueError):
    """A malformed IR (text or JSON), named by where it is: its line and column, or its JSON path."""


def is_int(v) -> bool:
    return type(v) is int and -INT_LIMIT < v < INT_LIMIT


def is_expr(text) -> bool:
    try:
        return type(text) is str and names(text) is not None
    except ExprError:
        return False


def dim_kind(expr: str, config, request) -> str:
    """The kind of a dim from the symbols its expression uses; ExprError if it is not one over known symbols."""
    used = names(expr)
    if used - set(config) - set(request):
        raise ExprError(f"unknown symbols {', '.join(sorted(used - set(config) - set(request)))} in {expr!r}")
    if not used:
        return "const"
    if used <= set(config):
        return "config"
    return "request" if used <= set(request) else "mix"


def attr_problem(value, path: str, depth: int = 0) -> tuple[str, str] | None:
    """(path of the part at fault, what it should be) if `value` is not an op attribute, else None. Attributes are
    JSON scalars (strings of ATTR_STRING), `{"sym": dim expression}`, `{"input": index}` (a slot of a tensor list),
    and lists of these."""
    if value is None or type(value) in (bool, float) or is_int(value):
        return None
    if type(value) is str:
        return None if ATTR_STRING.fullmatch(value) else (path, "a string of letters, digits, spaces and _.:,+-")
    if type(value) is list and depth < ATTR_DEPTH:
        return next((p for i, x in enumerate(value) if (p := attr_problem(x, f"{path}[{i}]", depth + 1))), None)
    if type(value) is dict and list(value) == ["sym"]:
        return None if is_expr(value["sym"]) else (f"{path}.sym", "a dimension expression")
    if type(value) is dict and list(value) == ["input"]:
        return None if is_int(value["input"]) and value["input"] >= 0 else (f"{path}.input", "an input index")
    return path, 'a number, a short string, {"sym": expression}, {"input": index} or a list of these'


@dataclass(frozen=True)
class Dim:
    expr: str
    kind: str | None = None
    value: int | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "expr": self.expr, "value": self.value}


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[Dim, ...]
    strides: tuple[Dim, ...] | None = None  # None: contiguous
    src: int | None = None  # index of the op that produced this tensor, None for weights and engine inputs

    def to_json(self) -> dict:
        d: dict[str, Any] = {"dtype": self.dtype, "shape": [x.to_json() for x in self.shape]}
        if self.strides is not None:
            d["strides"] = [x.to_json() for x in self.strides]
        if self.src is not None:
            d["src"] = self.src
        return d

    def dims(self) -> tuple[Dim, ...]:
        return self.shape + (self.strides or ())


@dataclass(frozen=True)
class Op:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: dict = field(default_factory=dict)
    scope: str = ""
    count: int = 1
    runs_per: str = "step"  # "step": runs `count` times a step; "request": `count` times for each request
    when: When | None = None  # None: the engine runs this op in every step

    def to_json(self) -> dict:
        d = {
            "op": self.name, "count": self.count, "scope": self.scope,
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "attrs": self.attrs,
        }
        if self.runs_per != "step":
            d["per"] = self.runs_per
        if self.when is not None:
            d["when"] = self.when.value
        return d

    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs


def alignment(ops: list[Op]) -> list[tuple[str, int]]:
    """What two traces of one step must share for their ops to be compared one to one: each op's name and how many
    tensors it takes and gives."""
    return [(op.name, len(op.tensors())) for op in ops]


@dataclass(frozen=True)
class LayerGroup:
    """Traced decoder layers that run the same ops, collapsed into one, and the layers of the model they stand for."""

    layers: tuple[int, ...]
    count: int

    def to_json(self) -> dict:
        return {"count": self.count, "layers": list(self.layers)}


@dataclass(frozen=True)
class GraphMeta:
    """What the IR records about the step besides its ops: written by capture (most fields), collapse
    (`layer_groups`) and shard (`tp`, `config`, `tp_plan`). Empty strings say a v1 IR did not record the field."""

    architecture: str = ""  # the model class, as config.json names it
    model_type: str = ""
    frontend: str = ""  # the capture frontend
    engine: str = ""  # the serving engine, as store environments name it
    engine_version: str = ""
    attention: str = ""  # the engine's attention implementation
    dtype: str = ""
    tp: int = 1  # tensor-parallel ranks: the ops are one rank's
    config: dict[str, int] = field(default_factory=dict)  # the values of the config fields that dims read
    pinned_fields: tuple[str, ...] = ()  # fields torch pinned to numbers while tracing, recovered by the taint pass
    request_symbols: tuple[str, ...] = ()
    layers: int = 1  # decoder layers of the model served
    layer_counts: dict[int, int] = field(default_factory=dict)  # traced layer -> the model's layers it stands for
    layer_groups: tuple[LayerGroup, ...] = ()  # empty until collapse
    sliding_window: int | None = None  # the window the engine reads through for sliding-window layers
    engine_config: dict[str, int | str] = field(default_factory=dict)  # the engine settings the step was traced with
    assumes: tuple[str, ...] = ()  # relations torch assumed of the symbols while tracing
    tp_plan: dict[str, str] = field(default_factory=dict)  # module pattern -> TP style; empty on one GPU

    def to_json(self) -> dict:
        d: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if type(value) is tuple else dict(value) if type(value) is dict else value
        d["layer_counts"] = {str(k): n for k, n in self.layer_counts.items()}
        d["layer_groups"] = [g.to_json() for g in self.layer_groups]
        if not self.tp_plan:  # only a sharded IR has one
            del d["tp_plan"]
        return d


def _meta_name(v) -> bool:
    return type(v) is str and META_NAME.fullmatch(v) is not None


def _count(v) -> bool:
    return is_int(v) and v > 0


def _strings(pattern: re.Pattern) -> Callable[[Any], bool]:
    return lambda v: type(v) is list and all(type(x) is str and pattern.fullmatch(x) for x in v)


def _object(keys: re.Pattern, value: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: type(v) is dict and all(type(k) is str and keys.fullmatch(k) and value(x) for k, x in v.items())


def _layer_groups(v) -> bool:
    return type(v) is list and all(type(g) is dict and sorted(g) == ["count", "layers"] and _count(g["count"])
                                   and type(g["layers"]) is list and g["layers"]
                                   and all(is_int(x) and x >= 0 for x in g["layers"]) for g in v)


# each GraphMeta field as JSON: (check, what it should be)
META_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "architecture": (_meta_name, "a class name"),
    "model_type": (_meta_name, "a model type"),
    "frontend": (_meta_name, "a frontend name"),
    "engine": (_meta_name, "an engine name"),
    "engine_version": (_meta_name, "a version"),
    "attention": (_meta_name, "an attention implementation"),
    "dtype": (_meta_name, "a dtype"),
    "tp": (_count, "a positive number of ranks"),
    "config": (_object(FIELD, _count), "config field names with positive integer values"),
    "pinned_fields": (_strings(FIELD), "a list of config field names"),
    "request_symbols": (lambda v: type(v) is list and all(type(x) is str and x in REQUEST_SYMBOLS for x in v),
                        f"request symbols of {', '.join(REQUEST_SYMBOLS)}"),
    "layers": (_count, "a positive number of layers"),
    "layer_counts": (_object(LAYER_INDEX, _count), "an object of layer index: positive count"),
    "layer_groups": (_layer_groups, 'a list of {"count": positive count, "layers": [layer index, ...]}'),
    "sliding_window": (lambda v: v is None or _count(v), "null or a window size"),
    "engine_config": (_object(FIELD, lambda x: is_int(x) or _meta_name(x)), "an object of settings: numbers or names"),
    "assumes": (_strings(GUARD), "a list of relations over symbols"),
    "tp_plan": (_object(SCOPE, lambda x: type(x) is str and FIELD.fullmatch(x) is not None),
                "an object of module: TP style"),
}
OPTIONAL_META = {"tp_plan"}


def _typed(key: str, value):
    """A checked JSON value as its GraphMeta field holds it."""
    if key == "layer_counts":
        return {int(k): n for k, n in value.items()}
    if key == "layer_groups":
        return tuple(LayerGroup(tuple(g["layers"]), g["count"]) for g in value)
    return tuple(value) if type(value) is list else dict(value) if type(value) is dict else value


def meta_from_json(d, version: int, path: str = "meta") -> GraphMeta:
    """The GraphMeta of `GraphMeta.to_json`'s output, each field checked: IRError names the path of the first fault.
    A version-1 meta was a free dict: a field it lacks takes its default, a key GraphMeta has not is left out; a
    version-2 one named the pinned fields `concrete_fields`."""
    if type(d) is not dict:
        raise IRError(f"{path}: expected an object")
    if version <= 2 and "concrete_fields" in d:
        d = {"pinned_fields" if k == "concrete_fields" else k: v for k, v in d.items()}
    for key in d:
        if key not in META_FIELDS and version >= 2:
            raise IRError(f"{path}.{key}: expected no such field (the meta's fields are {', '.join(META_FIELDS)})")
    for key, (check, what) in META_FIELDS.items():
        if key in d and not check(d[key]) or key not in d and version >= 2 and key not in OPTIONAL_META:
            raise IRError(f"{path}.{key}: expected {what}")
    return GraphMeta(**{k: _typed(k, v) for k, v in d.items() if k in META_FIELDS})


@dataclass
class Graph:
    model: str
    meta: GraphMeta
    ops: list[Op]

    def to_json(self) -> dict:
        return {"ir_version": IR_VERSION, "model": self.model, "meta": self.meta.to_json(),
                "ops": [op.to_json() for op in self.ops]}

    @staticmethod
    def from_json(d) -> Graph:
        """The graph of `to_json`'s output, every part checked: IRError names the JSON path of the first fault."""
        return _JsonReader().graph(d)

    def dumps_json(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    def with_ops(self, ops: list[Op], **meta) -> Graph:
        """The graph with these ops, its meta with these fields changed."""
        return Graph(self.model, replace(self.meta, **meta), ops)

    @property
    def config_values(self) -> dict[str, int]:
        return dict(self.meta.config)


def map_dims(op: Op, fn) -> Op:
    """The op with `fn` applied to every dim of every tensor spec."""

    def spec(t: TensorSpec) -> TensorSpec:
        return replace(t, shape=tuple(fn(d) for d in t.shape),
                       strides=None if t.strides is None else tuple(fn(d) for d in t.strides))

    return replace(op, inputs=tuple(map(spec, op.inputs)), outputs=tuple(map(spec, op.outputs)))


class _JsonReader:
    """Graph.from_json: each value checked for its type and grammar before it goes into the graph."""

    def __init__(self):
        self.config: dict[str, int] = {}
        self.request: frozenset[str] = frozenset()

    @staticmethod
    def fail(path: str, what: str):
        raise IRError(f"{path or 'the top level'}: expected {what}")

    def get(self, d, key: str, path: str, check, what: str, default=None, required: bool = False):
        if type(d) is not dict:
            self.fail(path, "an object")
        if key not in d:
            if required:
                self.fail(f"{path}.{key}".lstrip("."), what)
            return default
        if not check(d[key]):
            self.fail(f"{path}.{key}".lstrip("."), what)
        return d[key]

    def graph(self, d) -> Graph:
        version = self.get(d, "ir_version", "", lambda v: is_int(v) and v > 0, "an IR version number", IR_VERSION)
        if version > IR_VERSION:
            raise IRError(f"IR version {version} is newer than this Dooly reads ({IR_VERSION})")
        model = self.get(d, "model", "", lambda v: type(v) is str and MODEL_NAME.fullmatch(v), "a model name "
                         "(letters, digits and _.+-)", required=True)
        meta = meta_from_json(self.get(d, "meta", "", lambda v: type(v) is dict, "an object", {}), version)
        self.config, self.request = meta.config, frozenset(meta.request_symbols)
        ops = self.get(d, "ops", "", lambda v: type(v) is list, "a list of ops", required=True)
        return Graph(model, meta, [self.op(o, i) for i, o in enumerate(ops)])

    def op(self, d, index: int) -> Op:
        path = f"ops[{index}]"
        name = self.get(d, "op", path, lambda v: type(v) is str and OP_NAME.fullmatch(v),
                        "an op name (namespace.op or namespace.op.overload)", required=True)
        tensors = lambda v: type(v) is list  # noqa: E731
        inputs = self.get(d, "inputs", path, tensors, "a list of tensors", required=True)
        outputs = self.get(d, "outputs", path, tensors, "a list of tensors", [])
        attrs = self.get(d, "attrs", path, lambda v: type(v) is dict and all(type(k) is str and FIELD.fullmatch(k)
                                                                              for k in v), "an object of attributes",
                         {})
        problem = next((p for k, v in attrs.items() if (p := attr_problem(v, f"{path}.attrs.{k}"))), None)
        if problem:
            self.fail(*problem)
        return Op(name, tuple(self.tensor(t, f"{path}.inputs[{i}]", index) for i, t in enumerate(inputs)),
                  tuple(self.tensor(t, f"{path}.outputs[{i}]", index) for i, t in enumerate(outputs)), dict(attrs),
                  self.get(d, "scope", path, lambda v: type(v) is str and SCOPE.fullmatch(v),
                           "a module scope (dotted names, digits or *)", ""),
                  self.get(d, "count", path, lambda v: is_int(v) and v > 0, "a positive count", 1),
                  self.get(d, "per", path, lambda v: v in RUNS_PER, f"one of {', '.join(RUNS_PER)}", "step"),
                  self.when(d, path))

    def when(self, d, path: str) -> When | None:
        text = self.get(d, "when", path, lambda v: v in CONDITIONS,
                        f"a condition ({' or '.join(CONDITIONS)})")
        return None if text is None else When(text)

    def tensor(self, d, path: str, index: int) -> TensorSpec:
        dtype = self.get(d, "dtype", path, lambda v: v in DTYPES.values(), f"a dtype ({', '.join(DTYPES.values())})",
                         required=True)
        dims = lambda v: type(v) is list  # noqa: E731
        shape = self.get(d, "shape", path, dims, "a list of dims", required=True)
        strides = self.get(d, "strides", path, lambda v: v is None or dims(v) and len(v) == len(shape),
                           "null or a list of dims as long as the shape")
        src = self.get(d, "src", path, lambda v: v is None or is_int(v) and 0 <= v < index,
                       f"null or the index of an earlier op (below {index})")
        return TensorSpec(dtype, tuple(self.dim(x, f"{path}.shape[{i}]") for i, x in enumerate(shape)),
                          None if strides is None else tuple(self.dim(x, f"{path}.strides[{i}]")
                                                             for i, x in enumerate(strides)), src)

    def dim(self, d, path: str) -> Dim:
        expr = self.get(d, "expr", path, is_expr, "a dimension expression (integer arithmetic over symbols)",
                        required=True)
        try:
            kind = dim_kind(expr, self.config, self.request)
        except ExprError as e:
            raise IRError(f"{path}.expr: {e}") from None
        self.get(d, "kind", path, lambda v: v in (None, kind), f"null or {kind!r} (from its symbols)")
        value = self.get(d, "value", path, lambda v: v is None or is_int(v) and v >= 0, "null or a size")
        if value is None and kind in ("config", "const"):
            self.fail(f"{path}.value", f"the value of this {kind} dim")
        return Dim(expr, kind, value)
