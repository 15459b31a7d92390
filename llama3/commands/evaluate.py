"""``python -m llama3 evaluate``: loss, perplexity and bits per byte of a checkpoint on fixed
windows of an eval corpus (the loss itself is :mod:`llama3.loss`)."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from llama3.cli import (
    Spelled,
    add_checkpoint_source_flags,
    add_model_flags,
    add_precision_flags,
    add_seq_len_flag,
    add_token_cache_flags,
    model_flag_values,
    seq_len_from_flags,
    spelling,
)
from llama3.errors import UsageError
from llama3.fileio import check_output_file, write_json
from llama3.loss import IGNORE_INDEX, evaluate_loss
from llama3.runtime import Precision, configure_matmul, select_device

if TYPE_CHECKING:
    from llama3.data.dataset import EvalWindows
    from llama3.data.tokenizer import Tokenizer


class ByteCounter:
    """Counts the UTF-8 bytes of the target tokens of batches passing through it.

    Bits per byte = total nats / ln 2 / bytes; unlike loss per token it does not depend on the
    tokenizer, so models with different vocabularies compare.
    """

    def __init__(self, token_bytes: np.ndarray):
        self.table = torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64)
        self.bytes = 0

    def count(self, batches: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for inputs, targets in batches:
            counted = targets[targets != IGNORE_INDEX].cpu()
            self.bytes += int(self.table[counted].sum())
            yield inputs, targets


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """Total nats of ``tokens`` targets at mean ``loss``, in bits, per UTF-8 byte of those
    targets."""
    return loss * tokens / math.log(2) / max(n_bytes, 1)


EVALUATE_DESCRIPTION = """\
Loss, perplexity and bits per byte of a checkpoint on an eval corpus, over fixed windows of
--seq_len tokens (default: the checkpoint's context), or of each of --seq_lens in one call, with the
mean loss by position within the window (--position_buckets ranges of positions). Bits per byte =
total nats / ln 2 / UTF-8 bytes of the counted target tokens, so models with different tokenizers
compare.

Windows longer than the model's context (--max_seq_len of training) measure length extrapolation
and are evaluated whole: the model has no table or buffer sized by its context (RoPE angles and
the softplus scale log(n)/sqrt(r) are computed at each token's true position), so positions past
the context are exactly what the trained weights give there, never seen in training.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = EVALUATE_DESCRIPTION
    source = parser.add_argument_group("checkpoint and data")
    add_checkpoint_source_flags(source)
    source.add_argument(
        "--eval_corpus",
        required=True,
        metavar="PATH",
        help="eval corpus files (.jsonl, .jsonl.zst, .jsonl.gz, .json.gz, .parquet) "
        "or a directory of them",
    )
    add_token_cache_flags(source)
    add_model_flags(parser, from_checkpoint=True)
    group = parser.add_argument_group("evaluation")
    lengths = group.add_mutually_exclusive_group()
    add_seq_len_flag(lengths, "the length of each eval window")
    lengths.add_argument(
        "--seq_lens",
        type=window_lengths,
        metavar="N,N,...",
        help="evaluate at each of these window lengths in one call, e.g. "
        "256,512,1024,2048 (longer than the context: see above)",
    )
    group.add_argument(
        "--position_buckets",
        type=int,
        default=8,
        metavar="K",
        help="report the mean loss over K equal ranges of positions in the window",
    )
    group.add_argument("--batch_size", type=int, default=8, help="windows per batch")
    group.add_argument(
        "--eval_batches",
        "--total_steps",
        dest="eval_batches",
        type=int,
        default=0,
        action=Spelled,
        metavar="N",
        help="batches to evaluate at each length, 0 = the whole eval set; "
        "--total_steps is accepted as an older spelling",
    )
    group.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    group.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars"
    )
    add_precision_flags(parser)


def window_lengths(text: str) -> list[int]:
    """``--seq_lens``: distinct positive integers separated by commas."""
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give positive integers separated by commas"
        ) from None
    if min(lengths) <= 0 or len(set(lengths)) != len(lengths):
        raise argparse.ArgumentTypeError(f"{text!r}: each length must be positive and given once")
    return lengths


def run(args: argparse.Namespace) -> int:
    from llama3.checkpoint import model_from_record, read_checked_record, resolve_model_file
    from llama3.data.dataset import open_eval_windows
    from llama3.data.tokenizer import load_tokenizer

    if args.output:
        check_output_file(args.output, "--output")
    record, model_args = read_checked_record(args.from_checkpoint, model_flag_values(args))
    seq_lens = args.seq_lens or [seq_len_from_flags(args, model_args)]
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    if args.eval_batches < 0:
        raise UsageError(
            f"{spelling(args, 'eval_batches')} must be 0 (all) or more, got {args.eval_batches}"
        )
    if args.position_buckets <= 0:
        raise UsageError(f"--position_buckets must be positive, got {args.position_buckets}")
    device = select_device(args.device)
    configure_matmul(args.allow_tf32)
    precision = Precision.from_flags(args)
    tokenizer = load_tokenizer(args.tokenizer, record.get("tokenizer"), model_args.vocab_size)
    windows = [
        open_eval_windows(
            args.eval_corpus,
            tokenizer,
            seq_len,
            args.batch_size,
            args.data_mode,
            cache_dir=args.cache_dir,
            progress=args.progress,
        )
        for seq_len in seq_lens
    ]  # every length checked before any is evaluated
    model = model_from_record(record, device=device, dtype=precision.param_dtype)
    shared = {
        "checkpoint": str(resolve_model_file(args.from_checkpoint)),
        "step": record.get("step"),
        "eval_corpus": str(args.eval_corpus),
        "tokenizer": str(args.tokenizer),
        "max_seq_len": model_args.max_seq_len,
        "batch_size": args.batch_size,
        "mode": args.data_mode,
        "precision": precision.name,
    }
    longer = [n for n in seq_lens if n > model_args.max_seq_len]
    if longer:
        print(
            f"windows of {', '.join(map(str, longer))} tokens exceed the model's context "
            f"(max_seq_len {model_args.max_seq_len}): evaluated whole, at the true positions"
        )
    results = []
    for seq_len, length_windows in zip(seq_lens, windows):
        results.append(
            evaluate_windows(model, seq_len, length_windows, tokenizer, args, device, precision)
        )
        print_summary(shared | results[-1])
    summary = shared | (results[0] if len(results) == 1 else {"lengths": results})
    if args.output:
        print(f"results: {write_json(args.output, summary)}")
    return 0


def evaluate_windows(
    model: torch.nn.Module,
    seq_len: int,
    windows: EvalWindows,
    tokenizer: Tokenizer,
    args: argparse.Namespace,
    device: torch.device,
    precision: Precision,
) -> dict[str, Any]:
    """Loss, bits per byte and loss by position over the first --eval_batches batches."""
    n_batches = len(windows) if args.eval_batches == 0 else min(args.eval_batches, len(windows))
    counter = ByteCounter(tokenizer.token_bytes())
    batches = tqdm(
        windows.batches(max_batches=n_batches),
        total=n_batches,
        unit="batch",
        desc=f"evaluating {seq_len}",
        disable=not args.progress,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    result = evaluate_loss(model, counter.count(batches), device, precision)
    seconds = time.perf_counter() - start
    return {
        "seq_len": seq_len,
        "batches": result.batches,
        "tokens": result.tokens,
        "bytes": counter.bytes,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "bits_per_byte": bits_per_byte(result.loss, result.tokens, counter.bytes),
        "seconds": seconds,
        "tokens_per_s": result.tokens / max(seconds, 1e-9),
        "positions": result.position_buckets(args.position_buckets),
    }


def print_summary(s: dict[str, Any]) -> None:
    print(
        f"loss {s['loss']:.4f}  perplexity {s['perplexity']:.2f}  bits/byte "
        f"{s['bits_per_byte']:.4f}  ({s['tokens']} tokens, {s['bytes']} bytes, {s['batches']} "
        f"batches of {s['batch_size']}×{s['seq_len']}, {s['mode']}, {s['precision']}, "
        f"{s['tokens_per_s']:.0f} tokens/s)"
    )
    print(
        "  by position: "
        + "  ".join(
            f"[{b['start']}, {b['end']}) {b['loss']:.4f}"
            for b in s["positions"]
            if b["loss"] is not None
        )
    )
