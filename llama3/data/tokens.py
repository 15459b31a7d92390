"""Pre-tokenized corpora: each corpus is encoded once, in parallel, into binary token shards that
training memory-maps (``python -m llama3 pretokenize`` builds them up front; every command that
opens a corpus builds or refreshes them on demand).

Cache layout, one folder per corpus and tokenizer (default ``CORPUS_DIR/.tokens/TOKENIZER16/`` for a
directory, ``DIR/.tokens/FILE_NAME-TOKENIZER16/`` for a single file; ``--cache_dir`` moves it, and a
read-only corpus folder falls back to ``$XDG_CACHE_HOME/llama3/tokens/``)::

    meta.json        format, version, tokenizer (path, sha256, vocab size, special ids), token
                     dtype, the cleaning applied while encoding (or null), and per source file:
                     relative path, size, mtime_ns, sha256, shard name, documents, tokens, <unk>
                     tokens, UTF-8 bytes, bad input counts
    tokens.bad_input.tsv  every bad input of the last build (file, line, reason, detail)
    NAME.tokens      the file's documents in order, each followed by EOS: raw little-endian
                     uint16 (vocabulary ≤ 65536) or uint32
    NAME.docs        int64 document offsets into NAME.tokens: 0, end of document 1, ..., n_tokens
    .lock            held while building, so concurrent processes (ranks) build only once

A shard is reused while its source file keeps its size and either its mtime or its sha256, and the
tokenizer keeps its sha256 and its cleaning; otherwise that shard alone is rebuilt. Shards are
written under temporary names and renamed, and ``meta.json`` is replaced last, so an interrupted or
failed build (a full disk) leaves the previous cache intact. Empty documents are skipped; bad input
is counted as in preprocessing.

Text is encoded as the tokenizer's training text was cleaned (:meth:`Tokenizer.clean`), unless the
corpus is ``preprocess`` output already cleaned that way (its ``preprocess.json`` says so), which
is then encoded as it is. Opening a corpus warns when a high share of its tokens are <unk>.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import time
from bisect import bisect_right
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from llama3.data.clean import Cleaner
from llama3.data.parallel import WorkerPool, available_cpus
from llama3.data.preprocess import corpus_cleaning
from llama3.data.sources import (
    REPORT_SUFFIX,
    Chunk,
    Problem,
    ProblemLog,
    chunk_size_for,
    file_chunks,
    find_corpus_files,
    parse_lines,
    total_size,
)
from llama3.data.tokenizer import Tokenizer, unknown_share_warning
from llama3.errors import UsageError
from llama3.fileio import atomic_write_bytes, file_sha256, locked, write_error

FORMAT = "llama3-tokens"
VERSION = 1
META = "meta.json"
LOCK = ".lock"
MIN_BYTES_PER_WORKER = 4 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------------- the corpus


class TokenCorpus:
    """A memory-mapped token corpus: every document followed by EOS, files in corpus order.

    ``n_tokens`` counts those EOS separators, ``n_bytes`` the UTF-8 bytes of the documents' text
    (for bits per byte), ``fingerprint`` the content of the source files plus the tokenizer.
    """

    def __init__(self, cache_dir: Path, meta: dict, source: Path):
        self.path, self.cache_dir, self._meta = source, cache_dir, meta
        tokenizer = meta["tokenizer"]
        self.tokenizer_sha256: str = tokenizer["sha256"]
        self.vocab_size: int = tokenizer["vocab_size"]
        self.bos_id, self.eos_id, self.pad_id = (
            tokenizer["bos_id"],
            tokenizer["eos_id"],
            tokenizer["pad_id"],
        )
        self.dtype = np.dtype(meta["dtype"])
        self.files: list[dict] = meta["files"]
        self.n_tokens = sum(f["tokens"] for f in self.files)
        self.n_documents = sum(f["documents"] for f in self.files)
        self.n_bytes = sum(f["bytes"] for f in self.files)
        self.n_unknown = sum(f.get("unknown", 0) for f in self.files)  # caches before: unknown
        self.fingerprint: str = corpus_fingerprint(meta)
        used = [f for f in self.files if f["tokens"]]
        self._tokens = [
            np.memmap(cache_dir / f"{f['shard']}.tokens", self.dtype, "r") for f in used
        ]
        self._offsets = [np.memmap(cache_dir / f"{f['shard']}.docs", np.int64, "r") for f in used]
        self._token_starts = np.cumsum([0] + [f["tokens"] for f in used]).tolist()
        self._doc_starts = np.cumsum([0] + [f["documents"] for f in used]).tolist()

    def __reduce__(self):  # reopen the memory maps instead of pickling their contents
        return TokenCorpus, (self.cache_dir, self._meta, self.path)

    def __repr__(self) -> str:
        return (
            f"TokenCorpus({str(self.path)!r}, documents={self.n_documents}, "
            f"tokens={self.n_tokens}, fingerprint={self.fingerprint!r})"
        )

    def tokens(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``start:stop`` of the whole corpus (across shard boundaries), into ``out`` if
        given (any integer dtype, length ``stop - start``)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"tokens {start}:{stop} outside 0:{self.n_tokens}")
        if out is None:
            out = np.empty(stop - start, self.dtype)
        i, pos = bisect_right(self._token_starts, start) - 1, 0
        while start < stop:
            shard, first = self._tokens[i], self._token_starts[i]
            piece = shard[start - first : min(stop - first, len(shard))]
            out[pos : pos + len(piece)] = piece
            pos, start, i = pos + len(piece), start + len(piece), i + 1
        return out

    def document(self, index: int) -> np.ndarray:
        """Tokens of document ``index``, ending with EOS (a read-only view)."""
        i = bisect_right(self._doc_starts, index) - 1
        if not 0 <= index < self.n_documents:
            raise IndexError(f"document {index} outside 0:{self.n_documents}")
        offsets, k = self._offsets[i], index - self._doc_starts[i]
        return self._tokens[i][offsets[k] : offsets[k + 1]]

    def document_lengths(self) -> np.ndarray:
        """(n_documents,) int64: tokens per document, EOS included."""
        if not self._offsets:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(offsets) for offsets in self._offsets])


def corpus_fingerprint(meta: dict) -> str:
    content = [
        meta["tokenizer"]["sha256"],
        meta["dtype"],
        [(f["source"], f["sha256"]) for f in meta["files"]],
    ]
    if meta.get("cleaning"):  # text cleaned while encoding gives other tokens
        content.append(meta["cleaning"])
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def encoding_cleaning(corpus: Path, tokenizer: Tokenizer) -> Cleaner | None:
    """The cleaning to apply while encoding ``corpus``: the tokenizer's, unless it changes nothing
    or preprocess already applied it to this corpus."""
    wanted = tokenizer.cleaner
    if wanted.is_identity or corpus_cleaning(corpus) == wanted:
        return None
    return wanted


# ---------------------------------------------------------------------------- cache location


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama3" / "tokens"


def _cache_name(corpus: Path, tokenizer_sha: str) -> str:
    return tokenizer_sha[:16] if corpus.is_dir() else f"{corpus.name}-{tokenizer_sha[:16]}"


def default_cache_dir(corpus: Path, tokenizer_sha: str) -> Path:
    base = corpus if corpus.is_dir() else corpus.parent
    return base / ".tokens" / _cache_name(corpus, tokenizer_sha)


def _keyed_cache_dir(root: Path, corpus: Path, tokenizer_sha: str) -> Path:
    """A cache under ``root`` that cannot collide with another corpus's."""
    where = hashlib.blake2b(str(corpus.resolve()).encode(), digest_size=4).hexdigest()
    return root / f"{corpus.resolve().name}-{where}" / _cache_name(corpus, tokenizer_sha)


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------- validation


def _read_meta(cache: Path) -> dict | None:
    try:
        meta = json.loads((cache / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT and meta.get("version") == VERSION else None


class _Source(NamedTuple):
    path: Path
    name: str  # relative to the corpus root: the key in meta.json


def _sources(files: list[Path], corpus: Path) -> list[_Source]:
    root = corpus if corpus.is_dir() else corpus.parent
    return [_Source(p, p.relative_to(root).as_posix()) for p in files]


def _entry_is_current(entry: dict | None, source: _Source, cache: Path, dtype: np.dtype) -> bool:
    """Whether a cached shard still matches its source file (hashing only when the mtime moved)."""
    if entry is None:
        return False
    expected = {".tokens": entry["tokens"] * dtype.itemsize, ".docs": 8 * (entry["documents"] + 1)}
    try:
        stat = source.path.stat()
        sizes_ok = all(
            (cache / f"{entry['shard']}{suffix}").stat().st_size == size
            for suffix, size in expected.items()
        )
    except OSError:
        return False
    if not sizes_ok or stat.st_size != entry["size"]:
        return False
    if stat.st_mtime_ns == entry["mtime_ns"]:
        return True
    if file_sha256(source.path) != entry["sha256"]:
        return False
    entry["mtime_ns"] = stat.st_mtime_ns  # same content, touched: keep the shard
    return True


def _stale(
    meta: dict | None,
    sources: list[_Source],
    cache: Path,
    tokenizer: Tokenizer,
    cleaning: Cleaner | None,
) -> list[_Source] | None:
    """Sources whose shards must be (re)built; None when the whole cache must be rebuilt."""
    dtype = token_dtype(tokenizer.vocab_size)
    if (
        meta is None
        or meta["tokenizer"]["sha256"] != tokenizer.sha256
        or meta["dtype"] != dtype.name
        or meta.get("cleaning") != _cleaning_record(cleaning)
    ):
        return None
    entries = {f["source"]: f for f in meta["files"]}
    return [s for s in sources if not _entry_is_current(entries.get(s.name), s, cache, dtype)]


def _is_current(meta: dict | None, stale: list[_Source] | None, sources: list[_Source]) -> bool:
    return (
        meta is not None
        and stale == []
        and [f["source"] for f in meta["files"]] == [s.name for s in sources]
    )


# ---------------------------------------------------------------------------------- encoding


def _cleaning_record(cleaning: Cleaner | None) -> dict | None:
    return None if cleaning is None else cleaning.to_dict()


class EncodedChunk(NamedTuple):
    source: int  # index into the list of sources being built
    tokens: np.ndarray  # documents, each followed by EOS
    lengths: np.ndarray  # int64 tokens per document (EOS included)
    n_bytes: int
    n_unknown: int  # <unk> tokens
    problems: list[Problem]
    raw_bytes: int


_ENCODER: dict = {}


def _init_encoder(tokenizer: Tokenizer, cleaning: Cleaner | None) -> None:
    _ENCODER.update(tokenizer=tokenizer, dtype=token_dtype(tokenizer.vocab_size), cleaning=cleaning)


def _encode_chunk(item: tuple[int, Chunk]) -> EncodedChunk:
    source, chunk = item
    tokenizer, dtype, cleaning = _ENCODER["tokenizer"], _ENCODER["dtype"], _ENCODER["cleaning"]
    texts, problems = parse_lines(chunk)
    if cleaning is not None:
        texts = [cleaning(t) for t in texts]
    texts = [t for t in texts if t]
    ids = tokenizer.encode_batch(texts, eos=True)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
    n_bytes = sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
    n_unknown = int(np.count_nonzero(tokens == tokenizer.unk_id)) if tokenizer.unk_id >= 0 else 0
    return EncodedChunk(source, tokens, lengths, n_bytes, n_unknown, problems, chunk.raw_bytes)


class _ShardWriter:
    """Streams one source file's tokens to disk; renamed into place by :meth:`finish`."""

    def __init__(self, cache: Path, source: _Source):
        self.cache, self.source = cache, source
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", source.name.split("/")[-1].split(".")[0])[:40]
        self.shard = f"{stem}-{hashlib.blake2b(source.name.encode(), digest_size=4).hexdigest()}"
        stat = source.path.stat() if source.path.exists() else None
        self.entry = {
            "source": source.name,
            "size": stat.st_size if stat else 0,
            "mtime_ns": stat.st_mtime_ns if stat else 0,
            "sha256": _sha256_or_empty(source.path),
            "shard": self.shard,
        }
        self._file = open(self._tmp(".tokens"), "wb")
        self._lengths: list[np.ndarray] = []
        self._bytes = self._unknown = 0
        self.problems: Counter[str] = Counter()

    def _tmp(self, suffix: str) -> Path:
        return self.cache / f".{self.shard}{suffix}.tmp"

    def add(self, chunk: EncodedChunk) -> None:
        chunk.tokens.tofile(self._file)
        self._lengths.append(chunk.lengths)
        self._bytes += chunk.n_bytes
        self._unknown += chunk.n_unknown
        self.problems.update(p.reason for p in chunk.problems)

    def finish(self) -> dict:
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        atomic_write_bytes(self._tmp(".docs"), offsets.tobytes())
        for suffix in (".tokens", ".docs"):
            os.replace(self._tmp(suffix), self.cache / f"{self.shard}{suffix}")
        return {
            **self.entry,
            "documents": len(lengths),
            "tokens": int(offsets[-1]),
            "unknown": self._unknown,
            "bytes": self._bytes,
            "bad_input": dict(sorted(self.problems.items())),
        }

    def abort(self) -> None:
        self._file.close()
        for suffix in (".tokens", ".docs"):
            self._tmp(suffix).unlink(missing_ok=True)


def _sha256_or_empty(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""


class _Builder:
    """Routes encoded chunks (which arrive in source order) to one shard per source file."""

    def __init__(self, cache: Path, todo: list[_Source]):
        self.cache, self.todo = cache, todo
        self.built: dict[str, dict] = {}
        self.tokens = 0
        self._next = 0  # first source whose shard is not finished
        self._writer: _ShardWriter | None = None  # the shard of source _next, once it has data

    def add(self, chunk: EncodedChunk) -> None:
        self._finish_until(chunk.source)
        if self._writer is None:
            self._writer = _ShardWriter(self.cache, self.todo[chunk.source])
        self._writer.add(chunk)
        self.tokens += len(chunk.tokens)

    def finish(self) -> None:
        self._finish_until(len(self.todo))

    def _finish_until(self, index: int) -> None:
        """Finish sources before ``index``; one without data (empty, unreadable) gets an empty
        shard."""
        while self._next < index:
            writer = self._writer or _ShardWriter(self.cache, self.todo[self._next])
            self.built[self.todo[self._next].name] = writer.finish()
            self._writer, self._next = None, self._next + 1

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def _build(
    cache: Path,
    meta: dict | None,
    stale: list[_Source] | None,
    sources: list[_Source],
    tokenizer: Tokenizer,
    cleaning: Cleaner | None,
    *,
    workers: int,
    log: ProblemLog,
    progress: bool,
) -> dict:
    """Encode the stale sources (all when ``stale`` is None) and write a new meta.json; a write
    that fails (a full disk) leaves the previous cache as it was."""
    from tqdm import tqdm

    todo = sources if stale is None else stale
    kept = {} if stale is None else {f["source"]: f for f in meta["files"]}
    size = total_size(s.path for s in todo)
    chunk_bytes = chunk_size_for(size, workers)
    items = (
        (i, chunk) for i, s in enumerate(todo) for chunk in file_chunks(s.path, log, chunk_bytes)
    )
    builder, start = _Builder(cache, todo), time.perf_counter()
    try:
        with (
            WorkerPool(workers if todo else 1, _init_encoder, (tokenizer, cleaning)) as pool,
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                desc="pretokenize",
                disable=not progress,
                dynamic_ncols=True,
            ) as bar,
        ):
            for chunk in pool.map(_encode_chunk, items):
                log.extend(chunk.problems)
                builder.add(chunk)
                bar.update(chunk.raw_bytes)
                rate = builder.tokens / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        builder.finish()
        files = [builder.built.get(s.name) or kept[s.name] for s in sources]
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": _tokenizer_record(tokenizer),
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "cleaning": _cleaning_record(cleaning),
            "files": files,
        }
        log.close()
        _write_meta(cache, meta)
    except BaseException as err:
        builder.abort()
        log.abort()
        if isinstance(err, OSError):
            raise write_error(cache, err, "the token cache ") from err
        raise
    _remove_unused_shards(cache, files)
    if progress:
        _report_build(todo, builder.built, cache, time.perf_counter() - start)
    return meta


def _write_meta(cache: Path, meta: dict) -> None:
    atomic_write_bytes(cache / META, (json.dumps(meta, indent=1) + "\n").encode())


def _tokenizer_record(tokenizer: Tokenizer) -> dict:
    return {
        "path": str(tokenizer.path.resolve()),
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "unk_id": tokenizer.unk_id,
        "pad_id": tokenizer.pad_id,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


def _remove_unused_shards(cache: Path, files: list[dict]) -> None:
    used = {f["shard"] for f in files}
    for path in cache.iterdir():
        if path.suffix in (".tokens", ".docs") and path.stem not in used:
            path.unlink(missing_ok=True)


def _report_build(todo: list[_Source], built: dict[str, dict], cache: Path, seconds: float) -> None:
    tokens = sum(e["tokens"] for e in built.values())
    mb = sum(e["bytes"] for e in built.values()) / 1e6
    print(
        f"encoded {len(todo)} file(s): {mb:.1f} MB of text → {tokens:,} tokens in {seconds:.1f} s "
        f"({mb / max(seconds, 1e-9):.2f} MB/s) → {cache}",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------ opening


def _current(
    cache: Path, sources: list[_Source], tokenizer: Tokenizer, cleaning: Cleaner | None
) -> dict | None:
    """The cache's meta if it is current (its recorded mtimes refreshed where only they changed)."""
    meta = _read_meta(cache)
    before = json.dumps(meta)
    if not _is_current(meta, _stale(meta, sources, cache, tokenizer, cleaning), sources):
        return None
    if json.dumps(meta) != before and _writable(cache):
        _write_meta(cache, meta)
    return meta


def open_token_corpus(
    corpus: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    flag: str = "--corpus",
    strict: bool = False,
    log: ProblemLog | None = None,
    rebuild: bool = False,
) -> TokenCorpus:
    """The token corpus of ``corpus`` (a split directory such as ``pretrain_data/train``, or a
    corpus file or directory, see :mod:`llama3.data.sources`), built or refreshed as needed."""
    corpus = Path(corpus)
    sources = _sources(find_corpus_files(corpus, flag), corpus)
    cleaning = encoding_cleaning(corpus, tokenizer)
    if cache_dir is not None:
        candidates = [_keyed_cache_dir(Path(cache_dir), corpus, tokenizer.sha256)]
    else:
        candidates = [
            default_cache_dir(corpus, tokenizer.sha256),
            _keyed_cache_dir(user_cache_root(), corpus, tokenizer.sha256),
        ]
    for cache in candidates if not rebuild else []:  # a current cache serves even if read-only
        meta = _current(cache, sources, tokenizer, cleaning)
        if meta is not None:
            return _checked(TokenCorpus(cache, meta, corpus), flag)
    cache = next((c for c in candidates if _writable(c)), None)
    if cache is None:
        where = (
            f"--cache_dir {cache_dir}"
            if cache_dir
            else f"{candidates[0].parent} or {candidates[1]}"
        )
        raise UsageError(
            f"cannot write the token cache of {corpus} to {where}: pass a writable --cache_dir"
        )
    if cache != candidates[0]:
        print(
            f"note: {candidates[0].parent} is not writable; caching tokens in {cache}",
            file=sys.stderr,
        )
    log = log or ProblemLog(strict=strict)
    log.report = cache / f"tokens{REPORT_SUFFIX}"
    with locked(cache / LOCK):
        meta = _read_meta(cache)
        stale = None if rebuild else _stale(meta, sources, cache, tokenizer, cleaning)
        if rebuild or not _is_current(meta, stale, sources):
            if cleaning is not None:
                tokenizer.note_cleaning()
                print(
                    f"note: {flag} {corpus} is encoded with the cleaning of the tokenizer's "
                    f"training text ({cleaning.describe()})",
                    file=sys.stderr,
                )
            meta = _build(
                cache,
                meta,
                stale,
                sources,
                tokenizer,
                cleaning,
                workers=workers or _auto_workers(sources if stale is None else stale),
                log=log,
                progress=progress,
            )
            if log.total:
                print(log.summary(), file=sys.stderr)
    return _checked(TokenCorpus(cache, meta, corpus), flag)


def _auto_workers(todo: list[_Source]) -> int:
    """Every core, but no more workers than there are MIN_BYTES_PER_WORKER of input: starting a
    worker costs more than encoding a small corpus."""
    return max(1, min(available_cpus(), total_size(s.path for s in todo) // MIN_BYTES_PER_WORKER))


def _checked(corpus: TokenCorpus, flag: str) -> TokenCorpus:
    if corpus.n_documents == 0:
        raise UsageError(f"{flag} {corpus.path}: no documents with text")
    warning = unknown_share_warning(f"{flag} {corpus.path}", corpus.n_unknown, corpus.n_tokens)
    if warning:
        print(warning, file=sys.stderr)
    return corpus
