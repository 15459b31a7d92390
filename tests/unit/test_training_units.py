"""Training pieces on their own: learning-rate schedule, optimiser groups, the non-finite guard,
activation checkpointing, metrics files and MFU, flag checks."""

import argparse
import json
import math
import os
import signal

import pytest
import torch

from llama3 import ModelArgs, Transformer
from llama3.errors import UsageError
from llama3.training.distributed import Distributed
from llama3.training.flags import TrainingConfig, add_training_flags
from llama3.training.guard import NonFiniteError, check_finite, first_nonfinite_grad
from llama3.training.metrics import MetricsLog, Throughput, peak_tflops
from llama3.training.optim import LRSchedule, parameter_groups, total_grad_norm
from llama3.training.parallel import ParallelPlan, parallelize

CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer.build(
        ModelArgs(
            attention="softmax",
            dim=32,
            n_layers=2,
            n_heads=4,
            vocab_size=50,
            multiple_of=16,
            max_seq_len=16,
        )
    )


def backward(model: Transformer, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    tokens = torch.randint(0, 50, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    return loss


# ---------------------------------------------------------------------------- schedule


def test_linear_schedule_warms_up_then_decays_to_min():
    s = LRSchedule(base_lr=1.0, warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [s(i) for i in range(4, 14)]
    assert decay[0] == 1.0 and all(a > b for a, b in zip(decay, decay[1:]))
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)


def test_cosine_schedule_halfway_is_the_mean():
    s = LRSchedule(base_lr=2.0, warmup_steps=0, total_steps=100, kind="cosine", min_ratio=0.0)
    assert s(0) == 2.0 and s(50) == pytest.approx(1.0) and s(100) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_only_on_matrices():
    decay, plain = parameter_groups(tiny_model(), 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert len(decay["params"]) + len(plain["params"]) == len(list(tiny_model().parameters()))


# ------------------------------------------------------------------------------- guard


def test_guard_names_the_first_parameter_with_a_non_finite_gradient():
    model = tiny_model()
    backward(model)
    assert first_nonfinite_grad(model, Distributed.single("cpu")) is None
    model.layers[1].feed_forward.w3.weight.grad[3, 2] = float("inf")
    model.output.weight.grad[0, 0] = float("nan")
    norm = total_grad_norm(model.parameters()).item()
    assert not math.isfinite(norm)
    with pytest.raises(
        NonFiniteError,
        match=r"step 7: first non-finite gradient: "
        r"layers\.1\.feed_forward\.w3\.weight",
    ):
        check_finite(7, 2.5, norm, model, Distributed.single("cpu"))


def test_guard_stops_on_a_non_finite_loss_even_with_a_gradient_scaler():
    model = tiny_model()
    backward(model)
    dist = Distributed.single("cpu")
    check_finite(1, 2.5, float("inf"), model, dist, overflow_expected=True)  # the scaler skips it
    with pytest.raises(NonFiniteError, match="loss is nan"):
        check_finite(1, float("nan"), 1.0, model, dist, overflow_expected=True)


# ------------------------------------------------------------------- parallel wrappers


def test_activation_checkpointing_keeps_names_and_gradients():
    plain, wrapped = tiny_model(), tiny_model()
    parallelize(wrapped, ParallelPlan(activation_checkpointing=True), CPU)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    backward(plain)
    backward(wrapped)
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


# ----------------------------------------------------------------------------- metrics


def test_mfu_from_flops_and_peak():
    throughput = Throughput(tokens_per_step=1000, flops_per_token=6e6, peak_flops=1e12)
    tokens_per_s, mfu = throughput.add(0.5)
    assert tokens_per_s == 2000 and mfu == pytest.approx(2000 * 6e6 / 1e12)
    assert peak_tflops(CPU, "fp32", False, 123.0) == (123.0, "--peak_tflops")
    assert peak_tflops(CPU, "bf16", False, None)[0] is None


def test_metrics_log_rewrites_history_and_appends(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 9, "loss": 0.0}\n')
    history = [{"kind": "train", "step": 1, "loss": 3.0}]  # as restored from a checkpoint
    log = MetricsLog(
        tmp_path, main=True, history=history, start_step=1, total_steps=3, tensorboard=False
    )
    log.write({"kind": "train", "step": 2, "loss": 2.0, "lr": 0.1, "tokens_per_s": 10.0})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]  # the record past the checkpoint is gone
    assert len(history) == 2


# ------------------------------------------------------------------------------- flags


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_training_flags(parser, multiprocess=True)
    return parser.parse_args(
        ["--train_corpus", "c", "--tokenizer", "t", "--to_checkpoint", "r", *argv]
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch_size", "0"], "--batch_size"),
        (["--batch_size", "6", "--accumulation_steps", "4"], "--accumulation_steps 4 must divide"),
        (["--total_steps", "10", "--warmup_steps", "10"], "--warmup_steps 10"),
        (["--min_lr_ratio", "2"], "--min_lr_ratio"),
        (["--prefetching", "-1"], "--prefetching"),
    ],
)
def test_bad_flags_are_refused(argv, message):
    with pytest.raises(UsageError, match=message):
        TrainingConfig.from_args(parse(*argv))


def test_precision_modes_exclude_each_other():
    with pytest.raises(SystemExit):
        parse("--amp_fp16", "--bf16")


def test_default_warmup_is_five_percent():
    config = TrainingConfig.from_args(parse("--total_steps", "200"))
    assert config.optim.warmup_steps == 10


def test_async_checkpoint_is_chosen_by_each_process_not_recorded():
    """How checkpoints are written is no setting of the run: a checkpoint does not record it (so
    it holds the same either way), and a resumed run writes as its own flags say."""
    assert not TrainingConfig.from_args(parse()).checkpoints.async_checkpoint
    config = TrainingConfig.from_args(parse("--async_checkpoint"))
    assert config.checkpoints.async_checkpoint and "async_checkpoint" not in config.flags
    assert config.flags == TrainingConfig.from_args(parse()).flags


def test_a_repeated_sigterm_still_saves_and_a_second_ctrl_c_quits(capsys):
    """Launchers pass a job's SIGTERM on to workers that already have it: the stop request holds
    and nothing quits; a second Ctrl-C is a person asking to quit without saving."""
    from llama3.training.interrupt import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install()
    try:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        assert capsys.readouterr().err.count("stopping after this step") == 1
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a request, already made
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
