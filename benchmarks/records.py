"""Benchmark rows kept as JSON lines: a rerun finds the rows already measured and skips them."""

from __future__ import annotations

import json
from pathlib import Path


def load_rows(path: Path | None) -> list[dict]:
    """The rows in `path` (none when it is None or missing)."""
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_row(rows: list[dict], key: dict) -> dict | None:
    """The first row whose fields include all of `key`."""
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def append_row(path: Path | None, row: dict) -> None:
    if path is not None:
        with path.open("a") as out:
            out.write(json.dumps(row) + "\n")
