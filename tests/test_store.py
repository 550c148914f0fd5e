"""The SQLite latency store: schema, migrations, concurrent and crashing writers, bad files, export/import."""

import hashlib
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from helpers import ROOT, dooly, gpu_available

from dooly.errors import DoolyError
from dooly.passes.canonicalize import Signature
from dooly.store import Environment, Stats, Store
from dooly.store import cli as store_cli
from dooly.store.portable import export, import_
from dooly.store.schema import MIGRATIONS, SCHEMA_VERSION


def env(name="h100/sdpa", backend="paged|sdpa", **kw):
    base = dict(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", driver="580.159.04", cuda="13.0",
                torch="2.11.0+cu130", triton="3.6.0", engine="transformers-cb", engine_version="5.17.0",
                dtype="bf16", kv_cache_dtype="bf16", block_size=256, attention_backend=backend)
    base.update(kw)
    return Environment(name=name, **base)


def sig(name="aten.mm", family="gemm", n=0):
    return Signature(f"{n:016x}", family, ("M",), {"op": name, "family": family, "n": n})


def stats(us):
    return Stats(us, us, us * 1.1, us * 0.01, 15)


def fresh(tmp_path, name="s.sqlite"):
    store = Store(tmp_path / name)
    store.add_environment(env())
    return store


def test_new_store_is_wal_and_at_the_current_schema(tmp_path):
    store = fresh(tmp_path)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_record_and_read_back(tmp_path):
    store = fresh(tmp_path)
    s = sig()
    store.add_signature(s)
    store.record(s.hash, "h100/sdpa", {"M": 64}, stats(12.5))
    store.record_skip(s.hash, "h100/sdpa", {"M": 1 << 30}, "out of memory")
    store.finish_sweep(s.hash, "h100/sdpa", 1.5, 2)
    points = store.points(s.hash, "h100/sdpa", "gemm")
    assert points['{"M":64}']["median_us"] == 12.5 and points['{"M":1073741824}']["status"] == "skipped"
    assert store.finished_sweeps("h100/sdpa") == {s.hash: 1.5}
    assert store.signature(s.hash)["canonical"] == s.canonical


def test_non_attention_measurements_serve_every_backend_of_the_same_machine(tmp_path):
    store = fresh(tmp_path)
    store.add_environment(env("h100/cudnn", backend="paged|sdpa/cudnn"))
    store.add_environment(env("a100/sdpa", gpu="A100"))
    gemm, attn = sig(), sig("aten.scaled_dot_product_attention", "attention", 1)
    for s in (gemm, attn):
        store.add_signature(s)
        store.record(s.hash, "h100/sdpa", {"M": 8}, stats(3.0))
        store.finish_sweep(s.hash, "h100/sdpa", 1.0, 1)
    assert set(store.finished_sweeps("h100/cudnn")) == {gemm.hash}
    assert store.points(attn.hash, "h100/cudnn", "attention") == {}
    assert set(store.finished_sweeps("a100/sdpa")) == set()
    with pytest.raises(DoolyError, match="already exists"):
        store.add_environment(env("h100/cudnn", backend="other"))


def test_unknown_environment_is_an_error(tmp_path):
    with pytest.raises(DoolyError, match="no environment 'nope'.*h100/sdpa"):
        fresh(tmp_path).environment("nope")


def test_old_store_is_migrated_without_losing_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO signatures VALUES ('abc', 'aten.mm', 'gemm', '[]', '{}')")
    db.execute("INSERT INTO sweeps VALUES ('abc', 1, 2.5, 3, 'then')")  # its device time, as gpu_seconds
    db.commit()
    db.close()
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.signature("abc")["op"] == "aten.mm"
    assert tuple(store.db.execute("SELECT gpu_s, points FROM sweeps").fetchone()) == (2.5, 3)
    assert store.counts()["host_overhead"] == 0


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_store_from_a_newer_schema_is_refused_untouched(tmp_path):
    store = fresh(tmp_path)
    store.db.execute("PRAGMA user_version = 99")
    store.close()
    path = tmp_path / "s.sqlite"
    before = _digest(path)
    with pytest.raises(DoolyError, match="schema version 99, newer"):
        Store(path)
    assert _digest(path) == before


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100,
                                     b"SQLite format 3\x00" + b"\x07" * 4000])
def test_corrupt_store_is_refused_untouched(tmp_path, content):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(content)
    with pytest.raises(DoolyError, match="not a readable Dooly store|corrupt"):
        Store(path)
    assert path.read_bytes() == content


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(DoolyError, match="not a Dooly store"):
        Store(path)


def _writer(path, first, n, pace):
    store = Store(path)
    for i in range(first, first + n):
        store.record("0" * 16, "h100/sdpa", {"M": i}, stats(float(i)))
        time.sleep(pace)


def test_two_writer_processes_lose_nothing(tmp_path):
    store = fresh(tmp_path)
    store.add_signature(sig())
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path / "s.sqlite", k * 1000, 150, 0.0)) for k in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(store.points("0" * 16, "h100/sdpa", "gemm")) == 300


def test_a_killed_writer_keeps_every_committed_point(tmp_path):
    store = fresh(tmp_path)
    store.add_signature(sig())
    code = ("import sys, time; sys.path.insert(0, 'tests'); from test_store import _writer; "
            f"_writer({str(tmp_path / 's.sqlite')!r}, 0, 100000, 0.001)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 60
    while len(store.points("0" * 16, "h100/sdpa", "gemm")) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    seen = store.points("0" * 16, "h100/sdpa", "gemm")
    reopened = Store(tmp_path / "s.sqlite")
    after = reopened.points("0" * 16, "h100/sdpa", "gemm")
    assert len(after) >= len(seen) >= 50
    assert all(after[k]["median_us"] == v["median_us"] for k, v in seen.items())
    assert reopened.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_export_import_round_trip_merges(tmp_path):
    a = fresh(tmp_path, "a.sqlite")
    s = sig()
    a.add_signature(s)
    a.record(s.hash, "h100/sdpa", {"M": 4}, stats(2.0))
    a.finish_sweep(s.hash, "h100/sdpa", 0.5, 1)
    a.record_host("h100/sdpa", "prepare", {"R": 4}, 900.0, 950.0, 5)
    assert export(a, tmp_path / "a.jsonl") == 5
    b = Store(tmp_path / "b.sqlite")
    assert import_(b, tmp_path / "a.jsonl") == 5
    assert import_(b, tmp_path / "a.jsonl") == 0  # merging twice adds nothing
    assert b.points(s.hash, "h100/sdpa", "gemm")['{"M":4}']["median_us"] == 2.0
    assert b.finished_sweeps("h100/sdpa") == {s.hash: 0.5} and b.host("h100/sdpa")[0]["median_us"] == 900.0
    (tmp_path / "junk.jsonl").write_text("hello\n")
    with pytest.raises(DoolyError, match="not a Dooly store export"):
        import_(b, tmp_path / "junk.jsonl")


def test_store_cli_info_and_bad_store(tmp_path):
    fresh(tmp_path).close()
    out = subprocess.run([sys.executable, "-m", "dooly", "store", "info", str(tmp_path / "s.sqlite")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "h100/sdpa" in out.stdout
    (tmp_path / "bad.sqlite").write_bytes(b"garbage" * 1000)
    out = subprocess.run([sys.executable, "-m", "dooly", "store", "info", str(tmp_path / "bad.sqlite")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_backend_environment_reads_every_point_the_machine_measured(tmp_path):
    store = fresh(tmp_path)
    store.add_environment(env("h100/cudnn", backend="paged|sdpa/cudnn"))
    gemm = sig()
    store.add_signature(gemm)
    for m in (1, 2, 4, 8):
        store.record(gemm.hash, "h100/sdpa", {"M": m}, stats(float(m)))
    assert len(store.measured_points("h100/cudnn")[gemm.hash]) == 4
    store.record(gemm.hash, "h100/cudnn", {"M": 1}, stats(9.0))  # its own measurements win
    assert list(store.measured_points("h100/cudnn")[gemm.hash].values())[0]["median_us"] == 9.0



@pytest.fixture
def fake_timer(monkeypatch):
    """`dooly store recheck` as on a GPU, each point 'measured again' at 10 µs without running it: the devices
    `measure` was asked for, one per point."""
    import torch

    from dooly.bench import timer

    devices = []

    def measure(make_inputs, run, device):
        devices.append(device)
        return timer.Timing([10.0] * 5, launches=1, copies=1, graph=True, gpu_s=0.0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(timer, "measure", measure)
    return devices


def test_recheck_remeasures_a_seeded_sample_of_stored_points(shipped, tmp_path, fake_timer, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for out in (first, second):
        assert store_cli.main(["recheck", str(shipped), "--points", "4", "--seed", "3", "--out", str(out)]) == 0
    rows = json.loads(first.read_text())
    assert fake_timer == ["cuda"] * 8 and len(rows) == 4 and first.read_text() == second.read_text()
    for row in rows:
        assert set(row) == {"op", "point", "stored_us", "again_us", "deviation"} and row["again_us"] == 10.0
        assert row["deviation"] == pytest.approx(abs(10.0 - row["stored_us"]) / row["stored_us"])
    assert "4 points: median deviation" in capsys.readouterr().out


def test_recheck_of_an_unknown_environment_is_one_error_line(shipped, fake_timer, capsys):
    assert store_cli.main(["recheck", str(shipped), "--env", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: no environment 'nope'") and not fake_timer


@pytest.mark.parametrize("args, message", [
    ([], "CUDA GPU"),  # this machine has none
    (["--points", "0"], "--points must be at least 1"),
    (["--out", "/nonexistent/folder/rows.json"], "does not exist"),
])
def test_recheck_refuses_bad_input(shipped, args, message):
    if gpu_available() and message == "CUDA GPU":
        pytest.skip("this machine has a GPU to recheck on")
    r = dooly("store", "recheck", shipped, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
