"""Plain PyTorch reference of softplus attention: the ground truth, the CPU path and the ONNX form.

Layouts: q (B, S, r); k, v (B, r, T), feature-major so a key cache grows along its last axis.
The first C = T − S keys are cached context; query row i sits at absolute position C + i and sees
keys j ≤ C + i, n_i = C + i + 1 of them::

    λ_i  = log(n_i) / sqrt(r)        (scale="length")   or   1 / sqrt(r)   (scale="constant")
    z_ij = λ_i · ⟨q_i, k_j⟩           for visible j
    w_ij = softplus(z_ij)
    o_i  = Σ_j w_ij · v_j / Σ_j w_ij

``kv_len`` (B,) optionally says how many leading keys of each batch row are valid (a pre-allocated
cache of capacity T holding kv_len[b] keys); then C_b = kv_len[b] − S and keys ≥ kv_len[b] are
invisible. All arithmetic is fp32; the output has q's dtype. This materialises the S×T matrix, and
builds the causal mask from ``arange`` so that ONNX export turns it into Range, comparison and Where
nodes that any runtime can execute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SCALES = ("length", "constant")


def query_positions(S: int, T: int, kv_len: Tensor | None, device: torch.device) -> Tensor:
    """Absolute position C + i of every query row: (1, S) without ``kv_len``, else (B, S)."""
    i = torch.arange(S, device=device)
    if kv_len is None:
        return (i + (T - S)).unsqueeze(0)
    return (kv_len.to(device=device, dtype=torch.long) - S).unsqueeze(1) + i.unsqueeze(0)


def row_scale(positions: Tensor, r: int, scale: str) -> Tensor:
    """λ_i for each query row, fp32, same shape as ``positions``."""
    if scale == "constant":
        return torch.full(positions.shape, 1.0 / math.sqrt(r), device=positions.device)
    return torch.log((positions + 1).to(torch.float32)) / math.sqrt(r)


def scores(
    q: Tensor, k: Tensor, scale: str, kv_len: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """λ (1|B, S, 1), z (B, S, T) in fp32 and the causal visibility mask (1|B, S, T)."""
    S, r, T = q.shape[1], q.shape[2], k.shape[2]
    pos = query_positions(S, T, kv_len, q.device)  # (1|B, S)
    lam = row_scale(pos, r, scale).unsqueeze(-1)  # (1|B, S, 1)
    visible = torch.arange(T, device=q.device).view(1, 1, T) <= pos.unsqueeze(-1)
    return lam, lam * torch.matmul(q.float(), k.float()), visible


def reference_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: str = "length", kv_len: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The output (B, S, r) in q's dtype and l = Σ_j w_ij (B, S) in fp32."""
    _, z, visible = scores(q, k, scale, kv_len)
    w = torch.where(visible, F.softplus(z), torch.zeros_like(z))  # (B, S, T)
    l = w.sum(dim=-1)  # (B, S)
    o = torch.matmul(w, v.float().transpose(1, 2)) / l.unsqueeze(-1)  # (B, S, r)
    return o.to(q.dtype), l


def softplus_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, scale: str = "length", kv_len: Tensor | None = None
) -> Tensor:
    """Softplus attention by its definition; differentiable by autograd. Returns (B, S, r)."""
    return reference_forward(q, k, v, scale, kv_len)[0]


def reference_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    l: Tensor,
    scale: str = "length",
    kv_len: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv by the backward formulas, given the output o and l = Σ_j softplus(z_ij), in the
    layouts and dtypes of q, k, v (the CPU path of the custom op)::

        p_ij = w_ij / l_i,   D_i = ⟨dO_i, o_i⟩,   dz_ij = (⟨dO_i, v_j⟩ − D_i) σ(z_ij) / l_i
        dq_i = λ_i Σ_j dz_ij k_j,   dk_j = Σ_i λ_i dz_ij q_i,   dv_j = Σ_i p_ij dO_i
    """
    lam, z, visible = scores(q, k, scale, kv_len)
    do, inv_l = do.float(), 1.0 / l.unsqueeze(-1)  # (B, S, r), (B, S, 1)
    p = torch.where(visible, F.softplus(z), 0.0) * inv_l
    sig = torch.where(visible, torch.sigmoid(z), 0.0)
    delta = (do * o.float()).sum(-1, keepdim=True)  # (B, S, 1)
    dz = (torch.matmul(do, v.float()) - delta) * inv_l * sig  # (B, S, T)
    dq = lam * torch.matmul(dz, k.float().transpose(1, 2))  # (B, S, r)
    dk = torch.matmul(q.float().transpose(1, 2), lam * dz)  # (B, r, T)
    dv = torch.matmul(do.transpose(1, 2), p)  # (B, r, T)
    return (
        torch.empty_like(q).copy_(dq),
        torch.empty_like(k).copy_(dk),
        torch.empty_like(v).copy_(dv),
    )
