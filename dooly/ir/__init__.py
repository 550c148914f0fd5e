"""Dooly's IR: op nodes with labelled dims, printable as text and JSON."""

from .graph import (
    DTYPES,
    IR_VERSION,
    KINDS,
    REQUEST_SYMBOLS,
    Dim,
    Graph,
    GraphMeta,
    LayerGroup,
    Op,
    TensorSpec,
    When,
    map_dims,
)
from .text import dumps, loads

__all__ = ["DTYPES", "IR_VERSION", "KINDS", "REQUEST_SYMBOLS", "Dim", "Graph", "GraphMeta", "LayerGroup", "Op",
           "TensorSpec", "When", "dumps", "loads", "map_dims"]
