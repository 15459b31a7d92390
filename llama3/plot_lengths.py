"""Length extrapolation of several models in one figure (``python -m llama3 plot_lengths``), from
the JSON files of ``evaluate --output`` (with ``--seq_lens`` or ``--seq_len``).

The left panel shows the mean eval loss at each window length, the right one the mean loss by
position within one window length (the longest each file holds, or one chosen). A dotted line
marks each model's training context: what lies right of it, the model never saw in training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama3.errors import UsageError
from llama3.plot import pyplot, save_figure


def read_evaluation(path: str | Path) -> dict[str, Any]:
    """One evaluate result: the model's context and its lengths, each with its position buckets."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise UsageError(f"{path}: cannot read evaluate's JSON ({err})") from err
    lengths = data.get("lengths", [data]) if isinstance(data, dict) else []
    if (
        not isinstance(lengths, list)
        or not lengths
        or not all(map(_is_length, lengths))
        or not _is_count(data.get("max_seq_len"), missing=True)
    ):
        raise UsageError(
            f"{path}: not a file of evaluate --output with losses by position "
            "(write it again with this version's evaluate)"
        )
    return {
        "max_seq_len": data.get("max_seq_len"),
        "lengths": sorted(lengths, key=lambda r: r["seq_len"]),
    }


def _is_length(result: Any) -> bool:
    """Whether ``result`` is what evaluate writes for one window length."""
    return (
        isinstance(result, dict)
        and _is_count(result.get("seq_len"))
        and _is_number(result.get("loss"))
        and isinstance(result.get("positions"), list)
        and all(
            isinstance(b, dict)
            and _is_count(b.get("start"))
            and _is_count(b.get("end"))
            and _is_number(b.get("loss"), missing=True)
            for b in result["positions"]
        )
    )


def _is_count(value: Any, missing: bool = False) -> bool:
    return (value is None and missing) or (isinstance(value, int) and not isinstance(value, bool))


def _is_number(value: Any, missing: bool = False) -> bool:
    return _is_count(value, missing) or isinstance(value, float)


def draw(
    models: list[tuple[str, dict[str, Any], dict[str, Any]]],
    output: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """``models``: (label, evaluation, the length drawn by position) each. Returns the path."""
    plt = pyplot()
    fig, (by_length, by_position) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, evaluation, chosen) in enumerate(models):
        color = f"C{i % 10}"
        lengths = evaluation["lengths"]
        by_length.plot(
            [r["seq_len"] for r in lengths],
            [r["loss"] for r in lengths],
            color=color,
            marker="o",
            markersize=4,
            label=label,
        )
        buckets = [b for b in chosen["positions"] if b["loss"] is not None]
        by_position.plot(
            [(b["start"] + b["end"] - 1) / 2 for b in buckets],
            [b["loss"] for b in buckets],
            color=color,
            marker="o",
            markersize=3,
            label=f"{label} ({chosen['seq_len']} tokens)",
        )
    contexts = sorted({e["max_seq_len"] for _, e, _ in models if e["max_seq_len"]})
    for ax in (by_length, by_position):
        for context in contexts:
            ax.axvline(context, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel("cross entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    by_length.set_xscale("log", base=2)
    ticks = sorted({r["seq_len"] for _, e, _ in models for r in e["lengths"]})
    by_length.set_xticks(ticks, labels=[str(t) for t in ticks])
    by_length.minorticks_off()
    by_length.set_title("eval loss by window length (dotted: training context)")
    by_length.set_xlabel("window length (tokens)")
    by_position.set_title("eval loss by position in the window")
    by_position.set_xlabel("position (middle of each bucket)")
    return save_figure(fig, output, title)
