"""Parameter counts per component and training FLOPs per token (for MFU and the model summary)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llama3.model.args import ModelArgs

COMPONENTS = ("embedding", "attention", "mixer", "norms", "output")


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of each component of a :class:`~llama3.model.transformer.Transformer`, and the
    total."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        counts[_component(name)] += p.numel()
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    return counts


def _component(name: str) -> str:
    if name.startswith("tok_embeddings."):
        return "embedding"
    if name.startswith("output."):
        return "output"
    if ".attention." in name:
        return "attention"
    if ".feed_forward." in name:
        return "mixer"
    if name.endswith("norm.weight"):
        return "norms"
    raise KeyError(f"parameter {name!r} belongs to no known component")


@dataclass(frozen=True)
class FlopCount:
    """Floating-point operations per token, forward + backward (3× forward)."""

    dense: float  # every matmul with a weight: projections, mixer, output
    attention: float  # the score and value products, counting only the causal half

    @property
    def total(self) -> float:
        return self.dense + self.attention


def matmul_weights(args: ModelArgs) -> int:
    """Weights that take part in a matmul per token (everything but the embedding and norms)."""
    d = args.dim
    if args.attention == "softmax":
        attention = d * args.n_heads * args.head_dim * 2 + d * args.n_kv_heads * args.head_dim * 2
    else:
        attention = 4 * d * args.core_dim
    mixer = 3 * d * args.hidden_dim if args.mixer == "swiglu" else 2 * d * d
    return args.n_layers * (attention + mixer) + d * args.vocab_size


def training_flops_per_token(args: ModelArgs, seq_len: int) -> FlopCount:
    """FLOPs to train on one token of a causal sequence of ``seq_len`` (backward = 2× forward).

    A token attends on average to (seq_len + 1) / 2 keys; per key the score product and the value
    product each cost 2·width FLOPs, width = n_heads·head_dim (softmax) or core_dim (softplus).
    """
    width = args.n_heads * args.head_dim if args.attention == "softmax" else args.core_dim
    dense = 2.0 * matmul_weights(args)
    attention = args.n_layers * 2 * 2.0 * width * (seq_len + 1) / 2
    return FlopCount(dense=3 * dense, attention=3 * attention)


def model_summary(model: nn.Module, seq_len: int) -> str:
    """A few lines describing the model's shape, parameters and training cost per token."""
    a: ModelArgs = model.args
    counts = parameter_counts(model)
    flops = training_flops_per_token(a, seq_len)
    if a.attention == "softmax":
        attn = f"softmax, {a.n_heads} heads ({a.n_kv_heads} kv), head_dim {a.head_dim}"
    else:
        attn = (
            f"softplus, core_dim {a.core_dim}, scale {a.softplus_scale}, output × "
            f"{a.core_output_multiplier:.4g} ({a.core_output_scale})"
        )
    parts = ", ".join(f"{c} {counts[c]:,}" for c in COMPONENTS)
    return "\n".join(
        [
            f"Llama 3: {a.n_layers} layers, dim {a.dim}, vocab {a.vocab_size}; attention {attn}; "
            f"mixer {a.mixer}; init {a.init}",
            f"parameters: {counts['total']:,} ({parts})",
            f"training FLOPs/token at seq {seq_len}: {flops.total / 1e6:.2f} M "
            f"(dense {flops.dense / 1e6:.2f} M, attention {flops.attention / 1e6:.2f} M)",
        ]
    )
