"""What every report records and how it prints: environment, Markdown tables."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

OPTIONAL_LIBRARIES = ("numpy", "triton", "sentencepiece", "onnx", "onnxruntime", "tensorrt")


def environment() -> dict[str, Any]:
    """Date, hardware and library versions (None for a library that is not installed)."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for name in OPTIONAL_LIBRARIES:
        try:
            info[name] = __import__(name).__version__
        except (ImportError, OSError, AttributeError):
            info[name] = None
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows``; floats with 4 significant digits, missing values empty."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
