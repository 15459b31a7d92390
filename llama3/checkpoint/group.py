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


class GlooGroup:
    """A gloo process group of its own over every process (CPU collectives), for the work of a
    background thread: its collectives never interleave with those of training, which runs on
    the default group meanwhile."""

    active = True

    def __init__(self) -> None:
        """Collective: every process creates it, in the same order as any other group."""
        import torch.distributed as dist

        self.handle = dist.new_group(backend="gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.handle)

    def any_failed(self, failed: bool) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor(int(failed))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.handle)
        return bool(flag.item())
