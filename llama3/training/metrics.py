"""What a run reports: per-step and eval records (JSON lines, TensorBoard), a progress bar,
throughput and model FLOPs utilisation, peak memory, and the end-of-run summary.

Files in the run directory (``--to_checkpoint``)::

    metrics.jsonl    one JSON object per line: {"kind": "train" | "eval", "step": ..., ...}
    summary.json     the end-of-run summary
    tensorboard/     event files, when the tensorboard package is installed
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llama3.fileio import atomic_write_bytes, write_error, write_json

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, by device-name fragment; the first
# fragment found in torch.cuda.get_device_name() wins. "bf16" also stands for fp16.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]


def peak_tflops(
    device: torch.device, precision: str, allow_tf32: bool, flag: float | None
) -> tuple[float | None, str]:
    """Peak TFLOP/s of one device for MFU, and where the number comes from."""
    if flag is not None:
        return flag, "--peak_tflops"
    if device.type != "cuda":
        return None, "unknown for this device (give --peak_tflops to report MFU)"
    name = torch.cuda.get_device_name(device)
    kind = "bf16" if precision != "fp32" else ("tf32" if allow_tf32 else "fp32")
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks[kind], f"{name} {kind} dense datasheet peak"
    return None, f"{name} is not in the peak table (give --peak_tflops to report MFU)"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the most memory tensors held at once. CPU: the process's maximum resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


def memory_measure(device: torch.device) -> str:
    return "CUDA max allocated" if device.type == "cuda" else "process max resident set"


class Throughput:
    """Tokens per second and MFU over the steps timed so far in this process."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # all devices together, FLOP/s
        self.seconds = 0.0
        self.steps = 0

    def add(self, seconds: float) -> tuple[float, float | None]:
        """Record one step; returns that step's (tokens/s, MFU)."""
        self.seconds += seconds
        self.steps += 1
        return self.rate(seconds, 1)

    def rate(self, seconds: float, steps: int) -> tuple[float, float | None]:
        tokens_per_s = self.tokens_per_step * steps / max(seconds, 1e-9)
        mfu = None if not self.peak_flops else tokens_per_s * self.flops_per_token / self.peak_flops
        return tokens_per_s, mfu

    def overall(self) -> tuple[float, float | None]:
        return self.rate(self.seconds, self.steps) if self.steps else (0.0, None)


class MetricsLog:
    """Records go to memory (the checkpointed history) on every process, and on the main process
    also to ``metrics.jsonl``, TensorBoard and a tqdm progress bar."""

    def __init__(
        self,
        run_dir: Path,
        *,
        main: bool,
        history: list[dict[str, Any]],
        start_step: int,
        total_steps: int,
        tensorboard: bool = True,
    ):
        self.run_dir, self.main, self.history = Path(run_dir), main, history
        self._file = self._tb = self._bar = None
        if not main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Records past the resumed step (written after the checkpoint) are dropped.
        lines = "".join(json.dumps(r) + "\n" for r in history)
        atomic_write_bytes(self.run_dir / METRICS_FILE, lines.encode())
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _tensorboard_writer(self.run_dir / TENSORBOARD_DIR, start_step, self.note)
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
        )

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.main:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            raise write_error(self.run_dir / METRICS_FILE, err) from err
        if self._tb is not None:
            for key, value in _scalars(record):
                if key not in ("kind", "step"):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def progress(self, record: dict[str, Any]) -> None:
        """Advance the bar by one step, showing loss, learning rate and throughput."""
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"tok/s {record['tokens_per_s']:,.0f}",
                refresh=False,
            )
            self._bar.update(1)

    def note(self, text: str) -> None:
        """A line of text on the main process, printed without breaking the bar."""
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _scalars(value: Any, key: str = "") -> list[tuple[str, float]]:
    """The numbers of a record by path: nested dicts and lists flattened (``layers/0/entropy``)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(key, value)]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [pair for k, v in items for pair in _scalars(v, f"{key}/{k}" if key else str(k))]


def _tensorboard_writer(path: Path, start_step: int, note: Callable[[str], None]) -> Any:
    """A SummaryWriter that drops events after ``start_step`` left by an earlier process."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        note(
            "tensorboard is not installed: no TensorBoard logs (pip install tensorboard); "
            f"metrics are still written to {METRICS_FILE}"
        )
        return None
    return SummaryWriter(log_dir=str(path), purge_step=start_step + 1 if start_step else None)


def last_value(history: Sequence[dict[str, Any]], kind: str, key: str = "loss") -> float | None:
    for record in reversed(history):
        if record.get("kind") == kind and key in record:
            return record[key]
    return None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    return write_json(Path(run_dir) / SUMMARY_FILE, summary)


def format_summary(summary: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(map(fmt, value)) or "none"
        if isinstance(value, bool) or value is None:
            return str(value)
        if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1e4):
            return f"{value:,.0f}"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    width = max(len(k) for k in summary)
    return "\n".join(f"  {k:<{width}}  {fmt(v)}" for k, v in summary.items())
