"""The data commands end to end through ``python -m llama3``, their help, and the shell scripts
(every command's flags are documented: test_cli.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
from data_support import (
    ROOT,
    jsonl_bytes,
    make_texts,
    run_cli,
    train_tiny_tokenizer,
    write_jsonl,
    write_zst,
)

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
    done = run_cli(
        "train_tokenizer",
        "--train_corpus",
        str(data / "train"),
        "--model_file",
        str(model),
        "--vocab_size",
        "300",
        "--n_most_frequent_words",
        "8",
        "--seed",
        "1",
    )
    assert done.returncode == 0, done.stderr
    assert model.is_file() and model.with_suffix(".vocab").is_file()

    done = run_cli(
        "pretokenize",
        "--corpus",
        str(data / "train"),
        str(data / "eval"),
        "--tokenizer",
        str(model),
        "--workers",
        "2",
    )
    assert done.returncode == 0, done.stderr
    for split in ("train", "eval"):
        meta = next((data / split / ".tokens").glob("*/meta.json"))
        manifest = json.loads((data / "preprocess.json").read_text())
        assert (
            sum(f["documents"] for f in json.loads(meta.read_text())["files"])
            == manifest["splits"][split]["documents"]
        )
        assert f"{data / split}: " in done.stdout


def test_help_runs(capsys):
    for command in ("preprocess", "train_tokenizer", "pretokenize"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--split_ratio",
        "--no-lowercase",
        "--strict",
        "--vocab_size",
        "--byte_fallback",
        "--n_most_frequent_words",
        "--cache_dir",
        "--workers",
    ):
        assert flag in out


def test_missing_tokenizer_is_a_one_line_error(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", ["a b"])
    assert (
        main(["pretokenize", "--corpus", str(tmp_path), "--tokenizer", str(tmp_path / "x.model")])
        == 2
    )
    assert capsys.readouterr().err.startswith(f"error: --tokenizer {tmp_path / 'x.model'}")


def test_preprocess_the_pile_wrapper_uses_the_original_defaults(tmp_path, monkeypatch, capsys):
    wrapper = runpy.run_path(str(SCRIPTS / "preprocess_the_pile.py"))  # as `python FILE` would
    monkeypatch.setattr(sys, "path", list(sys.path))  # the wrapper prepends the repository root
    monkeypatch.chdir(tmp_path)
    assert wrapper["main"]([]) == 2
    assert "run ./download_the_pile.sh first" in capsys.readouterr().err
    write_jsonl(tmp_path / "the-pile-pubmed-central-refine-result.jsonl", make_texts(50, seed=42))
    write_jsonl(tmp_path / "other.jsonl", make_texts(7, seed=44))  # not read: the default is here
    assert wrapper["main"](["--no-progress"]) == 0
    assert (tmp_path / "pretrain_data" / "train" / "part-00000.jsonl").is_file()
    manifest = json.loads((tmp_path / "pretrain_data" / "preprocess.json").read_text())
    assert manifest["inputs"] == ["the-pile-pubmed-central-refine-result.jsonl"]


def test_preprocess_the_pile_wrapper_takes_the_folders_shards(tmp_path, monkeypatch, capsys):
    """Shards of a mirror fetched with download_the_pile.sh URL... (no default subset file)."""
    wrapper = runpy.run_path(str(SCRIPTS / "preprocess_the_pile.py"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    write_zst(tmp_path / "00.jsonl.zst", jsonl_bytes(make_texts(40, seed=45)))
    write_jsonl(tmp_path / "01.jsonl", make_texts(30, seed=46))
    (tmp_path / "02.jsonl.zst.part").write_bytes(b"an interrupted download")
    assert wrapper["main"](["--no-progress"]) == 0
    assert "preprocessing the 2 corpus file(s) of this folder" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "pretrain_data" / "preprocess.json").read_text())
    assert manifest["inputs"] == ["00.jsonl.zst", "01.jsonl"]
    assert sum(s["documents"] for s in manifest["splits"].values()) == 70


def test_pretokenize_refuses_the_output_of_a_killed_preprocess(tmp_path):
    """preprocess is killed (SIGKILL) after writing a first shard of each split; the shards it
    left are refused as a corpus until a run completes."""
    fifo = tmp_path / "input.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "data"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama3",
            "preprocess",
            "--input",
            str(fifo),
            "--output",
            str(out),
            "--shard_size_mb",
            "0.01",
            "--no-progress",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with open(fifo, "wb") as writer:  # held open: preprocess waits for more input
            writer.write(jsonl_bytes(make_texts(600, seed=47)))
            writer.flush()
            wait_for(lambda: all(list((out / s).glob("part-*.jsonl")) for s in ("train", "eval")))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
    finally:
        child.kill()
    tokenizer = train_tiny_tokenizer(tmp_path / "tok")
    for split in ("train", "eval"):
        done = run_cli("pretokenize", "--corpus", str(out / split), "--tokenizer", str(tokenizer))
        assert done.returncode == 2, done.stderr
        assert f"preprocess did not finish writing {out / split}" in done.stderr
    assert not list(out.rglob(".tokens"))


def wait_for(condition, timeout: float = 120.0) -> None:
    """Poll the file system until ``condition()`` holds (what a child process writes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- download script

needs_fetcher = pytest.mark.skipif(
    not (shutil.which("curl") or shutil.which("wget")) or not shutil.which("sha256sum"),
    reason="needs curl or wget, and sha256sum",
)


def download(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / "download_the_pile.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


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
    urls = [line for line in done.stdout.splitlines() if "https://huggingface.co/datasets/" in line]
    for corpus in ("pile-uncopyrighted", "SlimPajama-627B", "fineweb/", "fineweb-edu/", "dolma/"):
        assert any(f"/{corpus}" in url for url in urls), corpus  # where each corpus is served
    done = download("--sha256", "xyz", "file:///dev/null")
    assert done.returncode != 0 and "64 hexadecimal digits" in done.stderr
