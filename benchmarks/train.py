"""Training speed, softmax and softplus side by side in one run: tokens/s, MFU, peak memory, and the
loss reached after equal wall time, per model, sequence length and compile mode.

    python -m benchmarks.train --amp_bf16 --allow_tf32 --python_docs work/docs \\
        --compile_modes eager compile --seconds 8           # the original's six configurations
    python -m benchmarks.train --tiny --device cpu --seconds 1       # seconds on a CPU

Models (original configuration: 3 layers, dim 128, vocab 2048, batch 64, sequence 4096 and 8192):
softmax with 4 heads, softplus with core_dim 128 and 424. Each runs with the project's own optimizer
step (llama3.training.step: AdamW, gradient clipping, accumulation) at a constant learning rate:
--warmup untimed steps first (compilation, autotuning, allocator; their time is reported as
warmup_s), then timed steps for --seconds of wall time (or --steps steps). Configurations run in
the order: compile mode, sequence length, model; with --deadline_s a configuration starts only if
the time left covers its budget and the longest warm-up seen so far in its mode (30 s assumed
before the first compiled one), else its row says so. Results are written after every row.

Data, the same windows in the same order for every model of a sequence length: packed windows of
--train_corpus, or of the quick start's Python documentation corpus (--python_docs: built in DIR
on first use, about 0.5 M tokens), or, without either, uniformly random tokens ("synthetic": the
loss only shows that training runs). A corpus too small for one batch at a sequence length falls
back to synthetic tokens for that length, and the data column says so.

MFU = tokens/s × training FLOPs per token (llama3.model.training_flops_per_token) / peak FLOP/s;
the peak is --peak_tflops, else a bf16 matmul measured at the start of this run (CUDA), else
unknown (CPU). vs_softmax: tokens/s relative to softmax at the same sequence length and mode.
Peak memory: CUDA's max allocated during the timed steps. loss: mean of the last tenth of the timed
steps' losses; loss_curve: (seconds since the timed steps began, loss) per step. projected_80k_h:
80,000 steps (the original's run) at the measured mean step time, in hours.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BASE as COMMON_BASE
from benchmarks.common import (
    CONFIGS,
    RESULTS_DIR,
    TINY_CONFIGS,
    Deadline,
    Estimates,
    Timer,
    device_slug,
    environment,
    format_table,
    matmul_tflops,
    python_docs_corpus,
    wall_clock,
    write_results,
)
from benchmarks.common import TINY_BASE as COMMON_TINY_BASE
from llama3 import ModelArgs, Transformer
from llama3.cli import UsageError, add_precision_flags
from llama3.model import parameter_counts, training_flops_per_token
from llama3.runtime import Precision, configure_matmul, select_device
from llama3.training.distributed import Distributed
from llama3.training.optim import OptimizerSettings, build_optimizer
from llama3.training.parallel import ParallelPlan, parallelize
from llama3.training.step import TrainStep

TINY_BASE = dict(**COMMON_TINY_BASE, multiple_of=16)
ORIGINAL_STEPS = 80_000
MODES = ("eager", "compile")
FIRST_COMPILE_S = 30.0  # warm-up assumed for the first compiled configuration under --deadline_s
COLUMNS = (
    "model",
    "seq_len",
    "mode",
    "batch",
    "steps",
    "tokens_per_s",
    "vs_softmax",
    "step_ms",
    "mfu",
    "peak_memory_gib",
    "loss",
    "warmup_s",
    "projected_80k_h",
    "data",
    "error",
)
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny models (2 layers, dim 32, seq 128, batch 8) that run on a CPU",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="configurations to run (default: all; see the module docstring)",
    )
    p.add_argument(
        "--seq_lens",
        type=int,
        nargs="+",
        default=None,
        help="window lengths (default: 4096 8192; tiny: 128)",
    )
    p.add_argument("--batch_size", type=int, default=None, help="windows per step (default: 64)")
    p.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per step")
    p.add_argument(
        "--compile_modes",
        nargs="+",
        choices=MODES,
        default=["eager"],
        help="eager, and/or torch.compile of each block",
    )
    p.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="instead of --steps: train each configuration for this wall-clock time",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--deadline_s",
        type=float,
        default=None,
        help="time budget of the whole run: configurations that would not fit are "
        "recorded as not run",
    )
    p.add_argument("--base_lr", type=float, default=1e-3, help="constant learning rate")
    data = p.add_mutually_exclusive_group()
    data.add_argument(
        "--train_corpus", metavar="PATH", help="real data (default: synthetic tokens)"
    )
    data.add_argument(
        "--python_docs",
        metavar="DIR",
        help="the quick start's Python documentation corpus and its tokenizer, "
        "built in DIR on first use",
    )
    p.add_argument("--tokenizer", metavar="MODEL_FILE", help="tokenizer of --train_corpus")
    p.add_argument(
        "--activation_checkpointing", action="store_true", help="recompute activations in backward"
    )
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak TFLOP/s for MFU (default: a bf16 matmul measured in this run, CUDA)",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results (default: benchmarks/results/train_DEVICE.json)",
    )
    add_precision_flags(p)
    args = p.parse_args(argv)
    if (args.train_corpus is None) != (args.tokenizer is None):
        p.error("--train_corpus and --tokenizer go together")
    return args


@dataclass
class Setting:
    """One row of the table: a model at a sequence length in a compile mode."""

    name: str
    model_args: ModelArgs
    mode: str

    @property
    def seq_len(self) -> int:
        return self.model_args.max_seq_len


def settings(args: argparse.Namespace, vocab_size: int | None) -> list[Setting]:
    """Every configuration, in run order: mode, sequence length, model."""
    configs, base = (TINY_CONFIGS, TINY_BASE) if args.tiny else (CONFIGS, COMMON_BASE)
    names = args.models or list(configs)
    unknown = set(names) - set(configs)
    if unknown:
        raise UsageError(f"--models: unknown {sorted(unknown)}; choose from {list(configs)}")
    values = dict(base, **({"vocab_size": vocab_size} if vocab_size else {}))
    seq_lens = args.seq_lens or ([128] if args.tiny else [4096, 8192])
    return [
        Setting(name, ModelArgs(**values, **configs[name], max_seq_len=seq_len), mode)
        for mode in args.compile_modes
        for seq_len in seq_lens
        for name in names
    ]


def synthetic(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> Batches:
    generator = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        yield tokens[:, :-1], tokens[:, 1:]


@dataclass
class Data:
    """The token corpus (None: synthetic tokens), its name in the table and its vocabulary."""

    corpus: Any = None
    name: str = "synthetic"
    vocab_size: int | None = None


def batches(data: Data, setting: Setting, batch_size: int, seed: int) -> tuple[Batches, str]:
    """The same stream of (inputs, targets) for every model at this length, and its label."""
    seq_len, corpus = setting.seq_len, data.corpus
    if corpus is None:
        return synthetic(setting.model_args.vocab_size, batch_size, seq_len, seed), "synthetic"
    from llama3.data.dataset import TrainWindows

    try:
        windows = TrainWindows(corpus, seq_len, batch_size, seed=seed)  # packed windows
    except UsageError:
        windows_available = max(corpus.n_tokens - 1, 0) // seq_len
        label = (
            f"synthetic ({data.name} gives {windows_available} windows of {seq_len}, "
            f"fewer than a batch of {batch_size})"
        )
        print(f"{setting.name} at {seq_len}: {label}", flush=True)
        return synthetic(setting.model_args.vocab_size, batch_size, seq_len, seed), label
    return iter(windows), f"{data.name} ({corpus.n_tokens:,} tokens)"


class Runner:
    """Runs each setting with the shared data, precision and device."""

    def __init__(
        self,
        args: argparse.Namespace,
        device: torch.device,
        precision: Precision,
        data: Data,
        peak: float | None,
    ):
        self.args, self.device, self.precision, self.data, self.peak = (
            args,
            device,
            precision,
            data,
            peak,
        )
        self.batch_size = args.batch_size or (8 if args.tiny else 64)
        self.warmups = Estimates({"compile": FIRST_COMPILE_S})

    def estimate_s(self, setting: Setting) -> float:
        return (self.args.seconds or 0.0) + self.warmups[setting.mode]

    def measure(self, setting: Setting) -> dict[str, Any]:
        """Train one configuration for the budget; returns its row of the table."""
        args, device = self.args, self.device
        torch.manual_seed(args.seed)
        if setting.mode == "compile":
            torch._dynamo.reset()  # each configuration compiles from scratch, timed in warmup_s
        model = Transformer.build(
            setting.model_args, device=device, dtype=self.precision.param_dtype
        )
        params = parameter_counts(model)["total"]
        parallelize(
            model,
            ParallelPlan(
                activation_checkpointing=args.activation_checkpointing,
                compile=setting.mode == "compile",
            ),
            device,
        )
        optimizer = build_optimizer(
            model,
            OptimizerSettings(lr=args.base_lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8),
            device,
        )
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision.needs_scaler)
        step = TrainStep(
            model,
            optimizer,
            scaler,
            self.precision,
            Distributed(device=device),
            accumulation_steps=args.accumulation_steps,
            max_norm=1.0,
        )
        stream, data = batches(self.data, setting, self.batch_size, args.seed)
        try:
            warmup_s, first_s = self.warm_up(step, stream)
            curve = self.timed_steps(step, stream)
        finally:
            stream.close()
        self.warmups.record(setting.mode, warmup_s)
        return self.row(setting, params, curve, warmup_s, first_s, data)

    def warm_up(self, step: TrainStep, stream: Batches) -> tuple[float, float]:
        """Untimed steps; returns their seconds and those of the first (compilation)."""
        begin = time.perf_counter()
        first = 0.0
        for i in range(self.args.warmup):
            step(*next(stream), lr=self.args.base_lr, step=i + 1)
            if i == 0:
                first = time.perf_counter() - begin
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter() - begin, first

    def timed_steps(self, step: TrainStep, stream: Batches) -> list[tuple[float, float]]:
        """Timed steps until the budget is spent: (seconds so far, loss) per step, data loading
        included (each step ends by copying its loss to the host)."""
        args, curve, seconds = self.args, [], 0.0
        while (seconds < args.seconds) if args.seconds else (len(curve) < args.steps):
            begin = time.perf_counter()
            result = step(*next(stream), lr=args.base_lr, step=args.warmup + len(curve) + 1)
            seconds += time.perf_counter() - begin
            curve.append((seconds, result.loss))
        return curve

    def row(
        self,
        setting: Setting,
        params: int,
        curve: list[tuple[float, float]],
        warmup_s: float,
        first_s: float,
        data: str,
    ) -> dict[str, Any]:
        model_args, steps = setting.model_args, len(curve)
        seconds = curve[-1][0]
        tokens_per_s = steps * self.batch_size * setting.seq_len / seconds
        flops = training_flops_per_token(model_args, setting.seq_len).total
        tail = [loss for _, loss in curve[-max(1, steps // 10) :]]
        return {
            "model": setting.name,
            "attention": model_args.attention,
            "core_dim": model_args.core_dim if model_args.attention == "softplus" else None,
            "params": params,
            "seq_len": setting.seq_len,
            "mode": setting.mode,
            "batch": self.batch_size,
            "steps": steps,
            "seconds": seconds,
            "tokens_per_s": tokens_per_s,
            "step_ms": 1000 * seconds / steps,
            "mfu": tokens_per_s * flops / (self.peak * 1e12) if self.peak else None,
            "peak_memory_gib": (
                torch.cuda.max_memory_allocated(self.device) / 2**30
                if self.device.type == "cuda"
                else None
            ),
            "loss": sum(tail) / len(tail),
            "warmup_s": warmup_s,
            "first_step_s": first_s,
            "projected_80k_h": ORIGINAL_STEPS * seconds / steps / 3600,
            "loss_curve": [[round(t, 4), loss] for t, loss in curve],
            "data": data,
            "error": None,
        }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """tokens/s of each row relative to softmax's at the same length and mode, in this run."""
    for row in rows:
        softmax = next(
            (
                r
                for r in rows
                if r.get("attention") == "softmax"
                and r.get("tokens_per_s")
                and (r["seq_len"], r["mode"]) == (row.get("seq_len"), row.get("mode"))
            ),
            None,
        )
        if softmax and row.get("tokens_per_s"):
            row["vs_softmax"] = row["tokens_per_s"] / softmax["tokens_per_s"]


def open_data(args: argparse.Namespace) -> Data:
    corpus, tokenizer, name = args.train_corpus, args.tokenizer, Path(args.train_corpus or "").name
    if args.python_docs:
        docs = python_docs_corpus(args.python_docs)
        corpus, tokenizer, name = docs.train, docs.tokenizer, "Python documentation"
    if corpus is None:
        return Data()
    from llama3.data.tokenizer import Tokenizer
    from llama3.data.tokens import open_token_corpus

    tokenizer = Tokenizer(tokenizer)
    return Data(
        open_token_corpus(corpus, tokenizer, progress=False, flag="--train_corpus"),
        name,
        tokenizer.vocab_size,
    )


def peak_tflops(args: argparse.Namespace, timer: Timer) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak_tflops"
    if timer.device.type != "cuda":
        return None, "unknown on the CPU (give --peak_tflops to report MFU)"
    return matmul_tflops(timer, 8192, torch.bfloat16), "bf16 matmul 8192³ measured in this run"


def timing(args: argparse.Namespace, peak_timer: Timer | None) -> dict[str, Any]:
    """How the run timed: every optimizer step by the wall clock, and the peak's matmul (when
    measured) by ``peak_timer``."""
    repetitions = (
        f"as many as fit in --seconds {args.seconds} (rows record the count)"
        if args.seconds
        else args.steps
    )
    steps = wall_clock(
        "one optimizer step, data included; each step ends by copying its loss to the host",
        "mean step time",
        warmup=args.warmup,
        repetitions=repetitions,
    )
    return {"steps": steps, "peak_matmul": peak_timer.record() if peak_timer else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = Deadline(args.deadline_s)
    try:
        device = select_device(args.device)
        data = open_data(args)
        plan = settings(args, data.vocab_size)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    precision = Precision.from_flags(args)
    configure_matmul(args.allow_tf32)
    timer = Timer(device)
    peak, source = peak_tflops(args, timer)
    budget = f"{args.seconds} s per configuration" if args.seconds else f"{args.steps} steps"
    print(
        f"{environment()['gpu'] or device}, {precision.name}, {budget} after {args.warmup} "
        f"warm-up steps; peak {peak and round(peak, 1)} TFLOP/s ({source})",
        flush=True,
    )
    output = args.output or RESULTS_DIR / f"train_{device_slug(device)}.json"
    measured = peak is not None and not args.peak_tflops
    meta = dict(
        benchmark="train",
        timing=timing(args, timer if measured else None),
        precision=precision.name,
        allow_tf32=args.allow_tf32,
        budget=budget,
        seconds=args.seconds,
        warmup_steps=args.warmup,
        peak_tflops=peak,
        peak_source=source,
        original_steps=ORIGINAL_STEPS,
        activation_checkpointing=args.activation_checkpointing,
    )
    runner = Runner(args, device, precision, data, peak)
    rows: list[dict[str, Any]] = []
    for setting in plan:
        base = {
            "model": setting.name,
            "attention": setting.model_args.attention,
            "seq_len": setting.seq_len,
            "mode": setting.mode,
        }
        if not deadline.allows(runner.estimate_s(setting)):
            rows.append({**base, "error": Deadline.skipped()})
        else:
            rows.append(attempt(runner, setting, base))
        add_ratios(rows)
        print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        write_results(output, rows, **meta, elapsed_s=time.monotonic() - started)
    print(f"\n{format_table(rows, COLUMNS)}\n\nwrote {output}")
    return 0


def attempt(runner: Runner, setting: Setting, base: dict[str, Any]) -> dict[str, Any]:
    """One configuration; out of memory and compiler failures become the row's error."""
    try:
        return runner.measure(setting)
    except (torch.OutOfMemoryError, RuntimeError) as err:  # record it, go on with the next
        return {**base, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    finally:
        gc.collect()
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
