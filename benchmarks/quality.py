"""Quality at small scale, on a CPU: the original's three models trained on the same tokens, then
evaluated at 1×, 2×, 4× and 8× their training context.

    python -m benchmarks.quality            # the quick start's Python documentation corpus
    python -m benchmarks.quality --train_corpus DIR --eval_corpus DIR --tokenizer MODEL_FILE
    python -m benchmarks.quality --tiny     # tiny models, seconds

Models (the original's comparison): 3 layers, dim 128, vocabulary 2048; softmax with 4 heads,
softplus with core_dim 128 and with core_dim 424, and core_dim 424 without the core output scale
(``--core_output_scale none``, the original's model). Each is trained by ``python -m llama3 train``
with the same settings and seed, so on the same windows in the same order: context 256, batch 16,
AdamW at 3e-3, 10% warm-up then linear decay, evaluated every 50 steps on the whole eval split.
Then ``python -m llama3 evaluate --seq_lens`` measures each at the four window lengths, one window
per batch (every length covers the eval split up to less than one window), with the mean loss by
position within the window; the table also splits the longest windows' loss into the positions
inside the training context and those past it.

Without a corpus: the documentation shipped with Python, split and tokenized as the quick start
does (it depends on the Python installation, which the results name). Everything runs on the CPU
with a fixed number of threads, so a rerun on the same machine gives the same numbers.

Writes ``--output`` (JSON: settings, environment, per-model results, eval curves, losses by
position), beside it ``*_loss.png`` (train and eval loss against tokens) and
``*_extrapolation.png`` (eval loss by window length and by position), and prints the table.
Checkpoints and evaluations go to ``--work_dir`` (its runs/ and eval/ are replaced on each run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BASE,
    CONFIGS,
    RESULTS_DIR,
    TINY_BASE,
    TINY_CONFIGS,
    format_table,
    python_docs_corpus,
    wall_clock,
    write_results,
)
from llama3.__main__ import main as llama3_cli
from llama3.plot import draw as draw_curves
from llama3.plot import read_metrics
from llama3.plot_lengths import draw as draw_lengths
from llama3.plot_lengths import read_evaluation
from llama3.training.metrics import SUMMARY_FILE

MULTIPLES = (1, 2, 4, 8)  # evaluation windows, in training contexts
# How the CPU training benchmarks (this one, ablations, interventions) time their runs.
RUN_TIMING = wall_clock(
    "a whole training run (train_minutes: the train command's elapsed_s), "
    "the whole benchmark (total_minutes); in the quality benchmark also each "
    "evaluation (the evaluate command's seconds)",
    "one reading each",
    warmup=0,
    repetitions=1,
)
COLUMNS = (
    "model",
    "params",
    "train_tokens",
    "train_minutes",
    "final_eval_loss",
    "loss_1x",
    "loss_2x",
    "loss_4x",
    "loss_8x",
    "loss_8x_inside",
    "loss_8x_past",
    "bits_per_byte_1x",
)


@dataclass(frozen=True)
class Scale:
    """Everything the full and the tiny benchmark differ in."""

    base: dict[str, int]
    configs: dict[str, dict[str, Any]]
    context: int
    batch_size: int
    steps: int
    eval_steps: int
    model_flags: tuple[str, ...] = ()


def with_unscaled(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The configurations and, after them, the widest softplus one without the core output scale
    (``-none``: the original's model)."""
    widest = max(
        (n for n, c in configs.items() if c["attention"] == "softplus"),
        key=lambda n: configs[n]["core_dim"],
    )
    return {**configs, f"{widest}-none": {**configs[widest], "core_output_scale": "none"}}


FULL = Scale(BASE, with_unscaled(CONFIGS), context=256, batch_size=16, steps=500, eval_steps=50)
TINY = Scale(
    TINY_BASE,
    with_unscaled(TINY_CONFIGS),
    context=32,
    batch_size=4,
    steps=6,
    eval_steps=3,
    model_flags=("--multiple_of", "16"),
)


@dataclass(frozen=True)
class Data:
    train: Path
    eval: Path
    tokenizer: Path
    name: str


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_corpus_flags(p)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny models (2 layers, dim 32, context 32, batch 4, 6 steps)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per model (default: {FULL.steps}; tiny: {TINY.steps})",
    )
    p.add_argument("--base_lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="CPU threads (the numbers are reproducible for a fixed count)",
    )
    p.add_argument(
        "--position_buckets",
        type=int,
        default=16,
        help=f"ranges of positions for the loss by position (a multiple of {MULTIPLES[-1]})",
    )
    p.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="checkpoints, evaluations, the built corpus (default: "
        "benchmarks/out/quality, or quality_tiny)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results, the figures beside it (default: "
        "benchmarks/results/quality.json; with --tiny WORK_DIR/quality.json)",
    )
    return settle_paths(p, p.parse_args(), "quality")


def add_corpus_flags(parser: argparse.ArgumentParser) -> None:
    """The corpus flags of the quality benchmarks (all three, or none for the built-in one)."""
    data = parser.add_argument_group(
        "data (default: the quick start's Python documentation corpus)"
    )
    data.add_argument("--train_corpus", metavar="PATH", help="training split (from preprocess)")
    data.add_argument("--eval_corpus", metavar="PATH", help="eval split")
    data.add_argument("--tokenizer", metavar="MODEL_FILE", help="tokenizer of both splits")


def settle_paths(
    parser: argparse.ArgumentParser, args: argparse.Namespace, name: str
) -> argparse.Namespace:
    """Check the corpus flags go together; default ``--work_dir`` to benchmarks/out/NAME (or
    NAME_tiny) and ``--output`` to benchmarks/results/NAME.json (with --tiny: in the work dir)."""
    given = [args.train_corpus, args.eval_corpus, args.tokenizer]
    if any(given) and not all(given):
        parser.error("--train_corpus, --eval_corpus and --tokenizer go together")
    args.work_dir = args.work_dir or RESULTS_DIR.parent / "out" / (
        f"{name}_tiny" if args.tiny else name
    )
    args.output = args.output or (args.work_dir if args.tiny else RESULTS_DIR) / f"{name}.json"
    return args


def cli(*args: Any) -> None:
    """Run one ``python -m llama3`` command in this process; stop if it fails."""
    code = llama3_cli([str(a) for a in args])
    if code != 0:
        sys.exit(f"python -m llama3 {args[0]} failed (exit status {code})")


def corpus(args: argparse.Namespace) -> Data:
    """The splits and tokenizer given, or the Python documentation corpus (built on first use)."""
    if args.train_corpus:
        return Data(
            Path(args.train_corpus),
            Path(args.eval_corpus),
            Path(args.tokenizer),
            Path(args.train_corpus).name,
        )
    docs = python_docs_corpus(args.work_dir / "python_docs", BASE["vocab_size"])
    return Data(
        docs.train, docs.eval, docs.tokenizer, f"Python {sys.version.split()[0]} documentation"
    )


def train(name: str, args: argparse.Namespace, scale: Scale, data: Data) -> Path:
    """Train one configuration with the training command; returns its run directory."""
    run, steps = args.work_dir / "runs" / name, args.steps or scale.steps
    model = {k: v for k, v in {**scale.base, **scale.configs[name]}.items() if k != "vocab_size"}
    cli(
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
        *scale.model_flags,
        "--max_seq_len",
        scale.context,
        "--batch_size",
        scale.batch_size,
        "--total_steps",
        steps,
        "--warmup_steps",
        max(steps // 10, 1),
        "--base_lr",
        args.base_lr,
        "--eval_steps",
        min(scale.eval_steps, steps),
        "--eval_batches",
        10**9,  # as many as the eval split holds: all of it
        "--save_steps",
        steps,
        "--seed",
        args.seed,
        "--no-tensorboard",
        "--to_checkpoint",
        run,
    )
    return run


def evaluate(name: str, run: Path, args: argparse.Namespace, scale: Scale, data: Data) -> Path:
    """Evaluate at every multiple of the context; returns the JSON written."""
    output = args.work_dir / "eval" / f"{name}.json"
    lengths = ",".join(str(m * scale.context) for m in MULTIPLES)
    cli(
        "evaluate",
        "--device",
        "cpu",
        "--from_checkpoint",
        run,
        "--tokenizer",
        data.tokenizer,
        "--eval_corpus",
        data.eval,
        "--seq_lens",
        lengths,
        "--batch_size",
        1,
        "--position_buckets",
        args.position_buckets,
        "--no-progress",
        "--output",
        output,
    )
    return output


def model_row(name: str, run: Path, lengths: list[dict[str, Any]], context: int) -> dict[str, Any]:
    """One line of the table, from the run's summary and the evaluation at each length; in the
    longest windows, the loss at the positions inside the training context and past it."""
    summary = json.loads((run / SUMMARY_FILE).read_text())
    row = {
        "model": name,
        "params": summary["parameters"],
        "train_tokens": summary["tokens"],
        "train_minutes": summary["elapsed_s"] / 60,
        "final_eval_loss": summary["final_eval_loss"],
        "bits_per_byte_1x": lengths[0]["bits_per_byte"],
    }
    row.update({f"loss_{m}x": r["loss"] for m, r in zip(MULTIPLES, lengths)})
    buckets = lengths[-1]["positions"]
    row["loss_8x_inside"] = mean_loss([b for b in buckets if b["end"] <= context])
    row["loss_8x_past"] = mean_loss([b for b in buckets if b["start"] >= context])
    return row


def mean_loss(buckets: list[dict[str, Any]]) -> float:
    """Token-weighted mean loss of position buckets."""
    tokens = sum(b["tokens"] for b in buckets)
    return sum(b["loss"] * b["tokens"] for b in buckets if b["tokens"]) / max(tokens, 1)


def eval_curve(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step, tokens trained on and eval loss of each evaluation during training."""
    return [
        {k: r[k] for k in ("step", "tokens", "loss")} for r in records if r.get("kind") == "eval"
    ]


def label(name: str) -> str:
    if name == "softmax":
        return "softmax, 4 heads"
    return name.replace("-none", ", no output scale").replace("softplus-", "softplus, core_dim ")


def main() -> int:
    args = parse_args()
    scale = TINY if args.tiny else FULL
    if args.position_buckets % MULTIPLES[-1]:  # so that no bucket straddles the context
        sys.exit(f"--position_buckets must be a multiple of {MULTIPLES[-1]}")
    torch.set_num_threads(args.threads)
    for folder in ("runs", "eval"):  # this script's own output there, from an earlier run
        shutil.rmtree(args.work_dir / folder, ignore_errors=True)
    load_before, start = os.getloadavg(), time.perf_counter()
    data = corpus(args)
    rows, curves, evaluations = [], {}, {}
    for name in scale.configs:
        run = train(name, args, scale, data)
        evaluations[name] = read_evaluation(evaluate(name, run, args, scale, data))
        curves[name] = read_metrics(run)
        rows.append(model_row(name, run, evaluations[name]["lengths"], scale.context))
    minutes = (time.perf_counter() - start) / 60
    load_after = os.getloadavg()
    figures = write_figures(args.output, rows, curves, evaluations, scale, data.name)
    print(format_table(rows, COLUMNS))
    print(
        f"\n{minutes:.1f} minutes in all, {args.threads} thread(s); load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after on {os.cpu_count()} CPUs"
    )
    steps = args.steps or scale.steps
    settings = {
        "corpus": data.name,
        "context": scale.context,
        "batch_size": scale.batch_size,
        "steps": steps,
        "tokens_per_model": steps * scale.batch_size * scale.context,
        "base_lr": args.base_lr,
        "seed": args.seed,
        "threads": args.threads,
        "eval_lengths": [m * scale.context for m in MULTIPLES],
        "tiny": args.tiny,
        **{k: v for k, v in scale.base.items() if k != "vocab_size"},
    }
    details = {
        name: {"eval_curve": eval_curve(curves[name]), "lengths": evaluations[name]["lengths"]}
        for name in scale.configs
    }
    path = write_results(
        args.output,
        rows,
        timing=RUN_TIMING,
        benchmark="quality",
        settings=settings,
        total_minutes=minutes,
        figures=[f.name for f in figures],
        load_average={"before": load_before, "after": load_after, "cpus": os.cpu_count()},
        models=details,
    )
    print(f"results: {path}\nfigures: {', '.join(str(f) for f in figures)}")
    return 0


def write_figures(
    output: Path,
    rows: list[dict[str, Any]],
    curves: dict,
    evaluations: dict,
    scale: Scale,
    corpus_name: str,
) -> list[Path]:
    """The loss curves against tokens and the extrapolation figure, beside ``output``."""
    stem = output.with_suffix("")
    what = (
        f"{scale.base['n_layers']} layers, dim {scale.base['dim']}, context {scale.context}, "
        f"batch {scale.batch_size}, {corpus_name}, CPU"
    )
    loss = draw_curves(
        [
            (f"{label(r['model'])} (final eval {r['final_eval_loss']:.3f})", curves[r["model"]])
            for r in rows
        ],
        f"{stem}_loss.png",
        x="tokens",
        title=what,
    )
    lengths = draw_lengths(
        [(label(name), e, e["lengths"][-1]) for name, e in evaluations.items()],
        f"{stem}_extrapolation.png",
        title=f"trained at {what}",
    )
    return [loss, lengths]


if __name__ == "__main__":
    sys.exit(main())
