"""Failed saves and loads, told in one line: which exceptions count as a failure, why a write
failed (a full disk, however deep torch wrapped it) and which checkpoint is damaged."""

from __future__ import annotations

import os
from pathlib import Path

from llama3.checkpoint.layout import LATEST
from llama3.errors import UsageError


def failure_types() -> tuple[type[BaseException], ...]:
    """What a failed save or load raises: exceptions, and torch.distributed.checkpoint's, which
    derives from BaseException (Ctrl-C and exits are not failures)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


def save_error(err: BaseException, final: Path, root: str | os.PathLike) -> BaseException:
    """One line for a save that failed writing; other errors as they are."""
    reason = _write_failure(err) or (str(err) if isinstance(err, UsageError) else None)
    if reason is None:
        return err
    latest = Path(root) / LATEST
    kept = (
        f"the newest checkpoint is still {latest.read_text().strip()}"
        if latest.is_file()
        else "there is no earlier checkpoint"
    )
    return UsageError(
        f"cannot write checkpoint {final}: {reason} (free some disk space there, or "
        f"save elsewhere); nothing of it was kept, {kept}"
    )


def _write_failure(err: BaseException | None) -> str | None:
    """Why writing failed, when ``err`` is (or wraps) a failed write: the OSError's reason, or
    torch's report of a short write. None for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err.strerror or str(err)
        if isinstance(err, RuntimeError) and (
            "inline_container" in str(err) or "PytorchStreamWriter" in str(err)
        ):
            return "the file could not be written in full"
        for failure in _gathered(err):
            reason = _write_failure(failure)
            if reason:
                return reason
        err = err.__cause__ or err.__context__
    return None


def reason(err: object) -> str:
    """The first sentence of an error's message (torch's go on for lines), or its type."""
    text = str(err).strip().split("\n")[0].split(". ")[0]
    return (text[:160] + "…" if len(text) > 160 else text) or type(err).__name__


def damaged(path: Path, err: object) -> UsageError:
    return UsageError(
        f"cannot read {path}, the checkpoint is damaged ({reason(err)}): resume "
        f"from another step directory of {path.parent.parent}"
    )


def first_failure(err: BaseException) -> BaseException:
    """The first error that torch.distributed.checkpoint's ``err`` gathered, or ``err``."""
    return next(iter(_gathered(err)), err)


def _gathered(err: BaseException) -> list[BaseException]:
    """The errors of the processes that failed, which torch.distributed.checkpoint's exception
    gathers (as (exception, traceback) pairs); none for any other exception."""
    return [f[0] if isinstance(f, tuple) else f for f in getattr(err, "failures", {}).values()]
