"""Llama 3 pretraining with softmax or softplus ("compressed") attention, and deployment."""

from llama3.model import ConfigError, ModelArgs, StaticKVCache, Transformer, heuristic_core_dim
from llama3.ops import softplus_attention

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ModelArgs", "StaticKVCache", "Transformer", "heuristic_core_dim",
    "load_checkpoint", "softplus_attention",
]


def load_checkpoint(path, device="cpu"):
    """A ready model (eval mode) from anything ``train``, ``multitrain`` or ``import_meta`` wrote."""
    from llama3.checkpoint import load_model

    return load_model(path, device=device)
