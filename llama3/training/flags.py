"""Flags of ``train`` and ``multitrain``: the shared groups from :mod:`llama3.cli` plus the
training-only groups defined here, once."""

from __future__ import annotations

import argparse

from llama3.cli import (UsageError, add_model_flags, add_precision_flags, add_seed_flag,
                        add_token_cache_flags, add_tokenizer_flag)
from llama3.training.optim import SCHEDULES

EPILOG = """\
--batch_size windows of --max_seq_len tokens make one optimizer step per process, split into
--accumulation_steps micro-batches; the loss is the mean over every target token of the step.

Exit status: 0 done, 2 usage error, 3 non-finite loss or gradient (nothing saved after the last good
checkpoint), 130 interrupted (Ctrl-C or SIGTERM: a checkpoint was saved first; press Ctrl-C twice to
quit without saving).
"""


def add_training_flags(parser: argparse.ArgumentParser, *, multiprocess: bool) -> None:
    """Every flag of ``train``; ``multiprocess`` adds the FSDP group of ``multitrain``."""
    parser.epilog = EPILOG
    add_data_flags(parser)
    add_model_flags(parser, resumable=True)
    add_batch_flags(parser)
    add_optimization_flags(parser)
    add_checkpoint_flags(parser)
    add_precision_flags(parser)
    add_performance_flags(parser, multiprocess=multiprocess)
    add_logging_flags(parser)
    add_seed_flag(parser)


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--train_corpus", required=True, metavar="PATH",
                       help="training corpus: a directory of shards or a file written by preprocess")
    group.add_argument("--eval_corpus", metavar="PATH",
                       help="held-out corpus for periodic evaluation (none: no evaluation)")
    add_tokenizer_flag(group)
    add_token_cache_flags(group)


def add_batch_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batch, steps and evaluation")
    group.add_argument("--batch_size", type=int, default=64,
                       help="windows per optimizer step and process (global batch: × processes)")
    group.add_argument("--accumulation_steps", type=int, default=1,
                       help="micro-batches --batch_size is split into (must divide it)")
    group.add_argument("--total_steps", type=int, default=20000,
                       help="optimizer steps of the whole run (a resumed run continues to it)")
    group.add_argument("--eval_steps", type=int, default=500,
                       help="evaluate every this many steps, and at the end")
    group.add_argument("--eval_batches", type=int, default=20,
                       help="batches of --eval_corpus per evaluation: the same first windows every "
                            "time, so eval curves of runs with equal --batch_size are comparable")


def add_optimization_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation (AdamW)")
    group.add_argument("--base_lr", type=float, default=1e-3, help="peak learning rate")
    group.add_argument("--wd_rate", type=float, default=0.1,
                       help="decoupled weight decay of matrices and embeddings (not norm gains)")
    group.add_argument("--max_norm", type=float, default=1.0,
                       help="clip the global gradient norm to this (0: no clipping)")
    group.add_argument("--beta1", type=float, default=0.9, help="AdamW first-moment decay")
    group.add_argument("--beta2", type=float, default=0.95, help="AdamW second-moment decay")
    group.add_argument("--adam_eps", type=float, default=1e-8, help="AdamW epsilon")
    group.add_argument("--lr_schedule", choices=SCHEDULES, default="linear",
                       help="decay after warm-up: linear or cosine, down to --min_lr_ratio × --base_lr")
    group.add_argument("--warmup_steps", type=int, default=None,
                       help="linear warm-up steps (default: 5%% of --total_steps)")
    group.add_argument("--min_lr_ratio", type=float, default=0.0,
                       help="learning rate at the last step, as a fraction of --base_lr")


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints and run directory")
    group.add_argument("--to_checkpoint", required=True, metavar="DIR",
                       help="run directory: step_* checkpoints, metrics.jsonl, summary.json, "
                            "tensorboard/ (on a filesystem every node shares)")
    group.add_argument("--from_checkpoint", metavar="PATH",
                       help="continue a run exactly (DIR, DIR/step_N), or start from the weights of "
                            "a model-only checkpoint (e.g. written by import_meta)")
    group.add_argument("--save_steps", type=int, default=1000,
                       help="save a checkpoint every this many steps, and at the end")
    group.add_argument("--keep_last", type=int, default=0,
                       help="keep only the newest N checkpoints (0: keep all)")


def add_performance_flags(parser: argparse.ArgumentParser, *, multiprocess: bool) -> None:
    group = parser.add_argument_group("performance")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block")
    group.add_argument("--activation_checkpointing", action="store_true",
                       help="recompute each block's activations in backward (less memory, ~1/3 "
                            "more compute)")
    if multiprocess:
        group.add_argument("--prefetching", type=int, default=1,
                           help="FSDP: blocks whose parameters are all-gathered ahead, in forward "
                                "and backward (0: none beyond FSDP's default)")


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument("--peak_tflops", type=float, default=None,
                       help="peak TFLOP/s of one device for MFU (default: NVIDIA's datasheet value "
                            "for known GPUs at the run's precision; none on the CPU)")
    group.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                       help="write TensorBoard event files to DIR/tensorboard (needs tensorboard)")


def warmup_steps(args: argparse.Namespace) -> int:
    return args.warmup_steps if args.warmup_steps is not None else args.total_steps // 20


def check_training_flags(args: argparse.Namespace) -> None:
    """Raise UsageError for values no run can use, naming the flag."""
    for name in ("batch_size", "accumulation_steps", "total_steps", "eval_steps", "eval_batches",
                 "save_steps"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.batch_size % args.accumulation_steps:
        raise UsageError(f"--accumulation_steps {args.accumulation_steps} must divide --batch_size "
                         f"{args.batch_size}")
    if not 0 <= warmup_steps(args) < args.total_steps:
        raise UsageError(f"--warmup_steps {warmup_steps(args)} must be below --total_steps "
                         f"{args.total_steps}")
    for name in ("base_lr", "wd_rate", "max_norm", "keep_last", "min_lr_ratio"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.min_lr_ratio > 1:
        raise UsageError(f"--min_lr_ratio must be at most 1, got {args.min_lr_ratio}")
    if getattr(args, "prefetching", 0) < 0:
        raise UsageError(f"--prefetching must not be negative, got {args.prefetching}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UsageError(f"--peak_tflops must be positive, got {args.peak_tflops}")
