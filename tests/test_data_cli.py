"""The data commands end to end through ``python -m llama3``, their help, and the shell scripts
(every command's flags are documented: test_cli.py)."""

from __future__ import annotations

import hashlib
import json
import random
import runpy
import shutil
import subprocess
import sys

import pytest
from test_data_support import ROOT, jsonl_bytes, make_texts, run_cli, write_jsonl, write_zst

from llama3.__main__ import main

SCRIPTS = ROOT / "llama3" / "data" / "preprocessing"


def test_preprocess_train_tokenizer_pretokenize_end_to_end(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "a.jsonl", make_texts(300, seed=40))
    write_zst(raw / "b.jsonl.zst", jsonl_bytes(make_texts(300, seed=41)) + b"{broken\n")
    data = tmp_path / "pretrain_data"

    done = run_cli("preprocess", "--input", str(raw), "--output", str(data), "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "1 malformed_json" in done.stderr
    assert "preprocess" in done.stderr  # the progress bar

    model = tmp_path / "tok" / "t.model"
    done = run_cli("train_tokenizer", "--train_corpus", str(data / "train"), "--model_file",
                   str(model), "--vocab_size", "300", "--n_most_frequent_words", "8", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert model.is_file() and model.with_suffix(".vocab").is_file()

    done = run_cli("pretokenize", "--corpus", str(data / "train"), str(data / "eval"),
                   "--tokenizer", str(model), "--workers", "2")
    assert done.returncode == 0, done.stderr
    for split in ("train", "eval"):
        meta = next((data / split / ".tokens").glob("*/meta.json"))
        manifest = json.loads((data / "preprocess.json").read_text())
        assert sum(f["documents"] for f in json.loads(meta.read_text())["files"]) == \
               manifest["splits"][split]["documents"]
        assert f"{data / split}: " in done.stdout


def test_help_runs(capsys):
    for command in ("preprocess", "train_tokenizer", "pretokenize"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--split_ratio", "--no-lowercase", "--strict", "--vocab_size", "--byte_fallback",
                 "--n_most_frequent_words", "--cache_dir", "--workers"):
        assert flag in out


def test_missing_tokenizer_is_a_one_line_error(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", ["a b"])
    assert main(["pretokenize", "--corpus", str(tmp_path), "--tokenizer", str(tmp_path / "x.model")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --tokenizer {tmp_path / 'x.model'}")


def test_preprocess_the_pile_wrapper_uses_the_original_defaults(tmp_path, monkeypatch, capsys):
    wrapper = runpy.run_path(str(SCRIPTS / "preprocess_the_pile.py"))  # as `python FILE` would
    monkeypatch.setattr(sys, "path", list(sys.path))  # the wrapper prepends the repository root
    monkeypatch.chdir(tmp_path)
    assert wrapper["main"]([]) == 2
    assert "run ./download_the_pile.sh first" in capsys.readouterr().err
    write_jsonl(tmp_path / "the-pile-pubmed-central-refine-result.jsonl", make_texts(50, seed=42))
    assert wrapper["main"](["--no-progress"]) == 0
    assert (tmp_path / "pretrain_data" / "train" / "part-00000.jsonl").is_file()
    assert (tmp_path / "pretrain_data" / "preprocess.json").is_file()


# ----------------------------------------------------------------------------- download script

needs_fetcher = pytest.mark.skipif(
    not (shutil.which("curl") or shutil.which("wget")) or not shutil.which("sha256sum"),
    reason="needs curl or wget, and sha256sum")


def download(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / "download_the_pile.sh"), *args],
                          capture_output=True, text=True, timeout=60)


@needs_fetcher
def test_download_fails_fast_with_one_line_when_offline(tmp_path):
    done = download("-o", str(tmp_path), "--timeout", "5", "http://127.0.0.1:9/shard.jsonl.zst")
    assert done.returncode != 0
    assert "downloading" not in done.stdout  # stopped by the connection check, before any retry
    assert done.stderr.strip().count("\n") == 0 and "cannot reach 127.0.0.1:9" in done.stderr
    assert not list(tmp_path.iterdir())


@needs_fetcher
def test_download_resumes_and_verifies_checksums(tmp_path):
    source = tmp_path / "src" / "shard.jsonl"
    source.parent.mkdir()
    source.write_bytes(random.Random(0).randbytes(200_000))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard.jsonl.part").write_bytes(source.read_bytes()[:70_000])  # an interrupted download
    done = download("-o", str(out), "--sha256", digest, source.as_uri())
    assert done.returncode == 0, done.stderr
    assert "resuming after 70000 bytes" in done.stdout
    assert (out / "shard.jsonl").read_bytes() == source.read_bytes()
    assert not (out / "shard.jsonl.part").exists()

    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  shard.jsonl\n")
    (out / "shard.jsonl").unlink()
    done = download("-o", str(out), "--checksums", str(sums), source.as_uri())
    assert done.returncode != 0 and "shard.jsonl: sha256 is" in done.stderr
    assert not (out / "shard.jsonl").exists() and not (out / "shard.jsonl.part").exists()


def test_download_help_and_bad_flags():
    done = download("--help")
    assert done.returncode == 0 and "--sha256" in done.stdout and "resume" in done.stdout
    done = download("--sha256", "xyz", "file:///dev/null")
    assert done.returncode != 0 and "64 hexadecimal digits" in done.stderr
