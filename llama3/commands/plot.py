"""``python -m llama3 plot RUN... --output PNG``: train and eval loss curves of runs in one figure
(:mod:`llama3.plot`).

Each RUN is a run directory (``--to_checkpoint`` of train/multitrain) or its ``metrics.jsonl``.
The image type follows the extension of ``--output`` (PNG without one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama3.errors import UsageError
from llama3.fileio import check_output_file
from llama3.plot import X_AXES, draw, pyplot, read_metrics
from llama3.training.metrics import METRICS_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories (or their metrics.jsonl files)"
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="PNG",
        help="image file to write; its extension gives the type (.png, .pdf, "
        ".svg, ...; .png is added when there is none)",
    )
    parser.add_argument(
        "--x",
        choices=tuple(X_AXES),
        default="step",
        help="x axis: optimizer step, tokens trained on, or wall-clock time",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="legend entries, one per RUN (default: the run directory names)",
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="exponential moving average of the training loss, in [0, 1): "
        "weight of the past (0: raw)",
    )
    parser.add_argument("--title", default=None, help="figure title")


def run(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.runs):
        raise UsageError(f"--labels gives {len(args.labels)} names for {len(args.runs)} runs")
    if not 0 <= args.smooth < 1:
        raise UsageError(f"--smooth must be in [0, 1), got {args.smooth}")
    output = check_output_file(image_path(args.output), "--output")
    labels = args.labels or [_label(r) for r in args.runs]
    curves = [(label, read_metrics(r)) for label, r in zip(labels, args.runs)]
    path = draw(curves, output, x=args.x, smooth=args.smooth, title=args.title)
    print(f"wrote {path}")
    return 0


def image_path(output: str | Path) -> Path:
    """``--output`` with ".png" added when it has no extension; UsageError for a type matplotlib
    cannot write."""
    output = Path(output)
    if output.is_dir():
        raise UsageError(
            f"--output {output} is a directory: give a file name such as {output / 'curves.png'}"
        )
    if not output.suffix:
        return output.with_name(output.name + ".png")
    pyplot()  # matplotlib is there
    from matplotlib.backend_bases import FigureCanvasBase

    types = FigureCanvasBase.get_supported_filetypes()
    if output.suffix[1:].lower() not in types:
        raise UsageError(
            f"--output {output}: matplotlib cannot write {output.suffix} images; use "
            + ", ".join(f".{t}" for t in sorted(types))
        )
    return output


def _label(run: str) -> str:
    path = Path(run)
    return (path.parent if path.name == METRICS_FILE else path).name or str(path)
