"""Checkpoints: the one module that writes and reads them, for every command.

A checkpoint is a directory (``--to_checkpoint DIR``)::

    DIR/latest                    name of the newest complete step directory
    DIR/step_00000200/model.pt    consolidated model: args, weights, tokenizer fingerprint, step
    DIR/step_00000200/...         training state, when written by training

A step directory is written under a temporary name and renamed once complete, and ``latest`` is
replaced atomically, so a crash mid-save never damages the last good checkpoint. Anything that reads
a model accepts ``DIR``, ``DIR/step_N`` or ``DIR/step_N/model.pt``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama3.cli import UsageError
from llama3.model.args import ModelArgs
from llama3.model.transformer import Transformer

FORMAT = "llama3-model"
VERSION = 1
MODEL_FILE = "model.pt"
LATEST = "latest"
STAGING_SUFFIX = ".tmp"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """What a checkpoint records of its tokenizer: absolute path and content hash."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def check_tokenizer(record: dict[str, Any], tokenizer_path: str | os.PathLike) -> None:
    """Refuse a tokenizer whose content differs from the one the checkpoint was trained with."""
    expected = (record.get("tokenizer") or {}).get("sha256")
    if expected and file_sha256(tokenizer_path) != expected:
        raise UsageError(
            f"--tokenizer {tokenizer_path} is not the tokenizer this checkpoint was trained with "
            f"({record['tokenizer'].get('path')}); pass that one"
        )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + STAGING_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + STAGING_SUFFIX)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def stage_step_dir(root: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory to write step ``step`` into (see :func:`publish_step_dir`)."""
    staging = Path(root) / (step_dir_name(step) + STAGING_SUFFIX)
    if staging.exists():
        shutil.rmtree(staging)  # left over from an interrupted save
    staging.mkdir(parents=True)
    return staging


def publish_step_dir(root: str | os.PathLike, staging: Path, step: int,
                     keep_last: int | None = None) -> Path:
    """Rename a complete staging directory to its final name, point ``latest`` at it, prune old ones."""
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
    if keep_last:
        for old in list_step_dirs(root)[:-keep_last]:
            shutil.rmtree(old)
    return final


def list_step_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete step directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(STAGING_SUFFIX))


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """The step directory meant by ``DIR``, ``DIR/step_N`` or ``DIR/step_N/model.pt``."""
    path = Path(path)
    if path.is_file():
        return path.parent
    if (path / MODEL_FILE).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        step_dir = path / latest.read_text().strip()
        if (step_dir / MODEL_FILE).is_file():
            return step_dir
    steps = list_step_dirs(path)
    if steps:
        return steps[-1]
    raise UsageError(f"--from_checkpoint {path}: no checkpoint there (expected {LATEST}, a "
                     f"step_* directory or a {MODEL_FILE})")


def write_model_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                     model_args: ModelArgs, *, tokenizer: dict[str, str] | None = None,
                     step: int = 0, extra: dict[str, Any] | None = None) -> None:
    """The consolidated model record that evaluate, deploy and generate load."""
    record = {
        "format": FORMAT, "version": VERSION, "model_args": model_args.to_dict(),
        "model": {k: v.detach().cpu() for k, v in state_dict.items()},
        "tokenizer": tokenizer, "step": step, **(extra or {}),
    }
    atomic_torch_save(record, path)


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The model record of a checkpoint (weights on CPU), checked for format and version."""
    file = resolve_step_dir(path) / MODEL_FILE
    try:
        record = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a torch file
        raise UsageError(f"cannot read checkpoint {file}: {err}") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UsageError(f"{file} is not a llama3 model checkpoint")
    if record.get("version", 0) > VERSION:
        raise UsageError(f"{file} has format version {record['version']}; this code reads up to "
                         f"{VERSION}: update the code")
    return record


def save_model_checkpoint(root: str | os.PathLike, model: nn.Module, *,
                          tokenizer: dict[str, str] | None = None, step: int = 0,
                          keep_last: int | None = None) -> Path:
    """A model-only checkpoint (no training state), published atomically under ``root``."""
    staging = stage_step_dir(root, step)
    write_model_file(staging / MODEL_FILE, model.state_dict(), model.args, tokenizer=tokenizer,
                     step=step)
    return publish_step_dir(root, staging, step, keep_last)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """A model in eval mode, rebuilt from the checkpoint's args and weights."""
    record = read_model_file(path)
    model = Transformer.build(ModelArgs.from_dict(record["model_args"]), device=device, init=False)
    model.load_state_dict(record["model"])
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
