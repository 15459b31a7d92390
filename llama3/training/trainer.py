"""The training loop shared by ``train`` (one process) and ``multitrain`` (FSDP2 under torchrun).

Each iteration runs one optimizer step (:mod:`llama3.training.step`) at the scheduled learning
rate and records it; around the steps: evaluation on fixed held-out batches every
``--eval_steps``, a checkpoint every ``--save_steps`` and at the end, a stop with a checkpoint on
Ctrl-C or SIGTERM, and a stop without one on a non-finite loss or gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from llama3.checkpoint import capture_rng_state, save_training_checkpoint
from llama3.loss import evaluate_loss
from llama3.model import Transformer, parameter_counts
from llama3.runtime import configure_matmul
from llama3.training.build import Run, build_run
from llama3.training.distributed import Distributed
from llama3.training.flags import check_training_flags
from llama3.training.guard import NonFiniteError
from llama3.training.interrupt import StopRequest
from llama3.training.metrics import (MetricsLog, format_summary, last_value, memory_measure,
                                     peak_memory_gib, reset_peak_memory, write_summary)
from llama3.training.parallel import full_state_dict

EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130


def run_training(args: argparse.Namespace, dist: Distributed) -> int:
    """Build the run from the flags, train to ``--total_steps``, return the exit status."""
    check_training_flags(args)
    configure_matmul(args.allow_tf32)
    run = build_run(args, dist)
    reset_peak_memory(dist.device)
    if dist.is_main:
        print("\n".join(_header(run) + run.log), flush=True)
    metrics = MetricsLog(run.run_dir, main=dist.is_main, history=run.progress.history,
                         start_step=run.progress.step, total_steps=args.total_steps,
                         tensorboard=args.tensorboard)
    stop = StopRequest(announce=dist.is_main).install()
    batches = iter(run.train_windows)
    run.started = time.perf_counter()
    try:
        status = _loop(run, batches, metrics, stop)
    finally:
        stop.uninstall()
        batches.close()  # stops the data prefetch thread
        metrics.close()
    _finish(run, status)
    return {"completed": 0, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_NON_FINITE)


def _loop(run: Run, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], metrics: MetricsLog,
          stop: StopRequest) -> str:
    """Train until the last step, a stop request or a non-finite value; returns which."""
    args, progress = run.args, run.progress
    last_saved = progress.step if run.resumed_from is not None else None
    status = "completed"
    while progress.step < args.total_steps:
        try:
            begin = time.perf_counter()  # the step's time includes waiting for its data
            record, stop_requested = train_step(run, next(batches), stop.requested, begin)
        except NonFiniteError as err:
            metrics.write({"kind": "error", "step": progress.step + 1, "message": str(err),
                           "elapsed_s": _elapsed(run)})
            if run.dist.is_main:
                print(f"error: {err}", file=sys.stderr, flush=True)
            return "non-finite"
        metrics.write(record)
        metrics.progress(record)
        final = progress.step == args.total_steps
        if run.eval_windows is not None and (progress.step % args.eval_steps == 0 or final):
            metrics.write(evaluate(run))
            metrics.note(_eval_line(progress.history[-1]))
        if stop_requested:
            status = "interrupted"
            break
        if progress.step % args.save_steps == 0 and not final:
            save(run, metrics)
            last_saved = progress.step
    if progress.step != last_saved:
        save(run, metrics)
    return status


def train_step(run: Run, batch: tuple[torch.Tensor, torch.Tensor], stop_requested: bool,
               begin: float) -> tuple[dict[str, Any], bool]:
    """One optimizer step on ``batch`` at the scheduled learning rate; returns its metric record
    and whether any process asked to stop."""
    progress = run.progress
    lr = run.schedule(progress.step)
    result = run.step(*batch, lr=lr, step=progress.step + 1, stop_requested=stop_requested)
    progress.step += 1
    progress.tokens += run.throughput.tokens_per_step
    tokens_per_s, mfu = run.throughput.add(time.perf_counter() - begin)
    record = {"kind": "train", "step": progress.step, "loss": result.loss, "lr": lr,
              "grad_norm": result.grad_norm, "tokens": progress.tokens,
              "tokens_per_s": tokens_per_s, "mfu": mfu,
              "peak_memory_gib": peak_memory_gib(run.dist.device), "elapsed_s": _elapsed(run)}
    if result.skipped:
        record["skipped"] = True
    return record, result.stop_requested


def evaluate(run: Run) -> dict[str, Any]:
    """Mean loss over the fixed held-out batches (the same ones at every evaluation)."""
    dist = run.dist
    result = evaluate_loss(run.model, run.eval_windows.batches(max_batches=run.eval_batches),
                           dist.device, run.precision,
                           all_reduce=dist.all_reduce_sum if dist.active else None)
    return {"kind": "eval", "step": run.progress.step, "loss": result.loss,
            "perplexity": result.perplexity, "eval_tokens": result.tokens,
            "tokens": run.progress.tokens, "elapsed_s": _elapsed(run)}


def save(run: Run, metrics: MetricsLog) -> None:
    """Write a checkpoint of the current step (every process takes part)."""
    progress = run.progress
    trainer_record = {
        "train_args": vars(run.args), "schedule": dataclasses.asdict(run.schedule),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "history": progress.history, "tokens": progress.tokens,
        "elapsed_s": _elapsed(run), "corpus": run.corpus, "precision": run.precision.name,
    }
    rank_record = {"data": run.train_windows.state_dict(),
                   "rng": capture_rng_state(run.dist.device)}
    path = save_training_checkpoint(
        run.run_dir, progress.step, model=run.model, optimizer=run.optimizer,
        model_state=full_state_dict(run.model), model_args=run.model_args,
        tokenizer=run.tokenizer, trainer_record=trainer_record, rank_record=rank_record,
        group=run.dist, keep_last=run.args.keep_last or None)
    metrics.note(f"step {progress.step}: saved {path}")


def _elapsed(run: Run) -> float:
    """Wall-clock seconds of the whole run, earlier processes of a resumed run included."""
    return run.progress.elapsed_s + time.perf_counter() - run.started


def _eval_line(record: dict[str, Any]) -> str:
    return (f"step {record['step']}: eval loss {record['loss']:.4f} "
            f"(perplexity {record['perplexity']:.2f}, {record['eval_tokens']:,} tokens)")


def _header(run: Run) -> list[str]:
    args, dist = run.args, run.dist
    micro = args.batch_size // args.accumulation_steps
    peak = run.throughput.peak_flops
    return [
        f"device {dist.device} × {dist.world_size} process(es), precision {run.precision.name}"
        + (", FSDP2" if dist.sharded else ""),
        f"step: {args.batch_size} windows × {run.model_args.max_seq_len} tokens per process in "
        f"{args.accumulation_steps} micro-batch(es) of {micro}; "
        f"{run.throughput.tokens_per_step:,} tokens per step",
        f"MFU against {peak / 1e12 / dist.world_size:g} TFLOP/s per device ({run.peak_source})"
        if peak else f"MFU: {run.peak_source}",
        f"run directory: {run.run_dir}",
    ]


def _finish(run: Run, status: str) -> None:
    """Print and save the end-of-run summary (main process)."""
    if not run.dist.is_main:
        return
    tokens_per_s, mfu = run.throughput.overall()
    history = run.progress.history
    peak = run.throughput.peak_flops
    summary = {
        "status": status,
        "steps": run.progress.step,
        "total_steps": run.args.total_steps,
        "tokens": run.progress.tokens,
        "elapsed_s": _elapsed(run),
        "step_time_s": run.throughput.seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_tflops_per_device": peak / 1e12 / run.dist.world_size if peak else None,
        "peak_tflops_source": run.peak_source,
        "peak_memory_gib": peak_memory_gib(run.dist.device),
        "memory_measure": memory_measure(run.dist.device),
        "final_train_loss": last_value(history, "train"),
        "final_eval_loss": last_value(history, "eval"),
        "parameters": _parameter_count(run),
        "processes": run.dist.world_size,
        "device": str(run.dist.device),
        "precision": run.precision.name,
    }
    path = write_summary(run.run_dir, summary)
    print(f"run {status}; summary ({path}):\n{format_summary(summary)}", flush=True)


def _parameter_count(run: Run) -> int:
    with torch.device("meta"):
        return parameter_counts(Transformer(run.model_args))["total"]
