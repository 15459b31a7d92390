"""Llama 3 decoder with swappable attention (softmax | softplus) and mixer (SwiGLU | Combinator).

Single-device code: no parallelism, no I/O. Parameter names follow Meta's ``llama/model.py`` so its
``consolidated.*.pth`` loads into the softmax variant unchanged.

Three call forms share one forward:

* ``model(tokens)`` → logits (B, S, vocab): training and evaluation, creates no cache tensors.
* ``model(tokens, k_cache, v_cache)`` → ``(logits, k_cache', v_cache')``: the export form. Caches
  hold all layers — softmax (n_layers, B, C, n_kv_heads, head_dim), softplus (n_layers, B, r, C) —
  and the returned ones are the inputs with this call's S positions appended.
* ``model(tokens, cache=StaticKVCache)``: generation over pre-allocated buffers. Row b writes its S
  new keys at positions ``cache.lengths[b] + 0..S-1`` and attends over ``cache.lengths[b] + S``
  keys. Shapes never change between steps, so a decode step can be captured in a CUDA graph. The
  caller advances ``cache.lengths``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3.model.args import ModelArgs
from llama3.ops import softplus_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# Llama 3.1 frequency rule for long contexts.
ROPE_SCALE_FACTOR = 8.0
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192


def rope_frequencies(dim: int, theta: float, use_scaled: bool) -> Tensor:
    """Inverse frequencies (dim/2,) of Meta's RoPE, with the Llama 3.1 rule applied if asked."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    if not use_scaled:
        return freqs
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR
    high_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR
    smooth = (ROPE_ORIGINAL_CONTEXT / wavelen - ROPE_LOW_FREQ_FACTOR) / (
        ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR
    )
    blended = (1 - smooth) * freqs / ROPE_SCALE_FACTOR + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / ROPE_SCALE_FACTOR, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given absolute positions, computed on the fly (any length,
    export-safe)."""

    def __init__(self, dim: int, theta: float, use_scaled: bool):
        super().__init__()
        self.dim, self.theta, self.use_scaled = dim, theta, use_scaled
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.inv_freq.device.type != "meta":
            freqs = rope_frequencies(self.dim, self.theta, self.use_scaled)
            self.inv_freq.copy_(freqs.to(self.inv_freq.device))

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (1|B, S) → cos, sin (1|B, S, dim/2) in fp32."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq
        return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent feature pairs (Meta's convention). x (..., d); cos/sin broadcast to
    (..., d/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def causal_mask(positions: Tensor, n_keys: int) -> Tensor:
    """Boolean (1|B, 1, S, T) mask: key j is visible to the query at absolute position p iff j ≤ p.

    With a static buffer this also hides the unwritten tail: p < lengths + S = kv_len.
    """
    keys = torch.arange(n_keys, device=positions.device)
    return keys.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1)


def cache_time_axis(args: ModelArgs) -> int:
    """Axis of the cache length: softmax (n_layers, B, T, n_kv_heads, head_dim), softplus
    (n_layers, B, r, T)."""
    return 2 if args.attention == "softmax" else 3


def cache_shape(args: ModelArgs, batch: int, length: int) -> tuple[int, ...]:
    """Shape of a cache of every layer holding ``length`` positions."""
    if args.attention == "softmax":
        return (args.n_layers, batch, length, args.n_kv_heads, args.head_dim)
    return (args.n_layers, batch, args.core_dim, length)


@dataclass
class StaticKVCache:
    """Pre-allocated keys and values for all layers, in the export-form layouts, plus valid
    lengths."""

    k: Tensor
    v: Tensor
    lengths: Tensor  # (B,) int64: keys already written per batch row

    @classmethod
    def allocate(
        cls,
        args: ModelArgs,
        batch_size: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> "StaticKVCache":
        # Zeros, not empty: masked keys still enter the matmuls of the reference path, and
        # 0·NaN = NaN.
        k = torch.zeros(cache_shape(args, batch_size, capacity), device=device, dtype=dtype)
        lengths = torch.zeros(batch_size, device=device, dtype=torch.long)
        return cls(k=k, v=torch.zeros_like(k), lengths=lengths)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.lengths.zero_()


@dataclass
class LayerKV:
    """What one attention layer gets besides its input: an export-form past, or a static buffer."""

    past_k: Tensor | None = None
    past_v: Tensor | None = None
    buf_k: Tensor | None = None
    buf_v: Tensor | None = None
    positions: Tensor | None = None  # (1|B, S) absolute positions of this call's queries
    kv_len: Tensor | None = None  # (B,) valid keys after this call (static buffers only)


class SoftmaxAttention(nn.Module):
    """Grouped-query attention through scaled_dot_product_attention; caches
    (B, T, n_kv, head_dim)."""

    time_axis = 1

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV | None) -> Tensor:
        """q (B, S, H, hd); k, v (B, T, Hkv, hd) → (B, S, H·hd)."""
        B, S = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, len, hd)
        n_rep = self.n_heads // self.n_kv_heads
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
        else:
            if n_rep > 1:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            mask = causal_mask(kv.positions, k.shape[2])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, S, -1)

    def output(self, attn: Tensor) -> Tensor:
        return self.wo(self.dropout(attn))


class SoftplusAttention(nn.Module):
    """Compressed attention: one core of width r for q, k, v; caches (B, r, T)."""

    time_axis = 2

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.core_dim, self.scale = args.core_dim, args.softplus_scale
        self.output_multiplier = args.core_output_multiplier
        self.wq = nn.Linear(args.dim, args.core_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.core_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.core_dim, bias=False)
        self.wo = nn.Linear(args.core_dim, args.dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q = apply_rotary(self.wq(x), cos, sin)  # (B, S, r)
        k = apply_rotary(self.wk(x), cos, sin).transpose(1, 2)  # (B, r, S)
        v = self.wv(x).transpose(1, 2)  # (B, r, S)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV | None) -> Tensor:
        kv_len = None if kv is None else kv.kv_len
        return softplus_attention(q, k, v, scale=self.scale, kv_len=kv_len)

    def output(self, attn: Tensor) -> Tensor:
        attn = self.dropout(attn)
        if self.output_multiplier != 1.0:
            attn = attn * self.output_multiplier
        return self.wo(attn)


def _with_cache(layer: nn.Module, k: Tensor, v: Tensor, kv: LayerKV) -> tuple[Tensor, Tensor]:
    """Keys/values to attend over: the past with k, v appended, or the static buffer written in
    place."""
    axis = layer.time_axis
    if kv.buf_k is None:
        return torch.cat((kv.past_k, k), dim=axis), torch.cat((kv.past_v, v), dim=axis)
    shape = [1] * k.dim()
    shape[0], shape[axis] = k.shape[0], k.shape[axis]
    index = kv.positions.view(shape).expand_as(k)
    kv.buf_k.scatter_(axis, index, k)
    kv.buf_v.scatter_(axis, index, v)
    return kv.buf_k, kv.buf_v


class SwiGLU(nn.Module):
    """Meta's feed-forward: w2(silu(w1 x) ⊙ w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Combinator(nn.Module):
    """No-bottleneck mixer: (x Aᵀ) ⊙ silu(x Bᵀ), with A, B ∈ ℝ^{dim×dim}."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wa = nn.Linear(args.dim, args.dim, bias=False)
        self.wb = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wa(x) * F.silu(self.wb(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        attention = SoftmaxAttention if args.attention == "softmax" else SoftplusAttention
        mixer = SwiGLU if args.mixer == "swiglu" else Combinator
        self.attention = attention(args)
        self.feed_forward = mixer(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv: LayerKV | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Returns the block output and, with a cache, the keys/values attended over."""
        q, k, v = self.attention.project(self.attention_norm(x), cos, sin)
        if kv is not None:
            k, v = _with_cache(self.attention, k, v, kv)
        h = x + self.attention.output(self.attention.attend(q, k, v, kv))
        out = h + self.feed_forward(self.ffn_norm(h))
        return (out, k, v) if kv is not None else (out, None, None)


# Projections whose output (alone or as a factor of a product) goes into the residual stream.
RESIDUAL_WRITERS = ("wo", "w2", "w3", "wa")


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.rope_dim, args.rope_theta, args.use_scaled_rope)

    @classmethod
    def build(
        cls,
        args: ModelArgs,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        init: bool = True,
    ) -> "Transformer":
        """Construct on ``meta``, materialise on ``device`` and (unless ``init=False``)
        initialise."""
        with torch.device("meta"):
            model = cls(args)
        model = model.to_empty(device=device)
        if dtype is not None:
            model = model.to(dtype)
        if init:
            model.init_weights()
        else:
            model.rope.reset_parameters()
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise by the scheme ``args.init`` names; ones for norms; recompute RoPE.

        Standard deviations of zero-mean normals, by scheme:

        * normal: 0.02 for every projection and the embedding;
        * fan_in: 1/sqrt(fan_in) for every projection (the output one included), 1 for the
          embedding;
        * depth: torchtitan's Llama scheme: 1 for the embedding; 0.02 for projections that read the
          residual stream, 0.02/sqrt(2(l+1)) in block l (0-based) for those whose product is
          written to it (``wo``; SwiGLU's ``w2``, ``w3``; the Combinator's ``wa``); 1/sqrt(dim) for
          the output projection; every normal but the embedding's truncated at 3 deviations.
        """
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
        for std, weight in self._initial_stds():
            if self.args.init == "depth" and weight is not self.tok_embeddings.weight:
                nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)
            else:
                nn.init.normal_(weight, std=std)
        self.rope.reset_parameters()

    def _initial_stds(self) -> list[tuple[float, Tensor]]:
        """(standard deviation, weight) of every projection and the embedding under args.init."""
        scheme, dim = self.args.init, self.args.dim
        if scheme == "normal":
            return [
                (0.02, m.weight) for m in self.modules() if isinstance(m, (nn.Linear, nn.Embedding))
            ]
        stds = [(1.0, self.tok_embeddings.weight), (dim**-0.5, self.output.weight)]
        for i, layer in enumerate(self.layers):
            for name, m in layer.named_modules():
                if not isinstance(m, nn.Linear):
                    continue
                if scheme == "fan_in":
                    stds.append((m.in_features**-0.5, m.weight))
                else:
                    writes = name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS
                    stds.append((0.02 / math.sqrt(2 * (i + 1)) if writes else 0.02, m.weight))
        return stds

    def forward(
        self,
        tokens: Tensor,
        k_cache: Tensor | None = None,
        v_cache: Tensor | None = None,
        *,
        cache: StaticKVCache | None = None,
    ):
        """See the module docstring for the three call forms. tokens (B, S) int64."""
        B, S = tokens.shape
        if (k_cache is None) != (v_cache is None):
            raise ValueError("pass both k_cache and v_cache, or neither")
        steps = torch.arange(S, device=tokens.device)
        if cache is not None:
            positions = cache.lengths.unsqueeze(1) + steps  # (B, S)
        elif k_cache is not None:
            positions = (steps + k_cache.shape[cache_time_axis(self.args)]).unsqueeze(0)
        else:
            positions = steps.unsqueeze(0)
        cos, sin = self.rope(positions)
        h = self.dropout(self.tok_embeddings(tokens))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = self._layer_kv(i, positions, k_cache, v_cache, cache, S)
            h, k, v = layer(h, cos, sin, kv)
            if k_cache is not None:
                new_k.append(k)
                new_v.append(v)
        logits = self.output(self.norm(h))
        if k_cache is not None:
            return logits, torch.stack(new_k), torch.stack(new_v)
        return logits

    @staticmethod
    def _layer_kv(
        i: int,
        positions: Tensor,
        k_cache: Tensor | None,
        v_cache: Tensor | None,
        cache: StaticKVCache | None,
        S: int,
    ) -> LayerKV | None:
        if cache is not None:
            return LayerKV(
                buf_k=cache.k[i], buf_v=cache.v[i], positions=positions, kv_len=cache.lengths + S
            )
        if k_cache is not None:
            return LayerKV(past_k=k_cache[i], past_v=v_cache[i], positions=positions)
        return None

    def empty_export_cache(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Zero-length export-form caches (the first call of the export form)."""
        k = torch.zeros(cache_shape(self.args, batch_size, 0), device=device, dtype=dtype)
        return k, torch.zeros_like(k)
