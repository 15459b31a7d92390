"""Custom operators: softplus attention."""

from llama3.ops.reference import softplus_attention_reference
from llama3.ops.softplus_attention import softplus_attention

__all__ = ["softplus_attention", "softplus_attention_reference"]
