"""Model: shapes, cache consistency, the softplus reference, GQA, RoPE scaling, gradients,
errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from llama3 import ConfigError, ModelArgs, StaticKVCache, Transformer, heuristic_core_dim
from llama3.model import parameter_counts, training_flops_per_token
from llama3.model.transformer import rope_frequencies
from llama3.ops import softplus_attention_reference

ATTENTIONS = ["softmax", "softplus"]


def tiny_args(attention: str, **overrides) -> ModelArgs:
    values = dict(
        attention=attention,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=61,
        core_dim=16,
        multiple_of=16,
        max_seq_len=64,
    )
    values.update(overrides)
    return ModelArgs(**values)


def tiny_model(attention: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer.build(tiny_args(attention, **overrides)).eval()


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(attention, dtype):
    model = tiny_model(attention).to(dtype)
    tokens = torch.randint(0, 61, (3, 11))
    logits = model(tokens)
    assert logits.shape == (3, 11, 61) and logits.dtype == dtype
    k, v = model.empty_export_cache(3, "cpu", dtype)
    logits2, k2, v2 = model(tokens, k, v)
    expected = (2, 3, 11, 2, 8) if attention == "softmax" else (2, 3, 16, 11)
    assert k2.shape == v2.shape == expected and k2.dtype == dtype
    assert logits2.shape == logits.shape


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_export_form_decoding_equals_full_forward(attention):
    model = tiny_model(attention)
    tokens = torch.randint(0, 61, (2, 13))
    full = model(tokens)
    k, v = model.empty_export_cache(2, "cpu", torch.float32)
    # a prefill of 5, then one token at a time
    first, k, v = model(tokens[:, :5], k, v)
    steps = [first]
    for i in range(5, 13):
        logits, k, v = model(tokens[:, i : i + 1], k, v)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_static_cache_decoding_equals_full_forward(attention):
    model = tiny_model(attention)
    tokens = torch.randint(0, 61, (2, 13))
    full = model(tokens)
    cache = StaticKVCache.allocate(model.args, 2, 20, "cpu", torch.float32)
    steps = [model(tokens[:, :4], cache=cache)]
    cache.lengths += 4
    for i in range(4, 13):
        steps.append(model(tokens[:, i : i + 1], cache=cache))
        cache.lengths += 1
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_static_cache_rows_at_different_lengths(attention):
    """Right-padded prompts of different lengths prefill together, then decode row by row."""
    model = tiny_model(attention)
    a, b = torch.randint(0, 61, (1, 9)), torch.randint(0, 61, (1, 6))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    cache = StaticKVCache.allocate(model.args, 2, 16, "cpu", torch.float32)
    model(padded, cache=cache)
    cache.lengths.copy_(torch.tensor([9, 6]))
    nxt = torch.randint(0, 61, (2, 1))
    step = model(nxt, cache=cache)
    torch.testing.assert_close(
        step[0], model(torch.cat([a, nxt[:1]], 1))[0, -1:], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        step[1], model(torch.cat([b, nxt[1:]], 1))[0, -1:], atol=1e-5, rtol=1e-5
    )


def softplus_by_rows(q, k, v, scale, kv_len=None):
    """The formula of softplus attention written one query row at a time, in float64."""
    B, S, r = q.shape
    T = k.shape[2]
    out = torch.empty(B, S, r, dtype=torch.float64)
    for b in range(B):
        valid = T if kv_len is None else int(kv_len[b])
        C = valid - S
        for i in range(S):
            n = C + i + 1
            lam = math.log(n) / math.sqrt(r) if scale == "length" else 1 / math.sqrt(r)
            z = lam * (q[b, i].double() @ k[b, :, :n].double())
            w = F.softplus(z)
            out[b, i] = (v[b, :, :n].double() @ w) / w.sum()
    return out


@pytest.mark.parametrize("scale", ["length", "constant"])
@pytest.mark.parametrize("context", [0, 7])
def test_softplus_reference_equals_row_loop(scale, context):
    B, S, r = 2, 9, 16
    T = S + context
    q, k, v = torch.randn(B, S, r), torch.randn(B, r, T), torch.randn(B, r, T)
    got = softplus_attention_reference(q, k, v, scale)
    torch.testing.assert_close(got.double(), softplus_by_rows(q, k, v, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", ["length", "constant"])
def test_softplus_reference_kv_len_ignores_the_tail(scale):
    B, S, r, T = 2, 3, 8, 12
    q, k, v = torch.randn(B, S, r), torch.randn(B, r, T), torch.randn(B, r, T)
    kv_len = torch.tensor([5, 12])
    k[0, :, 5:] = 1e4  # garbage beyond the valid length must not matter
    got = softplus_attention_reference(q, k, v, scale, kv_len)
    torch.testing.assert_close(
        got.double(), softplus_by_rows(q, k, v, scale, kv_len), atol=1e-5, rtol=1e-5
    )


def test_gqa_equals_mha_with_repeated_heads():
    gqa = tiny_model("softmax", n_heads=4, n_kv_heads=2)
    mha = Transformer.build(tiny_args("softmax", n_heads=4, n_kv_heads=4)).eval()
    state = gqa.state_dict()
    hd = gqa.args.head_dim
    for name in list(state):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = state[name].view(2, hd, -1)  # (kv heads, head_dim, dim)
            state[name] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)
    k, v = gqa.empty_export_cache(2, "cpu", torch.float32)
    k2, v2 = mha.empty_export_cache(2, "cpu", torch.float32)
    torch.testing.assert_close(gqa(tokens, k, v)[0], mha(tokens, k2, v2)[0], atol=1e-5, rtol=1e-5)


def test_scaled_rope_follows_the_llama31_rule():
    dim, theta = 128, 500000.0
    base = rope_frequencies(dim, theta, use_scaled=False)
    scaled = rope_frequencies(dim, theta, use_scaled=True)
    assert not torch.equal(base, scaled)
    for f, g in zip(base.tolist(), scaled.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            expected = f
        elif wavelen > 8192 / 1:
            expected = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            expected = (1 - smooth) * f / 8 + smooth * f
        assert g == pytest.approx(expected, rel=1e-6)
    # and the model really uses the scaled table
    model = tiny_model("softmax", use_scaled_rope=True)
    torch.testing.assert_close(model.rope.inv_freq, rope_frequencies(8, theta, True))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_parameter_gets_a_gradient(attention):
    model = tiny_model(attention).train()
    tokens = torch.randint(0, 61, (2, 12))
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_tiny_model_overfits_one_batch(attention):
    model = tiny_model(attention).train()
    tokens = torch.randint(0, 61, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.2, (losses[0], losses[-1])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(attention="softmax", dim=30, n_heads=4), "dim"),
        (dict(attention="softmax", n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(attention="softplus", core_dim=20), "core_dim"),
        (dict(attention="softplus", core_dim=0), "core_dim"),
        (dict(n_layers=0), "n_layers"),
        (dict(attention="linear"), "attention"),
        (dict(mixer="mlp"), "mixer"),
        (dict(softplus_scale="log"), "softplus_scale"),
        (dict(dropout=1.5), "dropout"),
        (dict(core_output_scale="wide"), "core_output_scale"),
        (dict(core_output_scale="-0.5"), "core_output_scale"),
        (dict(core_output_scale="inf"), "core_output_scale"),
        (dict(init="xavier"), "init"),
    ],
)
def test_bad_arguments_name_the_field(overrides, field):
    """ModelArgs names its fields; the command line names the flag that sets each (``--dim``)."""
    with pytest.raises(ConfigError, match=rf"\b{field}\b") as raised:
        ModelArgs(**overrides)
    assert field in raised.value.fields and "--" not in str(raised.value)
    assert f"--{field}" in raised.value.naming(lambda name: f"--{name}")


def test_mixer_follows_attention_unless_given():
    assert ModelArgs(attention="softmax").mixer == "swiglu"
    assert ModelArgs(attention="softplus").mixer == "combinator"
    assert ModelArgs(attention="softplus", mixer="swiglu").mixer == "swiglu"


def test_heuristic_core_dim():
    assert heuristic_core_dim(128) == 424
    assert heuristic_core_dim(8) == 8
    for dim in range(8, 1024, 24):
        r = heuristic_core_dim(dim)
        assert r % 8 == 0 and abs(r - (5 * dim - 216)) <= 4 or r == 8


def test_build_on_meta_then_initialise():
    model = Transformer.build(tiny_args("softplus", dim=64, core_dim=64))
    w = model.layers[0].attention.wq.weight
    assert w.device.type == "cpu" and abs(w.std().item() - 0.02) < 0.003
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert torch.isfinite(model.rope.inv_freq).all()


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_accounting(attention):
    model = tiny_model(attention)
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    a = model.args
    assert counts["embedding"] == counts["output"] == a.vocab_size * a.dim
    flops = training_flops_per_token(a, seq_len=64)
    non_embedding = counts["total"] - counts["embedding"] - counts["norms"]
    assert flops.dense == 6 * non_embedding
    width = a.n_heads * a.head_dim if attention == "softmax" else a.core_dim
    assert flops.attention == 3 * a.n_layers * 4 * width * (64 + 1) / 2


def test_core_output_scale_multiplies_the_core_output_before_wo():
    """width: × min(1, dim/r), so r = 48 at dim 32 is the "none" model with wo scaled by 2/3; no
    change for r ≤ dim or softmax; a number is the factor itself."""
    assert tiny_args("softplus", core_dim=48).core_output_multiplier == pytest.approx(32 / 48)
    assert tiny_args("softplus", core_dim=32).core_output_multiplier == 1.0
    assert tiny_args("softplus", core_dim=48, core_output_scale="none").core_output_multiplier == 1
    assert tiny_args("softplus", core_output_scale="0.25").core_output_multiplier == 0.25
    assert tiny_args("softmax", core_output_scale="0.25").core_output_multiplier == 1.0
    width = tiny_model("softplus", core_dim=48)
    none = tiny_model("softplus", core_dim=48, core_output_scale="none")
    tokens = torch.randint(0, 61, (2, 9))
    assert not torch.allclose(width(tokens), none(tokens))
    with torch.no_grad():
        for layer in none.layers:
            layer.attention.wo.weight.mul_(32 / 48)
    torch.testing.assert_close(width(tokens), none(tokens))


def test_core_output_scale_keeps_decoding_equal_to_the_full_forward():
    model = tiny_model("softplus", core_dim=48)
    tokens = torch.randint(0, 61, (2, 7))
    k, v = model.empty_export_cache(2, "cpu", torch.float32)
    first, k, v = model(tokens[:, :4], k, v)
    rest, _, _ = model(tokens[:, 4:], k, v)
    torch.testing.assert_close(torch.cat([first, rest], 1), model(tokens), atol=1e-5, rtol=1e-5)


def test_records_without_a_later_setting_rebuild_the_model_they_were_saved_from():
    """A checkpoint written before core_output_scale existed holds no such key: the model it was
    saved from had none."""
    record = tiny_args("softplus", core_dim=48).to_dict()
    assert record["core_output_scale"] == "width"
    del record["core_output_scale"]
    assert ModelArgs.from_dict(record).core_output_scale == "none"
    given = ModelArgs.from_dict({**record, "core_output_scale": "width"})
    assert given.core_output_scale == "width"


def _stds(model: Transformer) -> dict[str, float]:
    return {name: p.std().item() for name, p in model.named_parameters() if p.dim() == 2}


def test_initialisation_schemes():
    args = dict(dim=128, n_layers=3, core_dim=256, vocab_size=512, max_seq_len=64)
    normal = _stds(Transformer.build(ModelArgs(**args)))
    assert all(abs(s - 0.02) < 0.001 for s in normal.values())
    fan_in = Transformer.build(ModelArgs(**args, init="fan_in"))
    for name, m in fan_in.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.std().item() == pytest.approx(m.in_features**-0.5, rel=0.05), name
    assert fan_in.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.05)
    for attention, writers in (
        ("softplus", ("attention.wo", "feed_forward.wa")),
        ("softmax", ("attention.wo", "feed_forward.w2", "feed_forward.w3")),
    ):
        depth = Transformer.build(ModelArgs(**args, attention=attention, init="depth"))
        stds = _stds(depth)
        for name, std in stds.items():
            if name.startswith("layers."):
                block, role = int(name.split(".")[1]), name.split(".", 2)[2].removesuffix(".weight")
                expected = 0.02 / math.sqrt(2 * (block + 1)) if role in writers else 0.02
                # a normal truncated at 3 standard deviations has 0.986 of the deviation
                assert std == pytest.approx(0.986 * expected, rel=0.06), name
        assert stds["output.weight"] == pytest.approx(0.986 * 128**-0.5, rel=0.05)
        assert stds["tok_embeddings.weight"] == pytest.approx(1.0, rel=0.05)
        weights = [p for p in depth.parameters() if p.dim() == 2][1:]  # all but the embedding
        assert all(p.abs().max() <= 3 * p.std() * 1.02 / 0.986 for p in weights)


def test_normal_initialisation_draws_what_it_always_drew():
    """The default scheme draws N(0, 0.02) module by module in the order it always did, so a seed
    gives the weights it gave before the schemes existed."""
    torch.manual_seed(3)
    model = Transformer.build(tiny_args("softplus"))
    torch.manual_seed(3)
    drawn = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    expected = [torch.empty_like(m.weight).normal_(0.0, 0.02) for m in drawn]
    got = [m.weight for m in drawn]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
