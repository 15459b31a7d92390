"""How Meta's Llama 3 model-parallel ranks hold each weight, transcribed from the layers its
``llama/model.py`` uses (fairscale's ``fairscale/nn/model_parallel/layers.py``) independently of
``llama3.model.meta``, so the import is checked against Meta's layout rather than against itself.

Each fairscale layer builds the full ("master") weight, splits it with ``torch.split`` into equal
parts along its partition dimension and keeps part ``rank``.
"""

from __future__ import annotations

import torch

# The module each parameter belongs to in Llama 3's model.py → its fairscale layer.
LAYERS = {
    "tok_embeddings": "VocabParallelEmbedding",
    "wq": "ColumnParallelLinear",
    "wk": "ColumnParallelLinear",
    "wv": "ColumnParallelLinear",
    "wo": "RowParallelLinear",
    "w1": "ColumnParallelLinear",
    "w2": "RowParallelLinear",
    "w3": "ColumnParallelLinear",
    "output": "ColumnParallelLinear",
}
# The partition_dim each layer passes to _initialize_affine_weight (weights are (out, in)).
PARTITION_DIM = {"VocabParallelEmbedding": 0, "ColumnParallelLinear": 0, "RowParallelLinear": 1}


def fairscale_shards(
    state: dict[str, torch.Tensor], world_size: int
) -> list[dict[str, torch.Tensor]]:
    """The state dict of each of ``world_size`` ranks (RMSNorm weights are plain, replicated)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(world_size)]
    for name, master in state.items():
        layer = LAYERS.get(name.split(".")[-2])
        for rank, shard in enumerate(shards):
            if layer is None:
                shard[name] = master.clone()
                continue
            dim = PARTITION_DIM[layer]
            assert master.shape[dim] % world_size == 0, f"{name}: fairscale needs equal parts"
            per_partition = master.shape[dim] // world_size
            shard[name] = torch.split(master, per_partition, dim=dim)[rank].clone()
    return shards
