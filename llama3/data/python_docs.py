"""A small English corpus that exists offline on any machine: the documentation shipped with Python.

Documents are the language-reference topics of ``pydoc_data`` and, for each standard-library module,
its docstrings (module, classes, functions) read with ``ast`` — no module is imported. The result
depends only on the Python installation, so it is the same on every run of one machine.

``python -m llama3.data.python_docs --output corpus.jsonl`` writes one JSON object with a "text"
field per line, the format ``preprocess`` reads.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIPPED_PARTS = {
    "test",
    "tests",
    "site-packages",
    "dist-packages",
    "idlelib",
    "lib2to3",
    "__pycache__",
}
MIN_DOCSTRING = 40  # characters; shorter docstrings are mostly "Return x." and add little text


def reference_topics() -> Iterator[str]:
    """The language reference pages that ``help('TOPIC')`` shows, one document each."""
    from pydoc_data import topics

    for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        if text:
            yield text


def module_docstrings(path: Path) -> str:
    """All docstrings of one module's source, in source order, separated by blank lines."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return ""
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, nodes)]
    return "\n\n".join(d for d in docs if d and len(d) >= MIN_DOCSTRING)


def stdlib_documents() -> Iterator[str]:
    """One document per standard-library module that has docstrings."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.rglob("*.py")):
        if SKIPPED_PARTS.isdisjoint(path.relative_to(lib).parts):
            text = module_docstrings(path)
            if text:
                yield text


def write_corpus(output: str | Path) -> tuple[int, int]:
    """Write the corpus as JSON lines; returns (documents, characters)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    n_docs = n_chars = 0
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in (*reference_topics(), *stdlib_documents()):
            f.write(json.dumps({"text": text}) + "\n")
            n_docs += 1
            n_chars += len(text)
    tmp.replace(output)
    return n_docs, n_chars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="JSON-lines file to write")
    args = parser.parse_args()
    n_docs, n_chars = write_corpus(args.output)
    print(f"wrote {n_docs} documents, {n_chars / 1e6:.1f} M characters to {args.output}")


if __name__ == "__main__":
    main()
