"""The public softplus attention operator: input checks and dispatch to an implementation."""

from __future__ import annotations

from torch import Tensor

from llama3.ops.reference import SCALES, softplus_attention_reference


def check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: str, kv_len: Tensor | None) -> None:
    """Raise ValueError naming the offending argument for anything the operator does not support."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"softplus_attention expects q (B, S, r), k and v (B, r, T); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, S, r = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != r:
        raise ValueError(
            f"k and v must both be (B={B}, r={r}, T); got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if r % 8:
        raise ValueError(f"core width r must be a multiple of 8, got r={r}")
    if k.shape[2] < S:
        raise ValueError(f"keys T={k.shape[2]} must be at least the queries S={S}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device; got {q.device}, {k.device}, {v.device}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if kv_len is not None and (kv_len.dim() != 1 or kv_len.shape[0] != B):
        raise ValueError(f"kv_len must have shape (B={B},), got {tuple(kv_len.shape)}")


def softplus_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: str = "length", kv_len: Tensor | None = None
) -> Tensor:
    """Causal softplus attention; see :mod:`llama3.ops.reference` for the definition and layouts.

    q (B, S, r); k, v (B, r, T) with T ≥ S; optional kv_len (B,) of valid keys per batch row.
    Returns (B, S, r) in q's dtype.
    """
    check_inputs(q, k, v, scale, kv_len)
    return softplus_attention_reference(q, k, v, scale, kv_len)
