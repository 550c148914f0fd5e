"""Records every op the dispatcher runs into a torch.fx Graph, one node per dispatched op.

Each node has its producers as inputs (tensors are followed by identity, in-place ops included) and keeps its
fake, SymInt-shaped value in `node.meta["val"]` and the module that ran it in `node.meta["scope"]`. Tensors no
recorded op produced (weights, cache, engine inputs) enter as placeholders named after what they are.

Attention is recorded whole: the serving engine calls `F.scaled_dot_product_attention`, whose dispatch-level
kernel is picked by the GPU at run time, so the op the engine launches is the SDPA call itself (its backend is part
of the environment), not the decomposition a CPU would run.
"""

from __future__ import annotations

import contextlib
import operator
import re
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

WHOLE_OPS = {F.scaled_dot_product_attention: torch.ops.aten.scaled_dot_product_attention.default}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _host_bounds(index):
    """An index whose slice bounds are one-number integer tensors, with those read as numbers: Python turns a bound
    into an int with `__index__`, which a data-dependent value (a count the model computed) cannot give; `item()`
    gives a symbol."""
    if isinstance(index, tuple):
        return tuple(_host_bounds(i) for i in index)
    if isinstance(index, slice):
        return slice(*(b.item() if isinstance(b, torch.Tensor) and b.dim() == 0 else b
                       for b in (index.start, index.stop, index.step)))
    return index


class Recorder(TorchDispatchMode):
    def __init__(self, base_scope: str = "engine"):
        super().__init__()
        self.graph = fx.Graph()
        self.node_of = WeakTensorKeyDictionary()
        self.names = WeakTensorKeyDictionary()
        self.scopes = [base_scope]
        self.muted = 0
        self._placeholders: set[str] = set()

    def name_tensors(self, named: dict[str, torch.Tensor]):
        for name, t in named.items():
            self.names[t] = name

    @contextlib.contextmanager
    def scope(self, name: str):
        self.scopes.append(name)
        try:
            yield
        finally:
            self.scopes.pop()

    @contextlib.contextmanager
    def module_scopes(self, root: torch.nn.Module, prefix: str = ""):
        """Attribute ops to the module that ran them: `model.layers.3.mlp.down_proj`."""
        paths = {id(m): (f"{prefix}.{n}" if prefix and n else prefix or n) for n, m in root.named_modules()}

        def pre(module, args):
            if id(module) in paths:
                self.scopes.append(paths[id(module)] or self.scopes[-1])

        def post(module, args, out):
            if id(module) in paths:
                self.scopes.pop()

        handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                   torch.nn.modules.module.register_module_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _ref(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        node = self.node_of.get(x)
        if node is None:
            name = self.names.get(x) or "const"
            base = re.sub(r"\W", "_", name)
            unique, i = base, 0
            while unique in self._placeholders:
                i += 1
                unique = f"{base}_{i}"
            self._placeholders.add(unique)
            node = self.graph.placeholder(unique)
            node.meta.update(val=x, origin=name)
            self.node_of[x] = node
        return node

    def record(self, target, args, kwargs, out):
        if out is None:  # an op that only writes into its arguments (vLLM's attention fills `output`)
            schema = target._schema.arguments
            given = {**{a.name: v for a, v in zip(schema, args)}, **kwargs}
            written = [given.get(a.name) for a in schema if a.alias_info is not None and a.alias_info.is_write]
            out = tuple(t for t in written if isinstance(t, torch.Tensor)) or None
        with warnings.catch_warnings():  # SymInt arguments are kept as they are, on purpose: lowering reads them
            warnings.simplefilter("ignore", UserWarning)
            node = self.graph.call_function(target, tree_map(self._ref, args), tree_map(self._ref, kwargs))
        node.meta.update(val=out, scope=self.scopes[-1])
        if isinstance(out, torch.Tensor):
            self.node_of[out] = node
        else:
            for i, t in enumerate(tree_flatten(out)[0]):
                if isinstance(t, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta.update(val=t, scope=node.meta["scope"])
                    self.node_of[t] = item
        return node

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.muted and func.namespace != "prim":
            self.record(func, args, kwargs, out)
        return out

    @contextlib.contextmanager
    def whole_ops(self):
        """Record the calls in WHOLE_OPS as single nodes, muting what they dispatch to underneath; read slice bounds
        that tensors hold as numbers (`_host_bounds`) before indexing."""
        recorder = self

        class Whole(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in INDEXING:  # `x[start:end]` with bounds a tensor holds
                    args = (args[0], _host_bounds(args[1]), *args[2:])
                target = WHOLE_OPS.get(func)
                if target is None:
                    return func(*args, **kwargs)
                recorder.muted += 1
                try:
                    out = func(*args, **kwargs)
                finally:
                    recorder.muted -= 1
                recorder.record(target, args, kwargs, out)
                return out

        with Whole():
            yield
