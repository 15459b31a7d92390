"""Token cache: content, parallel build, reuse and invalidation, read-only fallback, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_support import (
    jsonl_bytes,
    make_texts,
    train_tiny_tokenizer,
    write_corpus,
    write_jsonl,
    write_zst,
)

from llama3.data import tokens as tokens_module
from llama3.data.sources import BadInputError
from llama3.data.tokenizer import Tokenizer
from llama3.data.tokens import default_cache_dir, open_token_corpus, token_dtype
from llama3.errors import UsageError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    write_jsonl(root / "part-00000.jsonl", make_texts(150, seed=20))
    write_zst(root / "part-00001.jsonl.zst", jsonl_bytes(make_texts(120, seed=21)))
    write_jsonl(root / "sub" / "part-00002.jsonl", make_texts(90, seed=22))
    return root


def expected_stream(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    return [t for text in texts for t in tokenizer.encode(text, eos=True)]


def all_texts() -> list[str]:
    return make_texts(150, seed=20) + make_texts(120, seed=21) + make_texts(90, seed=22)


def shard_inodes(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in cache.glob("*.tokens")}


def test_tokens_equal_direct_encoding_across_files(tokenizer, corpus_dir):
    corpus = open_token_corpus(corpus_dir, tokenizer, workers=1, progress=False)
    texts = all_texts()
    stream = expected_stream(tokenizer, texts)
    assert corpus.n_documents == len(texts) and corpus.n_tokens == len(stream)
    assert corpus.n_bytes == sum(len(t.encode()) for t in texts)
    assert corpus.tokens(0, corpus.n_tokens).tolist() == stream
    assert corpus.dtype == np.uint16 and corpus.tokenizer_sha256 == tokenizer.sha256
    first_shard = sum(len(tokenizer.encode(t)) + 1 for t in make_texts(150, seed=20))
    assert (
        corpus.tokens(first_shard - 5, first_shard + 5).tolist()
        == stream[first_shard - 5 : first_shard + 5]
    )
    assert corpus.document(150).tolist() == tokenizer.encode(
        texts[150], eos=True
    )  # 2nd file's first
    assert corpus.document_lengths().sum() == corpus.n_tokens
    assert corpus.cache_dir == default_cache_dir(corpus_dir, tokenizer.sha256)


def test_parallel_build_is_identical(tokenizer, corpus_dir, tmp_path):
    one = open_token_corpus(corpus_dir, tokenizer, workers=1, progress=False)
    two = open_token_corpus(
        corpus_dir, tokenizer, workers=2, progress=False, cache_dir=tmp_path / "cache2"
    )
    assert one.cache_dir != two.cache_dir and one.fingerprint == two.fingerprint
    for name in (p.name for p in one.cache_dir.glob("*.tokens")):
        assert (one.cache_dir / name).read_bytes() == (two.cache_dir / name).read_bytes()


def test_cache_is_reused_touch_tolerated_and_changes_rebuild_only_their_file(tokenizer, corpus_dir):
    first = open_token_corpus(corpus_dir, tokenizer, progress=False)
    inodes = shard_inodes(first.cache_dir)
    assert open_token_corpus(corpus_dir, tokenizer, progress=False).fingerprint == first.fingerprint
    assert shard_inodes(first.cache_dir) == inodes  # reused, not rewritten

    target = corpus_dir / "part-00000.jsonl"
    os.utime(target, ns=(1, 1))  # new mtime, same content: hash says keep
    assert open_token_corpus(corpus_dir, tokenizer, progress=False).fingerprint == first.fingerprint
    assert shard_inodes(first.cache_dir) == inodes

    texts = make_texts(150, seed=20)
    texts[0] = texts[0][::-1]  # same size, different content
    write_jsonl(target, texts)
    os.utime(target, ns=(2, 2))  # size equal, mtime moved: the hash decides
    changed = open_token_corpus(corpus_dir, tokenizer, progress=False)
    assert changed.fingerprint != first.fingerprint
    assert changed.document(0).tolist() == tokenizer.encode(texts[0], eos=True)
    now = shard_inodes(first.cache_dir)
    assert sum(now[n] != inodes[n] for n in inodes) == 1  # only the changed file was re-encoded

    (corpus_dir / "sub" / "part-00002.jsonl").unlink()
    smaller = open_token_corpus(corpus_dir, tokenizer, progress=False)
    assert smaller.n_documents == 270 and len(shard_inodes(first.cache_dir)) == 2


def test_tokenizer_change_builds_a_new_cache(tokenizer, corpus_dir, tmp_path):
    first = open_token_corpus(corpus_dir, tokenizer, progress=False)
    other = Tokenizer(train_tiny_tokenizer(tmp_path / "other", vocab_size=300))
    second = open_token_corpus(corpus_dir, other, progress=False)
    assert second.cache_dir != first.cache_dir and second.fingerprint != first.fingerprint
    assert second.tokenizer_sha256 == other.sha256 and second.vocab_size == 300
    assert second.document(0).tolist() == other.encode(make_texts(150, seed=20)[0], eos=True)
    # a model file replaced in place (same path) has a new hash, so it is detected too
    meta = json.loads((first.cache_dir / "meta.json").read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    (first.cache_dir / "meta.json").write_text(json.dumps(meta))
    rebuilt = open_token_corpus(corpus_dir, tokenizer, progress=False)
    meta = json.loads((rebuilt.cache_dir / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == tokenizer.sha256


def test_read_only_corpus_folder_falls_back_to_user_cache(
    tokenizer, corpus_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = default_cache_dir(corpus_dir, tokenizer.sha256)
    real = tokens_module._writable
    monkeypatch.setattr(
        tokens_module, "_writable", lambda d: not d.is_relative_to(corpus_dir) and real(d)
    )
    corpus = open_token_corpus(corpus_dir, tokenizer, progress=False)
    assert corpus.cache_dir.is_relative_to(tmp_path / "xdg") and not default.exists()
    assert "not writable; caching tokens in" in capsys.readouterr().err
    again = open_token_corpus(corpus_dir, tokenizer, progress=False)
    assert again.cache_dir == corpus.cache_dir


def test_current_cache_in_read_only_place_is_used(tokenizer, corpus_dir, monkeypatch):
    built = open_token_corpus(corpus_dir, tokenizer, progress=False)
    monkeypatch.setattr(tokens_module, "_writable", lambda d: False)
    assert open_token_corpus(corpus_dir, tokenizer, progress=False).cache_dir == built.cache_dir


def test_interrupted_build_keeps_the_previous_cache(tokenizer, corpus_dir, monkeypatch):
    first = open_token_corpus(corpus_dir, tokenizer, progress=False)
    meta = (first.cache_dir / "meta.json").read_bytes()
    write_jsonl(corpus_dir / "part-00000.jsonl", make_texts(160, seed=23))

    def interrupted(item):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokens_module, "_encode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_token_corpus(corpus_dir, tokenizer, workers=1, progress=False)
    assert (first.cache_dir / "meta.json").read_bytes() == meta
    assert not list(first.cache_dir.glob("*.tmp"))
    monkeypatch.undo()
    assert open_token_corpus(corpus_dir, tokenizer, progress=False).n_documents == 160 + 120 + 90


def test_bad_input_is_counted_and_strict_stops(tokenizer, tmp_path):
    root = tmp_path / "c"
    (root).mkdir()
    (root / "a.jsonl").write_bytes(
        jsonl_bytes(["kalo mi", "ne ru"]) + b"{oops\n" + b'{"text": 1}\n'
    )
    corpus = open_token_corpus(root, tokenizer, progress=False)
    meta = json.loads((corpus.cache_dir / "meta.json").read_text())
    assert meta["files"][0]["bad_input"] == {"malformed_json": 1, "text_not_string": 1}
    assert corpus.n_documents == 2
    with pytest.raises(BadInputError, match=r"a.jsonl:3"):
        open_token_corpus(root, tokenizer, progress=False, strict=True, rebuild=True)


def test_errors_name_the_flag_and_path(tokenizer, tmp_path):
    with pytest.raises(UsageError, match=r"--eval_corpus .*missing: no such file"):
        open_token_corpus(tmp_path / "missing", tokenizer, flag="--eval_corpus")
    write_jsonl(tmp_path / "empty" / "a.jsonl", ["", ""])
    with pytest.raises(UsageError, match=r"--corpus .*empty: no documents"):
        open_token_corpus(tmp_path / "empty", tokenizer, progress=False)


@pytest.mark.parametrize("name", ["a.parquet", "a.json.gz"])
def test_parquet_and_gzip_files_encode_as_their_texts(tokenizer, tmp_path, name):
    texts = make_texts(120, seed=25)
    write_corpus(tmp_path / "c" / name, texts)
    corpus = open_token_corpus(tmp_path / "c", tokenizer, progress=False)
    assert corpus.tokens(0, corpus.n_tokens).tolist() == expected_stream(tokenizer, texts)


def test_single_file_corpus_and_token_dtype(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", make_texts(30, seed=24))
    corpus = open_token_corpus(path, tokenizer, progress=False)
    assert corpus.cache_dir.parent == tmp_path / ".tokens" and corpus.n_documents == 30
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
