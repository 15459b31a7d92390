"""The processes that save and load together (one, or many under torchrun), and the one way they
act on shared files: one acts, all learn whether it failed, all stop with the same error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from llama3.errors import UsageError

T = TypeVar("T")


class ProcessGroup(Protocol):
    """What saving and loading need to know of the processes (one, or many under torchrun)."""

    rank: int
    world_size: int

    @property
    def active(self) -> bool: ...

    def barrier(self) -> None: ...

    def any_failed(self, failed: bool) -> bool: ...


class OneProcess:
    """The process group of a command that runs alone."""

    rank, world_size, active = 0, 1, False

    def barrier(self) -> None:
        pass

    def any_failed(self, failed: bool) -> bool:
        return failed


ONE_PROCESS = OneProcess()


def act_together(
    group: ProcessGroup,
    action: Callable[[], T],
    *,
    elsewhere: str,
    everywhere: bool = False,
    failures: tuple[type[BaseException], ...] = (UsageError,),
) -> T | None:
    """Run ``action`` on the main process (on each with ``everywhere``) and return what it returned
    there (None where it did not run). Collective: if it raised one of ``failures`` on any process,
    every process raises, its own error or a UsageError saying ``elsewhere``, so none waits for
    one that stopped."""
    result, error = None, None
    if everywhere or group.rank == 0:
        try:
            result = action()
        except failures as err:
            error = err
    if group.any_failed(error is not None):
        raise error or UsageError(elsewhere)
    return result
