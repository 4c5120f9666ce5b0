"""Schema migrations: numbered SQL files per dialect, applied once each, tracked in schema_version.

Files live in vigil_gateway/migrations/<dialect>/NNNN_name.sql. Each pending file runs in its own
transaction together with the row recording it, so a failed migration leaves nothing half-applied.
"""
from __future__ import annotations

import pathlib
import re

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

SCHEMA_VERSION_DDL = ("CREATE TABLE IF NOT EXISTS schema_version ("
                      "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)")


def migration_files(dialect: str) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) in order, for dialect 'sqlite' or 'postgresql'."""
    folder = MIGRATIONS / dialect
    out = []
    for path in sorted(folder.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"badly named migration {path}")
        out.append((int(m.group(1)), path.name, path.read_text()))
    versions = [v for v, _, _ in out]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"{dialect} migrations must be numbered 0001.. without gaps: {versions}")
    return out
