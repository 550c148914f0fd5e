"""The store against hostile input and hard conditions: crafted imports, processes opening one store at once,
read-only stores, empty files, tables that do not match their schema version."""

import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import ROOT, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_predict import fake, monkeypatch_module  # noqa: F401 (fixtures: a store every tiny-llama op is in)
from test_store import env, sig, stats

from dooly.cli import main
from dooly.errors import DoolyError
from dooly.store import Store
from dooly.store.portable import export, import_
from dooly.store.schema import MIGRATIONS, SCHEMA_VERSION, TABLES, columns, table_columns

ENV = "h100/sdpa"


def small_store(path: Path, first_point: int = 4) -> Path:
    """A store with one environment, two signatures, their points, a sweep and a host row."""
    store = Store(path)
    store.add_environment(env())
    for n in (0, 1):
        s = sig(n=n)
        store.add_signature(s)
        for m in (first_point, first_point * 2):
            store.record(s.hash, ENV, {"M": m}, stats(float(m + n)))
        store.finish_sweep(s.hash, ENV, 0.5, 2)
    store.record_host(ENV, "prepare", {"R": first_point}, 900.0, 950.0, 5)
    store.close()
    return path


def snapshot(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, read without Dooly."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}
    finally:
        db.close()


def dooly_main(*args) -> tuple[int, str, str]:
    """`dooly ARGS...` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def stores(tmp_path):
    """An export of store `a`, and store `b` that shares its environment but none of its other rows."""
    a = small_store(tmp_path / "a.sqlite", first_point=4)
    reader = Store(a, readonly=True)
    export(reader, tmp_path / "a.jsonl")
    reader.close()
    b = Store(tmp_path / "b.sqlite")
    b.add_environment(env())
    b.add_signature(sig(n=7))
    b.record(sig(n=7).hash, ENV, {"M": 1}, stats(1.0))
    b.close()
    return tmp_path / "a.jsonl", tmp_path / "b.sqlite"


def export_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def with_last_line(export_path: Path, lines: list[dict], text: str) -> Path:
    """The export with `text` as its last line: every good row before it is one the import would add."""
    out = export_path.with_name("crafted.jsonl")
    out.write_text("\n".join(json.dumps(x) for x in lines) + "\n" + text + "\n")
    return out


def measurement_line(lines: list[dict], **changes) -> dict:
    item = json.loads(json.dumps(next(x for x in lines if x.get("table") == "measurements")))
    item["row"].update(changes)
    for key in [k for k, v in changes.items() if v is DROP]:
        del item["row"][key]
    return item


DROP = object()

# --- 1. import: identifiers from the schema only, every row checked, all or nothing -------------------------------

INJECTIONS = [
    "median_us) VALUES (0,0,'x',0,0,'x',0); UPDATE measurements SET median_us = 0; --",
    "median_us = 0; --",
    "point) VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET median_us = 0 --",
    'status"; DROP TABLE measurements; --',
    "point, median_us) SELECT signature, environment, point, 0 FROM measurements; --",
    "[median_us]",
    "rowid",
    "id",
]


@pytest.mark.parametrize("column", INJECTIONS)
def test_a_crafted_column_name_is_refused_and_changes_nothing(stores, column):
    export_path, b = stores
    lines = export_lines(export_path)
    before = snapshot(b)
    crafted = with_last_line(export_path, lines, json.dumps(measurement_line(lines, **{column: 1.0})))
    code, _, err = dooly_main("store", "import", b, crafted)
    assert_one_error_line(code, err, "unknown column", f"line {len(lines) + 1}")
    assert snapshot(b) == before


ROW_CASES = [
    (dict(bogus=1), "unknown column 'bogus'"),
    (dict(repetitions=DROP), "without its column 'repetitions'"),
    (dict(signature=DROP), "without its column 'signature'"),
    (dict(repetitions=None), "must not be null"),
    (dict(median_us=[2.0]), "must be a number"),
    (dict(median_us={"us": 2.0}), "must be a number"),
    (dict(point={"M": 4}), "must be a string"),
    (dict(median_us="2.0"), "must be a number"),
    (dict(repetitions="15"), "whole number"),
    (dict(repetitions=True), "whole number"),
    (dict(repetitions=1.5), "whole number"),
    (dict(median_us=-1.0), "must not be negative"),
    (dict(repetitions=2 ** 70), "finite number"),
    (dict(measured_at=5), "must be a string"),
    (dict(point='{"M": 4}'), "request point"),
    (dict(point='{"M":"4"}'), "request point"),
    (dict(point="[4]"), "request point"),
    (dict(status="great"), "must be one of"),
    (dict(median_us=None), "without median_us"),
    (dict(environment="nowhere"), "unknown environment 'nowhere'"),
    (dict(environment=1), "environment's name"),
    (dict(signature="f" * 16), "unknown signature"),
    (dict(reason="\ud800"), "surrogate"),
]


@pytest.mark.parametrize("changes, message", ROW_CASES, ids=[m for _, m in ROW_CASES])
def test_a_bad_measurement_row_is_refused_naming_its_line(stores, changes, message):
    export_path, b = stores
    lines = export_lines(export_path)
    before = snapshot(b)
    crafted = with_last_line(export_path, lines, json.dumps(measurement_line(lines, **changes)))
    code, _, err = dooly_main("store", "import", b, crafted)
    assert_one_error_line(code, err, message, f"line {len(lines) + 1}")
    assert snapshot(b) == before


LINE_CASES = [
    ('{"table": "measurements", "row": {"median_us": NaN}}', "not JSON"),
    ('{"table": "measurements", "row": {"median_us": Infinity}}', "not JSON"),
    ('{"table": "measurements", "row": {"median_us": -Infinity}}', "not JSON"),
    ('{"table": "measurements", "row": ', "not JSON"),
    ("[1, 2]", "not a store row"),
    ('"measurements"', "not a store row"),
    ("null", "not a store row"),
    ('{"table": "measurements"}', "not a store row"),
    ('{"table": "measurements", "row": [1]}', "not a store row"),
    ('{"table": "measurements", "row": {}, "extra": 1}', "not a store row"),
    ('{"table": "sqlite_master", "row": {}}', "unknown table"),
    ('{"table": "measurements; DROP TABLE sweeps", "row": {}}', "unknown table"),
    ('{"table": ["measurements"], "row": {}}', "unknown table"),
    ('{"table": "signatures", "row": {"hash": null, "op": "x", "family": "gemm", "axes": "[]", "canonical": "{}"}}',
     "must not be null"),
    ('{"table": "signatures", "row": {"hash": "h", "op": "x", "family": "gemm", "axes": "not json", '
     '"canonical": "{}"}}', "JSON text"),
    ('{"table": "signatures", "row": {"hash": "h", "op": "x", "family": "gemm", "axes": "[1]", "canonical": "{}"}}',
     "list of names"),
    ('{"table": "signatures", "row": {"hash": "h", "op": "x", "family": "gemm", "axes": "[]", "canonical": "[]"}}',
     "an object"),
    ('{"table": "sweeps", "row": {"signature": "0000000000000000", "environment": "h100/sdpa", '
     '"gpu_s": "1", "points": 2, "finished_at": "now"}}', "must be a number"),
    ("[" * 100000 + "]" * 100000, "not JSON"),
]


@pytest.mark.parametrize("text, message", LINE_CASES, ids=range(len(LINE_CASES)))
def test_a_line_that_is_not_a_good_row_is_refused(stores, text, message):
    export_path, b = stores
    lines = export_lines(export_path)
    before = snapshot(b)
    code, _, err = dooly_main("store", "import", b, with_last_line(export_path, lines, text))
    assert_one_error_line(code, err, message, f"line {len(lines) + 1}")
    assert snapshot(b) == before


def test_a_number_too_large_for_a_float_is_refused(stores):
    export_path, b = stores
    lines = export_lines(export_path)
    before = snapshot(b)
    text = json.dumps(measurement_line(lines, median_us=12345.5)).replace("12345.5", "1e999")
    code, _, err = dooly_main("store", "import", b, with_last_line(export_path, lines, text))
    assert_one_error_line(code, err, "finite number", f"line {len(lines) + 1}")
    assert snapshot(b) == before


def test_an_environment_of_the_same_name_on_another_machine_is_refused(stores):
    export_path, b = stores
    lines = export_lines(export_path)
    for item in lines:
        if item.get("table") == "environments":
            item["row"]["gpu"] = "NVIDIA A100"
    before = snapshot(b)
    code, _, err = dooly_main("store", "import", b, with_last_line(export_path, lines, ""))
    assert_one_error_line(code, err, "environment 'h100/sdpa'", "other settings")
    assert snapshot(b) == before


FILE_CASES = [
    (b"", "not a Dooly store export"),
    (b"\xff\xfe{\x00\"format\x00", "binary"),
    (b'{"format": "dooly-store", "schema": 3}\n{"table": "\xe9t\xe9"}\n', "not UTF-8"),
    (b'[{"format": "dooly-store", "schema": 3}]\n', "not a Dooly store export"),
    (b'"dooly-store"\n', "not a Dooly store export"),
    (b"5\n", "not a Dooly store export"),
    (b"null\n", "not a Dooly store export"),
    (b'{"format": "dooly-store"}\n', "line 1"),
    (b'{"format": "dooly-store", "schema": "3"}\n', "line 1"),
    (b'{"format": "dooly-store", "schema": true}\n', "line 1"),
    (b'{"format": "dooly-store", "schema": 0}\n', "line 1"),
    (b'{"format": "dooly-store", "schema": 3, "drop": "measurements"}\n', "line 1"),
    (b'{"format": "dooly-store", "schema": 99}\n', "newer than this Dooly"),
]


@pytest.mark.parametrize("content, message", FILE_CASES, ids=range(len(FILE_CASES)))
def test_a_file_that_is_not_an_export_is_refused(stores, tmp_path, content, message):
    _, b = stores
    before = snapshot(b)
    (tmp_path / "bad.jsonl").write_bytes(content)
    code, _, err = dooly_main("store", "import", b, tmp_path / "bad.jsonl")
    assert_one_error_line(code, err, message)
    assert snapshot(b) == before
    code, _, err = dooly_main("store", "import", tmp_path / "new.sqlite", tmp_path / "bad.jsonl")
    assert code == 2 and not (tmp_path / "new.sqlite").exists()  # no store is made for a bad file


def test_an_import_never_overwrites_a_stored_measurement(stores):
    export_path, b = stores
    s = sig(n=0)
    store = Store(b)
    store.add_signature(s)
    store.record(s.hash, ENV, {"M": 4}, stats(99.0))  # the export has this point at 4.0
    store.close()
    before = snapshot(b)
    code, out, _ = dooly_main("store", "import", b, export_path)
    assert code == 0 and "imported" in out
    after = snapshot(b)
    assert all(set(before[t]) <= set(after[t]) for t in TABLES)
    store = Store(b, readonly=True)
    assert store.points(s.hash, ENV, "gemm")['{"M":4}']["median_us"] == 99.0
    assert store.points(s.hash, ENV, "gemm")['{"M":8}']["median_us"] == 8.0


def test_signed_host_times_import(stores):
    export_path, b = stores
    lines = export_lines(export_path)
    host = next(x for x in lines if x.get("table") == "host_overhead")
    host["row"].update(phase="attention_first_call", median_us=-9.5, p90_us=-1.0)
    code, out, err = dooly_main("store", "import", b, with_last_line(export_path, lines, json.dumps(host)))
    assert code == 0, err
    assert any(r["median_us"] == -9.5 for r in Store(b, readonly=True).host(ENV))


def test_an_export_from_before_a_column_was_renamed_imports(stores):
    export_path, b = stores
    lines = export_lines(export_path)
    sweep = next(x for x in lines if x.get("table") == "sweeps")
    sweep["row"]["gpu_seconds"] = sweep["row"].pop("gpu_s")  # as schema version 4 named it
    others = [x for x in lines if x is not sweep]
    code, out, err = dooly_main("store", "import", b, with_last_line(export_path, others, json.dumps(sweep)))
    assert code == 0, err
    spent = Store(b, readonly=True).finished_sweeps(ENV)
    assert spent[sweep["row"]["signature"]] == sweep["row"]["gpu_seconds"]


def test_the_shipped_store_exports_and_imports_whole(shipped, tmp_path):
    store = Store(shipped, readonly=True)
    rows = export(store, tmp_path / "h.jsonl")
    copy = Store(tmp_path / "copy.sqlite")
    assert import_(copy, tmp_path / "h.jsonl") == rows
    assert copy.counts() == store.counts()


COLUMN_NAMES = sorted({c.name for cols in columns().values() for c in cols})
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=6)
rows = st.dictionaries(st.sampled_from(COLUMN_NAMES) | st.text(max_size=12), json_values, max_size=8)
items = st.fixed_dictionaries({"table": st.sampled_from(TABLES) | json_values, "row": rows | json_values})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(items | json_values, min_size=1, max_size=3), keep_good_rows=st.booleans())
def test_random_import_lines_add_rows_or_fail_in_one_line(stores, items, keep_good_rows):
    export_path, b = stores
    lines = export_lines(export_path) if keep_good_rows else export_lines(export_path)[:1]
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "b.sqlite"
        shutil.copy(b, target)
        before = snapshot(target)
        crafted = Path(folder) / "in.jsonl"
        crafted.write_text("\n".join(json.dumps(x) for x in lines + items) + "\n")
        code, _, err = dooly_main("store", "import", target, crafted)
        after = snapshot(target)
        if code == 2:
            assert_one_error_line(code, err)
            assert after == before
        else:
            assert code == 0 and all(set(before[t]) <= set(after[t]) for t in TABLES)
            store = Store(target, readonly=True)
            for e in store.environments():
                store.measured_points(e.name)
                store.host(e.name)


# --- 2. processes opening a new or older store at once --------------------------------------------------------------

OPEN_WHEN_TOLD = ("import sys; from dooly.store import Store; print('ready', flush=True); sys.stdin.read(1); "
                  "Store(sys.argv[1]).close()")


def open_at_once(path: Path, processes: int) -> list[tuple[int, str]]:
    """`processes` processes that each open the store, released together once all have started."""
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_WHEN_TOLD, str(path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    for p in procs:
        p.stdin.write("go")
        p.stdin.close()
    for p in procs:
        p.wait(180)
    return [(p.returncode, p.stderr.read()) for p in procs]


def older_store(path: Path, version: int) -> None:
    """A store as Dooly left it at `version` (in the rollback journal, so the switch to WAL races too)."""
    db = sqlite3.connect(path)
    for migration in MIGRATIONS[:version]:
        db.executescript(migration)
    db.execute(f"PRAGMA user_version = {version}")
    db.execute("INSERT INTO signatures VALUES ('abc', 'aten.mm', 'gemm', '[]', '{}')")
    db.commit()
    db.close()


@pytest.mark.parametrize("processes", [2, 4, 8])
@pytest.mark.parametrize("version", range(SCHEMA_VERSION))
def test_processes_opening_one_store_at_once_all_succeed(tmp_path, processes, version):
    path = tmp_path / "s.sqlite"
    if version:
        older_store(path, version)
    results = open_at_once(path, processes)
    assert results == [(0, "")] * processes
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {t: table_columns(db, t) for t in TABLES} == columns()
    assert db.execute("SELECT COUNT(*) FROM signatures").fetchone()[0] == (1 if version else 0)


# --- 3. read-only stores ----------------------------------------------------------------------------------------

def test_a_store_opened_read_only_reads_and_refuses_writes(tmp_path):
    path = small_store(tmp_path / "s.sqlite")
    before = snapshot(path)
    store = Store(path, readonly=True)
    assert len(store.points(sig(n=0).hash, ENV, "gemm")) == 2 and store.host(ENV)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.db.execute("DELETE FROM measurements")
    with pytest.raises(DoolyError, match="read-only"):
        store.add_signature(sig(n=5))
    (tmp_path / "e.jsonl").write_text(json.dumps({"format": "dooly-store", "schema": SCHEMA_VERSION}) + "\n")
    with pytest.raises(DoolyError, match="read-only"):
        import_(store, tmp_path / "e.jsonl")
    store.close()
    assert snapshot(path) == before


def test_an_older_store_opened_read_only_is_migrated_where_it_can_be_written(tmp_path):
    older_store(tmp_path / "old.sqlite", 1)
    store = Store(tmp_path / "old.sqlite", readonly=True)
    assert store.signature("abc")["op"] == "aten.mm" and store.counts()["host_overhead"] == 0


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def reader_folder():
    """A folder another user can reach, and a way to run `dooly` as a user who does not own what is in it: as
    root (whom permissions do not stop), that user is nobody."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    prefix = NOBODY if os.geteuid() == 0 else []
    probe = subprocess.run([*prefix, sys.executable, "-c", "import dooly"], capture_output=True, text=True, cwd="/")
    if probe.returncode:  # a checkout (or its venv) below a folder only its owner may enter, as `mktemp -d` makes
        pytest.skip(f"user nobody cannot run this checkout's Python ({ROOT}): permissions cannot be tested")
    folder = Path(tempfile.mkdtemp(prefix="dooly-ro-"))
    folder.chmod(0o755)
    (folder / "cache").mkdir(mode=0o777)
    (folder / "cache").chmod(0o777)
    environ = {**os.environ, "COLUMNS": "200", "HOME": str(folder), "DOOLY_CACHE": str(folder / "cache")}

    def run(*args):
        return subprocess.run([*prefix, sys.executable, "-m", "dooly", *map(str, args)], capture_output=True,
                              text=True, cwd=ROOT, env=environ)

    yield folder, run
    for p in [folder, *folder.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    shutil.rmtree(folder)


@pytest.mark.parametrize("layout", ["read-only folder", "read-only file", "read-only folder, writer open"])
def test_a_read_only_store_serves_every_reading_command(reader_folder, layout):
    folder, run = reader_folder
    stores, outputs = folder / "stores", folder / "out"
    stores.mkdir()
    outputs.mkdir(mode=0o777)
    outputs.chmod(0o777)
    path = small_store(stores / "s.sqlite")
    writer = None
    if layout.endswith("writer open"):  # its last point only in the write-ahead log, which stays beside the store
        writer = Store(path)
        writer.db.execute("PRAGMA wal_autocheckpoint = 0")
        writer.record(sig(n=0).hash, ENV, {"M": 3}, stats(3.0))
    path.chmod(0o444)
    stores.chmod(0o777 if layout == "read-only file" else 0o555)
    before = snapshot(path)

    info = run("store", "info", path)
    assert info.returncode == 0, info.stderr
    assert ENV in info.stdout and f"measurements {len(before['measurements'])}," in info.stdout
    exported = run("store", "export", path, outputs / "s.jsonl")
    assert exported.returncode == 0, exported.stderr
    assert sum(1 for _ in open(outputs / "s.jsonl")) == 1 + sum(len(v) for v in before.values())
    imported = run("store", "import", path, outputs / "s.jsonl")
    assert_one_error_line(imported.returncode, imported.stderr, "read-only")
    if writer is not None:
        writer.close()
    assert snapshot(path) == before


def test_fit_predict_and_plan_read_a_read_only_store(reader_folder, fake):  # noqa: F811
    folder, run = reader_folder
    _, store, _ = fake
    stores = folder / "stores"
    stores.mkdir()
    path = stores / "s.sqlite"
    copy = sqlite3.connect(path)
    store.db.backup(copy)
    copy.close()
    shutil.copytree(f"{store.path}.models", f"{path}.models")  # fitted on the same rows: reloaded, not refitted
    config = folder / "tiny-llama.json"
    config.write_text(json.dumps(tiny_llama()))
    path.chmod(0o444)
    stores.chmod(0o555)
    before = snapshot(path)

    fit = run("fit", "--store", path, "--backend", "sdpa", "--json")
    assert fit.returncode == 0, fit.stderr
    assert [e["fitted"] for e in json.loads(fit.stdout).values()] == [False]
    predict = run("predict", config, "--store", path, "--batch", "decode:2@64")
    assert predict.returncode == 0 and "total" in predict.stdout, predict.stderr
    plan = run("plan", config, "--store", path, "--env", ENV, "--json")
    assert plan.returncode == 0 and json.loads(plan.stdout)["models"][0]["new"] == 0, plan.stderr
    assert snapshot(path) == before


# --- 4. an empty file is no store, except to the commands that make stores ----------------------------------------

@pytest.mark.parametrize("args", [
    ["store", "info", "{store}"],
    ["store", "export", "{store}", "{tmp}/out.jsonl"],
    ["predict", ROOT / "golden" / "llama-3.2-1b.ir", "--store", "{store}", "--batch", "decode:8@512"],
    ["fit", "--store", "{store}"],
    ["simulate", ROOT / "golden" / "llama-3.2-1b.ir", "--store", "{store}", "--synthetic",
     "poisson:rate=1,n=2,prompt=8,output=2"],
    ["plan", ROOT / "golden" / "llama-3.2-1b.ir", "--store", "{store}"],
])
@pytest.mark.parametrize("state", ["empty", "missing"])
def test_commands_that_only_read_refuse_an_empty_or_missing_store(tmp_path, args, state):
    store = tmp_path / "s.sqlite"
    if state == "empty":
        store.touch()
    elif args[0] == "plan":
        pytest.skip("plan makes a missing store (its documented behaviour)")
    code, _, err = dooly_main(*[str(a).format(store=store, tmp=tmp_path) for a in args])
    assert_one_error_line(code, err, "an empty file" if state == "empty" else "no such store")
    assert (store.stat().st_size == 0) if state == "empty" else not store.exists()


def test_an_empty_file_becomes_a_store_for_the_commands_that_make_stores(stores, tmp_path):
    export_path, _ = stores
    (tmp_path / "new.sqlite").touch()
    code, out, err = dooly_main("store", "import", tmp_path / "new.sqlite", export_path)
    assert code == 0, err
    assert Store(tmp_path / "new.sqlite", readonly=True).counts()["measurements"] == 4


# --- 5. tables that do not match the store's schema version ---------------------------------------------------

def _drop(table):
    return lambda db: db.execute(f"DROP TABLE {table}")


BROKEN = [(SCHEMA_VERSION, _drop(t), f"table {t} is missing") for t in TABLES] + [
    (SCHEMA_VERSION, lambda db: db.execute("ALTER TABLE sweeps ADD COLUMN note TEXT"), "unexpected: note"),
    (SCHEMA_VERSION, lambda db: db.execute("ALTER TABLE measurements DROP COLUMN reason"),
     "missing or changed columns: reason"),
    (SCHEMA_VERSION, lambda db: db.executescript("DROP TABLE sweeps; CREATE TABLE sweeps (signature TEXT)"),
     "table sweeps does not match"),
    (2, lambda db: db.execute("ALTER TABLE measurements ADD COLUMN gpu_s REAL NOT NULL DEFAULT 0"),
     "does not match schema version 2"),
    (1, _drop("sweeps"), "table sweeps is missing (schema version 1"),
]


@pytest.mark.parametrize("version, damage, message", BROKEN, ids=[m for *_, m in BROKEN])
@pytest.mark.parametrize("mode", [{}, {"create": False}, {"readonly": True}])
def test_a_store_whose_tables_do_not_match_its_version_is_refused(tmp_path, version, damage, message, mode):
    path = tmp_path / "s.sqlite"
    older_store(path, version)
    db = sqlite3.connect(path)
    damage(db)
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(DoolyError, match=message.replace("(", r"\(")):
        Store(path, **mode)
    assert path.read_bytes() == before
    code, _, err = dooly_main("store", "info", path)
    assert_one_error_line(code, err, message)
