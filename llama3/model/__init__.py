"""The Llama 3 model: configuration, modules and accounting."""

from llama3.model.accounting import model_summary, parameter_counts, training_flops_per_token
from llama3.model.args import ConfigError, ModelArgs, heuristic_core_dim
from llama3.model.transformer import StaticKVCache, Transformer

__all__ = [
    "ConfigError", "ModelArgs", "StaticKVCache", "Transformer", "heuristic_core_dim",
    "model_summary", "parameter_counts", "training_flops_per_token",
]
