"""Flags of ``train`` and ``multitrain`` and the typed configuration they become.

The shared groups (model, device and precision, tokenizer and token cache, seed) come from
:mod:`llama3.cli`; the training-only groups are defined here, each next to the frozen dataclass
that holds its values, checked once, naming the flag. :class:`TrainingConfig` gathers the groups;
the rest of training reads it, never the parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llama3.cli import (add_model_flags, add_precision_flags, add_seed_flag, add_token_cache_flags,
                        add_tokenizer_flag, model_flag_values)
from llama3.errors import UsageError
from llama3.runtime import Precision
from llama3.training.optim import SCHEDULES, LRSchedule, OptimizerSettings

EPILOG = """\
--batch_size windows of --max_seq_len tokens make one optimizer step per process, split into
--accumulation_steps micro-batches; the loss is the mean over every target token of the step.

Exit status: 0 done, 2 usage error, 3 non-finite loss or gradient (nothing saved after the last good
checkpoint), 130 interrupted (Ctrl-C or SIGTERM: a checkpoint was saved first; press Ctrl-C twice to
quit without saving).
"""

Config = TypeVar("Config")


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


def _from_flags(cls: type[Config], args: argparse.Namespace, **values: Any) -> Config:
    """``cls`` with each field taken from the flag of the same name, unless given in ``values``."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in values]
    return cls(**{name: getattr(args, name) for name in names}, **values)


def _refuse(condition: bool, flag: str, value: Any, rule: str) -> None:
    if condition:
        raise UsageError(f"--{flag} {rule}, got {value}")


# ------------------------------------------------------------------------------------ data


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--train_corpus", required=True, metavar="PATH",
                       help="training corpus: a directory of shards or a file written by preprocess")
    group.add_argument("--eval_corpus", metavar="PATH",
                       help="held-out corpus for periodic evaluation (none: no evaluation)")
    add_tokenizer_flag(group)
    add_token_cache_flags(group)


@dataclass(frozen=True)
class DataConfig:
    train_corpus: str
    eval_corpus: str | None
    tokenizer: str
    data_mode: str
    cache_dir: str | None


# ----------------------------------------------------------------------- batch and steps


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


@dataclass(frozen=True)
class BatchConfig:
    batch_size: int
    accumulation_steps: int
    total_steps: int
    eval_steps: int
    eval_batches: int

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            _refuse(value <= 0, name, value, "must be positive")
        if self.batch_size % self.accumulation_steps:
            raise UsageError(f"--accumulation_steps {self.accumulation_steps} must divide "
                             f"--batch_size {self.batch_size}")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.accumulation_steps


# ---------------------------------------------------------------------------- optimisation


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


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float
    wd_rate: float
    max_norm: float
    beta1: float
    beta2: float
    adam_eps: float
    lr_schedule: str
    warmup_steps: int  # resolved: the flag, or 5% of --total_steps
    min_lr_ratio: float

    def __post_init__(self) -> None:
        for name in ("base_lr", "wd_rate", "max_norm", "min_lr_ratio"):
            _refuse(getattr(self, name) < 0, name, getattr(self, name), "must not be negative")
        _refuse(self.min_lr_ratio > 1, "min_lr_ratio", self.min_lr_ratio, "must be at most 1")

    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(lr=self.base_lr, weight_decay=self.wd_rate,
                                 betas=(self.beta1, self.beta2), eps=self.adam_eps)


# --------------------------------------------------------------------------- checkpoints


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


@dataclass(frozen=True)
class CheckpointConfig:
    to_checkpoint: str
    from_checkpoint: str | None
    save_steps: int
    keep_last: int

    def __post_init__(self) -> None:
        _refuse(self.save_steps <= 0, "save_steps", self.save_steps, "must be positive")
        _refuse(self.keep_last < 0, "keep_last", self.keep_last, "must not be negative")

    @property
    def run_dir(self) -> Path:
        return Path(self.to_checkpoint)


# ------------------------------------------------------------------ device and precision


@dataclass(frozen=True)
class DeviceConfig:
    """The group of :func:`llama3.cli.add_precision_flags`."""

    device: str | None
    allow_tf32: bool
    precision: Precision


# --------------------------------------------------------------------------- performance


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


@dataclass(frozen=True)
class PerformanceConfig:
    compile: bool
    activation_checkpointing: bool
    prefetching: int  # 0 for train, which has no FSDP

    def __post_init__(self) -> None:
        _refuse(self.prefetching < 0, "prefetching", self.prefetching, "must not be negative")


# ------------------------------------------------------------------------------- metrics


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument("--peak_tflops", type=float, default=None,
                       help="peak TFLOP/s of one device for MFU (default: NVIDIA's datasheet value "
                            "for known GPUs at the run's precision; none on the CPU)")
    group.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                       help="write TensorBoard event files to DIR/tensorboard (needs tensorboard)")


@dataclass(frozen=True)
class MetricsConfig:
    peak_tflops: float | None
    tensorboard: bool

    def __post_init__(self) -> None:
        _refuse(self.peak_tflops is not None and self.peak_tflops <= 0, "peak_tflops",
                self.peak_tflops, "must be positive")


# --------------------------------------------------------------------------- all together


@dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a run, by flag group. ``model`` holds only the model flags given: a new
    run fills the rest from ModelArgs' defaults, a resumed one from its checkpoint."""

    data: DataConfig
    model: dict[str, Any]
    batch: BatchConfig
    optim: OptimConfig
    checkpoints: CheckpointConfig
    device: DeviceConfig
    performance: PerformanceConfig
    metrics: MetricsConfig
    seed: int

    def __post_init__(self) -> None:
        if not 0 <= self.optim.warmup_steps < self.batch.total_steps:
            raise UsageError(f"--warmup_steps {self.optim.warmup_steps} must be below "
                             f"--total_steps {self.batch.total_steps}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingConfig:
        """The configuration the parsed flags give; UsageError names a flag no run can use."""
        batch = _from_flags(BatchConfig, args)
        warmup = args.warmup_steps if args.warmup_steps is not None else batch.total_steps // 20
        return cls(data=_from_flags(DataConfig, args), model=model_flag_values(args), batch=batch,
                   optim=_from_flags(OptimConfig, args, warmup_steps=warmup),
                   checkpoints=_from_flags(CheckpointConfig, args),
                   device=_from_flags(DeviceConfig, args, precision=Precision.from_flags(args)),
                   performance=_from_flags(PerformanceConfig, args,
                                           prefetching=getattr(args, "prefetching", 0)),
                   metrics=_from_flags(MetricsConfig, args), seed=args.seed)

    @property
    def schedule(self) -> LRSchedule:
        optim = self.optim
        return LRSchedule(base_lr=optim.base_lr, warmup_steps=optim.warmup_steps,
                          total_steps=self.batch.total_steps, kind=optim.lr_schedule,
                          min_ratio=optim.min_lr_ratio)
