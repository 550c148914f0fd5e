"""Random bytes and random JSON fed to every command that reads a file, in this process: each run ends with exit
code 0 or 2, never a traceback, and leaves the store it was given as it was.

The store holds one environment of a backend no input asks for, so an input that reads well ends at the store's
refusal (exit 2) instead of fitting regressors at every example: what is fuzzed is the reading of the files.
"""

import contextlib
import io
import json
import shutil
import sqlite3

import pytest
from helpers import ROOT, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store import env, sig, stats

from dooly.cli import main
from dooly.compile import load_model
from dooly.store import Store
from dooly.store.schema import SCHEMA_VERSION

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


def lines_of(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def replace_a_leaf(document, value, pick: int):
    """`document` with one of its leaves (chosen by `pick`) set to `value`."""
    leaves = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            if isinstance(child, (dict, list)) and child:
                walk(child)
            else:
                leaves.append((node, key))

    walk(document)
    if leaves:
        node, key = leaves[pick % len(leaves)]
        node[key] = value
    return document


def garbled(text: str, at: int, cut: int, insert: str) -> bytes:
    at %= max(1, len(text))
    return (text[:at] + insert + text[at + cut:]).encode()


ANY_FILE = st.one_of(st.binary(max_size=300), st.lists(JSON, min_size=1, max_size=4).map(lines_of),
                     JSON.map(lambda v: json.dumps(v).encode()))


def rows_of(store) -> dict:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        db.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small store (an environment, a signature, two points), a model's IR and its model.json."""
    root = tmp_path_factory.mktemp("fuzz")
    store = Store(root / "store.sqlite")
    store.add_environment(env("h100/sdpa-math", "paged|sdpa:math"))
    store.add_signature(sig())
    for m, us in ((1, 3.0), (64, 5.0)):
        store.record(sig().hash, "h100/sdpa-math", {"M": m}, stats(us))
    store.close()
    shutil.copy(ROOT / "golden" / "llama-3.2-1b.ir", root / "model.ir")
    (root / "compiled").mkdir()
    (root / "compiled" / "model.json").write_text(load_model(root / "model.ir").dumps_json())
    return root


def run_unharmed(files, *argv) -> None:
    """Run `dooly ARGV` in this process: exit 0 or 2, no traceback, the store's rows unchanged."""
    before = rows_of(files / "store.sqlite")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own refusals
            code = e.code
    assert code in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert rows_of(files / "store.sqlite") == before


def write(files, name: str, content: bytes):
    path = files / "input" / name
    shutil.rmtree(files / "input", ignore_errors=True)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path


BATCH_ROWS = st.lists(st.lists(st.lists(st.one_of(st.integers(-2, 2**64), st.floats()), max_size=3), max_size=3),
                      min_size=1, max_size=3).map(lines_of)


@FUZZ
@given(content=st.one_of(ANY_FILE, BATCH_ROWS))
def test_predict_batch_file(files, content):
    run_unharmed(files, "predict", files / "model.ir", "--store", files / "store.sqlite", "--json", "--batch-file",
                 write(files, "steps.jsonl", content))


TRACE_KEYS = ("arrival", "prompt", "output", "arrival_time", "prompt_tokens", "output_tokens")
TRACE_ROWS = st.lists(st.dictionaries(st.sampled_from(TRACE_KEYS),
                                      st.one_of(st.integers(-2, 2**64), st.floats(), st.integers(1, 64), st.text()),
                                      max_size=4), min_size=1, max_size=4).map(lines_of)


@FUZZ
@given(content=st.one_of(ANY_FILE, TRACE_ROWS))
def test_simulate_trace(files, content):
    run_unharmed(files, "simulate", files / "model.ir", "--store", files / "store.sqlite", "--num-blocks", "64",
                 "--json", "--out", files / "sim", "--trace", write(files, "trace.jsonl", content))


def small_truth() -> dict:
    """One trace, one run of five steps, of a shipped ground-truth file."""
    truth = json.loads((ROOT / "data" / "groundtruth" / "sdpa" / "llama-3.2-1b.json").read_text())
    name, trace = next(iter(truth["traces"].items()))
    run = trace["runs"][0]
    truth["traces"] = {name: {"requests": trace["requests"][:3],
                              "runs": [{"steps": run["steps"][:5], "requests": run["requests"][:3]}]}}
    return truth


TRUTH = small_truth()


@FUZZ
@given(content=st.one_of(ANY_FILE, st.builds(lambda value, pick: json.dumps(replace_a_leaf(
    json.loads(json.dumps(TRUTH)), value, pick)).encode(), JSON, st.integers(0, 10**6))))
def test_validate_groundtruth(files, content):
    write(files, "sdpa/x.json", content)
    run_unharmed(files, "validate", "--groundtruth", files / "input", "--store", files / "store.sqlite", "--models",
                 ROOT / "golden", "--json", "--plots", files / "plots")


CONFIGS = st.builds(lambda value, pick: json.dumps(replace_a_leaf(tiny_llama(), value, pick)).encode(), JSON,
                    st.integers(0, 10**6))


@settings(FUZZ, max_examples=10)  # a config that reads well is compiled: seconds
@given(content=st.one_of(ANY_FILE, CONFIGS))
def test_compile_config(files, content):
    run_unharmed(files, "compile", write(files, "config.json", content), "--out", files / "compiled-out", "--json")


def ir_files(files):
    text = (files / "model.ir").read_text()
    return st.one_of(st.binary(max_size=300), st.builds(lambda at, cut, insert: garbled(text, at, cut, insert),
                                                        st.integers(0, 10**6), st.integers(0, 40), st.text(max_size=8)))


@FUZZ
@given(data=st.data())
def test_plan_config_or_ir(files, data):
    name = data.draw(st.sampled_from(["config.json", "model.ir"]))
    content = data.draw(st.one_of(ANY_FILE, CONFIGS) if name.endswith(".json") else ir_files(files))
    run_unharmed(files, "plan", write(files, name, content), "--store", files / "store.sqlite", "--json")


@FUZZ
@given(data=st.data())
def test_profile_ir(files, data):
    run_unharmed(files, "profile", write(files, "model.ir", data.draw(ir_files(files))), "--store",
                 files / "store.sqlite", "--out", files / "bench")


@FUZZ
@given(data=st.data())
def test_predict_model_json(files, data):
    model = json.loads((files / "compiled" / "model.json").read_text())
    content = data.draw(st.one_of(ANY_FILE, st.builds(lambda value, pick: json.dumps(replace_a_leaf(
        json.loads(json.dumps(model)), value, pick)).encode(), JSON, st.integers(0, 10**6))))
    run_unharmed(files, "predict", write(files, "model.json", content), "--store", files / "store.sqlite", "--batch",
                 "decode:2@64", "--json")


EXPORT_ROWS = st.lists(st.one_of(JSON, st.fixed_dictionaries({"table": st.sampled_from(
    ["environments", "signatures", "measurements", "sweeps", "host"]), "row": JSON})), max_size=4).map(
    lambda rows: lines_of([{"format": "dooly-store", "schema": SCHEMA_VERSION}, *rows]))


@FUZZ
@given(content=st.one_of(ANY_FILE, EXPORT_ROWS))
def test_store_import(files, content):
    run_unharmed(files, "store", "import", files / "store.sqlite", write(files, "export.jsonl", content))


@FUZZ
@given(content=ANY_FILE)
def test_store_info(files, content):
    run_unharmed(files, "store", "info", write(files, "other.sqlite", content))
