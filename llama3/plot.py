"""``python -m llama3 plot RUN... --output PNG``: train and eval loss curves of runs in one figure.

Each RUN is a run directory (``--to_checkpoint`` of train/multitrain) or its ``metrics.jsonl``.
The left panel shows the training loss of every step, the right one the held-out loss of every
evaluation; the x axis is the optimizer step, the tokens trained on, or the wall-clock time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llama3.errors import UsageError
from llama3.training.metrics import METRICS_FILE

X_AXES = {"step": ("step", "optimizer step"), "tokens": ("tokens", "tokens trained on"),
          "time": ("elapsed_s", "wall-clock hours")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories (or their metrics.jsonl files)")
    parser.add_argument("--output", required=True, metavar="PNG", help="image file to write")
    parser.add_argument("--x", choices=tuple(X_AXES), default="step",
                        help="x axis: optimizer step, tokens trained on, or wall-clock time")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="legend entries, one per RUN (default: the run directory names)")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="exponential moving average of the training loss, in [0, 1): "
                             "weight of the past (0: raw)")
    parser.add_argument("--title", default=None, help="figure title")


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of one run (a directory or its metrics.jsonl)."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{run}: no {METRICS_FILE} there (give a train/multitrain run directory)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}, line {n}: not JSON ({err})") from err
    return records


def series(records: list[dict[str, Any]], kind: str, x: str) -> tuple[list[float], list[float]]:
    """(x values, losses) of the records of one kind ("train" or "eval")."""
    key = X_AXES[x][0]
    scale = 1 / 3600 if x == "time" else 1
    points = [(r[key] * scale, r["loss"]) for r in records
              if r.get("kind") == kind and r.get(key) is not None and r.get("loss") is not None]
    return [p[0] for p in points], [p[1] for p in points]


def smoothed(values: list[float], weight: float) -> list[float]:
    out, average = [], None
    for v in values:
        average = v if average is None else weight * average + (1 - weight) * v
        out.append(average)
    return out


def run(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.runs):
        raise UsageError(f"--labels gives {len(args.labels)} names for {len(args.runs)} runs")
    if not 0 <= args.smooth < 1:
        raise UsageError(f"--smooth must be in [0, 1), got {args.smooth}")
    labels = args.labels or [_label(r) for r in args.runs]
    curves = [(label, read_metrics(r)) for label, r in zip(labels, args.runs)]
    path = draw(curves, args.output, x=args.x, smooth=args.smooth, title=args.title)
    print(f"wrote {path}")
    return 0


def draw(curves: list[tuple[str, list[dict[str, Any]]]], output: str | Path, *, x: str = "step",
         smooth: float = 0.0, title: str | None = None) -> Path:
    """Write the figure; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UsageError("plot needs matplotlib: pip install matplotlib") from err
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for i, (label, records) in enumerate(curves):
        color = f"C{i % 10}"
        xs, losses = series(records, "train", x)
        train_ax.plot(xs, smoothed(losses, smooth), color=color, linewidth=1, label=label)
        xs, losses = series(records, "eval", x)
        eval_ax.plot(xs, losses, color=color, marker="o", markersize=3, label=label)
    for ax, name in ((train_ax, "train loss"), (eval_ax, "eval loss")):
        ax.set_title(name)
        ax.set_xlabel(X_AXES[x][1])
        ax.set_ylabel("cross entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def _label(run: str) -> str:
    path = Path(run)
    return (path.parent if path.name == METRICS_FILE else path).name or str(path)
