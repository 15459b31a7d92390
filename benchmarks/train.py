"""Training speed, softmax and softplus side by side in one run: tokens/s, MFU, peak memory, and the
loss reached, with the same data and the same budget (steps, or wall-clock seconds) per model.

    python benchmarks/train.py                         # the original's configurations, on a GPU
    python benchmarks/train.py --tiny                  # a minute on a CPU
    python benchmarks/train.py --train_corpus DIR --tokenizer F --seconds 600 --amp_bf16

Models (original configuration: 3 layers, dim 128, vocab 2048, seq 4096, batch 64): softmax with
4 heads, softplus with core_dim 128 and 424. Each model trains with the project's own optimizer
step (llama3.training.step: AdamW, gradient clipping, accumulation) at a constant learning rate,
after --warmup untimed steps (compilation, allocator). Data: windows of --train_corpus in the same
shuffled order for every model, or, without a corpus, uniformly random tokens: labelled
"synthetic", whose loss only shows that training runs, not how well a model learns.

MFU = tokens/s × training FLOPs per token (llama3.model.training_flops_per_token) / peak FLOP/s,
the peak from --peak_tflops (e.g. a measured matmul peak) or NVIDIA's datasheet for known GPUs
(see llama3.training.metrics). vs_softmax is tokens/s relative to the softmax model of this run.
Peak memory is CUDA's max allocated per model; on the CPU it is not measured per model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BASE as COMMON_BASE  # noqa: E402
from benchmarks.common import TINY_BASE as COMMON_TINY_BASE  # noqa: E402
from benchmarks.common import (CONFIGS, RESULTS_DIR, TINY_CONFIGS, environment,  # noqa: E402
                               format_table, write_results)

import argparse  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from llama3 import ModelArgs, Transformer  # noqa: E402
from llama3.cli import add_precision_flags  # noqa: E402
from llama3.model import parameter_counts, training_flops_per_token  # noqa: E402
from llama3.runtime import Precision, configure_matmul, select_device  # noqa: E402
from llama3.training.distributed import Distributed  # noqa: E402
from llama3.training.metrics import peak_tflops  # noqa: E402
from llama3.training.optim import OptimizerSettings, build_optimizer  # noqa: E402
from llama3.training.parallel import ParallelPlan, parallelize  # noqa: E402
from llama3.training.step import TrainStep  # noqa: E402

BASE = dict(**COMMON_BASE, max_seq_len=4096)
TINY_BASE = dict(**COMMON_TINY_BASE, max_seq_len=128, multiple_of=16)
COLUMNS = ("model", "params", "seq_len", "batch", "steps", "tokens_per_s", "vs_softmax", "step_ms",
           "mfu", "peak_memory_gib", "final_loss", "data", "error")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="tiny models (2 layers, dim 32, seq 128, batch 8) that run on a CPU")
    p.add_argument("--models", nargs="+", default=None,
                   help="configurations to run (default: all; see the module docstring)")
    p.add_argument("--max_seq_len", type=int, default=None, help="window length (default: 4096)")
    p.add_argument("--batch_size", type=int, default=None, help="windows per step (default: 64)")
    p.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=50, help="timed steps per model")
    p.add_argument("--seconds", type=float, default=None,
                   help="instead of --steps: train each model for this wall-clock time")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--base_lr", type=float, default=1e-3, help="constant learning rate")
    p.add_argument("--train_corpus", metavar="PATH", help="real data (default: synthetic tokens)")
    p.add_argument("--tokenizer", metavar="MODEL_FILE", help="tokenizer of --train_corpus")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute activations in backward")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s of the device for MFU (default: datasheet for known GPUs)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON results (default: benchmarks/results/train_{cpu|cuda}.json)")
    add_precision_flags(p)
    args = p.parse_args()
    if (args.train_corpus is None) != (args.tokenizer is None):
        p.error("--train_corpus and --tokenizer go together")
    return args


def model_configs(args: argparse.Namespace, vocab_size: int | None) -> dict[str, ModelArgs]:
    configs, base = (TINY_CONFIGS, TINY_BASE) if args.tiny else (CONFIGS, BASE)
    names = args.models or list(configs)
    unknown = set(names) - set(configs)
    if unknown:
        sys.exit(f"unknown --models {sorted(unknown)}; choose from {list(configs)}")
    values = dict(base)
    if args.max_seq_len:
        values["max_seq_len"] = args.max_seq_len
    if vocab_size:
        values["vocab_size"] = vocab_size
    return {name: ModelArgs(**values, **configs[name]) for name in names}


def batches(args: argparse.Namespace, model_args: ModelArgs, batch_size: int,
            tokenizer: Any) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], str]:
    """The same stream of (inputs, targets) for every model, and its label."""
    seq_len = model_args.max_seq_len
    if args.train_corpus is None:
        generator = torch.Generator().manual_seed(args.seed)

        def synthetic() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            while True:
                tokens = torch.randint(0, model_args.vocab_size, (batch_size, seq_len + 1),
                                       generator=generator)
                yield tokens[:, :-1], tokens[:, 1:]

        return synthetic(), "synthetic"
    from llama3.data.dataset import TrainWindows
    from llama3.data.tokens import open_token_corpus

    corpus = open_token_corpus(args.train_corpus, tokenizer, flag="--train_corpus")
    windows = TrainWindows(corpus, seq_len, batch_size, seed=args.seed)  # packed windows
    return iter(windows), f"corpus {args.train_corpus}"


def measure(name: str, model_args: ModelArgs, args: argparse.Namespace, device: torch.device,
            precision: Precision, tokenizer: Any) -> dict[str, Any]:
    """Train one model for the budget; returns its row of the table."""
    batch_size = args.batch_size or (8 if args.tiny else 64)
    torch.manual_seed(args.seed)
    model = Transformer.build(model_args, device=device, dtype=precision.param_dtype)
    params = parameter_counts(model)["total"]
    parallelize(model, ParallelPlan(activation_checkpointing=args.activation_checkpointing,
                                    compile=args.compile), device)
    settings = OptimizerSettings(lr=args.base_lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    optimizer = build_optimizer(model, settings, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    step = TrainStep(model, optimizer, scaler, precision, Distributed(device=device),
                     accumulation_steps=args.accumulation_steps, max_norm=1.0)
    stream, data = batches(args, model_args, batch_size, tokenizer)
    try:
        losses, seconds = run_budget(step, stream, args, device)
    finally:
        stream.close()
    steps = len(losses)
    tokens_per_s = steps * batch_size * model_args.max_seq_len / seconds
    peak, _ = peak_tflops(device, precision.name, args.allow_tf32, args.peak_tflops)
    flops = training_flops_per_token(model_args, model_args.max_seq_len).total
    tail = losses[-max(1, len(losses) // 10):]
    return {"model": name, "params": params, "seq_len": model_args.max_seq_len,
            "batch": batch_size, "steps": steps, "tokens_per_s": tokens_per_s,
            "step_ms": 1000 * seconds / steps,
            "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None,
            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
            "final_loss": sum(tail) / len(tail), "data": data, "error": None}


def run_budget(step: TrainStep, stream: Iterator[tuple[torch.Tensor, torch.Tensor]],
               args: argparse.Namespace, device: torch.device) -> tuple[list[float], float]:
    """Untimed warm-up steps, then timed steps until the budget is spent; returns the timed
    steps' losses and their total seconds (data loading included)."""
    for i in range(args.warmup):
        step(*next(stream), lr=args.base_lr, step=i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses, seconds = [], 0.0
    while (seconds < args.seconds) if args.seconds else (len(losses) < args.steps):
        begin = time.perf_counter()
        result = step(*next(stream), lr=args.base_lr, step=args.warmup + len(losses) + 1)
        seconds += time.perf_counter() - begin  # each step ends by copying its loss to the host
        losses.append(result.loss)
    return losses, seconds


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """tokens/s of each model relative to softmax's, measured in this same run."""
    softmax = next((r for r in rows if r["model"] == "softmax" and r.get("tokens_per_s")), None)
    for row in rows:
        if softmax and row.get("tokens_per_s"):
            row["vs_softmax"] = row["tokens_per_s"] / softmax["tokens_per_s"]


def main() -> int:
    args = parse_args()
    device = select_device(args.device)
    precision = Precision.from_flags(args)
    configure_matmul(args.allow_tf32)
    tokenizer = None
    if args.tokenizer:
        from llama3.data.tokenizer import Tokenizer

        tokenizer = Tokenizer(args.tokenizer)
    configs = model_configs(args, tokenizer.vocab_size if tokenizer else None)
    rows = []
    for name, model_args in configs.items():
        try:
            rows.append(measure(name, model_args, args, device, precision, tokenizer))
        except torch.OutOfMemoryError as err:  # record it and go on with the next model
            rows.append({"model": name, "error": f"out of memory: {str(err).splitlines()[0]}"})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    add_ratios(rows)
    peak, source = peak_tflops(device, precision.name, args.allow_tf32, args.peak_tflops)
    budget = f"{args.seconds} s per model" if args.seconds else f"{args.steps} steps per model"
    print(f"\n{device} {environment().get('gpu') or ''}, precision {precision.name}, {budget}, "
          f"peak {peak} TFLOP/s ({source})\n")
    print(format_table(rows, COLUMNS))
    output = args.output or RESULTS_DIR / f"train_{device.type}.json"
    path = write_results(output, rows, benchmark="train", precision=precision.name, budget=budget,
                         peak_tflops=peak, peak_source=source, warmup_steps=args.warmup,
                         compile=args.compile, activation_checkpointing=args.activation_checkpointing)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
