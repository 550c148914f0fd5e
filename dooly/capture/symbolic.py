"""Named symbols for a trace: config fields and request quantities become SymInts of one ShapeEnv.

Every symbol is created here, with the name it will carry in the IR, so a dim's expression is read straight off
the SymInt that torch computed for it, whatever the numbers are.
"""

from __future__ import annotations

import numbers

import sympy
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._sympy import functions as tsf

from ..ir.expr import render

# `nn.LayerNorm(config.hidden_size)` checks `isinstance(size, numbers.Integral)` before wrapping a size in a tuple;
# a SymInt is an integer in every other respect.
numbers.Integral.register(torch.SymInt)
# numpy's ufuncs call a method of their own name on an object (CTRL scales its embeddings by `np.sqrt(d_model)`)
torch.SymInt.sqrt = torch.sym_sqrt

_RULES = {
    tsf.FloorDiv: lambda a, b: sympy.floor(a / b),
    tsf.CleanDiv: lambda a, b: sympy.floor(a / b),
    tsf.CeilDiv: lambda a, b: -sympy.floor(-a / b),
    tsf.PythonMod: sympy.Mod,
    tsf.Mod: sympy.Mod,
    tsf.ModularIndexing: lambda x, a, b: sympy.Mod(sympy.floor(x / a), b),
    tsf.Identity: lambda x: x,
    tsf.Max: sympy.Max,
    tsf.Min: sympy.Min,
    tsf.PowByNatural: sympy.Pow,
}


def _holds_when_moved(guard: sympy.Basic, symbol: sympy.Symbol, value: int) -> bool:
    """Whether a guard on one field still holds with the field doubled and grown by 64 (how a retrace moves a
    field): `floor((3*intermediate_size - 1)/intermediate_size) == 2` does, `int(0.5*head_dim) == 32` does not."""
    try:
        return all(bool(guard.subs(symbol, v)) for v in (2 * value, value + 64))
    except TypeError:  # not decidable from numbers: count it as pinning, the retrace settles it
        return False


class _NamedShapeEnv(ShapeEnv):
    """A ShapeEnv that never rewrites one named symbol into an expression of others.

    Torch turns a guard like `num_attention_heads // num_key_value_heads == 1` (taken by `if n_rep == 1`) into the
    replacement `num_attention_heads -> num_key_value_heads`, after which every head count reads as a KV-head
    count. The guard still holds without the rewrite; refusing it keeps each dim in the fields it was computed from.
    A replacement by a constant is still allowed: it is how a pinned field shows (see `pinned`).
    """

    named: set[sympy.Symbol]

    def _set_replacement(self, a, tgt, msg):
        if a in self.named and tgt.free_symbols:
            return
        super()._set_replacement(a, tgt, msg)


class SymbolTable:
    def __init__(self):
        # duck_shape=False: two sizes that happen to be equal must stay two symbols
        self.shape_env = _NamedShapeEnv(duck_shape=False)
        self.shape_env.named = set()
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.by_symbol: dict[sympy.Symbol, sympy.Expr] = {}  # torch's symbol -> its value in our names
        # a data-dependent size (a count the model computed from its data) -> the expression it stands for
        self.expected: dict[sympy.Symbol, sympy.Expr] = {}
        self._numbers: set[str] = set()  # names torch would not make symbolic
        self.hints: dict[str, int] = {}
        self._texts: dict[sympy.Expr, str] = {}

    def symint(self, name: str, hint: int, even: bool = False) -> torch.SymInt:
        """A SymInt for `name`; `even` builds it as 2*half, so torch can prove `2*((x + 1)//2) == x`."""
        named = sympy.Symbol(name, integer=True, positive=True)
        self.hints[name] = hint
        if even and hint % 2 == 0:
            half = self._symint(f"{name}/2", hint // 2)
            if not isinstance(half, torch.SymInt):
                self._numbers.add(name)
                return hint
            self.by_symbol[half.node.expr] = named / 2
            return 2 * half
        out = self._symint(name, hint)
        if not isinstance(out, torch.SymInt):  # torch keeps 0 and 1 as numbers: pinned from the start
            self._numbers.add(name)
            return out
        self.by_symbol[out.node.expr] = named
        return out

    def _symint(self, name: str, hint: int) -> torch.SymInt:
        source = ConstantSource(name)
        symbol = self.shape_env.create_symbol(hint, source)
        self.shape_env.named.add(symbol)
        return self.shape_env.create_symintnode(symbol, hint=hint, source=source)

    def pinned(self) -> set[str]:
        """Names whose symbol torch pinned to a constant while tracing (a guard like `Eq(s, 4096)`), or from the
        start (a 1)."""
        out = set(self._numbers)
        for symbol, named in self.by_symbol.items():
            value = self.shape_env.replacements.get(symbol)
            vr = self.shape_env.var_to_range.get(symbol)
            if (value is not None and not value.free_symbols) or (vr is not None and vr.is_singleton()):
                out |= {s.name for s in named.free_symbols}
        return out | self._pinned_by_guards()

    def _pinned_by_guards(self) -> set[str]:
        """Names a guard pins through a function of one of them, e.g. `Eq(TruncToInt(0.5*head_dim), 32)` taken by
        `int(head_dim * partial_rotary_factor)`: the name stays a symbol, but every dim computed from it is a number.
        """
        out = set()
        for g in self.shape_env.guards:
            expr = self.shape_env.simplify(g.expr)
            if not isinstance(expr, sympy.Eq) or expr.has(tsf.Mod, tsf.PythonMod, sympy.Mod):
                continue
            sides = [s for s in expr.args if s.free_symbols]
            constants = [s for s in expr.args if not s.free_symbols]
            # an integer compared to an integer: a size, not a float such as the softmax scale head_dim**-0.5
            if len(sides) == 1 and len(constants) == 1 and isinstance(constants[0], sympy.Integer):
                used = {n for s in sides[0].free_symbols if s in self.by_symbol for n in self.by_symbol[s].free_symbols}
                if len(used) == 1 and not _holds_when_moved(self._standard(expr), *used, self.hints[str(*used)]):
                    out |= {n.name for n in used}
        return out

    def guards(self, over: set[str], equalities_over: set[str]) -> list[str]:
        """What the trace assumed, as text: conditions on the symbols `over` (e.g. `T <= 1024`) and equalities
        between the symbols `equalities_over` (e.g. a branch taken because two config fields are equal)."""
        out = set()
        for g in self.shape_env.guards:
            expr = self._standard(self.shape_env.simplify(g.expr))
            used = {s.name for s in expr.free_symbols}
            if used and (used <= over or (isinstance(expr, sympy.Eq) and used <= equalities_over)):
                out.add(str(expr))
        return sorted(out)

    def _standard(self, e: sympy.Basic) -> sympy.Basic:
        """A torch sympy expression rewritten with plain sympy functions and our names."""
        e = self.shape_env.replace(e)
        for cls, fn in _RULES.items():
            if e.has(cls):
                e = e.replace(cls, fn)
        names = {**self.by_symbol, **self.expected}
        return e.xreplace({s: names[s] for s in e.free_symbols if s in names})

    def expression(self, x) -> sympy.Expr:
        """An int or SymInt as a sympy expression of our names."""
        return self._standard(x.node.expr) if isinstance(x, torch.SymInt) else sympy.Integer(int(x))

    def text(self, x) -> str:
        """Expression text of an int or SymInt."""
        if not isinstance(x, torch.SymInt):
            return str(int(x))
        expr = x.node.expr
        if expr not in self._texts:
            self._texts[expr] = render(self._standard(expr))
        return self._texts[expr]
