"""Training state: the pieces a training checkpoint holds (:class:`TrainingState`) and the records
that keep them, the run's shared ``trainer.pt`` and each process's ``rank_NNNNN.pt``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from llama3.checkpoint.failures import damaged
from llama3.checkpoint.layout import MODEL_FILE, TRAINER_FILE, rank_file_name, resolve_step_dir
from llama3.checkpoint.model_file import read_record
from llama3.errors import UsageError
from llama3.model.args import ModelArgs

TRAINER_FORMAT = "llama3-trainer"
TRAINER_VERSION = 2  # 2: each shared piece under its name (1: their entries side by side)
_HEADER = ("format", "version", "step", "world_size", "model_args", "tokenizer")


class Stateful(Protocol):
    """A piece of training state: what it saves, and how it continues from that."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class TrainingState:
    """Everything a training checkpoint saves and restores.

    The model and optimizer are sharded over the processes (``state/``); ``shared`` pieces are
    equal on every process and saved once (``trainer.pt``); ``per_process`` pieces are each
    process's own (``rank_NNNNN.pt``). Each dict is restored in its order. Adding a piece of
    training state is one entry here.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    shared: Mapping[str, Stateful]
    per_process: Mapping[str, Stateful]

    def __post_init__(self) -> None:
        clash = sorted(set(self.shared) & set(_HEADER))
        if clash:
            raise ValueError(f"shared training state may not be named {', '.join(clash)}")


def trainer_record(
    step: int,
    world_size: int,
    model_args: ModelArgs,
    tokenizer: dict[str, str] | None,
    shared: dict[str, Any],
) -> dict[str, Any]:
    """The training record of step ``step``: its header, then each shared piece under its name."""
    return {
        "format": TRAINER_FORMAT,
        "version": TRAINER_VERSION,
        "step": step,
        "world_size": world_size,
        "model_args": model_args.to_dict(),
        "tokenizer": tokenizer,
        **shared,
    }


def read_trainer_record(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """The step directory meant by ``path`` and its training record (None for a model-only
    checkpoint, such as one written by import_meta, and for a model file under another name,
    which is returned as it is)."""
    path = Path(path)
    if path.is_file() and path.name != MODEL_FILE:
        return path, None
    step_dir = resolve_step_dir(path)
    file = step_dir / TRAINER_FILE
    if not file.is_file():
        return step_dir, None
    return step_dir, read_record(file, TRAINER_FORMAT, "training record", TRAINER_VERSION)


def read_rank_record(step_dir: Path, rank: int) -> dict[str, Any]:
    """The record of process ``rank`` in ``step_dir``: data position and random-number
    generators."""
    rank_file = step_dir / rank_file_name(rank)
    if not rank_file.is_file():
        raise UsageError(
            f"{step_dir} has no state for process {rank} ({rank_file.name}): "
            "resume with the number of processes that wrote it"
        )
    try:
        record = torch.load(rank_file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, damaged, not a torch file
        raise damaged(rank_file, err) from err
    if not isinstance(record, dict):
        raise damaged(rank_file, "not a dict")
    return record
