"""A store as JSON lines, for sharing: export everything, import by merging (nothing is ever deleted or changed).

The first line names the format; each further line is one row: `{"table": ..., "row": {...}}`, environments by
name, so rows move between stores whose environment ids differ.

An import checks every line against its table's columns in the schema (names, types, nulls) before it writes
anything, then merges all of it in one transaction or none of it. A row that collides with one already stored is
left out: an import never changes a stored measurement.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import DoolyError
from .db import Environment, Store, point_key
from .schema import RENAMED_COLUMNS, SCHEMA_VERSION, TABLES, Column, columns

FORMAT = "dooly-store"
ENVIRONMENT = "environment"  # a column that refers to an environment: its name in the file, its id in a store
ENVIRONMENT_SETTINGS = [f.name for f in fields(Environment) if f.name != "extra"]
JSON_TEXT = {("environments", "extra"): dict, ("signatures", "axes"): list, ("signatures", "canonical"): dict}
POINT_TEXT = {("measurements", "point"), ("host_overhead", "point"), ("host_kernels", "point")}
STATUSES = {"ok", "skipped", "transferred"}
SIGNED = {("host_overhead", "median_us"), ("host_overhead", "p90_us")}  # differences of two host timings
MAX_INTEGER = 2 ** 63 - 1  # SQLite's


@dataclass(frozen=True)
class Row:
    lineno: int
    table: str
    values: dict


def export(store: Store, path: Path) -> int:
    names = {r["id"]: r["name"] for r in store.db.execute("SELECT id, name FROM environments")}
    n = 0
    try:
        with open(path, "w") as f:
            f.write(json.dumps({"format": FORMAT, "schema": SCHEMA_VERSION}) + "\n")
            for table in TABLES:
                for row in store.db.execute(f"SELECT * FROM {table}"):
                    row = dict(row)
                    row.pop("id", None)
                    if ENVIRONMENT in row:
                        row[ENVIRONMENT] = names[row[ENVIRONMENT]]
                    f.write(json.dumps({"table": table, "row": row}, sort_keys=True) + "\n")
                    n += 1
    except OSError as e:
        raise DoolyError(f"{path}: cannot write the export ({e.strerror or e})") from None
    return n


def import_(store: Store, path: Path) -> int:
    return merge(store, read_export(path), path)


def read_export(path: Path) -> list[Row]:
    """Every row of an export, each checked against the schema; the first bad line is an error naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DoolyError(f"{path}: cannot read it ({e.strerror or e})") from None
    if b"\0" in data:
        raise DoolyError(f"{path}: a binary file, not a Dooly store export")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DoolyError(f"{path}: not UTF-8 text (byte {e.start}), not a Dooly store export") from None
    lines = text.split("\n")
    try:
        head = json.loads(lines[0])
    except (ValueError, RecursionError):
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise DoolyError(f"{path}: not a Dooly store export (first line: {lines[0][:60]!r})")
    schema = head.get("schema")
    if set(head) != {"format", "schema"} or type(schema) is not int or schema < 1:
        raise DoolyError(f"{path}: line 1: expected {{\"format\": \"{FORMAT}\", \"schema\": N}}")
    if schema > SCHEMA_VERSION:
        raise DoolyError(f"{path}: exported from schema {schema}, newer than this Dooly ({SCHEMA_VERSION})")
    return [_row(_parse(line, path, lineno), path, lineno)
            for lineno, line in enumerate(lines[1:], 2) if line.strip()]


def _parse(text: str, path: Path, lineno: int):
    try:
        return json.loads(text, parse_constant=_not_a_number)
    except (ValueError, RecursionError) as e:
        raise DoolyError(f"{path}: line {lineno} is not JSON ({str(e) or type(e).__name__})") from None


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a number a store holds")


def imported_columns(table: str) -> dict[str, Column]:
    """The table's columns an export carries: all but an integer primary key, which is the importing store's."""
    cols = columns()[table]
    keys = [c for c in cols if c.primary_key]
    rowid = keys[0].name if len(keys) == 1 and keys[0].type == "INTEGER" else None
    return {c.name: c for c in cols if c.name != rowid}


def _row(item, path: Path, lineno: int) -> Row:
    def bad(why: str) -> DoolyError:
        return DoolyError(f"{path}: line {lineno}: {why}")

    if not isinstance(item, dict) or set(item) != {"table", "row"} or not isinstance(item["row"], dict):
        raise bad('not a store row (expected {"table": NAME, "row": {COLUMN: VALUE, ...}})')
    table, values = item["table"], item["row"]
    if not isinstance(table, str) or table not in TABLES:
        raise bad(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
    values = {RENAMED_COLUMNS.get((table, name), name): value for name, value in values.items()}
    cols = imported_columns(table)
    for name in values:
        if name not in cols:
            raise bad(f"unknown column {name!r} for table {table} (columns: {', '.join(cols)})")
    for col in cols.values():
        required = col.notnull or col.primary_key
        if col.name not in values:
            if required and col.default is None:
                raise bad(f"{table} row without its column {col.name!r}")
            continue
        why = _wrong_value(table, col, values[col.name], required)
        if why:
            raise bad(f"{table}.{col.name}: {why}")
    if table == "measurements" and values.get("status", "ok") in ("ok", "transferred"):
        for name in ("min_us", "median_us", "p90_us", "std_us"):
            if values.get(name) is None:
                raise bad(f"a measurement with status {values.get('status', 'ok')!r} without {name}")
    return Row(lineno, table, values)


def _wrong_value(table: str, col: Column, value, required: bool) -> str | None:
    """What is wrong with `value` for the column, or None. The schema's numbers are counts, sizes and times, none
    negative but the SIGNED ones."""
    if value is None:
        return "must not be null" if required else None
    if col.name == ENVIRONMENT:
        return None if isinstance(value, str) else f"must be an environment's name, not {value!r}"
    if col.type == "TEXT":
        if not isinstance(value, str):
            return f"must be a string, not {type(value).__name__}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be Unicode text (it holds an unpaired surrogate)"
        if (table, col.name) in JSON_TEXT:
            return _wrong_json_text(value, JSON_TEXT[table, col.name])
        if (table, col.name) in POINT_TEXT:
            return _wrong_point(value)
        if (table, col.name) == ("measurements", "status") and value not in STATUSES:
            return f"must be one of {', '.join(sorted(STATUSES))}, not {value!r}"
        return None
    if type(value) not in ((int,) if col.type == "INTEGER" else (int, float)):
        return f"must be {'a whole number' if col.type == 'INTEGER' else 'a number'}, not {value!r}"
    if not math.isfinite(value) or abs(value) > MAX_INTEGER:
        return f"must be a finite number, not {value!r}"
    if value < 0 and (table, col.name) not in SIGNED:
        return f"must not be negative, not {value!r}"
    return None


def _wrong_json_text(value: str, kind: type) -> str | None:
    try:
        decoded = json.loads(value, parse_constant=_not_a_number)
    except (ValueError, RecursionError):
        return "must be JSON text"
    if not isinstance(decoded, kind) or kind is list and not all(isinstance(x, str) for x in decoded):
        return f"must be the JSON text of {'an object' if kind is dict else 'a list of names'}"
    return None


def _wrong_point(value: str) -> str | None:
    try:
        point = json.loads(value, parse_constant=_not_a_number)
    except (ValueError, RecursionError):
        point = None
    if not isinstance(point, dict) or not all(type(v) is int and 0 <= v <= MAX_INTEGER for v in point.values()) \
            or point_key(point) != value:
        return f"must be a request point as the store writes it (like '{{\"K\":1024,\"T\":16}}'), not {value!r}"
    return None


def merge(store: Store, rows: list[Row], path: Path) -> int:
    """Add the rows the store lacks, all in one transaction; the number added."""
    added = 0
    with store.transaction():
        env_ids = _check_references(store, rows, path)
        for row in sorted(rows, key=lambda r: (TABLES.index(r.table), r.lineno)):
            values = dict(row.values)
            if ENVIRONMENT in values:
                values[ENVIRONMENT] = env_ids[values[ENVIRONMENT]]
            names = [name for name in imported_columns(row.table) if name in values]
            try:
                cur = store.db.execute(f"INSERT OR IGNORE INTO {row.table} ({', '.join(names)}) "
                                       f"VALUES ({', '.join('?' * len(names))})", [values[n] for n in names])
            except sqlite3.Error as e:
                raise DoolyError(f"{path}: line {row.lineno}: the store refused it ({e})") from None
            added += cur.rowcount
            if row.table == "environments":
                env_ids[values["name"]] = store.db.execute("SELECT id FROM environments WHERE name = ?",
                                                           (values["name"],)).fetchone()[0]
    store._env_cache.clear()
    return added


def _check_references(store: Store, rows: list[Row], path: Path) -> dict[str, int | None]:
    """Refuse rows naming an environment or signature that neither the store nor the file has, and environments
    the store has with other settings (their measurements would be filed under another machine). Returns the
    stored environments' ids by name."""
    stored = {r["name"]: r for r in store.db.execute("SELECT * FROM environments")}
    env_ids: dict[str, int | None] = {name: r["id"] for name, r in stored.items()}
    settings = {name: tuple(r[s] for s in ENVIRONMENT_SETTINGS) for name, r in stored.items()}
    hashes = {r[0] for r in store.db.execute("SELECT hash FROM signatures")}
    for row in rows:
        if row.table == "environments":
            name, mine = row.values["name"], tuple(row.values[s] for s in ENVIRONMENT_SETTINGS)
            if settings.setdefault(name, mine) != mine:
                raise DoolyError(f"{path}: line {row.lineno}: environment {name!r} is already in the store or the "
                                 f"file with other settings")
            env_ids.setdefault(name, None)
        elif row.table == "signatures":
            hashes.add(row.values["hash"])
    for row in rows:
        if row.values.get(ENVIRONMENT) is not None and row.values[ENVIRONMENT] not in env_ids:
            raise DoolyError(f"{path}: line {row.lineno} names unknown environment {row.values[ENVIRONMENT]!r}")
        if row.table != "signatures" and "signature" in row.values and row.values["signature"] not in hashes:
            raise DoolyError(f"{path}: line {row.lineno} names unknown signature {row.values['signature']!r}")
    return env_ids
