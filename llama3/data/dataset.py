"""Training and evaluation batches from a :class:`~llama3.data.tokens.TokenCorpus`.

Two ways to cut a corpus into sequences of ``seq_len + 1`` tokens (inputs are the first
``seq_len``, targets the last ``seq_len``):

- ``packed`` (default): the corpus is one stream, documents separated by EOS, cut into consecutive
  windows that overlap by one token, so every token is a target exactly once per epoch and no
  compute is spent on padding.
- ``padded`` (for comparisons with runs that train on padded documents): one document per sequence,
  BOS … EOS, then the pad id; padded targets are IGNORE_INDEX so they carry no loss. Documents
  that do not fit are dropped, and counted.

Training order is a permutation of all sequences, drawn per epoch from ``(seed, epoch)``; step
``k`` of an epoch gives rank ``r`` of ``W`` the sequences at ``[(k·W + r)·B, (k·W + r + 1)·B)`` of
that permutation, so ranks are disjoint, together cover the epoch (up to the remainder of less than
``W·B`` sequences, a different one each epoch) and all get the same number of batches. A batch is a
pure function of its step, which makes resuming exact and lets a background thread prepare the
next batches while the model trains.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from llama3.data.tokens import TokenCorpus, open_token_corpus
from llama3.errors import UsageError
from llama3.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from llama3.data.tokenizer import Tokenizer

MODES = ("packed", "padded")
Batch = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------- sequences


class _PackedSequences:
    """Windows ``[i·S, i·S + S + 1)`` of the token stream."""

    def __init__(self, corpus: TokenCorpus, seq_len: int):
        self.corpus, self.seq_len = corpus, seq_len
        self.count = max(corpus.n_tokens - 1, 0) // seq_len

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: np.ndarray) -> Batch:
        buffer = np.empty((len(indices), self.seq_len + 1), np.int64)
        for row, i in zip(buffer, indices.tolist()):
            self.corpus.tokens(i * self.seq_len, i * self.seq_len + self.seq_len + 1, out=row)
        return _split(buffer)


class _PaddedSequences:
    """One document per sequence: BOS, the document, EOS, then padding (ignored in the loss)."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, pad_id: int, seq_len_flag: str):
        self.corpus, self.seq_len, self.pad_id = corpus, seq_len, pad_id
        self.seq_len_flag = seq_len_flag
        lengths = corpus.document_lengths()  # EOS included; BOS adds one
        fits = lengths <= seq_len
        self.documents = np.flatnonzero(fits)
        self.dropped = int((~fits).sum())

    def __len__(self) -> int:
        return len(self.documents)

    def batch(self, indices: np.ndarray) -> Batch:
        buffer = np.full((len(indices), self.seq_len + 1), self.pad_id, np.int64)
        ignore = np.zeros((len(indices), self.seq_len), bool)
        buffer[:, 0] = self.corpus.bos_id
        for row, skip, doc in zip(buffer, ignore, self.documents[indices].tolist()):
            tokens = self.corpus.document(doc)
            row[1 : 1 + len(tokens)] = tokens
            skip[len(tokens) :] = True  # targets past the EOS are padding
        inputs, targets = _split(buffer)
        targets[torch.from_numpy(ignore)] = IGNORE_INDEX
        return inputs, targets

    def report(self, corpus_flag: str) -> None:
        if self.dropped:
            total = self.dropped + len(self.documents)
            print(
                f"padded mode: {self.dropped} of {total} documents of {corpus_flag} "
                f"{self.corpus.path} ({100 * self.dropped / total:.1f}%) do not fit "
                f"{self.seq_len_flag} {self.seq_len} with BOS and EOS and are dropped",
                file=sys.stderr,
            )


def _split(buffer: np.ndarray) -> Batch:
    """(B, S + 1) tokens → contiguous inputs (B, S) and targets (B, S)."""
    return (
        torch.from_numpy(np.ascontiguousarray(buffer[:, :-1])),
        torch.from_numpy(np.ascontiguousarray(buffer[:, 1:])),
    )


def _sequences(
    corpus: TokenCorpus, seq_len: int, batch_size: int, mode: str, pad_id: int, seq_len_flag: str
):
    if mode not in MODES:
        raise UsageError(f"data mode {mode!r}: choose from {', '.join(MODES)}")
    if seq_len < 1:
        raise UsageError(f"{seq_len_flag} {seq_len}: must be positive")
    if batch_size < 1:
        raise UsageError(f"--batch_size {batch_size}: must be positive")
    if mode == "packed":
        return _PackedSequences(corpus, seq_len)
    return _PaddedSequences(corpus, seq_len, pad_id, seq_len_flag)


def _check_batches(
    n_batches: int, sequences, batch_size: int, world_size: int, flag: str, seq_len_flag: str
) -> None:
    if n_batches >= 1:
        return
    if isinstance(sequences, _PackedSequences):
        gives = f"{len(sequences)} windows of {seq_len_flag} {sequences.seq_len} + 1 tokens"
    else:
        gives = (
            f"{len(sequences)} documents that fit in {seq_len_flag} {sequences.seq_len} + 1 "
            "tokens with BOS and EOS"
        )
    raise UsageError(
        f"{flag} {sequences.corpus.path} is too small for one batch: it gives {gives}, and one "
        f"batch needs --batch_size {batch_size} × {world_size} process(es) = "
        f"{batch_size * world_size}; use a larger corpus or a smaller --batch_size or "
        f"{seq_len_flag}"
    )


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")


# -------------------------------------------------------------------------------- training


class TrainWindows:
    """Endless shuffled training batches for one data-parallel rank; resumable exactly.

    Iterate once at a time; ``load_state_dict`` also repositions a running iterator.
    """

    def __init__(
        self,
        corpus: TokenCorpus,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "packed",
        pad_id: int = 1,
        prefetch: int = 2,
        flag: str = "--train_corpus",
    ):
        _check_rank(rank, world_size)
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.mode = seed, rank, world_size, mode
        self.prefetch = prefetch
        self._sequences = _sequences(corpus, seq_len, batch_size, mode, pad_id, "--max_seq_len")
        self.steps_per_epoch: int = len(self._sequences) // (batch_size * world_size)
        _check_batches(
            self.steps_per_epoch, self._sequences, batch_size, world_size, flag, "--max_seq_len"
        )
        if mode == "padded" and rank == 0:
            self._sequences.report(flag)
        self._step = 0  # batches this rank has handed out
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation), replaced whole

    @property
    def step(self) -> int:
        return self._step

    @property
    def epoch(self) -> int:
        return self._step // self.steps_per_epoch

    @property
    def dropped_documents(self) -> int:
        """Documents too long for one sequence in padded mode (0 when packed)."""
        return getattr(self._sequences, "dropped", 0)

    def _permutation(self, epoch: int) -> np.ndarray:
        order = self._order
        if order is None or order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = (epoch, rng.permutation(len(self._sequences)))
            self._order = order
        return order[1]

    def batch(self, step: int) -> Batch:
        """The batch this rank gets at ``step`` (counted from the first epoch)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        first = (k * self.world_size + self.rank) * self.batch_size
        return self._sequences.batch(self._permutation(epoch)[first : first + self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        prefetcher: _Prefetcher | None = None
        try:
            while True:
                step = self._step
                if self.prefetch > 0:
                    if prefetcher is None or prefetcher.next_step != step:  # new or repositioned
                        if prefetcher is not None:
                            prefetcher.close()
                        prefetcher = _Prefetcher(self.batch, step, self.prefetch)
                    batch = prefetcher.get()
                else:
                    batch = self.batch(step)
                self._step = step + 1
                yield batch
        finally:
            if prefetcher is not None:
                prefetcher.close()

    def state_dict(self) -> dict:
        return {
            "step": self._step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "mode": self.mode,
            "fingerprint": self.corpus.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch handed out when ``state`` was taken."""
        flags = {
            "seed": "--seed",
            "seq_len": "--max_seq_len",
            "batch_size": "--batch_size",
            "world_size": "the number of processes",
            "mode": "the data mode",
            "fingerprint": "the training corpus or tokenizer (content fingerprint)",
        }
        mine = self.state_dict()
        diffs = [
            f"{flag}: {state.get(key)} then, {mine[key]} now"
            for key, flag in flags.items()
            if state.get(key) != mine[key]
        ]
        if diffs:
            raise UsageError(
                "cannot resume the data order exactly, these changed: " + "; ".join(diffs)
            )
        self._step = int(state["step"])


class _Prefetcher:
    """Computes ``batch(step)``, ``batch(step + 1)``, ... in a background thread, in order."""

    def __init__(self, batch: Callable[[int], Batch], step: int, depth: int):
        self.next_step = step
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(batch, step), daemon=True, name="TrainWindows-prefetch"
        )
        self._thread.start()

    def _run(self, batch: Callable[[int], Batch], step: int) -> None:
        while not self._stop.is_set():
            try:
                item: Batch | BaseException = batch(step)
            except BaseException as err:  # handed to the consumer, raised there
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return
            step += 1

    def get(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self.next_step += 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------ evaluation


class EvalWindows:
    """A fixed, ordered set of evaluation batches; rank ``r`` of ``W`` takes batches r, r + W, ...
    and every rank gets the same number (the last partial round is left out).

    ``seq_len_flag`` names the window length in messages: training's ``--max_seq_len`` (the
    model's context) or the ``--seq_len`` of the commands that run a trained model."""

    def __init__(
        self,
        corpus: TokenCorpus,
        seq_len: int,
        batch_size: int,
        *,
        mode: str = "packed",
        pad_id: int = 1,
        rank: int = 0,
        world_size: int = 1,
        flag: str = "--eval_corpus",
        seq_len_flag: str = "--max_seq_len",
    ):
        _check_rank(rank, world_size)
        self.corpus, self.batch_size, self.rank, self.world_size = (
            corpus,
            batch_size,
            rank,
            world_size,
        )
        self._sequences = _sequences(corpus, seq_len, batch_size, mode, pad_id, seq_len_flag)
        self._batches = len(self._sequences) // batch_size // world_size
        _check_batches(self._batches, self._sequences, batch_size, world_size, flag, seq_len_flag)
        if mode == "padded" and rank == 0:
            self._sequences.report(flag)

    def __len__(self) -> int:
        return self._batches

    @property
    def dropped_documents(self) -> int:
        return getattr(self._sequences, "dropped", 0)

    def batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """The first ``max_batches`` (default all) of this rank's batches, same order every call."""
        count = self._batches if max_batches is None else min(max_batches, self._batches)
        for j in range(count):
            first = (j * self.world_size + self.rank) * self.batch_size
            yield self._sequences.batch(np.arange(first, first + self.batch_size))


def open_eval_windows(
    corpus: str,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    mode: str = "packed",
    *,
    cache_dir: str | None = None,
    progress: bool = True,
) -> EvalWindows:
    """Fixed-order eval windows of ``--eval_corpus`` (encoded once and cached) for one process."""
    tokens = open_token_corpus(
        corpus, tokenizer, cache_dir=cache_dir, progress=progress, flag="--eval_corpus"
    )
    return EvalWindows(
        tokens,
        seq_len,
        batch_size,
        mode=mode,
        pad_id=tokenizer.padding_id,
        seq_len_flag="--seq_len",
    )
