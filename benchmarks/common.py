"""Shared pieces of the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama3.fileio import write_json
from llama3.reporting import environment, format_table

__all__ = ["RESULTS_DIR", "environment", "format_table", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(path: str | Path, rows: Sequence[dict[str, Any]], **meta: Any) -> Path:
    """Write ``{"environment": ..., **meta, "rows": rows}`` as JSON; returns the path."""
    return write_json(path, {"environment": environment(), **meta, "rows": list(rows)})
