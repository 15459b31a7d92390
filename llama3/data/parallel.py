"""An ordered, bounded process pool: results come back in input order, whatever the number of
workers, so outputs are identical with 1 or N workers; at most a few items are in flight, so a
stream of any length is processed in constant memory (``Pool.imap`` would read its whole input)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _context() -> multiprocessing.context.BaseContext:
    """fork where available: workers start at once and share what this process loaded (spawn
    would import torch again in each). Workers only parse JSON and run SentencePiece and numpy,
    which take no lock another thread of this process could hold at the fork."""
    fork = "fork" in multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if fork else "spawn")


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """``workers`` processes (none when ``workers <= 1``: work runs in this process) that each run
    ``initializer(*initargs)`` once. Use as a context manager, before starting progress bars."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ):
        self.workers = max(1, workers)
        self._init = (initializer, initargs)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        initializer, initargs = self._init
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=_context(),
                initializer=_start_worker,
                initargs=(initializer, initargs),
            )
            self._pool.submit(int).result()  # start the workers now, before any progress thread
        elif initializer is not None:
            initializer(*initargs)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``fn`` over ``items``, in order, with at most 2 items per worker in flight."""
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(self._pool.submit(fn, item))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
