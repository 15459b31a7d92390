"""The Pile's preprocessing step, with the project's defaults: run in this folder after
``./download_the_pile.sh``, it cleans the downloaded Pile subset and writes ``pretrain_data/train``
and ``pretrain_data/eval`` here. Without the default subset's file here (shards of a Pile mirror,
or of another corpus, downloaded with ``./download_the_pile.sh URL...``), it takes every corpus
file in this folder (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``, ``.json.gz``, ``.parquet``). It
calls ``python -m llama3 preprocess``; any of that command's flags may be added (``--help`` lists
them), e.g. ``--workers 8`` or ``--input OTHER_FILES``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_INPUT = "the-pile-pubmed-central-refine-result.jsonl"
DEFAULT_OUTPUT = "pretrain_data"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # this repository's llama3
    from llama3.__main__ import main as llama3_main
    from llama3.data.sources import FORMATS, SUFFIXES

    given = {arg.split("=")[0] for arg in argv}
    inputs = [DEFAULT_INPUT]
    if not given & {"--input", "-h", "--help"} and not Path(DEFAULT_INPUT).exists():
        inputs = sorted(
            p.name
            for p in Path.cwd().iterdir()
            if p.is_file() and p.name.endswith(SUFFIXES) and not p.name.startswith(".")
        )
        if not inputs:
            print(
                f"error: neither {DEFAULT_INPUT} nor any other {FORMATS} file is in "
                f"{Path.cwd()}: run ./download_the_pile.sh first, or pass --input FILES",
                file=sys.stderr,
            )
            return 2
        print(
            f"note: {DEFAULT_INPUT} is not here; preprocessing the {len(inputs)} corpus file(s) "
            "of this folder",
            file=sys.stderr,
        )
    # later flags win, so the user's --input/--output replace these defaults
    return llama3_main(["preprocess", "--input", *inputs, "--output", DEFAULT_OUTPUT, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
