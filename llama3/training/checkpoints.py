"""The checkpoints of a run: written while training waits, or in the background
(``--async_checkpoint``: the loop only waits while each process copies its state), and how long
each save paused training (``checkpoint_stall_s`` in the summary)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from llama3.checkpoint import BackgroundSaves, save_training_checkpoint, step_of
from llama3.training.build import Run
from llama3.training.metrics import MetricsLog
from llama3.training.parallel import full_state_dict


class Checkpoints:
    """Every save of a run, from the loop's side. Collective: every process calls each method at
    the same step."""

    def __init__(self, run: Run, metrics: MetricsLog):
        self.run, self.metrics = run, metrics
        background = run.config.checkpoints.async_checkpoint
        self.background = BackgroundSaves(run.parts.dist) if background else None
        self.stalls: list[float] = []  # seconds each save held the loop up, in order
        self._held = 0.0  # so far, by the save in flight

    def save(self, *, wait: bool = False) -> None:
        """Save the current step. In the background, ``wait`` returns only once it is complete
        (the run's last save)."""
        self.finish()  # at most one save in flight
        run, begin = self.run, time.perf_counter()
        parts, step = run.parts, run.progress.step
        taken = {
            "model_state": full_state_dict(parts.model),
            "model_args": parts.model_args,
            "tokenizer": parts.tokenizer_fingerprint,
            "keep_last": run.config.checkpoints.keep_last or None,
        }
        if self.background is None:
            path = save_training_checkpoint(
                run.run_dir, step, run.checkpointed, group=parts.dist, **taken
            )
        else:
            self.background.start(run.run_dir, step, run.checkpointed, **taken)
        run.progress.saved_step = step
        self._held = time.perf_counter() - begin
        if self.background is None:
            self._saved(path)
        elif wait:
            self.finish()

    def poll(self) -> None:
        """At a step boundary: report a background save that every process has completed, or
        raise its error."""
        if self.background is not None and self.background.in_flight:
            self._held_while(self.background.poll)

    def finish(self) -> None:
        """Wait for the save in flight, if any (before the next, and before the process ends)."""
        if self.background is not None and self.background.in_flight:
            self._held_while(self.background.wait)

    def close(self) -> None:
        """Stop the writing thread; after an error, a save in flight ends first (and is published
        only if every process completed it)."""
        if self.background is not None:
            self.background.close()

    def _held_while(self, call: Callable[[], Path | None]) -> None:
        begin = time.perf_counter()
        path = call()
        self._held += time.perf_counter() - begin
        if path is not None:
            self._saved(path)

    def _saved(self, path: Path) -> None:
        self.stalls.append(self._held)
        where = " in the background" if self.background is not None else ""
        self.metrics.note(
            f"step {step_of(path)}: saved {path}{where} (training held up {self._held:.3f} s)"
        )
