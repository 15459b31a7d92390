"""Shared fixtures: a tiny text corpus (cleaned by preprocess, as a real one is), a SentencePiece
tokenizer trained on it (so it records preprocess's default cleaning), and tiny checkpoints of
both attentions. Built once per pytest run, in temporary directories.

The tests are grouped by what they test, one folder each:

    unit/         one module at a time, in this process, on inputs the test builds itself: the
                  model, checkpoints, the data pipeline's pieces, training pieces, the ONNX export
                  and the TensorRT path against stand-ins
    integration/  pieces working together: training runs, commands end to end on the tiny corpus
                  and checkpoints below (evaluate, generate, Meta and Hugging Face import and
                  export, lm-eval, deploy), the kernels in Triton's interpreter, the benchmarks
    cli/          the command line itself: every flag documented, help, exit codes and one-line
                  errors (the bad-input table), the shell scripts, the Dockerfile's check and the
                  README's commands
    gpu/          tests that need a CUDA GPU (marked ``gpu``; they skip without one)

A file goes where most of its tests belong: a GPU test of code whose other tests run on the CPU
stays beside them (``pytest -m gpu`` selects every GPU test). Helpers that tests of several
folders import by name (``data_support``, ``meta_layout``, ``lm_eval_tasks``) sit here, on
pytest's ``pythonpath``, with the fixtures below, which every folder shares.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

_WORDS = (
    "the of and to in is was for on that with as by at from his her they are this which be or an "
    "had not but were have one all their there been has who when more would its will two time "
    "people first new about after year city river music school water light house garden market "
    "stone paper window morning evening winter summer story music film team game village road "
    "bridge forest mountain island ocean train station letter number science history language "
    "small large early late quick slow bright dark warm cold open quiet green blue red old young"
).split()


def _document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 6)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
    return " ".join(sentences) + ("\n" + _document(rng) if rng.random() < 0.2 else "")


def write_jsonl(path: Path, n_documents: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_documents):
            f.write(json.dumps({"text": _document(rng)}) + "\n")
    return path


@pytest.fixture(autouse=True)
def fixed_torch_seed():
    """Every test starts from the same torch generator state, so a failure reproduces whatever
    ran before it; tests that need other numbers seed their own generators."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    """``{"train": DIR, "eval": DIR}``: 300 and 60 documents of generated English-like text, each
    set preprocessed (default cleaning) into a split directory of its own."""
    from llama3.__main__ import main

    root = tmp_path_factory.mktemp("corpus")
    splits = {}
    for split, n, seed, ratio in (("train", 300, 0, "1"), ("eval", 60, 1, "0")):
        raw = write_jsonl(root / "raw" / f"{split}.jsonl", n, seed=seed)
        assert (
            main(
                [
                    "preprocess",
                    "--input",
                    str(raw),
                    "--output",
                    str(root / split),
                    "--split_ratio",
                    ratio,
                    "--no-progress",
                ]
            )
            == 0
        )
        splits[split] = root / split / split
    return splits


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    """A 256-token SentencePiece model trained on the tiny corpus."""
    from llama3.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tiny.model"
    return train_tokenizer(
        tiny_corpus["train"], path, 256, n_most_frequent_words=10, progress=False
    )


TINY_MODELS = {
    "softmax": dict(
        attention="softmax",
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=16,
        max_seq_len=32,
    ),
    "softplus": dict(attention="softplus", dim=32, n_layers=2, core_dim=16, max_seq_len=32),
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer, tmp_path_factory):
    """``tiny_checkpoint(attention)`` → a checkpoint directory of a randomly initialised tiny model
    whose vocabulary is the tiny tokenizer's (one per attention, made on first use)."""
    from llama3 import ModelArgs, Transformer
    from llama3.checkpoint import save_model_checkpoint, tokenizer_fingerprint
    from llama3.data.tokenizer import Tokenizer

    made: dict[str, Path] = {}
    vocab = Tokenizer(tiny_tokenizer).vocab_size

    def make(attention: str) -> Path:
        if attention not in made:
            torch.manual_seed(0)
            model = Transformer.build(ModelArgs(vocab_size=vocab, **TINY_MODELS[attention]))
            root = tmp_path_factory.mktemp(f"ckpt_{attention}")
            save_model_checkpoint(root, model, tokenizer=tokenizer_fingerprint(tiny_tokenizer))
            made[attention] = root
        return made[attention]

    return make


_INDEXING = pytest.StashKey[tuple[Path, subprocess.Popen]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Where lm-eval runs among the collected tests (those using ``lm_eval_index``, and the
    bad-input rows named ``lm-eval-*``), a process of its own starts indexing lm-eval's built-in
    tasks now (seconds of one core), while the tests before them run on the other core."""
    if importlib.util.find_spec("lm_eval") is None or not any(
        "lm_eval_index" in getattr(item, "fixturenames", ()) or "[lm-eval-" in item.name
        for item in session.items
    ):
        return
    from lm_eval_tasks import WRITE_INDEX

    index_file = Path(tempfile.mkdtemp(prefix="lm_eval_index_")) / "built_in_tasks.pickle"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITE_INDEX, str(index_file)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    session.config.stash[_INDEXING] = (index_file, process)


def pytest_sessionfinish(session: pytest.Session) -> None:
    indexing = session.config.stash.get(_INDEXING, None)
    if indexing is not None:
        index_file, process = indexing
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(index_file.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def lm_eval_index(request, tmp_path_factory) -> Path:
    """A file for lm-eval's index of its built-in tasks, read by every lm-eval run of the tests
    (``lm_eval_tasks.index_once`` in this process, ``lm_eval_tasks.python_m`` in a child), so the
    task files are parsed once per pytest run, not once per run of lm-eval: the file the process
    started after collection wrote, or else one the first run writes."""
    indexing = request.config.stash.get(_INDEXING, None)
    if indexing is None:
        return tmp_path_factory.mktemp("lm_eval") / "built_in_tasks.pickle"
    index_file, process = indexing
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:  # the first run indexes them then
        process.kill()
        process.wait()
    return index_file


@pytest.fixture
def one_thread():
    """One thread per process: the test machines have two cores, shared. Modules that train or
    run many small forwards use it (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama3_cli():
    """``llama3_cli(*args, stdin=None, env=None)`` → CompletedProcess of ``python -m llama3 ARGS``
    run from the repository root (text mode, output captured)."""

    def run(
        *args: object,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "llama3", *map(str, args)],
            cwd=REPO,
            input=stdin,
            capture_output=True,
            text=True,
            env=environment,
            timeout=timeout,
        )

    return run


@pytest.fixture
def side_by_side():
    """``side_by_side(*argvs, timeout=300)`` → a CompletedProcess (text output) for each command
    line, all run at the same time from the repository root: independent runs of a command that
    uses one thread keep both cores of a test machine busy. The outputs go to unnamed files, so
    no pipe fills while another process is waited for."""

    def run(*argvs: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
        with contextlib.ExitStack() as stack:
            outputs = [
                [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2)] for _ in argvs
            ]
            processes = []
            try:
                for argv, (out, err) in zip(argvs, outputs):
                    processes.append(
                        subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, text=True)
                    )
                codes = [process.wait(timeout=timeout) for process in processes]
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
                        process.wait()
            done = []
            for argv, code, files in zip(argvs, codes, outputs):
                for file in files:
                    file.seek(0)
                done.append(subprocess.CompletedProcess(argv, code, *(f.read() for f in files)))
            return done

    return run
