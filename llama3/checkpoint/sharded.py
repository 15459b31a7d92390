"""Model and optimizer state through torch.distributed.checkpoint (``state/``): one shard file per
process, resharded on load to however many processes continue the run; written at once, or in the
background (its ``async_save``)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

from llama3.checkpoint.failures import damaged, failure_types, first_failure
from llama3.checkpoint.group import ProcessGroup
from llama3.checkpoint.layout import STATE_DIR

SINGLE_PROCESS_WARNING = "torch.distributed is disabled"  # what a save without a group warns


def save_sharded_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, group: ProcessGroup
) -> None:
    """Write this process's shard of model and optimizer under ``path``. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet(group):
        dcp.save(
            {"model": model_state, "optimizer": optim_state},
            checkpoint_id=path,
            no_dist=not group.active,
        )


def start_sharded_save(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, group: ProcessGroup
) -> Future:
    """Start writing this process's shard under ``path`` in the background; returns when the
    state has been copied to memory of its own (async_save's staging, which copies CPU tensors
    too), so the next optimizer step may change the model at once. The future completes when
    every process has written its part (collective over ``group``, a group of its own that
    nothing else uses meanwhile: :class:`~llama3.checkpoint.group.GlooGroup`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    if not group.active:  # warned in the writing thread, after any catch_warnings block here
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
    with _single_process_quiet(group):
        started = dcp.async_save(
            {"model": model_state, "optimizer": optim_state},
            checkpoint_id=path,
            process_group=getattr(group, "handle", None),
            no_dist=not group.active,
        )
    # torch returns the upload's future, or (staging in the background) both futures
    return getattr(started, "upload_completion", started)


def load_training_state(
    step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, group: ProcessGroup
) -> None:
    """Restore model and optimizer from ``step_dir``, resharded to the current processes.
    Collective."""
    _load_sharded_state(step_dir / STATE_DIR, model, optimizer, group)


def _load_sharded_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, group: ProcessGroup
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / ".metadata").is_file():
        raise damaged(path, ".metadata is missing")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with _single_process_quiet(group):
        try:
            dcp.load(state, checkpoint_id=path, no_dist=not group.active)
        except failure_types() as err:  # a missing .metadata, a damaged .distcp file
            raise damaged(path, first_failure(err)) from err
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


@contextlib.contextmanager
def _single_process_quiet(group: ProcessGroup) -> Iterator[None]:
    """Without a process group, torch.distributed.checkpoint warns that it assumes a single
    process; here that is intended."""
    with warnings.catch_warnings():
        if not group.active:
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        yield
