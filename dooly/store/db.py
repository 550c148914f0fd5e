"""The latency store: one SQLite file (WAL), measurements keyed by op signature, environment and request point.

Every measured point is committed on its own, so a crash or a kill loses nothing already measured and two
profilers can write to one store at once. A store this Dooly cannot read (corrupt, not SQLite, from a newer
schema) is refused with one line and left untouched.

Measurements of ops whose kernel does not depend on the attention backend are shared by environments that differ
only in that backend: a GEMM measured while profiling one backend is not profiled again for the next.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DoolyError
from .schema import MIGRATIONS, SCHEMA_VERSION, TABLES

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


def point_key(point: dict[str, int]) -> str:
    return json.dumps({k: int(v) for k, v in sorted(point.items())}, separators=(",", ":"))


class Store:
    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise DoolyError(f"{self.path}: no such store")
        self._check_readable()
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout = 60000")
        self.db.execute("PRAGMA foreign_keys = ON")
        if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self.db.execute("PRAGMA journal_mode = WAL")
        self._migrate()
        self._env_cache: dict[str, tuple[int, Environment]] = {}

    def _check_readable(self) -> None:
        """Refuse, without writing a byte, a file that is not a store this Dooly can use."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise DoolyError(f"{self.path}: the store is corrupt (SQLite integrity check failed)")
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise DoolyError(f"{self.path}: not a readable Dooly store ({e})") from None
        if version > SCHEMA_VERSION:
            raise DoolyError(f"{self.path}: the store has schema version {version}, newer than this Dooly "
                             f"reads ({SCHEMA_VERSION}); upgrade Dooly to use it")
        if version == 0 and tables:
            raise DoolyError(f"{self.path}: an SQLite file, but not a Dooly store "
                             f"(tables: {', '.join(sorted(tables))})")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version, SCHEMA_VERSION):
            with self.transaction():  # one migration, all or nothing (executescript would commit midway)
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {number + 1}")

    def transaction(self):
        store = self

        class Tx:
            def __enter__(self):
                store.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, value, tb):
                store.db.execute("COMMIT" if kind is None else "ROLLBACK")

        return Tx()

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

    def add_signature(self, sig) -> None:
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

    def finish_sweep(self, sig_hash: str, env_name: str, gpu_seconds: float, points: int) -> None:
        env_id, _ = self.environment(env_name)
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO sweeps VALUES (?,?,?,?,?)",
                            (sig_hash, env_id, gpu_seconds, points, now()))

    def measured(self, env_name: str) -> dict[str, float]:
        """Signatures with a finished sweep usable in `env_name`, with the GPU-seconds that sweep cost."""
        env_id, same_base = self._same_machine(env_name)
        rows = self.db.execute(
            f"SELECT s.signature, s.environment, s.gpu_seconds, g.family FROM sweeps s JOIN signatures g"
            f" ON g.hash = s.signature WHERE s.environment IN ({','.join('?' * len(same_base))})", same_base)
        out = {}
        for r in rows:
            if r["environment"] == env_id or r["family"] not in BACKEND_FAMILIES:
                out[r["signature"]] = r["gpu_seconds"]
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

    def host(self, env_name: str) -> list[dict]:
        env_id, _ = self.environment(env_name)
        return [{**dict(r), "point": json.loads(r["point"])}
                for r in self.db.execute("SELECT * FROM host_overhead WHERE environment = ?", (env_id,))]

