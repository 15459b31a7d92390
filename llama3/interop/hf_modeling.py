"""Hugging Face modelling code for llama3 models that ``transformers`` has no class for: softplus
("compressed") attention, and the Combinator mixer with either attention.

``python -m llama3 export_hf`` copies this file into the exported directory and registers it in
``config.json`` (``auto_map``), so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it. It depends on torch
and transformers only and restates the llama3 model (see the project's
``llama3/model/transformer.py``) in transformers' conventions: parameter names of its Llama, a
``Cache`` for ``generate()``, left padding through ``attention_mask``. Unlike its Llama, queries
and keys keep Meta's RoPE layout (adjacent feature pairs rotate together).

Softplus attention, for a query at position p and its visible keys j (causal, not padding)::

    λ = log(p + 1) / sqrt(r)   (scale "length"; "constant": 1 / sqrt(r))
    w_j = softplus(λ · ⟨q, k_j⟩),   out = Σ_j w_j v_j / Σ_j w_j

It runs as the dense formula here, or through the llama3 package's Triton kernels when that
package is importable, the tensors are on CUDA and no row is padded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # optional: the Triton kernels of the llama3 package
    from llama3.ops import softplus_attention as _softplus_kernel
except Exception:  # noqa: BLE001 - without them the dense formula runs
    _softplus_kernel = None

# Llama 3.1 RoPE frequency rule (use_scaled_rope): factor, low and high frequency factors, context.
_ROPE_SCALE, _ROPE_LOW, _ROPE_HIGH, _ROPE_CONTEXT = 8.0, 1.0, 4.0, 8192
# The output field holding the cache: "cache" in newer transformers, "past_key_values" before.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class Llama3SoftplusConfig(PretrainedConfig):
    """The llama3 model arguments, under transformers' names where it has them."""

    model_type = "llama3_softplus"

    def __init__(
        self,
        vocab_size: int = 2048,
        hidden_size: int = 128,
        num_hidden_layers: int = 3,
        attention: str = "softplus",
        mixer: str = "combinator",
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        core_dim: int = 424,
        softplus_scale: str = "length",
        core_output_scale: str = "none",
        intermediate_size: int = 512,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        use_scaled_rope: bool = False,
        max_position_embeddings: int = 4096,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.attention, self.mixer = num_hidden_layers, attention, mixer
        self.core_dim, self.softplus_scale = core_dim, softplus_scale
        self.core_output_scale = core_output_scale  # absent from directories written before it
        self.num_attention_heads, self.num_key_value_heads = (
            num_attention_heads,
            num_key_value_heads,
        )
        self.intermediate_size, self.rms_norm_eps = intermediate_size, rms_norm_eps
        self.rope_theta, self.use_scaled_rope = rope_theta, use_scaled_rope
        self.max_position_embeddings, self.use_cache = max_position_embeddings, use_cache
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


def rope_frequencies(dim: int, theta: float, scaled: bool) -> Tensor:
    """Inverse frequencies (dim/2,), with the Llama 3.1 rule if ``scaled``."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    if not scaled:
        return freqs
    wavelen = 2 * math.pi / freqs
    smooth = (_ROPE_CONTEXT / wavelen - _ROPE_LOW) / (_ROPE_HIGH - _ROPE_LOW)
    blended = (1 - smooth) * freqs / _ROPE_SCALE + smooth * freqs
    scaled_freqs = torch.where(wavelen > _ROPE_CONTEXT / _ROPE_LOW, freqs / _ROPE_SCALE, blended)
    return torch.where(wavelen < _ROPE_CONTEXT / _ROPE_HIGH, freqs, scaled_freqs)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent feature pairs of x (B, H, S, d) by angles whose cos/sin are
    (B, 1, S, d/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def kernel_applies(q: Tensor) -> bool:
    """Whether the llama3 package's Triton kernels run: importable, and the tensors on CUDA."""
    return _softplus_kernel is not None and q.is_cuda


def softplus_dense(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, visible: Tensor, scale: str
) -> Tensor:
    """q (B, 1, S, r); k, v (B, 1, T, r); positions (B, S); visible (B|1, 1, S, T)
    → (B, 1, S, r)."""
    r = q.shape[-1]
    lam = (
        torch.log(positions.float() + 1)
        if scale == "length"
        else torch.ones_like(positions.float())
    )
    lam = (lam / math.sqrt(r))[:, None, :, None]  # (B, 1, S, 1)
    z = lam * torch.matmul(q.float(), k.float().transpose(-1, -2))  # (B, 1, S, T)
    w = torch.where(visible, F.softplus(z), torch.zeros_like(z))
    return (torch.matmul(w, v.float()) / w.sum(-1, keepdim=True)).to(q.dtype)


class Llama3SoftplusRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def output_multiplier(config: Llama3SoftplusConfig) -> float:
    """Factor on the softplus core's output before o_proj: min(1, hidden_size / core_dim) for
    "width", 1 for "none", else the number given."""
    scale = config.core_output_scale
    if scale == "width":
        return min(1.0, config.hidden_size / config.core_dim)
    return 1.0 if scale == "none" else float(scale)


class Llama3SoftplusAttention(nn.Module):
    """Softplus attention (one core of width r, as one head) or grouped-query softmax attention."""

    def __init__(self, config: Llama3SoftplusConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.scale = layer_idx, config.softplus_scale
        self.softplus = config.attention == "softplus"
        self.heads = 1 if self.softplus else config.num_attention_heads
        self.kv_heads = 1 if self.softplus else config.num_key_value_heads
        self.head_dim = config.core_dim if self.softplus else config.hidden_size // self.heads
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dim, bias=False)
        self.output_multiplier = output_multiplier(config) if self.softplus else 1.0

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        visible: Tensor | None,
        cache: DynamicCache | None,
    ) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, T, hd)
        if self.softplus:
            out = self._softplus(q, k, v, positions, visible)
        else:
            out = self._softmax(q, k, v, visible)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1) * self.output_multiplier)

    def _softplus(
        self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, visible: Tensor | None
    ) -> Tensor:
        if visible is None and kernel_applies(q):
            # the kernel's layouts: q (B, S, r), k and v (B, r, T)
            out = _softplus_kernel(
                q[:, 0], k[:, 0].transpose(1, 2), v[:, 0].transpose(1, 2), scale=self.scale
            )
            return out.unsqueeze(1)
        if visible is None:
            visible = causal_visibility(None, q.shape[2], k.shape[2], q.device)
        return softplus_dense(q, k, v, positions, visible, self.scale)

    def _softmax(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None) -> Tensor:
        if self.heads != self.kv_heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if visible is None and q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if visible is None:
            visible = causal_visibility(None, q.shape[2], k.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


class Llama3SoftplusMLP(nn.Module):
    """SwiGLU, down(silu(gate x) ⊙ up x), or the Combinator, (up x) ⊙ silu(gate x) with no down."""

    def __init__(self, config: Llama3SoftplusConfig):
        super().__init__()
        dim = config.hidden_size
        hidden = dim if config.mixer == "combinator" else config.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = (
            None if config.mixer == "combinator" else nn.Linear(hidden, dim, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.up_proj(x) * F.silu(self.gate_proj(x))
        return h if self.down_proj is None else self.down_proj(h)


class Llama3SoftplusDecoderLayer(nn.Module):
    def __init__(self, config: Llama3SoftplusConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Llama3SoftplusAttention(config, layer_idx)
        self.mlp = Llama3SoftplusMLP(config)
        self.input_layernorm = Llama3SoftplusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Llama3SoftplusRMSNorm(
            config.hidden_size, config.rms_norm_eps
        )

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        visible: Tensor | None,
        cache: DynamicCache | None,
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, visible, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_visibility(
    attention_mask: Tensor | None, S: int, T: int, device: torch.device
) -> Tensor:
    """(B|1, 1, S, T) bool: the S newest of T positions see earlier keys that are not padding, and
    always themselves (so padded rows stay finite)."""
    query = torch.arange(T - S, T, device=device).view(-1, 1)
    keys = torch.arange(T, device=device).view(1, -1)
    visible = (keys <= query)[None, None]
    if attention_mask is None:
        return visible
    real = attention_mask[:, -T:].bool()[:, None, None, :]
    return (visible & real) | (keys == query)[None, None]


class Llama3SoftplusPreTrainedModel(PreTrainedModel):
    config_class = Llama3SoftplusConfig
    base_model_prefix = "model"
    _no_split_modules = ["Llama3SoftplusDecoderLayer"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """N(0, 0.02) projections and embedding, unit norms; weights transformers has loaded (and
        flagged) are left alone."""
        if getattr(getattr(module, "weight", None), "_is_hf_initialized", False):
            return
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=0.02)
        elif isinstance(module, Llama3SoftplusRMSNorm):
            module.weight.fill_(1.0)


class Llama3SoftplusModel(Llama3SoftplusPreTrainedModel):
    def __init__(self, config: Llama3SoftplusConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Llama3SoftplusDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Llama3SoftplusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope_dim = (
            config.core_dim
            if config.attention == "softplus"
            else config.hidden_size // config.num_attention_heads
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        cache: DynamicCache | None,
        inputs_embeds: Tensor | None,
    ) -> Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = h.shape[:2]
        T = S + (cache.get_seq_length() if cache is not None else 0)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
            else:
                position_ids = torch.arange(T - S, T, device=h.device).unsqueeze(0)
        padded = attention_mask is not None and not bool(attention_mask[:, -T:].all())
        visible = causal_visibility(attention_mask, S, T, h.device) if padded else None
        freqs = rope_frequencies(self.rope_dim, self.config.rope_theta, self.config.use_scaled_rope)
        angles = position_ids.float().unsqueeze(-1) * freqs.to(h.device)  # (B|1, S, d/2)
        cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
        positions = position_ids.expand(B, S)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, visible, cache)
        return self.norm(h)


class Llama3SoftplusForCausalLM(Llama3SoftplusPreTrainedModel, GenerationMixin):
    def __init__(self, config: Llama3SoftplusConfig):
        super().__init__(config)
        self.model = Llama3SoftplusModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: DynamicCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        h = self.model(
            input_ids, attention_mask, position_ids, cache if use_cache else None, inputs_embeds
        )
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None}
        )
