"""``python -m llama3 pretokenize``: encode corpora into their cached token shards up front
(:func:`llama3.data.tokens.open_token_corpus`; every command that opens a corpus would build them
on demand)."""

from __future__ import annotations

import argparse

from llama3.cli import (
    add_bad_input_flags,
    add_token_cache_flags,
    add_tokenizer_flag,
    problem_log_from_flags,
)
from llama3.data.sources import FORMATS
from llama3.data.tokenizer import Tokenizer
from llama3.data.tokens import open_token_corpus
from llama3.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("corpus and tokenizer")
    group.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        metavar="PATH",
        help="corpora to encode: split directories (pretrain_data/train) or "
        f"{FORMATS} files or directories",
    )
    add_tokenizer_flag(group)
    group = parser.add_argument_group("cache")
    add_token_cache_flags(group, data_mode=False)
    group.add_argument(
        "--rebuild", action="store_true", help="encode again even if the cache is current"
    )
    add_bad_input_flags(parser)
    group = parser.add_argument_group("performance")
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="encoding processes; None: every available core, one per 4 MB of input at most",
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar",
    )


def run(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer(args.tokenizer)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    for path in args.corpus:
        corpus = open_token_corpus(
            path,
            tokenizer,
            cache_dir=args.cache_dir,
            workers=args.workers,
            progress=args.progress,
            log=problem_log_from_flags(args),
            rebuild=args.rebuild,
        )
        print(
            f"{path}: {corpus.n_documents:,} documents, {corpus.n_tokens:,} tokens, "
            f"{corpus.n_bytes:,} bytes "
            f"({corpus.n_bytes / max(corpus.n_tokens, 1):.2f} bytes/token), "
            f"{corpus.dtype.name}, fingerprint {corpus.fingerprint} → {corpus.cache_dir}"
        )
    return 0
