"""Training checkpoints written in the background (``--async_checkpoint``) while training goes on.

At a save, each process takes its state at that step: the model and optimizer shards through
torch.distributed.checkpoint's ``async_save``, which copies them into memory of its own before it
returns (on the CPU too), and copies of the other records. Training then continues while a thread
writes the step directory under its temporary name and, once every process has written its part,
publishes it (rename, ``latest``), exactly as a save in the foreground does: a process killed
mid-save leaves the previous checkpoint as the newest complete one. At most one save is in flight:
the next waits for it. The thread's collectives run on a gloo group of their own, so they never
interleave with training's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from llama3.checkpoint.failures import failure_types, save_error
from llama3.checkpoint.group import GlooGroup, ProcessGroup, act_together
from llama3.checkpoint.layout import STATE_DIR, stage_step_dir, step_dir_name
from llama3.checkpoint.saving import StepRecords, complete_save, staging_step_dir
from llama3.checkpoint.sharded import start_sharded_save
from llama3.checkpoint.state import TrainingState
from llama3.errors import UsageError
from llama3.fileio import remove
from llama3.model.args import ModelArgs

FLAG = "--async_checkpoint"


def check_background_saves(group: ProcessGroup) -> None:
    """Refuse ``--async_checkpoint`` where this torch cannot write in the background."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError(f"{FLAG} needs torch.distributed, which this torch lacks: drop the flag")
    import torch.distributed.checkpoint as dcp

    if not hasattr(dcp, "async_save"):
        raise UsageError(
            f"{FLAG} needs torch.distributed.checkpoint.async_save (torch {torch.__version__} "
            "has none): upgrade torch, or drop the flag"
        )
    if group.active and not dist.is_gloo_available():
        raise UsageError(
            f"{FLAG} needs the gloo backend for the background save's own process group (this "
            "torch has none): drop the flag"
        )


class BackgroundSaves:
    """The training checkpoints of one run, each written while training goes on."""

    def __init__(self, group: ProcessGroup):
        """``group``: the run's processes (collective: with several, every process creates the
        background save's own group)."""
        check_background_saves(group)
        self.group = group
        self.writers: ProcessGroup = GlooGroup() if group.active else group
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama3-checkpoint")
        self._pending: Future | None = None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def start(
        self,
        root: str | os.PathLike,
        step: int,
        state: TrainingState,
        *,
        model_state: dict[str, torch.Tensor],
        model_args: ModelArgs,
        tokenizer: dict[str, str] | None,
        keep_last: int | None = None,
    ) -> None:
        """Take step ``step``'s state and write it in the background (see the module). Waits for
        the save in flight first, raising its error. Collective."""
        self.wait()
        records = StepRecords.take(step, state, model_state, model_args, tokenizer, private=True)
        staging = staging_step_dir(root, step)
        try:
            act_together(
                self.group,
                lambda: stage_step_dir(root, step),
                failures=failure_types(),
                elsewhere="the first process could not create it",
            )
            upload = act_together(
                self.group,
                lambda: start_sharded_save(
                    staging / STATE_DIR, state.model, state.optimizer, self.writers
                ),
                everywhere=True,
                failures=failure_types(),
                elsewhere="another process could not take its state",
            )
        except failure_types() as err:
            if self.group.rank == 0:
                remove(staging)
            raise save_error(err, Path(root) / step_dir_name(step), root)

        def write() -> None:
            upload.result()
            records.write(staging, self.writers)

        self._pending = self._executor.submit(
            _in_background, root, step, self.writers, write, keep_last
        )

    def poll(self) -> Path | None:
        """At a step boundary: the directory of the save in flight once every process has
        completed it (raising its error if it failed), else None. Collective while a save is in
        flight, so that every process learns the outcome at the same step."""
        if self._pending is None:
            return None
        if self.group.any_failed(not self._pending.done()):  # some process is still writing
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is complete; its published directory. Raises
        the error it failed with."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def close(self) -> None:
        """Let the save in flight finish (its outcome is not raised here), then stop the
        thread."""
        self._pending = None
        self._executor.shutdown(wait=True)


def _in_background(
    root: str | os.PathLike,
    step: int,
    group: ProcessGroup,
    write: Callable[[], None],
    keep_last: int | None,
) -> Path:
    """The thread's part of a save: write, agree, publish (:func:`complete_save`)."""
    try:
        return complete_save(root, step, group, [(write, True)], keep_last)
    except BaseException as err:
        if hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(f"(while writing checkpoint {step_dir_name(step)} in the background)")
        raise
