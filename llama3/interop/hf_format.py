"""Our model ↔ Hugging Face directories: parameter names, the query/key permutation, config.json.

Two forms, chosen by the model's settings:

* ``llama``: softmax attention with SwiGLU is transformers' ``LlamaForCausalLM``. Its RoPE rotates
  the two halves of each head where Meta's (ours) rotates adjacent pairs, so the rows of wq and wk
  are permuted within each head; everything else is renamed only.
* ``remote``: softplus attention or the Combinator: the same names (the Combinator's A is
  ``mlp.up_proj``, B ``mlp.gate_proj``), no permutation, and the modelling code of
  :mod:`llama3.interop.hf_modeling`, registered through ``auto_map``.

``config.json`` of both also records our ModelArgs (``llama3_model_args``), so importing a
directory we exported restores them exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llama3.model.args import ModelArgs
from llama3.model.transformer import (
    ROPE_HIGH_FREQ_FACTOR,
    ROPE_LOW_FREQ_FACTOR,
    ROPE_ORIGINAL_CONTEXT,
    ROPE_SCALE_FACTOR,
    Transformer,
)

FORMATS = ("llama", "remote")
LLAMA_ARCHITECTURE = "LlamaForCausalLM"
REMOTE_MODEL_TYPE = "llama3_softplus"
REMOTE_ARCHITECTURE = "Llama3SoftplusForCausalLM"
REMOTE_CONFIG = "Llama3SoftplusConfig"
REMOTE_FILE = "modeling_llama3_softplus.py"  # the name hf_modeling.py gets in an exported directory
MODELING_SOURCE = Path(__file__).with_name("hf_modeling.py")
ARGS_KEY = "llama3_model_args"
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SENTENCEPIECE_FILE = "sentencepiece.model"  # our tokenizer, kept beside tokenizer.json
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": ROPE_SCALE_FACTOR,
    "low_freq_factor": ROPE_LOW_FREQ_FACTOR,
    "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
    "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT,
}

_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.wa": "mlp.up_proj",
    "feed_forward.wb": "mlp.gate_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def format_for(args: ModelArgs) -> str:
    """``llama`` when transformers' LlamaForCausalLM expresses the model, else ``remote``."""
    return "llama" if blocking_setting(args) is None else "remote"


def blocking_setting(args: ModelArgs) -> str | None:
    """The setting that keeps the model from being a LlamaForCausalLM (None if nothing does)."""
    if args.attention != "softmax":
        return f"--attention {args.attention}"
    if args.mixer != "swiglu":
        return f"--mixer {args.mixer}"
    return None


def hf_name(name: str) -> str:
    """Our parameter name → the Hugging Face one (``layers.3.attention.wq.weight`` →
    ``model.layers.3.self_attn.q_proj.weight``)."""
    module, _, leaf = name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    _, index, rest = module.split(".", 2)
    return f"model.layers.{index}.{_LAYER[rest]}.{leaf}"


def _parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our name → shape of every parameter of a model with ``args`` (built on ``meta``)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items()}


def hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter of a model with ``args``: its Hugging Face name → its shape."""
    return {hf_name(name): shape for name, shape in _parameter_shapes(args).items()}


def _is_rotated(name: str) -> bool:
    return name.endswith((".attention.wq.weight", ".attention.wk.weight"))


def pairs_to_halves(weight: Tensor, n_heads: int) -> Tensor:
    """Rows of each head from Meta's RoPE layout (x0, x1 rotate together) to transformers'
    (x_i and x_{i + d/2} rotate together)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_pairs(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of :func:`pairs_to_halves`."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _heads(name: str, args: ModelArgs) -> int:
    return args.n_heads if name.endswith(".wq.weight") else args.n_kv_heads


def to_hf_state(state: dict[str, Tensor], args: ModelArgs, form: str) -> dict[str, Tensor]:
    """Our state dict → Hugging Face names (and, for ``llama``, the permuted q/k rows)."""
    out = {}
    for name, tensor in state.items():
        if form == "llama" and _is_rotated(name):
            tensor = pairs_to_halves(tensor, _heads(name, args))
        out[hf_name(name)] = tensor.contiguous()
    return out


def from_hf_state(hf_state: dict[str, Tensor], args: ModelArgs, form: str) -> dict[str, Tensor]:
    """The inverse of :func:`to_hf_state`, for a state whose names and shapes match
    :func:`hf_shapes`."""
    out = {}
    for name in _parameter_shapes(args):
        tensor = hf_state[hf_name(name)]
        if form == "llama" and _is_rotated(name):
            tensor = halves_to_pairs(tensor, _heads(name, args))
        out[name] = tensor
    return out


def hf_config(
    args: ModelArgs, form: str, special_ids: dict[str, int], dtype: torch.dtype
) -> dict[str, Any]:
    """config.json for ``args`` in ``form``; ``special_ids`` holds bos/eos/pad token ids."""
    common = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.hidden_dim,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": False,
        "use_cache": True,
        # "dtype" for transformers 5, "torch_dtype" for 4
        **dict.fromkeys(("dtype", "torch_dtype"), str(dtype).removeprefix("torch.")),
        **{f"{kind}_token_id": token for kind, token in special_ids.items()},
        ARGS_KEY: args.to_dict(),
    }
    if form == "llama":
        rope = {**LLAMA3_ROPE} if args.use_scaled_rope else {"rope_type": "default"}
        return {
            "architectures": [LLAMA_ARCHITECTURE],
            "model_type": "llama",
            **common,
            "head_dim": args.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rope_parameters": {**rope, "rope_theta": args.rope_theta},
            # the same for transformers 4, which reads these two keys
            "rope_theta": args.rope_theta,
            "rope_scaling": {**LLAMA3_ROPE} if args.use_scaled_rope else None,
        }
    module = REMOTE_FILE.removesuffix(".py")
    return {
        "architectures": [REMOTE_ARCHITECTURE],
        "model_type": REMOTE_MODEL_TYPE,
        "auto_map": {
            "AutoConfig": f"{module}.{REMOTE_CONFIG}",
            "AutoModelForCausalLM": f"{module}.{REMOTE_ARCHITECTURE}",
        },
        **common,
        "attention": args.attention,
        "mixer": args.mixer,
        "core_dim": args.core_dim,
        "softplus_scale": args.softplus_scale,
        "core_output_scale": args.core_output_scale,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": args.use_scaled_rope,
    }
