"""``python -m llama3 train_tokenizer``: a SentencePiece BPE tokenizer trained on a corpus
(:func:`llama3.data.tokenizer.train_tokenizer`), with its vocabulary, cleaning record and report of
bad input beside it."""

from __future__ import annotations

import argparse
import sys

from llama3.cli import add_bad_input_flags, problem_log_from_flags
from llama3.data.sources import REPORT_SUFFIX
from llama3.data.tokenizer import Tokenizer, train_tokenizer
from llama3.fileio import check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("corpus and output")
    group.add_argument(
        "--train_corpus",
        nargs="+",
        required=True,
        metavar="PATH",
        help="corpus files (.jsonl, .jsonl.zst, .jsonl.gz, .json.gz, .parquet) or "
        "directories (e.g. pretrain_data/train)",
    )
    group.add_argument(
        "--model_file",
        default="tokenizer.model",
        help="where to write the SentencePiece model (beside it: NAME.vocab, the "
        "vocabulary; NAME.cleaning.json, the cleaning its training text went "
        "through; NAME.bad_input.tsv, any bad input)",
    )
    group = parser.add_argument_group("vocabulary")
    group.add_argument("--vocab_size", type=int, default=2048, help="tokens in the vocabulary")
    group.add_argument(
        "--n_most_frequent_words",
        type=int,
        default=100,
        help="most frequent words added as whole-word symbols",
    )
    group.add_argument(
        "--byte_fallback",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="encode characters outside the vocabulary as UTF-8 byte tokens instead of <unk>",
    )
    group.add_argument(
        "--character_coverage",
        type=float,
        default=0.9995,
        help="share of characters the vocabulary must cover; the rarest rest "
        "become <unk> (or bytes)",
    )
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--input_sentence_size",
        type=int,
        default=1_000_000,
        help="sentences (lines) sampled from the corpus for training; 0 = all",
    )
    group.add_argument(
        "--max_sentence_length",
        type=int,
        default=4192,
        help="longest sentence in bytes; longer lines are split at spaces",
    )
    group.add_argument(
        "--word_sample_mb",
        type=float,
        default=64.0,
        help="text over which words are counted, taken from every file in proportion to its size",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the sentence sample: same corpus, flags and seed → byte-identical model",
    )
    add_bad_input_flags(parser)
    group = parser.add_argument_group("output")
    group.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress"
    )
    group.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")


def run(args: argparse.Namespace) -> int:
    model_file = check_output_file(args.model_file, "--model_file")
    log = problem_log_from_flags(args, report=model_file.with_suffix(REPORT_SUFFIX))
    path = train_tokenizer(
        args.train_corpus,
        args.model_file,
        args.vocab_size,
        input_sentence_size=args.input_sentence_size,
        n_most_frequent_words=args.n_most_frequent_words,
        max_sentence_length=args.max_sentence_length,
        seed=args.seed,
        byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage,
        word_sample_mb=args.word_sample_mb,
        log=log,
        progress=args.progress,
        verbose=args.verbose,
    )
    tokenizer = Tokenizer(path, flag="--model_file")
    print(
        f"tokenizer: {path} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.sha256[:12]}; "
        f"cleaning of its training text: {tokenizer.cleaner.describe()})"
    )
    print(log.summary(), file=sys.stderr if log.total else sys.stdout)
    return 0
