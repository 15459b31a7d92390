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
    windows = EvalWindows(
        open_token_corpus(corpus, tokenizer, progress=False),
        seq_len,
        batch_size,
        mode=mode,
        pad_id=tokenizer.pad_id,
    )
    model = load_checkpoint(checkpoint)
    sizes = tokenizer.token_bytes()
    nats, tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in windows.batches(max_batches):
            logits = model(inputs)
            counted = targets != IGNORE_INDEX
            losses = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none"
            )
            nats += losses[counted.flatten()].double().sum().item()
            tokens += int(counted.sum())
            n_bytes += sum(int(sizes[t]) for t in targets[counted].tolist())
    return nats / tokens, nats / math.log(2) / n_bytes, tokens, n_bytes


@pytest.mark.parametrize(
    "mode, attention, seq_len", [("packed", "softplus", 24), ("padded", "softmax", 80)]
)
def test_evaluate_equals_direct_computation(
    mode, attention, seq_len, tiny_checkpoint, tiny_tokenizer, tiny_corpus, tmp_path, capsys
):
    from llama3.__main__ import main

    checkpoint, output = tiny_checkpoint(attention), tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            "--from_checkpoint",
            str(checkpoint),
            "--tokenizer",
            str(tiny_tokenizer),
            "--eval_corpus",
            str(tiny_corpus["eval"]),
            "--batch_size",
            "3",
            "--max_seq_len",
            str(seq_len),
            "--total_steps",
            "5",
            "--data_mode",
            mode,
            "--device",
            "cpu",
            "--no-progress",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    result = json.loads(output.read_text())
    loss, bpb, tokens, n_bytes = direct(
        checkpoint, tiny_tokenizer, tiny_corpus["eval"], seq_len, 3, mode, 5
    )
    assert (result["tokens"], result["bytes"], result["batches"]) == (tokens, n_bytes, 5)
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert result["seq_len"] == seq_len and "bits/byte" in capsys.readouterr().out
    if mode == "padded":
        assert tokens < 5 * 3 * seq_len  # padding is not counted


def test_evaluate_whole_set_through_the_cli(
    tiny_checkpoint, tiny_tokenizer, tiny_corpus, tmp_path, llama3_cli
):
    output = tmp_path / "eval.json"
    done = llama3_cli(
        "evaluate",
        "--from_checkpoint",
        tiny_checkpoint("softplus"),
        "--tokenizer",
        tiny_tokenizer,
        "--eval_corpus",
        tiny_corpus["eval"],
        "--batch_size",
        4,
        "--device",
        "cpu",
        "--output",
        output,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(output.read_text())
    tokenizer = Tokenizer(tiny_tokenizer)
    corpus = open_token_corpus(tiny_corpus["eval"], tokenizer, progress=False)
    windows = EvalWindows(corpus, 32, 4)  # the checkpoint's context, every batch
    assert result["batches"] == len(windows) and result["tokens"] == len(windows) * 4 * 32
    assert "perplexity" in done.stdout


def test_evaluate_refuses_disagreeing_flags_and_tokenizers(
    tiny_checkpoint, tiny_tokenizer, tiny_corpus, tmp_path, capsys
):
    from llama3.__main__ import main
    from llama3.data.tokenizer import train_tokenizer

    base = [
        "evaluate",
        "--from_checkpoint",
        str(tiny_checkpoint("softplus")),
        "--eval_corpus",
        str(tiny_corpus["eval"]),
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(base + ["--tokenizer", str(tiny_tokenizer), "--core_dim", "24"]) == 2
    assert "--core_dim 24 (checkpoint: 16)" in capsys.readouterr().err
    other = train_tokenizer(
        tiny_corpus["eval"], tmp_path / "other.model", 200, n_most_frequent_words=5, progress=False
    )
    assert main(base + ["--tokenizer", str(other)]) == 2
    assert "is not the tokenizer this checkpoint was trained with" in capsys.readouterr().err


def test_a_raw_eval_corpus_is_cleaned_as_the_training_text(
    tiny_checkpoint, tiny_tokenizer, tiny_corpus, tmp_path, capsys
):
    """The eval documents before preprocess (capitals) evaluate exactly as the preprocessed ones:
    the tokenizer's recorded cleaning is applied while encoding; a tokenizer trained on text as
    given records no cleaning, and then a high share of <unk> tokens is said."""
    from llama3.__main__ import main
    from llama3.data.tokenizer import cleaning_record_path, train_tokenizer

    raw = tiny_corpus["eval"].parent.parent / "raw" / "eval.jsonl"
    assert any(c.isupper() for c in raw.read_text())
    results = []
    for corpus in (raw, tiny_corpus["eval"]):
        output = tmp_path / f"{corpus.name}.json"
        assert (
            main(
                [
                    "evaluate",
                    "--from_checkpoint",
                    str(tiny_checkpoint("softplus")),
                    "--tokenizer",
                    str(tiny_tokenizer),
                    "--eval_corpus",
                    str(corpus),
                    "--device",
                    "cpu",
                    "--no-progress",
                    "--output",
                    str(output),
                ]
            )
            == 0
        )
        results.append(json.loads(output.read_text()))
    err = capsys.readouterr().err
    assert f"--eval_corpus {raw} is encoded with the cleaning" in err and "<unk>" not in err
    for key in ("loss", "tokens", "bytes", "bits_per_byte"):
        assert results[0][key] == results[1][key], key
    as_given = train_tokenizer(
        tiny_corpus["train"].parent.parent / "raw" / "train.jsonl",
        tmp_path / "as_given.model",
        128,
        n_most_frequent_words=5,
        progress=False,
    )
    assert json.loads(cleaning_record_path(as_given).read_text())["cleaning"]["lowercase"] is False
    uppercase = tmp_path / "upper" / "part.jsonl"
    uppercase.parent.mkdir()
    uppercase.write_text(json.dumps({"text": raw.read_text().upper()[:3000]}) + "\n")
    from llama3.data.tokenizer import Tokenizer
    from llama3.data.tokens import open_token_corpus

    corpus = open_token_corpus(uppercase.parent, Tokenizer(as_given), progress=False)
    assert corpus.n_unknown > 0.01 * corpus.n_tokens
    assert "are <unk>" in capsys.readouterr().err


def test_a_model_file_under_another_name_is_the_model_loaded(
    tiny_checkpoint, tiny_tokenizer, tiny_corpus, tmp_path
):
    """--from_checkpoint DIR/step_N/other.pt loads other.pt, not the model.pt beside it."""
    import shutil

    from conftest import TINY_MODELS

    from llama3 import ModelArgs, Transformer
    from llama3.__main__ import main
    from llama3.checkpoint import resolve_step_dir, save_model_checkpoint, tokenizer_fingerprint

    torch.manual_seed(7)
    other = Transformer.build(
        ModelArgs(vocab_size=Tokenizer(tiny_tokenizer).vocab_size, **TINY_MODELS["softplus"])
    )
    other_dir = save_model_checkpoint(
        tmp_path / "other", other, tokenizer=tokenizer_fingerprint(tiny_tokenizer)
    )
    mixed = tmp_path / "mixed"
    shutil.copytree(resolve_step_dir(tiny_checkpoint("softplus")), mixed)
    shutil.copyfile(other_dir / "model.pt", mixed / "other.pt")
    results = {}
    for name, source in (("other", other_dir), ("file", mixed / "other.pt"), ("beside", mixed)):
        output = tmp_path / f"{name}.json"
        assert (
            main(
                [
                    "evaluate",
                    "--from_checkpoint",
                    str(source),
                    "--tokenizer",
                    str(tiny_tokenizer),
                    "--eval_corpus",
                    str(tiny_corpus["eval"]),
                    "--device",
                    "cpu",
                    "--eval_batches",
                    "2",
                    "--no-progress",
                    "--output",
                    str(output),
                ]
            )
            == 0
        )
        results[name] = json.loads(output.read_text())
    assert results["file"]["loss"] == results["other"]["loss"] != results["beside"]["loss"]
    assert results["file"]["checkpoint"] == str(mixed / "other.pt")


@pytest.mark.parametrize("attention", ["softplus", "softmax"])
def test_several_lengths_equal_separate_evaluations(
    attention, tiny_checkpoint, tiny_tokenizer, tiny_corpus, tmp_path
):
    """--seq_lens gives, per length, what --seq_len gives alone (lengths past the context of 32
    included); the position buckets' token-weighted mean is the window loss, and a bucket is the
    mean loss at its positions."""
    from llama3.__main__ import main

    checkpoint = tiny_checkpoint(attention)
    base = [
        "evaluate",
        "--from_checkpoint",
        str(checkpoint),
        "--tokenizer",
        str(tiny_tokenizer),
        "--eval_corpus",
        str(tiny_corpus["eval"]),
        "--batch_size",
        "2",
        "--eval_batches",
        "3",
        "--position_buckets",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main([*base, "--seq_lens", "16,72", "--output", str(tmp_path / "all.json")]) == 0
    together = json.loads((tmp_path / "all.json").read_text())
    assert [r["seq_len"] for r in together["lengths"]] == [16, 72]
    assert together["max_seq_len"] == 32
    for result in together["lengths"]:
        alone = tmp_path / f"{result['seq_len']}.json"
        assert main([*base, "--seq_len", str(result["seq_len"]), "--output", str(alone)]) == 0
        single = json.loads(alone.read_text())
        for key in ("seq_len", "batches", "tokens", "bytes", "positions"):
            assert result[key] == single[key], key
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-12)
        buckets = result["positions"]
        assert [(b["start"], b["end"]) for b in buckets] == [
            (i * result["seq_len"] // 4, (i + 1) * result["seq_len"] // 4) for i in range(4)
        ]
        weighted = sum(b["loss"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets)
        assert weighted == pytest.approx(result["loss"], rel=1e-9)
    last = together["lengths"][1]["positions"][-1]  # positions 54..71, past the context
    tokenizer = Tokenizer(tiny_tokenizer)
    windows = EvalWindows(open_token_corpus(tiny_corpus["eval"], tokenizer, progress=False), 72, 2)
    model, losses = load_checkpoint(checkpoint), []
    with torch.no_grad():
        for inputs, targets in windows.batches(3):
            logits = model(inputs)[:, last["start"] : last["end"]]
            losses.append(
                F.cross_entropy(
                    logits.flatten(0, 1),
                    targets[:, last["start"] : last["end"]].flatten(),
                    reduction="none",
                )
            )
    assert last["loss"] == pytest.approx(torch.cat(losses).double().mean().item(), rel=1e-5)
