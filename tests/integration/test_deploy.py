"""Deployment: ONNX export parity in ONNX Runtime at shapes unlike the export example, the TensorRT
control flow when TensorRT is missing (one line), latency statistics, and the deploy command end to
end. TensorRT against stand-ins of its two API generations: test_deploy_tensorrt.py; reduced
precision exports: test_deploy_precision.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llama3 import ModelArgs, Transformer, load_checkpoint
from llama3.deploy import latency
from llama3.deploy.onnx_export import (
    EXAMPLE_BATCH,
    EXAMPLE_CACHE,
    EXAMPLE_QUERY,
    INPUT_NAMES,
    OUTPUT_NAMES,
    export_onnx,
)
from llama3.deploy.runners import OnnxRuntimeRunner, TorchRunner
from llama3.deploy.tensorrt import EngineTyping, missing_message, profile_shapes, trtexec_command
from llama3.model.transformer import cache_shape

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "softmax": dict(
        attention="softmax",
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=61,
        multiple_of=16,
        max_seq_len=64,
    ),
    "softplus": dict(
        attention="softplus", dim=32, n_layers=2, core_dim=16, vocab_size=61, max_seq_len=64
    ),
}


def tiny_model(attention: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer.build(ModelArgs(**TINY[attention])).eval()


def cached_inputs(model: Transformer, batch: int, query: int, cached: int):
    """Tokens (batch, query) and a real cache of ``cached`` positions made by the model."""
    g = torch.Generator().manual_seed(batch * 100 + query * 10 + cached)
    k, v = model.empty_export_cache(batch, "cpu", torch.float32)
    if cached:
        with torch.no_grad():
            _, k, v = model(torch.randint(0, 61, (batch, cached), generator=g), k, v)
    return torch.randint(0, 61, (batch, query), generator=g), k, v


@pytest.fixture(scope="module")
def deployed(tiny_checkpoint, tiny_tokenizer, tiny_corpus, tmp_path_factory):
    """``python -m llama3 deploy`` run once on the tiny softplus checkpoint, with TensorRT hidden:
    (completed process, export directory, checkpoint)."""
    tmp = tmp_path_factory.mktemp("deploy")
    checkpoint, out = tiny_checkpoint("softplus"), tmp / "deployed"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama3",
            "deploy",
            "--from_checkpoint",
            str(checkpoint),
            "--tokenizer",
            str(tiny_tokenizer),
            "--eval_corpus",
            str(tiny_corpus["eval"]),
            "--batch_size",
            "2",
            "--max_seq_len",
            "16",
            "--accuracy_batches",
            "2",
            "--warmup",
            "1",
            "--iterations",
            "3",
            "--decode",
            "--device",
            "cpu",
            "--export_dir",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": f"{_no_tensorrt_path(tmp)}{os.pathsep}{REPO}"},
    )
    return done, out, checkpoint


def _no_tensorrt_path(tmp_path: Path) -> str:
    """A directory whose ``tensorrt`` package fails to import, put first on PYTHONPATH, so the
    command sees no TensorRT even where one is installed."""
    package = tmp_path / "no_trt" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('TensorRT hidden by the test')\n")
    return str(package.parent)


@pytest.mark.parametrize("attention", ["softmax", "softplus"])
def test_onnx_export_matches_pytorch_in_onnxruntime(attention, deployed, tmp_path):
    if attention == "softplus":  # the file the deploy command wrote, for its checkpoint
        _, out, checkpoint = deployed
        model, path = load_checkpoint(checkpoint), out / "model.onnx"
    else:
        model = tiny_model(attention)
        path = export_onnx(model, tmp_path / "model.onnx")
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in graph.graph.output] == list(OUTPUT_NAMES)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
    ops = {(n.domain, n.op_type) for n in graph.graph.node}
    assert {d for d, _ in ops} <= {"", "ai.onnx"}, "only standard ONNX operators"
    if attention == "softplus":
        assert ("", "Softplus") in ops
    runner = OnnxRuntimeRunner(path, model.args, torch.device("cpu"))
    reference = TorchRunner(model)
    shapes = [(3, 7, 5), (1, 1, 0), (2, 9, 0), (1, 1, 6)]
    assert (EXAMPLE_BATCH, EXAMPLE_QUERY, EXAMPLE_CACHE) not in shapes
    for batch, query, cached in shapes:
        inputs = cached_inputs(model, batch, query, cached)
        expected, got = reference(*inputs), runner(*inputs)
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            assert g.shape == e.shape, (name, batch, query, cached)
            torch.testing.assert_close(
                g, e, atol=1e-5, rtol=1e-4, msg=f"{name} at {batch, query, cached}"
            )
        assert got[1].shape == cache_shape(model.args, batch, cached + query)


def test_profile_shapes_follow_the_export_form():
    args = ModelArgs(**TINY["softplus"])
    shapes = profile_shapes(args, batch_size=8, seq_len=48, max_cache=64)
    assert shapes["input"].min == (1, 1) and shapes["input"].opt == shapes["input"].max == (8, 48)
    assert shapes["k_cache"].min == (2, 1, 16, 0)
    assert shapes["k_cache"].opt == (2, 8, 16, 0)
    assert shapes["k_cache"].max == shapes["v_cache"].max == (2, 8, 16, 64)
    softmax = profile_shapes(ModelArgs(**TINY["softmax"]), 4, 16, 16)
    assert softmax["v_cache"].max == (2, 4, 16, 2, 8)  # (L, B, T, n_kv_heads, head_dim)
    mode = EngineTyping(
        version="10.16.1",
        precision="fp16",
        strongly_typed=False,
        network_flag=False,
        builder_flag="FP16",
    )
    command = trtexec_command("trtexec", "m.onnx", "m.engine", shapes, mode)
    assert "--minShapes=input:1x1,k_cache:2x1x16x0,v_cache:2x1x16x0" in command
    assert "--maxShapes=input:8x48,k_cache:2x8x16x64,v_cache:2x8x16x64" in command


def test_percentiles_are_on_a_0_to_100_scale():
    times = np.arange(1, 101) / 1000.0  # 1 … 100 ms
    stats = latency.summarize(times)
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)


def test_missing_tensorrt_is_one_line(monkeypatch, capsys, tmp_path):
    from llama3.deploy import command

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    args = types.SimpleNamespace(no_tensorrt=False, trtexec=False, precision="fp32")
    plan = types.SimpleNamespace(device=torch.device("cpu"))
    info, runner = command.tensorrt_step(args, plan, tmp_path / "model.onnx", model=None)
    lines = capsys.readouterr().out.splitlines()
    assert runner is None and "skipped" in info
    assert len(lines) == 1 and lines[0].startswith("TensorRT: skipped (import tensorrt failed")


def test_missing_cuda_provider_is_a_visible_line(deployed, capsys):
    """On a CUDA --device, an onnxruntime without its CUDA provider (the CPU build here) runs on
    the CPU, and one printed line, kept in the report, says so and what to install (the model:
    the softplus export of the deploy command)."""
    from llama3.deploy import command

    done, out, checkpoint = deployed
    assert done.returncode == 0, done.stderr[-3000:]
    model, path = load_checkpoint(checkpoint), out / "model.onnx"
    plan = types.SimpleNamespace(model_args=model.args, device=torch.device("cuda", 0))
    info, runner = command.onnxruntime_step(plan, path)
    lines = capsys.readouterr().out.splitlines()
    assert runner.device == torch.device("cpu") and info["provider"] == "CPUExecutionProvider"
    assert lines == [info["warning"]]
    assert lines[0].startswith(
        "ONNX Runtime: runs on CPUExecutionProvider, not cuda:0: this onnxruntime"
    )
    assert "onnxruntime-gpu>=1.27 for CUDA 13" in lines[0]


def test_deploy_command_end_to_end(deployed):
    done, out, _ = deployed
    assert done.returncode == 0, done.stderr[-3000:]
    trt_lines = [line for line in done.stdout.splitlines() if line.startswith("TensorRT")]
    assert trt_lines == [missing_message("TensorRT hidden by the test")]
    report = json.loads((out / "deploy_report.json").read_text())
    assert report["onnxruntime"]["provider"] == "CPUExecutionProvider"
    assert "warning" not in report["onnxruntime"]  # the CPU was asked for
    assert (out / "model.onnx").is_file() and report["onnx"]["opset"] >= 18
    rows = {row["runner"]: row for row in report["accuracy"]}
    assert rows["onnxruntime"]["prefill_logits_abs"] < 1e-4
    assert rows["onnxruntime"]["decode_logits_abs"] < 1e-4
    assert abs(rows["onnxruntime"]["eval_loss"] - rows["pytorch"]["eval_loss"]) < 1e-4
    assert 4.0 < rows["pytorch"]["eval_loss"] < 7.0  # untrained: near ln(256) ≈ 5.5
    timed = {(r["runner"], r["phase"]): r for r in report["latency"]}
    assert set(timed) == {
        ("pytorch", "prefill"),
        ("pytorch", "decode"),
        ("onnxruntime", "prefill"),
        ("onnxruntime", "decode"),
    }
    prefill = timed[("onnxruntime", "prefill")]
    assert (prefill["batch"], prefill["query"], prefill["cached"]) == (2, 16, 0)
    assert prefill["p50_ms"] <= prefill["p99_ms"] and prefill["iterations"] == 3
    assert timed[("pytorch", "decode")]["cached"] == 15
    assert {r["device"] for r in report["latency"]} == {"cpu"}


def test_a_failed_export_keeps_the_previous_model(deployed, tmp_path, capsys):
    """An export that cannot be written in full (a disk too full for it) ends in one line and
    leaves the model.onnx of the run before as it was, with no temporary file."""
    import shutil

    from faults import file_size_limit

    from llama3.__main__ import main

    _, out, checkpoint = deployed
    export_dir = tmp_path / "deployed"
    shutil.copytree(out, export_dir)
    before = (export_dir / "model.onnx").read_bytes()
    with file_size_limit(len(before) // 2):
        code = main(
            [
                "deploy",
                "--from_checkpoint",
                str(checkpoint),
                "--export_dir",
                str(export_dir),
                "--device",
                "cpu",
                "--no_tensorrt",
                "--iterations",
                "0",
                "--batch_size",
                "2",
                "--seq_len",
                "16",
            ]
        )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1, errors
    assert f"cannot write the ONNX file {export_dir / 'model.onnx'}" in errors[0]
    assert (export_dir / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(p.name for p in out.iterdir())
