"""Ablations of the quality benchmark: why the original's default model (softplus attention at
core_dim 424) learns worst at small scale, and the three models compared fairly.

    python -m benchmarks.ablations          # every group, 2 trainings at a time, 1 thread each
    python -m benchmarks.ablations --groups width lr --jobs 1 --threads 2
    python -m benchmarks.ablations --tiny            # tiny models, a minute

Every trial is ``python -m llama3 train`` on the quality benchmark's corpus and settings (3 layers,
dim 128, vocabulary 2048, context 256, batch 16, 500 steps = 2.05 M tokens, AdamW at 3e-3 with 10%
warm-up then linear decay, the whole eval split every 50 steps), with ``--diagnostics_steps 50``.
The models: softmax (4 heads), softplus at core_dim 128, and softplus at core_dim 424 with the
core's output scaled (``--core_output_scale width``, the default) and without (``none``, as before
that setting). The groups vary one thing at a time:

* width: core_dim 64, 128, 256, 424, 512, each with and without the output scale (the scale is 1
  for core_dim ≤ dim, so those run once);
* branch: the core's output multiplied by fixed factors (``--core_output_scale 0.5`` ...) at
  core_dim 64, 128 and 424: how strong the attention branch should be, whatever the width;
* init: ``--init normal`` (N(0, 0.02)), ``fan_in``, ``depth`` (torchtitan's), every model;
* scale: ``--softplus_scale length`` against ``constant``, and mixer: Combinator against SwiGLU,
  both at core_dim 424 with and without the output scale;
* lr: four peak learning rates per model; seeds: each model at its best rate (lowest final eval
  loss of seed 0) with seeds 0, 1, 2 (mean ± sample standard deviation);
* context: the three models (softmax, core_dim 128, core_dim 424 with the output scale) at context
  2048 with batch 2 (the same tokens per step and in all) at 3e-3.

Trials run as child processes, ``--jobs`` at a time with ``--threads`` threads each (fixed, so a
rerun on the same machine gives the same numbers). A trial whose run directory holds a completed
summary is not run again, so an interrupted benchmark continues where it stopped (``--fresh``
starts over). Writes ``--output`` (JSON: settings, environment, every trial's eval curve, summary
and diagnostics, the tables), the figures beside it (``*_curves.png``, ``*_lr.png``,
``*_diagnostics.png``), and prints the tables. ``--reuse FILE`` takes the trials an earlier results
file records (same settings and thread count) instead of running them again, so that groups run
at different times, or on a machine whose run directories are gone, end in one file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import child_env, format_table, write_results
from benchmarks.quality import RUN_TIMING, add_corpus_flags, corpus, settle_paths
from llama3.model.args import DEFAULT_MIXER, ModelArgs
from llama3.model.transformer import Transformer
from llama3.plot import read_metrics
from llama3.training.diagnostics import WINDOWS, attention_statistics
from llama3.training.metrics import SUMMARY_FILE
from llama3.training.trainer import EXIT_NON_FINITE

GROUPS = ("width", "branch", "init", "scale", "mixer", "lr", "seeds", "context")


@dataclass(frozen=True)
class Plan:
    """Everything the full and the tiny benchmark differ in."""

    base: dict[str, int]
    models: dict[str, dict[str, Any]]  # the main models, by name
    wide: str  # the model whose core is wider than dim (with "-none": without the output scale)
    widths: tuple[int, ...]
    factors: dict[int, tuple[str, ...]]  # branch group: core_dim → output factors tried
    rates: tuple[float, ...]
    seeds: tuple[int, ...]
    context: int
    batch_size: int
    long_context: int  # the context group's; its batch keeps the tokens per step
    steps: int
    every: int  # evaluation and diagnostics interval
    lr: float  # the other groups' peak learning rate
    model_extra: dict[str, int] = field(default_factory=dict)  # ModelArgs fields beyond base


def _softplus(r: int, scale: str) -> dict[str, Any]:
    return {"attention": "softplus", "core_dim": r, "core_output_scale": scale}


FULL = Plan(
    base=dict(n_layers=3, dim=128, vocab_size=2048),
    models={
        "softmax": {"attention": "softmax", "n_heads": 4},
        "softplus-128": _softplus(128, "width"),
        "softplus-424": _softplus(424, "width"),
        "softplus-424-none": _softplus(424, "none"),
    },
    wide="softplus-424",
    widths=(64, 128, 256, 424, 512),
    factors={64: ("2", "0.5"), 128: ("0.5", "0.25"), 424: ("0.5", "0.1")},
    rates=(1.5e-3, 3e-3, 6e-3, 1.2e-2),
    seeds=(0, 1, 2),
    context=256,
    batch_size=16,
    long_context=2048,
    steps=500,
    every=50,
    lr=3e-3,
)
TINY = Plan(
    base=dict(n_layers=2, dim=32, vocab_size=128),
    models={
        "softmax": {"attention": "softmax", "n_heads": 4},
        "softplus-16": _softplus(16, "width"),
        "softplus-40": _softplus(40, "width"),
        "softplus-40-none": _softplus(40, "none"),
    },
    wide="softplus-40",
    widths=(16, 40),
    factors={40: ("0.5",)},
    rates=(3e-3, 6e-3),
    seeds=(0, 1),
    context=32,
    batch_size=4,
    long_context=64,
    steps=6,
    every=3,
    lr=3e-3,
    model_extra={"multiple_of": 16},
)


@dataclass(frozen=True)
class Trial:
    """One training run: a model (name and flags), its learning rate, seed and context."""

    model: str
    flags: tuple[tuple[str, Any], ...]
    lr: float
    seed: int
    context: int
    batch_size: int
    groups: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        """The run directory's name: every setting that makes the run what it is."""
        flags = "_".join(f"{k}-{v}" for k, v in self.flags)
        return f"{flags}_lr{self.lr:g}_seed{self.seed}_ctx{self.context}"

    @property
    def label(self) -> str:
        changed = {
            k: v
            for k, v in self.flags
            if k in ("init", "softplus_scale", "mixer")
            or (k == "core_output_scale" and v not in ("width", "none"))
        }
        extra = "".join(f", {k} {v}" for k, v in changed.items())
        return f"{self.model}{extra}"


def trial(
    plan: Plan,
    model: str,
    group: str,
    *,
    lr: float | None = None,
    seed: int = 0,
    long: bool = False,
    **changes: Any,
) -> Trial:
    """The trial of ``model`` with ``changes`` to its flags, in the plan's settings; a flag at its
    default is left out, so the same run is the same trial whichever group asks for it."""
    flags = {**plan.models.get(model, {}), **changes}
    defaults = {
        "init": "normal",
        "softplus_scale": "length",
        "mixer": DEFAULT_MIXER[flags["attention"]],
    }
    if flags.get("core_dim", math.inf) <= plan.base["dim"]:  # both scales leave the output as is
        defaults["core_output_scale"] = (
            flags.get("core_output_scale")
            if flags.get("core_output_scale") in ("width", "none")
            else "width"
        )
    flags = {k: v for k, v in flags.items() if defaults.get(k) != v}
    context = plan.long_context if long else plan.context
    batch = plan.batch_size * plan.context // context
    return Trial(
        model,
        tuple(sorted(flags.items())),
        plan.lr if lr is None else lr,
        seed,
        context,
        batch,
        (group,),
    )


def first_trials(plan: Plan, groups: list[str]) -> list[Trial]:
    """The trials of every group but seeds (which needs the learning-rate sweep's result)."""
    wide, old = plan.wide, f"{plan.wide}-none"
    made: dict[str, list[Trial]] = {
        "width": [
            trial(
                plan,
                f"softplus-{r}" + ("-none" if scale == "none" else ""),
                "width",
                **_softplus(r, scale),
            )
            for r in plan.widths
            for scale in ("width", "none")
            if scale == "width" or r > plan.base["dim"]
        ],
        "branch": [
            trial(plan, f"softplus-{r}", "branch", **_softplus(r, factor))
            for r, factors in plan.factors.items()
            for factor in ("none", *factors)
        ],
        "init": [
            trial(plan, m, "init", init=init)
            for m in plan.models
            for init in ("normal", "fan_in", "depth")
        ],
        "scale": [
            trial(plan, m, "scale", softplus_scale=s)
            for m in (wide, old)
            for s in ("length", "constant")
        ],
        "mixer": [
            trial(plan, m, "mixer", mixer=x) for m in (wide, old) for x in ("combinator", "swiglu")
        ],
        "lr": [trial(plan, m, "lr", lr=lr) for m in plan.models for lr in plan.rates],
        "context": [trial(plan, m, "context", long=True) for m in plan.models if m != old],
    }
    return merged([t for g in groups if g in made for t in made[g]])


def seed_trials(plan: Plan, best: dict[str, float]) -> list[Trial]:
    return [trial(plan, m, "seeds", lr=best[m], seed=s) for m in plan.models for s in plan.seeds]


def merged(trials: list[Trial]) -> list[Trial]:
    """One trial per run directory, carrying every group that asked for it."""
    by_key: dict[str, Trial] = {}
    for t in trials:
        known = by_key.get(t.key)
        groups = (known.groups if known else ()) + tuple(
            g for g in t.groups if not known or g not in known.groups
        )
        by_key[t.key] = Trial(t.model, t.flags, t.lr, t.seed, t.context, t.batch_size, groups)
    return list(by_key.values())


# ------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Setup:
    """Where and how trials run."""

    plan: Plan
    data: Any  # benchmarks.quality.Data
    runs: Path
    threads: int


def run_dir(setup: Setup, t: Trial) -> Path:
    return setup.runs / t.key


def completed(setup: Setup, t: Trial) -> bool:
    summary = run_dir(setup, t) / SUMMARY_FILE
    if not summary.is_file():
        return False
    record = json.loads(summary.read_text())
    if diverged(record):  # a result, not a failure
        return True
    return record.get("status") == "completed" and record.get("steps") == setup.plan.steps


def command(setup: Setup, t: Trial) -> list[str]:
    """``python -m llama3 train`` for the trial."""
    plan, data = setup.plan, setup.data
    model = {k: v for k, v in plan.base.items() if k != "vocab_size"} | plan.model_extra
    model |= dict(t.flags)
    args = [
        "train",
        "--device",
        "cpu",
        "--train_corpus",
        data.train,
        "--eval_corpus",
        data.eval,
        "--tokenizer",
        data.tokenizer,
        *[x for k, v in model.items() for x in (f"--{k}", v)],
        "--max_seq_len",
        t.context,
        "--batch_size",
        t.batch_size,
        "--total_steps",
        plan.steps,
        "--warmup_steps",
        max(plan.steps // 10, 1),
        "--base_lr",
        t.lr,
        "--eval_steps",
        plan.every,
        "--eval_batches",
        10**9,  # the whole eval split
        "--diagnostics_steps",
        plan.every,
        "--save_steps",
        plan.steps,
        "--seed",
        t.seed,
        "--no-tensorboard",
        "--to_checkpoint",
        run_dir(setup, t),
    ]
    return [sys.executable, "-m", "llama3", *map(str, args)]


def execute(setup: Setup, t: Trial, argv: list[str]) -> float:
    """Run one trial's command (its output in ``KEY.log`` beside its run directory); returns
    minutes."""
    shutil.rmtree(run_dir(setup, t), ignore_errors=True)  # what a stopped attempt left
    threads = str(setup.threads)
    env = child_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    log = setup.runs / f"{t.key}.log"
    begin = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode not in (0, EXIT_NON_FINITE) or not completed(setup, t):
        raise RuntimeError(f"{t.key} failed (exit status {done.returncode}); see {log}")
    return (time.perf_counter() - begin) / 60


def run_all(
    setup: Setup,
    trials: list[Trial],
    jobs: int,
    make: Callable[[Setup, Trial], list[str]] = command,
) -> None:
    """Run the trials not yet completed, ``jobs`` at a time, each the command ``make`` gives, the
    longest contexts first (so that the last minutes are not one long trial alone); a line for
    each as it ends, in the order started. A trial that fails does not stop the others; the run
    then ends with an error naming every failed trial."""
    todo = sorted((t for t in trials if not completed(setup, t)), key=lambda t: -t.context)
    print(
        f"{len(trials) - len(todo)} of {len(trials)} trials already completed; "
        f"running {len(todo)}, {jobs} at a time",
        flush=True,
    )
    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(t, pool.submit(execute, setup, t, make(setup, t))) for t in todo]
        for n, (t, future) in enumerate(futures, 1):
            try:
                minutes = future.result()
            except RuntimeError as err:
                failed.append(str(err))
                print(f"[{n}/{len(todo)}] {err}", flush=True)
                continue
            summary = summary_of(setup, t)
            outcome = (
                f"diverged at step {summary['steps'] + 1}"
                if diverged(summary)
                else f"eval loss {summary['final_eval_loss']:.4f}"
            )
            print(
                f"[{n}/{len(todo)}] {t.label}, lr {t.lr:g}, seed {t.seed}, context "
                f"{t.context}: {outcome} ({minutes:.1f} min)",
                flush=True,
            )
    if failed:
        raise SystemExit(
            "failed trials (rerun the benchmark to run them again):\n" + "\n".join(failed)
        )


# ------------------------------------------------------------------------------ results


def diverged(summary: dict[str, Any]) -> bool:
    """Whether a run's summary says it stopped at a non-finite loss or gradient."""
    return summary.get("status") == "non-finite"


def summary_of(setup: Setup, t: Trial) -> dict[str, Any]:
    return json.loads((run_dir(setup, t) / SUMMARY_FILE).read_text())


def result(setup: Setup, t: Trial) -> dict[str, Any]:
    """A trial's settings, final numbers, eval curve and diagnostics, from its run directory."""
    records, summary = read_metrics(run_dir(setup, t)), summary_of(setup, t)
    stopped = diverged(summary)
    return {
        "key": t.key,
        "model": t.model,
        "label": t.label,
        "groups": list(t.groups),
        "flags": dict(t.flags),
        "lr": t.lr,
        "seed": t.seed,
        "context": t.context,
        "batch_size": t.batch_size,
        "params": summary["parameters"],
        "tokens": summary["tokens"],
        "train_minutes": summary["elapsed_s"] / 60,
        "diverged_at_step": summary["steps"] + 1 if stopped else None,
        "final_eval_loss": None if stopped else summary["final_eval_loss"],
        "eval_curve": [
            {"step": r["step"], "tokens": r["tokens"], "loss": _finite_or_none(r["loss"])}
            for r in records
            if r.get("kind") == "eval"
        ],
        "diagnostics": [
            {k: r[k] for k in ("step", "tokens", "layers", "grad_norms")}
            for r in records
            if r.get("kind") == "diagnostics"
        ],
    }


RESULT_SETTINGS = (
    "corpus", "n_layers", "dim", "vocab_size", "context", "batch_size", "steps", "long_context",
    "every", "threads", "tiny",
)  # fmt: skip


def recorded(path: Path | None, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The trials an earlier results file holds, by key; an error if its settings differ from
    these in anything that changes a trial's numbers."""
    if path is None:
        return {}
    try:
        earlier = json.loads(path.read_text())
        differ = [k for k in RESULT_SETTINGS if earlier["settings"].get(k) != settings[k]]
        trials = {t["key"]: t for t in earlier["trials"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"error: --reuse {path}: not a results file of this benchmark ({err})")
    if differ:
        raise SystemExit(
            f"error: --reuse {path}: its trials ran with other settings ("
            + ", ".join(f"{k} {earlier['settings'].get(k)!r}, here {settings[k]!r}" for k in differ)
            + ")"
        )
    return trials


def result_or_recorded(setup: Setup, t: Trial, known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The trial's result from its run directory, or else from an earlier results file (with this
    run's groups and label)."""
    if completed(setup, t) or t.key not in known:
        return result(setup, t)
    return {**known[t.key], "label": t.label, "groups": list(t.groups)}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def best_rates(results: list[dict[str, Any]], plan: Plan) -> dict[str, float]:
    """Each main model's learning rate of lowest final eval loss in the sweep (seed 0; diverged
    trials excluded)."""
    best = {}
    for model in plan.models:
        sweep = [
            r
            for r in results
            if "lr" in r["groups"] and r["model"] == model and r["final_eval_loss"] is not None
        ]
        best[model] = min(sweep, key=lambda r: r["final_eval_loss"])["lr"]
    return best


def seed_statistics(
    results: list[dict[str, Any]], plan: Plan, best: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per model at its best rate: final eval losses of the seeds, mean, sample standard
    deviation, and the mean ± deviation curve at each evaluation."""
    out = {}
    for model in plan.models:
        runs = sorted(
            (r for r in results if "seeds" in r["groups"] and r["model"] == model),
            key=lambda r: r["seed"],
        )
        losses = [r["final_eval_loss"] for r in runs]
        finite = [x for x in losses if x is not None]
        curves = list(zip(*[[p["loss"] for p in r["eval_curve"]] for r in runs]))
        out[model] = {
            "lr": best[model],
            "seeds": [r["seed"] for r in runs],
            "losses": losses,
            "diverged": len(losses) - len(finite),
            "mean": statistics.mean(finite) if finite else math.nan,
            "std": _std(finite),
            "curve": [
                {"tokens": p["tokens"], "mean": _mean(c), "std": _std(c)}
                for p, c in zip(runs[0]["eval_curve"], curves)
            ],
        }
    return out


def _mean(values: tuple[float | None, ...]) -> float:
    finite = [x for x in values if x is not None]
    return statistics.mean(finite) if finite else math.nan


def _std(values: list[float] | tuple[float | None, ...]) -> float:
    finite = [x for x in values if x is not None]
    return statistics.stdev(finite) if len(finite) > 1 else math.nan


TABLE = (
    "group",
    "trial",
    "lr",
    "seed",
    "context",
    "params",
    "final_eval_loss",
    "eval_loss_first",
    "train_minutes",
)


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group, trial), groups in GROUPS order."""
    rows = []
    for group in GROUPS:
        for r in results:
            if group in r["groups"]:
                rows.append(
                    {
                        "group": group,
                        "trial": r["label"],
                        "lr": r["lr"],
                        "seed": r["seed"],
                        "context": r["context"],
                        "params": r["params"],
                        "final_eval_loss": r["final_eval_loss"],
                        "eval_loss_first": r["eval_curve"][0]["loss"],
                        "train_minutes": r["train_minutes"],
                    }
                )
    return rows


EARLY = 2  # the early diagnostics: the second record (step 100 of 500)
EARLY_TABLE = ("trial", "lr", "seed", "block0_branch_ratio", "final_eval_loss", "groups")


def early_branch(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Every trial at the benchmark's context with the size of block 0's attention branch against
    the residual stream at the early diagnostics step, beside its final eval loss: the trials that
    learn slowly are those whose first attention branch outgrew the stream early."""
    rows = []
    step, context = None, min(r["context"] for r in results)
    for r in results:
        early = r["diagnostics"][EARLY - 1] if len(r["diagnostics"]) >= EARLY else None
        if early is None or r["context"] != context:
            continue
        step = early["step"]
        rows.append(
            {
                "trial": r["label"],
                "model": r["model"],
                "lr": r["lr"],
                "seed": r["seed"],
                "block0_branch_ratio": early["layers"][0]["branch_ratio"],
                "final_eval_loss": r["final_eval_loss"],
                "groups": " ".join(r["groups"]),
            }
        )
    return {"step": step, "rows": sorted(rows, key=lambda x: x["block0_branch_ratio"])}


def initial_branch(plan: Plan) -> dict[str, list[list[float]]]:
    """Each main model's attention branch against the residual stream, per block, as initialised
    with each of the plan's seeds (before any step; on random token windows of the plan's
    context)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, plan.base["vocab_size"], (WINDOWS, plan.context), generator=generator)
    out = {}
    for model, settings in plan.models.items():
        args = ModelArgs(**plan.base, **plan.model_extra, **settings, max_seq_len=plan.context)
        out[model] = []
        for seed in plan.seeds:
            torch.manual_seed(seed)
            layers = attention_statistics(Transformer.build(args), tokens)
            out[model].append([layer["branch_ratio"] for layer in layers])
    return out


def seed_rows(seeds: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "model": m,
            "best_lr": s["lr"],
            "seeds": len(s["losses"]),
            "diverged": s["diverged"],
            "final_eval_loss_mean": s["mean"],
            "final_eval_loss_std": s["std"],
        }
        for m, s in seeds.items()
    ]


# ------------------------------------------------------------------------------ main


def add_run_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """How trials run and where they go (this benchmark's and benchmarks/interventions.py's)."""
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each training")
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help=f"run directories and logs, the built corpus (default: "
        f"benchmarks/out/{name}, or {name}_tiny)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"JSON results, and figures beside it (default: "
        f"benchmarks/results/{name}.json; with --tiny WORK_DIR/{name}.json)",
    )


def checked_run_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, name: str
) -> argparse.Namespace:
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    return settle_paths(parser, args, name)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ablations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_corpus_flags(p)
    p.add_argument(
        "--groups",
        nargs="+",
        choices=GROUPS,
        default=list(GROUPS),
        help="groups of trials to run (seeds needs lr's trials; it runs them too)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"tiny models ({TINY.base['n_layers']} layers, dim {TINY.base['dim']}, "
        f"{TINY.steps} steps)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="run every trial again, even those completed by an earlier run",
    )
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        metavar="FILE",
        help="an earlier results file of this benchmark: the trials it records (run with the same "
        "settings and --threads) are taken from it, not run again",
    )
    add_run_flags(p, "ablations")
    args = checked_run_flags(p, p.parse_args(), "ablations")
    if "seeds" in args.groups and "lr" not in args.groups:
        args.groups.append("lr")
    return args


def main() -> int:
    from benchmarks.ablation_figures import write_figures

    args = parse_args()
    plan = TINY if args.tiny else FULL
    runs = args.work_dir / "runs"
    if args.fresh:
        shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    load_before, start = os.getloadavg(), time.perf_counter()
    setup = Setup(plan, corpus(args), runs, args.threads)
    settings = settings_of(setup, args)
    known = recorded(args.reuse, settings)
    if known:
        print(f"{len(known)} trials recorded in {args.reuse}: those asked for are not run again")

    def run_and_read(trials: list[Trial]) -> list[dict[str, Any]]:
        run_all(setup, [t for t in trials if t.key not in known], args.jobs)
        return [result_or_recorded(setup, t, known) for t in trials]

    trials = first_trials(plan, args.groups)
    best, seeds = {}, {}
    if "seeds" in args.groups:  # the seeds' rates come from the sweep: it runs first
        best = best_rates(run_and_read([t for t in trials if "lr" in t.groups]), plan)
        trials = merged(trials + seed_trials(plan, best))
    results = run_and_read(trials)
    if "seeds" in args.groups:
        seeds = seed_statistics(results, plan, best)
    minutes = (time.perf_counter() - start) / 60
    rows = table_rows(results)
    print(format_table(rows, TABLE))
    if seeds:
        print(format_table(seed_rows(seeds), tuple(seed_rows(seeds)[0])))
    initial = initial_branch(plan)
    print("\nattention branch / residual stream per block, as initialised (one list per seed):")
    print(
        format_table(
            [
                {"model": m, "per seed": [[round(x, 3) for x in r] for r in v]}
                for m, v in initial.items()
            ],
            ("model", "per seed"),
        )
    )
    early = early_branch(results)
    print(f"\nblock 0's attention branch against the residual stream at step {early['step']}:")
    print(format_table(early["rows"], EARLY_TABLE))
    figures = write_figures(args.output, results, seeds, plan, early)
    path = write_results(
        args.output,
        rows,
        timing=RUN_TIMING,
        benchmark="ablations",
        settings=settings,
        total_minutes=minutes,
        figures=[f.name for f in figures],
        load_average={"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()},
        best_rates=best,
        seeds=seeds,
        seed_rows=seed_rows(seeds),
        initial_branch=initial,
        early_branch=early,
        reused=sorted(known.keys() & {t.key for t in trials}),
        trials=results,
    )
    print(
        f"\n{minutes:.1f} minutes; results: {path}\nfigures: " + ", ".join(str(f) for f in figures)
    )
    return 0


def settings_of(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """What the results file records of the run's settings."""
    plan = setup.plan
    return {
        "corpus": setup.data.name,
        **{k: v for k, v in plan.base.items()},
        "context": plan.context,
        "batch_size": plan.batch_size,
        "steps": plan.steps,
        "tokens_per_trial": plan.steps * plan.batch_size * plan.context,
        "lr": plan.lr,
        "rates": plan.rates,
        "seeds": plan.seeds,
        "long_context": plan.long_context,
        "every": plan.every,
        "jobs": args.jobs,
        "threads": args.threads,
        "tiny": args.tiny,
        "groups": args.groups,
    }


if __name__ == "__main__":
    sys.exit(main())
