"""The run directory's lock: one process at a time writes a ``--to_checkpoint`` directory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from llama3.checkpoint.group import ProcessGroup, act_together
from llama3.errors import UsageError
from llama3.fileio import check_output_dir, locked

RUN_LOCK = ".lock"  # held by the process that writes the run directory


@contextlib.contextmanager
def run_directory_lock(root: str | os.PathLike, group: ProcessGroup) -> Iterator[None]:
    """Hold ``root`` (``--to_checkpoint``) for one writing run: the main process locks
    ``root/.lock`` until the block ends. A second run writing there is refused with one line; a lock
    left by a process that died holds nothing (the operating system released it). Collective."""
    root = Path(root)
    with contextlib.ExitStack() as holder:
        act_together(
            group,
            lambda: _take(root, holder),
            elsewhere=f"--to_checkpoint {root}: the first process could not take it (see "
            "its message)",
        )
        yield


def _take(root: Path, holder: contextlib.ExitStack) -> None:
    """Lock ``root/.lock`` until ``holder`` closes, with this process's id in it; UsageError if
    another process holds it or it cannot be made."""
    try:
        check_output_dir(root, "--to_checkpoint")
        lock = holder.enter_context(locked(root / RUN_LOCK, wait=False))
        if lock is not None:
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
    except BlockingIOError as err:
        pid = (root / RUN_LOCK).read_text().strip() or "unknown"
        raise UsageError(
            f"--to_checkpoint {root} is in use by another training process (pid "
            f"{pid}): wait for it to finish, or choose another directory"
        ) from err
    except OSError as err:
        raise UsageError(
            f"--to_checkpoint {root}: cannot lock it ({err.strerror or err}): "
            "choose a writable location"
        ) from err
