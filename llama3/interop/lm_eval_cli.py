"""``python -m llama3 lm_eval ARGS``: lm-evaluation-harness's command line (``lm_eval ARGS``) with
our ``llama3`` model registered. lm-eval finds models only in its own list, so its ``lm_eval``
command alone does not know ours; this one imports :mod:`llama3.interop.lm_eval` first.

Where lm-eval would go on after an error a user can fix, this command ends with one line (exit 2):
an ``--output_path`` it cannot write is refused before the evaluation runs; results it could not
write (a full disk) are removed, after the results table is printed; an unknown task is named.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llama3.errors import UsageError
from llama3.fileio import check_output_dir, check_output_file, write_error
from llama3.interop import require

USAGE = """\
python -m llama3 lm_eval --model llama3 --model_args checkpoint=RUN,tokenizer=MODEL_FILE[,...] \\
    --tasks TASKS [lm_eval's other flags]

llama3 model arguments: checkpoint, tokenizer, device, dtype (fp32|bf16|fp16), max_length (at
least 2), max_gen_toks (default: 256, or half of max_length when that is less), start_token
(eos|bos), nfkd, ascii, lowercase, drop_empty_brackets (true or false; default: the cleaning
recorded with the tokenizer);
lm_eval's --batch_size sets the batch. lm_eval's own help follows.
"""
SAVES = ("save_results_aggregated", "save_results_samples")  # lm-eval's tracker's writes


def main(argv: list[str]) -> int:
    """Run lm-eval's command line on ``argv`` with the llama3 model registered."""
    require("eval", "lm_eval")
    from lm_eval.__main__ import cli_evaluate

    import llama3.interop.lm_eval  # noqa: F401 - registers the model

    if not argv or "-h" in argv or "--help" in argv:
        print(USAGE)
    check_output_path(argv)
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        with failed_saves_raised(), unknown_tasks_named():
            cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def check_output_path(argv: list[str]) -> None:
    """Refuse an ``--output_path`` lm-eval could not write, before anything runs: a directory
    for the results, or a FILE.json beside which they are written."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_path", "-o")
    path = parser.parse_known_args(argv)[0].output_path
    if path is None:
        return
    if Path(path).suffix == ".json":
        check_output_file(path, "--output_path")
    else:
        check_output_dir(path, "--output_path")


@contextlib.contextmanager
def unknown_tasks_named() -> Iterator[None]:
    """lm-eval's error for a task it does not know, as one line."""
    try:
        yield
    except ValueError as err:
        if not str(err).startswith("Tasks not found"):
            raise
        raise UsageError(
            f"--tasks: {str(err).split('. ')[0]}: check the names (lm-eval lists "
            "its tasks), and give --include_path DIR for tasks of your own"
        ) from err


@contextlib.contextmanager
def failed_saves_raised() -> Iterator[None]:
    """lm-eval logs a results file it could not write (a full disk) and exits 0. Here the OSError
    it logged is kept; once lm-eval is done (its table printed), the files of this run are
    removed and the error ends the command as one line."""
    from lm_eval.loggers import evaluation_tracker as module

    tracker_class = module.EvaluationTracker
    originals = {name: getattr(tracker_class, name) for name in SAVES}
    failures: list[tuple[Any, OSError]] = []
    for name, save in originals.items():
        setattr(tracker_class, name, _recording(save, module, failures))
    try:
        yield
    finally:
        for name, save in originals.items():
            setattr(tracker_class, name, save)
    if failures:
        tracker, error = failures[0]
        for file in _files_of_run(tracker):
            file.unlink(missing_ok=True)
        raise write_error(tracker.output_path, error, "--output_path ")


def _recording(save: Callable, module: Any, failures: list[tuple[Any, OSError]]) -> Callable:
    """``save`` with the tracker module's logger replaced by one that keeps the OSError being
    handled whenever a warning is logged."""

    def recorded(tracker: Any, *args: Any, **kwargs: Any) -> None:
        logger = module.eval_logger
        module.eval_logger = _KeepingLogger(logger, lambda error: failures.append((tracker, error)))
        try:
            save(tracker, *args, **kwargs)
        finally:
            module.eval_logger = logger

    return recorded


class _KeepingLogger:
    """A logger whose ``warning``, called in an ``except`` block, hands on the OSError handled
    there; everything else is the wrapped logger's."""

    def __init__(self, logger: Any, keep: Callable[[OSError], None]):
        self._logger, self._keep = logger, keep

    def warning(self, *args: Any, **kwargs: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._keep(error)
        self._logger.warning(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def _files_of_run(tracker: Any) -> list[Path]:
    """The files the tracker wrote: their names end with its run's date id."""
    date_id = getattr(tracker, "date_id", None)
    if not date_id:
        return []
    path = Path(tracker.output_path)
    base = path.parent if path.suffix == ".json" else path
    return [file for file in base.rglob(f"*_{date_id}.json*") if file.is_file()]
