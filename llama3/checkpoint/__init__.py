"""Checkpoints: the one package that writes and reads them, for every command.

A checkpoint is a directory (``--to_checkpoint DIR``)::

    DIR/latest                          name of the newest complete step directory
    DIR/step_00000200/model.pt          consolidated model: args, weights, tokenizer fingerprint,
                                        step
    DIR/step_00000200/trainer.pt        training record: step, number of processes, model args,
                                        tokenizer fingerprint, and the state of each piece the run
                                        shares (progress and metric history, gradient scaler, the
                                        settings a resumed run compares)
    DIR/step_00000200/state/            model and optimizer, one shard file per process
                                        (torch.distributed.checkpoint)
    DIR/step_00000200/rank_00000.pt     per process: the state of its own pieces (data position,
                                        random-number generators)

``model.pt`` alone is what evaluate, deploy and generate read; the rest is what training needs to
continue exactly. Training names its pieces in a :class:`TrainingState`; this package alone decides
where each is kept and in which order they come back. A step directory is written under a temporary
name and renamed once complete, and ``latest`` is replaced atomically, so a crash mid-save never
damages the last good checkpoint; a save that fails (a full disk) removes what it wrote and says so
in one line. ``DIR`` means the step ``latest`` names, never a guess: a missing, empty or dangling
``latest`` is refused with the step directory to pass instead. Anything that reads a model accepts
``DIR``, ``DIR/step_N`` or a model file (``DIR/step_N/model.pt``, or a copy under another name).

Here: saving and restoring, composed from one module per concern: :mod:`.layout` (the files of a
run directory), :mod:`.model_file` (the model record), :mod:`.state` (the training records),
:mod:`.sharded` (model and optimizer shards), :mod:`.rng` (random-number state), :mod:`.saving`
(a training step's records, written and published together), :mod:`.background` (the same while
training goes on), :mod:`.lock` (one writer per run directory), :mod:`.group` (the processes,
acting together) and :mod:`.failures` (errors in one line).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from llama3.checkpoint.background import BackgroundSaves, check_background_saves
from llama3.checkpoint.failures import failure_types, save_error
from llama3.checkpoint.group import ONE_PROCESS, GlooGroup, ProcessGroup, act_together
from llama3.checkpoint.layout import (
    LATEST,
    MODEL_FILE,
    STATE_DIR,
    TRAINER_FILE,
    check_new_checkpoint_dir,
    list_step_dirs,
    publish_step_dir,
    rank_file_name,
    resolve_model_file,
    resolve_step_dir,
    stage_step_dir,
    step_dir_name,
    step_of,
)
from llama3.checkpoint.lock import RUN_LOCK, run_directory_lock
from llama3.checkpoint.model_file import (
    FORMAT,
    VERSION,
    atomic_torch_save,
    check_model_flags,
    load_model,
    model_from_record,
    read_checked_record,
    read_model_file,
    tokenizer_fingerprint,
    write_model_file,
)
from llama3.checkpoint.rng import RandomState, capture_rng_state, restore_rng_state
from llama3.checkpoint.saving import save_training_checkpoint
from llama3.checkpoint.sharded import load_training_state
from llama3.checkpoint.state import (
    TRAINER_FORMAT,
    TRAINER_VERSION,
    Stateful,
    TrainingState,
    read_rank_record,
    read_trainer_record,
)
from llama3.errors import UsageError
from llama3.fileio import remove

__all__ = [
    "FORMAT",
    "LATEST",
    "MODEL_FILE",
    "RUN_LOCK",
    "STATE_DIR",
    "TRAINER_FILE",
    "TRAINER_FORMAT",
    "TRAINER_VERSION",
    "VERSION",
    "BackgroundSaves",
    "GlooGroup",
    "ProcessGroup",
    "RandomState",
    "Stateful",
    "TrainingState",
    "act_together",
    "atomic_torch_save",
    "capture_rng_state",
    "check_background_saves",
    "check_model_flags",
    "check_new_checkpoint_dir",
    "list_step_dirs",
    "load_model",
    "load_training_state",
    "model_from_record",
    "publish_step_dir",
    "rank_file_name",
    "read_checked_record",
    "read_model_file",
    "read_rank_record",
    "read_trainer_record",
    "resolve_model_file",
    "resolve_step_dir",
    "restore_rng_state",
    "restore_training_checkpoint",
    "run_directory_lock",
    "save_model_checkpoint",
    "save_training_checkpoint",
    "stage_step_dir",
    "step_dir_name",
    "step_of",
    "tokenizer_fingerprint",
    "write_model_file",
]


def save_model_checkpoint(
    root: str | os.PathLike,
    model: nn.Module,
    *,
    tokenizer: dict[str, str] | None = None,
    step: int = 0,
) -> Path:
    """A model-only checkpoint (no training state), published atomically in ``root``, which must
    hold none yet (:func:`check_new_checkpoint_dir`); the directory is held meanwhile, as a
    training run holds it (:func:`run_directory_lock`)."""
    with run_directory_lock(root, ONE_PROCESS):
        check_new_checkpoint_dir(root)
        staging = stage_step_dir(root, step)
        try:
            write_model_file(
                staging / MODEL_FILE, model.state_dict(), model.args, tokenizer=tokenizer, step=step
            )
            return publish_step_dir(root, staging, step)
        except BaseException as err:
            remove(staging)
            raise save_error(err, Path(root) / step_dir_name(step), root)


def restore_training_checkpoint(
    step_dir: Path, record: dict[str, Any], state: TrainingState, group: ProcessGroup
) -> None:
    """Continue from ``step_dir``, whose training record :func:`read_trainer_record` returned.

    In this order: refuse a different number of processes (the data order could not continue);
    this process's own pieces (the data position first: it names a changed flag before the large
    state is read); model and optimizer, resharded to the current processes; the shared pieces.
    Collective.
    """
    if record["world_size"] != group.world_size:
        raise UsageError(
            f"{step_dir} was written by {record['world_size']} process(es); continue "
            f"it with as many (not {group.world_size}) so the data order continues"
        )
    own = act_together(
        group,
        lambda: read_rank_record(step_dir, group.rank),
        everywhere=True,
        failures=failure_types(),
        elsewhere=f"{step_dir}: another process could not read its state",
    )
    for name, piece in state.per_process.items():
        piece.load_state_dict(own[name])
    load_training_state(step_dir, state.model, state.optimizer, group)
    for name, piece in state.shared.items():
        piece.load_state_dict(record[name])
