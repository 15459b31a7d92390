"""Preprocessing: bad input accounting, cleaning, the deterministic split, atomic idempotent
output."""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from data_support import (
    jsonl_bytes,
    make_texts,
    parse,
    read_texts,
    write_corpus,
    write_gzip,
    write_jsonl,
    write_parquet,
    write_zst,
)

from llama3.__main__ import main
from llama3.commands import preprocess as preprocess_command
from llama3.data import preprocess
from llama3.data.clean import Cleaner
from llama3.data.preprocess import Splitter
from llama3.data.sources import BadInputError, ProblemLog, file_chunks, parse_lines


def preprocess_run(inputs: list[Path], output: Path, *flags: str) -> dict:
    args = parse(
        preprocess_command,
        ["--input", *map(str, inputs), "--output", str(output), "--no-progress", *flags],
    )
    assert preprocess_command.run(args) == 0
    return json.loads((output / "preprocess.json").read_text())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def bad_corpus(tmp_path: Path) -> Path:
    """One file per kind of bad input; each bad file also holds good documents."""
    root = tmp_path / "raw"
    good = jsonl_bytes(["good one", "good two"])
    (root).mkdir()
    (root / "a_malformed.jsonl").write_bytes(good + b'{"text": "unterminated\n' + good)
    (root / "b_missing.jsonl").write_bytes(b'{"title": "no text"}\n' + good)
    (root / "c_not_string.jsonl").write_bytes(good + b'{"text": 42}\n')
    (root / "d_not_object.jsonl").write_bytes(b'["a list"]\n' + good)
    (root / "e_invalid_utf8.jsonl").write_bytes(good + b'{"text": "caf\xe9"}\n')
    (root / "f_surrogate.jsonl").write_bytes(b'{"text": "half \\ud800 pair"}\n')
    (root / "g_empty.jsonl").write_bytes(b"")
    full = zstandard.ZstdCompressor().compress(jsonl_bytes(make_texts(3000, seed=5)))
    (root / "h_truncated.jsonl.zst").write_bytes(full[: len(full) // 2])
    (root / "i_unreadable.jsonl").symlink_to(root / "does-not-exist")
    return root


def test_bad_input_is_counted_by_reason_and_reported_with_file_and_line(
    bad_corpus, tmp_path, capsys
):
    manifest = preprocess_run([bad_corpus], tmp_path / "out", "--max_reports", "20")
    assert manifest["bad_input"] == {
        "empty_file": 1,
        "invalid_utf8": 1,
        "lone_surrogate": 1,
        "malformed_json": 1,
        "missing_text": 1,
        "not_an_object": 1,
        "text_not_string": 1,
        "truncated_zst": 1,
        "unreadable": 1,
    }
    err = capsys.readouterr().err
    assert f"{bad_corpus / 'a_malformed.jsonl'}:3: line is not valid JSON" in err
    assert f'{bad_corpus / "b_missing.jsonl"}:1: object has no "text" field' in err
    assert f"{bad_corpus / 'e_invalid_utf8.jsonl'}:3: line is not valid UTF-8" in err
    assert f"{bad_corpus / 'g_empty.jsonl'}: file holds no data" in err
    assert f"{bad_corpus / 'i_unreadable.jsonl'}: file cannot be opened or read" in err
    assert "bad input skipped: 1 empty_file, 1 invalid_utf8" in err
    texts = read_texts(tmp_path / "out" / "train") + read_texts(tmp_path / "out" / "eval")
    counts = Counter(texts)
    assert counts["good one"] == 6 and counts["good two"] == 6  # good lines around bad ones survive
    recovered = len(texts) - 12
    assert 0 < recovered < 3000  # complete lines before the truncation point are kept


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_file_without_read_permission_is_unreadable(tmp_path):
    path = write_jsonl(tmp_path / "locked.jsonl", ["a"])
    path.chmod(0)
    log = ProblemLog()
    assert list(file_chunks(path, log)) == []
    assert log.counts == {"unreadable": 1} and "Permission denied" in str(log.first[0])


def test_file_faults_are_always_named_and_every_problem_is_in_the_report(
    bad_corpus, tmp_path, capsys
):
    """Past --max_reports bad lines, a truncated stream, an empty and an unreadable file are still
    named; every problem is listed in a report beside the output, which the summary names, and a
    later run without bad input removes it."""
    out = tmp_path / "out"
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(bad_corpus),
                "--output",
                str(out),
                "--max_reports",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 5
    for name in ("g_empty.jsonl", "h_truncated.jsonl.zst", "i_unreadable.jsonl"):
        assert sum(name in line for line in warnings) == 1, name
    report = out / "preprocess.bad_input.tsv"
    assert f"all listed in {report}" in err
    header, *rows = [line.split("\t") for line in report.read_text().splitlines()]
    assert header == ["file", "line", "reason", "detail"]
    manifest = json.loads((out / "preprocess.json").read_text())
    assert Counter(row[2] for row in rows) == manifest["bad_input"]
    assert [str(bad_corpus / "a_malformed.jsonl"), "3", "malformed_json"] == rows[0][:3]
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(bad_corpus / "a_malformed.jsonl"),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "bad input skipped" in capsys.readouterr().err and report.is_file()
    write_jsonl(tmp_path / "good.jsonl", make_texts(20))
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(tmp_path / "good.jsonl"),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert not report.exists()


def test_strict_exits_nonzero_at_first_bad_input(bad_corpus, tmp_path, capsys):
    code = main(
        [
            "preprocess",
            "--input",
            str(bad_corpus / "a_malformed.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--strict",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert f"error: {bad_corpus / 'a_malformed.jsonl'}:3: line is not valid JSON" in err
    assert "--strict" in err
    assert not (tmp_path / "out" / "preprocess.json").exists()
    assert not list((tmp_path / "out").rglob("part-*"))


def test_strict_in_process_raises_for_file_level_problems(bad_corpus):
    log = ProblemLog(strict=True)
    with pytest.raises(BadInputError, match="g_empty.jsonl"):
        list(file_chunks(bad_corpus / "g_empty.jsonl", log))


def test_truncated_multiframe_zst_reports_the_line(tmp_path):
    texts = make_texts(2000, seed=1)
    frames = [
        zstandard.ZstdCompressor().compress(jsonl_bytes(texts[:1000])),
        zstandard.ZstdCompressor().compress(jsonl_bytes(texts[1000:])),
    ]
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(frames[0] + frames[1][: len(frames[1]) // 2])
    log = ProblemLog()
    got = [t for chunk in file_chunks(path, log, 1 << 16) for t in parse_lines(chunk)[0]]
    assert got == texts[: len(got)] and 1000 <= len(got) < 2000
    assert log.counts == {"truncated_zst": 1} and log.first[0].line == len(got) + 1
    path.write_bytes(frames[0] + frames[1])  # complete: nothing reported, everything read
    log = ProblemLog()
    assert sum(len(parse_lines(c)[0]) for c in file_chunks(path, log, 1 << 16)) == 2000
    assert log.total == 0


def test_cleaning_steps_and_flags():
    text = "Ünïcode ﬁne Straße (x) () [ ] {}\nSecond LINE"
    assert Cleaner()(text) == "unicode fine strae (x)   \nsecond line"
    assert Cleaner(lowercase=False)(text) == "Unicode fine Strae (x)   \nSecond LINE"
    assert (
        Cleaner(drop_empty_brackets=False)(text) == "unicode fine strae (x) () [ ] {}\nsecond line"
    )
    assert Cleaner(ascii=False)(text).startswith("u\u0308ni\u0308code fine straße")
    assert Cleaner(nfkd=False)(text).startswith("ncode ne strae")  # no NFKD: accented letters lost
    args = parse(preprocess_command, ["--input", "x", "--no-lowercase", "--no-nfkd"])
    assert Cleaner.from_flags(args) == Cleaner(nfkd=False, lowercase=False)


def test_cleaning_flags_reach_the_output(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", ["Hello (World) () Ü"] * 3)
    preprocess_run([source], tmp_path / "a", "--split_ratio", "1")
    preprocess_run(
        [source],
        tmp_path / "b",
        "--split_ratio",
        "1",
        "--no-lowercase",
        "--no-drop_empty_brackets",
        "--no-ascii",
    )
    assert read_texts(tmp_path / "a" / "train") == ["hello (world)  u"] * 3
    assert read_texts(tmp_path / "b" / "train") == ["Hello (World) () U\u0308"] * 3


def test_split_is_deterministic_by_content_and_seed(tmp_path):
    texts = make_texts(2000, seed=2)
    forward = write_jsonl(tmp_path / "fwd" / "in.jsonl", texts)
    backward = write_jsonl(tmp_path / "bwd" / "in.jsonl", texts[::-1])
    a = preprocess_run([forward], tmp_path / "a", "--no-lowercase")
    preprocess_run([backward], tmp_path / "b", "--no-lowercase")
    eval_a, eval_b = read_texts(tmp_path / "a" / "eval"), read_texts(tmp_path / "b" / "eval")
    assert set(eval_a) == set(eval_b) and eval_a == eval_b[::-1]  # by content, not position
    assert 0.85 < a["splits"]["train"]["documents"] / 2000 < 0.95
    assert set(read_texts(tmp_path / "a" / "train")).isdisjoint(eval_a)
    preprocess_run([forward], tmp_path / "c", "--no-lowercase", "--seed", "1")
    assert set(read_texts(tmp_path / "c" / "eval")) != set(eval_a)
    splitter = Splitter(0.5, seed=3)
    assert [splitter(t.encode()) for t in texts[:50]] == [splitter(t.encode()) for t in texts[:50]]


def test_output_is_identical_for_any_number_of_workers(tmp_path):
    sources = [
        write_jsonl(tmp_path / "in" / f"{i}.jsonl", make_texts(700, seed=i)) for i in range(3)
    ]
    preprocess_run([tmp_path / "in"], tmp_path / "one", "--shard_size_mb", "0.03")
    preprocess_run(sources, tmp_path / "two", "--shard_size_mb", "0.03", "--workers", "2")
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert len([n for n in one if "part-" in n]) > 3
    assert {k: v for k, v in one.items() if k != "preprocess.json"} == {
        k: v for k, v in two.items() if k != "preprocess.json"
    }


def test_shards_keep_whole_documents_with_inner_newlines(tmp_path):
    texts = make_texts(500, seed=3)
    assert any("\n" in t for t in texts)
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    manifest = preprocess_run(
        [source],
        tmp_path / "out",
        "--no-lowercase",
        "--split_ratio",
        "1",
        "--shard_size_mb",
        "0.01",
    )
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["bytes"] >= 0.01 * 2**20 for s in shards[:-1])
    assert read_texts(tmp_path / "out" / "train") == texts


def test_zst_input_and_compressed_output(tmp_path):
    texts = make_texts(800, seed=4)
    source = write_zst(tmp_path / "in.jsonl.zst", jsonl_bytes(texts))
    manifest = preprocess_run(
        [source], tmp_path / "out", "--compress", "--no-lowercase", "--shard_size_mb", "0.02"
    )
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert names and all(n.endswith(".jsonl.zst") for n in names)
    got = read_texts(tmp_path / "out" / "train") + read_texts(tmp_path / "out" / "eval")
    assert sorted(got) == sorted(texts)


def shard_files(directory: Path) -> dict[str, bytes]:
    return {name: data for name, data in snapshot(directory).items() if "part-" in name}


@pytest.mark.parametrize("suffix", ["parquet", "json.gz", "jsonl.gz"])
def test_parquet_and_gzip_corpora_give_the_shards_of_the_same_jsonl(tmp_path, suffix):
    texts = make_texts(800, seed=8)
    source = write_corpus(tmp_path / "in" / f"shard.{suffix}", texts)
    preprocess_run(
        [write_jsonl(tmp_path / "shard.jsonl", texts)],
        tmp_path / "jsonl",
        "--shard_size_mb",
        "0.02",
    )
    manifest = preprocess_run(
        [tmp_path / "in"], tmp_path / "other", "--shard_size_mb", "0.02", "--workers", "2"
    )
    assert manifest["inputs"] == [str(source)] and manifest["bad_input"] == {}
    assert shard_files(tmp_path / "other") == shard_files(tmp_path / "jsonl")
    assert len(shard_files(tmp_path / "other")) > 2
    log = ProblemLog()
    chunks = list(file_chunks(source, log, 16 << 10))
    assert len(chunks) > 1 and log.total == 0  # read in pieces, never whole
    assert [text for chunk in chunks for text in parse_lines(chunk)[0]] == texts


def test_bad_gzip_input_is_counted_and_located(tmp_path, capsys):
    root, texts = tmp_path / "raw", make_texts(3000, seed=9)
    whole = gzip.compress(jsonl_bytes(texts), mtime=0)
    root.mkdir()
    (root / "a_truncated.json.gz").write_bytes(whole[: len(whole) // 2])
    (root / "b_corrupt.jsonl.gz").write_bytes(whole[:10] + b"\xff" * 100)
    write_gzip(root / "c_empty.json.gz", b"")
    write_gzip(
        root / "d_bad_lines.json.gz", jsonl_bytes(["good one"]) + b'{"text": 7}\n{"url": "x"}\n'
    )
    manifest = preprocess_run([root], tmp_path / "out", "--max_reports", "20")
    assert manifest["bad_input"] == {
        "corrupt_gzip": 1,
        "empty_file": 1,
        "missing_text": 1,
        "text_not_string": 1,
        "truncated_gzip": 1,
    }
    err = capsys.readouterr().err
    assert f"{root / 'b_corrupt.jsonl.gz'}:1: gzip stream cannot be decoded" in err
    assert f"{root / 'c_empty.json.gz'}: file holds no data" in err
    assert f'{root / "d_bad_lines.json.gz"}:2: "text" is not a string (int)' in err
    recovered = sum(split["documents"] for split in manifest["splits"].values()) - 1
    assert 0 < recovered < 3000  # complete lines before the truncation point are kept
    report = (tmp_path / "out" / "preprocess.bad_input.tsv").read_text()
    assert f"{root / 'a_truncated.json.gz'}\t{recovered + 1}\ttruncated_gzip\t" in report


def test_bad_parquet_input_is_counted_and_located(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    root = tmp_path / "raw"
    write_parquet(root / "a_no_text.parquet", {"title": ["x"], "url": ["y"]})
    write_parquet(root / "b_int_text.parquet", {"text": [1, 2]})
    write_parquet(
        root / "c_bad_values.parquet", {"text": [b"good one", None, b"caf\xe9", b"good two"]}
    )
    whole = write_parquet(
        root / "d_truncated.parquet", {"text": make_texts(300, seed=10)}
    ).read_bytes()
    (root / "d_truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (root / "e_empty.parquet").write_bytes(b"")
    manifest = preprocess_run([root], tmp_path / "out", "--max_reports", "20")
    assert manifest["bad_input"] == {
        "corrupt_parquet": 1,
        "empty_file": 1,
        "invalid_utf8": 1,
        "missing_text_column": 1,
        "text_column_type": 1,
        "text_not_string": 1,
    }
    err = capsys.readouterr().err
    assert f'{root / "a_no_text.parquet"}: file has no "text" column (columns: title, url)' in err
    assert f'{root / "b_int_text.parquet"}: "text" column does not hold strings (int64)' in err
    assert f'{root / "c_bad_values.parquet"}:2: "text" is not a string (null)' in err
    assert f"{root / 'c_bad_values.parquet'}:3: line is not valid UTF-8" in err
    assert f"{root / 'd_truncated.parquet'}: parquet file cannot be decoded" in err
    assert sorted(
        read_texts(tmp_path / "out" / "train") + read_texts(tmp_path / "out" / "eval")
    ) == ["good one", "good two"]
    with pytest.raises(BadInputError, match="a_no_text.parquet"):
        list(file_chunks(root / "a_no_text.parquet", ProblemLog(strict=True)))


def test_corrupt_parquet_row_group_reports_the_row(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = make_texts(900, seed=11)
    path = write_parquet(tmp_path / "x.parquet", {"text": texts}, row_group_size=300)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    log = ProblemLog()
    got = [text for chunk in file_chunks(path, log, 4096) for text in parse_lines(chunk)[0]]
    assert got == texts[: len(got)] and 0 < len(got) <= 300
    assert log.counts == {"corrupt_parquet": 1} and log.first[0].line == len(got) + 1


def test_parquet_without_pyarrow_is_one_error_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"PAR1")  # never parsed: the import fails first
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert (
        main(
            [
                "preprocess",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "pip install pyarrow" in errors[0], errors


def test_rerun_is_idempotent_and_replaces_stale_shards(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(1500, seed=6))
    out = tmp_path / "out"
    preprocess_run([source], out, "--shard_size_mb", "0.02")
    first = snapshot(out)
    preprocess_run([source], out, "--shard_size_mb", "0.02")
    assert snapshot(out) == first  # byte-identical
    preprocess_run([source], out, "--shard_size_mb", "1", "--compress")
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.jsonl.zst"]
    assert sorted(read_texts(out / "train")) == sorted(
        json.loads(line)["text"]
        for name, data in first.items()
        if name.startswith("train/")
        for line in data.decode().splitlines()
    )


def test_interrupted_run_leaves_only_complete_shards(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", make_texts(3000, seed=7))
    complete = tmp_path / "complete"
    preprocess_run([source], complete, "--shard_size_mb", "0.02", "--split_ratio", "1")
    reference = snapshot(complete)
    calls = {"n": 0}
    original = preprocess._process_chunk

    def failing(chunk):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(chunk)

    monkeypatch.setattr(preprocess, "_process_chunk", failing)
    monkeypatch.setattr(preprocess, "chunk_size_for", lambda size, workers: 64 << 10)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        preprocess_run([source], out, "--shard_size_mb", "0.02", "--split_ratio", "1")
    left = snapshot(out)
    assert "preprocess.json" not in left and not [n for n in left if n.endswith(".tmp")]
    shards = {n: d for n, d in left.items() if "part-" in n}
    assert shards and all(reference[n] == d for n, d in shards.items())  # each one complete
    monkeypatch.undo()
    preprocess_run([source], out, "--shard_size_mb", "0.02", "--split_ratio", "1")
    assert snapshot(out) == reference


def test_flag_errors_name_the_flag(tmp_path):
    args = parse(
        preprocess_command, ["--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path)]
    )
    with pytest.raises(Exception, match="--input .*missing.jsonl: no such file"):
        preprocess_command.run(args)
    (tmp_path / "emptydir").mkdir()
    args = parse(
        preprocess_command, ["--input", str(tmp_path / "emptydir"), "--split_ratio", "1.5"]
    )
    with pytest.raises(Exception, match="--split_ratio 1.5"):
        preprocess_command.run(args)
