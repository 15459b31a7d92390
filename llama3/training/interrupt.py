"""Ctrl-C and SIGTERM (e.g. a cluster pre-empting the job) stop a run cleanly at a step boundary.

The first signal only sets a flag; the trainer combines the flags of all processes at the end of a
step, so every process stops after the same step and they save one checkpoint together. A second
Ctrl-C gets the default behaviour (quit at once, without saving). A second SIGTERM changes nothing:
launchers pass a job's SIGTERM on to workers that may have received it already (torchrun does, when
a scheduler signals every process of the job), and the checkpoint must still be saved; a
scheduler's last word is SIGKILL anyway.
"""

from __future__ import annotations

import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        first = not self.requested
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if self.announce and first:
            again = (
                " (press Ctrl-C again to quit without saving)" if signum == signal.SIGINT else ""
            )
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step and saving a "
                f"checkpoint{again}",
                file=sys.stderr,
                flush=True,
            )
