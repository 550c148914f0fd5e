"""Dimension expressions: integer arithmetic over named symbols, as text.

A dimension is written the way Python would compute it (`T`, `num_key_value_heads*head_dim`, `(head_dim//2)`,
`max(K, 1)`). Only integers, names, `+ - * // % **`, unary minus and `max`/`min` are allowed; anything else is
rejected, so an expression read from a file can be evaluated without running arbitrary code. Lengths, constants and
exponents are bounded too, so that one cannot take unbounded time or memory either.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from typing import Any

import sympy

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}
_CALLS = {"max", "min"}
MAX_LENGTH = 500
MAX_CONSTANT = 2**63
MAX_EXPONENT = 8


class ExprError(ValueError):
    pass


def _bounded_power(node: ast.BinOp) -> bool:
    exponent = node.right
    return not isinstance(node.op, ast.Pow) or (
        isinstance(exponent, ast.Constant) and type(exponent.value) is int and exponent.value <= MAX_EXPONENT)


@functools.lru_cache(maxsize=65536)
def _checked_tree(text: str) -> ast.Expression:
    if len(text) > MAX_LENGTH:
        raise ExprError(f"dimension expression longer than {MAX_LENGTH} characters: {text[:40]!r}...")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: a NUL character
        raise ExprError(f"not an expression: {text!r}") from e
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.Name, ast.Load, ast.USub, *_BINOPS))
        ok |= isinstance(node, ast.Constant) and type(node.value) is int and node.value < MAX_CONSTANT
        ok |= isinstance(node, ast.BinOp) and type(node.op) in _BINOPS and _bounded_power(node)
        ok |= isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
        ok |= (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS
               and len(node.args) == 2 and not node.keywords)
        if not ok:
            raise ExprError(f"unsupported syntax in dimension expression {text!r}")
    return tree


@functools.lru_cache(maxsize=65536)
def names(text: str) -> frozenset[str]:
    """The symbol names an expression uses."""
    tree = _checked_tree(text)
    return frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in _CALLS)


@functools.lru_cache(maxsize=65536)
def _compiled(text: str):
    return compile(_checked_tree(text), "<dim>", "eval")


def _vmax(a, b):
    import numpy as np

    return np.maximum(a, b)


def _vmin(a, b):
    import numpy as np

    return np.minimum(a, b)


def evaluate(text: str, env: Mapping[str, Any]) -> Any:
    """Value of an expression; `env` values may be ints or numpy integer arrays (then the result is an array)."""
    missing = names(text) - env.keys()
    if missing:
        raise ExprError(f"{text!r} needs values for {', '.join(sorted(missing))}")
    scope = {"__builtins__": {}, "max": _vmax, "min": _vmin}
    return eval(_compiled(text), scope, dict(env))  # noqa: S307 - tree checked by _checked_tree


def evaluator(texts: tuple[str, ...]):
    """evaluate() of several expressions at once, checked and compiled once: for loops that run them many times."""
    for text in texts:
        _checked_tree(text)
    code = compile("(" + "".join(f"({text})," for text in texts) + ")", "<dims>", "eval")
    scope = {"__builtins__": {}, "max": _vmax, "min": _vmin}
    return lambda env: eval(code, scope, env)  # noqa: S307 - each part checked by _checked_tree


def _symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def to_sympy(text: str) -> sympy.Expr:
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return sympy.Integer(node.value)
        if isinstance(node, ast.Name):
            return _symbol(node.id)
        if isinstance(node, ast.UnaryOp):
            return -walk(node.operand)
        if isinstance(node, ast.Call):
            fn = sympy.Max if node.func.id == "max" else sympy.Min
            return fn(walk(node.args[0]), walk(node.args[1]))
        a, b = walk(node.left), walk(node.right)
        op = type(node.op)
        if op is ast.Add:
            return a + b
        if op is ast.Sub:
            return a - b
        if op is ast.Mult:
            return a * b
        if op is ast.FloorDiv:
            return sympy.floor(a / b)
        if op is ast.Mod:
            return sympy.Mod(a, b)
        return a**b

    return walk(_checked_tree(text))


def render(e: sympy.Expr) -> str:
    """Text of a sympy integer expression in the grammar above (the inverse of `to_sympy`)."""
    if isinstance(e, sympy.Integer):
        return str(int(e))
    if isinstance(e, sympy.Symbol):
        return e.name
    num, den = sympy.fraction(sympy.together(e))
    if den != 1:  # exact division, e.g. head_dim/2 for a head_dim known to be even
        return f"({_factor(sympy.expand(num))}//{_divisor(den)})"
    if isinstance(e, sympy.Add):
        out = ""
        for i, term in enumerate(e.as_ordered_terms()):
            coeff, rest = term.as_coeff_Mul()
            if coeff < 0:
                body = render(-term)
                out += f" - {body}" if i else f"-{body}"
            else:
                body = render(term)
                out += f" + {body}" if i else body
        return out
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if not coeff.is_Integer:
            raise ExprError(f"non-integer dimension expression: {e}")
        if coeff == -1:
            return f"-{_factor(rest)}"
        factors = [f for f in sympy.Mul.make_args(rest)]
        parts = ([str(int(coeff))] if coeff != 1 else []) + [_factor(f) for f in factors]
        return "*".join(parts)
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        return f"({_factor(num)}//{_divisor(den)})"
    if isinstance(e, sympy.Mod):
        return f"({_factor(e.args[0])} % {_factor(e.args[1])})"
    if isinstance(e, (sympy.Max, sympy.Min)):
        fn = "max" if isinstance(e, sympy.Max) else "min"
        args = sorted(e.args, key=sympy.default_sort_key)
        text = render(args[0])
        for a in args[1:]:
            text = f"{fn}({text}, {render(a)})"
        return text
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
        return f"{_factor(e.base)}**{int(e.exp)}"
    raise ExprError(f"cannot write {e!r} as a dimension expression")


def _factor(e: sympy.Expr) -> str:
    text = render(e)
    return f"({text})" if isinstance(e, sympy.Add) else text


def _divisor(e: sympy.Expr) -> str:
    """The right side of `//`, which binds as tightly as `*`: `a//(2*b)`, never `a//2*b`."""
    text = render(e)
    return f"({text})" if isinstance(e, (sympy.Add, sympy.Mul)) else text


def simplify(text: str, values: Mapping[str, int] | None = None) -> str:
    """Canonical text of an expression, with `values` substituted for the names they give."""
    used = names(text)
    return _simplify(text, tuple(sorted((k, v) for k, v in (values or {}).items() if k in used)))


@functools.lru_cache(maxsize=65536)
def _simplify(text: str, values: tuple[tuple[str, int], ...]) -> str:
    e = to_sympy(text)
    if values:
        e = e.subs({_symbol(k): v for k, v in values})
    return render(sympy.expand(e) if not e.has(sympy.floor, sympy.Mod, sympy.Max, sympy.Min) else e)
