"""Meta compatibility: params.json mapping, shard merging, and logits equal to Meta's formulation.

``meta_forward`` below transcribes the computation of Meta's reference ``llama/model.py``
(complex-number RoPE, repeated key/value heads, explicit masked softmax, fp32 logits) as plain
functions over a Meta-layout state dict, so our modules are checked against an independent path.
"""

import pytest
import torch
import torch.nn.functional as F
from meta_layout import fairscale_shards

from llama3 import Transformer
from llama3.model.meta import merge_shards, model_args_from_params

PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 96,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}


def _rms(x, w, eps):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * w


def _freqs_cis(head_dim, end, theta, use_scaled):
    from llama3.model.transformer import rope_frequencies  # the scaling rule is tested on its own

    freqs = rope_frequencies(head_dim, theta, use_scaled)
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, head_dim // 2), torch.outer(t, freqs))


def _rope(x, freqs_cis):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis.view(1, x.shape[1], 1, -1)).flatten(3)


def meta_forward(sd, params, tokens):
    B, S = tokens.shape
    dim, H, Hkv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hd = dim // H
    fc = _freqs_cis(hd, S, params["rope_theta"], params["use_scaled_rope"])
    mask = torch.triu(torch.full((S, S), float("-inf")), diagonal=1)
    h = sd["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = _rms(h, sd[p + "attention_norm.weight"], params["norm_eps"])
        q = (x @ sd[p + "attention.wq.weight"].T).view(B, S, H, hd)
        k = (x @ sd[p + "attention.wk.weight"].T).view(B, S, Hkv, hd)
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, S, Hkv, hd)
        q, k = _rope(q, fc), _rope(k, fc)
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / hd**0.5 + mask
        att = F.softmax(scores.float(), dim=-1) @ v.transpose(1, 2)
        h = h + att.transpose(1, 2).reshape(B, S, -1) @ sd[p + "attention.wo.weight"].T
        x = _rms(h, sd[p + "ffn_norm.weight"], params["norm_eps"])
        ff = F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (
            x @ sd[p + "feed_forward.w3.weight"].T
        )
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return (_rms(h, sd["norm.weight"], params["norm_eps"]) @ sd["output.weight"].T).float()


def meta_state_dict(seed=0):
    torch.manual_seed(seed)
    model = Transformer.build(model_args_from_params(PARAMS))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith("norm.weight"):  # non-trivial norms, so a mix-up would show
            sd[k] = 1 + 0.1 * torch.randn_like(sd[k])
    return sd


def test_params_json_maps_onto_model_args():
    args = model_args_from_params(PARAMS)
    assert (args.attention, args.mixer) == ("softmax", "swiglu")
    assert (args.dim, args.n_heads, args.n_kv_heads, args.vocab_size) == (64, 4, 2, 96)
    # Meta's FeedForward: int(2·4·dim/3) = 170, ×1.3 → 221, rounded up to 32 → 224
    assert args.hidden_dim == 224 and args.use_scaled_rope


def test_logits_equal_metas_formulation():
    sd = meta_state_dict()
    model = Transformer.build(model_args_from_params(PARAMS), init=False)
    model.load_state_dict(sd)
    tokens = torch.randint(0, 96, (2, 19))
    expected = meta_forward(sd, PARAMS, tokens)
    torch.testing.assert_close(model.eval()(tokens), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("world_size", [2, 4])
def test_model_parallel_shards_merge(world_size):
    """Shards cut as fairscale's layers cut them (the embedding along the vocabulary) merge back."""
    sd = meta_state_dict(seed=1)
    shards = fairscale_shards(sd, world_size)
    assert shards[0]["tok_embeddings.weight"].shape == (96 // world_size, 64)
    shards[0]["rope.freqs"] = torch.zeros(8)  # present in some releases, ignored
    merged = merge_shards(shards)
    assert merged.keys() == sd.keys()
    for k in sd:
        assert torch.equal(merged[k], sd[k]), k
