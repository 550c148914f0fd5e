"""Dedup pass: split a model's signatures into those the store has measured for an environment and the rest."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
from .canonicalize import Signature, Use, uses


@dataclass
class Split:
    uses: list[Use]
    measured: dict[str, Signature]
    to_profile: dict[str, Signature]


def dedup(graph: Graph, attention: str, measured: set[str] | dict, all_uses: list[Use] | None = None) -> Split:
    """`measured`: hashes of signatures with a finished sweep in the environment (`Store.finished_sweeps(env)`);
    `all_uses`: the graph's uses as its engine profiles them (default: every op)."""
    all_uses = uses(graph, attention) if all_uses is None else all_uses
    sigs = {u.signature.hash: u.signature for u in all_uses}
    return Split(all_uses, {h: s for h, s in sigs.items() if h in measured},
                 {h: s for h, s in sigs.items() if h not in measured})
