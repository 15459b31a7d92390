"""Training and evaluation windows: content, shuffling, rank splits, exact resume, padded mode."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from data_support import make_texts, train_tiny_tokenizer, write_jsonl

from llama3.data.dataset import EvalWindows, TrainWindows
from llama3.data.tokenizer import Tokenizer
from llama3.data.tokens import TokenCorpus, open_token_corpus
from llama3.errors import UsageError
from llama3.loss import IGNORE_INDEX

S, B = 16, 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory) -> TokenCorpus:
    """Five small files, so that many windows span a shard boundary."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        write_jsonl(root / f"part-{i:05d}.jsonl", make_texts(12, seed=30 + i, max_words=12))
    return open_token_corpus(root, tokenizer, progress=False)


def stream(tokenizer: Tokenizer) -> np.ndarray:
    texts = [t for i in range(5) for t in make_texts(12, seed=30 + i, max_words=12)]
    return np.array([t for text in texts for t in tokenizer.encode(text, eos=True)])


def rows(batches) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for inputs, _ in batches for row in inputs]


def test_packed_windows_are_the_token_stream_shifted_by_one(corpus, tokenizer):
    tokens = stream(tokenizer)
    windows = TrainWindows(corpus, S, B, seed=0)
    n = (len(tokens) - 1) // S
    assert windows.steps_per_epoch == n // B
    for inputs, targets in islice(windows, 5):
        assert (
            inputs.shape == targets.shape == (B, S) and inputs.dtype == targets.dtype == torch.int64
        )
        for x, y in zip(inputs.numpy(), targets.numpy()):
            start = next(i for i in range(n) if (tokens[i * S : i * S + S] == x).all())
            assert (tokens[start * S + 1 : start * S + S + 1] == y).all()
    assert (tokens == tokenizer.eos_id).sum() == corpus.n_documents  # EOS between documents


def test_windows_span_shard_boundaries(corpus, tokenizer):
    """Every window of an epoch, read through the shards, equals the same slice of the stream."""
    tokens = stream(tokenizer)
    windows = TrainWindows(corpus, S, 1, seed=0)
    boundaries = np.cumsum([f["tokens"] for f in corpus.files])[:-1]
    spanning = 0
    for inputs, targets in islice(windows, windows.steps_per_epoch):
        start = (
            int(
                np.flatnonzero(
                    [
                        (tokens[i : i + S] == inputs[0].numpy()).all()
                        for i in range(0, len(tokens) - S, S)
                    ]
                )[0]
            )
            * S
        )
        spanning += any(start < b < start + S + 1 for b in boundaries)
        assert (tokens[start + 1 : start + S + 1] == targets[0].numpy()).all()
    assert spanning >= 3


def test_epoch_is_a_permutation_and_reshuffles(corpus):
    windows = TrainWindows(corpus, S, B, seed=3, prefetch=0)
    steps = windows.steps_per_epoch
    epochs = rows(islice(windows, 2 * steps))
    first, second = epochs[: steps * B], epochs[steps * B :]
    assert len(set(first)) == len(first) and set(first) == set(second) and first != second
    again = rows(islice(TrainWindows(corpus, S, B, seed=3), steps))
    assert again == first  # same seed, same order; with and without the prefetch thread
    assert rows(islice(TrainWindows(corpus, S, B, seed=4), steps)) != first


def test_ranks_are_disjoint_cover_the_epoch_and_get_equal_batches(corpus):
    world = 3
    single = TrainWindows(corpus, S, B, seed=5)
    ranks = [TrainWindows(corpus, S, B, seed=5, rank=r, world_size=world) for r in range(world)]
    steps = ranks[0].steps_per_epoch
    assert all(r.steps_per_epoch == steps for r in ranks) and steps == len(single._sequences) // (
        B * world
    )
    seen = [rows(islice(r, steps)) for r in ranks]
    union = [w for rank_rows in seen for w in rank_rows]
    assert len(set(union)) == len(union) == steps * world * B
    everything = set(rows(islice(single, single.steps_per_epoch)))
    assert set(union) <= everything and len(everything) - len(union) < world * B + B


def test_resume_gives_exactly_the_next_batch(corpus):
    windows = TrainWindows(corpus, S, B, seed=6, rank=1, world_size=2)
    it = iter(windows)
    steps = windows.steps_per_epoch
    for _ in range(steps - 1):  # stop just before an epoch boundary
        next(it)
    state = windows.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = TrainWindows(corpus, S, B, seed=6, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = list(islice(resumed, 3))
    for (x, y), (gx, gy) in zip(expected, got):
        assert torch.equal(x, gx) and torch.equal(y, gy)
    windows.load_state_dict(state)  # a running iterator is repositioned
    assert torch.equal(next(it)[0], expected[0][0])
    assert resumed.state_dict()["step"] == steps + 2 and resumed.epoch == 1


def test_resume_refuses_a_different_configuration(corpus):
    state = TrainWindows(corpus, S, B, seed=7).state_dict()
    with pytest.raises(UsageError, match="--batch_size: 4 then, 2 now"):
        TrainWindows(corpus, S, 2, seed=7).load_state_dict(state)


def test_padded_mode_one_document_per_sequence(corpus, tokenizer):
    seq_len = 24
    lengths = corpus.document_lengths()  # with EOS
    windows = TrainWindows(corpus, seq_len, B, seed=8, mode="padded", pad_id=tokenizer.pad_id)
    too_long = int((lengths > seq_len).sum())
    assert 0 < too_long < corpus.n_documents and windows.dropped_documents == too_long
    kept = {
        tuple([tokenizer.bos_id] + corpus.document(i).tolist()[:-1])  # BOS, text (no EOS)
        for i in range(corpus.n_documents)
        if lengths[i] <= seq_len
    }
    for inputs, targets in islice(windows, windows.steps_per_epoch):
        for x, y in zip(inputs.tolist(), targets.tolist()):
            n = y.index(tokenizer.eos_id) + 1  # real targets: the text, then EOS
            assert tuple(x[:n]) in kept
            assert (
                x[n:]
                == ([tokenizer.eos_id] + [tokenizer.pad_id] * (seq_len - n - 1))[: seq_len - n]
            )
            assert y[:n] == x[1:n] + [tokenizer.eos_id] and y[n:] == [IGNORE_INDEX] * (seq_len - n)


def test_padded_mode_reports_dropped_documents(corpus, tokenizer, capsys):
    EvalWindows(corpus, 24, 2, mode="padded", pad_id=tokenizer.pad_id)
    assert "do not fit --max_seq_len 24" in capsys.readouterr().err


def test_eval_windows_fixed_order_split_across_ranks(corpus, tokenizer):
    full = EvalWindows(corpus, S, B)
    ordered = rows(full.batches())
    assert ordered == rows(full.batches()) and len(list(full.batches(max_batches=2))) == 2
    tokens = stream(tokenizer)
    assert ordered[:3] == [
        tuple(tokens[i * S : (i + 1) * S].tolist()) for i in range(3)
    ]  # corpus order
    halves = [EvalWindows(corpus, S, B, rank=r, world_size=2) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(full) // 2
    a, b = rows(halves[0].batches()), rows(halves[1].batches())
    assert set(a).isdisjoint(b) and set(a) | set(b) <= set(ordered)
    assert a[:B] == ordered[:B] and b[:B] == ordered[B : 2 * B]  # batches interleave by rank


def test_corpus_too_small_for_one_batch(corpus):
    with pytest.raises(
        UsageError,
        match=r"--train_corpus .* too small for one batch.*--max_seq_len 4000"
        r".*--batch_size 4",
    ):
        TrainWindows(corpus, 4000, 4)
    with pytest.raises(UsageError, match=r"--eval_corpus .* too small.*documents that fit"):
        EvalWindows(corpus, S, 10_000, mode="padded")
    with pytest.raises(UsageError, match=r"--batch_size 0: must be positive"):
        TrainWindows(corpus, S, 0)


def test_training_windows_feed_a_model_step(corpus):
    """The batches plug into cross entropy as training uses them: padding carries no loss."""
    inputs, targets = next(iter(TrainWindows(corpus, S, B, mode="padded")))
    logits = torch.zeros(B, S, corpus.vocab_size, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    counted = int((targets != IGNORE_INDEX).sum())
    assert counted < B * S and loss.item() == pytest.approx(
        counted * np.log(corpus.vocab_size), rel=1e-5
    )
