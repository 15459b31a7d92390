"""Shared pieces of the benchmark scripts: the original's configurations, device ceilings measured
in the same run, time budgets, the offline corpus, and how results are written."""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama3.fileio import write_json
from llama3.reporting import environment, format_table

__all__ = ["BASE", "CONFIGS", "REPO", "RESULTS_DIR", "TINY_BASE", "TINY_CONFIGS",
           "AUTOTUNE_VARIABLE", "TMA_VARIABLE", "Deadline", "DocsCorpus", "Estimates",
           "autotune_enabled", "child_env", "copy_bandwidth_gb_per_s", "device_slug",
           "environment", "format_table", "matmul_tflops", "python_docs_corpus", "timed",
           "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The original's comparison: 3 layers, dim 128, vocabulary 2048; softmax with 4 heads against
# softplus at core widths 128 and 424. The tiny variants run on a CPU.
BASE = dict(n_layers=3, dim=128, vocab_size=2048)
CONFIGS = {
    "softmax": dict(attention="softmax", n_heads=4),
    "softplus-128": dict(attention="softplus", core_dim=128),
    "softplus-424": dict(attention="softplus", core_dim=424),
}
TINY_BASE = dict(n_layers=2, dim=32, vocab_size=128)
TINY_CONFIGS = {
    "softmax": dict(attention="softmax", n_heads=4),
    "softplus-16": dict(attention="softplus", core_dim=16),
    "softplus-40": dict(attention="softplus", core_dim=40),
}

# "0": every softplus kernel runs the first configuration of its table instead of autotuning
# (minutes of compilation saved; the timings are then those of the untuned kernels).
AUTOTUNE_VARIABLE = "LLAMA3_KERNEL_AUTOTUNE"
# "0": no TMA descriptors, pointer loads everywhere (recorded with every result)
TMA_VARIABLE = "LLAMA3_KERNEL_TMA"


REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: this one's, the repository importable without installing
    it (as on a machine where it is only copied), and ``extra``."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_VARIABLE, "1") != "0"


def write_results(path: str | Path, rows: Sequence[dict[str, Any]], **meta: Any) -> Path:
    """Write ``{"environment": ..., "kernel_autotune": ..., "kernel_tma": ..., **meta, "rows":
    rows}`` as JSON (atomically, so a run stopped between rows leaves the rows written so far)."""
    return write_json(path, {"environment": environment(), "kernel_autotune": autotune_enabled(),
                             "kernel_tma": os.environ.get(TMA_VARIABLE, "1") != "0",
                             **meta, "rows": list(rows)})


def device_slug(device: torch.device) -> str:
    """The device's name for result file names: "nvidia-h200", or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# ------------------------------------------------------------------------- timing, ceilings


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    """TFLOP/s of an n×n×n matmul on random data: the ceiling MFU is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = timed(lambda: a @ b, device, repeats)
    return 2 * n**3 / ms / 1e9


def copy_bandwidth_gb_per_s(device: torch.device, numel: int, repeats: int) -> float:
    """Device copy bandwidth: bytes read plus bytes written per second."""
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / ms / 1e6


class Deadline:
    """A time budget for a whole benchmark: a measurement starts only if its estimate fits."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s

    @staticmethod
    def skipped(flag: str = "--deadline_s") -> str:
        return f"not run: the {flag} budget did not leave time for it"


class Estimates:
    """Seconds a measurement of each kind is expected to take, for a :class:`Deadline`: an
    assumption until one of the kind has run, then the longest seen."""

    def __init__(self, assumed: dict[str, float] | None = None):
        self.assumed, self.seen = dict(assumed or {}), {}

    def __getitem__(self, kind: str) -> float:
        return self.seen.get(kind, self.assumed.get(kind, 0.0))

    def record(self, kind: str, seconds: float) -> None:
        self.seen[kind] = max(self.seen.get(kind, 0.0), seconds)


# --------------------------------------------------------------------------- offline corpus


@dataclass(frozen=True)
class DocsCorpus:
    train: Path
    eval: Path
    tokenizer: Path


def python_docs_corpus(work: str | Path, vocab_size: int = 2048) -> DocsCorpus:
    """The quick start's corpus (the documentation shipped with Python, split by ``preprocess``)
    and its SentencePiece tokenizer, built in ``work`` on first use and reused afterwards. It
    needs nothing but Python, so it exists on machines without network or shared storage."""
    from llama3.__main__ import main
    from llama3.data.python_docs import write_corpus

    work = Path(work)
    corpus = DocsCorpus(work / "pretrain_data" / "train", work / "pretrain_data" / "eval",
                        work / f"tokenizer_{vocab_size}.model")
    done = work / f"complete_{vocab_size}"
    if done.exists():
        return corpus
    write_corpus(work / "python_docs.jsonl")
    steps = [["preprocess", "--input", work / "python_docs.jsonl", "--output",
              work / "pretrain_data", "--no-progress"],
             ["train_tokenizer", "--train_corpus", corpus.train, "--model_file", corpus.tokenizer,
              "--vocab_size", vocab_size, "--no-progress"]]
    for argv in steps:
        if main([str(a) for a in argv]) != 0:
            raise RuntimeError(f"building the Python documentation corpus in {work}: "
                               f"{argv[0]} failed (see above)")
    done.write_text("")
    return corpus
