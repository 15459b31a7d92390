"""Generation: static-cache greedy decoding equals greedy decoding by full forwards (batched prompts
of different lengths included), seeded sampling is reproducible, the sampling filters, the
generate command (argument, batch and stdin prompts), and a vocabulary padded beyond the
tokenizer's."""

from __future__ import annotations

import io

import pytest
import torch

from llama3 import ModelArgs, Transformer
from llama3.generate import Generator, SamplingSettings, sample, top_k_filter, top_p_filter

EOS = 3
TINY = {
    "softmax": dict(
        attention="softmax",
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=61,
        multiple_of=16,
        max_seq_len=64,
    ),
    "softplus": dict(
        attention="softplus", dim=32, n_layers=2, core_dim=16, vocab_size=61, max_seq_len=64
    ),
}
PROMPTS = [[2, 5, 6, 7, 8, 9, 10, 11, 12], [2, 30], [2, 40, 41, 42, 43]]


def tiny_model(attention: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer.build(ModelArgs(**TINY[attention])).eval()


@torch.no_grad()
def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Argmax of a full forward over everything so far, one token at a time, stopping at EOS."""
    sequence, new = list(prompt), []
    for _ in range(n):
        token = int(model(torch.tensor([sequence]))[0, -1].argmax())
        if token == EOS:
            break
        new.append(token)
        sequence.append(token)
    return new


@pytest.mark.parametrize("attention", ["softmax", "softplus"])
def test_static_cache_greedy_equals_full_forward_greedy(attention):
    model = tiny_model(attention)
    generator = Generator(model, eos_id=EOS)
    settings = SamplingSettings(max_new_tokens=24, temperature=0)
    batched = generator.generate_ids(PROMPTS, settings)
    for prompt, tokens in zip(PROMPTS, batched.tokens):
        assert tokens == greedy_without_cache(model, prompt, 24)
    alone = generator.generate_ids(PROMPTS[1:2], settings)  # batch of one, cache reallocated
    assert alone.tokens[0] == batched.tokens[1]
    assert batched.prompt_tokens == sum(map(len, PROMPTS))


def test_generation_stops_each_row_at_eos():
    model = tiny_model("softplus")
    settings = SamplingSettings(max_new_tokens=20, temperature=0)
    free = Generator(model, eos_id=None).generate_ids(PROMPTS, settings)
    assert all(len(t) == 20 for t in free.tokens) and not any(free.finished)
    row = free.tokens[0]
    cut = next(i for i in range(1, 20) if row[i] not in row[:i])
    eos = row[cut]  # pretend this token (new in row 0 at ``cut``) ends the sequence
    stopped = Generator(model, eos_id=eos).generate_ids(PROMPTS, settings)
    assert stopped.tokens[0] == row[:cut] and stopped.finished[0]
    for full, cut, done in zip(free.tokens, stopped.tokens, stopped.finished):
        expected = full[: full.index(eos)] if eos in full else full
        assert cut == expected and done == (eos in full)


def test_sampling_is_reproducible_under_a_seed():
    generator = Generator(tiny_model("softmax"), eos_id=None)

    def run(seed: int) -> list[list[int]]:
        settings = SamplingSettings(
            max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.95, seed=seed
        )
        return generator.generate_ids(PROMPTS, settings).tokens

    first = run(7)
    assert run(7) == first
    assert run(8) != first


def test_sampling_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, True, False, False]]
    probs = torch.softmax(logits, -1)[0]  # ≈ .03 .64 .24 .09 .01
    nucleus = top_p_filter(logits, 0.8)  # .64 < .8 ≤ .64 + .24: the two most probable
    assert torch.isfinite(nucleus).tolist() == [[False, True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, float(probs[1]) - 1e-3)).sum() == 1
    assert torch.equal(top_p_filter(logits, 1.0), logits) and torch.equal(
        top_k_filter(logits, 0), logits
    )
    g = torch.Generator().manual_seed(0)
    greedy = SamplingSettings(temperature=0)
    assert sample(logits, greedy, g).item() == 1
    draws = [
        sample(logits, SamplingSettings(temperature=1.0, top_k=2, top_p=1.0), g).item()
        for _ in range(200)
    ]
    assert set(draws) == {1, 2} and draws.count(1) > draws.count(2)


def test_generate_command(tiny_checkpoint, tiny_tokenizer, llama3_cli, capsys, monkeypatch):
    from llama3.__main__ import main

    common = [
        "generate",
        "--from_checkpoint",
        str(tiny_checkpoint("softmax")),
        "--tokenizer",
        str(tiny_tokenizer),
        "--max_new_tokens",
        "12",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]
    one = llama3_cli(*common, "--prompt", "The river was")  # the real entry point, streaming
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout.startswith("the river was")  # cleaned as the training text was
    assert "prefill:" in one.stderr and "decode:" in one.stderr and "tokens/s" in one.stderr
    assert main(common + ["--prompt", "The river was", "--prompt", "A quiet morning"]) == 0
    batch = capsys.readouterr().out
    assert "--- [0]\nthe river was" in batch and "--- [1]\na quiet morning" in batch
    first = batch.split("--- [1]")[0].split("\n", 1)[1]
    assert first.rstrip("\n") == one.stdout.rstrip("\n")  # greedy: batching changes nothing
    monkeypatch.setattr("sys.stdin", io.StringIO("The river was\n\nA quiet morning\n"))
    assert main(common) == 0
    assert capsys.readouterr().out == batch
    assert main(common + ["--prompt", "x", "--dim", "64"]) == 2
    assert "--dim 64" in capsys.readouterr().err


def test_prompts_are_cleaned_as_the_training_text_and_unknown_tokens_said(
    tiny_checkpoint, tiny_tokenizer, tmp_path, capsys
):
    """The tiny tokenizer learnt preprocessed (lowercased, ASCII) text and records it: a prompt in
    capitals with accents is read, and echoed, cleaned; characters it never saw get a warning; a
    tokenizer without the record (older) is assumed to want preprocess's default cleaning."""
    import json
    import shutil

    from llama3.__main__ import main
    from llama3.data.tokenizer import cleaning_record_path

    record = json.loads(cleaning_record_path(tiny_tokenizer).read_text())
    assert record["cleaning"] == {
        "nfkd": True,
        "ascii": True,
        "lowercase": True,
        "drop_empty_brackets": True,
    }
    common = [
        "generate",
        "--from_checkpoint",
        str(tiny_checkpoint("softmax")),
        "--max_new_tokens",
        "4",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]
    assert main(common + ["--tokenizer", str(tiny_tokenizer), "--prompt", "THE RIVER Café ()"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the river cafe ") and "<unk>" not in err
    assert (
        main(common + ["--tokenizer", str(tiny_tokenizer), "--prompt", "the river 1234 %%% ###"])
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: prompt 0: " in err and "are <unk>" in err
    older = tmp_path / "older.model"
    shutil.copyfile(tiny_tokenizer, older)
    assert main(common + ["--tokenizer", str(older), "--prompt", "THE RIVER"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the river") and "has no cleaning record" in err


def test_a_vocabulary_padded_beyond_the_tokenizer_is_never_sampled(
    tiny_tokenizer, tmp_path, capsys
):
    """A model with 64 ids more than its tokenizer (as transformers pads vocabularies), whose
    extra ids it would pick first: generation samples the tokenizer's ids only."""
    from llama3.__main__ import main
    from llama3.checkpoint import save_model_checkpoint, tokenizer_fingerprint
    from llama3.data.tokenizer import Tokenizer

    sp = Tokenizer(tiny_tokenizer)
    torch.manual_seed(0)
    padded = Transformer.build(ModelArgs(**{**TINY["softmax"], "vocab_size": sp.vocab_size + 64}))
    with torch.no_grad():
        padded.output.weight[sp.vocab_size :] = 100 * padded.output.weight[sp.vocab_size :].abs()
    save_model_checkpoint(tmp_path, padded, tokenizer=tokenizer_fingerprint(tiny_tokenizer))
    for temperature in (0.0, 1.0):
        result = Generator(padded, sp, eos_id=None).generate(
            ["the river"], SamplingSettings(max_new_tokens=8, temperature=temperature)
        )
        assert max(result.tokens[0]) < sp.vocab_size
    assert (
        main(
            [
                "generate",
                "--from_checkpoint",
                str(tmp_path),
                "--tokenizer",
                str(tiny_tokenizer),
                "--device",
                "cpu",
                "--max_new_tokens",
                "8",
                "--prompt",
                "the river",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("the river")
