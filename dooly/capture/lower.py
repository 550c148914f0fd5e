"""Lowering: the recorded torch.fx Graph to Dooly IR ops.

Only ops that launch work on the device become IR ops. Views and allocations without a fill (`view`, `transpose`,
`slice`, `empty`...) are folded away: an op's input names the nearest real op behind such chains as its producer.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._pytree import tree_flatten

from ..ir.expr import simplify
from ..ir.graph import DTYPES, Dim, Op, TensorSpec
from .symbolic import SymbolTable

NO_KERNEL = {
    "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.unsqueeze", "aten.squeeze",
    "aten.expand", "aten.slice", "aten.select", "aten.alias", "aten.detach", "aten.as_strided", "aten.split",
    "aten.split_with_sizes", "aten.unbind", "aten.narrow", "aten.diagonal", "aten.lift_fresh", "aten.empty",
    "aten.empty_strided", "aten.empty_like", "aten._reshape_alias", "aten.view_as_real", "aten.view_as_complex",
    "aten.unfold", "aten.new_empty", "aten.new_empty_strided", "aten.chunk",
    "aten._local_scalar_dense",  # the host reading one number (`item()`)
}
DROPPED_ATTRS = {"device", "pin_memory", "layout"}


def op_name(target) -> str:
    packet = str(target.overloadpacket)  # e.g. "aten.add"
    overload = target._overloadname
    return packet if overload == "default" else f"{packet}.{overload}"


def launches_kernel(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is not operator.getitem and (
        str(node.target.overloadpacket) not in NO_KERNEL)


def attr_value(value, symbols: SymbolTable):
    if isinstance(value, torch.SymInt):
        return {"sym": symbols.text(value)}
    if isinstance(value, (list, tuple)):
        return [attr_value(v, symbols) for v in value]
    if isinstance(value, torch.dtype):
        return DTYPES.get(str(value), str(value))
    if isinstance(value, (torch.memory_format, torch.device, torch.layout)):
        return str(value).replace("torch.", "")
    if isinstance(value, (torch.SymFloat, torch.SymBool)):
        return value.node.hint  # e.g. the softmax scale head_dim**-0.5: kept as a number, without pinning head_dim
    return value


def tensor_spec(t: torch.Tensor, symbols: SymbolTable, src: int | None) -> TensorSpec:
    shape = [symbols.text(s) for s in t.shape]
    strides = [symbols.text(s) for s in t.stride()]
    expected, dense = "1", True
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != "1" and simplify(stride) != simplify(expected):
            dense = False
            break
        expected = f"({expected})*({size})"
    return TensorSpec(DTYPES.get(str(t.dtype), str(t.dtype)), tuple(Dim(s) for s in shape),
                      None if dense else tuple(Dim(s) for s in strides), src)


def even_shares(graph: fx.Graph, symbols: SymbolTable) -> None:
    """Give each data-dependent part of a split its even share. A model that slices one tensor into parts at bounds
    it counted from its data (experts looping over the tokens routed to each, `x[start:end]`) runs one op per part
    on a number of rows no trace can know; spread evenly, each part is ceil(size/parts) rows."""
    splits = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.slice.Tensor and any(
                isinstance(b, torch.SymInt) and free_unbacked_symbols(b) for b in node.args[2:4]):
            rank = node.args[0].meta["val"].dim()
            splits[node.args[0], (node.args[1] if len(node.args) > 1 else 0) % rank].append(node)
    for (source, dim), parts in splits.items():
        share = sympy.floor((symbols.expression(source.meta["val"].shape[dim]) + len(parts) - 1) / len(parts))
        for node in parts:
            rows = node.meta["val"].shape[dim]
            if isinstance(rows, torch.SymInt) and isinstance(rows.node.expr, sympy.Symbol):
                symbols.expected[rows.node.expr] = share


def lower(graph: fx.Graph, symbols: SymbolTable) -> list[Op]:
    even_shares(graph, symbols)
    ops: list[Op] = []
    producer: dict[fx.Node, int | None] = {}  # node -> index of the IR op whose output it is (or views)
    for node in graph.nodes:
        if node.op == "placeholder":
            producer[node] = None
            continue
        if node.target is operator.getitem:
            producer[node] = producer[node.args[0]]
            continue
        if not launches_kernel(node):
            first = next((a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)), None)
            producer[node] = None if first is None else producer[first]
            continue
        schema = node.target._schema.arguments
        inputs, attrs = [], {}
        for i, arg in enumerate(schema):
            if i < len(node.args):
                value = node.args[i]
            elif arg.name in node.kwargs:
                value = node.kwargs[arg.name]
            else:
                continue
            flat = tree_flatten(value)[0]
            if any(isinstance(v, fx.Node) for v in flat):
                if isinstance(value, (list, tuple)):  # a tensor list: say which inputs, in which slots
                    attrs[arg.name] = [None if v is None else {"input": len(inputs) + sum(
                        isinstance(u, fx.Node) for u in value[:i])} for i, v in enumerate(value)]
                for v in flat:
                    if isinstance(v, fx.Node):
                        inputs.append(tensor_spec(v.meta["val"], symbols, producer[v]))
            elif arg.name not in DROPPED_ATTRS:
                attrs[arg.name] = attr_value(value, symbols)
        outputs = [tensor_spec(t, symbols, None) for t in tree_flatten(node.meta["val"])[0]
                   if isinstance(t, torch.Tensor)]
        producer[node] = len(ops)
        ops.append(Op(op_name(node.target), tuple(inputs), tuple(outputs), attrs, node.meta["scope"]))
    return ops
