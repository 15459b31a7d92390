"""The original's preprocessing step, with its defaults: run in this folder after
``./download_the_pile.sh``, it cleans the downloaded Pile subset and writes ``pretrain_data/train``
and ``pretrain_data/eval`` here. It calls ``python -m llama3 preprocess``; any of that command's
flags may be added (``--help`` lists them), e.g. ``--workers 8`` or ``--input OTHER_FILES``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_INPUT = "the-pile-pubmed-central-refine-result.jsonl"
DEFAULT_OUTPUT = "pretrain_data"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # this repository's llama3
    from llama3.__main__ import main as llama3_main

    given = {arg.split("=")[0] for arg in argv}
    if not given & {"--input", "-h", "--help"} and not Path(DEFAULT_INPUT).exists():
        print(f"error: {DEFAULT_INPUT} is not in {Path.cwd()}: run ./download_the_pile.sh first, "
              "or pass --input FILES", file=sys.stderr)
        return 2
    # later flags win, so the user's --input/--output replace these defaults
    return llama3_main(["preprocess", "--input", DEFAULT_INPUT, "--output", DEFAULT_OUTPUT, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
