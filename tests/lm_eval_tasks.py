"""A local lm-evaluation-harness task for tests (no download)."""

from __future__ import annotations

import json
from pathlib import Path


def local_choice_task(directory: Path, questions: list[tuple[str, list[str], int]]) -> Path:
    """A multiple-choice task ``tiny_choice`` over ``questions`` (question, choices, index of the
    right one), read from a local file; returns the directory for --include_path."""
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": label}) + "\n"
                            for q, c, label in questions))
    (directory / "tiny_choice.yaml").write_text(f"""\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    return directory
