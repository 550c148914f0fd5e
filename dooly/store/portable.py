"""A store as JSON lines, for sharing: export everything, import by merging (nothing is ever deleted).

The first line names the format; each further line is one row: `{"table": ..., "row": {...}}`, environments by
name, so rows move between stores whose environment ids differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DoolyError
from .db import Store
from .schema import SCHEMA_VERSION, TABLES

FORMAT = "dooly-store"


def export(store: Store, path: Path) -> int:
    names = {r["id"]: r["name"] for r in store.db.execute("SELECT id, name FROM environments")}
    n = 0
    with open(path, "w") as f:
        f.write(json.dumps({"format": FORMAT, "schema": SCHEMA_VERSION}) + "\n")
        for table in TABLES:
            for row in store.db.execute(f"SELECT * FROM {table}"):
                row = dict(row)
                row.pop("id", None)
                if "environment" in row:
                    row["environment"] = names[row["environment"]]
                f.write(json.dumps({"table": table, "row": row}, sort_keys=True) + "\n")
                n += 1
    return n


def import_(store: Store, path: Path) -> int:
    try:
        lines = Path(path).read_text().splitlines()
        head = json.loads(lines[0]) if lines else {}
    except (OSError, json.JSONDecodeError) as e:
        raise DoolyError(f"{path}: not a Dooly store export ({e})") from None
    if head.get("format") != FORMAT:
        raise DoolyError(f"{path}: not a Dooly store export (first line: {lines[0][:60] if lines else ''!r})")
    if head.get("schema", 0) > SCHEMA_VERSION:
        raise DoolyError(f"{path}: exported from schema {head['schema']}, newer than this Dooly ({SCHEMA_VERSION})")
    ids = {}
    n = 0
    with store.transaction():
        for lineno, line in enumerate(lines[1:], 2):
            try:
                item = json.loads(line)
                table, row = item["table"], item["row"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DoolyError(f"{path}: line {lineno} is not a store row") from None
            if table not in TABLES:
                raise DoolyError(f"{path}: line {lineno}: unknown table {table!r}")
            if "environment" in row:
                if row["environment"] not in ids:
                    found = store.db.execute("SELECT id FROM environments WHERE name = ?",
                                             (row["environment"],)).fetchone()
                    if found is None:
                        raise DoolyError(f"{path}: line {lineno} names unknown environment {row['environment']!r}")
                    ids[row["environment"]] = found[0]
                row = {**row, "environment": ids[row["environment"]]}
            cols = ", ".join(row)
            cur = store.db.execute(f"INSERT OR IGNORE INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))})",
                                   tuple(row.values()))
            n += cur.rowcount
    store._env_cache.clear()
    return n
