"""Shared helpers of the data pipeline tests: small generated corpora, a tiny tokenizer, the CLI."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parents[1]
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "bi", "do", "fe"]


def make_words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(n)})


def make_texts(
    n: int, seed: int = 0, words: list[str] | None = None, max_words: int = 40
) -> list[str]:
    """``n`` documents of random words, some with several lines."""
    rng = random.Random(seed)
    words = words or make_words(300, seed)
    texts = []
    for _ in range(n):
        lines = [
            " ".join(rng.choices(words, k=rng.randint(3, max_words)))
            for _ in range(rng.randint(1, 3))
        ]
        texts.append("\n".join(lines))
    return texts


def jsonl_bytes(texts: Iterable[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def write_jsonl(path: Path, texts: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jsonl_bytes(texts))
    return path


def write_zst(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def write_gzip(path: Path, *members: bytes) -> Path:
    """A gzip file of one member per argument (concatenated, as ``cat a.gz b.gz`` makes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(gzip.compress(m, mtime=0) for m in members))
    return path


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int | None = None) -> Path:
    """A parquet file of the given columns (needs pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_corpus(path: Path, texts: list[str]) -> Path:
    """``texts`` in the format ``path``'s name gives: parquet with other columns around "text", in
    row groups of 100, as FineWeb ships it (the test skips without pyarrow), or gzip JSON lines in
    two members."""
    if path.name.endswith(".parquet"):
        import pytest

        pytest.importorskip("pyarrow")
        return write_parquet(
            path,
            {
                "id": [f"doc-{i}" for i in range(len(texts))],
                "text": texts,
                "token_count": [len(t.split()) for t in texts],
            },
            row_group_size=100,
        )
    half = len(texts) // 2
    return write_gzip(path, jsonl_bytes(texts[:half]), jsonl_bytes(texts[half:]))


def read_texts(directory: Path) -> list[str]:
    """Texts of every shard in a preprocessed split directory, in shard order."""
    texts = []
    for path in sorted(directory.glob("part-*.jsonl*")):
        data = path.read_bytes()
        if path.suffix == ".zst":
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        texts += [json.loads(line)["text"] for line in data.decode().splitlines()]
    return texts


def train_tiny_tokenizer(directory: Path, vocab_size: int = 400, **kwargs) -> Path:
    from llama3.data.tokenizer import train_tokenizer

    corpus = write_jsonl(directory / "tokenizer_corpus.jsonl", make_texts(400, seed=123))
    return train_tokenizer(
        corpus,
        directory / "tiny.model",
        vocab_size,
        progress=False,
        n_most_frequent_words=kwargs.pop("n_most_frequent_words", 10),
        **kwargs,
    )


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m llama3 ARGS`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "llama3", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
