"""Everything a run needs, built from its configuration in a fixed order: tokenizer, model (new,
or from a checkpoint), parallel wrappers, optimiser, data, then the saved state of a resumed run.

A :class:`Run` is three things kept apart: the configuration (:class:`TrainingConfig`, frozen),
the components built from it (:class:`Components`, frozen: which model, optimizer, data; their
contents train), and the mutable :class:`~llama3.training.state.Progress`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llama3.checkpoint import (
    TrainingState,
    act_together,
    check_model_flags,
    list_step_dirs,
    read_model_file,
    read_rank_record,
    read_trainer_record,
    restore_training_checkpoint,
    step_of,
    tokenizer_fingerprint,
)
from llama3.errors import UsageError
from llama3.model import ModelArgs, Transformer, model_summary, training_flops_per_token
from llama3.runtime import seed_everything
from llama3.training.distributed import Distributed
from llama3.training.flags import AUTO, TrainingConfig
from llama3.training.metrics import Throughput, peak_tflops
from llama3.training.optim import LRSchedule, apply_settings, build_optimizer
from llama3.training.parallel import ParallelPlan, parallelize
from llama3.training.state import (
    GradScaler,
    Progress,
    RecordedSettings,
    recorded_flags,
    training_state,
    upgrade_record,
)
from llama3.training.step import TrainStep

if TYPE_CHECKING:
    from llama3.data.dataset import EvalWindows, TrainWindows
    from llama3.data.tokenizer import Tokenizer
    from llama3.data.tokens import TokenCorpus


@dataclass(frozen=True)
class Components:
    """What the run trains with. The step owns model, optimizer, gradient scaler, precision and
    processes; the properties below only reach them."""

    step: TrainStep
    model_args: ModelArgs
    schedule: LRSchedule
    train_windows: TrainWindows
    eval_windows: EvalWindows | None
    eval_batches: int  # per evaluation and process
    throughput: Throughput
    peak_source: str  # where the peak FLOP/s for MFU came from
    tokenizer_fingerprint: dict[str, str]  # recorded in every checkpoint

    @property
    def model(self) -> nn.Module:
        return self.step.model

    @property
    def dist(self) -> Distributed:
        return self.step.dist


@dataclass(frozen=True)
class Source:
    """Where a run starts: nothing (a new run), a model's weights (``record`` None), or a training
    checkpoint and its record (upgraded to the current layout)."""

    path: Path | None = None
    record: dict[str, Any] | None = None
    flags: dict[str, Any] = field(default_factory=dict)  # the flag values it recorded

    @classmethod
    def read(cls, from_checkpoint: str | None, run_dir: str | Path) -> Source:
        """``from_checkpoint`` as given; ``auto``: the newest step directory of ``run_dir``, else
        a new run. A step directory gets its name only once every process has written its part,
        so the newest is complete even where the job stopped before ``latest`` named it (a
        restart must not stop there: the first save has no older one to go back to, and a later
        one would leave a step newer than ``latest``'s)."""
        if from_checkpoint == AUTO:
            steps = list_step_dirs(run_dir)
            from_checkpoint = str(steps[-1]) if steps else None
        if from_checkpoint is None:
            return cls()
        path, record = read_trainer_record(from_checkpoint)
        if record is None:
            return cls(path)
        record = upgrade_record(record)
        data = None
        if "flags" not in record["settings"]:  # written before the flags were: the data order
            data = read_rank_record(path, 0).get("data")
        return cls(path, record, recorded_flags(record, data))


@dataclass(frozen=True)
class Run:
    config: TrainingConfig
    parts: Components
    progress: Progress
    checkpointed: TrainingState  # what every checkpoint saves
    notes: tuple[str, ...]  # what to tell the user before training

    @property
    def run_dir(self) -> Path:
        return self.config.checkpoints.run_dir


def build_run(config: TrainingConfig, dist: Distributed, source: Source) -> Run:
    """Everything a run needs; ``config`` was resolved with ``source.flags``. Call it holding
    the run directory (:func:`llama3.checkpoint.run_directory_lock`)."""
    from llama3.data.tokenizer import Tokenizer

    _check_run_directory(config, source)
    precision = config.device.precision
    tokenizer = Tokenizer(config.data.tokenizer)
    step_dir, record = source.path, source.record
    model_args = _model_args(config, tokenizer, step_dir, record)
    model, notes = _build_model(config, model_args, dist, step_dir, record)
    optimizer = build_optimizer(model, config.optim.optimizer_settings(), dist.device)
    scaler = GradScaler(dist.device.type, enabled=precision.needs_scaler)
    train_windows, eval_windows, eval_batches, data_notes = _build_data(
        config, dist, tokenizer, model_args
    )
    throughput, peak_source = _throughput(config, dist, model_args)
    step = TrainStep(
        model,
        optimizer,
        scaler,
        precision,
        dist,
        accumulation_steps=config.batch.accumulation_steps,
        max_norm=config.optim.max_norm,
    )
    parts = Components(
        step=step,
        model_args=model_args,
        schedule=config.schedule,
        train_windows=train_windows,
        eval_windows=eval_windows,
        eval_batches=eval_batches,
        throughput=throughput,
        peak_source=peak_source,
        tokenizer_fingerprint=tokenizer_fingerprint(config.data.tokenizer),
    )
    progress = Progress()
    settings = RecordedSettings(parts.schedule, precision, dict(config.flags))
    state = training_state(
        model,
        optimizer,
        progress=progress,
        scaler=scaler,
        settings=settings,
        data=train_windows,
        device=dist.device,
    )
    notes += data_notes
    if record is not None:
        restore_training_checkpoint(step_dir, record, state, dist)
        apply_settings(optimizer, config.optim.optimizer_settings())  # the flags win
        notes += [*config.changes, f"resumed from {step_dir} at step {progress.step}"]
    return Run(
        config=config, parts=parts, progress=progress, checkpointed=state, notes=tuple(notes)
    )


def _check_run_directory(config: TrainingConfig, source: Source) -> None:
    """Refuse to write into a run directory whose steps this run would mix with its own: another
    run's, or steps of this run newer than the one it resumes from (pruning, ``latest`` and the
    next resume would then pick between two histories)."""
    run_dir = config.checkpoints.to_checkpoint
    existing = list_step_dirs(run_dir)
    if not existing:
        return
    if source.record is None:
        raise UsageError(
            f"--to_checkpoint {run_dir} already holds a run (up to "
            f"{existing[-1].name}): continue it with --from_checkpoint {run_dir}, or "
            "choose a new directory"
        )
    resumed = source.path
    newer = [p for p in existing if step_of(p) > step_of(resumed)]
    if newer:
        raise UsageError(
            f"--to_checkpoint {run_dir} holds {newer[-1].name}, newer than "
            f"{resumed.name} you resume from: continue into a new --to_checkpoint, "
            f"or move the newer step directories out of {run_dir} first"
        )
    if Path(run_dir).resolve() != resumed.parent.resolve():
        raise UsageError(
            f"--to_checkpoint {run_dir} already holds another run (up to "
            f"{existing[-1].name}): choose a new directory"
        )


def _model_args(
    config: TrainingConfig,
    tokenizer: Tokenizer,
    step_dir: Path | None,
    record: dict[str, Any] | None,
) -> ModelArgs:
    from llama3.data.tokenizer import check_tokenizer

    if step_dir is None:
        return ModelArgs(vocab_size=tokenizer.vocab_size, **config.model)
    saved = record if record is not None else read_model_file(step_dir)
    model_args = ModelArgs.from_dict(saved["model_args"])
    check_model_flags(config.model, model_args)
    check_tokenizer(tokenizer, saved.get("tokenizer"), model_args.vocab_size)
    return model_args


def _build_model(
    config: TrainingConfig,
    model_args: ModelArgs,
    dist: Distributed,
    step_dir: Path | None,
    record: dict[str, Any] | None,
) -> tuple[nn.Module, list[str]]:
    """Initialise with the seed on every process (identical weights whatever the process count),
    load weights-only checkpoints, then wrap."""
    precision = config.device.precision
    seed_everything(config.seed)
    model = Transformer.build(model_args, device=dist.device, dtype=precision.param_dtype)
    notes = [model_summary(model, model_args.max_seq_len)]
    if step_dir is not None and record is None:
        model.load_state_dict(read_model_file(step_dir)["model"])
        notes.append(f"starting from the weights of {step_dir} (no training state there)")
    performance = config.performance
    plan = ParallelPlan(
        activation_checkpointing=performance.activation_checkpointing,
        compile=performance.compile,
        fsdp=dist.sharded,
        bf16=precision.param_dtype == torch.bfloat16,
        prefetching=performance.prefetching,
    )
    return parallelize(model, plan, dist.device), notes


def _build_data(
    config: TrainingConfig, dist: Distributed, tokenizer: Tokenizer, model_args: ModelArgs
) -> tuple[TrainWindows, EvalWindows | None, int, list[str]]:
    """Training windows for this process and the fixed evaluation batches (equal on every
    process; the data classes say clearly when a corpus is too small for one batch)."""
    from llama3.data.dataset import EvalWindows, TrainWindows

    data, batch_size, seq_len = config.data, config.batch.batch_size, model_args.max_seq_len
    train = _open_corpus(data.train_corpus, "--train_corpus", tokenizer, config, dist)
    windows = TrainWindows(
        train,
        seq_len,
        batch_size,
        seed=config.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        mode=data.data_mode,
        pad_id=tokenizer.padding_id,
    )
    notes = [
        f"train corpus: {train.n_tokens:,} tokens in {train.n_documents:,} documents; "
        f"{windows.steps_per_epoch:,} steps per epoch ({data.data_mode})"
    ]
    if data.eval_corpus is None:
        return windows, None, 0, notes + ["no --eval_corpus: evaluation off"]
    held_out = _open_corpus(data.eval_corpus, "--eval_corpus", tokenizer, config, dist)
    eval_windows = EvalWindows(
        held_out,
        seq_len,
        batch_size,
        mode=data.data_mode,
        pad_id=tokenizer.padding_id,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    n_batches = min(len(eval_windows), config.batch.eval_batches)
    notes.append(
        f"eval: {n_batches} batch(es) of {batch_size} × {seq_len} per process "
        f"every {config.batch.eval_steps} steps"
    )
    return windows, eval_windows, n_batches, notes


def _open_corpus(
    path: str, flag: str, tokenizer: Tokenizer, config: TrainingConfig, dist: Distributed
) -> TokenCorpus:
    """Open (and on first use encode and cache) a corpus. The main process goes first, so the
    others find the cache complete; if it fails, every process stops with its message."""
    from llama3.data.tokens import open_token_corpus

    if not Path(path).exists():
        raise UsageError(f"{flag} {path}: no such file or directory")
    cache_dir = config.data.cache_dir
    corpus = act_together(
        dist,
        lambda: open_token_corpus(path, tokenizer, cache_dir=cache_dir, progress=True, flag=flag),
        elsewhere=f"{flag} {path}: the first process could not open it (see its message)",
    )
    if corpus is None:
        corpus = open_token_corpus(path, tokenizer, cache_dir=cache_dir, progress=False, flag=flag)
    return corpus


def _throughput(
    config: TrainingConfig, dist: Distributed, model_args: ModelArgs
) -> tuple[Throughput, str]:
    peak, source = peak_tflops(
        dist.device,
        config.device.precision.name,
        config.device.allow_tf32,
        config.metrics.peak_tflops,
    )
    flops = training_flops_per_token(model_args, model_args.max_seq_len).total
    tokens_per_step = config.batch.batch_size * model_args.max_seq_len * dist.world_size
    total_peak = peak * 1e12 * dist.world_size if peak else None
    return Throughput(tokens_per_step, flops, total_peak), source
