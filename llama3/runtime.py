"""Device selection, numeric precision and seeding: shared by every command that runs a model."""

from __future__ import annotations

import argparse
import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from llama3.errors import UsageError


def select_device(flag: str | None) -> torch.device:
    """``--device`` if given (checked), else CUDA when present, else CPU."""
    if flag is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError as err:
        raise UsageError(
            f"--device {flag!r} is not a device name (try cuda, cuda:0 or cpu)"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {flag}: CUDA is not available on this machine")
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise UsageError(
            f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s) present"
        )
    return device


@dataclass(frozen=True)
class Precision:
    """How to run: parameter dtype, optional autocast dtype, and whether a gradient scaler is
    needed."""

    param_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> "Precision":
        """The mode of the precision flag given; fp32 when none is."""
        return cls.named(precision_flag(args) or "fp32")

    @classmethod
    def named(cls, name: str) -> "Precision":
        """fp32, amp_bf16, amp_fp16 or bf16 (pure bfloat16 parameters)."""
        modes = {
            "fp32": cls(),
            "amp_bf16": cls(autocast_dtype=torch.bfloat16),
            "amp_fp16": cls(autocast_dtype=torch.float16),
            "bf16": cls(param_dtype=torch.bfloat16),
        }
        if name not in modes:
            raise UsageError(f"unknown precision {name!r} (one of {', '.join(modes)})")
        return modes[name]

    @property
    def needs_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16

    @property
    def name(self) -> str:
        if self.param_dtype == torch.bfloat16:
            return "bf16"
        return {None: "fp32", torch.bfloat16: "amp_bf16", torch.float16: "amp_fp16"}[
            self.autocast_dtype
        ]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def precision_flag(args: argparse.Namespace) -> str | None:
    """The precision mode named on the command line (--fp32, --amp_bf16, --amp_fp16, --bf16),
    None when no flag was given."""
    return next(
        (name for name in ("fp32", "amp_bf16", "amp_fp16", "bf16") if getattr(args, name, False)),
        None,
    )


def configure_matmul(allow_tf32: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on GPUs that have it."""
    torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
    torch.backends.cudnn.allow_tf32 = bool(allow_tf32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
