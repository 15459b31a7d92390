"""Everything a run needs, built from the flags in a fixed order: tokenizer, model (new, or
from a checkpoint), parallel wrappers, optimiser, data, then the saved state of a resumed run."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama3.checkpoint import (check_model_flags, list_step_dirs, load_training_state,
                               read_model_file, read_rank_record, read_trainer_record,
                               restore_rng_state, tokenizer_fingerprint)
from llama3.cli import model_flag_values
from llama3.errors import UsageError
from llama3.model import ModelArgs, Transformer, model_summary, training_flops_per_token
from llama3.runtime import Precision, seed_everything
from llama3.training.distributed import Distributed
from llama3.training.flags import warmup_steps
from llama3.training.metrics import Throughput, peak_tflops
from llama3.training.optim import LRSchedule, OptimizerSettings, apply_settings, build_optimizer
from llama3.training.parallel import ParallelPlan, parallelize
from llama3.training.step import TrainStep


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0  # token positions trained on, all processes
    elapsed_s: float = 0.0  # wall-clock seconds of the run before this process started
    history: list[dict[str, Any]] = field(default_factory=list)  # metric records so far


@dataclass
class Run:
    args: argparse.Namespace
    dist: Distributed
    precision: Precision
    model_args: ModelArgs
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: TrainStep
    schedule: LRSchedule
    train_windows: Any  # llama3.data.dataset.TrainWindows
    eval_windows: Any | None  # llama3.data.dataset.EvalWindows
    eval_batches: int
    tokenizer: dict[str, str]
    corpus: str  # fingerprint of the training corpus
    throughput: Throughput
    peak_source: str
    progress: Progress
    resumed_from: Path | None = None
    started: float = 0.0  # time.perf_counter() when this process began training
    log: list[str] = field(default_factory=list)  # what to tell the user before training

    @property
    def run_dir(self) -> Path:
        return Path(self.args.to_checkpoint)


def build_run(args: argparse.Namespace, dist: Distributed) -> Run:
    from llama3.data.tokenizer import Tokenizer

    precision = Precision.from_flags(args)
    tokenizer = Tokenizer(args.tokenizer)
    step_dir, record = _resume_source(args)
    model_args = _model_args(args, tokenizer, step_dir, record)
    model, lines = _build_model(args, model_args, dist, precision, step_dir, record)
    optimizer = build_optimizer(model, optimizer_settings(args), dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision.needs_scaler)
    train_windows, eval_windows, eval_batches, corpus, data_lines = _build_data(
        args, dist, tokenizer, model_args)
    throughput, peak_source = _throughput(args, dist, precision, model_args)
    step = TrainStep(model, optimizer, scaler, precision, dist,
                     accumulation_steps=args.accumulation_steps, max_norm=args.max_norm)
    run = Run(args=args, dist=dist, precision=precision, model_args=model_args, model=model,
              optimizer=optimizer, scaler=scaler, step=step, schedule=lr_schedule(args),
              train_windows=train_windows, eval_windows=eval_windows, eval_batches=eval_batches,
              tokenizer=tokenizer_fingerprint(args.tokenizer), corpus=corpus,
              throughput=throughput, peak_source=peak_source, progress=Progress(),
              log=lines + data_lines)
    if record is not None:
        _restore(run, step_dir, record)
    return run


def optimizer_settings(args: argparse.Namespace) -> OptimizerSettings:
    return OptimizerSettings(lr=args.base_lr, weight_decay=args.wd_rate,
                             betas=(args.beta1, args.beta2), eps=args.adam_eps)


def lr_schedule(args: argparse.Namespace) -> LRSchedule:
    return LRSchedule(base_lr=args.base_lr, warmup_steps=warmup_steps(args),
                      total_steps=args.total_steps, kind=args.lr_schedule,
                      min_ratio=args.min_lr_ratio)


def _resume_source(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to start from, if any, and its training record (None: weights only)."""
    if args.from_checkpoint is None:
        existing = list_step_dirs(args.to_checkpoint)
        if existing:
            raise UsageError(f"--to_checkpoint {args.to_checkpoint} already holds a run (up to "
                             f"{existing[-1].name}): continue it with --from_checkpoint "
                             f"{args.to_checkpoint}, or choose a new directory")
        return None, None
    return read_trainer_record(args.from_checkpoint)


def _model_args(args: argparse.Namespace, tokenizer: Any, step_dir: Path | None,
                record: dict[str, Any] | None) -> ModelArgs:
    from llama3.data.tokenizer import check_tokenizer

    if step_dir is None:
        return ModelArgs(vocab_size=tokenizer.vocab_size, **model_flag_values(args))
    saved = record if record is not None else read_model_file(step_dir)
    model_args = ModelArgs.from_dict(saved["model_args"])
    check_model_flags(model_flag_values(args), model_args)
    check_tokenizer(tokenizer, saved.get("tokenizer"), model_args.vocab_size)
    return model_args


def _build_model(args: argparse.Namespace, model_args: ModelArgs, dist: Distributed,
                 precision: Precision, step_dir: Path | None,
                 record: dict[str, Any] | None) -> tuple[nn.Module, list[str]]:
    """Initialise with the seed on every process (identical weights whatever the process count),
    load weights-only checkpoints, then wrap."""
    seed_everything(args.seed)
    model = Transformer.build(model_args, device=dist.device, dtype=precision.param_dtype)
    lines = [model_summary(model, model_args.max_seq_len)]
    if step_dir is not None and record is None:
        model.load_state_dict(read_model_file(step_dir)["model"])
        lines.append(f"starting from the weights of {step_dir} (no training state there)")
    plan = ParallelPlan(activation_checkpointing=args.activation_checkpointing,
                        compile=args.compile, fsdp=dist.sharded,
                        bf16=precision.param_dtype == torch.bfloat16,
                        prefetching=getattr(args, "prefetching", 0))
    return parallelize(model, plan, dist.device), lines


def _build_data(args: argparse.Namespace, dist: Distributed, tokenizer: Any,
                model_args: ModelArgs) -> tuple[Any, Any, int, str, list[str]]:
    """Training windows for this process and the fixed evaluation batches (equal on every
    process; the data classes say clearly when a corpus is too small for one batch)."""
    from llama3.data.dataset import EvalWindows, TrainWindows

    seq_len = model_args.max_seq_len
    pad_id = tokenizer.padding_id
    train = _open_corpus(args.train_corpus, "--train_corpus", tokenizer, args, dist)
    windows = TrainWindows(train, seq_len, args.batch_size, seed=args.seed, rank=dist.rank,
                           world_size=dist.world_size, mode=args.data_mode, pad_id=pad_id)
    lines = [f"train corpus: {train.n_tokens:,} tokens in {train.n_documents:,} documents; "
             f"{windows.steps_per_epoch:,} steps per epoch ({args.data_mode})"]
    if args.eval_corpus is None:
        return windows, None, 0, train.fingerprint, lines + ["no --eval_corpus: evaluation off"]
    held_out = _open_corpus(args.eval_corpus, "--eval_corpus", tokenizer, args, dist)
    eval_windows = EvalWindows(held_out, seq_len, args.batch_size, mode=args.data_mode,
                               pad_id=pad_id, rank=dist.rank, world_size=dist.world_size)
    n_batches = min(len(eval_windows), args.eval_batches)
    lines.append(f"eval: {n_batches} batch(es) of {args.batch_size} × {seq_len} per process "
                 f"every {args.eval_steps} steps")
    return windows, eval_windows, n_batches, train.fingerprint, lines


def _open_corpus(path: str, flag: str, tokenizer: Any, args: argparse.Namespace,
                 dist: Distributed) -> Any:
    """Open (and on first use encode and cache) a corpus. The main process goes first, so the
    others find the cache complete; if it fails, every process stops with its message."""
    from llama3.data.tokens import open_token_corpus

    if not Path(path).exists():
        raise UsageError(f"{flag} {path}: no such file or directory")
    corpus, error = None, None
    if dist.is_main:
        try:
            corpus = open_token_corpus(path, tokenizer, cache_dir=args.cache_dir, progress=True,
                                       flag=flag)
        except UsageError as err:
            error = err
    failed = dist.all_reduce_max(torch.tensor(int(error is not None), device=dist.device))
    if error is not None:
        raise error
    if failed.item():
        raise UsageError(f"{flag} {path}: the first process could not open it (see its message)")
    if corpus is None:
        corpus = open_token_corpus(path, tokenizer, cache_dir=args.cache_dir, progress=False,
                                   flag=flag)
    return corpus


def _throughput(args: argparse.Namespace, dist: Distributed, precision: Precision,
                model_args: ModelArgs) -> tuple[Throughput, str]:
    peak, source = peak_tflops(dist.device, precision.name, args.allow_tf32, args.peak_tflops)
    flops = training_flops_per_token(model_args, model_args.max_seq_len).total
    tokens_per_step = args.batch_size * model_args.max_seq_len * dist.world_size
    total_peak = peak * 1e12 * dist.world_size if peak else None
    return Throughput(tokens_per_step, flops, total_peak), source


def _restore(run: Run, step_dir: Path, record: dict[str, Any]) -> None:
    """Continue from a training checkpoint: model, optimizer, scaler, data position, generators.

    The data position is restored first: it refuses (naming the flag) a changed seed, batch
    size, sequence length or corpus, before the larger state is read.
    """
    if record["world_size"] != run.dist.world_size:
        raise UsageError(f"{step_dir} was written by {record['world_size']} process(es); continue "
                         f"it with as many (not {run.dist.world_size}) so the data order continues")
    rank_record = read_rank_record(step_dir, run.dist)
    run.train_windows.load_state_dict(rank_record["data"])
    load_training_state(step_dir, run.model, run.optimizer, run.dist)
    apply_settings(run.optimizer, optimizer_settings(run.args))
    if run.scaler.is_enabled() and record["scaler"]:
        run.scaler.load_state_dict(record["scaler"])
    restore_rng_state(rank_record["rng"], run.dist.device)
    run.progress = Progress(step=record["step"], tokens=record["tokens"],
                            elapsed_s=record["elapsed_s"], history=list(record["history"]))
    run.resumed_from = step_dir
    saved = record["schedule"]
    if saved != dataclasses.asdict(run.schedule):
        run.log.append(f"learning-rate schedule differs from the checkpoint's ({saved}); "
                       "following the flags")
    run.log.append(f"resumed from {step_dir} at step {record['step']}")
