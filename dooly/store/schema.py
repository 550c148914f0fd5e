"""The store's schema, as an ordered list of migrations; `PRAGMA user_version` is the number applied.

The columns of each table at each version are read back from an in-memory database built by the migrations
themselves, so they cannot drift from MIGRATIONS; they are the only identifiers any statement is built from.
"""

import functools
import sqlite3
from dataclasses import dataclass

MIGRATIONS = [
    # 1: environments, signatures, measurements, and what profiling cost
    """
    CREATE TABLE environments (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        gpu TEXT NOT NULL, compute_capability TEXT NOT NULL, driver TEXT NOT NULL, cuda TEXT NOT NULL,
        torch TEXT NOT NULL, triton TEXT NOT NULL, engine TEXT NOT NULL, engine_version TEXT NOT NULL,
        dtype TEXT NOT NULL, kv_cache_dtype TEXT NOT NULL, block_size INTEGER NOT NULL,
        attention_backend TEXT NOT NULL,
        extra TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL
    );
    CREATE TABLE signatures (
        hash TEXT PRIMARY KEY,
        op TEXT NOT NULL,
        family TEXT NOT NULL,
        axes TEXT NOT NULL,
        canonical TEXT NOT NULL
    );
    CREATE TABLE measurements (
        id INTEGER PRIMARY KEY,
        signature TEXT NOT NULL REFERENCES signatures(hash),
        environment INTEGER NOT NULL REFERENCES environments(id),
        point TEXT NOT NULL,
        min_us REAL, median_us REAL, p90_us REAL, std_us REAL,
        repetitions INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'ok',
        reason TEXT,
        measured_at TEXT NOT NULL,
        UNIQUE (signature, environment, point)
    );
    CREATE INDEX measurements_by_signature ON measurements (signature, environment);
    CREATE TABLE sweeps (
        signature TEXT NOT NULL REFERENCES signatures(hash),
        environment INTEGER NOT NULL REFERENCES environments(id),
        gpu_seconds REAL NOT NULL,
        points INTEGER NOT NULL,
        finished_at TEXT NOT NULL,
        PRIMARY KEY (signature, environment)
    );
    """,
    # 2: the engine's host-side time per step, measured per environment
    """
    CREATE TABLE host_overhead (
        environment INTEGER NOT NULL REFERENCES environments(id),
        phase TEXT NOT NULL,
        point TEXT NOT NULL,
        median_us REAL NOT NULL,
        p90_us REAL NOT NULL,
        repetitions INTEGER NOT NULL,
        measured_at TEXT NOT NULL,
        PRIMARY KEY (environment, phase, point)
    );
    """,
    # 3: the device time each point cost, so a sweep resumed after a crash still adds up what it spent
    """
    ALTER TABLE measurements ADD COLUMN gpu_s REAL NOT NULL DEFAULT 0
    """,
    # 4: the kernels a step of each host-calibration model launches, counted on its IR when it was calibrated, so
    # that fitting the host model needs no compiler
    """
    CREATE TABLE host_kernels (
        environment INTEGER NOT NULL REFERENCES environments(id),
        point TEXT NOT NULL,
        fixed REAL NOT NULL,
        per_request REAL NOT NULL,
        reading REAL NOT NULL,
        fresh REAL NOT NULL,
        types INTEGER NOT NULL,
        PRIMARY KEY (environment, point)
    )
    """,
    # 5: a sweep's device time under the name a point's has
    """
    ALTER TABLE sweeps RENAME COLUMN gpu_seconds TO gpu_s
    """,
]
# columns a migration renamed, as an export written before it names them: (table, old name) -> name
RENAMED_COLUMNS = {("sweeps", "gpu_seconds"): "gpu_s"}

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # the declared type: INTEGER, REAL or TEXT
    notnull: bool
    default: str | None  # the default's SQL text, None when it has none
    primary_key: int  # position in the table's primary key, 0 when not part of it


@functools.lru_cache(maxsize=None)
def columns(version: int = SCHEMA_VERSION) -> dict[str, tuple[Column, ...]]:
    """Each table's columns after the first `version` migrations, tables in the order they were created."""
    db = sqlite3.connect(":memory:")
    try:
        for migration in MIGRATIONS[:version]:
            db.executescript(migration)
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
        return {name: table_columns(db, name) for name in names}
    finally:
        db.close()


def table_columns(db: sqlite3.Connection, table: str) -> tuple[Column, ...]:
    return tuple(Column(r[1], r[2].upper(), bool(r[3]), r[4], r[5])
                 for r in db.execute("SELECT * FROM pragma_table_info(?)", (table,)))


TABLES = tuple(columns())
