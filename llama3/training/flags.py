"""Flags of ``train`` and ``multitrain`` and the typed configuration they become.

The shared groups (model, device and precision, tokenizer and token cache, seed) come from
:mod:`llama3.cli`; the training-only groups are defined here, each next to the frozen dataclass
that holds its values, checked once, naming the flag. :class:`TrainingConfig` gathers the groups;
the rest of training reads it, never the parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llama3.cli import (add_model_flags, add_precision_flags, add_seed_flag, add_token_cache_flags,
                        add_tokenizer_flag, model_flag_values)
from llama3.errors import UsageError
from llama3.runtime import Precision, precision_flag
from llama3.training.optim import SCHEDULES, LRSchedule, OptimizerSettings

EPILOG = """\
--batch_size windows of --max_seq_len tokens make one optimizer step per process, split into
--accumulation_steps micro-batches; the loss is the mean over every target token of the step.

A resumed run (--from_checkpoint with training state) takes the model flags, the precision and the
flags marked "resumed: the checkpoint's" from its checkpoint. Flags given win, and a line lists
them; refused are those that would change the order of the training data (--batch_size, --seed,
--data_mode) and a precision that would change the parameters' dtype (--bf16 to or from another
mode). Another autocast mode is allowed, but the continuation is then no longer exact.

Exit status: 0 done, 2 usage error, 3 non-finite loss or gradient (nothing saved after the last good
checkpoint), 130 interrupted (Ctrl-C or SIGTERM: a checkpoint was saved first; press Ctrl-C twice to
quit without saving).
"""

Config = TypeVar("Config")

# Flags that decide how a run continues: a resumed run takes them from its checkpoint unless given.
RESUMABLE = ("data_mode", "seed", "batch_size", "accumulation_steps", "total_steps", "eval_steps",
             "eval_batches", "base_lr", "wd_rate", "max_norm", "beta1", "beta2", "adam_eps",
             "lr_schedule", "warmup_steps", "min_lr_ratio", "save_steps", "keep_last", "allow_tf32",
             "diagnostics_steps")
DATA_ORDER = ("data_mode", "seed", "batch_size")  # changing one would change the windows of a step


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
    _take_from_checkpoint(parser)


def _take_from_checkpoint(parser: argparse.ArgumentParser) -> None:
    """The RESUMABLE flags default to None (not given); their declared defaults become what a new
    run uses (``args.new_run``), and their help says so."""
    new_run = {}
    for action in parser._actions:
        if action.dest in RESUMABLE:
            new_run[action.dest] = action.default
            shown = "" if action.default is None else f"new run: {action.default}; "
            action.help = f"{action.help} ({shown}resumed: the checkpoint's)"
            action.default = None
    parser.set_defaults(new_run=new_run)


def _resolve(args: argparse.Namespace,
             recorded: Mapping[str, Any]) -> tuple[argparse.Namespace, list[str]]:
    """The flags with RESUMABLE ones filled in (given, else the checkpoint's ``recorded`` value,
    else a new run's default), and a line per flag given that differs from the checkpoint."""
    values, changed = {}, []
    for name in RESUMABLE:
        given = getattr(args, name, None)
        if given is None:
            values[name] = recorded[name] if name in recorded else args.new_run.get(name)
            continue
        values[name] = given
        if name in recorded and given != recorded[name]:
            if name in DATA_ORDER:
                raise UsageError(f"--{name} {given} (checkpoint: {recorded[name]}) would change the "
                                 "order of the training data: resume without it, or start a new "
                                 "run")
            changed.append(f"--{name} {given} (checkpoint: {recorded[name]})")
    if changed:
        changed = ["changed since the checkpoint, following the flags: " + ", ".join(changed)]
    return argparse.Namespace(**{**vars(args), **values}), changed


def _precision(given: str | None, saved: str | None) -> tuple[Precision, list[str]]:
    """The run's precision: the flag given, else the checkpoint's, else fp32. A change of the
    parameters' dtype is refused; another autocast mode is noted as no longer exact."""
    precision = Precision.named(given or saved or "fp32")
    if given is None or saved is None or given == saved:
        return precision, []
    before = Precision.named(saved)
    if before.param_dtype != precision.param_dtype:
        dtypes = {name: str(p.param_dtype).removeprefix("torch.")
                  for name, p in ((given, precision), (saved, before))}
        raise UsageError(f"--{given} would keep the parameters in {dtypes[given]}, but the "
                         f"checkpoint (precision {saved}) keeps them in {dtypes[saved]}: resume "
                         f"with --{saved} (or no precision flag)")
    return precision, [f"precision {given} (checkpoint: {saved}): the arithmetic changes, so the "
                       "continuation is no longer exact"]


def _from_flags(cls: type[Config], args: argparse.Namespace, **values: Any) -> Config:
    """``cls`` with each field taken from the flag of the same name, unless given in ``values``."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in values]
    return cls(**{name: getattr(args, name) for name in names}, **values)


def _refuse(condition: bool, flag: str, value: Any, rule: str) -> None:
    if condition:
        raise UsageError(f"--{flag} {rule}, got {value}")


def _refuse_non_finite(config: Any) -> None:
    """Every float field of a flag group is a finite number (nan and inf are refused)."""
    for name, value in dataclasses.asdict(config).items():
        if isinstance(value, float):
            _refuse(not math.isfinite(value), name, value, "must be a finite number")


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
                       help="optimizer steps of the whole run, the steps before a resume included")
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
        _refuse_non_finite(self)
        for name in ("base_lr", "wd_rate", "max_norm", "min_lr_ratio"):
            _refuse(getattr(self, name) < 0, name, getattr(self, name), "must not be negative")
        _refuse(self.min_lr_ratio > 1, "min_lr_ratio", self.min_lr_ratio, "must be at most 1")
        for name in ("beta1", "beta2"):
            _refuse(not 0 <= getattr(self, name) < 1, name, getattr(self, name),
                    "must be in [0, 1)")
        _refuse(self.adam_eps <= 0, "adam_eps", self.adam_eps, "must be positive")

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
    group.add_argument("--diagnostics_steps", type=int, default=0,
                       help="every this many steps, record per layer the attention's sharpness "
                            "(entropy, top and previous-key weight), the range of its scores and "
                            "its branch's size against the residual stream, and each parameter "
                            "role's gradient norm (kind \"diagnostics\" in metrics.jsonl; 0: off)")


@dataclass(frozen=True)
class MetricsConfig:
    peak_tflops: float | None
    tensorboard: bool
    diagnostics_steps: int

    def __post_init__(self) -> None:
        _refuse(self.peak_tflops is not None and not 0 < self.peak_tflops < math.inf,
                "peak_tflops", self.peak_tflops, "must be a positive number")
        _refuse(self.diagnostics_steps < 0, "diagnostics_steps", self.diagnostics_steps,
                "must not be negative")


# --------------------------------------------------------------------------- all together


@dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a run, by flag group. ``model`` holds only the model flags given: a new
    run fills the rest from ModelArgs' defaults, a resumed one from its checkpoint. ``flags`` are
    the resolved RESUMABLE flags and the precision, as a checkpoint records them; ``changes`` say
    which of them a resumed run was given differently."""

    data: DataConfig
    model: dict[str, Any]
    batch: BatchConfig
    optim: OptimConfig
    checkpoints: CheckpointConfig
    device: DeviceConfig
    performance: PerformanceConfig
    metrics: MetricsConfig
    seed: int
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    changes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _refuse(not 0 <= self.seed < 2**63, "seed", self.seed, "must be between 0 and 2**63 - 1")
        if not 0 <= self.optim.warmup_steps < self.batch.total_steps:
            raise UsageError(f"--warmup_steps {self.optim.warmup_steps} must be below "
                             f"--total_steps {self.batch.total_steps}")

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  recorded: Mapping[str, Any] | None = None) -> TrainingConfig:
        """The configuration the parsed flags give, the values a checkpoint ``recorded`` filling
        in those not given; UsageError names a flag no run can use."""
        recorded = recorded or {}
        resolved, changes = _resolve(args, recorded)
        precision, precision_change = _precision(precision_flag(args), recorded.get("precision"))
        batch = _from_flags(BatchConfig, resolved)
        warmup = resolved.warmup_steps
        warmup = warmup if warmup is not None else batch.total_steps // 20
        flags = {**{name: getattr(resolved, name) for name in RESUMABLE}, "warmup_steps": warmup,
                 "precision": precision.name}
        return cls(data=_from_flags(DataConfig, resolved), model=model_flag_values(args),
                   batch=batch, optim=_from_flags(OptimConfig, resolved, warmup_steps=warmup),
                   checkpoints=_from_flags(CheckpointConfig, resolved),
                   device=_from_flags(DeviceConfig, resolved, precision=precision),
                   performance=_from_flags(PerformanceConfig, resolved,
                                           prefetching=getattr(args, "prefetching", 0)),
                   metrics=_from_flags(MetricsConfig, resolved), seed=resolved.seed, flags=flags,
                   changes=tuple(changes + precision_change))

    @property
    def schedule(self) -> LRSchedule:
        optim = self.optim
        return LRSchedule(base_lr=optim.base_lr, warmup_steps=optim.warmup_steps,
                          total_steps=self.batch.total_steps, kind=optim.lr_schedule,
                          min_ratio=optim.min_lr_ratio)
