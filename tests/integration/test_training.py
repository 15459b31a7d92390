"""Training through the real CLI on a tiny corpus and tokenizer that these tests build themselves.

Covers: the loss falls; the run directory (checkpoints, metrics, summary, TensorBoard) and the plot
command; gradient accumulation equals one large batch; resuming continues bit for bit; Ctrl-C
saves a checkpoint; a non-finite loss stops before the update and keeps the last checkpoint; FSDP
over two gloo processes (torchrun) matches one process, and resumes; clear usage errors; and a
stored loss trajectory that a change must reproduce.

Regenerate the stored trajectory (after a deliberate change of the numerics) with::

    python tests/integration/test_training.py --regenerate
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# run as a script (--regenerate), the imports below take llama3 from this checkout
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama3 import load_checkpoint  # noqa: E402
from llama3.__main__ import main  # noqa: E402
from llama3.checkpoint import list_step_dirs, read_model_file, resolve_step_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TRAJECTORY = Path(__file__).parents[1] / "data" / "training_trajectory.json"
TINY = [
    "--dim",
    "32",
    "--n_layers",
    "2",
    "--n_heads",
    "4",
    "--core_dim",
    "16",
    "--max_seq_len",
    "32",
    "--batch_size",
    "8",
    "--base_lr",
    "3e-3",
    "--warmup_steps",
    "2",
    "--no-tensorboard",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

# ------------------------------------------------------------------------------ tiny data

SUBJECTS = [
    "the cat",
    "a dog",
    "the old man",
    "my sister",
    "the teacher",
    "a small bird",
    "the farmer",
    "our neighbour",
]
VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "feeds", "remembers"]
OBJECTS = [
    "the red ball",
    "a green apple",
    "the long road",
    "a quiet river",
    "the wooden table",
    "an open door",
    "the warm bread",
    "a bright star",
]
PLACES = [
    "in the morning",
    "at night",
    "near the house",
    "by the lake",
    "after lunch",
    "in the garden",
]


def documents(n: int, seed: int):
    """Simple English documents from a fixed generator (identical on every machine)."""
    state = seed

    def draw(items):
        nonlocal state
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        return items[(state >> 33) % len(items)]

    for _ in range(n):
        sentences = draw(range(1, 7))
        yield " ".join(
            f"{draw(SUBJECTS).capitalize()} {draw(VERBS)} {draw(OBJECTS)} {draw(PLACES)}."
            for _ in range(sentences)
        )


def write_corpus(path: Path, n: int, seed: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "part.jsonl", "w") as f:
        for text in documents(n, seed):
            f.write(json.dumps({"text": text}) + "\n")
    return path


class TinyData:
    def __init__(self, root: Path):
        self.train = write_corpus(root / "train", 600, seed=1)
        self.eval = write_corpus(root / "eval", 60, seed=2)
        self.tokenizer = root / "tokenizer.model"
        assert (
            main(
                [
                    "train_tokenizer",
                    "--train_corpus",
                    str(self.train),
                    "--model_file",
                    str(self.tokenizer),
                    "--vocab_size",
                    "128",
                    "--n_most_frequent_words",
                    "10",
                    "--no-progress",
                ]
            )
            == 0
        )

    def flags(self, run_dir: Path, *, eval_corpus: bool = True) -> list[str]:
        flags = [
            "--train_corpus",
            str(self.train),
            "--tokenizer",
            str(self.tokenizer),
            "--to_checkpoint",
            str(run_dir),
        ]
        return flags + (["--eval_corpus", str(self.eval)] if eval_corpus else [])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TinyData:
    return TinyData(tmp_path_factory.mktemp("tiny_data"))


def train(data: TinyData, run_dir: Path, *flags: str, eval_corpus: bool = True) -> int:
    """``python -m llama3 train`` in this process."""
    return main(["train", *data.flags(run_dir, eval_corpus=eval_corpus), *TINY, *flags])


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path, kind: str = "train") -> list[float]:
    return [r["loss"] for r in records(run_dir, kind)]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "llama3",
        *args,
    ]  # --standalone: a free local port
    return subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------- a finished CLI run


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    """40 steps through ``python -m llama3 train`` in a fresh interpreter, TensorBoard on."""
    run_dir = tmp_path_factory.mktemp("runs") / "softplus"
    flags = [f for f in TINY if f != "--no-tensorboard"]
    command = [
        sys.executable,
        "-m",
        "llama3",
        "train",
        *data.flags(run_dir),
        *flags,
        "--total_steps",
        "40",
        "--eval_steps",
        "10",
        "--eval_batches",
        "2",
        "--save_steps",
        "20",
    ]
    done = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_loss_falls(finished_run):
    train_losses = losses(finished_run)
    assert len(train_losses) == 40
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 0.7
    eval_losses = losses(finished_run, "eval")
    assert [r["step"] for r in records(finished_run, "eval")] == [10, 20, 30, 40]
    assert eval_losses[-1] < eval_losses[0] - 0.3


def test_run_directory(finished_run):
    assert [p.name for p in list_step_dirs(finished_run)] == ["step_00000020", "step_00000040"]
    assert resolve_step_dir(finished_run).name == "step_00000040"
    for step_dir in list_step_dirs(finished_run):
        assert {p.name for p in step_dir.iterdir()} == {
            "model.pt",
            "trainer.pt",
            "state",
            "rank_00000.pt",
        }
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["tokens"] == 40 * 8 * 32
    assert summary["final_train_loss"] == losses(finished_run)[-1]
    assert summary["final_eval_loss"] == losses(finished_run, "eval")[-1]
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_gib"] > 0
    step = records(finished_run)[5]
    assert set(step) >= {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib"}
    events = list((finished_run / "tensorboard").glob("events.out.tfevents.*"))
    assert bool(events) == (importlib.util.find_spec("tensorboard") is not None)
    model = load_checkpoint(finished_run)  # no model flags, no torchrun
    assert model.args.dim == 32 and model.args.attention == "softplus"
    assert torch.isfinite(model(torch.randint(0, 128, (1, 16)))).all()


def test_plot_writes_png(finished_run, tmp_path):
    png = tmp_path / "curves.png"
    assert (
        main(
            [
                "plot",
                str(finished_run),
                str(finished_run / "metrics.jsonl"),
                "--output",
                str(png),
                "--x",
                "tokens",
                "--labels",
                "a",
                "b",
                "--smooth",
                "0.5",
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_skips_a_torn_last_line_and_names_the_file_it_wrote(finished_run, tmp_path, capsys):
    """A run killed while writing metrics.jsonl leaves a torn last line: skipped with a warning
    (a bad line before the last stays an error). Without an extension the image is a PNG, and
    the line says where it went."""
    metrics = tmp_path / "metrics.jsonl"
    text = (finished_run / "metrics.jsonl").read_text()
    metrics.write_text(text + '{"kind": "train", "step": 41, "lo')
    assert main(["plot", str(metrics), "--output", str(tmp_path / "curves")]) == 0
    out, err = capsys.readouterr()
    assert f"{metrics}, line {text.count(chr(10)) + 1}: cut short, skipped" in err
    assert out.strip() == f"wrote {tmp_path / 'curves.png'}"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics.write_text('{"kind": "train", "st\n' + text)
    assert main(["plot", str(metrics), "--output", str(tmp_path / "again.png")]) == 2
    assert "line 1: not JSON" in capsys.readouterr().err


def test_plot_refuses_a_directory_without_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


# ----------------------------------------------------------------- numerics of the loop


def test_accumulation_equals_one_batch(data, tmp_path):
    """8 windows in one micro-batch, in 2 and in 4 give the same losses and gradient norms.

    Padded windows hold different numbers of targets, so averaging per micro-batch (instead of
    over all targets of the step) would differ; the check below makes sure the data shows it."""
    flags = ["--data_mode", "padded", "--max_seq_len", "64", "--total_steps", "4"]
    runs = {}
    for accumulation in (1, 2, 4):
        run_dir = tmp_path / f"acc{accumulation}"
        assert (
            train(
                data, run_dir, *flags, "--accumulation_steps", str(accumulation), eval_corpus=False
            )
            == 0
        )
        runs[accumulation] = records(run_dir)
    for accumulation in (2, 4):
        for one, many in zip(runs[1], runs[accumulation]):
            assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
            assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert _targets_per_micro_batch_differ(data)


def _targets_per_micro_batch_differ(data: TinyData) -> bool:
    from llama3.data.dataset import TrainWindows
    from llama3.data.tokenizer import Tokenizer
    from llama3.data.tokens import open_token_corpus
    from llama3.loss import IGNORE_INDEX

    tokenizer = Tokenizer(data.tokenizer)
    corpus = open_token_corpus(data.train, tokenizer, progress=False)
    _, targets = TrainWindows(
        corpus, 64, 8, mode="padded", pad_id=tokenizer.pad_id, prefetch=0
    ).batch(0)
    counts = [int((t != IGNORE_INDEX).sum()) for t in targets.chunk(2)]
    return counts[0] != counts[1]


# 6 steps with dropout (so generator state matters), saved at steps 3 and 6
STRAIGHT = (
    "--dropout",
    "0.1",
    "--total_steps",
    "6",
    "--save_steps",
    "3",
    "--eval_steps",
    "3",
    "--eval_batches",
    "2",
)


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory) -> Path:
    """The STRAIGHT run, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert train(data, run_dir, *STRAIGHT) == 0
    return run_dir


def test_resume_is_exact(data, straight_run, tmp_path):
    resumed = tmp_path / "resumed"
    assert (
        train(data, resumed, *STRAIGHT, "--from_checkpoint", str(straight_run / "step_00000003"))
        == 0
    )
    for kind in ("train", "eval"):
        a, b = records(straight_run, kind), records(resumed, kind)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert [r["grad_norm"] for r in records(straight_run)] == [
        r["grad_norm"] for r in records(resumed)
    ]
    final_a, final_b = load_checkpoint(straight_run), load_checkpoint(resumed)
    for (name, a), b in zip(final_a.state_dict().items(), final_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_from_checkpoint_auto_starts_a_new_run_or_continues_its_own(
    data, straight_run, tmp_path, capsys
):
    """The same command line starts the run, continues it after a kill (also one between
    publishing a step directory and naming it ``latest``, at the first save or a later one), and
    then finds it done."""
    command = (*STRAIGHT, "--from_checkpoint", "auto")
    fresh = tmp_path / "fresh"
    assert train(data, fresh, *command) == 0  # nothing there: a new run
    assert losses(fresh) == losses(straight_run)
    assert train(data, fresh, *command) == 0
    assert "the run is complete" in capsys.readouterr().out

    killed = tmp_path / "killed"  # what a run killed after its step-3 save leaves
    killed.mkdir()
    shutil.copytree(straight_run / "step_00000003", killed / "step_00000003")
    (killed / "latest").write_text("step_00000003")
    assert train(data, killed, *command) == 0
    assert "resumed from" in capsys.readouterr().out
    final_a, final_b = load_checkpoint(straight_run), load_checkpoint(killed)
    for (name, a), b in zip(final_a.state_dict().items(), final_b.state_dict().values()):
        assert torch.equal(a, b), name

    (killed / "latest").write_text("step_00000003")  # stopped before latest named step 6
    assert train(data, killed, *command) == 0
    assert "the run is complete" in capsys.readouterr().out

    published = tmp_path / "published"  # killed between publishing step 3 and naming it latest
    published.mkdir()
    shutil.copytree(straight_run / "step_00000003", published / "step_00000003")
    assert train(data, published, *command) == 0
    assert "resumed from" in capsys.readouterr().out
    final_c = load_checkpoint(published)
    for (name, a), c in zip(final_a.state_dict().items(), final_c.state_dict().values()):
        assert torch.equal(a, c), name


def test_resume_from_a_version_1_training_record(data, straight_run, tmp_path):
    """A checkpoint of llama3 0.1.0, whose trainer.pt kept the run's entries side by side,
    continues exactly as one written now."""
    old = tmp_path / "old" / "step_00000003"
    shutil.copytree(straight_run / "step_00000003", old)
    record = torch.load(old / "trainer.pt", weights_only=True)
    version_1 = {
        "format": record["format"],
        "version": 1,
        "step": record["step"],
        "model_args": record["model_args"],
        "tokenizer": record["tokenizer"],
        "world_size": record["world_size"],
        **record["progress"],
        "scaler": record["scaler"] or None,
        **record["settings"],
        "train_args": {},
        "corpus": "fingerprint",
    }
    torch.save(version_1, old / "trainer.pt")
    resumed = tmp_path / "resumed"  # batch, seed and schedule from the checkpoint, not repeated
    assert (
        main(
            [
                "train",
                *data.flags(resumed),
                "--from_checkpoint",
                str(old),
                "--no-tensorboard",
                "--save_steps",
                "3",
                "--eval_steps",
                "3",
                "--eval_batches",
                "2",
            ]
        )
        == 0
    )
    for kind in ("train", "eval"):
        assert losses(resumed, kind) == losses(straight_run, kind)


def test_resume_refuses_changed_flags(data, straight_run, tmp_path, capsys):
    start = ["--dropout", "0.1", "--total_steps", "6", "--from_checkpoint", str(straight_run)]
    assert train(data, tmp_path / "a", *start, "--dim", "64") == 2
    assert "--dim 64 (checkpoint: 32)" in capsys.readouterr().err
    assert train(data, tmp_path / "b", *start, "--batch_size", "4") == 2
    assert "--batch_size" in capsys.readouterr().err
    assert train(data, straight_run, "--total_steps", "8") == 2  # a fresh run into a used directory
    assert "already holds a run" in capsys.readouterr().err


def test_resume_takes_its_training_flags_from_the_checkpoint(data, straight_run, tmp_path, capsys):
    """Resumed with only the data flags, a run continues with the batch, schedule, evaluation and
    precision it was saved with, exactly; an autocast mode given is followed, and said to be no
    longer exact; flags given win and are listed."""
    step_3 = str(straight_run / "step_00000003")
    resumed = tmp_path / "resumed"
    assert (
        main(["train", *data.flags(resumed), "--from_checkpoint", step_3, "--no-tensorboard"]) == 0
    )
    for kind in ("train", "eval"):
        assert records(resumed, kind) and losses(resumed, kind) == losses(straight_run, kind)
    assert "changed since the checkpoint" not in capsys.readouterr().out
    autocast = tmp_path / "autocast"
    assert (
        main(
            [
                "train",
                *data.flags(autocast),
                "--from_checkpoint",
                step_3,
                "--no-tensorboard",
                "--amp_bf16",
                "--base_lr",
                "1e-3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "precision amp_bf16 (checkpoint: fp32): the arithmetic changes, so the continuation "
        "is no longer exact" in out
    )
    assert "--base_lr 0.001 (checkpoint: 0.003)" in out
    assert [r["step"] for r in records(autocast)] == list(range(1, 7))
    assert all(w.dtype == torch.float32 for w in read_model_file(autocast)["model"].values())
    saved = torch.load(autocast / "step_00000006" / "trainer.pt", weights_only=True)
    assert saved["settings"]["flags"]["precision"] == "amp_bf16"
    assert saved["settings"]["flags"]["batch_size"] == 8


def test_resuming_a_finished_run_changes_nothing(data, straight_run, tmp_path, capsys):
    run_dir = tmp_path / "finished"
    shutil.copytree(straight_run, run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    assert (
        train(
            data,
            run_dir,
            "--dropout",
            "0.1",
            "--total_steps",
            "6",
            "--from_checkpoint",
            str(run_dir),
        )
        == 0
    )
    assert "the run is complete: the checkpoint is at step 6" in capsys.readouterr().out
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_resuming_an_older_step_never_mixes_it_with_newer_ones(data, tmp_path, capsys):
    """Continuing step 2 of a run that has step 4 into the same directory is refused (pruning
    would keep step 4 and delete the new step 3, and latest would name a deleted directory);
    into a new directory it continues, and --keep_last keeps the step just saved."""
    run_dir = tmp_path / "run"
    assert train(data, run_dir, "--total_steps", "4", "--save_steps", "2", eval_corpus=False) == 0
    older = str(run_dir / "step_00000002")
    assert (
        train(
            data,
            run_dir,
            "--from_checkpoint",
            older,
            "--keep_last",
            "1",
            "--total_steps",
            "3",
            eval_corpus=False,
        )
        == 2
    )
    assert "holds step_00000004, newer than step_00000002" in capsys.readouterr().err
    assert [p.name for p in list_step_dirs(run_dir)] == ["step_00000002", "step_00000004"]
    assert resolve_step_dir(run_dir).name == "step_00000004"
    branch = tmp_path / "branch"
    assert (
        train(
            data,
            branch,
            "--from_checkpoint",
            older,
            "--keep_last",
            "1",
            "--total_steps",
            "3",
            eval_corpus=False,
        )
        == 0
    )
    assert [p.name for p in list_step_dirs(branch)] == ["step_00000003"]
    assert resolve_step_dir(branch).name == "step_00000003"


def test_one_writer_per_run_directory(data, tmp_path, capsys):
    """A second run into a directory another one is writing is refused with one line; once that
    process is killed, its lock is gone and the directory can be used."""
    run_dir = tmp_path / "shared"
    child = endless_run(data, run_dir, first_steps=1, stderr=subprocess.DEVNULL)
    try:
        assert train(data, run_dir, "--total_steps", "3", eval_corpus=False) == 2
        err = capsys.readouterr().err
        assert (
            f"--to_checkpoint {run_dir} is in use by another training process (pid "
            f"{child.pid})" in err
        )
        assert len(err.strip().splitlines()) == 1
    finally:
        child.kill()
        child.wait(timeout=60)
    assert train(data, run_dir, "--total_steps", "3", eval_corpus=False) == 0
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]


ENDLESS = 100000  # steps of a run that a test stops


def endless_run(
    data: TinyData, run_dir: Path, first_steps: int, stderr: int = subprocess.PIPE
) -> subprocess.Popen:
    """A training run in a child process, returned once it has done ``first_steps`` steps; it
    would go on for ENDLESS steps, saving nothing on the way."""
    command = [
        sys.executable,
        "-m",
        "llama3",
        "train",
        *data.flags(run_dir, eval_corpus=False),
        *TINY,
        "--total_steps",
        str(ENDLESS),
        "--save_steps",
        str(ENDLESS),
    ]
    child = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr)
    shown, seen = re.compile(rf"(\d+)/{ENDLESS}\b"), ""
    try:  # its progress bar on stdout shows the steps done
        while not any(int(n) >= first_steps for n in shown.findall(seen[-200:])):
            chunk = os.read(child.stdout.fileno(), 4096).decode(errors="replace")
            assert chunk, f"training ended before reaching step {first_steps}"
            seen += chunk
    except BaseException:
        child.kill()
        raise
    return child


def test_ctrl_c_saves_then_resumes(data, tmp_path):
    run_dir = tmp_path / "interrupted"
    child = endless_run(data, run_dir, first_steps=3)
    try:
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=300)
        err = err.decode()
    finally:
        child.kill()
    assert child.returncode == 130, err[-2000:]
    assert "stopping after this step" in err
    steps = [r["step"] for r in records(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    assert resolve_step_dir(run_dir).name == f"step_{steps[-1]:08d}"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert (
        train(
            data,
            run_dir,
            "--total_steps",
            str(steps[-1] + 2),
            "--from_checkpoint",
            str(run_dir),
            eval_corpus=False,
        )
        == 0
    )
    assert [r["step"] for r in records(run_dir)] == list(range(1, steps[-1] + 3))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data, tmp_path, capsys):
    run_dir = tmp_path / "exploding"
    # An absurd learning rate: the first update is finite, the second step's loss is not.
    status = train(
        data,
        run_dir,
        "--base_lr",
        "1e20",
        "--warmup_steps",
        "0",
        "--total_steps",
        "5",
        "--save_steps",
        "1",
        eval_corpus=False,
    )
    err = capsys.readouterr().err
    assert status == 3
    assert "non-finite values at step 2" in err and "first non-finite gradient: " in err
    assert [p.name for p in list_step_dirs(run_dir)] == ["step_00000001"]
    assert not list(run_dir.glob("*.tmp"))
    assert resolve_step_dir(run_dir).name == "step_00000001"
    assert load_checkpoint(run_dir) is not None
    error = records(run_dir, "error")
    assert len(error) == 1 and error[0]["step"] == 2


# -------------------------------------------------------------------------------- errors


def test_usage_errors_name_the_flag(data, tmp_path, capsys):
    cases = [
        (["--train_corpus", str(tmp_path / "missing")], "--train_corpus"),
        (["--tokenizer", str(tmp_path / "missing.model")], "--tokenizer"),
        (["--accumulation_steps", "3"], "--accumulation_steps 3 must divide --batch_size 8"),
        (["--warmup_steps", "10", "--total_steps", "10"], "--warmup_steps"),
    ]
    for flags, message in cases:
        assert train(data, tmp_path / "run", *flags) == 2
        assert message in capsys.readouterr().err
    small = write_corpus(tmp_path / "small_eval", 2, seed=3)
    assert train(data, tmp_path / "run", "--eval_corpus", str(small)) == 2
    assert "--eval_corpus" in capsys.readouterr().err


def test_multitrain_needs_torchrun(data, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["multitrain", *data.flags(tmp_path / "run"), *TINY]) == 2
    assert "torchrun" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- FSDP


def test_fsdp_two_processes_match_one_and_resume(data, tmp_path):
    """Two gloo processes × 4 windows (FSDP2) = one process × 8 windows: same windows per step,
    same losses; the sharded checkpoint resumes exactly and its model.pt loads without torchrun."""
    common = [
        *TINY,
        "--accumulation_steps",
        "2",
        "--total_steps",
        "4",
        "--save_steps",
        "2",
        "--eval_steps",
        "2",
        "--eval_batches",
        "2",
    ]
    single = tmp_path / "single"
    assert train(data, single, *common) == 0
    sharded = tmp_path / "fsdp"
    done = torchrun("multitrain", *data.flags(sharded), *common, "--batch_size", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in ("train", "eval"):
        assert [r["step"] for r in records(single, kind)] == [
            r["step"] for r in records(sharded, kind)
        ]
        for a, b in zip(losses(single, kind), losses(sharded, kind)):
            assert b == pytest.approx(a, rel=1e-5)
    step_dir = sharded / "step_00000004"
    assert {p.name for p in step_dir.iterdir()} == {
        "model.pt",
        "trainer.pt",
        "state",
        "rank_00000.pt",
        "rank_00001.pt",
    }
    assert len(list((step_dir / "state").glob("*.distcp"))) == 2
    one, two = load_checkpoint(single), load_checkpoint(sharded)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)

    resumed = tmp_path / "fsdp_resumed"
    done = torchrun(
        "multitrain",
        *data.flags(resumed),
        *common,
        "--batch_size",
        "4",
        "--from_checkpoint",
        str(sharded / "step_00000002"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(resumed) == losses(sharded)
    assert losses(resumed, "eval") == losses(sharded, "eval")


def multitrain_script(
    data: TinyData,
    root: Path,
    port: int,
    script: str = "multitrain_llama3.sh",
    *,
    prefix: Sequence[str] = (),
    flags: Sequence[str] = (),
    **extra: str,
) -> subprocess.Popen:
    """./multitrain_llama3.sh (or ``script``, with ``extra`` environment and more ``flags``, run
    through the command ``prefix``): 2 processes through torchrun's c10d rendezvous on this host,
    one restart allowed, 60 steps saved every 5."""
    settings = {
        "TRAIN_CORPUS": data.train, "EVAL_CORPUS": data.eval, "TOKENIZER": data.tokenizer,
        "N_LAYERS": 2, "DIM": 32, "CORE_DIMS": 16, "MAX_SEQ_LENS": 32, "BATCH_SIZE": 4,
        "TOTAL_STEPS": 60, "EVAL_STEPS": 30, "EVAL_BATCHES": 2, "SAVE_STEPS": 5,
        "BASE_LR": "3e-3", "PRECISION_FLAGS": "", "CHECKPOINT_ROOT": root, "NPROC_PER_NODE": 2,
        "MAX_RESTARTS": 1, "RDZV_ENDPOINT": f"127.0.0.1:{port}", "PYTHON": sys.executable,
    }  # fmt: skip
    env = {**ENV, **{k: str(v) for k, v in settings.items()}, **extra}
    return subprocess.Popen(
        [*prefix, f"./{script}", "--warmup_steps", "2", "--no-tensorboard", *flags],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a scheduler's job has
    )


def wait_for_step(job: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while not (run_dir / f"step_{step:08d}").is_dir() and job.poll() is None:
        assert time.monotonic() < deadline, f"no checkpoint at step {step}"
        time.sleep(0.05)


def same_run(a: Path, b: Path) -> None:
    """The last loss recorded for each step (a rerun step's last), and the final weights."""
    last = [{r["step"]: r["loss"] for r in records(run)} for run in (a, b)]
    assert sorted(last[1]) == list(range(1, 61)) and last[1] == last[0]
    one, two = load_checkpoint(a), load_checkpoint(b)
    for (name, x), y in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(x, y), name


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workers_of(run_dir: Path) -> list[int]:
    """The training processes (not torchrun's agent) writing ``run_dir``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if str(run_dir) in text and "multitrain" in text and "torch.distributed.run" not in text:
            found.append(int(proc.name))
    return found


RUN = "softplus_core16_seq32"


def uninterrupted_multitrain(data: TinyData, root: Path) -> Path:
    """The multitrain script's run into ``root``, two processes on this host, never interrupted;
    its run directory."""
    job = multitrain_script(data, root, free_port())
    out = job.communicate(timeout=300)[0]
    assert job.returncode == 0, out[-3000:]
    return root / RUN


@pytest.fixture(scope="module")
def straight_multitrain(data, tmp_path_factory) -> Path:
    """The multitrain script's run, never interrupted."""
    return uninterrupted_multitrain(data, tmp_path_factory.mktemp("straight_multitrain"))


def test_multitrain_script_restarts_a_killed_worker_and_resumes_a_stopped_job(
    data, straight_multitrain, tmp_path
):
    """A worker killed after the step-5 checkpoint: torchrun restarts the workers, which continue
    from the newest checkpoint by themselves. SIGTERM to every process of the job (as a scheduler
    sends it): a checkpoint, and the same command again finishes the run. Both end as the run
    that was never interrupted, bit for bit."""
    run = RUN
    killed = multitrain_script(data, tmp_path / "killed", free_port())
    wait_for_step(killed, tmp_path / "killed" / run, 5)
    victims = workers_of(tmp_path / "killed" / run)
    assert len(victims) == 2 and not (tmp_path / "killed" / run / "step_00000060").exists()
    os.kill(victims[0], signal.SIGKILL)
    out = killed.communicate(timeout=300)[0]
    assert killed.returncode == 0, out[-3000:]
    assert "resumed from" in out
    same_run(straight_multitrain, tmp_path / "killed" / run)

    stopped = multitrain_script(data, tmp_path / "stopped", free_port())
    wait_for_step(stopped, tmp_path / "stopped" / run, 5)
    os.killpg(stopped.pid, signal.SIGTERM)
    out = stopped.communicate(timeout=300)[0]
    summary = json.loads((tmp_path / "stopped" / run / "summary.json").read_text())
    assert summary["status"] == "interrupted", out[-3000:]
    assert summary["steps"] < 60 and resolve_step_dir(tmp_path / "stopped" / run).name == (
        f"step_{summary['steps']:08d}"
    )
    again = multitrain_script(data, tmp_path / "stopped", free_port())
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "resumed from" in out, out[-3000:]
    same_run(straight_multitrain, tmp_path / "stopped" / run)


SLURM_STUBS = {  # what the batch script asks of Slurm, done on this host
    "srun": """
        while [[ "${1:-}" == --* ]]; do shift; done  # one task on the one node
        echo $$ > "$STUBS/step_pgid"  # the step: a process group of its own, as slurmstepd's
        exec python3 -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@"
    """,
    "scancel": 'kill -s "${1#--signal=}" -- "-$(cat "$STUBS/step_pgid")"',
    "scontrol": """
        case "$1" in
          show) echo 127.0.0.1 ;;
          requeue) echo "$2" >> "$STUBS/requeued" ;;
        esac
    """,
}


def test_slurm_script_stops_at_a_checkpoint_before_the_time_limit_and_the_requeued_job_finishes(
    data, straight_multitrain, tmp_path
):
    """slurm_llama3.sbatch with srun, scancel and scontrol played on this host: the time-limit
    signal (USR1 to the batch script) stops the training step at a checkpoint and requeues the
    job; the requeued job (the same script again) continues and ends as the uninterrupted run."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in SLURM_STUBS.items():
        (stubs / name).write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        (stubs / name).chmod(0o755)
    slurm = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "STUBS": str(stubs),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    root, run_dir = tmp_path / "job", tmp_path / "job" / RUN

    def submit() -> subprocess.Popen:
        env = {**slurm, "RDZV_PORT": str(free_port()), "RDZV_ENDPOINT": ""}
        return multitrain_script(data, root, 0, script="slurm_llama3.sbatch", **env)

    job = submit()
    wait_for_step(job, run_dir, 5)
    os.kill(job.pid, signal.SIGUSR1)
    out = job.communicate(timeout=300)[0]
    assert job.returncode == 0 and "requeueing the job" in out, out[-3000:]
    assert (stubs / "requeued").read_text() == "4242\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] < 60

    requeued = submit()
    out = requeued.communicate(timeout=300)[0]
    assert requeued.returncode == 0 and "resumed from" in out, out[-3000:]
    same_run(straight_multitrain, run_dir)


def test_fsdp_bf16_matches_one_process(data, tmp_path):
    """Pure bf16 parameters under FSDP2 (fp32 gradient reduction) over two gloo processes follow
    the one-process bf16 run, and the consolidated checkpoint holds bf16 weights."""
    common = [*TINY, "--bf16", "--total_steps", "4", "--save_steps", "4"]
    single = tmp_path / "single"
    assert train(data, single, *common, eval_corpus=False) == 0
    sharded = tmp_path / "fsdp"
    done = torchrun(
        "multitrain", *data.flags(sharded, eval_corpus=False), *common, "--batch_size", "4"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "precision bf16, FSDP2" in done.stdout
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-3)
    weights = read_model_file(sharded)["model"]
    assert weights and all(w.dtype == torch.bfloat16 for w in weights.values())


# ---------------------------------------------------------- precision and compilation


def test_compile_matches_eager(data, tmp_path):
    """--compile (each block through torch.compile, here with the CPU's C++ code generator) trains
    and evaluates like eager mode, and its checkpoint loads as a plain model."""
    flags = [*TINY, "--total_steps", "4", "--eval_steps", "2", "--eval_batches", "2"]
    eager = tmp_path / "eager"
    assert train(data, eager, *flags) == 0
    compiled = tmp_path / "compiled"
    command = [sys.executable, "-m", "llama3", "train", *data.flags(compiled), *flags, "--compile"]
    done = subprocess.run(
        command,
        env={**ENV, "TORCHINDUCTOR_COMPILE_THREADS": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in ("train", "eval"):
        assert losses(compiled, kind) == pytest.approx(losses(eager, kind), rel=1e-5)
    for (name, a), b in zip(
        load_checkpoint(eager).state_dict().items(), load_checkpoint(compiled).state_dict().values()
    ):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_amp_fp16_skips_overflowing_steps_and_resumes_its_scaler(data, tmp_path, monkeypatch):
    """--amp_fp16: a gradient scaler starting too high makes fp16 gradients overflow; those steps
    are skipped (and recorded), the scale falls, and a resumed run continues with the scale the
    checkpoint holds, so it repeats the uninterrupted run exactly."""
    from llama3.training import build

    init_scale = 2.0**24  # far above what these gradients allow in fp16
    monkeypatch.setattr(build, "GradScaler", partial(build.GradScaler, init_scale=init_scale))
    flags = ["--amp_fp16", "--total_steps", "8", "--save_steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(data, straight, *flags, eval_corpus=False) == 0
    assert (
        train(
            data,
            resumed,
            *flags,
            "--from_checkpoint",
            str(straight / "step_00000004"),
            eval_corpus=False,
        )
        == 0
    )

    def outcome(run_dir: Path, first: int = 1) -> list[tuple]:
        return [
            (r["step"], r["loss"], str(r["grad_norm"]), r.get("skipped", False))
            for r in records(run_dir)
            if r["step"] >= first
        ]

    skipped = [step for step, _, _, skip in outcome(straight) if skip]
    assert skipped and skipped[0] == 1
    assert all(math.isfinite(loss) for loss in losses(straight))  # only gradients overflowed
    assert outcome(resumed) == outcome(straight)
    scale = {
        run: torch.load(run / "step_00000008" / "trainer.pt", weights_only=True)["scaler"]["scale"]
        for run in (straight, resumed)
    }
    saved = torch.load(straight / "step_00000004" / "trainer.pt", weights_only=True)
    assert saved["scaler"]["scale"] < init_scale
    assert scale[resumed] == scale[straight] < init_scale


# ----------------------------------------------------------------- stored trajectory

TRAJECTORY_FLAGS = {
    "softplus": ["--attention", "softplus", "--total_steps", "8"],
    "softmax": ["--attention", "softmax", "--total_steps", "8"],
}


def trajectory(data: TinyData, root: Path) -> dict[str, list[float]]:
    result = {}
    for name, flags in TRAJECTORY_FLAGS.items():
        assert train(data, root / name, *flags, "--save_steps", "8", eval_corpus=False) == 0
        result[name] = losses(root / name)
    return result


def test_loss_trajectory_matches_stored(data, tmp_path):
    stored = json.loads(TRAJECTORY.read_text())
    assert stored["flags"] == TINY and stored["runs"] == TRAJECTORY_FLAGS
    current = trajectory(data, tmp_path)
    for name, expected in stored["losses"].items():
        assert current[name] == pytest.approx(expected, rel=2e-5, abs=1e-5), (
            f"{name}: the loss trajectory changed; if intended, regenerate it "
            "(python tests/integration/test_training.py --regenerate)"
        )


def regenerate() -> None:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        current = trajectory(TinyData(Path(tmp) / "data"), Path(tmp) / "runs")
    TRAJECTORY.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "about": "training losses of the tiny configurations in tests/integration/test_training.py "
        "(one CPU thread, fp32); regenerate with "
        "python tests/integration/test_training.py --regenerate",
        "torch": torch.__version__,
        "flags": TINY,
        "runs": TRAJECTORY_FLAGS,
        "losses": current,
    }
    TRAJECTORY.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {TRAJECTORY}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/integration/test_training.py --regenerate")
    regenerate()
