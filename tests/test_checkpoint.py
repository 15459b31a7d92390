"""Checkpoints: the training-state round trip, atomic publication (a save interrupted by an error
or by SIGKILL leaves the previous checkpoint loadable), pruning, random-number state."""

import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llama3.checkpoint as ckpt
from llama3 import ModelArgs, Transformer, load_checkpoint
from llama3.training.distributed import Distributed

ARGS = dict(attention="softplus", dim=32, n_layers=2, vocab_size=61, core_dim=16, max_seq_len=16)
REPO = Path(__file__).resolve().parents[1]


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


def save(root: Path, step: int, model: Transformer, opt: torch.optim.Optimizer, **kw) -> Path:
    group = Distributed.single("cpu")
    return ckpt.save_training_checkpoint(
        root, step, model=model, optimizer=opt, model_state=model.state_dict(),
        model_args=model.args, tokenizer={"path": "t.model", "sha256": "abc"},
        trainer_record={"history": [{"kind": "train", "step": step, "loss": 1.0}]},
        rank_record={"data": {"position": step}, "rng": ckpt.capture_rng_state(torch.device("cpu"))},
        group=group, **kw)


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
    assert ckpt.read_rank_record(step_dir, group)["data"] == {"position": 7}
    ckpt.load_training_state(step_dir, fresh, fresh_opt, group)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    loaded = load_checkpoint(tmp_path)  # the consolidated model, as evaluate/deploy/generate read it
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_save_failing_before_publish_keeps_previous(tmp_path, monkeypatch):
    model = tiny_model()
    opt = trained(model)
    save(tmp_path, 1, model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained(model)  # change the weights, then crash between staging and publishing step 2

    def crash(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr(ckpt, "publish_step_dir", crash)
    with pytest.raises(OSError):
        save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert (tmp_path / "step_00000002.tmp").is_dir()  # the half-written staging directory
    assert [p.name for p in ckpt.list_step_dirs(tmp_path)] == ["step_00000001"]
    assert ckpt.read_trainer_record(tmp_path)[1]["step"] == 1
    for name, weight in load_checkpoint(tmp_path).state_dict().items():
        assert torch.equal(weight, before[name]), name
    save(tmp_path, 3, model, opt)  # the next save removes the leftover staging directory
    assert not (tmp_path / "step_00000002.tmp").exists()
    assert ckpt.read_trainer_record(tmp_path)[1]["step"] == 3


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import test_checkpoint as t
    import llama3.checkpoint as ckpt
    root = {root!r}
    model = t.tiny_model()
    opt = t.trained(model)
    t.save(root, 1, model, opt)
    write = ckpt.write_model_file
    def slow_write(*args, **kwargs):  # stall mid-save so the parent can kill us there
        print("saving", flush=True)
        time.sleep(60)
    ckpt.write_model_file = slow_write
    t.trained(model)
    t.save(root, 2, model, opt)
""")


def test_killed_mid_save_keeps_previous(tmp_path):
    script = KILLED_SAVE.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "saving"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert (tmp_path / "step_00000002.tmp").is_dir()
    assert ckpt.resolve_step_dir(tmp_path).name == "step_00000001"
    assert load_checkpoint(tmp_path) is not None
    assert ckpt.read_trainer_record(tmp_path)[1]["step"] == 1


def test_keep_last_prunes_oldest(tmp_path):
    model = tiny_model()
    opt = trained(model)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in ckpt.list_step_dirs(tmp_path)] == ["step_00000003", "step_00000004"]


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
