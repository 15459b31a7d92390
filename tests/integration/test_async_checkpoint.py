"""Checkpoints written in the background (``--async_checkpoint``), through the real CLI and
torch.distributed.checkpoint's real ``async_save``, on the tiny data of test_training.py.

Covers: a run's checkpoints hold what a synchronous run's hold (the losses, weights, optimizer
moments, data position and random generators of their step), even when training took two more
optimizer steps while the step was being written; they resume bit for bit, with one process and
with two under FSDP; a process killed while a save is in flight leaves the previous checkpoint as
the newest and ``--from_checkpoint auto`` continues from it to the uninterrupted run's end; a
background save that fails stops the run with one line; and the stall benchmark's ``--tiny`` mode.

The tests hold a save in flight with a slow storage layer of their own: torch's file writer waits
until the run has recorded a given step (or forever), so what is in flight when is certain, not a
matter of timing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training import ENV, REPO, STRAIGHT, TINY, TinyData, losses, records, train

from llama3.checkpoint import list_step_dirs, resolve_step_dir, step_of

pytestmark = pytest.mark.usefixtures("one_thread")

MEASURED = {"elapsed_s", "tokens_per_s", "mfu", "peak_memory_gib"}  # differ between any two runs


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TinyData:
    return TinyData(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory) -> Path:
    """test_training's straight run: 6 steps saved synchronously at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert train(data, run_dir, *STRAIGHT) == 0
    return run_dir


def without_measurements(value: Any) -> Any:
    """A checkpoint record with the wall-clock measurements left out, at any depth."""
    if isinstance(value, dict):
        return {k: without_measurements(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, (list, tuple)):
        return [without_measurements(v) for v in value]
    return value


def step_content(step_dir: Path, scratch: Path) -> dict[str, Any]:
    """Everything a step directory holds: its records and its sharded state, read back."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    content = {f.name: torch.load(f, weights_only=True) for f in sorted(step_dir.glob("*.pt"))}
    scratch.mkdir(parents=True, exist_ok=True)
    state_file = scratch / f"{step_dir.parent.name}_{step_dir.name}.pt"
    dcp_to_torch_save(step_dir / "state", state_file)
    content["state"] = torch.load(state_file, weights_only=True)
    return without_measurements(content)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal to the last bit: tensors, numbers, strings, nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: {sorted(a)} {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def same_checkpoints(a: Path, b: Path, scratch: Path, *, first: int = 0) -> None:
    """The step directories of runs ``a`` and ``b`` from step ``first`` on, the same ones holding
    the same content."""
    steps = [p.name for p in list_step_dirs(a) if step_of(p) >= first]
    assert steps and steps == [p.name for p in list_step_dirs(b) if step_of(p) >= first]
    for name in steps:
        assert_same(step_content(a / name, scratch), step_content(b / name, scratch), name)


def wait_for(condition, what: str, child: subprocess.Popen | None = None) -> None:
    """Until ``condition()`` holds (a file the run writes); fails after two minutes."""
    deadline = time.monotonic() + 120
    while not condition():
        assert child is None or child.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after two minutes"
        time.sleep(0.02)


def has_step(run_dir: Path, step: int) -> bool:
    """Whether metrics.jsonl records training step ``step``."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and f'"step": {step},' in metrics.read_text()


@pytest.fixture
def held_write(monkeypatch):
    """``held_write(step, until)``: torch's file writer writes the shards of ``step`` only once
    ``until()`` holds (a slow storage layer: the save stays in flight meanwhile)."""
    from torch.distributed.checkpoint import filesystem

    write = filesystem.FileSystemWriter.write_data

    def hold(step: int, until) -> None:
        def held(self, plan, planner):
            if f"step_{step:08d}" in str(self.path):
                wait_for(until, f"release of the step-{step} save")
            return write(self, plan, planner)

        monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", held)

    return hold


def test_background_checkpoints_hold_their_step_and_resume_exactly(
    data, straight_run, held_write, tmp_path
):
    """The step-3 save stays in flight until training has recorded step 5 (two optimizer steps
    later): every checkpoint still equals the synchronous run's, and resuming the background
    run's step 3 in the background again repeats the run bit for bit."""
    background = tmp_path / "background"
    held_write(3, lambda: has_step(background, 5))
    assert train(data, background, *STRAIGHT, "--async_checkpoint") == 0
    assert losses(background) == losses(straight_run)
    same_checkpoints(straight_run, background, tmp_path / "scratch")
    summary = json.loads((background / "summary.json").read_text())
    assert len(summary["checkpoint_stall_s"]) == 2

    resumed = tmp_path / "resumed"
    step_3 = str(background / "step_00000003")
    assert train(data, resumed, *STRAIGHT, "--async_checkpoint", "--from_checkpoint", step_3) == 0
    for kind in ("train", "eval"):
        assert losses(resumed, kind) == losses(straight_run, kind)
    same_checkpoints(straight_run, resumed, tmp_path / "scratch", first=4)


HELD_SAVE = textwrap.dedent("""
    # python HELD_SAVE STEP UNTIL RUN_DIR LLAMA3_ARGS...: llama3 whose storage holds the shards
    # of step STEP (after writing RUN_DIR.in_flight) until RUN_DIR/metrics.jsonl records step
    # UNTIL, or forever (UNTIL 0)
    import sys
    import time
    from pathlib import Path

    from torch.distributed.checkpoint import filesystem

    step, until, run_dir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    write = filesystem.FileSystemWriter.write_data

    def recorded():
        metrics = run_dir / "metrics.jsonl"
        return metrics.is_file() and f'"step": {until},' in metrics.read_text()

    def held(self, plan, planner):
        if f"step_{step:08d}" in str(self.path):
            Path(f"{run_dir}.in_flight").write_text(str(step))
            while not (until and recorded()):
                time.sleep(0.02)
        return write(self, plan, planner)

    filesystem.FileSystemWriter.write_data = held
    from llama3.__main__ import main

    sys.exit(main(sys.argv[4:]))
""")


def held_save(tmp_path: Path, step: int, until: int, run_dir: Path) -> list[str]:
    """The command line of a script that runs llama3 (the arguments that follow) with the
    shards of ``step`` held until ``run_dir`` records step ``until`` (0: forever)."""
    script = tmp_path / "held_save.py"
    script.write_text(HELD_SAVE)
    return [str(script), str(step), str(until), str(run_dir)]


def test_a_process_killed_mid_save_resumes_from_the_previous_checkpoint(data, tmp_path):
    """SIGKILL while step 4 is being written in the background (training has gone on to step 6,
    where the next save waits for it): step 2 stays the newest checkpoint, and the same command
    line continues from it to the end of the uninterrupted run, each step once in metrics.jsonl."""
    flags = [*TINY, "--dropout", "0.1", "--total_steps", "8", "--save_steps", "2"]
    straight = tmp_path / "straight"
    assert train(data, straight, *flags, eval_corpus=False) == 0
    run_dir = tmp_path / "run"
    command = [
        "train",
        *data.flags(run_dir, eval_corpus=False),
        *flags,
        "--async_checkpoint",
        "--from_checkpoint",
        "auto",
    ]
    child = subprocess.Popen(
        [sys.executable, *held_save(tmp_path, 4, 0, run_dir), *command],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = Path(f"{run_dir}.in_flight")
    try:
        wait_for(lambda: marker.exists() and has_step(run_dir, 6), "step 6", child)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert (run_dir / "step_00000004.tmp").is_dir()
    assert [p.name for p in list_step_dirs(run_dir)] == ["step_00000002"]
    assert resolve_step_dir(run_dir).name == "step_00000002"

    from llama3.__main__ import main

    assert main(command) == 0
    assert [r["step"] for r in records(run_dir)] == list(range(1, 9))
    assert losses(run_dir) == losses(straight)
    assert not list(run_dir.glob("*.tmp"))
    same_checkpoints(straight, run_dir, tmp_path / "scratch")


def test_a_failed_background_save_stops_the_run_with_one_line(data, tmp_path, monkeypatch, capsys):
    """A full disk while step 4 is written in the background: the run stops with the error of a
    failed save (exit 2), nothing of step 4 is left and step 2 stays the newest checkpoint."""
    from torch.distributed.checkpoint import filesystem

    def full(self, plan, planner):
        if "step_00000004" in str(self.path):
            raise OSError(28, "No space left on device")
        return write(self, plan, planner)

    write = filesystem.FileSystemWriter.write_data
    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", full)
    run_dir = tmp_path / "full"
    flags = ["--total_steps", "8", "--save_steps", "2", "--async_checkpoint"]
    assert train(data, run_dir, *flags, eval_corpus=False) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: cannot write checkpoint {run_dir / 'step_00000004'}: No space left on device "
        "(free some disk space there, or save elsewhere); nothing of it was kept, the newest "
        "checkpoint is still step_00000002"
    )
    assert [p.name for p in list_step_dirs(run_dir)] == ["step_00000002"]
    assert not list(run_dir.glob("*.tmp"))


def test_async_checkpoint_is_refused_where_torch_cannot_save_in_the_background(
    data, tmp_path, monkeypatch, capsys
):
    import torch.distributed.checkpoint as dcp

    monkeypatch.delattr(dcp, "async_save")
    assert train(data, tmp_path / "run", "--total_steps", "4", "--async_checkpoint") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --async_checkpoint needs torch.distributed.checkpoint.async_save")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_background_checkpoints_under_fsdp_equal_synchronous_ones(data, tmp_path):
    """Two gloo processes (FSDP2), the step-2 shards held until training has recorded step 4:
    the background save's shards, records and model file equal a synchronous run's, and its
    step 2 resumes in the background bit for bit."""
    common = [*TINY, "--batch_size", "4", "--total_steps", "6", "--save_steps", "2"]
    runs = {name: tmp_path / name for name in ("sync", "background", "resumed")}
    step_2 = str(runs["background"] / "step_00000002")
    launch = {
        "sync": ["-m", "llama3"],
        "background": held_save(tmp_path, 2, 4, runs["background"]),
        "resumed": ["-m", "llama3"],
    }
    extra = {
        "sync": [],
        "background": ["--async_checkpoint"],
        "resumed": ["--async_checkpoint", "--from_checkpoint", step_2],
    }
    for name, run_dir in runs.items():
        flags = data.flags(run_dir, eval_corpus=False)
        done = subprocess.run(
            [*TORCHRUN, *launch[name], "multitrain", *flags, *common, *extra[name]],
            env=ENV,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert Path(f"{runs['background']}.in_flight").exists()
    same_checkpoints(runs["sync"], runs["background"], tmp_path / "scratch")
    assert losses(runs["resumed"]) == losses(runs["sync"])
    same_checkpoints(runs["sync"], runs["resumed"], tmp_path / "scratch", first=3)


def test_checkpoint_stall_benchmark_tiny(tmp_path):
    """``python -m benchmarks.checkpoint_stall --tiny``: both modes measured, the table printed
    and the JSON written."""
    output = tmp_path / "stall.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.checkpoint_stall",
            "--tiny",
            "--work_dir",
            str(tmp_path / "work"),
            "--output",
            str(output),
        ],
        env={**ENV, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    assert [row["mode"] for row in results["rows"]] == ["synchronous", "--async_checkpoint"]
    for row in results["rows"]:
        assert row["saves"] == results["saves"] == 3 and row["same_losses"] is True
        assert len(row["stalls_ms"]) == 3 and all(ms > 0 for ms in row["stalls_ms"])
    assert "| --async_checkpoint | 3 |" in done.stdout and "stall_ms" in done.stdout
