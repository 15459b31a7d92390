"""The model file (``model.pt``): its format and version, how records are written without leaving
half a file, and reading a model back for evaluate, deploy and generate."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llama3.checkpoint.failures import reason
from llama3.checkpoint.layout import resolve_model_file
from llama3.errors import UsageError
from llama3.fileio import file_sha256, staged_file
from llama3.model.args import ModelArgs
from llama3.model.transformer import Transformer

FORMAT = "llama3-model"
VERSION = 1


def tokenizer_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """What a checkpoint records of its tokenizer: absolute path and content hash."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


class _RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch reports it only as
    a mismatch of positions ("unexpected pos 704 vs 598")."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as err:
            if writer.error is not None:
                raise writer.error from err
            raise


def write_model_file(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    model_args: ModelArgs,
    *,
    tokenizer: dict[str, str] | None = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    """The consolidated model record that evaluate, deploy and generate load."""
    record = {
        "format": FORMAT,
        "version": VERSION,
        "model_args": model_args.to_dict(),
        "model": {k: v.detach().cpu() for k, v in state_dict.items()},
        "tokenizer": tokenizer,
        "step": step,
        **(extra or {}),
    }
    atomic_torch_save(record, path)


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The model record of a checkpoint (weights on CPU), checked for format and version."""
    return read_record(resolve_model_file(path), FORMAT, "model checkpoint")


def read_record(
    file: Path, expected_format: str, what: str, version: int = VERSION
) -> dict[str, Any]:
    """A torch-saved dict of the given format, at most ``version``, on CPU; UsageError if
    unreadable, foreign or newer."""
    try:
        record = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a torch file
        raise UsageError(f"cannot read {what} {file}: {reason(err)}") from err
    if not isinstance(record, dict) or record.get("format") != expected_format:
        raise UsageError(f"{file} is not a llama3 {what}")
    if record.get("version", 0) > version:
        raise UsageError(
            f"{file} has format version {record['version']}; this code reads up to "
            f"{version}: update the code"
        )
    return record


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """A model in eval mode, rebuilt from the checkpoint's args and weights."""
    return model_from_record(read_model_file(path), device, dtype)


def model_from_record(
    record: dict[str, Any], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """A model in eval mode from a record :func:`read_model_file` returned (no second read)."""
    model = Transformer.build(ModelArgs.from_dict(record["model_args"]), device=device, init=False)
    model.load_state_dict(record["model"])
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def check_model_flags(given: Mapping[str, Any], model_args: ModelArgs) -> None:
    """Refuse model flags given (``given``: values by ModelArgs field name) that differ from the
    checkpoint's ``model_args``, naming each."""
    diffs = [
        f"--{name} {value} (checkpoint: {getattr(model_args, name)})"
        for name, value in given.items()
        if value != getattr(model_args, name)
    ]
    if diffs:
        raise UsageError("model flags disagree with the checkpoint: " + "; ".join(diffs))


def read_checked_record(
    path: str | os.PathLike, model_flags: Mapping[str, Any]
) -> tuple[dict[str, Any], ModelArgs]:
    """The model record at ``path`` (``--from_checkpoint``) and its ModelArgs, with the model
    flags given (``model_flags``) checked against them."""
    record = read_model_file(path)
    model_args = ModelArgs.from_dict(record["model_args"])
    check_model_flags(model_flags, model_args)
    return record, model_args
