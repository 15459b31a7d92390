"""Flags of ``train`` and ``multitrain`` and the typed configuration they become.

Each flag group is a frozen dataclass whose fields declare the flags (:class:`llama3.cli.Flag`):
the parser is built from the fields, the parsed values fill them, and each group checks its values
once, naming the flag. Flags shared with other commands (tokenizer, token cache, device) and the
model and precision-mode groups come from :mod:`llama3.cli`. :class:`TrainingConfig` gathers the
groups; the rest of training reads it, never the parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llama3.cli import (
    ALLOW_TF32,
    CACHE_DIR,
    DATA_MODE,
    DEVICE,
    TOKENIZER,
    Flag,
    add_fields,
    add_model_flags,
    add_precision_modes,
    declared_flags,
    model_flag_values,
)
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

DATA_ORDER = ("data_mode", "seed", "batch_size")  # changing one would change the windows of a step


def flag(help: str, *, default: Any = None, resumable: bool = False, **options: Any) -> Any:
    """A configuration field declaring a training flag (see :meth:`Flag.field`)."""
    return Flag(help, default=default, **options).field(resumable=resumable)


def add_training_flags(parser: argparse.ArgumentParser, *, multiprocess: bool) -> None:
    """Every flag of ``train``; ``multiprocess`` adds the FSDP flag of ``multitrain``."""
    parser.epilog = EPILOG
    add_fields(parser.add_argument_group("data"), DataConfig)
    add_model_flags(parser, resumable=True)
    add_fields(parser.add_argument_group("batch, steps and evaluation"), BatchConfig)
    add_fields(parser.add_argument_group("optimisation (AdamW)"), OptimConfig)
    add_fields(parser.add_argument_group("checkpoints and run directory"), CheckpointConfig)
    device = parser.add_argument_group("device and precision")
    add_fields(device, DeviceConfig)
    add_precision_modes(device)
    add_fields(
        parser.add_argument_group("performance"),
        PerformanceConfig,
        skip=() if multiprocess else ("prefetching",),
    )
    add_fields(parser.add_argument_group("metrics"), MetricsConfig)
    add_fields(parser, TrainingConfig)  # --seed


def _resolve(
    args: argparse.Namespace, recorded: Mapping[str, Any]
) -> tuple[argparse.Namespace, list[str]]:
    """The flags with RESUMABLE ones filled in (given, else the checkpoint's ``recorded`` value,
    else a new run's default), and a line per flag given that differs from the checkpoint."""
    values, changed = {}, []
    for name in RESUMABLE:
        given = getattr(args, name, None)
        if given is None:
            values[name] = recorded[name] if name in recorded else RESUMABLE[name]
            continue
        values[name] = given
        if name in recorded and given != recorded[name]:
            if name in DATA_ORDER:
                raise UsageError(
                    f"--{name} {given} (checkpoint: {recorded[name]}) would change the "
                    "order of the training data: resume without it, or start a new "
                    "run"
                )
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
        dtypes = {
            name: str(p.param_dtype).removeprefix("torch.")
            for name, p in ((given, precision), (saved, before))
        }
        raise UsageError(
            f"--{given} would keep the parameters in {dtypes[given]}, but the "
            f"checkpoint (precision {saved}) keeps them in {dtypes[saved]}: resume "
            f"with --{saved} (or no precision flag)"
        )
    return precision, [
        f"precision {given} (checkpoint: {saved}): the arithmetic changes, so the "
        "continuation is no longer exact"
    ]


def _from_flags(cls: type[Config], args: argparse.Namespace, **values: Any) -> Config:
    """``cls`` with each field taken from the flag it declares, unless given in ``values``."""
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


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_corpus: str = flag(
        "training corpus: a directory of shards or a file written by preprocess",
        required=True,
        metavar="PATH",
    )
    eval_corpus: str | None = flag(
        "held-out corpus for periodic evaluation (none: no evaluation)", metavar="PATH"
    )
    tokenizer: str = TOKENIZER.field()
    data_mode: str = DATA_MODE.field(resumable=True)
    cache_dir: str | None = CACHE_DIR.field()


# ----------------------------------------------------------------------- batch and steps


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    batch_size: int = flag(
        "windows per optimizer step and process (global batch: × processes)",
        default=64,
        resumable=True,
    )
    accumulation_steps: int = flag(
        "micro-batches --batch_size is split into (must divide it)", default=1, resumable=True
    )
    total_steps: int = flag(
        "optimizer steps of the whole run, the steps before a resume included",
        default=20000,
        resumable=True,
    )
    eval_steps: int = flag(
        "evaluate every this many steps, and at the end", default=500, resumable=True
    )
    eval_batches: int = flag(
        "batches of --eval_corpus per evaluation: the same first windows "
        "every time, so eval curves of runs with equal --batch_size are "
        "comparable",
        default=20,
        resumable=True,
    )

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            _refuse(value <= 0, name, value, "must be positive")
        if self.batch_size % self.accumulation_steps:
            raise UsageError(
                f"--accumulation_steps {self.accumulation_steps} must divide "
                f"--batch_size {self.batch_size}"
            )

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.accumulation_steps


# ---------------------------------------------------------------------------- optimisation


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    base_lr: float = flag("peak learning rate", default=1e-3, resumable=True)
    wd_rate: float = flag(
        "decoupled weight decay of matrices and embeddings (not norm gains)",
        default=0.1,
        resumable=True,
    )
    max_norm: float = flag(
        "clip the global gradient norm to this (0: no clipping)", default=1.0, resumable=True
    )
    beta1: float = flag("AdamW first-moment decay", default=0.9, resumable=True)
    beta2: float = flag("AdamW second-moment decay", default=0.95, resumable=True)
    adam_eps: float = flag("AdamW epsilon", default=1e-8, resumable=True)
    lr_schedule: str = flag(
        "decay after warm-up: linear or cosine, down to --min_lr_ratio × --base_lr",
        default="linear",
        resumable=True,
        choices=SCHEDULES,
    )
    # resolved: the flag, or 5% of --total_steps
    warmup_steps: int = flag("linear warm-up steps (default: 5%% of --total_steps)", resumable=True)
    min_lr_ratio: float = flag(
        "learning rate at the last step, as a fraction of --base_lr", default=0.0, resumable=True
    )

    def __post_init__(self) -> None:
        _refuse_non_finite(self)
        for name in ("base_lr", "wd_rate", "max_norm", "min_lr_ratio"):
            _refuse(getattr(self, name) < 0, name, getattr(self, name), "must not be negative")
        _refuse(self.min_lr_ratio > 1, "min_lr_ratio", self.min_lr_ratio, "must be at most 1")
        for name in ("beta1", "beta2"):
            _refuse(
                not 0 <= getattr(self, name) < 1, name, getattr(self, name), "must be in [0, 1)"
            )
        _refuse(self.adam_eps <= 0, "adam_eps", self.adam_eps, "must be positive")

    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(
            lr=self.base_lr,
            weight_decay=self.wd_rate,
            betas=(self.beta1, self.beta2),
            eps=self.adam_eps,
        )


# --------------------------------------------------------------------------- checkpoints


AUTO = "auto"  # --from_checkpoint: resume --to_checkpoint if it holds a checkpoint


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    to_checkpoint: str = flag(
        "run directory: step_* checkpoints, metrics.jsonl, summary.json, "
        "tensorboard/ (on a filesystem every node shares)",
        required=True,
        metavar="DIR",
    )
    from_checkpoint: str | None = flag(
        "continue a run exactly (DIR, DIR/step_N), or start from "
        "the weights of a model-only checkpoint (e.g. written by "
        f"import_meta); {AUTO}: continue --to_checkpoint from its newest checkpoint if it "
        "holds one, else start a new run (one command line for the first start and every "
        f"restart; a directory named {AUTO} is ./{AUTO})",
        metavar="PATH",
    )
    save_steps: int = flag(
        "save a checkpoint every this many steps, and at the end", default=1000, resumable=True
    )
    keep_last: int = flag(
        "keep only the newest N checkpoints (0: keep all)", default=0, resumable=True
    )
    async_checkpoint: bool = flag(
        "write checkpoints in the background (torch.distributed.checkpoint's async_save): "
        "training waits only while each process copies its state to memory, and a checkpoint "
        "becomes the newest (latest) once every process has written it; at most one in "
        "flight, the last one complete before the process ends",
        default=False,
        action="store_true",
    )

    def __post_init__(self) -> None:
        _refuse(self.save_steps <= 0, "save_steps", self.save_steps, "must be positive")
        _refuse(self.keep_last < 0, "keep_last", self.keep_last, "must not be negative")

    @property
    def run_dir(self) -> Path:
        return Path(self.to_checkpoint)


# ------------------------------------------------------------------ device and precision


@dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    """The device flags of :func:`llama3.cli.add_precision_flags`, and the precision that its
    modes give."""

    device: str | None = DEVICE.field()
    allow_tf32: bool = ALLOW_TF32.field(resumable=True)
    precision: Precision


# --------------------------------------------------------------------------- performance


@dataclass(frozen=True, kw_only=True)
class PerformanceConfig:
    compile: bool = flag("torch.compile each transformer block", default=False, action="store_true")
    activation_checkpointing: bool = flag(
        "recompute each block's activations in backward (less memory, ~1/3 more compute)",
        default=False,
        action="store_true",
    )
    # multitrain only: train, which has no FSDP, has 0
    prefetching: int = flag(
        "FSDP: blocks whose parameters are all-gathered ahead, in forward and "
        "backward (0: none beyond FSDP's default)",
        default=1,
    )

    def __post_init__(self) -> None:
        _refuse(self.prefetching < 0, "prefetching", self.prefetching, "must not be negative")


# ------------------------------------------------------------------------------- metrics


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    peak_tflops: float | None = flag(
        "peak TFLOP/s of one device for MFU (default: NVIDIA's "
        "datasheet value for known GPUs at the run's precision; none "
        "on the CPU)"
    )
    tensorboard: bool = flag(
        "write TensorBoard event files to DIR/tensorboard (needs tensorboard)", default=True
    )
    diagnostics_steps: int = flag(
        "every this many steps, record per layer the attention's "
        "sharpness (entropy, top and previous-key weight), the range of "
        "its scores and its branch's size against the residual stream, "
        'and each parameter role\'s gradient norm (kind "diagnostics" '
        "in metrics.jsonl; 0: off)",
        default=0,
        resumable=True,
    )

    def __post_init__(self) -> None:
        _refuse(
            self.peak_tflops is not None and not 0 < self.peak_tflops < math.inf,
            "peak_tflops",
            self.peak_tflops,
            "must be a positive number",
        )
        _refuse(
            self.diagnostics_steps < 0,
            "diagnostics_steps",
            self.diagnostics_steps,
            "must not be negative",
        )


# --------------------------------------------------------------------------- all together


def seed_value(text: str) -> int:
    """argparse type of ``--seed``: an integer from 0 to 2**63 − 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {value}")
    return value


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
    seed: int = flag(
        "random seed (data order, initialisation, sampling)",
        default=0,
        resumable=True,
        type=seed_value,
    )
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    changes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _refuse(not 0 <= self.seed < 2**63, "seed", self.seed, "must be between 0 and 2**63 - 1")
        if not 0 <= self.optim.warmup_steps < self.batch.total_steps:
            raise UsageError(
                f"--warmup_steps {self.optim.warmup_steps} must be below "
                f"--total_steps {self.batch.total_steps}"
            )

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, recorded: Mapping[str, Any] | None = None
    ) -> TrainingConfig:
        """The configuration the parsed flags give, the values a checkpoint ``recorded`` filling
        in those not given; UsageError names a flag no run can use."""
        recorded = recorded or {}
        resolved, changes = _resolve(args, recorded)
        precision, precision_change = _precision(precision_flag(args), recorded.get("precision"))
        batch = _from_flags(BatchConfig, resolved)
        warmup = resolved.warmup_steps
        warmup = warmup if warmup is not None else batch.total_steps // 20
        flags = {
            **{name: getattr(resolved, name) for name in RESUMABLE},
            "warmup_steps": warmup,
            "precision": precision.name,
        }
        return cls(
            data=_from_flags(DataConfig, resolved),
            model=model_flag_values(args),
            batch=batch,
            optim=_from_flags(OptimConfig, resolved, warmup_steps=warmup),
            checkpoints=_from_flags(CheckpointConfig, resolved),
            device=_from_flags(DeviceConfig, resolved, precision=precision),
            performance=_from_flags(
                PerformanceConfig, resolved, prefetching=getattr(args, "prefetching", 0)
            ),
            metrics=_from_flags(MetricsConfig, resolved),
            seed=resolved.seed,
            flags=flags,
            changes=tuple(changes + precision_change),
        )

    @property
    def schedule(self) -> LRSchedule:
        optim = self.optim
        return LRSchedule(
            base_lr=optim.base_lr,
            warmup_steps=optim.warmup_steps,
            total_steps=self.batch.total_steps,
            kind=optim.lr_schedule,
            min_ratio=optim.min_lr_ratio,
        )


def _resumable(*groups: type) -> dict[str, Any]:
    """Each flag the groups declare resumable, with a new run's value; the data order's first."""
    declared = {
        field.name: declared.default
        for group in groups
        for field, declared in declared_flags(group)
        if field.metadata["resumable"]
    }
    return {**{name: declared[name] for name in DATA_ORDER}, **declared}


# Flags that decide how a run continues, with a new run's value: a resumed run takes them from its
# checkpoint unless given.
RESUMABLE = _resumable(
    DataConfig,
    BatchConfig,
    OptimConfig,
    CheckpointConfig,
    DeviceConfig,
    PerformanceConfig,
    MetricsConfig,
    TrainingConfig,
)
