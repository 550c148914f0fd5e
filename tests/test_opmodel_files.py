"""Saved op models: they reload to the same predictions, hold nothing that loading could run, and a damaged folder
is fitted again instead of failing every later prediction."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import ROOT

from dooly.predict import environment_name, opmodel
from dooly.store import Store

FAMILIES = ("gemm", "pointwise")


@pytest.fixture(scope="module")
def measured():
    """A few signatures of two families from the shipped store: enough points for both regressors, fitted fast."""
    store = Store(ROOT / "data" / "h100.sqlite")
    rows, sigs = opmodel._measurements(store, environment_name(store, "sdpa"))
    picked = {}
    for family in FAMILIES:
        hashes = sorted(h for h in rows if sigs[h][0] == family and len(rows[h]) >= 10)[:6]
        picked.update({h: (rows[h], sigs[h]) for h in hashes})
    return {h: r for h, (r, _) in picked.items()}, {h: s for h, (_, s) in picked.items()}


@pytest.fixture(scope="module")
def fitted(measured):
    return opmodel.fit(*measured)


def _unseen(family: str, canonical: dict):
    return SimpleNamespace(hash="0" * 16, family=family, op=canonical["op"], canonical=canonical)


def _predictions(model, measured) -> list[np.ndarray]:
    rows, sigs = measured
    out = []
    for h in sorted(rows):
        family, axes, canonical = sigs[h]
        values = {a: np.array([p.get(a, 1) * 3 + 1 for p, _ in rows[h]]) for a in axes}
        out.append(model.predict(SimpleNamespace(hash=h, family=family), values)[0])  # from its grid
        out.append(model.predict(_unseen(family, canonical), values)[0])  # from its family's regressor
    return out


def test_saved_models_reload_to_the_same_predictions(fitted, measured, tmp_path):
    assert set(fitted.regressors) == set(FAMILIES)
    opmodel.save(fitted, tmp_path, "stamp", "env")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "regressor-gemm.txt",
                                                          "regressor-pointwise.txt"]
    loaded = opmodel.load(tmp_path, "stamp")
    assert loaded is not None and loaded.cv == fitted.cv and loaded.canonicals == fitted.canonicals
    for fresh, back in zip(_predictions(fitted, measured), _predictions(loaded, measured), strict=True):
        np.testing.assert_allclose(back, fresh, rtol=1e-12)
    assert opmodel.load(tmp_path, "another stamp") is None  # fitted on other measurements


def test_the_regressor_predicts_as_the_fitted_estimator_did(measured):
    rows, sigs = measured
    h = next(h for h in sorted(rows) if sigs[h][0] == "gemm")
    X = np.array([opmodel.features(sigs[h][2], p) for p, _ in rows[h]])
    family_rows = [(sigs[k][2], p, us) for k in rows if sigs[k][0] == "gemm" for p, us in rows[k]]
    X_fit = np.array([opmodel.features(c, p) for c, p, _ in family_rows])
    y_fit = np.log2([us for _, _, us in family_rows])
    estimator = opmodel._lgbm().fit(X_fit, y_fit)
    np.testing.assert_allclose(estimator.booster_.predict(X), estimator.predict(X), rtol=1e-12)


def _damage(folder: Path, how: str):
    model, regressor = folder / "model.json", folder / "regressor-gemm.txt"
    if how == "truncated model.json":
        model.write_text(model.read_text()[:1000])
    elif how == "truncated regressor":
        regressor.write_text(regressor.read_text()[:500])
    elif how == "missing regressor":
        regressor.unlink()
    elif how == "edited regressor":
        regressor.write_text(regressor.read_text().replace("leaf_value=", "leaf_value=1", 1))
    elif how == "edited model.json":
        saved = json.loads(model.read_text())
        saved["model"]["cv"]["gemm"]["points"] += 1
        model.write_text(json.dumps(saved))
    elif how == "not JSON":
        model.write_bytes(b"\x80\x04\x95 a pickle")
    elif how == "regressor outside the folder":
        saved = json.loads(model.read_text())
        saved["model"]["regressors"]["gemm"]["file"] = "../regressor-gemm.txt"
        model.write_text(json.dumps(saved))


DAMAGES = ["truncated model.json", "truncated regressor", "missing regressor", "edited regressor",
           "edited model.json", "not JSON", "regressor outside the folder"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_folder_is_not_a_model(fitted, tmp_path, how):
    opmodel.save(fitted, tmp_path, "stamp", "env")
    _damage(tmp_path, how)
    assert opmodel.load(tmp_path, "stamp") is None


def test_load_or_fit_refits_a_damaged_folder_and_overwrites_it(fitted, measured, tmp_path, monkeypatch):
    monkeypatch.setattr(opmodel, "_measurements", lambda store, env: measured)
    store = SimpleNamespace(path=tmp_path / "s.sqlite")
    folder = opmodel.model_dir(store.path, "env")
    folder.mkdir(parents=True)
    (folder / "model.pkl").write_bytes(b"cos\nsystem\n(S'touch P'\ntR.")  # what an earlier version left
    model, refitted = opmodel.load_or_fit(store, "env")
    assert refitted and not (folder / "model.pkl").exists()
    assert opmodel.load_or_fit(store, "env")[1] is False
    _damage(folder, "truncated regressor")
    again, refitted = opmodel.load_or_fit(store, "env")
    assert refitted and opmodel.load_or_fit(store, "env")[1] is False
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]
    for a, b in zip(_predictions(model, measured), _predictions(again, measured), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
