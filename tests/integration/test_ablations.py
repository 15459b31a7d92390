"""python -m benchmarks.ablations --tiny: the trials of a few groups end to end, the best rate and
its seeds, figures; a rerun finds every trial completed and reports the same numbers. And
python -m benchmarks.interventions --tiny: with no intervention it repeats the ablation's trial
exactly."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def command(
    name: str, corpus: dict[str, Path], tokenizer: Path, work: Path, *flags: str
) -> list[str]:
    """``python -m benchmarks.NAME --tiny FLAGS`` on the tiny corpus, into ``work``."""
    return [
        sys.executable,
        "-m",
        f"benchmarks.{name}",
        "--tiny",
        *flags,
        "--train_corpus",
        str(corpus["train"]),
        "--eval_corpus",
        str(corpus["eval"]),
        "--tokenizer",
        str(tokenizer),
        "--work_dir",
        str(work),
    ]


PARALLEL = ("--jobs", "2", "--threads", "1")  # two trials at a time, one thread each


def result(name: str, work: Path, done: subprocess.CompletedProcess) -> tuple[dict, str]:
    """The results file the run wrote, and its output."""
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return json.loads((work / f"{name}.json").read_text()), done.stdout


def benchmark(
    name: str, corpus: dict[str, Path], tokenizer: Path, work: Path, *flags: str
) -> tuple[dict, str]:
    done = subprocess.run(
        command(name, corpus, tokenizer, work, *flags, *PARALLEL),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result(name, work, done)


GROUPS = ("--groups", "width", "seeds")


def ablations(
    corpus: dict[str, Path], tokenizer: Path, work: Path, *flags: str
) -> tuple[dict, str]:
    return benchmark("ablations", corpus, tokenizer, work, *GROUPS, *flags)


@pytest.fixture(scope="module")
def first(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("ablations")
    return ablations(tiny_corpus, tiny_tokenizer, work)[0], work


def test_tiny_ablations_run_resume_and_agree(first, tiny_corpus, tiny_tokenizer, side_by_side):
    first, tmp_path = first
    trials = {t["key"]: t for t in first["trials"]}
    groups = {g for t in trials.values() for g in t["groups"]}
    assert groups == {"width", "lr", "seeds"}
    # width: r = 16 ≤ dim 32 runs once; r = 40 with and without the output scale
    width = sorted(
        (t["model"], t["flags"].get("core_output_scale"))
        for t in trials.values()
        if "width" in t["groups"]
    )
    assert width == [("softplus-16", None), ("softplus-40", "width"), ("softplus-40-none", "none")]
    for model, best in first["best_rates"].items():
        sweep = [t for t in trials.values() if "lr" in t["groups"] and t["model"] == model]
        assert len(sweep) == 2 and best == min(sweep, key=lambda t: t["final_eval_loss"])["lr"]
        seeds = first["seeds"][model]
        runs = [t for t in trials.values() if "seeds" in t["groups"] and t["model"] == model]
        assert sorted(t["seed"] for t in runs) == [0, 1] and {t["lr"] for t in runs} == {best}
        assert seeds["mean"] == pytest.approx(statistics.mean(seeds["losses"]))
        assert seeds["std"] == pytest.approx(statistics.stdev(seeds["losses"]))
    for t in trials.values():
        assert t["tokens"] == 6 * 4 * 32 and len(t["eval_curve"]) == 2
        assert [d["step"] for d in t["diagnostics"]] == [3, 6]
    for figure in first["figures"]:
        assert (tmp_path / figure).stat().st_size > 10_000
    # as initialised, the output scale divides block 0's branch by r / dim = 40 / 32 exactly
    initial = first["initial_branch"]
    assert set(initial) == set(first["best_rates"]) and len(initial["softmax"]) == 2
    for scaled, unscaled in zip(initial["softplus-40"], initial["softplus-40-none"]):
        assert scaled[0] == pytest.approx(unscaled[0] * 32 / 40, rel=1e-5)
    early = first["early_branch"]
    assert early["step"] == 6 and len(early["rows"]) == len(trials)
    ratios = [r["block0_branch_ratio"] for r in early["rows"]]
    assert ratios == sorted(ratios) and all(x > 0 for x in ratios)

    # a rerun, and elsewhere a run given the first results (a copy, which the rerun leaves as it
    # is), side by side: neither trains
    shutil.copy(tmp_path / "ablations.json", tmp_path / "first.json")
    reuse = ("--reuse", str(tmp_path / "first.json"))
    elsewhere = tmp_path / "elsewhere"
    rerun, reused = side_by_side(
        command("ablations", tiny_corpus, tiny_tokenizer, tmp_path, *GROUPS, *PARALLEL),
        command("ablations", tiny_corpus, tiny_tokenizer, elsewhere, *GROUPS, *reuse, *PARALLEL),
    )
    second, out = result("ablations", tmp_path, rerun)
    counts = re.findall(r"(\d+) of (\d+) trials already completed", out)
    assert counts == [("8", "8"), (str(len(trials)), str(len(trials)))]  # the sweep, then all
    assert second["rows"] == first["rows"] and second["trials"] == first["trials"]

    # elsewhere, given the first results: nothing runs, the same numbers
    third, out = result("ablations", elsewhere, reused)
    assert re.findall(r"(\d+) of (\d+) trials already completed", out) == [("0", "0")] * 2
    assert third["trials"] == first["trials"] and len(third["reused"]) == len(trials)


def test_interventions_start_from_the_ablations_trial(first, tiny_corpus, tiny_tokenizer, tmp_path):
    """No intervention: the ablation's softplus-40-none trial to the last digit; the others
    change the run."""
    ablation = next(
        t
        for t in first[0]["trials"]
        if t["model"] == "softplus-40-none"
        and "lr" in t["groups"]
        and t["lr"] == 3e-3
        and t["seed"] == 0
    )
    results, _ = benchmark(
        "interventions",
        tiny_corpus,
        tiny_tokenizer,
        tmp_path,
        "--interventions",
        "none",
        "values_d",
        "lr_vo",
    )
    trials = {t["model"]: t for t in results["trials"]}
    assert trials["none"]["eval_curve"] == ablation["eval_curve"]
    assert trials["none"]["diagnostics"] == ablation["diagnostics"]
    for name in ("values_d", "lr_vo"):
        assert trials[name]["final_eval_loss"] != ablation["final_eval_loss"]
