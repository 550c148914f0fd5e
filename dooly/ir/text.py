"""The IR as readable text, and back.

    ir 2
    model llama-3.1-8b
    meta {"architecture": "LlamaForCausalLM", ...}
    config head_dim=128 hidden_size=4096 ...
    request K R T
    %7 = aten.mm(%6:bf16[T, hidden_size=4096], bf16[hidden_size=4096, intermediate_size=14336]{1, hidden_size=4096})
         -> bf16[T, intermediate_size=14336] @model.layers.*.mlp.gate_proj x32

(one line per op). A dim prints as its expression, followed by `=value` when it has a value: `T` is a request dim,
`hidden_size=4096` a config dim, `T*num_attention_heads` a mix dim, `1` a const. `%6:` names the op that made
an input; `{...}` after a shape gives its strides when the tensor is not contiguous; a JSON object after the
inputs holds the op's scalar attributes; `per-request` marks ops the engine runs once per request, `when ...` the
condition under which it runs them at all. Lines starting with `#` are comments. The `meta` line holds the graph's
`GraphMeta` as JSON, less its config values and request symbols, which have their own lines.

Reading checks every part against the IR's grammar (dtypes from a fixed table, op names, scopes, dim expressions,
attribute values): a line that breaks it is an IRError naming its line and column, whatever else the file holds.
"""

from __future__ import annotations

import json

from .expr import ExprError
from .graph import (
    CONDITIONS,
    DTYPES,
    FIELD,
    IR_VERSION,
    MODEL_NAME,
    OP_NAME,
    REQUEST_SYMBOLS,
    RUNS_PER,
    SCOPE,
    Dim,
    Graph,
    IRError,
    Op,
    TensorSpec,
    When,
    attr_problem,
    dim_kind,
    is_int,
    meta_from_json,
)

OWN_LINES = ("config", "request_symbols")  # meta fields the text form writes on lines of their own


def format_dim(d: Dim) -> str:
    return d.expr if d.value is None or d.expr == str(d.value) else f"{d.expr}={d.value}"


def format_tensor(t: TensorSpec) -> str:
    text = f"{t.dtype}[{', '.join(map(format_dim, t.shape))}]"
    if t.strides is not None:
        text += "{" + ", ".join(map(format_dim, t.strides)) + "}"
    return text if t.src is None else f"%{t.src}:{text}"


def format_op(i: int, op: Op) -> str:
    attrs = f" {json.dumps(op.attrs, sort_keys=True)}" if op.attrs else ""
    outs = ", ".join(map(format_tensor, op.outputs))
    outs = outs if len(op.outputs) == 1 else f"({outs})"
    line = f"%{i} = {op.name}({', '.join(map(format_tensor, op.inputs))}){attrs} -> {outs} @{op.scope} x{op.count}"
    if op.runs_per != "step":
        line += f" per-{op.runs_per}"
    if op.when is not None:
        line += f" when {op.when.value}"
    return line


def dumps(g: Graph, header: str = "") -> str:
    lines = [f"# {row}" for row in header.splitlines()]
    meta = {k: v for k, v in g.meta.to_json().items() if k not in OWN_LINES}
    lines += [f"ir {IR_VERSION}", f"model {g.model}", f"meta {json.dumps(meta, sort_keys=True)}"]
    lines.append("config " + " ".join(f"{k}={v}" for k, v in sorted(g.config_values.items())))
    lines.append("request " + " ".join(sorted(g.meta.request_symbols)))
    lines += [format_op(i, op) for i, op in enumerate(g.ops)]
    return "\n".join(lines) + "\n"


class ParseError(IRError):
    pass


SHOWN = 60  # characters of the line shown around a fault


class _Cursor:
    def __init__(self, text: str, lineno: int):
        self.text, self.pos, self.lineno = text, 0, lineno

    def fail(self, what: str, pos: int | None = None):
        pos = self.pos if pos is None else pos
        start = max(0, pos - SHOWN // 2)
        shown = ("..." if start else "") + self.text[start:start + SHOWN] + (
            "..." if start + SHOWN < len(self.text) else "")
        raise ParseError(f"line {self.lineno}, column {pos + 1}: expected {what}: {shown!r}")

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def eat(self, s: str):
        if not self.peek(s):
            self.fail(repr(s))
        self.pos += len(s)

    def until(self, stops: str) -> str:
        """Text up to the first of `stops` outside parentheses."""
        depth, start = 0, self.pos
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if depth == 0 and c in stops:
                break
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            self.pos += 1
        return self.text[start:self.pos]

    def word(self, stops: str, grammar, what: str) -> str:
        start = self.pos
        text = self.until(stops)
        if not grammar(text):
            self.fail(what, start)
        return text

    def integer(self) -> int:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in "0123456789":
            self.pos += 1
        value = _size(self.text[start:self.pos])
        if value is None:
            self.fail("a number below 2**63", start)
        return value


def _size(text: str) -> int | None:
    """The value of a string of ASCII digits below 2**63, else None (also for a string too long to convert)."""
    digits = text.lstrip("0") or ("0" if text else "")
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
        return None
    return int(digits) if is_int(int(digits)) else None


def _dims(cur: _Cursor, close: str, config, request: frozenset[str]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    while not cur.peek(close):
        if cur.pos >= len(cur.text):
            cur.fail(repr(close))
        start = cur.pos
        text = cur.until(",]}").strip()
        expr, equals, value_text = text.partition("=")
        value = _size(value_text)
        if equals and value is None:
            cur.fail(f"a size after '=' in {text!r}", start)
        try:
            kind = dim_kind(expr, config, request)
        except ExprError as e:
            cur.fail(f"a dimension expression over known symbols ({e})", start)
        if kind == "const" and value is None:
            value = _size(expr)
        if kind in ("config", "const") and value is None:
            cur.fail(f"the size of {kind} dim {expr!r} (as {expr}=size)", start)
        out.append(Dim(expr, kind, value))
        if cur.peek(", "):
            cur.eat(", ")
    cur.eat(close)
    return tuple(out)


def _tensor(cur: _Cursor, config, request, index: int) -> TensorSpec:
    src = None
    if cur.peek("%"):
        start = cur.pos
        cur.eat("%")
        src = cur.integer()
        if src >= index:
            cur.fail(f"an earlier op than %{index}", start)
        cur.eat(":")
    dtype = cur.word("[", lambda t: t in DTYPES.values(), f"a dtype ({', '.join(DTYPES.values())})")
    cur.eat("[")
    shape = _dims(cur, "]", config, request)
    strides = None
    if cur.peek("{"):
        start = cur.pos
        cur.eat("{")
        strides = _dims(cur, "}", config, request)
        if len(strides) != len(shape):
            cur.fail(f"{len(shape)} strides, one for each dim", start)
    return TensorSpec(dtype, shape, strides, src)


def _tensors(cur: _Cursor, close: str, config, request, index: int) -> tuple[TensorSpec, ...]:
    out = []
    while not cur.peek(close):
        if cur.pos >= len(cur.text):
            cur.fail(repr(close))
        out.append(_tensor(cur, config, request, index))
        if cur.peek(", "):
            cur.eat(", ")
    cur.eat(close)
    return tuple(out)


def _attrs(cur: _Cursor) -> dict:
    start = cur.pos
    try:
        attrs, cur.pos = json.JSONDecoder().raw_decode(cur.text, cur.pos)
    except json.JSONDecodeError as e:
        cur.fail(f"a JSON object of attributes ({e.msg})", e.pos)
    except (ValueError, RecursionError):  # a number too long for Python, or nesting too deep
        cur.fail("a JSON object of attributes of plain values", start)
    if type(attrs) is not dict or not all(FIELD.fullmatch(k) for k in attrs):
        cur.fail("a JSON object of attributes named by identifiers", start)
    problem = next((p for k, v in attrs.items() if (p := attr_problem(v, k))), None)
    if problem:
        cur.fail(f"{problem[1]} at attribute {problem[0]}", start)
    return attrs


def _op(cur: _Cursor, config, request, index: int) -> Op:
    cur.eat("%")
    start = cur.pos
    if cur.integer() != index:
        cur.fail(f"op number {index} (ops are numbered in order)", start)
    cur.eat(" = ")
    name = cur.word("(", OP_NAME.fullmatch, "an op name (namespace.op or namespace.op.overload)")
    cur.eat("(")
    inputs = _tensors(cur, ")", config, request, index)
    attrs = {}
    if cur.peek(" {"):
        cur.eat(" ")
        attrs = _attrs(cur)
    cur.eat(" -> ")
    if cur.peek("("):
        cur.eat("(")
        outputs = _tensors(cur, ")", config, request, index)
    else:
        outputs = (_tensor(cur, config, request, index),)
    cur.eat(" @")
    scope = cur.word(" ", SCOPE.fullmatch, "a module scope (dotted names, digits or *)")
    cur.eat(" x")
    count = cur.integer()
    if count == 0:
        cur.fail("a positive count", cur.pos - 1)
    per, when = "step", None
    if cur.peek(" per-"):
        cur.eat(" per-")
        per = cur.word(" ", lambda t: t in RUNS_PER, f"one of {', '.join(RUNS_PER)} after 'per-'")
    if cur.peek(" when "):
        cur.eat(" when ")
        if cur.text[cur.pos:] not in CONDITIONS:
            cur.fail(f"a condition ({' or '.join(CONDITIONS)})")
        when, cur.pos = When(cur.text[cur.pos:]), len(cur.text)
    if cur.pos != len(cur.text):
        cur.fail("end of line")
    return Op(name, inputs, outputs, attrs, scope, count, per, when)


def _version(cur: _Cursor) -> int:
    cur.pos = len("ir ")
    version = cur.integer()
    if cur.pos != len(cur.text):
        cur.fail("end of line")
    if version == 0:
        cur.fail("an IR version from 1", len("ir "))
    if version > IR_VERSION:
        raise ParseError(f"line {cur.lineno}: IR version {version} is newer than this Dooly reads ({IR_VERSION})")
    return version


def _meta(cur: _Cursor) -> dict:
    cur.pos = len("meta ")
    try:
        meta = json.loads(cur.text[cur.pos:])
    except json.JSONDecodeError as e:
        cur.fail(f"a JSON object ({e.msg})", cur.pos + e.pos)
    except (ValueError, RecursionError):  # a number too long for Python, or nesting too deep
        cur.fail("a JSON object of plain values")
    if type(meta) is not dict:
        cur.fail("a JSON object")
    if any(key in meta for key in OWN_LINES):
        cur.fail("a JSON object without config or request_symbols (they have lines of their own)")
    return meta


def _config(cur: _Cursor) -> dict[str, int]:
    cur.pos, config = len("config "), {}
    for item in cur.text[cur.pos:].split(" ") if cur.pos < len(cur.text) else []:
        key, _, value = item.partition("=")
        if not FIELD.fullmatch(key) or not _size(value):
            cur.fail("field=size, sizes positive")
        config[key] = _size(value)
        cur.pos += len(item) + 1
    return config


def _request(cur: _Cursor) -> frozenset[str]:
    cur.pos, symbols = len("request "), []
    for symbol in cur.text[cur.pos:].split(" ") if cur.pos < len(cur.text) else []:
        if symbol not in REQUEST_SYMBOLS:
            cur.fail(f"a request symbol ({', '.join(REQUEST_SYMBOLS)})")
        symbols.append(symbol)
        cur.pos += len(symbol) + 1
    return frozenset(symbols)


def loads(text: str) -> Graph:
    """The graph of an IR text; ParseError (an IRError) names the line and column of the first fault."""
    model, meta, config, request, ops = None, None, {}, frozenset(), []
    version, meta_line = IR_VERSION, 0  # a text without its version line is read as the current version
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        head = line.partition(" ")[0]
        cur = _Cursor(line, lineno)
        if head == "ir":
            version = _version(cur)
        elif head == "model":
            cur.pos = len("model ")
            model = cur.word("", MODEL_NAME.fullmatch, "a model name (letters, digits and _.+-)")
        elif head == "meta":
            meta, meta_line = _meta(cur), lineno
        elif head == "config":
            config = _config(cur)
        elif head == "request":
            request = _request(cur)
        elif head.startswith("%"):
            ops.append(_op(cur, config, request, len(ops)))
        else:
            raise ParseError(f"line {lineno}: unknown line {cur.text[:SHOWN]!r}")
    if model is None:
        raise ParseError("no 'model' line")
    if meta is None and version >= 2:
        raise ParseError("no 'meta' line")
    try:
        typed = meta_from_json({**(meta or {}), "config": config, "request_symbols": sorted(request)}, version)
    except IRError as e:
        raise ParseError(f"line {meta_line}: {e}") from None
    return Graph(model, typed, ops)
