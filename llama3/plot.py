"""Train and eval loss curves of runs in one figure (``python -m llama3 plot``).

A run's records come from its ``metrics.jsonl`` (:func:`read_metrics`; a last line cut short, by a
run killed while writing it, is skipped with a warning). :func:`draw` shows the training loss of
every step on the left and the held-out loss of every evaluation on the right; the x axis is the
optimizer step, the tokens trained on, or the wall-clock time. The image type follows the
extension of the output; the file is replaced only once complete (:func:`save_figure`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llama3.errors import UsageError
from llama3.fileio import staged_file
from llama3.training.metrics import METRICS_FILE

X_AXES = {
    "step": ("step", "optimizer step"),
    "tokens": ("tokens", "tokens trained on"),
    "time": ("elapsed_s", "wall-clock hours"),
}


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of one run (a directory or its metrics.jsonl)."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{run}: no {METRICS_FILE} there (give a train/multitrain run directory)")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if n == len(lines):  # the line a killed run was writing
                    print(f"warning: {path}, line {n}: cut short, skipped", file=sys.stderr)
                    break
                raise UsageError(f"{path}, line {n}: not JSON ({err})") from err
    return records


def series(records: list[dict[str, Any]], kind: str, x: str) -> tuple[list[float], list[float]]:
    """(x values, losses) of the records of one kind ("train" or "eval")."""
    key = X_AXES[x][0]
    scale = 1 / 3600 if x == "time" else 1
    points = [
        (r[key] * scale, r["loss"])
        for r in records
        if r.get("kind") == kind and r.get(key) is not None and r.get("loss") is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def smoothed(values: list[float], weight: float) -> list[float]:
    out, average = [], None
    for v in values:
        average = v if average is None else weight * average + (1 - weight) * v
        out.append(average)
    return out


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend; a clear error when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UsageError("plot needs matplotlib: pip install matplotlib") from err
    return plt


def draw(
    curves: list[tuple[str, list[dict[str, Any]]]],
    output: str | Path,
    *,
    x: str = "step",
    smooth: float = 0.0,
    title: str | None = None,
) -> Path:
    """Write the figure (its type from the extension of ``output``); returns its path."""
    plt = pyplot()
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
    return save_figure(fig, output, title)


def save_figure(fig: Any, output: str | Path, title: str | None = None) -> Path:
    """Title, lay out, write (its type from the extension of ``output``) and close ``fig``;
    returns the path written."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    try:
        with staged_file(output, what="the figure ") as staging:
            fig.savefig(staging, dpi=120, format=output.suffix[1:].lower() or "png")
    finally:
        pyplot().close(fig)
    return output
