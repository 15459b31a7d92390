"""Shared pieces of the benchmarks (a package: ``python -m benchmarks.NAME`` from the repository
root): the original's configurations, how calls are timed, device ceilings measured in the same
run, time budgets, the offline corpus, and how results are written."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama3.fileio import write_json
from llama3.reporting import environment, format_table

__all__ = [
    "BASE",
    "CONFIGS",
    "REPO",
    "RESULTS_DIR",
    "TINY_BASE",
    "TINY_CONFIGS",
    "AUTOTUNE_VARIABLE",
    "TMA_VARIABLE",
    "Deadline",
    "DocsCorpus",
    "Estimates",
    "Timed",
    "Timer",
    "autotune_enabled",
    "child_env",
    "copy_bandwidth_gb_per_s",
    "device_slug",
    "environment",
    "format_table",
    "matmul_tflops",
    "module_command",
    "python_docs_corpus",
    "wall_clock",
    "write_results",
]

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
    it (as on a machine where it is only copied), OpenMP's passive wait policy unless this one
    sets another (as the scripts do: scripts/common.sh), and ``extra``."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": path, **extra}


def module_command(name: str, *args: object) -> list[str]:
    """``python -m benchmarks.NAME ARGS`` with this interpreter, for a child process started from
    the repository root or with :func:`child_env`."""
    return [sys.executable, "-m", f"benchmarks.{name}", *map(str, args)]


def small_train_command(
    data: "DocsCorpus", run: Path, *, tiny: bool, steps: int, save_steps: int, flags=()
) -> list[str]:
    """``python -m llama3 train`` on the CPU at the benchmarks' small softplus shape (BASE, or
    TINY_BASE with ``tiny``): the model, batch and data the threads and checkpoint-stall
    benchmarks train, ``flags`` after the rest."""
    base = TINY_BASE if tiny else BASE
    shape = {
        "n_layers": base["n_layers"],
        "dim": base["dim"],
        "core_dim": 16 if tiny else 128,
        "max_seq_len": 32 if tiny else 256,
        "batch_size": 4 if tiny else 16,
        **({"multiple_of": 16} if tiny else {}),
    }
    return [
        sys.executable,
        "-m",
        "llama3",
        "train",
        "--device",
        "cpu",
        "--train_corpus",
        str(data.train),
        "--tokenizer",
        str(data.tokenizer),
        *(item for name, value in shape.items() for item in (f"--{name}", str(value))),
        "--total_steps",
        str(steps),
        "--save_steps",
        str(save_steps),
        "--no-tensorboard",
        "--to_checkpoint",
        str(run),
        *flags,
    ]


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_VARIABLE, "1") != "0"


def write_results(
    path: str | Path, rows: Sequence[dict[str, Any]], *, timing: dict[str, Any], **meta: Any
) -> Path:
    """Write ``{"environment": ..., "kernel_autotune": ..., "kernel_tma": ..., "timing": timing,
    **meta, "rows": rows}`` as JSON (atomically, so a run stopped between rows leaves the rows
    written so far); ``timing`` says how the benchmark timed (:meth:`Timer.record`,
    :func:`wall_clock`)."""
    return write_json(
        path,
        {
            "environment": environment(),
            "kernel_autotune": autotune_enabled(),
            "kernel_tma": os.environ.get(TMA_VARIABLE, "1") != "0",
            "timing": timing,
            **meta,
            "rows": list(rows),
        },
    )


def device_slug(device: torch.device) -> str:
    """The device's name for result file names: "nvidia-h200", or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# ------------------------------------------------------------------------- timing, ceilings

QUANTILES = (0.5, 0.2, 0.8)  # the median, then the 20% and 80% quantiles
STATISTIC = "median, 20% and 80% quantiles"


@dataclass(frozen=True)
class Timed:
    """Milliseconds of one callable over its repetitions: the median and the 20% and 80%
    quantiles."""

    ms: float
    q20_ms: float
    q80_ms: float
    repetitions: int

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> Timed:
        median, low, high = torch.quantile(
            torch.tensor(times_ms, dtype=torch.float64),
            torch.tensor(QUANTILES, dtype=torch.float64),
        ).tolist()
        return cls(median, low, high, len(times_ms))

    def fields(self, prefix: str = "") -> dict[str, float | int]:
        """Row entries: ``PREFIXms`` (the median), ``PREFIXms_q20``, ``PREFIXms_q80``,
        ``PREFIXrepetitions``."""
        return {
            f"{prefix}ms": self.ms,
            f"{prefix}ms_q20": self.q20_ms,
            f"{prefix}ms_q80": self.q80_ms,
            f"{prefix}repetitions": self.repetitions,
        }


def wall_clock(spans: str, statistic: str, **details: Any) -> dict[str, Any]:
    """The ``timing`` entry of results read from the host's clock: what one reading spans, what
    is reported, and details such as warm-up and repetitions."""
    return {
        "method": "wall clock (time.perf_counter)",
        "spans": spans,
        "statistic": statistic,
        "l2_flush": False,
        **details,
    }


@dataclass(frozen=True)
class Timer:
    """Times a callable on ``device``. On CUDA through ``triton.testing.do_bench``: CUDA events
    around every repetition, the L2 cache flushed before each, as many repetitions as fit in
    ``rep_ms`` after ``warmup_ms`` of warm-up (small kernels do not read as faster than they are).
    On the CPU the wall clock over ``repeats`` calls after ``warmup`` untimed ones."""

    device: torch.device
    repeats: int = 5
    warmup: int = 2
    warmup_ms: float = 25.0
    rep_ms: float = 100.0

    def __call__(self, fn: Callable[[], Any]) -> Timed:
        if self.device.type == "cuda":
            from triton.testing import do_bench  # only the GPU path needs Triton

            return Timed.of(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all"))
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
        return Timed.of(times)

    def record(self) -> dict[str, Any]:
        """How this timer measures, for the results' ``timing`` entry."""
        if self.device.type != "cuda":
            return wall_clock("one call", STATISTIC, warmup=self.warmup, repetitions=self.repeats)
        return {
            "method": "triton.testing.do_bench",
            "spans": "one call, between CUDA events",
            "statistic": STATISTIC,
            "l2_flush": True,
            "warmup_ms": self.warmup_ms,
            "rep_ms": self.rep_ms,
            "repetitions": "as many as fit in rep_ms, at least 1 (rows record the count)",
        }


def matmul_tflops(timer: Timer, n: int, dtype: torch.dtype) -> float:
    """TFLOP/s of an n×n×n matmul on random data: the ceiling MFU is measured against."""
    a, b = (torch.randn(n, n, device=timer.device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timer(lambda: a @ b).ms / 1e9


def copy_bandwidth_gb_per_s(timer: Timer, numel: int) -> float:
    """Device copy bandwidth: bytes read plus bytes written per second."""
    src = torch.randn(numel, device=timer.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / timer(lambda: dst.copy_(src)).ms / 1e6


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
    corpus = DocsCorpus(
        work / "pretrain_data" / "train",
        work / "pretrain_data" / "eval",
        work / f"tokenizer_{vocab_size}.model",
    )
    done = work / f"complete_{vocab_size}"
    if done.exists():
        return corpus
    write_corpus(work / "python_docs.jsonl")
    steps = [
        [
            "preprocess",
            "--input",
            work / "python_docs.jsonl",
            "--output",
            work / "pretrain_data",
            "--no-progress",
        ],
        [
            "train_tokenizer",
            "--train_corpus",
            corpus.train,
            "--model_file",
            corpus.tokenizer,
            "--vocab_size",
            vocab_size,
            "--no-progress",
        ],
    ]
    for argv in steps:
        if main([str(a) for a in argv]) != 0:
            raise RuntimeError(
                f"building the Python documentation corpus in {work}: {argv[0]} failed (see above)"
            )
    done.write_text("")
    return corpus
