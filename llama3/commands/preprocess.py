"""``python -m llama3 preprocess``: clean raw corpora and split them into train and eval shards
(:func:`llama3.data.preprocess.clean_and_split`), printing what was kept and what was bad input."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llama3.cli import add_bad_input_flags, add_cleaning_flags, problem_log_from_flags
from llama3.data.clean import Cleaner
from llama3.data.preprocess import NoDocuments, Splitter, Totals, clean_and_split
from llama3.data.sources import FORMATS, REPORT_SUFFIX, ProblemLog, find_corpus_files
from llama3.errors import UsageError
from llama3.fileio import check_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input and output")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help=f'{FORMATS} files (parquet: its "text" column, read with pyarrow, '
        "the parquet extra), or directories searched recursively for them",
    )
    group.add_argument(
        "--output",
        default="pretrain_data",
        metavar="DIR",
        help="output directory: DIR/train and DIR/eval receive the shards",
    )
    group.add_argument(
        "--shard_size_mb",
        type=float,
        default=256.0,
        help="uncompressed size at which a shard closes (at the next line end)",
    )
    group.add_argument(
        "--compress",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write .jsonl.zst shards (needs zstandard) instead of plain .jsonl",
    )
    group = parser.add_argument_group("split")
    group.add_argument(
        "--split_ratio",
        type=float,
        default=0.9,
        help="share of documents that go to train; the rest go to eval",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="key of the document hash that decides the split (another seed, another split)",
    )
    add_cleaning_flags(parser)
    add_bad_input_flags(parser)
    group = parser.add_argument_group("performance")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes that parse and clean (output is identical for any number)",
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar",
    )


def _check_flags(args: argparse.Namespace) -> None:
    if not 0.0 <= args.split_ratio <= 1.0:
        raise UsageError(f"--split_ratio {args.split_ratio}: must be between 0 and 1 (train share)")
    if args.shard_size_mb <= 0:
        raise UsageError(f"--shard_size_mb {args.shard_size_mb}: must be positive")
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    output = check_output_dir(args.output, "--output")
    files = [
        f
        for f in find_corpus_files(args.input, "--input")  # never read our own output
        if not f.resolve().is_relative_to(output.resolve())
    ]
    if not files:
        raise UsageError(f"--input {' '.join(args.input)}: only files inside --output {output}")
    log = problem_log_from_flags(args, report=output / f"preprocess{REPORT_SUFFIX}")
    start = time.perf_counter()
    try:
        shards, totals = clean_and_split(
            files,
            output,
            Cleaner.from_flags(args),
            Splitter(args.split_ratio, args.seed),
            log,
            shard_bytes=int(args.shard_size_mb * 2**20),
            compress=args.compress,
            workers=args.workers,
            progress=args.progress,
            what="--output ",
        )
    except NoDocuments as err:
        raise UsageError(f"--input {' '.join(args.input)}: {err}") from err
    _print_summary(files, output, shards, totals, log, time.perf_counter() - start)
    return 0


def _print_summary(
    files: list[Path],
    output: Path,
    shards: dict[str, list[dict]],
    totals: Totals,
    log: ProblemLog,
    seconds: float,
) -> None:
    mb = totals.raw_bytes / 1e6
    parts = [
        f"{s} {sum(x['documents'] for x in v)} documents in {len(v)} shard(s)"
        for s, v in shards.items()
    ]
    print(
        f"preprocessed {len(files)} file(s), {mb:.1f} MB in {seconds:.1f} s "
        f"({mb / max(seconds, 1e-9):.1f} MB/s): {', '.join(parts)} → {output}"
    )
    if totals.empty:
        print(f"dropped {totals.empty} document(s) left empty by cleaning")
    for split, written in shards.items():
        if not written:
            print(f"warning: the {split} split is empty (see --split_ratio)", file=sys.stderr)
    print(log.summary(), file=sys.stderr if log.total else sys.stdout)
