"""Local lm-evaluation-harness tasks for tests (no download)."""

from __future__ import annotations

import json
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
