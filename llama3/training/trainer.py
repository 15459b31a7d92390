"""The training loop shared by ``train`` (one process) and ``multitrain`` (FSDP2 under torchrun).

Each iteration runs one optimizer step (:mod:`llama3.training.step`) at the scheduled learning
rate and records it; around the steps: evaluation on fixed held-out batches every
``--eval_steps``, a checkpoint every ``--save_steps`` and at the end (:mod:`.checkpoints`: written
while training waits, or in the background), a stop with a checkpoint on Ctrl-C or SIGTERM, and a
stop without one on a non-finite loss or gradient. The process ends once its last checkpoint is
complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from llama3.checkpoint import check_background_saves, run_directory_lock
from llama3.errors import UsageError
from llama3.loss import evaluate_loss
from llama3.model import ModelArgs, Transformer, parameter_counts
from llama3.runtime import configure_matmul
from llama3.training.build import Run, Source, build_run
from llama3.training.checkpoints import Checkpoints
from llama3.training.diagnostics import WINDOWS as DIAGNOSTIC_WINDOWS
from llama3.training.diagnostics import attention_statistics
from llama3.training.distributed import Distributed
from llama3.training.flags import TrainingConfig
from llama3.training.guard import NonFiniteError
from llama3.training.interrupt import StopRequest
from llama3.training.metrics import (
    MetricsLog,
    format_summary,
    last_value,
    memory_measure,
    peak_memory_gib,
    reset_peak_memory,
    write_summary,
)

EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130


def run_training(
    args: argparse.Namespace, dist: Distributed, prepare: Callable[[Run], None] | None = None
) -> int:
    """Build the run from the flags (and the checkpoint it resumes), train to ``--total_steps``
    holding the run directory, return the exit status. ``prepare`` (experiments) gets the built
    run before its first step."""
    source = Source.read(args.from_checkpoint, args.to_checkpoint)
    config = TrainingConfig.from_args(args, source.flags)
    if config.checkpoints.async_checkpoint:
        check_background_saves(dist)
    configure_matmul(config.device.allow_tf32)
    with run_directory_lock(config.checkpoints.run_dir, dist):
        run = build_run(config, dist, source)
        if _finished(run):
            return 0
        if prepare is not None:
            prepare(run)
        return _train(run)


def _finished(run: Run) -> bool:
    """A resumed run already at --total_steps has nothing to do (and leaves its files as they
    are); one past it is refused."""
    step, total = run.progress.step, run.config.batch.total_steps
    if step > total:
        raise UsageError(
            f"--total_steps {total} is below step {step} of the checkpoint: give a "
            "larger one to continue"
        )
    if step == total and run.parts.dist.is_main:
        print(
            f"the run is complete: the checkpoint is at step {step} of --total_steps {total}; "
            "give a larger --total_steps to continue it"
        )
    return step == total


def _train(run: Run) -> int:
    config, dist = run.config, run.parts.dist
    reset_peak_memory(dist.device)
    if dist.is_main:
        print("\n".join(_header(run) + list(run.notes)), flush=True)
    metrics = MetricsLog(
        run.run_dir,
        main=dist.is_main,
        history=run.progress.history,
        start_step=run.progress.step,
        total_steps=config.batch.total_steps,
        tensorboard=config.metrics.tensorboard,
    )
    checkpoints = Checkpoints(run, metrics)
    stop = StopRequest(announce=dist.is_main).install()
    batches = iter(run.parts.train_windows)
    run.progress.start_clock()
    try:
        status = _loop(run, batches, metrics, stop, checkpoints)
        checkpoints.finish()  # the last checkpoint is complete before the process ends
    finally:
        checkpoints.close()
        stop.uninstall()
        batches.close()  # stops the data prefetch thread
        metrics.close()
    _finish(run, status, checkpoints.stalls)
    return {"completed": 0, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_NON_FINITE)


def _loop(
    run: Run,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    metrics: MetricsLog,
    stop: StopRequest,
    checkpoints: Checkpoints,
) -> str:
    """Train until the last step, a stop request or a non-finite value; returns which."""
    batch, progress = run.config.batch, run.progress
    every = run.config.metrics.diagnostics_steps
    status = "completed"
    while progress.step < batch.total_steps:
        diagnose = every > 0 and (progress.step + 1) % every == 0
        try:
            begin = time.perf_counter()  # the step's time includes waiting for its data
            window = next(batches)
            record, stop_requested, grad_norms = train_step(
                run, window, stop.requested, begin, diagnose
            )
        except NonFiniteError as err:
            metrics.write(
                {
                    "kind": "error",
                    "step": progress.step + 1,
                    "message": str(err),
                    "elapsed_s": progress.elapsed(),
                }
            )
            if run.parts.dist.is_main:
                print(f"error: {err}", file=sys.stderr, flush=True)
            return "non-finite"
        metrics.write(record)
        metrics.progress(record)
        checkpoints.poll()
        if diagnose:
            metrics.write(diagnostics(run, window[0], grad_norms))
        final = progress.step == batch.total_steps
        if run.parts.eval_windows is not None and (progress.step % batch.eval_steps == 0 or final):
            metrics.write(evaluate(run))
            metrics.note(_eval_line(progress.history[-1]))
        if stop_requested:
            status = "interrupted"
            break
        if progress.step % run.config.checkpoints.save_steps == 0 and not final:
            checkpoints.save()
    if progress.step != progress.saved_step:
        checkpoints.save(wait=True)
    return status


def train_step(
    run: Run,
    batch: tuple[torch.Tensor, torch.Tensor],
    stop_requested: bool,
    begin: float,
    grad_norms: bool = False,
) -> tuple[dict[str, Any], bool, dict[str, float] | None]:
    """One optimizer step on ``batch`` at the scheduled learning rate; returns its metric record,
    whether any process asked to stop, and (if ``grad_norms``) each parameter role's gradient
    norm."""
    parts, progress = run.parts, run.progress
    lr = parts.schedule(progress.step)
    result = parts.step(
        *batch, lr=lr, step=progress.step + 1, stop_requested=stop_requested, grad_norms=grad_norms
    )
    progress.step += 1
    progress.tokens += parts.throughput.tokens_per_step
    tokens_per_s, mfu = parts.throughput.add(time.perf_counter() - begin)
    record = {
        "kind": "train",
        "step": progress.step,
        "loss": result.loss,
        "lr": lr,
        "grad_norm": result.grad_norm,
        "tokens": progress.tokens,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_memory_gib": peak_memory_gib(parts.dist.device),
        "elapsed_s": progress.elapsed(),
    }
    if result.skipped:
        record["skipped"] = True
    return record, result.stop_requested, result.grad_norms


def diagnostics(
    run: Run, inputs: torch.Tensor, grad_norms: dict[str, float] | None
) -> dict[str, Any]:
    """The diagnostics record of the step just taken (see :mod:`llama3.training.diagnostics`):
    attention measured on the first windows of the first eval batch, else of ``inputs``."""
    parts, progress = run.parts, run.progress
    if parts.eval_windows is not None:
        inputs = next(iter(parts.eval_windows.batches(max_batches=1)))[0]
    tokens = inputs[:DIAGNOSTIC_WINDOWS].to(parts.dist.device)
    with run.config.device.precision.autocast(parts.dist.device):
        layers = attention_statistics(parts.model, tokens)
    return {
        "kind": "diagnostics",
        "step": progress.step,
        "tokens": progress.tokens,
        "layers": layers,
        "grad_norms": grad_norms,
    }


def evaluate(run: Run) -> dict[str, Any]:
    """Mean loss over the fixed held-out batches (the same ones at every evaluation)."""
    parts, progress = run.parts, run.progress
    dist = parts.dist
    result = evaluate_loss(
        parts.model,
        parts.eval_windows.batches(max_batches=parts.eval_batches),
        dist.device,
        run.config.device.precision,
        all_reduce=dist.all_reduce_sum if dist.active else None,
    )
    return {
        "kind": "eval",
        "step": progress.step,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "eval_tokens": result.tokens,
        "tokens": progress.tokens,
        "elapsed_s": progress.elapsed(),
    }


def _eval_line(record: dict[str, Any]) -> str:
    return (
        f"step {record['step']}: eval loss {record['loss']:.4f} "
        f"(perplexity {record['perplexity']:.2f}, {record['eval_tokens']:,} tokens)"
    )


def _header(run: Run) -> list[str]:
    batch, parts = run.config.batch, run.parts
    dist, peak = parts.dist, parts.throughput.peak_flops
    return [
        f"device {dist.device} × {dist.world_size} process(es), precision "
        f"{run.config.device.precision.name}" + (", FSDP2" if dist.sharded else ""),
        f"step: {batch.batch_size} windows × {parts.model_args.max_seq_len} tokens per process in "
        f"{batch.accumulation_steps} micro-batch(es) of {batch.micro_batch_size}; "
        f"{parts.throughput.tokens_per_step:,} tokens per step",
        f"MFU against {peak / 1e12 / dist.world_size:g} TFLOP/s per device ({parts.peak_source})"
        if peak
        else f"MFU: {parts.peak_source}",
        f"run directory: {run.run_dir}",
    ]


def _finish(run: Run, status: str, stalls: list[float]) -> None:
    """Print and save the end-of-run summary (main process); ``stalls``: the seconds each
    checkpoint held training up."""
    parts, progress = run.parts, run.progress
    dist = parts.dist
    if not dist.is_main:
        return
    tokens_per_s, mfu = parts.throughput.overall()
    peak = parts.throughput.peak_flops
    summary = {
        "status": status,
        "steps": progress.step,
        "total_steps": run.config.batch.total_steps,
        "tokens": progress.tokens,
        "elapsed_s": progress.elapsed(),
        "step_time_s": parts.throughput.seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_tflops_per_device": peak / 1e12 / dist.world_size if peak else None,
        "peak_tflops_source": parts.peak_source,
        "peak_memory_gib": peak_memory_gib(dist.device),
        "memory_measure": memory_measure(dist.device),
        "final_train_loss": last_value(progress.history, "train"),
        "final_eval_loss": last_value(progress.history, "eval"),
        "parameters": _parameter_count(parts.model_args),
        "checkpoint_stall_s": [round(s, 4) for s in stalls],
        "processes": dist.world_size,
        "device": str(dist.device),
        "precision": run.config.device.precision.name,
    }
    path = write_summary(run.run_dir, summary)
    print(f"run {status}; summary ({path}):\n{format_summary(summary)}", flush=True)


def _parameter_count(model_args: ModelArgs) -> int:
    with torch.device("meta"):
        return parameter_counts(Transformer(model_args))["total"]
