"""The evaluate command: its loss and bits per byte equal a direct computation over the same windows
(packed and padded), and flags or tokenizers that disagree with the checkpoint are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llama3 import load_checkpoint
from llama3.data.dataset import EvalWindows
from llama3.data.tokenizer import Tokenizer
from llama3.data.tokens import open_token_corpus
from llama3.loss import IGNORE_INDEX


def direct(checkpoint, tokenizer_path, corpus, seq_len, batch_size, mode, max_batches):
    """Loss and bits per byte written out by hand: summed cross entropy over counted targets, and
    the UTF-8 length of each counted target token's piece."""
    tokenizer = Tokenizer(tokenizer_path)
    windows = EvalWindows(open_token_corpus(corpus, tokenizer, progress=False), seq_len, batch_size,
                          mode=mode, pad_id=tokenizer.pad_id)
    model = load_checkpoint(checkpoint)
    sizes = tokenizer.token_bytes()
    nats, tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in windows.batches(max_batches):
            logits = model(inputs)
            counted = targets != IGNORE_INDEX
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0),
                                     reduction="none")
            nats += losses[counted.flatten()].double().sum().item()
            tokens += int(counted.sum())
            n_bytes += sum(int(sizes[t]) for t in targets[counted].tolist())
    return nats / tokens, nats / math.log(2) / n_bytes, tokens, n_bytes


@pytest.mark.parametrize("mode, attention, seq_len", [("packed", "softplus", 24),
                                                      ("padded", "softmax", 80)])
def test_evaluate_equals_direct_computation(mode, attention, seq_len, tiny_checkpoint, tiny_tokenizer,
                                            tiny_corpus, tmp_path, capsys):
    from llama3.__main__ import main

    checkpoint, output = tiny_checkpoint(attention), tmp_path / "eval.json"
    code = main(["evaluate", "--from_checkpoint", str(checkpoint), "--tokenizer",
                 str(tiny_tokenizer), "--eval_corpus", str(tiny_corpus["eval"]), "--batch_size", "3",
                 "--max_seq_len", str(seq_len), "--total_steps", "5", "--data_mode", mode, "--device", "cpu",
                 "--no-progress", "--output", str(output)])
    assert code == 0
    result = json.loads(output.read_text())
    loss, bpb, tokens, n_bytes = direct(checkpoint, tiny_tokenizer, tiny_corpus["eval"], seq_len,
                                        3, mode, 5)
    assert (result["tokens"], result["bytes"], result["batches"]) == (tokens, n_bytes, 5)
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert result["seq_len"] == seq_len and "bits/byte" in capsys.readouterr().out
    if mode == "padded":
        assert tokens < 5 * 3 * seq_len  # padding is not counted


def test_evaluate_whole_set_through_the_cli(tiny_checkpoint, tiny_tokenizer, tiny_corpus,
                                            tmp_path, llama3_cli):
    output = tmp_path / "eval.json"
    done = llama3_cli("evaluate", "--from_checkpoint", tiny_checkpoint("softplus"), "--tokenizer",
                   tiny_tokenizer, "--eval_corpus", tiny_corpus["eval"], "--batch_size", 4,
                   "--device", "cpu", "--output", output)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(output.read_text())
    tokenizer = Tokenizer(tiny_tokenizer)
    corpus = open_token_corpus(tiny_corpus["eval"], tokenizer, progress=False)
    windows = EvalWindows(corpus, 32, 4)  # the checkpoint's context, every batch
    assert result["batches"] == len(windows) and result["tokens"] == len(windows) * 4 * 32
    assert "perplexity" in done.stdout


def test_evaluate_refuses_disagreeing_flags_and_tokenizers(tiny_checkpoint, tiny_tokenizer,
                                                           tiny_corpus, tmp_path, capsys):
    from llama3.__main__ import main
    from llama3.data.tokenizer import train_tokenizer

    base = ["evaluate", "--from_checkpoint", str(tiny_checkpoint("softplus")), "--eval_corpus",
            str(tiny_corpus["eval"]), "--device", "cpu", "--no-progress"]
    assert main(base + ["--tokenizer", str(tiny_tokenizer), "--core_dim", "24"]) == 2
    assert "--core_dim 24 (checkpoint: 16)" in capsys.readouterr().err
    other = train_tokenizer(tiny_corpus["eval"], tmp_path / "other.model", 200,
                            n_most_frequent_words=5, progress=False)
    assert main(base + ["--tokenizer", str(other)]) == 2
    assert "is not the tokenizer this checkpoint was trained with" in capsys.readouterr().err
