"""Tokenizer: training determinism, special ids, round trips, frequent words over all files."""

from __future__ import annotations

import pickle

import pytest
from data_support import make_texts, make_words, train_tiny_tokenizer, write_jsonl

from llama3.data.tokenizer import Tokenizer, _Reservoir, split_long_line, train_tokenizer
from llama3.errors import UsageError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_special_ids_and_vocab(tiny):
    assert (tiny.unk_id, tiny.pad_id, tiny.bos_id, tiny.eos_id) == (0, 1, 2, 3)
    assert tiny.vocab_size == 400
    assert tiny.encode("kalo mi", bos=True, eos=True)[0] == 2
    assert tiny.encode("kalo mi", bos=True, eos=True)[-1] == 3
    assert len(tiny.sha256) == 64


def test_round_trip(tiny):
    for text in make_texts(20, seed=9):
        normalized = " ".join(text.split())  # SentencePiece folds newlines and repeated spaces
        assert tiny.decode(tiny.encode(text)) == normalized
    batch = make_texts(5, seed=10)
    assert tiny.encode_batch(batch, eos=True) == [tiny.encode(t, eos=True) for t in batch]


def test_token_bytes_count_decoded_bytes(tiny):
    sizes = tiny.token_bytes()
    assert sizes.shape == (tiny.vocab_size,) and sizes[:4].tolist() == [0, 0, 0, 0]
    for text in make_texts(10, seed=11):
        ids = tiny.encode(text)
        # every piece counts its leading "▁" as a space; decoding drops the first one
        assert sizes[ids].sum() == len(tiny.decode(ids).encode()) + 1


def test_pickles_by_path(tiny):
    copy = pickle.loads(pickle.dumps(tiny))
    assert copy.path == tiny.path and copy.encode("kalo") == tiny.encode("kalo")


def test_missing_or_invalid_model_names_flag_and_path(tmp_path):
    with pytest.raises(UsageError, match=r"--tokenizer .*nope.model: cannot read"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UsageError, match=r"--tokenizer .*bad.model: not a SentencePiece model"):
        Tokenizer(bad)


def test_training_is_deterministic_under_a_seed(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_texts(600, seed=12))
    common = dict(
        input_sentence_size=300, n_most_frequent_words=5, progress=False
    )  # sampling active
    a = train_tokenizer(corpus, tmp_path / "a.model", 300, seed=1, **common).read_bytes()
    b = train_tokenizer(corpus, tmp_path / "b.model", 300, seed=1, **common).read_bytes()
    assert a == b
    assert (tmp_path / "a.vocab").read_text().startswith("<unk>\t0\n<pad>\t0\n<s>\t0\n</s>\t0\n")


def test_sentence_sample_depends_on_the_seed():
    def sample(seed: int) -> list[str]:
        reservoir = _Reservoir(10, seed)
        for i in range(1000):
            reservoir.add(str(i))
        return reservoir.items

    assert sample(0) == sample(0) and sample(0) != sample(1)
    small = _Reservoir(10, 0)
    for i in range(5):
        small.add(str(i))
    assert small.items == ["0", "1", "2", "3", "4"]  # fewer than the sample size: all, in order


def test_frequent_words_are_counted_over_all_files(tmp_path):
    words = make_words(200, seed=13)
    write_jsonl(tmp_path / "corpus" / "a.jsonl", make_texts(300, seed=14, words=words))
    rare_elsewhere = "zyxwvu"  # frequent in the second file only
    texts_b = [
        f"{rare_elsewhere} {t} {rare_elsewhere}" for t in make_texts(100, seed=15, words=words)
    ]
    write_jsonl(tmp_path / "corpus" / "b.jsonl", texts_b)
    model = train_tokenizer(
        tmp_path / "corpus", tmp_path / "t.model", 400, n_most_frequent_words=5, progress=False
    )
    tok = Tokenizer(model)
    user_symbols = [tok.piece(i) for i in range(4, 9)]  # right after the 4 special tokens
    assert "\u2581" + rare_elsewhere in user_symbols
    assert len(tok.encode(rare_elsewhere)) == 1


def test_byte_fallback(tmp_path):
    plain = Tokenizer(train_tiny_tokenizer(tmp_path / "plain"))
    fallback = Tokenizer(train_tiny_tokenizer(tmp_path / "bytes", byte_fallback=True))
    text = "kalo ü€"  # characters the corpus never had
    assert plain.unk_id in plain.encode(text)
    ids = fallback.encode(text)
    assert fallback.unk_id not in ids and fallback.decode(ids) == text
    assert all(fallback.token_bytes()[i] == 1 for i in ids[-5:])  # ü: 2 bytes, €: 3 bytes


def test_long_lines_are_split_at_spaces_within_the_limit():
    line = " ".join(["wörd"] * 100) + " " + "ü" * 30
    pieces = list(split_long_line(line, 37))
    assert all(len(p.encode()) <= 37 for p in pieces)
    assert "".join(pieces).replace(" ", "") == line.replace(" ", "")  # nothing lost, no split char
    assert list(split_long_line("short", 37)) == ["short"]


def test_vocab_too_large_for_corpus_is_a_usage_error(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["ab ab ab", "ba ba"])
    with pytest.raises(UsageError, match="--vocab_size|--train_corpus"):
        train_tokenizer(corpus, tmp_path / "t.model", 5000, n_most_frequent_words=0, progress=False)
    assert not (tmp_path / "t.model").exists()
