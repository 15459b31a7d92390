"""benchmarks/ablations.py's bookkeeping: a trial that diverged is a result (recorded, never rerun,
left out of the best rate and the seeds' statistics), not a failure."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import ablations
from llama3.training.metrics import METRICS_FILE, SUMMARY_FILE


def write_run(setup: ablations.Setup, t: ablations.Trial, losses: list[float], status: str) -> None:
    run = ablations.run_dir(setup, t)
    run.mkdir(parents=True)
    records = [
        {"kind": "eval", "step": 3 * (i + 1), "tokens": 384 * (i + 1), "loss": x}
        for i, x in enumerate(losses)
    ]
    (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "status": status,
        "steps": 6 if status == "completed" else 4,
        "parameters": 1000,
        "tokens": 768,
        "elapsed_s": 6.0,
        "final_eval_loss": losses[-1],
    }
    (run / SUMMARY_FILE).write_text(json.dumps(summary))


@pytest.fixture
def setup(tmp_path: Path) -> ablations.Setup:
    return ablations.Setup(ablations.TINY, None, tmp_path, 1)


def only_softmax(plan: ablations.Plan) -> ablations.Plan:
    return replace(plan, models={"softmax": plan.models["softmax"]})


def sweep(model: str) -> list[ablations.Trial]:
    return [
        t
        for t in ablations.first_trials(ablations.TINY, ["lr"])
        if t.model == model and "lr" in t.groups
    ]


def test_a_diverged_trial_is_completed_and_recorded_without_a_loss(setup):
    low, high = sweep("softmax")
    write_run(setup, low, [5.0, 4.5], "completed")
    write_run(setup, high, [5.5, math.nan], "non-finite")
    assert ablations.completed(setup, low) and ablations.completed(setup, high)
    diverged = ablations.result(setup, high)
    assert diverged["final_eval_loss"] is None and diverged["diverged_at_step"] == 5
    assert [p["loss"] for p in diverged["eval_curve"]] == [5.5, None]
    json.dumps(diverged, allow_nan=False)  # standard JSON
    results = [ablations.result(setup, t) for t in (low, high)]
    best = ablations.best_rates(results, only_softmax(ablations.TINY))
    assert best == {"softmax": low.lr}


def test_an_interrupted_trial_is_not_completed(setup):
    (t,) = sweep("softmax")[:1]
    write_run(setup, t, [5.0], "interrupted")
    assert not ablations.completed(setup, t)


def test_seed_statistics_leave_a_diverged_seed_out(setup):
    plan = ablations.TINY
    runs = [ablations.trial(plan, "softmax", "seeds", lr=3e-3, seed=s) for s in (0, 1, 2)]
    write_run(setup, runs[0], [5.0, 4.0], "completed")
    write_run(setup, runs[1], [5.2, 4.2], "completed")
    write_run(setup, runs[2], [5.4, math.nan], "non-finite")
    results = [ablations.result(setup, t) for t in runs]
    stats = ablations.seed_statistics(results, only_softmax(plan), {"softmax": 3e-3})["softmax"]
    assert stats["losses"] == [4.0, 4.2, None] and stats["diverged"] == 1
    assert stats["mean"] == pytest.approx(4.1)
    assert stats["std"] == pytest.approx(math.sqrt(0.02))
    assert stats["curve"][0]["mean"] == pytest.approx(5.2)


SETTINGS = {k: 1 for k in ablations.RESULT_SETTINGS}


def results_file(path: Path, settings: dict, trials: list[dict]) -> Path:
    path.write_text(json.dumps({"settings": settings, "trials": trials}))
    return path


def test_reused_trials_come_from_the_earlier_file_unless_run_here(setup, tmp_path):
    low, high = sweep("softmax")
    write_run(setup, low, [5.0, 4.5], "completed")
    earlier = [
        {**ablations.result(setup, low), "final_eval_loss": 9.0, "groups": ["width"]},
        {**ablations.result(setup, low), "key": high.key, "final_eval_loss": 4.25},
    ]
    known = ablations.recorded(results_file(tmp_path / "r.json", SETTINGS, earlier), SETTINGS)
    assert set(known) == {low.key, high.key}
    assert ablations.result_or_recorded(setup, low, known)["final_eval_loss"] == 4.5  # run here
    reused = ablations.result_or_recorded(setup, high, known)
    assert reused["final_eval_loss"] == 4.25 and reused["groups"] == ["lr"]
    assert ablations.recorded(None, SETTINGS) == {}


def test_reuse_refuses_a_file_of_other_settings_or_no_results(tmp_path):
    other = {**SETTINGS, "threads": 2}
    with pytest.raises(SystemExit, match=r"other settings \(threads 2, here 1\)"):
        ablations.recorded(results_file(tmp_path / "r.json", other, []), SETTINGS)
    (tmp_path / "bad.json").write_text("[1, 2]")
    for path in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit, match="not a results file of this benchmark"):
            ablations.recorded(path, SETTINGS)
