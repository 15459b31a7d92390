"""Checkpoints: the training-state round trip, atomic publication (a save interrupted by an error
or by SIGKILL leaves the previous checkpoint loadable), pruning, random-number state, and saves
written in the background (the state of their step, published once written, errors raised)."""

import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import llama3.checkpoint as ckpt
import llama3.checkpoint.saving as saving
from llama3 import ModelArgs, Transformer, load_checkpoint
from llama3.training.distributed import Distributed

ARGS = dict(attention="softplus", dim=32, n_layers=2, vocab_size=61, core_dim=16, max_seq_len=16)
REPO = Path(__file__).resolve().parents[2]


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer.build(ModelArgs(**ARGS))


def trained(model: Transformer) -> torch.optim.AdamW:
    """An optimizer with state after one step (so its moments are non-trivial)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 61, (2, 16))).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return opt


class Piece:
    """A piece of training state that is a plain dict."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def training_state(
    model: Transformer, opt: torch.optim.Optimizer, step: int = 0
) -> ckpt.TrainingState:
    return ckpt.TrainingState(
        model,
        opt,
        shared={"history": Piece({"records": [{"kind": "train", "step": step}]})},
        per_process={
            "data": Piece({"position": step}),
            "rng": ckpt.RandomState(torch.device("cpu")),
        },
    )


def save(root: Path, step: int, model: Transformer, opt: torch.optim.Optimizer, **kw) -> Path:
    group = Distributed.single("cpu")
    return ckpt.save_training_checkpoint(
        root,
        step,
        training_state(model, opt, step),
        model_state=model.state_dict(),
        model_args=model.args,
        tokenizer={"path": "t.model", "sha256": "abc"},
        group=group,
        **kw,
    )


def test_training_state_round_trip(tmp_path):
    model = tiny_model()
    opt = trained(model)
    path = save(tmp_path, 7, model, opt)
    assert path == tmp_path / "step_00000007"
    assert {p.name for p in path.iterdir()} == {"model.pt", "trainer.pt", "state", "rank_00000.pt"}
    assert (tmp_path / "latest").read_text().strip() == path.name

    fresh = tiny_model(seed=1)
    fresh_opt = trained(fresh)
    step_dir, record = ckpt.read_trainer_record(tmp_path)
    assert step_dir == path and record["step"] == 7 and record["world_size"] == 1
    assert ModelArgs.from_dict(record["model_args"]) == model.args
    group = Distributed.single("cpu")
    assert ckpt.read_rank_record(step_dir, group.rank)["data"] == {"position": 7}
    ckpt.load_training_state(step_dir, fresh, fresh_opt, group)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(
            a["exp_avg_sq"], b["exp_avg_sq"]
        )

    loaded = load_checkpoint(
        tmp_path
    )  # the consolidated model, as evaluate/deploy/generate read it
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_restore_puts_every_piece_back_and_needs_the_same_process_count(tmp_path):
    model = tiny_model()
    opt = trained(model)
    save(tmp_path, 7, model, opt)
    expected = torch.rand(4)  # what the generators give after the save
    fresh = tiny_model(seed=1)
    state = training_state(fresh, trained(fresh))
    step_dir, record = ckpt.read_trainer_record(tmp_path)
    with pytest.raises(ckpt.UsageError, match="written by 1 process.*not 2"):
        ckpt.restore_training_checkpoint(
            step_dir, record, state, Distributed(device=torch.device("cpu"), world_size=2)
        )
    assert state.per_process["data"].state == {"position": 0}  # refused before anything was read
    ckpt.restore_training_checkpoint(step_dir, record, state, Distributed.single("cpu"))
    assert state.per_process["data"].state == {"position": 7}
    assert state.shared["history"].state == {"records": [{"kind": "train", "step": 7}]}
    assert torch.equal(torch.rand(4), expected)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_state_names_may_not_shadow_the_record(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="step"):
        ckpt.TrainingState(model, trained(model), shared={"step": Piece()}, per_process={})


def test_save_failing_before_publish_keeps_previous(tmp_path, monkeypatch):
    model = tiny_model()
    opt = trained(model)
    save(tmp_path, 1, model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained(model)  # change the weights, then fail between staging and publishing step 2

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "publish_step_dir", crash)
    with pytest.raises(
        ckpt.UsageError, match="step_00000002: No space left on device.*still step_00000001"
    ):
        save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert not (tmp_path / "step_00000002.tmp").exists()  # removed, not left filling the disk
    assert [p.name for p in ckpt.list_step_dirs(tmp_path)] == ["step_00000001"]
    assert ckpt.read_trainer_record(tmp_path)[1]["step"] == 1
    for name, weight in load_checkpoint(tmp_path).state_dict().items():
        assert torch.equal(weight, before[name]), name
    save(tmp_path, 3, model, opt)
    assert ckpt.read_trainer_record(tmp_path)[1]["step"] == 3


def test_a_failure_that_is_not_a_write_is_raised_as_it_is(tmp_path, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(saving, "write_model_file", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save(tmp_path, 1, model, trained(model))
    assert not list(tmp_path.iterdir())


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import test_checkpoint as t
    import llama3.checkpoint.saving as saving
    root = {root!r}
    model = t.tiny_model()
    opt = t.trained(model)
    t.save(root, 1, model, opt)
    def slow_write(*args, **kwargs):  # stall mid-save so the parent can kill us there
        print("saving", flush=True)
        time.sleep(60)
    saving.write_model_file = slow_write
    t.trained(model)
    t.save(root, 2, model, opt)
""")


def test_killed_mid_save_keeps_previous(tmp_path):
    script = KILLED_SAVE.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert child.stdout.readline().strip() == "saving"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert (tmp_path / "step_00000002.tmp").is_dir()
    assert ckpt.resolve_step_dir(tmp_path).name == "step_00000001"
    assert load_checkpoint(tmp_path) is not None
    assert ckpt.read_trainer_record(tmp_path)[1]["step"] == 1


def test_keep_last_prunes_oldest_and_never_the_step_just_saved(tmp_path):
    model = tiny_model()
    opt = trained(model)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in ckpt.list_step_dirs(tmp_path)] == ["step_00000003", "step_00000004"]
    save(tmp_path, 2, model, opt, keep_last=1)  # an older step saved last stays
    assert [p.name for p in ckpt.list_step_dirs(tmp_path)] == ["step_00000002"]
    assert ckpt.resolve_step_dir(tmp_path).name == "step_00000002"


def test_model_only_checkpoint_has_no_training_record(tmp_path):
    model = tiny_model()
    ckpt.save_model_checkpoint(tmp_path, model, step=5)
    step_dir, record = ckpt.read_trainer_record(tmp_path)
    assert step_dir.name == "step_00000005" and record is None


def test_rng_state_round_trip():
    device = torch.device("cpu")
    state = ckpt.capture_rng_state(device)
    expected = (random.random(), torch.rand(3), __import__("numpy").random.rand(3))
    random.random(), torch.rand(5)  # move on
    ckpt.restore_rng_state(state, device)
    again = (random.random(), torch.rand(3), __import__("numpy").random.rand(3))
    assert expected[0] == again[0]
    assert torch.equal(expected[1], again[1])
    assert (expected[2] == again[2]).all()


def test_unreadable_training_record_is_a_usage_error(tmp_path):
    model = tiny_model()
    save(tmp_path, 1, model, trained(model))
    (tmp_path / "step_00000001" / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.UsageError, match="cannot read training record"):
        ckpt.read_trainer_record(tmp_path)


# ------------------------------------------------------------------- saved in the background


@pytest.fixture
def held_shards(monkeypatch) -> threading.Event:
    """An event torch's file writer waits for before it writes a shard under a directory named
    ``background``: until the test sets it, a save there stays in flight (a slow storage
    layer)."""
    from torch.distributed.checkpoint import filesystem

    release = threading.Event()
    write = filesystem.FileSystemWriter.write_data

    def held(self, plan, planner):
        if "background" in Path(self.path).parts:
            assert release.wait(timeout=120), "the test never released the save"
        return write(self, plan, planner)

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", held)
    return release


def start(saves: ckpt.BackgroundSaves, root: Path, step: int, model, opt) -> None:
    saves.start(
        root,
        step,
        training_state(model, opt, step),
        model_state=model.state_dict(),
        model_args=model.args,
        tokenizer={"path": "t.model", "sha256": "abc"},
    )


def restored(step_dir: Path) -> tuple[dict, dict]:
    """Model weights and optimizer moments a fresh model takes from ``step_dir``'s shards."""
    fresh = tiny_model(seed=1)
    opt = trained(fresh)
    ckpt.load_training_state(step_dir, fresh, opt, Distributed.single("cpu"))
    return fresh.state_dict(), {i: dict(s) for i, s in enumerate(opt.state.values())}


def test_a_background_save_holds_its_step_and_is_published_once_written(tmp_path, held_shards):
    """Taken at step 1, written after another optimizer step and an in-place change of every
    weight: the checkpoint equals a foreground save of step 1. It is not the newest checkpoint
    until it is written, and poll says so."""
    model = tiny_model()
    opt = trained(model)
    save(tmp_path / "foreground", 1, model, opt)
    saves = ckpt.BackgroundSaves(Distributed.single("cpu"))
    root = tmp_path / "background"
    try:
        start(saves, root, 1, model, opt)
        assert saves.in_flight and saves.poll() is None
        assert not (root / "latest").exists() and not ckpt.list_step_dirs(root)
        model(torch.randint(0, 61, (2, 16))).square().mean().backward()
        opt.step()
        with torch.no_grad():
            for weight in model.parameters():
                weight.add_(1.0)
        held_shards.set()
        assert saves.wait() == root / "step_00000001" and not saves.in_flight
    finally:
        saves.close()
    assert ckpt.resolve_step_dir(root) == root / "step_00000001"
    a, b = (restored(r / "step_00000001") for r in (tmp_path / "foreground", root))
    for name, weight in a[0].items():
        assert torch.equal(weight, b[0][name]), name
    for i, moments in a[1].items():
        for key, value in moments.items():
            assert torch.equal(value, b[1][i][key]), (i, key)
    for name, weight in load_checkpoint(tmp_path / "foreground").state_dict().items():
        assert torch.equal(weight, load_checkpoint(root).state_dict()[name]), name
    rank = [ckpt.read_rank_record(r / "step_00000001", 0) for r in (tmp_path / "foreground", root)]
    assert rank[0]["data"] == rank[1]["data"]
    assert torch.equal(rank[0]["rng"]["torch"], rank[1]["rng"]["torch"])


def test_a_failed_background_save_raises_its_error_and_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model()
    opt = trained(model)
    save(tmp_path, 1, model, opt)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "write_model_file", full)
    saves = ckpt.BackgroundSaves(Distributed.single("cpu"))
    try:
        start(saves, tmp_path, 2, model, opt)
        with pytest.raises(
            ckpt.UsageError, match="step_00000002: No space left on device.*still step_00000001"
        ):
            saves.wait()
    finally:
        saves.close()
    assert not (tmp_path / "step_00000002.tmp").exists()
    assert [p.name for p in ckpt.list_step_dirs(tmp_path)] == ["step_00000001"]
    assert ckpt.resolve_step_dir(tmp_path).name == "step_00000001"


def test_background_saves_are_refused_without_async_save(monkeypatch):
    import torch.distributed.checkpoint as dcp

    monkeypatch.delattr(dcp, "async_save")
    with pytest.raises(ckpt.UsageError, match=r"^--async_checkpoint needs .*async_save"):
        ckpt.BackgroundSaves(Distributed.single("cpu"))
