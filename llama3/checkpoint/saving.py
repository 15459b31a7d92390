"""Saving a training step: the records a checkpoint holds besides the sharded state, taken at the
step, and the collective order in which a step directory is written and published."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama3.checkpoint.failures import failure_types, save_error
from llama3.checkpoint.group import ProcessGroup, act_together
from llama3.checkpoint.layout import (
    MODEL_FILE,
    STATE_DIR,
    TRAINER_FILE,
    publish_step_dir,
    rank_file_name,
    stage_step_dir,
    step_dir_name,
)
from llama3.checkpoint.model_file import atomic_torch_save, write_model_file
from llama3.checkpoint.sharded import save_sharded_state
from llama3.checkpoint.state import TrainingState, trainer_record
from llama3.fileio import STAGING_SUFFIX, remove
from llama3.model.args import ModelArgs

Action = tuple[Callable[[], Any], bool]  # what to do, and whether every process does it


def staging_step_dir(root: str | os.PathLike, step: int) -> Path:
    """Where step ``step`` is written until it is published."""
    return Path(root) / (step_dir_name(step) + STAGING_SUFFIX)


@dataclass(frozen=True)
class StepRecords:
    """What a step directory holds besides the sharded model and optimizer: this process's
    pieces, the shared ones and the consolidated model (the main process's)."""

    step: int
    own: dict[str, Any]
    shared: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    model_args: ModelArgs
    tokenizer: dict[str, str] | None

    @classmethod
    def take(
        cls,
        step: int,
        state: TrainingState,
        model_state: dict[str, torch.Tensor],
        model_args: ModelArgs,
        tokenizer: dict[str, str] | None,
        *,
        private: bool = False,
    ) -> StepRecords:
        """Every piece's state now. ``private``: copies that training cannot change while they are
        written in the background (the metric history grows, the weights step)."""
        own = {name: piece.state_dict() for name, piece in state.per_process.items()}
        shared = {name: piece.state_dict() for name, piece in state.shared.items()}
        if private:
            own, shared = copy.deepcopy(own), copy.deepcopy(shared)
            model_state = unshared(model_state, state.model)
        return cls(step, own, shared, model_state, model_args, tokenizer)

    def write(self, staging: Path, group: ProcessGroup) -> None:
        """This process's record, and on the main process the model file and the training
        record."""
        atomic_torch_save(self.own, staging / rank_file_name(group.rank))
        if group.rank == 0:
            write_model_file(
                staging / MODEL_FILE,
                self.model_state,
                self.model_args,
                tokenizer=self.tokenizer,
                step=self.step,
            )
            atomic_torch_save(
                trainer_record(
                    self.step, group.world_size, self.model_args, self.tokenizer, self.shared
                ),
                staging / TRAINER_FILE,
            )


def unshared(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``tensors`` with a copy of each that shares memory with the model's parameters or buffers
    (a CPU model's own state dict does; weights gathered from shards do not)."""
    live = {
        _local(t).untyped_storage().data_ptr()
        for t in (*model.parameters(), *model.buffers())
        if _local(t).device.type == "cpu"
    }
    return {
        name: t.clone() if t.untyped_storage().data_ptr() in live else t
        for name, t in tensors.items()
    }


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def save_training_checkpoint(
    root: str | os.PathLike,
    step: int,
    state: TrainingState,
    *,
    model_state: dict[str, torch.Tensor],
    model_args: ModelArgs,
    tokenizer: dict[str, str] | None,
    group: ProcessGroup,
    keep_last: int | None = None,
) -> Path:
    """Write step ``step`` under ``root`` from every process; returns the published directory.

    Collective: every process calls it. ``model_state`` is the gathered full state dict (only the
    main process's copy is written). Every piece's state is taken first, before any file is
    written. Nothing is visible under the final name until every process has finished writing, so
    an interrupted save leaves the previous checkpoint as ``latest``; a failed one (a full disk)
    is removed and raised on every process as one :class:`UsageError` line. (Written in the
    background instead: :class:`~llama3.checkpoint.background.BackgroundSaves`.)
    """
    records = StepRecords.take(step, state, model_state, model_args, tokenizer)
    staging = staging_step_dir(root, step)

    def write() -> None:
        save_sharded_state(staging / STATE_DIR, state.model, state.optimizer, group)
        records.write(staging, group)

    actions = [(lambda: stage_step_dir(root, step), False), (write, True)]
    return complete_save(root, step, group, actions, keep_last)


def complete_save(
    root: str | os.PathLike,
    step: int,
    group: ProcessGroup,
    actions: Sequence[Action],
    keep_last: int | None = None,
) -> Path:
    """Run ``actions`` (each on the main process, or on every one) together, then publish step
    ``step`` (rename, ``latest``, prune to ``keep_last``). Collective over ``group``. If any
    process fails, the staging directory is removed and every process raises the same one-line
    error (:func:`~llama3.checkpoint.failures.save_error`)."""
    staging, final = staging_step_dir(root, step), Path(root) / step_dir_name(step)
    steps = [*actions, (lambda: publish_step_dir(root, staging, step, keep_last), False)]
    try:
        for action, everywhere in steps:
            act_together(
                group,
                action,
                everywhere=everywhere,
                failures=failure_types(),
                elsewhere="another process could not write its part",
            )
    except failure_types() as err:
        if group.rank == 0:
            remove(staging)
        raise save_error(err, final, root)
    if group.rank == 0:
        for stale in Path(root).glob("step_*" + STAGING_SUFFIX):  # left by interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
    group.barrier()
    return final
