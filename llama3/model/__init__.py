"""The Llama 3 model: configuration, modules and accounting (imported on first use)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "llama3.errors",
    "ModelArgs": "llama3.model.args",
    "heuristic_core_dim": "llama3.model.args",
    "StaticKVCache": "llama3.model.transformer",
    "Transformer": "llama3.model.transformer",
    "model_summary": "llama3.model.accounting",
    "parameter_counts": "llama3.model.accounting",
    "training_flops_per_token": "llama3.model.accounting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama3.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
