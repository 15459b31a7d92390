"""Local lm-evaluation-harness tasks for tests (no download), and lm-eval's index of its built-in
tasks made once for all the runs of a pytest run."""

from __future__ import annotations

import json
import pickle
import runpy
import sys
from pathlib import Path


def _task(directory: Path, name: str, rows: list[dict], settings: str) -> Path:
    """Task ``name`` over ``rows``, read from a local JSON lines file; returns the directory for
    --include_path."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{name}.yaml").write_text(f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
{settings}""")
    return directory


def local_choice_task(directory: Path, questions: list[tuple[str, list[str], int]]) -> Path:
    """A multiple-choice task ``tiny_choice`` over ``questions`` (question, choices, index of the
    right one)."""
    rows = [{"question": q, "choices": c, "label": label} for q, c, label in questions]
    return _task(
        directory,
        "tiny_choice",
        rows,
        """\
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    )


def local_rolling_task(directory: Path, texts: list[str]) -> Path:
    """A perplexity task ``tiny_rolling`` over whole ``texts`` (loglikelihood_rolling, as
    wikitext)."""
    return _task(
        directory,
        "tiny_rolling",
        [{"text": t} for t in texts],
        """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    )


# ------------------------------------------------------------------- lm-eval's task index

# Every lm-eval run indexes the ~14,000 task files lm-eval ships (seconds) before it looks at the
# tasks of --include_path. The tests index them once per pytest run, keep the index in a file, and
# give every run that index instead: the same entries, read rather than parsed again. The tasks of
# --include_path are indexed on every run, as always.

_BUILT_IN: dict[Path, dict] = {}  # index file → lm-eval's built-in tasks, in this process
_IMPORT = f"import sys; sys.path.append({str(Path(__file__).parent)!r}); import lm_eval_tasks; "
RUN_MODULES = _IMPORT + "lm_eval_tasks.run_modules()"
WRITE_INDEX = _IMPORT + "lm_eval_tasks.write_index(sys.argv[1])"


def _task_index() -> tuple[type, Path] | None:
    """lm-eval's TaskIndex class (whose static ``build(paths)`` indexes folders of tasks) and the
    folder of its built-in tasks; None where this lm-eval indexes its tasks otherwise (each run
    then parses them itself)."""
    try:
        import lm_eval.tasks
        from lm_eval.tasks._index import TaskIndex
    except ImportError:
        return None
    if not isinstance(vars(TaskIndex).get("build"), staticmethod):
        return None
    return TaskIndex, Path(lm_eval.tasks.__file__).parent.resolve()


def _built_in(index_file: Path, build) -> dict:
    """The index of the built-in tasks: from this process, else from ``index_file``, else built
    and written there."""
    if index_file not in _BUILT_IN:
        if index_file.is_file():
            _BUILT_IN[index_file] = pickle.loads(index_file.read_bytes())
        else:
            _BUILT_IN[index_file] = build()
            partial = index_file.with_name(index_file.name + ".tmp")
            partial.write_bytes(pickle.dumps(_BUILT_IN[index_file]))
            partial.replace(index_file)
    return _BUILT_IN[index_file]


def write_index(index_file: str | Path) -> None:
    """Index lm-eval's built-in tasks into ``index_file`` (nothing where it has no TaskIndex)."""
    found = _task_index()
    if found is not None:
        task_index, built_in = found
        _built_in(Path(index_file), lambda: task_index.build([built_in]))


def index_once(index_file: Path, monkeypatch=None) -> None:
    """From now on in this process (with ``monkeypatch``: until the test ends), lm-eval takes its
    built-in tasks' entries from ``index_file`` (written on first use) and indexes every other
    folder as it does, later folders overriding earlier ones. Nothing changes where lm-eval has
    no TaskIndex (each run then indexes its tasks itself)."""
    found = _task_index()
    if found is None:
        return
    task_index, built_in = found
    build = task_index.build

    def build_once(paths, **settings):
        index: dict = {}
        for root in paths:
            if not settings and Path(root).resolve() == built_in:
                index.update(_built_in(Path(index_file), lambda: build([root])))
            else:
                index.update(build([root], **settings))
        return index

    if monkeypatch is None:
        task_index.build = staticmethod(build_once)
    else:
        monkeypatch.setattr(task_index, "build", staticmethod(build_once))


def python_m(index_file: Path, *commands: list[str]) -> list[str]:
    """A command line that runs each of ``commands`` (a module and its arguments) as ``python -m``
    runs it, one after the other in one process (stopping at the first that fails), with lm-eval's
    built-in tasks' index read from ``index_file`` (written on first use)."""
    return [sys.executable, "-c", RUN_MODULES, str(index_file), *map(json.dumps, commands)]


def run_modules() -> None:
    """The program of :func:`python_m`: ``sys.argv`` is ``["-c", INDEX_FILE, *COMMANDS]``, each
    command a JSON list."""
    index_once(Path(sys.argv[1]))
    for command in map(json.loads, sys.argv[2:]):
        sys.argv = list(command)
        try:
            runpy.run_module(command[0], run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
