"""Clean a raw corpus and split it into train and eval shards (:func:`clean_and_split`; the
command is ``python -m llama3 preprocess``).

Input: JSON lines (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``, ``.json.gz``) or parquet files with a
``text`` column, or directories of them (see :mod:`llama3.data.sources`).
Each document is cleaned (:mod:`llama3.data.clean`) and assigned to a split by a keyed hash of its
cleaned text, so the split is deterministic, independent of input order and worker count, and
exact duplicates always land on the same side.

Output layout::

    OUTPUT/train/part-00000.jsonl[.zst]   one {"text": ...} object per line, as the input
    OUTPUT/train/part-00001.jsonl[.zst]   a shard closes at the first line end past its size
    OUTPUT/eval/part-00000.jsonl[.zst]
    OUTPUT/preprocess.json                settings (the cleaning steps among them), inputs,
                                          per-shard documents/bytes/sha256 and bad-input counts;
                                          written last, so it marks a complete run
    OUTPUT/preprocess.bad_input.tsv       every bad input: file, line, reason, detail (if any)

Shards are written under a hidden temporary name and renamed once complete; shards of an earlier
run that this run did not produce are removed at the end. The same input and settings therefore
give byte-identical output, and an interrupted run leaves no partial shard under a final name.
While a run writes a split, the split holds a marker (``.preprocess-incomplete``) that every
command reading corpora refuses, so the shards of a run that was stopped are never taken for a
complete corpus. A run in which no document survives fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

from llama3.data.clean import Cleaner
from llama3.data.parallel import WorkerPool
from llama3.data.sources import (
    INCOMPLETE,
    Chunk,
    Problem,
    ProblemLog,
    chunk_size_for,
    corpus_chunks,
    parse_lines,
    total_size,
    zstandard_module,
)
from llama3.errors import UsageError
from llama3.fileio import atomic_write_bytes, write_error

SPLITS = ("train", "eval")
MANIFEST = "preprocess.json"
_SHARD_NAME = re.compile(r"part-\d{5}\.jsonl(\.zst)?")


def corpus_cleaning(corpus: str | os.PathLike) -> Cleaner | None:
    """The cleaning ``preprocess`` applied to ``corpus`` (its output directory, a split of it or a
    shard), from the run's ``preprocess.json``; None when no such record describes it."""
    path = Path(corpus)
    directory = path if path.is_dir() else path.parent
    manifest = next(
        (d / MANIFEST for d in (directory, directory.parent) if (d / MANIFEST).is_file()), None
    )
    if manifest is None:
        return None
    try:
        return Cleaner.from_dict(json.loads(manifest.read_text(encoding="utf-8"))["cleaning"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(
            f"{manifest}: cannot read its cleaning steps ({err}); run preprocess again"
        ) from err


# ----------------------------------------------------------------------------------- splitting


@dataclass(frozen=True)
class Splitter:
    """Assigns a document to train with probability ``train_share``, by a keyed hash of its text."""

    train_share: float = 0.9
    seed: int = 0

    def __call__(self, text: bytes) -> str:
        key = self.seed.to_bytes(8, "little", signed=True)
        value = int.from_bytes(hashlib.blake2b(text, digest_size=8, key=key).digest(), "little")
        return "train" if value < self.train_share * 2.0**64 else "eval"


# ------------------------------------------------------------------------------- chunk worker


class ChunkResult(NamedTuple):
    lines: dict[str, bytes]  # split → JSON lines
    documents: dict[str, int]
    empty: int  # documents left empty by cleaning (dropped)
    problems: list[Problem]
    raw_bytes: int


_WORKER: dict[str, object] = {}


def _init_worker(cleaner: Cleaner, splitter: Splitter) -> None:
    _WORKER.update(cleaner=cleaner, splitter=splitter)


def _process_chunk(chunk: Chunk) -> ChunkResult:
    cleaner, splitter = _WORKER["cleaner"], _WORKER["splitter"]
    texts, problems = parse_lines(chunk)
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    empty = 0
    for text in texts:
        text = cleaner(text)
        if not text or text.isspace():
            empty += 1
            continue
        lines[splitter(text.encode("utf-8"))].append(json.dumps({"text": text}, ensure_ascii=False))
    return ChunkResult(
        lines={s: "".join(line + "\n" for line in v).encode("utf-8") for s, v in lines.items()},
        documents={s: len(v) for s, v in lines.items()},
        empty=empty,
        problems=problems,
        raw_bytes=chunk.raw_bytes,
    )


# ------------------------------------------------------------------------------ shard writing


class _HashingFile:
    """A write-only file that also hashes what passes through it."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class ShardWriter:
    """Writes one split as numbered shards of whole lines, each renamed into place once complete."""

    def __init__(self, directory: Path, shard_bytes: int, compress: bool = False, level: int = 3):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.compress, self.level = compress, level
        self.shards: list[dict] = []
        self._file: IO[bytes] | None = None
        self._hasher: _HashingFile | None = None
        self._sink = None  # the hasher, or a zstd writer on top of it
        self._written = self._documents = 0
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(".part-*.tmp"):  # from an interrupted run
            leftover.unlink()

    @property
    def suffix(self) -> str:
        return ".jsonl.zst" if self.compress else ".jsonl"

    def _name(self) -> str:
        return f"part-{len(self.shards):05d}{self.suffix}"

    def _open(self) -> None:
        self._file = open(self.directory / f".{self._name()}.tmp", "wb")
        self._hasher = _HashingFile(self._file)
        self._sink = self._hasher
        if self.compress:
            self._sink = (
                zstandard_module()
                .ZstdCompressor(level=self.level)
                .stream_writer(self._hasher, closefd=False)
            )
        self._written = self._documents = 0

    def write(self, data: bytes) -> None:
        """Append whole lines; a shard closes at the first line end at or past ``shard_bytes``."""
        view, pos = memoryview(data), 0
        while pos < len(data):
            if self._file is None:
                self._open()
            room = self.shard_bytes - self._written
            end = (
                len(data)
                if len(data) - pos < room
                else data.find(b"\n", pos + max(room - 1, 0)) + 1
            )
            end = end or len(data)
            self._sink.write(view[pos:end])
            self._written += end - pos
            self._documents += data.count(b"\n", pos, end)
            pos = end
            if self._written >= self.shard_bytes:
                self._finish()

    def _finish(self) -> None:
        name = self._name()
        if self.compress:
            self._sink.close()  # ends the frame; closefd=False keeps the file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.directory / f".{name}.tmp", self.directory / name)
        self.shards.append(
            {
                "name": name,
                "documents": self._documents,
                "bytes": self._written,
                "sha256": self._hasher.sha256.hexdigest(),
            }
        )
        self._file = self._sink = self._hasher = None

    def close(self) -> list[dict]:
        """Finish the last shard and remove shards of earlier runs that this run did not write."""
        if self._file is not None:
            self._finish()
        produced = {shard["name"] for shard in self.shards}
        for path in self.directory.iterdir():
            if _SHARD_NAME.fullmatch(path.name) and path.name not in produced:
                path.unlink()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (an interrupted run)."""
        if self._file is not None:
            self._file.close()
            (self.directory / f".{self._name()}.tmp").unlink(missing_ok=True)
            self._file = self._sink = self._hasher = None


# ------------------------------------------------------------------------------------- a run


@dataclass
class Totals:
    """Documents kept per split, documents emptied by cleaning, input bytes read."""

    documents: Counter = field(default_factory=Counter)
    empty: int = 0
    raw_bytes: int = 0

    def add(self, result: ChunkResult) -> None:
        self.documents.update(result.documents)
        self.empty += result.empty
        self.raw_bytes += result.raw_bytes


class NoDocuments(UsageError):
    """No document survived: every line was bad input, or cleaning emptied every document."""


def clean_and_split(
    files: list[Path],
    output: Path,
    cleaner: Cleaner,
    splitter: Splitter,
    log: ProblemLog,
    *,
    shard_bytes: int,
    compress: bool = False,
    workers: int = 1,
    progress: bool = True,
    what: str = "",
) -> tuple[dict[str, list[dict]], Totals]:
    """Clean ``files`` and split them into shards of about ``shard_bytes`` under ``output``, then
    write the manifest; returns the shards of each split and the totals. A failed write (``what``
    names ``output`` in its message) and a run that keeps no document (:class:`NoDocuments`) leave
    no shard under a final name and no manifest."""
    (output / MANIFEST).unlink(missing_ok=True)  # present again only once this run completes
    writers = {s: ShardWriter(output / s, shard_bytes, compress) for s in SPLITS}
    for split in SPLITS:
        (output / split / INCOMPLETE).touch()
    try:
        totals = _process(files, writers, log, cleaner, splitter, workers, progress)
        _require_documents(totals, log)
        shards = {s: w.close() for s, w in writers.items()}
        log.close()
        _write_manifest(output, files, cleaner, splitter, shards, log)
    except BaseException as err:
        for writer in writers.values():
            writer.abort()
        log.abort()
        if isinstance(err, OSError):
            raise write_error(output, err, what) from err
        raise
    for split in SPLITS:
        (output / split / INCOMPLETE).unlink()
    return shards, totals


def _require_documents(totals: Totals, log: ProblemLog) -> None:
    """Fail a run that kept no document (its report of bad input is kept)."""
    if sum(totals.documents.values()):
        return
    log.close()
    why = (
        f"every line was bad input ({log.breakdown}), each listed in {log.report}"
        if log.total
        else "every document was empty after cleaning"
    )
    raise NoDocuments(f"no documents to write: {why}")


def _process(
    files: list[Path],
    writers: dict[str, ShardWriter],
    log: ProblemLog,
    cleaner: Cleaner,
    splitter: Splitter,
    workers: int,
    progress: bool,
) -> Totals:
    """Stream every chunk through the workers into the shard writers, in input order."""
    from tqdm import tqdm

    size, totals = total_size(files), Totals()
    chunks = corpus_chunks(files, log, chunk_size_for(size, workers))
    with (
        WorkerPool(workers, _init_worker, (cleaner, splitter)) as pool,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc="preprocess",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        for result in pool.map(_process_chunk, chunks):
            log.extend(result.problems)
            for split in SPLITS:
                writers[split].write(result.lines[split])
            totals.add(result)
            bar.update(result.raw_bytes)
            docs = sum(totals.documents.values())
            bar.set_postfix_str(
                f"{docs} docs, {docs / max(bar.format_dict['elapsed'], 1e-9):.0f} docs/s",
                refresh=False,
            )
        bar.update(max(size - bar.n, 0))  # files that yielded nothing (empty, unreadable)
    return totals


def _write_manifest(
    output: Path,
    files: list[Path],
    cleaner: Cleaner,
    splitter: Splitter,
    shards: dict[str, list[dict]],
    log: ProblemLog,
) -> None:
    manifest = {
        "format": "llama3-preprocess",
        "version": 1,
        "inputs": [str(p) for p in files],
        "cleaning": cleaner.to_dict(),
        "split": {
            "train_share": splitter.train_share,
            "seed": splitter.seed,
            "hash": "blake2b-64 of the cleaned UTF-8 text, keyed by the seed",
        },
        "splits": {
            s: {
                "documents": sum(x["documents"] for x in v),
                "bytes": sum(x["bytes"] for x in v),
                "shards": v,
            }
            for s, v in shards.items()
        },
        "bad_input": dict(sorted(log.counts.items())),
    }
    atomic_write_bytes(output / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
