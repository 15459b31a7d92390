"""Meta's Llama 3 checkpoint format → ours (softmax variant): ``params.json`` fields and the
model-parallel shards of ``consolidated.*.pth``.

Parameter names already match (``layers.N.attention.wq.weight`` …); what differs is the sharding.
Llama 3's ``llama/model.py`` builds its layers from fairscale's model-parallel modules, each of
which keeps one slice of its weight per rank:

* ``VocabParallelEmbedding`` (tok_embeddings): rows, i.e. the vocabulary (dim 0);
* ``ColumnParallelLinear`` (wq, wk, wv, w1, w3, output): output rows (dim 0);
* ``RowParallelLinear`` (wo, w2): input columns (dim 1);
* RMSNorm weights are plain parameters, the same on every rank.

(Llama 2 built the embedding with ``ParallelEmbedding``, split along its features instead.)
"""

from __future__ import annotations

from typing import Any

import torch

from llama3.model.args import ConfigError, ModelArgs

PARAMS_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
)
IGNORED_KEYS = ("rope.freqs",)  # a precomputed table in some releases; we compute RoPE ourselves
_ROW_SPLIT = (
    "tok_embeddings.weight",
    ".wq.weight",
    ".wk.weight",
    ".wv.weight",
    ".w1.weight",
    ".w3.weight",
    "output.weight",
)
_COLUMN_SPLIT = (".wo.weight", ".w2.weight")


def model_args_from_params(params: dict[str, Any], max_seq_len: int = 8192) -> ModelArgs:
    """ModelArgs for Meta's ``params.json`` (softmax attention, SwiGLU)."""
    missing = [f for f in ("dim", "n_layers", "n_heads", "vocab_size") if f not in params]
    if missing:
        raise ConfigError(f"params.json lacks {', '.join(missing)}")
    values = {k: params[k] for k in PARAMS_FIELDS if k in params and params[k] is not None}
    if values.get("vocab_size", 0) <= 0:
        raise ConfigError("params.json has vocab_size -1: set it to the tokenizer's size")
    return ModelArgs(attention="softmax", mixer="swiglu", max_seq_len=max_seq_len, **values)


def shard_axis(name: str) -> int | None:
    """The axis along which Meta's model parallelism splits parameter ``name`` (None:
    replicated)."""
    if name.endswith(_ROW_SPLIT):
        return 0
    if name.endswith(_COLUMN_SPLIT):
        return 1
    return None


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel shards (``consolidated.00.pth``, ``.01`` …, in
    order)."""
    if not shards:
        raise ConfigError("no consolidated.*.pth shards given")
    names = [k for k in shards[0] if k not in IGNORED_KEYS]
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) - set(IGNORED_KEYS) != set(names):
            raise ConfigError(f"shard {i} holds different parameter names than shard 0")
    merged = {}
    for name in names:
        axis = shard_axis(name)
        parts = [shard[name] for shard in shards]
        merged[name] = parts[0] if axis is None or len(parts) == 1 else torch.cat(parts, dim=axis)
    return merged
