"""Latency and throughput of a runner: warm-up, timed calls, mean and percentiles."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from llama3.deploy.runners import Runner, empty_cache
from llama3.model.args import ModelArgs

PERCENTILES = (50, 90, 95, 99)  # numpy's q is in 0–100


@dataclass
class Latency:
    """One (runner, shape) measurement; times in milliseconds."""

    runner: str
    phase: str  # "prefill" (empty cache) or "decode" (one token after a cache)
    batch: int
    query: int
    cached: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def calls_per_s(self) -> float:
        """Batches per second (1000 / mean latency in ms)."""
        return 1000.0 / self.mean_ms

    @property
    def sequences_per_s(self) -> float:
        return self.batch * 1000.0 / self.mean_ms

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.query * 1000.0 / self.mean_ms

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            **asdict(self),
            "calls_per_s": self.calls_per_s,
            "sequences_per_s": self.sequences_per_s,
            "tokens_per_s": self.tokens_per_s,
        }


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Mean and percentiles of call times given in seconds, in milliseconds."""
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    stats = {"mean_ms": float(ms.mean())}
    for q, value in zip(PERCENTILES, np.percentile(ms, PERCENTILES)):
        stats[f"p{q}_ms"] = float(value)
    return stats


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, iterations: int
) -> list[float]:
    """Wall-clock seconds of each of ``iterations`` calls after ``warmup`` untimed ones.

    Each call is bracketed by a device-wide synchronisation, so work a runtime queues on its own
    CUDA stream (ONNX Runtime) is counted like work on torch's stream (PyTorch, TensorRT).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def measure(
    runner: Runner,
    args: ModelArgs,
    batch: int,
    query: int,
    cached: int = 0,
    *,
    warmup: int = 10,
    iterations: int = 100,
    seed: int = 0,
) -> Latency:
    """Latency of ``runner`` on random tokens (batch, query) after ``cached`` cache positions."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (batch, query), generator=generator).to(
        runner.device
    )
    if cached:
        k, v = empty_cache(runner, args, batch)
        prefix = torch.randint(0, args.vocab_size, (batch, cached), generator=generator)
        _, k, v = runner(prefix.to(runner.device), k, v)  # a real cache, as decoding would see
    else:
        k, v = empty_cache(runner, args, batch)
    with torch.no_grad():
        times = time_calls(lambda: runner(tokens, k, v), runner.device, warmup, iterations)
    phase = "decode" if cached else "prefill"
    return Latency(
        runner=runner.name,
        phase=phase,
        batch=batch,
        query=query,
        cached=cached,
        iterations=iterations,
        **summarize(times),
    )
