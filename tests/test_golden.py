"""Golden IR dumps of the whole zoo: a change to any label, op or count shows up here.

Regenerate with `python -m dooly.compile --update-golden` (or `DOOLY_UPDATE_GOLDEN=1 pytest tests/test_golden.py`)
and say in the commit why each changed label is right.
"""

import os

import pytest
from helpers import ROOT, ZOO, zoo_graph

from dooly.compile import HEADER
from dooly.ir import dumps


def test_every_zoo_model_has_a_golden_dump():
    assert sorted(p.stem for p in (ROOT / "golden").glob("*.ir")) == ZOO


@pytest.mark.parametrize("name", ZOO)
def test_ir_matches_golden(name):
    text = dumps(zoo_graph(name), HEADER)
    if os.environ.get("DOOLY_UPDATE_GOLDEN"):
        (ROOT / "golden" / f"{name}.ir").write_text(text)
    assert text == (ROOT / "golden" / f"{name}.ir").read_text()
