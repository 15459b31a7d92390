"""Checkpoints: the one module that writes and reads them, for every command.

A checkpoint is a directory (``--to_checkpoint DIR``)::

    DIR/latest                          name of the newest complete step directory
    DIR/step_00000200/model.pt          consolidated model: args, weights, tokenizer fingerprint, step
    DIR/step_00000200/trainer.pt        training record: step, number of processes, model args,
                                        tokenizer fingerprint, and the state of each piece the run
                                        shares (progress and metric history, gradient scaler, the
                                        settings a resumed run compares)
    DIR/step_00000200/state/            model and optimizer, one shard file per process
                                        (torch.distributed.checkpoint)
    DIR/step_00000200/rank_00000.pt     per process: the state of its own pieces (data position,
                                        random-number generators)

``model.pt`` alone is what evaluate, deploy and generate read; the rest is what training needs to
continue exactly. Training names its pieces in a :class:`TrainingState`; this module alone decides
where each is kept and in which order they come back. A step directory is written under a temporary
name and renamed once complete, and ``latest`` is replaced atomically, so a crash mid-save never
damages the last good checkpoint; a save that fails (a full disk) removes what it wrote and says so
in one line. ``DIR`` means the step ``latest`` names, never a guess: a missing, empty or dangling
``latest`` is refused with the step directory to pass instead. Anything that reads a model accepts
``DIR``, ``DIR/step_N`` or a model file (``DIR/step_N/model.pt``, or a copy under another name).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from llama3.errors import UsageError
from llama3.fileio import (STAGING_SUFFIX, atomic_write_bytes, check_output_dir, file_sha256,
                           fsync_dir, locked, remove, staged_file)
from llama3.model.args import ModelArgs
from llama3.model.transformer import Transformer

FORMAT = "llama3-model"
VERSION = 1
MODEL_FILE = "model.pt"
LATEST = "latest"
RUN_LOCK = ".lock"  # held by the process that writes the run directory


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
    if keep_last:  # the newest others, and never the one just published
        others = [p for p in list_step_dirs(root) if p != final]
        for old in others[:max(len(others) - keep_last + 1, 0)]:
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
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(STAGING_SUFFIX))


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
        raise UsageError(f"--from_checkpoint {path}: no checkpoint there (expected {LATEST}, a "
                         f"step_* directory or a {MODEL_FILE})")
    problem = (f"{latest} is missing" if name is None else f"{latest} is empty" if not name
               else f"{latest} names {name}, which is not a complete checkpoint")
    raise UsageError(f"--from_checkpoint {path}: {problem}; pass the step directory to use "
                     f"instead (the newest is {steps[-1]})")


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The model record meant by ``DIR``, ``DIR/step_N`` or a file (read as it is)."""
    path = Path(path)
    return path if path.is_file() else resolve_step_dir(path) / MODEL_FILE


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
    return _read_record(resolve_model_file(path), FORMAT, "model checkpoint")


def _read_record(file: Path, expected_format: str, what: str,
                 version: int = VERSION) -> dict[str, Any]:
    """A torch-saved dict of the given format, at most ``version``, on CPU; UsageError if
    unreadable, foreign or newer."""
    try:
        record = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a torch file
        raise UsageError(f"cannot read {what} {file}: {_reason(err)}") from err
    if not isinstance(record, dict) or record.get("format") != expected_format:
        raise UsageError(f"{file} is not a llama3 {what}")
    if record.get("version", 0) > version:
        raise UsageError(f"{file} has format version {record['version']}; this code reads up to "
                         f"{version}: update the code")
    return record


def check_new_checkpoint_dir(root: str | os.PathLike) -> Path:
    """``--to_checkpoint`` for a model-only checkpoint: a directory that holds none yet (its
    ``latest`` would name the new one, and every command would load it instead of the run's)."""
    root = Path(root)
    held = list_step_dirs(root)
    if held or (root / LATEST).exists():
        found = held[-1].name if held else LATEST
        raise UsageError(f"--to_checkpoint {root} already holds a checkpoint ({found}); writing "
                         f"there would repoint its {LATEST}: choose a new directory")
    return root


def save_model_checkpoint(root: str | os.PathLike, model: nn.Module, *,
                          tokenizer: dict[str, str] | None = None, step: int = 0) -> Path:
    """A model-only checkpoint (no training state), published atomically in ``root``, which must
    hold none yet (:func:`check_new_checkpoint_dir`); the directory is held meanwhile, as a
    training run holds it (:func:`run_directory_lock`)."""
    with run_directory_lock(root, _ONE_PROCESS):
        check_new_checkpoint_dir(root)
        staging = stage_step_dir(root, step)
        try:
            write_model_file(staging / MODEL_FILE, model.state_dict(), model.args,
                             tokenizer=tokenizer, step=step)
            return publish_step_dir(root, staging, step)
        except BaseException as err:
            remove(staging)
            error = _save_error(err, Path(root) / step_dir_name(step), root)
            if error is err:
                raise
            raise error from err


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """A model in eval mode, rebuilt from the checkpoint's args and weights."""
    return model_from_record(read_model_file(path), device, dtype)


def model_from_record(record: dict[str, Any], device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> Transformer:
    """A model in eval mode from a record :func:`read_model_file` returned (no second read)."""
    model = Transformer.build(ModelArgs.from_dict(record["model_args"]), device=device, init=False)
    model.load_state_dict(record["model"])
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def check_model_flags(given: Mapping[str, Any], model_args: ModelArgs) -> None:
    """Refuse model flags given (``given``: values by ModelArgs field name) that differ from the
    checkpoint's ``model_args``, naming each."""
    diffs = [f"--{name} {value} (checkpoint: {getattr(model_args, name)})"
             for name, value in given.items() if value != getattr(model_args, name)]
    if diffs:
        raise UsageError("model flags disagree with the checkpoint: " + "; ".join(diffs))


def read_checked_record(path: str | os.PathLike,
                        model_flags: Mapping[str, Any]) -> tuple[dict[str, Any], ModelArgs]:
    """The model record at ``path`` (``--from_checkpoint``) and its ModelArgs, with the model
    flags given (``model_flags``) checked against them."""
    record = read_model_file(path)
    model_args = ModelArgs.from_dict(record["model_args"])
    check_model_flags(model_flags, model_args)
    return record, model_args


# ---- Training state: written by train/multitrain, read back to continue a run exactly ----------

TRAINER_FILE = "trainer.pt"
TRAINER_FORMAT = "llama3-trainer"
TRAINER_VERSION = 2  # 2: each shared piece under its name (1: their entries side by side)
STATE_DIR = "state"
_HEADER = ("format", "version", "step", "world_size", "model_args", "tokenizer")


class ProcessGroup(Protocol):
    """What saving and loading need to know of the processes (one, or many under torchrun)."""

    rank: int
    world_size: int

    @property
    def active(self) -> bool: ...

    def barrier(self) -> None: ...

    def any_failed(self, failed: bool) -> bool: ...


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


class _OneProcess:
    """The process group of a command that runs alone."""

    rank, world_size, active = 0, 1, False

    def barrier(self) -> None:
        pass

    def any_failed(self, failed: bool) -> bool:
        return failed


_ONE_PROCESS = _OneProcess()


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


@contextlib.contextmanager
def run_directory_lock(root: str | os.PathLike, group: ProcessGroup) -> Iterator[None]:
    """Hold ``root`` (``--to_checkpoint``) for one writing run: the main process locks
    ``root/.lock`` until the block ends. A second run writing there is refused with one line; a lock
    left by a process that died holds nothing (the operating system released it). Collective."""
    root = Path(root)
    holder = contextlib.ExitStack()
    error = None
    if group.rank == 0:
        try:
            check_output_dir(root, "--to_checkpoint")
            lock = holder.enter_context(locked(root / RUN_LOCK, wait=False))
            if lock is not None:
                lock.truncate(0)
                lock.write(f"{os.getpid()}\n")
                lock.flush()
        except BlockingIOError:
            pid = (root / RUN_LOCK).read_text().strip() or "unknown"
            error = UsageError(f"--to_checkpoint {root} is in use by another training process (pid "
                               f"{pid}): wait for it to finish, or choose another directory")
        except UsageError as err:
            error = err
        except OSError as err:
            error = UsageError(f"--to_checkpoint {root}: cannot lock it ({err.strerror or err}): "
                               "choose a writable location")
    if group.any_failed(error is not None):
        holder.close()
        raise error or UsageError(f"--to_checkpoint {root}: the first process could not take it "
                                  "(see its message)")
    with holder:
        yield


def save_training_checkpoint(root: str | os.PathLike, step: int, state: TrainingState, *,
                             model_state: dict[str, torch.Tensor], model_args: ModelArgs,
                             tokenizer: dict[str, str] | None, group: ProcessGroup,
                             keep_last: int | None = None) -> Path:
    """Write step ``step`` under ``root`` from every process; returns the published directory.

    Collective: every process calls it. ``model_state`` is the gathered full state dict (only the
    main process's copy is written). Every piece's state is taken first, before any file is
    written. Nothing is visible under the final name until every process has finished writing, so
    an interrupted save leaves the previous checkpoint as ``latest``; a failed one (a full disk)
    is removed and raised on every process as one :class:`UsageError` line.
    """
    own = {name: piece.state_dict() for name, piece in state.per_process.items()}
    shared = {name: piece.state_dict() for name, piece in state.shared.items()}
    staging = Path(root) / (step_dir_name(step) + STAGING_SUFFIX)
    final = Path(root) / step_dir_name(step)

    def write() -> None:
        _save_sharded_state(staging / STATE_DIR, state.model, state.optimizer, group)
        atomic_torch_save(own, staging / rank_file_name(group.rank))
        if group.rank == 0:
            write_model_file(staging / MODEL_FILE, model_state, model_args, tokenizer=tokenizer,
                             step=step)
            record = {"format": TRAINER_FORMAT, "version": TRAINER_VERSION, "step": step,
                      "world_size": group.world_size, "model_args": model_args.to_dict(),
                      "tokenizer": tokenizer, **shared}
            atomic_torch_save(record, staging / TRAINER_FILE)

    steps = [lambda: stage_step_dir(root, step) if group.rank == 0 else None, write,
             lambda: publish_step_dir(root, staging, step, keep_last) if group.rank == 0 else None]
    for action in steps:  # every process learns of a failure before any raises it
        error = _attempt(action)
        if group.any_failed(error is not None):
            if group.rank == 0:
                remove(staging)
            raise _save_error(error or UsageError("another process could not write its part"),
                              final, root)
    if group.rank == 0:
        for stale in Path(root).glob("step_*" + STAGING_SUFFIX):  # left by interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
    group.barrier()
    return final


def restore_training_checkpoint(step_dir: Path, record: dict[str, Any], state: TrainingState,
                                group: ProcessGroup) -> None:
    """Continue from ``step_dir``, whose training record :func:`read_trainer_record` returned.

    In this order: refuse a different number of processes (the data order could not continue);
    this process's own pieces (the data position first: it names a changed flag before the large
    state is read); model and optimizer, resharded to the current processes; the shared pieces.
    Collective.
    """
    if record["world_size"] != group.world_size:
        raise UsageError(f"{step_dir} was written by {record['world_size']} process(es); continue "
                         f"it with as many (not {group.world_size}) so the data order continues")
    own: dict[str, Any] = {}
    error = _attempt(lambda: own.update(read_rank_record(step_dir, group.rank)))
    if group.any_failed(error is not None):
        raise error or UsageError(f"{step_dir}: another process could not read its state")
    for name, piece in state.per_process.items():
        piece.load_state_dict(own[name])
    load_training_state(step_dir, state.model, state.optimizer, group)
    for name, piece in state.shared.items():
        piece.load_state_dict(record[name])


def _failures() -> tuple[type[BaseException], ...]:
    """What a failed save or load raises: exceptions, and torch.distributed.checkpoint's, which
    derives from BaseException (Ctrl-C and exits are not failures)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


def _attempt(action: Any) -> BaseException | None:
    """Run ``action``; the failure it raised, if any."""
    try:
        action()
    except _failures() as err:  # every process must learn of it before raising
        return err
    return None


def _write_failure(err: BaseException | None) -> str | None:
    """Why writing failed, when ``err`` is (or wraps) a failed write: the OSError's reason, or
    torch's report of a short write. None for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err.strerror or str(err)
        if isinstance(err, RuntimeError) and ("inline_container" in str(err)
                                              or "PytorchStreamWriter" in str(err)):
            return "the file could not be written in full"
        for failure in _gathered(err):
            reason = _write_failure(failure)
            if reason:
                return reason
        err = err.__cause__ or err.__context__
    return None


def _save_error(err: BaseException, final: Path, root: str | os.PathLike) -> BaseException:
    """One line for a save that failed writing; other errors as they are."""
    reason = _write_failure(err) or (str(err) if isinstance(err, UsageError) else None)
    if reason is None:
        return err
    latest = Path(root) / LATEST
    kept = (f"the newest checkpoint is still {latest.read_text().strip()}" if latest.is_file()
            else "there is no earlier checkpoint")
    return UsageError(f"cannot write checkpoint {final}: {reason} (free some disk space there, or "
                      f"save elsewhere); nothing of it was kept, {kept}")


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
    return step_dir, _read_record(file, TRAINER_FORMAT, "training record", TRAINER_VERSION)


def read_rank_record(step_dir: Path, rank: int) -> dict[str, Any]:
    """The record of process ``rank`` in ``step_dir``: data position and random-number
    generators."""
    rank_file = step_dir / rank_file_name(rank)
    if not rank_file.is_file():
        raise UsageError(f"{step_dir} has no state for process {rank} ({rank_file.name}): "
                         "resume with the number of processes that wrote it")
    try:
        record = torch.load(rank_file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, damaged, not a torch file
        raise _damaged(rank_file, err) from err
    if not isinstance(record, dict):
        raise _damaged(rank_file, "not a dict")
    return record


def _reason(err: object) -> str:
    """The first sentence of an error's message (torch's go on for lines), or its type."""
    text = str(err).strip().split("\n")[0].split(". ")[0]
    return (text[:160] + "…" if len(text) > 160 else text) or type(err).__name__


def _damaged(path: Path, err: object) -> UsageError:
    return UsageError(f"cannot read {path}, the checkpoint is damaged ({_reason(err)}): resume "
                      f"from another step directory of {path.parent.parent}")


def load_training_state(step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        group: ProcessGroup) -> None:
    """Restore model and optimizer from ``step_dir``, resharded to the current processes.
    Collective."""
    _load_sharded_state(step_dir / STATE_DIR, model, optimizer, group)


def _save_sharded_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        group: ProcessGroup) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet(group):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path,
                 no_dist=not group.active)


def _load_sharded_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        group: ProcessGroup) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / ".metadata").is_file():
        raise _damaged(path, ".metadata is missing")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with _single_process_quiet(group):
        try:
            dcp.load(state, checkpoint_id=path, no_dist=not group.active)
        except _failures() as err:  # a missing .metadata, a damaged .distcp file
            raise _damaged(path, _first_failure(err)) from err
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def _gathered(err: BaseException) -> list[BaseException]:
    """The errors of the processes that failed, which torch.distributed.checkpoint's exception
    gathers (as (exception, traceback) pairs); none for any other exception."""
    return [f[0] if isinstance(f, tuple) else f for f in getattr(err, "failures", {}).values()]


def _first_failure(err: BaseException) -> BaseException:
    return next(iter(_gathered(err)), err)


@contextlib.contextmanager
def _single_process_quiet(group: ProcessGroup) -> Iterator[None]:
    """Without a process group, torch.distributed.checkpoint warns that it assumes a single
    process; here that is intended."""
    with warnings.catch_warnings():
        if not group.active:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class RandomState:
    """The random-number generators of this process, as a piece of training state."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state, self.device)


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every random-number generator a training step may draw from (dropout, data, Python)."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
