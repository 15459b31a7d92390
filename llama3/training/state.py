"""The mutable state of a run and the pieces of it that checkpoints keep.

:class:`Progress` is where the run stands; with the gradient scaler and the recorded settings it is
saved once per checkpoint, while each process saves its data position and random generators.
:func:`training_state` names these pieces, the one list :mod:`llama3.checkpoint` saves and restores.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from llama3.checkpoint import RandomState, Stateful, TrainingState
from llama3.runtime import Precision
from llama3.training.optim import LRSchedule


class Progress:
    """Steps done, tokens trained on (all processes), the metric records so far and the run's
    wall-clock time, earlier processes of a resumed run included."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.history: list[dict[str, Any]] = []  # shared with the metrics log, which appends
        self.saved_step: int | None = None  # the step of the newest checkpoint, if any
        self._elapsed_before = 0.0  # seconds of the processes that ran before this one
        self._started: float | None = None

    def start_clock(self) -> None:
        """This process starts training now (building it does not count)."""
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self._elapsed_before + running

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = self.saved_step = state["step"]
        self.tokens = state["tokens"]
        self._elapsed_before = state["elapsed_s"]
        self.history[:] = state["history"]


class RecordedSettings:
    """The flags a run was resolved with (:attr:`TrainingConfig.flags`), schedule and precision,
    saved so that a resumed run takes them unless given (see :func:`recorded_flags`)."""

    def __init__(self, schedule: LRSchedule, precision: Precision, flags: dict[str, Any]):
        self.schedule, self.precision, self.flags = schedule, precision, flags

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": dataclasses.asdict(self.schedule),
            "precision": self.precision.name,
            "flags": dict(self.flags),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the run was configured from these values before it was built."""


def recorded_flags(
    record: dict[str, Any] | None, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The flag values a training record holds (upgraded by :func:`upgrade_record`): all of them
    since they were recorded, else those the schedule, the precision and ``data`` (the first
    process's data position, which records the data order) give."""
    if record is None:
        return {}
    settings = record["settings"]
    if "flags" in settings:
        return dict(settings["flags"])
    schedule = settings["schedule"]
    flags = {
        "base_lr": schedule["base_lr"],
        "warmup_steps": schedule["warmup_steps"],
        "total_steps": schedule["total_steps"],
        "lr_schedule": schedule["kind"],
        "min_lr_ratio": schedule["min_ratio"],
        "precision": settings["precision"],
    }
    if data is not None:
        flags.update(seed=data["seed"], batch_size=data["batch_size"], data_mode=data["mode"])
    return flags


class GradScaler(torch.amp.GradScaler):
    """torch's gradient scaler for fp16; continuing a run saved without one, it starts afresh."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    progress: Progress,
    scaler: GradScaler,
    settings: RecordedSettings,
    data: Stateful,
    device: torch.device,
) -> TrainingState:
    """The pieces of a run that a checkpoint keeps, by name, in their restore order."""
    return TrainingState(
        model=model,
        optimizer=optimizer,
        shared={"progress": progress, "scaler": scaler, "settings": settings},
        per_process={"data": data, "rng": RandomState(device)},
    )


def upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
    """A training record in the layout of :func:`training_state`; version 1 (llama3 0.1.0) kept
    the entries of the shared pieces side by side."""
    if record["version"] >= 2:
        return record
    return {
        **record,
        "progress": {key: record[key] for key in ("step", "tokens", "elapsed_s", "history")},
        "scaler": record["scaler"] or {},
        "settings": {"schedule": record["schedule"], "precision": record["precision"]},
    }
