"""SentencePiece BPE tokenizer: training (:func:`train_tokenizer`, ``python -m llama3
train_tokenizer``) and the :class:`Tokenizer` every other command uses.

Special ids are fixed: unk 0, pad 1, bos 2, eos 3. The most frequent words of the corpus become
user-defined symbols (whole-word pieces "▁word" that BPE never splits); we count them over a
sample of every file of the corpus, proportional to file size.

Training is deterministic: sentences (the non-empty lines of each document, lines longer than
``max_sentence_length`` bytes split at spaces) are drawn by reservoir sampling with a seeded
generator — SentencePiece's own sampling is not reproducible — and SentencePiece runs on one
thread, so the same corpus, flags and seed give a byte-identical ``.model`` on any machine.

Beside ``NAME.model``, training writes ``NAME.cleaning.json``: the cleaning steps its training text
went through (from the corpus's ``preprocess.json``; none when the corpus was not written by
``preprocess``), bound to the model by its sha256. :class:`Tokenizer` reads it, and every command
that encodes text for a trained model — prompts, evaluation corpora, the Hugging Face tokenizer,
lm-eval's requests — cleans that text the same way (:meth:`Tokenizer.clean`). A model without the
record (written before it existed) is assumed to have seen ``preprocess``'s default cleaning, and
a note says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from llama3.data.clean import Cleaner
from llama3.data.sources import ProblemLog, file_chunks, find_corpus_files, parse_lines, total_size
from llama3.errors import ConfigError, UsageError
from llama3.fileio import atomic_write_bytes, check_output_file, write_json

UNK_ID, PAD_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WORD_BOUNDARY = "\u2581"  # "▁", SentencePiece's marker for a preceding space
_WORD = re.compile(r"[^\W\d_]{2,}")
CLEANING_SUFFIX = ".cleaning.json"
CLEANING_FORMAT = "llama3-tokenizer-cleaning"
UNKNOWN_WARNING_SHARE = 0.01  # above this share of <unk> ids, text is said to be mostly unseen


def cleaning_record_path(model_file: str | os.PathLike) -> Path:
    """``NAME.cleaning.json`` beside ``NAME.model``."""
    return Path(model_file).with_suffix(CLEANING_SUFFIX)


def write_cleaning_record(model_file: str | os.PathLike, cleaner: Cleaner, source: str) -> Path:
    """Record the cleaning the tokenizer's training text went through (``source`` says where
    that is known from), bound to the model file by its sha256."""
    from llama3.fileio import file_sha256

    return write_json(
        cleaning_record_path(model_file),
        {
            "format": CLEANING_FORMAT,
            "version": 1,
            "tokenizer_sha256": file_sha256(model_file),
            "cleaning": cleaner.to_dict(),
            "source": source,
        },
    )


def read_cleaning_record(model_file: Path, sha256: str) -> tuple[Cleaner, str | None]:
    """The cleaning recorded beside ``model_file`` (whose content hash is ``sha256``), and a note
    when there is no record and preprocess's default cleaning is assumed."""
    path = cleaning_record_path(model_file)
    if not path.exists():
        return Cleaner(), (
            f"{model_file} has no cleaning record ({path.name}, written by "
            "train_tokenizer): assuming its training text was cleaned as preprocess "
            f"does by default ({Cleaner().describe()}), and cleaning text so"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        cleaner = Cleaner.from_dict(record["cleaning"])
        recorded_sha = record["tokenizer_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(
            f"{path}: not a readable cleaning record ({err}); delete it to assume "
            "preprocess's default cleaning"
        ) from err
    if record.get("format") != CLEANING_FORMAT or recorded_sha != sha256:
        raise UsageError(
            f"{path} does not belong to {model_file} (it describes another "
            "tokenizer): delete it, or put the right one beside the model"
        )
    return cleaner, None


def unknown_share_warning(what: str, unknown: int, total: int) -> str | None:
    """A warning when more than UNKNOWN_WARNING_SHARE of ``total`` ids are <unk>."""
    if total == 0 or unknown / total <= UNKNOWN_WARNING_SHARE:
        return None
    return (
        f"warning: {what}: {unknown:,} of {total:,} tokens ({unknown / total:.1%}) are <unk>, "
        "characters the tokenizer never saw in training; the model reads them as one unknown "
        "symbol (is this text cleaned as the training text was?)"
    )


def _sentencepiece():
    import sentencepiece

    return sentencepiece


class Tokenizer:
    """A loaded SentencePiece model. Pickles by path, so worker processes can receive it."""

    def __init__(
        self, model_file: str | os.PathLike, *, num_threads: int = 1, flag: str = "--tokenizer"
    ):
        self.path = Path(model_file)
        self.num_threads = num_threads  # for encode_batch
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise UsageError(
                f"{flag} {self.path}: cannot read the tokenizer "
                f"({err.strerror or err}); train one with "
                "'python -m llama3 train_tokenizer'"
            ) from err
        if not data:
            raise UsageError(
                f"{flag} {self.path}: the file is empty, not a SentencePiece model; "
                "train one with 'python -m llama3 train_tokenizer'"
            )
        try:
            self._sp = _sentencepiece().SentencePieceProcessor(model_proto=data)
        except Exception as err:  # sentencepiece raises RuntimeError or OSError on a bad proto
            raise UsageError(f"{flag} {self.path}: not a SentencePiece model ({err})") from err
        if self._sp.vocab_size() == 0:
            raise UsageError(f"{flag} {self.path}: not a SentencePiece model (no pieces)")
        self._sha256 = hashlib.sha256(data).hexdigest()
        self.flag = flag  # the flag that named the file, for error messages
        # the cleaning of the training text, and a note when it is assumed (no record)
        self.cleaner, self.cleaning_note = read_cleaning_record(self.path, self._sha256)
        self.vocab_size: int = self._sp.vocab_size()
        self.unk_id: int = self._sp.unk_id()
        self.pad_id: int = self._sp.pad_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self._token_bytes: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {
            "path": self.path,
            "num_threads": self.num_threads,
            "flag": self.flag,
            "sha256": self._sha256,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], num_threads=state["num_threads"], flag=state["flag"])
        if self._sha256 != state["sha256"]:
            raise UsageError(f"{state['flag']} {self.path} changed while in use")

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def sha256(self) -> str:
        """Content hash of the model file (as loaded)."""
        return self._sha256

    @property
    def padding_id(self) -> int:
        """The id padded positions hold: the pad id, or end-of-sequence if the model has none."""
        return self.pad_id if self.pad_id >= 0 else self.eos_id

    def clean(self, text: str) -> str:
        """``text`` cleaned as the training text was (see the module docstring)."""
        return self.cleaner(text)

    def note_cleaning(self) -> None:
        """Say, once, that the cleaning is assumed (a tokenizer without a cleaning record)."""
        if self.cleaning_note:
            print(f"note: {self.cleaning_note}", file=sys.stderr)
            self.cleaning_note = None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: list[str], *, bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        return self._sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token adds to decoded text: (vocab_size,) int64. Control and unknown
        tokens count 0, byte-fallback tokens 1, "▁" counts as the space it decodes to."""
        if self._token_bytes is None:
            sp = self._sp
            sizes = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(self.vocab_size):
                if sp.is_control(i) or sp.is_unknown(i):
                    continue
                sizes[i] = (
                    1
                    if sp.is_byte(i)
                    else len(sp.id_to_piece(i).replace(WORD_BOUNDARY, " ").encode("utf-8"))
                )
            self._token_bytes = sizes
        return self._token_bytes


def check_tokenizer(tokenizer: Tokenizer, recorded: dict[str, str] | None, vocab_size: int) -> None:
    """Refuse a tokenizer that is not the one a checkpoint recorded (``recorded``: its path and
    sha256, None if it recorded none) or whose ids do not fit the model's ``vocab_size``."""
    expected = (recorded or {}).get("sha256")
    if expected and tokenizer.sha256 != expected:
        raise UsageError(
            f"{tokenizer.flag} {tokenizer.path} is not the tokenizer this checkpoint "
            f"was trained with ({recorded.get('path')}); pass that one"
        )
    if tokenizer.vocab_size > vocab_size:
        raise UsageError(
            f"{tokenizer.flag} {tokenizer.path} has {tokenizer.vocab_size} tokens but "
            f"the model only {vocab_size}: pass the tokenizer the model was trained "
            "with"
        )


def load_tokenizer(
    path: str | os.PathLike, recorded: dict[str, str] | None, vocab_size: int
) -> Tokenizer:
    """``--tokenizer`` for a trained model, checked by :func:`check_tokenizer`."""
    tokenizer = Tokenizer(path)  # first: its error names a missing or unreadable file
    check_tokenizer(tokenizer, recorded, vocab_size)
    return tokenizer


# ------------------------------------------------------------------------------------ training


def split_long_line(line: str, max_bytes: int) -> Iterator[str]:
    """``line`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut at spaces where possible and
    never inside a character (SentencePiece would skip longer sentences entirely)."""
    data = line.encode("utf-8")
    if len(data) <= max_bytes:
        yield line
        return
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        if end < len(data):
            space = data.rfind(b" ", start + 1, end + 1)
            if space > start:
                end = space
            else:
                while end > start + 1 and data[end] & 0xC0 == 0x80:  # continuation byte
                    end -= 1
        piece = data[start:end].decode("utf-8").strip()
        if piece:
            yield piece
        start = end


def _sentences(text: str, max_bytes: int) -> Iterator[str]:
    for line in text.split("\n"):
        line = line.strip()
        if line:
            yield from split_long_line(line, max_bytes)


class _Reservoir:
    """A uniform sample of ``size`` items from a stream (all of them if fewer), seeded."""

    def __init__(self, size: int, seed: int):
        self.size, self.rng = size, random.Random(seed)
        self.items: list[str] = []
        self.seen = 0

    def add(self, item: str) -> None:
        self.seen += 1
        if self.size <= 0 or len(self.items) < self.size:
            self.items.append(item)
            return
        j = self.rng.randrange(self.seen)
        if j < self.size:
            self.items[j] = item


def _read_corpus(
    files: list[Path],
    *,
    input_sentence_size: int,
    max_sentence_length: int,
    seed: int,
    word_sample_bytes: int,
    log: ProblemLog,
    progress: bool,
) -> tuple[_Reservoir, Counter[str]]:
    """One pass over the corpus: the sentence sample, and word counts over the first
    ``word_sample_bytes × (file size / corpus size)`` characters of every file."""
    from tqdm import tqdm

    reservoir, words = _Reservoir(input_sentence_size, seed), Counter()
    total = total_size(files)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="reading corpus",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for path in files:
            budget = word_sample_bytes * total_size([path]) / max(total, 1)
            counted = 0
            for chunk in file_chunks(path, log):
                texts, problems = parse_lines(chunk)
                log.extend(problems)
                for text in texts:
                    if counted <= budget:
                        words.update(_WORD.findall(text))
                        counted += len(text)
                    for sentence in _sentences(text, max_sentence_length):
                        reservoir.add(sentence)
                bar.update(chunk.raw_bytes)
                bar.set_postfix_str(f"{reservoir.seen} sentences", refresh=False)
    return reservoir, words


def most_frequent(words: Counter[str], n: int) -> list[str]:
    """The ``n`` most frequent words, ties broken alphabetically (deterministic)."""
    ranked = sorted(words.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:n]]


def train_tokenizer(
    corpus: str | os.PathLike | Sequence[str | os.PathLike],
    model_file: str | os.PathLike,
    vocab_size: int,
    *,
    input_sentence_size: int = 1_000_000,
    n_most_frequent_words: int = 100,
    max_sentence_length: int = 4192,
    seed: int = 0,
    byte_fallback: bool = False,
    character_coverage: float = 0.9995,
    word_sample_mb: float = 64.0,
    log: ProblemLog | None = None,
    progress: bool = True,
    verbose: bool = False,
    flag: str = "--train_corpus",
) -> Path:
    """Train a BPE model on ``corpus`` (files or directories) and write it atomically to
    ``model_file``, with a readable ``.vocab`` and the cleaning record beside it. Returns the
    model path. ``flag`` names the corpus in messages; a setting out of range raises
    :class:`ConfigError` naming it."""
    _check_settings(vocab_size, n_most_frequent_words, max_sentence_length)
    model_file = check_output_file(model_file, "model_file")
    files = find_corpus_files(corpus, flag)
    cleaner, source = _training_text_cleaning(corpus, flag)
    log = log or ProblemLog()
    try:
        reservoir, words = _read_corpus(
            files,
            input_sentence_size=input_sentence_size,
            max_sentence_length=max_sentence_length,
            seed=seed,
            word_sample_bytes=int(word_sample_mb * 2**20),
            log=log,
            progress=progress,
        )
    except BaseException:
        log.abort()
        raise
    log.close()
    if not reservoir.items:
        raise UsageError(f"{flag} {corpus}: no text to train on ({log.summary()})")
    symbols = [WORD_BOUNDARY + w for w in most_frequent(words, n_most_frequent_words)]
    if progress:
        print(
            f"training BPE: vocab {vocab_size}, {len(reservoir.items)} of {reservoir.seen} "
            f"sentences, {len(symbols)} word symbols",
            file=sys.stderr,
        )
    start = time.perf_counter()
    proto = _train_proto(
        reservoir.items,
        vocab_size=vocab_size,
        symbols=symbols,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_length,
        verbose=verbose,
        corpus=f"{flag} {corpus}",
    )
    atomic_write_bytes(model_file, proto)
    _write_vocab(model_file)
    write_cleaning_record(model_file, cleaner, source)
    if progress:
        print(f"trained in {time.perf_counter() - start:.1f} s → {model_file}", file=sys.stderr)
    return model_file


def _training_text_cleaning(
    corpus: str | os.PathLike | Sequence[str | os.PathLike], flag: str
) -> tuple[Cleaner, str]:
    """The cleaning the corpus went through, from the ``preprocess.json`` of each path, and where
    that comes from; no cleaning when none of them was written by preprocess. Paths cleaned
    differently are refused: a tokenizer records one cleaning."""
    from llama3.data.preprocess import MANIFEST, corpus_cleaning

    paths = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    found = {str(path): corpus_cleaning(path) for path in paths}
    kinds = set(found.values())
    if len(kinds) > 1:
        described = "; ".join(
            f"{path}: {c.describe() if c else 'not written by preprocess'}"
            for path, c in found.items()
        )
        raise UsageError(
            f"{flag}: these corpora were cleaned differently ({described}); train "
            "on corpora cleaned alike"
        )
    cleaner = kinds.pop()
    if cleaner is None:
        return Cleaner.none(), f"no {MANIFEST} describes the corpus: its text as given"
    return cleaner, f"the {MANIFEST} of the corpus"


def _check_settings(vocab_size: int, n_words: int, max_sentence_length: int) -> None:
    if vocab_size < 8:
        raise ConfigError("{vocab_size} {}: too small", vocab_size)
    if not 0 <= n_words < vocab_size // 2:
        raise ConfigError(
            "{n_most_frequent_words} {}: must be between 0 and half of {vocab_size} ({})",
            n_words,
            vocab_size // 2,
        )
    if max_sentence_length < 16:
        raise ConfigError("{max_sentence_length} {}: too small (bytes)", max_sentence_length)


def _train_proto(
    sentences: list[str],
    *,
    vocab_size: int,
    symbols: list[str],
    byte_fallback: bool,
    character_coverage: float,
    max_sentence_length: int,
    verbose: bool,
    corpus: str,
) -> bytes:
    sp = _sentencepiece()
    buffer = io.BytesIO()
    try:
        sp.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            unk_id=UNK_ID,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=symbols,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as err:
        raise UsageError(
            f"SentencePiece cannot train on {corpus}: {err} (a smaller "
            "--vocab_size or a larger corpus may help)"
        ) from err
    return buffer.getvalue()


def _write_vocab(model_file: Path) -> None:
    """``piece<TAB>score`` per line, for reading the vocabulary."""
    sp = _sentencepiece().SentencePieceProcessor(model_file=str(model_file))
    lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size())]
    atomic_write_bytes(model_file.with_suffix(".vocab"), "".join(lines).encode("utf-8"))
