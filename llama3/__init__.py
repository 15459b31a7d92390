"""Llama 3 pretraining with softmax or softplus ("compressed") attention, and deployment.

The public names are imported on first use, so commands that never touch a model (``preprocess``,
``train_tokenizer``, ``--help``) start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → (module, attribute)
_EXPORTS = {
    "ConfigError": ("llama3.errors", "ConfigError"),
    "ModelArgs": ("llama3.model.args", "ModelArgs"),
    "heuristic_core_dim": ("llama3.model.args", "heuristic_core_dim"),
    "StaticKVCache": ("llama3.model.transformer", "StaticKVCache"),
    "Transformer": ("llama3.model.transformer", "Transformer"),
    "softplus_attention": ("llama3.ops", "softplus_attention"),
    # a ready model (eval mode) from anything train, multitrain or import_meta wrote
    "load_checkpoint": ("llama3.checkpoint", "load_model"),
    "Generator": ("llama3.generate", "Generator"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama3' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
