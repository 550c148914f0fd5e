"""The latency store: one SQLite file (WAL), measurements keyed by op signature, environment and request point.

Every measured point is committed on its own, so a crash or a kill loses nothing already measured and two
profilers can write to one store at once. A store this Dooly cannot read (corrupt, not SQLite, from a newer
schema) is refused with one line and left untouched.

Measurements of ops whose kernel does not depend on the attention backend are shared by environments that differ
only in that backend: a GEMM measured while profiling one backend is not profiled again for the next.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DoolyError
from .schema import MIGRATIONS, SCHEMA_VERSION, TABLES, columns, table_columns

if TYPE_CHECKING:  # the store reads signatures, never builds them: sympy stays out of `dooly store info`
    from ..passes.canonicalize import Signature

BACKEND_FAMILIES = {"attention"}  # families whose kernel depends on the attention backend


@dataclass(frozen=True)
class Environment:
    name: str
    gpu: str
    compute_capability: str
    driver: str
    cuda: str
    torch: str
    triton: str
    engine: str
    engine_version: str
    dtype: str
    kv_cache_dtype: str
    block_size: int
    attention_backend: str
    extra: dict = field(default_factory=dict, compare=False)

    def base(self) -> tuple:
        """Everything but the attention backend."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in ("name", "attention_backend",
                                                                                      "extra"))


@dataclass(frozen=True)
class Stats:
    min_us: float
    median_us: float
    p90_us: float
    std_us: float
    repetitions: int


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def use_wal(db: sqlite3.Connection) -> None:
    """Switch to WAL mode. The switch needs the database to itself and can fail at once rather than wait when
    other processes open it at the same moment, so it is retried."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal" or \
                    db.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal":
                return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("could not switch to WAL mode: the database stayed locked")
        time.sleep(0.01)


def point_key(point: dict[str, int]) -> str:
    return json.dumps({k: int(v) for k, v in sorted(point.items())}, separators=(",", ":"))


class Store:
    """A latency store. `create`: a missing or empty file becomes a new store (only commands that make stores
    pass it). `readonly`: open for reading only (never creates, never writes): works on a store in a read-only
    file or folder."""

    def __init__(self, path: str | Path, create: bool = True, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        may_create = create and not readonly
        if self.path.is_dir():
            raise DoolyError(f"{self.path}: a folder, not a store")
        if not self.path.exists() and not may_create:
            raise DoolyError(f"{self.path}: no such store")
        if self.path.exists() and self.path.stat().st_size == 0 and not may_create:
            raise DoolyError(f"{self.path}: an empty file, not a Dooly store")
        self.db = self._open_readonly() if readonly else self._open_for_writing(may_create)
        self.db.row_factory = sqlite3.Row
        self._env_cache: dict[str, tuple[int, Environment]] = {}

    def _open_readonly(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None)
        try:
            try:
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                db.close()
                db = self._open_immutable(uri)
            version = self._check(db, may_create=False)
        except sqlite3.DatabaseError as e:
            db.close()
            raise DoolyError(f"{self.path}: not a readable Dooly store ({e})") from None
        except BaseException:
            db.close()
            raise
        if version == SCHEMA_VERSION:
            return db
        db.close()
        if not (os.access(self.path, os.W_OK) and os.access(self.path.resolve().parent, os.W_OK)):
            raise DoolyError(f"{self.path}: schema version {version}, older than this Dooly's ({SCHEMA_VERSION}), "
                             f"and read-only here; open it once where it can be written")
        Store(self.path, create=False).close()  # migrates it
        return self._open_readonly()

    def _open_immutable(self, uri: str) -> sqlite3.Connection:
        """A WAL store in a folder this process cannot write to: SQLite cannot make the shared-memory file that
        reading in WAL mode takes. Nobody can write there either, so the file alone is the whole store, unless a
        writer left its log behind."""
        wal = Path(f"{self.path}-wal")
        if wal.exists() and wal.stat().st_size:
            raise DoolyError(f"{self.path}: read-only, and its write-ahead log {wal.name} holds writes not yet "
                             f"merged into it; open it once where it can be written")
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)

    def _open_for_writing(self, may_create: bool) -> sqlite3.Connection:
        folder = self.path.resolve().parent
        if not folder.is_dir():
            raise DoolyError(f"{self.path}: no such folder {folder}")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise DoolyError(f"{self.path}: the store is read-only, and this command writes to it")
        if not os.access(folder, os.W_OK):
            raise DoolyError(f"{self.path}: its folder is read-only, and this command writes to the store")
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            try:
                version = self._check(db, may_create)
            except sqlite3.DatabaseError as e:
                raise DoolyError(f"{self.path}: not a readable Dooly store ({e})") from None
            db.execute("PRAGMA foreign_keys = ON")
            use_wal(db)
            if version < SCHEMA_VERSION:
                self._migrate(db, version)
        except sqlite3.OperationalError as e:
            db.close()
            raise DoolyError(f"{self.path}: cannot write to the store ({e})") from None
        except BaseException:
            db.close()
            raise
        return db

    def _check(self, db: sqlite3.Connection, may_create: bool) -> int:
        """The store's schema version, having refused (without writing a byte) a file this Dooly cannot use. One
        read transaction: a migration another process commits meanwhile must not show its tables beside the
        version it replaced."""
        db.execute("BEGIN")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise DoolyError(f"{self.path}: the store is corrupt (SQLite integrity check failed)")
            if version > SCHEMA_VERSION:
                raise DoolyError(f"{self.path}: the store has schema version {version}, newer than this Dooly "
                                 f"reads ({SCHEMA_VERSION}); upgrade Dooly to use it")
            if version == 0 and (tables or not may_create):
                raise DoolyError(f"{self.path}: an SQLite file, but not a Dooly store "
                                 f"(tables: {', '.join(sorted(tables)) or 'none'})")
            self._check_tables(db, version)
        finally:
            db.execute("COMMIT")
        return version

    def _check_tables(self, db: sqlite3.Connection, version: int) -> None:
        """Refuse a store whose tables are not those its schema version makes (a table dropped, a column
        changed): every query below relies on them."""
        for table, expected in columns(version).items():
            found = table_columns(db, table)
            if not found:
                raise DoolyError(f"{self.path}: table {table} is missing (schema version {version} has it)")
            if found != expected:
                missing = [c.name for c in expected if c not in found]
                unexpected = [c.name for c in found if c not in expected]
                raise DoolyError(f"{self.path}: table {table} does not match schema version {version} "
                                 f"(missing or changed columns: {', '.join(missing) or 'none'}; "
                                 f"unexpected: {', '.join(unexpected) or 'none'})")

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        """Bring the store to SCHEMA_VERSION in one transaction. Its version is read again under the write
        lock: another process may have migrated it since it was first read."""
        db.execute("BEGIN IMMEDIATE")
        try:
            locked_version = db.execute("PRAGMA user_version").fetchone()[0]
            if locked_version > SCHEMA_VERSION:
                raise DoolyError(f"{self.path}: a newer Dooly has just migrated the store to schema version "
                                 f"{locked_version}; upgrade Dooly to use it")
            if locked_version != version:
                self._check_tables(db, locked_version)
            for number in range(locked_version, SCHEMA_VERSION):
                for statement in MIGRATIONS[number].split(";"):  # executescript would commit midway
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def transaction(self):
        if self.readonly:
            raise DoolyError(f"{self.path}: opened read-only; this command cannot write to it")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # environments

    def add_environment(self, env: Environment) -> Environment:
        row = asdict(env)
        row["extra"] = json.dumps(env.extra, sort_keys=True)
        existing = self.db.execute("SELECT * FROM environments WHERE name = ?", (env.name,)).fetchone()
        if existing is not None:
            known = self._environment(existing)
            if known != env:
                raise DoolyError(f"environment {env.name!r} already exists in {self.path} with other settings")
            if env.extra and env.extra != known.extra:
                with self.transaction():
                    self.db.execute("UPDATE environments SET extra = ? WHERE name = ?", (row["extra"], env.name))
                self._env_cache.pop(env.name, None)
            return env
        with self.transaction():
            cols = ", ".join(row) + ", created_at"
            self.db.execute(f"INSERT OR IGNORE INTO environments ({cols}) VALUES ({', '.join('?' * len(row))}, ?)",
                            (*row.values(), now()))
        return env

    @staticmethod
    def _environment(row: sqlite3.Row) -> Environment:
        values = {f.name: row[f.name] for f in fields(Environment)}
        values["extra"] = json.loads(values["extra"])
        return Environment(**values)

    def environments(self) -> list[Environment]:
        return [self._environment(r) for r in self.db.execute("SELECT * FROM environments ORDER BY id")]

    def environment(self, name: str) -> tuple[int, Environment]:
        if name not in self._env_cache:
            row = self.db.execute("SELECT * FROM environments WHERE name = ?", (name,)).fetchone()
            if row is None:
                known = ", ".join(e.name for e in self.environments()) or "none"
                raise DoolyError(f"no environment {name!r} in {self.path} (it has: {known})")
            self._env_cache[name] = (row["id"], self._environment(row))
        return self._env_cache[name]

    def _same_machine(self, env_name: str) -> tuple[int, list[int]]:
        """`env_name`'s id, and the ids of the environments that differ from it at most in the attention backend
        (itself first): their measurements of a family outside BACKEND_FAMILIES stand for its own."""
        env_id, env = self.environment(env_name)
        others = [self.environment(e.name)[0] for e in self.environments() if e.base() == env.base()]
        return env_id, [env_id] + [i for i in others if i != env_id]

    def _usable(self, env_name: str, family: str) -> list[int]:
        """Environments whose measurements of a family stand for `env_name`'s, the environment itself first."""
        env_id, same = self._same_machine(env_name)
        return [env_id] if family in BACKEND_FAMILIES else same

    # signatures and measurements

    def add_signature(self, sig: Signature) -> None:
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO signatures (hash, op, family, axes, canonical) VALUES (?,?,?,?,?)",
                            (sig.hash, sig.op, sig.family, json.dumps(list(sig.axes)),
                             json.dumps(sig.canonical, sort_keys=True)))

    def signature(self, sig_hash: str) -> dict | None:
        row = self.db.execute("SELECT * FROM signatures WHERE hash = ?", (sig_hash,)).fetchone()
        return None if row is None else {**dict(row), "axes": json.loads(row["axes"]),
                                         "canonical": json.loads(row["canonical"])}

    def record(self, sig_hash: str, env_name: str, point: dict[str, int], stats: Stats, gpu_s: float = 0.0) -> None:
        env_id, _ = self.environment(env_name)
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO measurements (signature, environment, point, min_us, median_us, p90_us,"
                " std_us, repetitions, status, measured_at, gpu_s) VALUES (?,?,?,?,?,?,?,?, 'ok', ?, ?)",
                (sig_hash, env_id, point_key(point), stats.min_us, stats.median_us, stats.p90_us, stats.std_us,
                 stats.repetitions, now(), gpu_s))

    def record_skip(self, sig_hash: str, env_name: str, point: dict[str, int], reason: str,
                    gpu_s: float = 0.0) -> None:
        env_id, _ = self.environment(env_name)
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO measurements (signature, environment, point, repetitions, status, reason,"
                " measured_at, gpu_s) VALUES (?,?,?,0,'skipped',?,?,?)",
                (sig_hash, env_id, point_key(point), reason, now(), gpu_s))

    def finish_sweep(self, sig_hash: str, env_name: str, gpu_s: float, points: int) -> None:
        env_id, _ = self.environment(env_name)
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO sweeps VALUES (?,?,?,?,?)",
                            (sig_hash, env_id, gpu_s, points, now()))

    def finished_sweeps(self, env_name: str) -> dict[str, float]:
        """Signatures with a finished sweep usable in `env_name`, with the GPU-seconds that sweep cost."""
        env_id, same_base = self._same_machine(env_name)
        rows = self.db.execute(
            f"SELECT s.signature, s.environment, s.gpu_s, g.family FROM sweeps s JOIN signatures g"
            f" ON g.hash = s.signature WHERE s.environment IN ({','.join('?' * len(same_base))})", same_base)
        out = {}
        for r in rows:
            if r["environment"] == env_id or r["family"] not in BACKEND_FAMILIES:
                out[r["signature"]] = r["gpu_s"]
        return out

    def points(self, sig_hash: str, env_name: str, family: str) -> dict[str, dict]:
        """point key -> measurement row, from the first usable environment that has any."""
        for env_id in self._usable(env_name, family):
            rows = self.db.execute("SELECT * FROM measurements WHERE signature = ? AND environment = ?",
                                   (sig_hash, env_id)).fetchall()
            if rows:
                return {r["point"]: dict(r) for r in rows}
        return {}

    def measured_points(self, env_name: str) -> dict[str, dict[str, dict]]:
        """signature -> point key -> row, for every signature with measurements usable in `env_name` (its own
        measurements where it has them, else those of an environment of the same machine)."""
        env_id, same_base = self._same_machine(env_name)
        found: dict[str, dict[int, dict[str, dict]]] = {}
        rows = self.db.execute("SELECT m.*, g.family FROM measurements m JOIN signatures g ON g.hash = m.signature")
        for r in rows:
            if r["environment"] != env_id and (r["family"] in BACKEND_FAMILIES or r["environment"] not in same_base):
                continue
            found.setdefault(r["signature"], {}).setdefault(r["environment"], {})[r["point"]] = dict(r)
        return {sig: by_env.get(env_id) or by_env[min(by_env)] for sig, by_env in found.items()}

    def counts(self) -> dict[str, int]:
        return {t: self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in TABLES}

    # host overhead

    def record_host(self, env_name: str, phase: str, point: dict[str, int], median_us: float, p90_us: float,
                    repetitions: int) -> None:
        env_id, _ = self.environment(env_name)
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO host_overhead VALUES (?,?,?,?,?,?,?)",
                            (env_id, phase, point_key(point), median_us, p90_us, repetitions, now()))

    def record_host_samples(self, env_name: str, phase: str, point: dict[str, int], samples_us: list[float]) -> float:
        """A host phase at `point` from its samples: their median (returned), p90 and count."""
        values = sorted(samples_us)
        median = statistics.median(values)
        self.record_host(env_name, phase, point, median, values[min(len(values) - 1, int(0.9 * len(values)))],
                         len(values))
        return median

    def forget_host(self, env_name: str, phases: Iterable[str], where: dict[str, int]) -> None:
        """Drops the host rows of these phases whose point holds `where` and names no other of its keys: a
        recalibration replaces a calibration whole, compositions it no longer sees included."""
        env_id, _ = self.environment(env_name)
        gone = [(phase, r["point"]) for phase in phases for r in self.db.execute(
            "SELECT point FROM host_overhead WHERE environment = ? AND phase = ?", (env_id, phase))
            if {k: v for k, v in json.loads(r["point"]).items() if k not in ("T", "R")} == where]
        with self.transaction():
            self.db.executemany("DELETE FROM host_overhead WHERE environment = ? AND phase = ? AND point = ?",
                                [(env_id, phase, point) for phase, point in gone])

    def host(self, env_name: str) -> list[dict]:
        env_id, _ = self.environment(env_name)
        return [{**dict(r), "point": json.loads(r["point"])}
                for r in self.db.execute("SELECT * FROM host_overhead WHERE environment = ?", (env_id,))]

    def record_host_kernels(self, env_name: str, point: dict[str, int], kernels: dict[str, float]) -> None:
        """The kernels a step of the calibration model at `point` launches: fixed, per_request, reading, fresh,
        and its attention types."""
        env_id, _ = self.environment(env_name)
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO host_kernels VALUES (?,?,?,?,?,?,?)",
                            (env_id, point_key(point), kernels["fixed"], kernels["per_request"], kernels["reading"],
                             kernels["fresh"], kernels["types"]))

    def host_kernels(self, env_name: str) -> list[dict]:
        env_id, _ = self.environment(env_name)
        return [{**dict(r), "point": json.loads(r["point"])}
                for r in self.db.execute("SELECT * FROM host_kernels WHERE environment = ?", (env_id,))]

