"""Training diagnostics: attention statistics against hand-computed values, gradient norms by
role, and ``train --diagnostics_steps`` (records at the right steps, the training unchanged)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama3 import ModelArgs, Transformer
from llama3.training.diagnostics import attention_statistics, gradient_norms, parameter_role
from llama3.training.optim import total_grad_norm

S = 12


def blind_model(attention: str, **overrides) -> Transformer:
    """A model whose queries are zero: every score is 0, so every row weighs its keys alike."""
    torch.manual_seed(0)
    args = ModelArgs(
        attention=attention,
        dim=32,
        n_layers=2,
        n_heads=4,
        vocab_size=61,
        core_dim=16,
        multiple_of=16,
        max_seq_len=S,
        **overrides,
    )
    model = Transformer.build(args)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.zero_()
    return model


@pytest.mark.parametrize("attention", ["softmax", "softplus"])
def test_uniform_attention_reads_as_uniform(attention):
    model = blind_model(attention)
    layers = attention_statistics(model, torch.randint(0, 61, (3, S)))
    n = torch.arange(2, S + 1, dtype=torch.float64)  # keys seen by the rows with two or more
    assert len(layers) == 2
    for layer in layers:
        assert layer["entropy"] == pytest.approx(1.0, abs=1e-5)
        assert layer["top_share"] == pytest.approx((1 / n).mean().item(), abs=1e-6)
        assert layer["previous_share"] == pytest.approx((1 / n).mean().item(), abs=1e-6)
        assert layer["score_q01"] == layer["score_q99"] == layer["score_std"] == 0.0
        assert 0 < layer["branch_ratio"] < math.inf
    assert model.training  # put back as it was


def test_sharp_attention_and_the_branch_ratio():
    """Token t embedded as the unit vector e_2t and q = k = 10·x: keys of other tokens score 0
    (RoPE keeps each feature pair apart), a query's own key scores thousands, so all its weight is
    there (entropy ~0, top share ~1, previous key ~0). The branch ratio is rms(attention output
    after wo) / rms(block input)."""
    model = blind_model("softplus").eval()
    layer = model.layers[0].attention
    with torch.no_grad():
        model.tok_embeddings.weight.zero_()
        model.tok_embeddings.weight[:8, :16:2] = torch.eye(8)
        layer.wq.weight.copy_(torch.eye(16, 32) * 10)
        layer.wk.weight.copy_(torch.eye(16, 32) * 10)
    tokens = torch.arange(8).unsqueeze(0)
    stats = attention_statistics(model, tokens)[0]
    assert stats["entropy"] < 0.02 and stats["top_share"] > 0.99 and stats["previous_share"] < 0.01
    assert stats["score_q99"] > 500 and stats["score_q01"] == 0.0
    x = model.tok_embeddings(tokens)
    positions = torch.arange(8).unsqueeze(0)
    q, k, v = layer.project(model.layers[0].attention_norm(x), *model.rope(positions))
    branch = layer.output(layer.attend(q, k, v, None))
    expected = branch.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()
    assert stats["branch_ratio"] == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_norms_by_role():
    model = blind_model("softplus")
    tokens = torch.randint(0, 61, (2, S))
    model(tokens).logsumexp(-1).mean().backward()
    norms = gradient_norms(model)
    assert set(norms) == {
        "tok_embeddings",
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.wa",
        "feed_forward.wb",
        "attention_norm",
        "ffn_norm",
        "norm",
        "output",
    }
    total = total_grad_norm(model.parameters()).item()
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(total, rel=1e-5)
    assert parameter_role("layers.3._orig_mod.attention.wq.weight") == "attention.wq"
    assert parameter_role("layers.0._checkpoint_wrapped_module.ffn_norm.weight") == "ffn_norm"


def test_train_records_diagnostics_and_trains_the_same(train_run):
    plain = train_run("plain")
    diagnosed = train_run("diagnosed", "--diagnostics_steps", "2")
    kept = [json.loads(line) for line in (diagnosed / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in kept if r["kind"] == "diagnostics"]
    assert [r["step"] for r in records] == [2, 4]
    assert len(records[0]["layers"]) == 2 and "attention.wo" in records[0]["grad_norms"]
    losses = [
        [
            r["loss"]
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] in ("train", "eval")
        ]
        for run in (plain, diagnosed)
    ]
    assert losses[0] == losses[1]


@pytest.fixture
def train_run(tiny_corpus, tiny_tokenizer, tmp_path, one_thread):
    from llama3.__main__ import main

    def run(name: str, *extra: str):
        out = tmp_path / name
        assert (
            main(
                [
                    "train",
                    "--device",
                    "cpu",
                    "--train_corpus",
                    str(tiny_corpus["train"]),
                    "--eval_corpus",
                    str(tiny_corpus["eval"]),
                    "--tokenizer",
                    str(tiny_tokenizer),
                    "--dim",
                    "32",
                    "--n_layers",
                    "2",
                    "--core_dim",
                    "48",
                    "--max_seq_len",
                    "16",
                    "--batch_size",
                    "2",
                    "--total_steps",
                    "4",
                    "--eval_steps",
                    "2",
                    "--eval_batches",
                    "1",
                    "--no-tensorboard",
                    "--to_checkpoint",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        return out

    return run
