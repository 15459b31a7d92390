"""The run directory: the name of every file in it, and how a step directory is staged, published,
pruned and found from what a user passes (``DIR``, ``DIR/step_N`` or a model file)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llama3.errors import UsageError
from llama3.fileio import STAGING_SUFFIX, atomic_write_bytes, fsync_dir

MODEL_FILE = "model.pt"
TRAINER_FILE = "trainer.pt"
STATE_DIR = "state"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def stage_step_dir(root: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory to write step ``step`` into (see :func:`publish_step_dir`)."""
    staging = Path(root) / (step_dir_name(step) + STAGING_SUFFIX)
    if staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted save
    staging.mkdir(parents=True)
    return staging


def publish_step_dir(
    root: str | os.PathLike, staging: Path, step: int, keep_last: int | None = None
) -> Path:
    """Rename a complete staging directory to its final name, point ``latest`` at it, prune old
    ones."""
    root = Path(root)
    final = root / step_dir_name(step)
    for path in staging.rglob("*"):  # make every file durable before the rename commits them
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_dir(root)
    atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
    if keep_last:  # the newest others, and never the one just published
        others = [p for p in list_step_dirs(root) if p != final]
        for old in others[: max(len(others) - keep_last + 1, 0)]:
            shutil.rmtree(old)
    return final


def step_of(step_dir: Path) -> int:
    """The step number of a ``step_NNNNNNNN`` directory."""
    return int(step_dir.name.removeprefix("step_"))


def list_step_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete step directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(STAGING_SUFFIX)
    )


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """The step directory meant by ``DIR`` (the step its ``latest`` names), ``DIR/step_N`` or
    ``DIR/step_N/model.pt``."""
    path = Path(path)
    if path.is_file():
        if path.name != MODEL_FILE:
            raise UsageError(f"--from_checkpoint {path} is a file: give a run or step directory")
        return path.parent
    if (path / MODEL_FILE).is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"--from_checkpoint {path}: no such file or directory")
    steps = list_step_dirs(path)
    latest = path / LATEST
    name = latest.read_text().strip() if latest.is_file() else None
    if name and (path / name / MODEL_FILE).is_file():
        return path / name
    if not steps:
        raise UsageError(
            f"--from_checkpoint {path}: no checkpoint there (expected {LATEST}, a "
            f"step_* directory or a {MODEL_FILE})"
        )
    problem = (
        f"{latest} is missing"
        if name is None
        else f"{latest} is empty"
        if not name
        else f"{latest} names {name}, which is not a complete checkpoint"
    )
    raise UsageError(
        f"--from_checkpoint {path}: {problem}; pass the step directory to use "
        f"instead (the newest is {steps[-1]})"
    )


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The model record meant by ``DIR``, ``DIR/step_N`` or a file (read as it is)."""
    path = Path(path)
    return path if path.is_file() else resolve_step_dir(path) / MODEL_FILE


def check_new_checkpoint_dir(root: str | os.PathLike) -> Path:
    """``--to_checkpoint`` for a model-only checkpoint: a directory that holds none yet (its
    ``latest`` would name the new one, and every command would load it instead of the run's)."""
    root = Path(root)
    held = list_step_dirs(root)
    if held or (root / LATEST).exists():
        found = held[-1].name if held else LATEST
        raise UsageError(
            f"--to_checkpoint {root} already holds a checkpoint ({found}); writing "
            f"there would repoint its {LATEST}: choose a new directory"
        )
    return root
