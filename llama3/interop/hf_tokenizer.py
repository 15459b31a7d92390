"""Our SentencePiece BPE model → a ``tokenizer.json`` (the tokenizers library) that encodes raw text
to the ids our pipeline gives the same text after cleaning.

The normalizer runs the training text's cleaning (:class:`llama3.data.clean.Cleaner`: NFKD, ASCII,
lowercase, empty brackets dropped — each step as the preprocessing used it), then SentencePiece's
own normalisation (its compiled character map, which turns newlines into spaces, and the removal
of extra spaces). The pre-tokenizer splits at spaces with SentencePiece's dummy prefix ("▁" before
the text) and isolates the user-defined whole-word pieces, which SentencePiece emits whole wherever
they occur; the model is BPE with SentencePiece's merge order (by piece score) and runs of unknown
characters fused into one unknown id, as SentencePiece does. A special token written in raw text
("<unk>", "</s>") is text, as SentencePiece reads it: tokenizer.json lists no added tokens, and
tokenizer_config.json sets ``split_special_tokens`` for transformers, which adds the special tokens
itself. The start token put before every text is declared the beginning-of-sequence token
(``bos_token``, ``add_bos_token``), so that tools which add or strip that token do as we do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama3.data.clean import Cleaner
from llama3.errors import UsageError

if TYPE_CHECKING:
    from llama3.data.tokenizer import Tokenizer

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
SPECIAL_KINDS = ("bos", "eos", "unk", "pad")
BPE_MODEL = 2
WORD_BOUNDARY = "\u2581"
# Python's \s for str (what the cleaning's bracket pattern matches), as an explicit class
_PY_SPACE = (
    "[" + "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x110000)) if c.isspace()) + "]"
)


def read_proto(path: str | Path) -> Any:
    """The SentencePiece ModelProto of ``path`` (UsageError if it is not one)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except OSError as err:
        raise UsageError(f"--tokenizer {path}: cannot read it ({err.strerror or err})") from err
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UsageError(f"--tokenizer {path}: not a SentencePiece model ({err})") from err
    if not proto.pieces:
        raise UsageError(f"--tokenizer {path}: not a SentencePiece model (no pieces)")
    return proto


def check_convertible(proto: Any, path: str | Path) -> None:
    """UsageError naming the SentencePiece setting that tokenizer.json cannot reproduce."""
    spec, normalizer = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != BPE_MODEL:
        problems.append(f"model_type {spec.model_type} (only BPE, 2, converts)")
    if spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix true")
    if not normalizer.escape_whitespaces:
        problems.append("escape_whitespaces false")
    if problems:
        raise UsageError(
            f"--tokenizer {path}: cannot be expressed as tokenizer.json: " + "; ".join(problems)
        )


def cleaning_normalizers(cleaner: Cleaner) -> list:
    """The steps of ``cleaner`` as tokenizers normalizers, in its order."""
    from tokenizers import Regex, normalizers

    steps = []
    if cleaner.nfkd:
        steps.append(normalizers.NFKD())
    if cleaner.ascii:
        steps.append(normalizers.Replace(Regex(r"[^\x00-\x7F]"), ""))
    if cleaner.lowercase:
        steps.append(normalizers.Lowercase())
    if cleaner.drop_empty_brackets:
        space = _PY_SPACE
        steps.append(normalizers.Replace(Regex(rf"\({space}*\)|\[{space}*\]|\{{{space}*\}}"), ""))
    return steps


def bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, ranked as SentencePiece merges:
    by the merged piece's score (higher first), then its id."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def special_ids(tokenizer: Tokenizer, start: str | None) -> dict[str, int]:
    """The ids to declare as ``bos``, ``eos``, ``unk`` and ``pad`` (those SentencePiece has):
    ``bos`` is the start token put before every text (``start``: "eos" or "bos"; None: none is,
    and SentencePiece's own is declared)."""
    ids = {kind: getattr(tokenizer, f"{kind}_id") for kind in SPECIAL_KINDS}
    if start is not None:
        ids["bos"] = getattr(tokenizer, f"{start}_id")
        if ids["bos"] < 0:
            raise UsageError(f"--start_token {start}: {tokenizer.path} has no {start} token")
    return {kind: i for kind, i in ids.items() if i >= 0}  # ids SentencePiece lacks are -1


def bpe_model(proto: Any, *, ignore_merges: bool) -> Any:
    """SentencePiece's BPE as a tokenizers model; with ``ignore_merges`` a word that is a piece is
    emitted as is, which is how user-defined pieces come out whole."""
    from tokenizers.models import BPE

    spec = proto.trainer_spec
    return BPE(
        vocab={p.piece: i for i, p in enumerate(proto.pieces)},
        merges=bpe_merges(proto),
        unk_token=spec.unk_piece,
        fuse_unk=True,
        byte_fallback=spec.byte_fallback,
        ignore_merges=ignore_merges,
    )


def special_text_split(proto: Any) -> str | None:
    """A pattern that splits a word spelling a special piece ("<unk>", "</s>", "<0x41>") where
    SentencePiece's first token of that text ends. Such a word follows a user-defined piece
    ("the<unk>"), and BPE with ignore_merges would emit it whole as the special id; the rest gets
    BPE of its own, as in SentencePiece, whose merges do not cross that point."""
    model, branches = bpe_model(proto, ignore_merges=False), []
    for piece in (p.piece for p in proto.pieces if p.type not in (NORMAL, USER_DEFINED)):
        char_at = {len(piece[:i].encode()): i for i in range(1, len(piece))}  # byte offset → char
        cut = next(
            (char_at[t.offsets[1]] for t in model.tokenize(piece) if t.offsets[1] in char_at), None
        )
        if cut is not None:
            branches.append(f"{re.escape(piece[:cut])}(?={re.escape(piece[cut:])}\\z)")
    return rf"\A(?:{'|'.join(branches)})" if branches else None


def build_tokenizer(path: str | Path, cleaner: Cleaner) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model at ``path`` on raw text."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    proto = read_proto(path)
    check_convertible(proto, path)
    pieces, spec, normalizer = proto.pieces, proto.trainer_spec, proto.normalizer_spec
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    tokenizer = Tokenizer(bpe_model(proto, ignore_merges=True))
    steps = cleaning_normalizers(cleaner)
    if normalizer.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer.precompiled_charsmap))
    if normalizer.remove_extra_whitespaces:
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    tokenizer.normalizer = normalizers.Sequence(steps)
    prepend = "always" if normalizer.add_dummy_prefix else "never"
    splits = [pre_tokenizers.Metaspace(replacement=WORD_BOUNDARY, prepend_scheme=prepend)]
    if user_defined:
        longest_first = sorted(user_defined, key=len, reverse=True)
        pattern = "|".join(re.escape(piece) for piece in longest_first)
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if (special_split := special_text_split(proto)) is not None:
        splits.append(pre_tokenizers.Split(Regex(special_split), behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(spec.unk_piece, spec.unk_surface),  # " ⁇ ", as SentencePiece writes it
            decoders.Metaspace(replacement=WORD_BOUNDARY, prepend_scheme=prepend),
            *([decoders.ByteFallback(), decoders.Fuse()] if spec.byte_fallback else []),
        ]
    )
    return tokenizer


def save_tokenizer(
    directory: Path, model_file: str | Path, cleaner: Cleaner, start: str | None, context: int
) -> None:
    """tokenizer.json and tokenizer_config.json in ``directory``. ``start`` ("eos", "bos" or None)
    is the token put before every text, as our generate command does."""
    from tokenizers.processors import TemplateProcessing

    from llama3.data.tokenizer import Tokenizer
    from llama3.fileio import write_json

    ours = Tokenizer(model_file)
    ids = special_ids(ours, start)
    tokenizer = build_tokenizer(model_file, cleaner)
    if start is not None:  # the template transformers builds from add_bos_token
        piece = ours.piece(ids["bos"])
        tokenizer.post_processor = TemplateProcessing(
            single=f"{piece}:0 $A:0",
            pair=f"{piece}:0 $A:0 {piece}:1 $B:1",
            special_tokens=[(piece, ids["bos"])],
        )
    # what tokenizer.save writes, written here so that a failed write is an OSError
    (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{f"{kind}_token": ours.piece(i) for kind, i in ids.items()},
            "add_bos_token": start is not None,
            "add_eos_token": False,
            "split_special_tokens": True,
            "model_max_length": context,
            "clean_up_tokenization_spaces": False,
        },
    )
