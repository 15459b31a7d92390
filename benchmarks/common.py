"""Shared pieces of the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama3.fileio import write_json
from llama3.reporting import environment, format_table

__all__ = ["BASE", "CONFIGS", "RESULTS_DIR", "TINY_BASE", "TINY_CONFIGS", "environment",
           "format_table", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The original's comparison: 3 layers, dim 128, vocabulary 2048; softmax with 4 heads against
# softplus at core widths 128 and 424. The tiny variants run on a CPU.
BASE = dict(n_layers=3, dim=128, vocab_size=2048)
CONFIGS = {
    "softmax": dict(attention="softmax", n_heads=4),
    "softplus-128": dict(attention="softplus", core_dim=128),
    "softplus-424": dict(attention="softplus", core_dim=424),
}
TINY_BASE = dict(n_layers=2, dim=32, vocab_size=128)
TINY_CONFIGS = {
    "softmax": dict(attention="softmax", n_heads=4),
    "softplus-16": dict(attention="softplus", core_dim=16),
    "softplus-40": dict(attention="softplus", core_dim=40),
}


def write_results(path: str | Path, rows: Sequence[dict[str, Any]], **meta: Any) -> Path:
    """Write ``{"environment": ..., **meta, "rows": rows}`` as JSON; returns the path."""
    return write_json(path, {"environment": environment(), **meta, "rows": list(rows)})
