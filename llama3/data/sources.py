"""Reading corpora (files, or directories of them), in the formats public corpora ship in:

- JSON lines, one object with a string ``"text"`` per line: ``.jsonl``, zstd-compressed
  ``.jsonl.zst`` (The Pile, SlimPajama) and gzip-compressed ``.jsonl.gz``/``.json.gz`` (Dolma);
- parquet files with a string ``text`` column (FineWeb, FineWeb-Edu); other columns are not read.

Everything streams in constant memory. Files are read in pieces (:class:`Chunk`: blocks of whole
lines, or batches of a parquet file's rows, a row group at most) so that parsing can run in worker
processes; :func:`parse_lines` turns a chunk into texts. Bad input never crashes a run and never
passes silently: each case is a :class:`Problem` with a reason, file and line (a parquet file's
row), collected by a :class:`ProblemLog` that counts them, shows the first few bad lines and every
file-level fault (a truncated stream, a parquet file without a string ``text`` column, an
unreadable or empty file), lists them all in a report file beside the command's output and, when
strict, stops at the first.

A directory that ``preprocess`` is writing, or stopped writing before the end, holds a marker file
(:data:`INCOMPLETE`); it is refused as a corpus until a run of ``preprocess`` completes.

``zstandard`` and ``pyarrow`` (the ``parquet`` extra) are imported only when a file that needs them
is actually read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from llama3.errors import UsageError
from llama3.fileio import remove, staged_file, staging_path

if TYPE_CHECKING:
    import pyarrow.parquet

SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.gz", ".parquet")
FORMATS = (
    ", ".join(SUFFIXES[:-1]) + " or " + SUFFIXES[-1]
)  # for messages: ".jsonl, ... or .parquet"
DEFAULT_CHUNK_BYTES = 4 << 20
INCOMPLETE = ".preprocess-incomplete"  # in a split directory until preprocess has finished it
REPORT_SUFFIX = ".bad_input.tsv"  # every bad input of a run, one per line, beside its output

# reason → what it means (shown in summaries)
REASONS: dict[str, str] = {
    "unreadable": "file cannot be opened or read",
    "empty_file": "file holds no data",
    "truncated_zst": "zstd stream ends mid-frame (download or copy cut short)",
    "corrupt_zst": "zstd stream cannot be decoded",
    "truncated_gzip": "gzip stream ends before its end marker (download or copy cut short)",
    "corrupt_gzip": "gzip stream cannot be decoded",
    "corrupt_parquet": "parquet file cannot be decoded (truncated, damaged, or not parquet)",
    "missing_text_column": 'file has no "text" column',
    "text_column_type": '"text" column does not hold strings',
    "invalid_utf8": "line is not valid UTF-8",
    "malformed_json": "line is not valid JSON",
    "not_an_object": "JSON value is not an object",
    "missing_text": 'object has no "text" field',
    "text_not_string": '"text" is not a string',
    "lone_surrogate": '"text" holds an unpaired UTF-16 surrogate escape',
}


class BadInputError(UsageError):
    """Raised on the first bad input when running with ``--strict``."""


class Problem(NamedTuple):
    reason: str  # a key of REASONS
    path: str
    line: int  # 1-based line, or row of a parquet file; 0 when the whole file is concerned
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        detail = f" ({self.detail})" if self.detail else ""
        return f"{where}: {REASONS[self.reason]}{detail}"


FILE_LEVEL = frozenset(
    {
        "unreadable",
        "empty_file",
        "truncated_zst",
        "corrupt_zst",
        "truncated_gzip",
        "corrupt_gzip",
        "corrupt_parquet",
        "missing_text_column",
        "text_column_type",
    }
)


class ProblemLog:
    """Counts bad input by reason, shows the first ``max_reports`` bad lines and every file-level
    fault, raises at the first if strict, and lists every problem (file, line, reason, detail;
    tab-separated) in ``report``, which :meth:`close` publishes (or removes when there were none,
    so it never describes an earlier run) and :meth:`abort` drops."""

    def __init__(
        self,
        strict: bool = False,
        max_reports: int = 5,
        stream: IO[str] | None = None,
        report: str | os.PathLike | None = None,
    ):
        self.strict = strict
        self.max_reports = max_reports
        self.stream = stream
        self.report = Path(report) if report is not None else None
        self.counts: Counter[str] = Counter()
        self.first: list[Problem] = []  # the problems shown
        self._lines_shown = 0
        self._writing: contextlib.ExitStack | None = None
        self._file: IO[str] | None = None

    def add(self, problem: Problem) -> None:
        self.counts[problem.reason] += 1
        if self.strict:
            raise BadInputError(f"{problem} [--strict stops at the first bad input]")
        self._record(problem)
        file_level = problem.reason in FILE_LEVEL
        if file_level or self._lines_shown < self.max_reports:
            self._lines_shown += not file_level
            self.first.append(problem)
            _write_line(f"warning: {problem}", self.stream)

    def extend(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            self.add(problem)

    def _record(self, problem: Problem) -> None:
        if self.report is None:
            return
        if self._file is None:
            self._writing = contextlib.ExitStack()
            tmp = self._writing.enter_context(staged_file(self.report, what="the report "))
            self._file = self._writing.enter_context(open(tmp, "w", encoding="utf-8"))
            self._file.write("file\tline\treason\tdetail\n")
        detail = problem.detail.replace("\t", " ").replace("\n", " ")
        self._file.write(f"{problem.path}\t{problem.line}\t{problem.reason}\t{detail}\n")

    def close(self) -> None:
        """Publish the report (a run that found no bad input removes an older one)."""
        if self._writing is not None:
            self._writing.close()
        elif self.report is not None:
            self.report.unlink(missing_ok=True)
        self._writing = self._file = None

    def abort(self) -> None:
        """Drop the report being written (the run failed)."""
        if self._file is not None:
            self._file.close()
            remove(staging_path(self.report))
        self._writing = self._file = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def breakdown(self) -> str:
        """Counts by reason, e.g. "2 malformed_json, 1 truncated_zst"."""
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))

    def summary(self) -> str:
        if not self.total:
            return "bad input: none"
        parts = self.breakdown
        listed = f"; all listed in {self.report}" if self.report is not None else ""
        return (
            f"bad input skipped: {parts} (the first {self.max_reports} bad lines and every "
            f"file-level fault reported above{listed}; --strict stops at the first)"
        )


def _write_line(text: str, stream: IO[str] | None) -> None:
    """Print without breaking a progress bar."""
    from tqdm import tqdm

    tqdm.write(text, file=stream or sys.stderr)


# --------------------------------------------------------------------------------------- files


def is_zst(path: str | os.PathLike) -> bool:
    return str(path).endswith(".zst")


def is_parquet(path: str | os.PathLike) -> bool:
    return str(path).endswith(".parquet")


def _is_corpus_name(name: str) -> bool:
    return name.endswith(SUFFIXES) and not name.startswith(".")


def find_corpus_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike], flag: str = "--corpus"
) -> list[Path]:
    """The corpus files named by ``paths``: files as given, directories searched recursively for
    files with one of :data:`SUFFIXES` (hidden entries skipped), each directory's files sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        _check_complete(path.parent if path.is_file() else path, flag, path)
        if path.is_dir():
            found = _files_under(path, flag)
            if not found:
                raise UsageError(f"{flag} {path}: no {FORMATS} files in this directory")
            files += found
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise UsageError(f"{flag} {path}: no such file or directory")
    return files


def _check_complete(directory: Path, flag: str, path: Path) -> None:
    if (directory / INCOMPLETE).exists():
        raise UsageError(
            f"{flag} {path}: preprocess did not finish writing {directory} (it was "
            f"stopped or failed, see {INCOMPLETE} there): run it again"
        )


def _files_under(root: Path, flag: str) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        _check_complete(Path(dirpath), flag, root)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, name) for name in filenames if _is_corpus_name(name)]
        # a dangling link or a directory with a corpus name is reported when read, not hidden
        found += [Path(dirpath, d) for d in dirnames if _is_corpus_name(d)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def total_size(files: Iterable[Path]) -> int:
    size = 0
    for path in files:
        try:
            size += path.stat().st_size
        except OSError:
            pass
    return size


# -------------------------------------------------------------------------------------- chunks


class Chunk(NamedTuple):
    """A piece of one file starting at line (or parquet row) ``first_line``, 1-based: ``data`` is
    whole JSON lines, or a parquet file's ``text`` values as UTF-8 bytes (None for a null)."""

    path: str
    first_line: int
    data: bytes | list[bytes | None]
    raw_bytes: int  # bytes of the file (compressed, for .zst/.gz/.parquet) consumed to produce it

    @property
    def next_line(self) -> int:
        """The line (or row) after this chunk's."""
        rows = self.data.count(b"\n") if isinstance(self.data, bytes) else len(self.data)
        return self.first_line + rows


class _StreamError(Exception):
    """A file that cannot be read to its end: ``reason`` is a key of REASONS; ``line`` is 0 when
    nothing of the file can be read, None for the line after the last chunk read."""

    def __init__(self, reason: str, detail: str = "", line: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.line = reason, detail, line


def zstandard_module():
    """The zstandard package, imported on first use (it is optional)."""
    try:
        import zstandard
    except ImportError as err:
        raise UsageError(
            "reading .zst files needs the zstandard package: pip install zstandard "
            "(or decompress first: zstd -d FILE)"
        ) from err
    return zstandard


def pyarrow_module() -> ModuleType:
    """pyarrow with its parquet reader (``pyarrow.parquet``), imported on first use (it is
    optional: the ``parquet`` extra)."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (makes pyarrow.parquet available)
    except ImportError as err:
        raise UsageError(
            "reading .parquet files needs pyarrow: pip install pyarrow (or this "
            "project's extra: pip install -e '.[parquet]')"
        ) from err
    return pyarrow


def _plain_blocks(f: IO[bytes], size: int) -> Iterator[tuple[bytes, int]]:
    while block := f.read(size):
        yield block, len(block)


def _decompressed_blocks(
    f: IO[bytes], size: int, codec: str, decompressor: Callable[[], Any], error: type[Exception]
) -> Iterator[tuple[bytes, int]]:
    """Decompressed blocks of a file of one or more zstd frames or gzip members (``codec``), each
    with the compressed bytes it took. Everything decoded is yielded before a _StreamError for data
    that cannot be decoded, or that stops inside a frame (which stream readers take for the end)."""
    dobj, in_frame = decompressor(), False
    while raw := f.read(max(size // 4, 1 << 16)):
        consumed = len(raw)
        while raw:
            try:
                out = dobj.decompress(raw)
            except error as err:
                raise _StreamError(f"corrupt_{codec}", str(err)) from err
            in_frame = True
            if out:
                yield out, consumed
                consumed = 0
            if dobj.eof:
                raw, dobj, in_frame = dobj.unused_data, decompressor(), False
            else:
                raw = b""
        if consumed:
            yield b"", consumed
    if in_frame:
        raise _StreamError(f"truncated_{codec}", "the incomplete last line is dropped")


def _zst_blocks(f: IO[bytes], size: int) -> Iterator[tuple[bytes, int]]:
    zstandard = zstandard_module()
    dctx = zstandard.ZstdDecompressor()
    return _decompressed_blocks(f, size, "zst", dctx.decompressobj, zstandard.ZstdError)


def _gzip_blocks(f: IO[bytes], size: int) -> Iterator[tuple[bytes, int]]:
    gzip_member = functools.partial(zlib.decompressobj, wbits=16 + zlib.MAX_WBITS)
    return _decompressed_blocks(f, size, "gzip", gzip_member, zlib.error)


def _blocks(path: Path) -> Callable[[IO[bytes], int], Iterator[tuple[bytes, int]]]:
    """The reader of a JSON lines file's (decompressed) blocks, by the file's name."""
    if is_zst(path):
        return _zst_blocks
    if str(path).endswith(".gz"):
        return _gzip_blocks
    return _plain_blocks


def _line_chunks(f: IO[bytes], path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """Chunks of whole JSON lines."""
    name, line, parts, raw_pending = str(path), 1, [], 0
    for block, raw in _blocks(path)(f, chunk_bytes):
        raw_pending += raw
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            parts.append(block)
            continue
        data = b"".join([*parts, block[:cut]]) if parts else block[:cut]
        parts = [block[cut:]] if cut < len(block) else []
        yield Chunk(name, line, data, raw_pending)
        line += data.count(b"\n")
        raw_pending = 0
    rest = b"".join(parts)
    if rest or raw_pending:
        yield Chunk(name, line, rest, raw_pending)


def _parquet_chunks(f: IO[bytes], path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    """Chunks of a parquet file's ``text`` values, in batches of about ``chunk_bytes`` (pyarrow
    decodes a row group at a time, never the whole file)."""
    pa, size = pyarrow_module(), os.fstat(f.fileno()).st_size
    if size == 0:
        return  # an empty file, not a damaged one
    parquet = _open_parquet(pa, f)
    rows, first, consumed = parquet.metadata.num_rows, 1, 0
    try:
        for batch in parquet.iter_batches(_rows_per_batch(parquet, chunk_bytes), columns=["text"]):
            values = batch.column(0).cast(pa.large_binary()).to_pylist()  # parse_lines decodes
            end = size * (first - 1 + len(values)) // rows  # the file's bytes, shared out by rows
            yield Chunk(str(path), first, values, end - consumed)
            first, consumed = first + len(values), end
    except (pa.ArrowException, OSError) as err:
        raise _StreamError("corrupt_parquet", str(err).strip()) from err


def _open_parquet(pa: ModuleType, f: IO[bytes]) -> pyarrow.parquet.ParquetFile:
    """The parquet file, when it has a ``text`` column of strings (or bytes, decoded as UTF-8)."""
    try:
        parquet = pa.parquet.ParquetFile(f, pre_buffer=False)  # pre-buffering keeps all it read
    except (pa.ArrowException, OSError) as err:
        raise _StreamError("corrupt_parquet", str(err).strip(), line=0) from err
    schema, types = parquet.schema_arrow, pa.types
    if "text" not in schema.names:
        raise _StreamError("missing_text_column", "columns: " + ", ".join(schema.names[:5]), line=0)
    kind = schema.field("text").type
    if not (
        types.is_string(kind)
        or types.is_large_string(kind)
        or types.is_binary(kind)
        or types.is_large_binary(kind)
    ):
        raise _StreamError("text_column_type", str(kind), line=0)
    return parquet


def _rows_per_batch(parquet: pyarrow.parquet.ParquetFile, chunk_bytes: int) -> int:
    """Rows that hold about ``chunk_bytes`` uncompressed, by the file's own statistics."""
    meta = parquet.metadata
    data = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return max(1, chunk_bytes * meta.num_rows // max(data, 1))


def file_chunks(
    path: Path, log: ProblemLog, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Chunk]:
    """Chunks of one file: whole JSON lines, or rows of a parquet file; file-level problems go to
    ``log``."""
    name = str(path)
    try:
        f = open(path, "rb")
    except OSError as err:
        log.add(Problem("unreadable", name, 0, err.strerror or type(err).__name__))
        return
    last, empty = None, True
    reader = _parquet_chunks if is_parquet(path) else _line_chunks
    with f:
        try:
            for last in reader(f, path, chunk_bytes):
                empty = empty and not last.data
                yield last
        except (_StreamError, OSError) as err:
            log.add(_stopped(err, name, last))
            return
    if empty:
        log.add(Problem("empty_file", name, 0))


def _stopped(err: _StreamError | OSError, name: str, last: Chunk | None) -> Problem:
    """Why a file could not be read to its end, located at the line (or row) after the last chunk
    read, or at 0 when the whole file is concerned."""
    line = last.next_line if last is not None else 1
    if isinstance(err, OSError):
        return Problem("unreadable", name, line, err.strerror or str(err))
    return Problem(err.reason, name, line if err.line is None else err.line, err.detail)


def corpus_chunks(
    files: Iterable[Path], log: ProblemLog, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Chunk]:
    for path in files:
        yield from file_chunks(path, log, chunk_bytes)


def chunk_size_for(total_bytes: int, workers: int) -> int:
    """Chunks small enough to keep every worker busy until the end (about 16 per worker), large
    enough to amortise handing them to a worker."""
    return max(64 << 10, min(DEFAULT_CHUNK_BYTES, total_bytes // (16 * max(workers, 1))))


# ------------------------------------------------------------------------------------- parsing


def _decode(raw: bytes) -> str | tuple[str, str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return "invalid_utf8", f"byte {err.start}: {raw[err.start : err.start + 1]!r}"


def parse_line(raw: bytes) -> str | tuple[str, str]:
    """The ``"text"`` of one JSON line, or ``(reason, detail)`` when the line is bad."""
    line = _decode(raw)
    if not isinstance(line, str):
        return line
    try:
        record = json.loads(line)
    except ValueError as err:
        return "malformed_json", getattr(
            err, "msg", str(err)
        ) + f" at column {getattr(err, 'colno', '?')}"
    if not isinstance(record, dict):
        return "not_an_object", type(record).__name__
    if "text" not in record:
        return "missing_text", "keys: " + ", ".join(list(record)[:5])
    text = record["text"]
    if not isinstance(text, str):
        return "text_not_string", type(text).__name__
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return "lone_surrogate", f"character {err.start}"
    return text


def parse_value(raw: bytes | None) -> str | tuple[str, str]:
    """The text of one parquet ``text`` value, or ``(reason, detail)`` when it is bad."""
    return ("text_not_string", "null") if raw is None else _decode(raw)


def parse_lines(chunk: Chunk) -> tuple[list[str], list[Problem]]:
    """Texts of a chunk's lines (blank lines skipped) or rows, and the problems found."""
    if isinstance(chunk.data, bytes):
        parsed = (
            parse_line(raw) if raw and not raw.isspace() else None
            for raw in chunk.data.split(b"\n")
        )
    else:
        parsed = map(parse_value, chunk.data)
    texts: list[str] = []
    problems: list[Problem] = []
    for offset, result in enumerate(parsed):
        if isinstance(result, str):
            texts.append(result)
        elif result is not None:
            problems.append(Problem(result[0], chunk.path, chunk.first_line + offset, result[1]))
    return texts, problems


def iter_texts(
    files: Iterable[Path], log: ProblemLog, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[str]:
    """Every text of ``files`` in order, in this process (problems go to ``log``)."""
    for chunk in corpus_chunks(files, log, chunk_bytes):
        texts, problems = parse_lines(chunk)
        log.extend(problems)
        yield from texts
