"""python -m benchmarks.quality --tiny end to end (data, three trainings, evaluation at four
lengths, figures), run twice (side by side, one thread each) to show a rerun gives the same
numbers; and plot_lengths on what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_ablations import command


def quality(side_by_side, corpus: dict[str, Path], tokenizer: Path, *works: Path) -> list[dict]:
    """The results of ``python -m benchmarks.quality --tiny`` run into each of ``works``, the runs
    side by side (one thread each)."""
    done = side_by_side(
        *[command("quality", corpus, tokenizer, work, "--threads", "1") for work in works]
    )
    for run in done:
        assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads((work / "quality.json").read_text()) for work in works]


def untimed(models: dict) -> dict:
    """The per-model details without what the clock measures."""
    return {
        name: {
            "eval_curve": m["eval_curve"],
            "lengths": [
                {k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")}
                for r in m["lengths"]
            ],
        }
        for name, m in models.items()
    }


def test_tiny_quality_benchmark_reruns_identically(
    tiny_corpus, tiny_tokenizer, tmp_path, capsys, side_by_side
):
    from llama3.__main__ import main

    first, second = quality(
        side_by_side, tiny_corpus, tiny_tokenizer, tmp_path / "a", tmp_path / "b"
    )
    assert [r["model"] for r in first["rows"]] == [
        "softmax",
        "softplus-16",
        "softplus-40",
        "softplus-40-none",
    ]
    assert first["settings"]["eval_lengths"] == [32, 64, 128, 256]
    assert first["timing"]["method"].startswith("wall clock")
    for a, b in zip(first["rows"], second["rows"]):
        assert {k: v for k, v in a.items() if k != "train_minutes"} == {
            k: v for k, v in b.items() if k != "train_minutes"
        }
        assert a["train_tokens"] == 6 * 4 * 32
        assert a["loss_8x"] == pytest.approx((a["loss_8x_inside"] + 7 * a["loss_8x_past"]) / 8)
    assert untimed(first["models"]) == untimed(second["models"])  # curves, losses by position
    for figure in first["figures"]:
        assert (tmp_path / "a" / figure).stat().st_size > 10_000

    evaluations = sorted(str(p) for p in (tmp_path / "a" / "eval").glob("*.json"))
    assert (
        main(
            [
                "plot_lengths",
                *evaluations,
                "--seq_len",
                "64",
                "--output",
                str(tmp_path / "lengths.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "lengths.png").stat().st_size > 10_000
    assert (
        main(
            [
                "plot_lengths",
                evaluations[0],
                "--seq_len",
                "100",
                "--output",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "holds no window of --seq_len 100 (it holds 32, 64, 128, 256)" in capsys.readouterr().err
    assert (
        main(
            [
                "plot_lengths",
                str(tmp_path / "a" / "quality.json"),
                "--output",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "not a file of evaluate --output" in capsys.readouterr().err
