"""Interventions that locate why softplus attention at core_dim 424 without the output scale (the
original's default model, ``--core_output_scale none``) learns slowly: each changes one thing
inside the model or the optimiser, and everything else is the train command's own run.

    python -m benchmarks.interventions            # 7 trainings, 2 at a time, 1 thread each
    python -m benchmarks.interventions --tiny     # tiny models, seconds

Each trial is benchmarks/ablations.py's ``softplus-424-none`` trial (same corpus, flags, seed,
data order, 500 steps, diagnostics every 50), run through ``llama3.training.trainer.run_training``
with the intervention applied to the built run before its first step. ``none`` applies nothing,
so its numbers must equal the ablation's trial to the last digit. With r the core width and d the
model width (424 and 128):

* ``values_d``: only the first d features of v are kept (the rest are zero): the value path as
  wide as the model, the scores as before;
* ``scores_d``: only the first d (RoPE-rotated) features of q and k enter the scores, scaled by
  (r/d)^(1/4) each so that λ·⟨q, k⟩ keeps its size: the scores as narrow as the model, the value
  path as before;
* ``lr_qk``, ``lr_vo``, ``lr_wo``: the learning rate of wq and wk, of wv and wo, or of wo alone
  multiplied by d/r;
* ``init_wo``: wo's initial weights multiplied by sqrt(d/r).

Writes ``--output`` (JSON: every trial's settings, eval curve, summary and diagnostics) and prints
the table. A trial whose run directory holds a completed summary is not run again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from benchmarks import ablations
from benchmarks.common import format_table, module_command, write_results
from benchmarks.quality import RUN_TIMING, add_corpus_flags, corpus
from llama3.model.transformer import apply_rotary
from llama3.training.build import Run

PROG = "python -m benchmarks.interventions"
INTERVENTIONS = ("none", "values_d", "scores_d", "lr_qk", "lr_vo", "lr_wo", "init_wo")
COLUMNS = ("intervention", "final_eval_loss", "eval_loss_first", "train_minutes")


def widths(run: Run) -> tuple[int, int]:
    args = run.parts.model_args
    return args.dim, args.core_dim


def attention_layers(run: Run) -> list[torch.nn.Module]:
    return [layer.attention for layer in run.parts.model.layers]


def keep_values(run: Run) -> None:
    d, _ = widths(run)
    for layer in attention_layers(run):
        project = layer.project

        def narrow(x: Tensor, cos: Tensor, sin: Tensor, project=project) -> tuple[Tensor, ...]:
            q, k, v = project(x, cos, sin)
            mask = torch.zeros(v.shape[1], 1, dtype=v.dtype)
            mask[:d] = 1
            return q, k, v * mask

        layer.project = narrow


def keep_scores(run: Run) -> None:
    d, r = widths(run)
    for layer in attention_layers(run):

        def narrow(x: Tensor, cos: Tensor, sin: Tensor, layer=layer) -> tuple[Tensor, ...]:
            mask = torch.zeros(r)
            mask[:d] = (r / d) ** 0.25
            q = apply_rotary(layer.wq(x), cos, sin) * mask
            k = (apply_rotary(layer.wk(x), cos, sin) * mask).transpose(1, 2)
            return q, k, layer.wv(x).transpose(1, 2)

        layer.project = narrow


def learning_rate(*names: str) -> Callable[[Run], None]:
    """Multiply the learning rate of the projections ``names`` of every block by d/r."""

    def intervene(run: Run) -> None:
        d, r = widths(run)
        chosen = {
            id(getattr(layer, name).weight) for layer in attention_layers(run) for name in names
        }
        optimizer = run.parts.step.optimizer
        decay = optimizer.param_groups[0]
        moved = [p for p in decay["params"] if id(p) in chosen]
        decay["params"] = [p for p in decay["params"] if id(p) not in chosen]
        optimizer.add_param_group(
            {
                **{k: v for k, v in decay.items() if k != "params"},
                "params": moved,
                "lr_factor": d / r,
            }
        )
        step = optimizer.step

        def scaled_step(*args, **kwargs):
            for group in optimizer.param_groups:
                group["lr"] *= group.get("lr_factor", 1.0)
            return step(*args, **kwargs)

        optimizer.step = scaled_step

    return intervene


def shrink_wo(run: Run) -> None:
    d, r = widths(run)
    with torch.no_grad():
        for layer in attention_layers(run):
            layer.wo.weight.mul_((d / r) ** 0.5)


APPLY: dict[str, Callable[[Run], None]] = {
    "none": lambda run: None,
    "values_d": keep_values,
    "scores_d": keep_scores,
    "lr_qk": learning_rate("wq", "wk"),
    "lr_vo": learning_rate("wv", "wo"),
    "lr_wo": learning_rate("wo"),
    "init_wo": shrink_wo,
}


def one(name: str, train_argv: list[str]) -> int:
    """Train with the intervention ``name`` in this process; ``train_argv`` are the flags of
    ``python -m llama3 train``."""
    from llama3.cli import ArgumentParser
    from llama3.training.distributed import Distributed
    from llama3.training.flags import add_training_flags
    from llama3.training.trainer import run_training

    parser = ArgumentParser(prog=f"{PROG} --one {name}")
    add_training_flags(parser, multiprocess=False)
    args = parser.parse_args(train_argv)
    return run_training(args, Distributed.single(args.device), prepare=APPLY[name])


def trials(plan: ablations.Plan, names: list[str]) -> list[ablations.Trial]:
    base = ablations.trial(plan, f"{plan.wide}-none", "interventions")
    return [replace(base, model=name, groups=("interventions",)) for name in names]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_corpus_flags(p)
    p.add_argument(
        "--interventions",
        nargs="+",
        choices=INTERVENTIONS,
        default=list(INTERVENTIONS),
        help="the interventions to train",
    )
    p.add_argument("--tiny", action="store_true", help="tiny models (core_dim 40 at dim 32)")
    ablations.add_run_flags(p, "interventions")
    p.add_argument("--one", choices=INTERVENTIONS, help=argparse.SUPPRESS)  # a child's trial
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # a child: --one NAME -- TRAIN_FLAGS
    args = ablations.checked_run_flags(p, p.parse_args(argv[:split]), "interventions")
    args.train_argv = argv[split + 1 :]
    return args


def main() -> int:
    args = parse_args()
    if args.one:
        return one(args.one, args.train_argv)
    plan = ablations.TINY if args.tiny else ablations.FULL
    runs = args.work_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    setup = ablations.Setup(plan, corpus(args), runs, args.threads)
    chosen = trials(plan, args.interventions)
    keyed = {t.model: replace(t, flags=t.flags + (("intervention", t.model),)) for t in chosen}

    def command(s: ablations.Setup, t: ablations.Trial) -> list[str]:
        train = ablations.command(s, replace(t, flags=t.flags[:-1]))
        train[train.index("--to_checkpoint") + 1] = str(ablations.run_dir(s, t))
        return module_command("interventions", "--one", t.model, "--", *train[4:])  # after "train"

    start = time.perf_counter()
    ablations.run_all(setup, list(keyed.values()), args.jobs, command)
    results = [ablations.result(setup, t) for t in keyed.values()]
    rows = [
        {
            "intervention": r["model"],
            "final_eval_loss": r["final_eval_loss"],
            "eval_loss_first": r["eval_curve"][0]["loss"],
            "train_minutes": r["train_minutes"],
        }
        for r in results
    ]
    print(format_table(rows, COLUMNS))
    settings = {
        "corpus": setup.data.name,
        "model": f"{plan.wide}-none",
        **plan.base,
        "steps": plan.steps,
        "threads": args.threads,
        "jobs": args.jobs,
        "tiny": args.tiny,
    }
    path = write_results(
        args.output,
        rows,
        timing=RUN_TIMING,
        benchmark="interventions",
        settings=settings,
        total_minutes=(time.perf_counter() - start) / 60,
        load_average=os.getloadavg(),
        trials=results,
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
