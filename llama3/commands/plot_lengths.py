"""``python -m llama3 plot_lengths EVAL.json... --output PNG``: length extrapolation of several
models in one figure (:mod:`llama3.plot_lengths`), from the JSON files of ``evaluate --output``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llama3.commands.plot import image_path
from llama3.errors import UsageError
from llama3.fileio import check_output_file
from llama3.plot_lengths import draw, read_evaluation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "evaluations",
        nargs="+",
        metavar="EVAL_JSON",
        help="files written by evaluate --output, one per model",
    )
    parser.add_argument("--output", required=True, metavar="PNG", help="image file to write")
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="legend entries, one per file (default: the file names)",
    )
    parser.add_argument(
        "--seq_len",
        type=int,
        default=None,
        metavar="N",
        help="window length whose loss by position is drawn (default: the longest in each file)",
    )
    parser.add_argument("--title", default=None, help="figure title")


def run(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.evaluations):
        raise UsageError(
            f"--labels gives {len(args.labels)} names for {len(args.evaluations)} files"
        )
    output = check_output_file(image_path(args.output), "--output")
    labels = args.labels or [Path(p).stem for p in args.evaluations]
    evaluations = [read_evaluation(p) for p in args.evaluations]
    chosen = [pick_length(e, args.seq_len, p) for e, p in zip(evaluations, args.evaluations)]
    path = draw(list(zip(labels, evaluations, chosen)), output, title=args.title)
    print(f"wrote {path}")
    return 0


def pick_length(evaluation: dict[str, Any], seq_len: int | None, path: str) -> dict[str, Any]:
    """The result at ``seq_len`` (default: the longest window)."""
    if seq_len is None:
        return evaluation["lengths"][-1]
    for result in evaluation["lengths"]:
        if result["seq_len"] == seq_len:
            return result
    held = ", ".join(str(r["seq_len"]) for r in evaluation["lengths"])
    raise UsageError(f"{path} holds no window of --seq_len {seq_len} (it holds {held})")
