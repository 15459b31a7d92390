"""The benchmarks (``python -m benchmarks.NAME``) and the GPU check on the CPU (``--device cpu
--tiny``), so they keep working between GPU runs; their timer; and the README tables generated from
their JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import tables

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def benchmark(
    name: str, *args: object, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m benchmarks.NAME ARGS`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *map(str, args)],
        cwd=REPO,
        env=env or ENV,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def missing_packages(root: Path, *names: str) -> str:
    """A folder for PYTHONPATH whose sitecustomize makes ``names`` absent in every process, as on a
    machine without them (``import`` fails, ``importlib.util.find_spec`` returns None)."""
    root.mkdir(parents=True)
    (root / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in names)
    )
    return str(root)


def test_gpu_check_runs_every_check_stage_on_the_cpu(tmp_path):
    """Without zstandard and TensorRT, as on the GPU machine."""
    out = tmp_path / "out"
    hidden = missing_packages(tmp_path / "hidden", "zstandard", "tensorrt")
    done = benchmark(
        "gpu_check",
        "--device",
        "cpu",
        "--tiny",
        "--out",
        out,
        "--work_dir",
        tmp_path / "work",
        timeout=600,
        env={**ENV, "PYTHONPATH": os.pathsep.join([hidden, str(REPO)])},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "gpu_check_check_cpu.json").read_text())
    stages = {s["stage"]: s for s in record["stages"]}
    assert list(stages) == ["corpus", "kernel_tests", "decode", "training", "onnx", "kernel_bench"]
    assert all(s["status"] == "passed" for s in stages.values()), stages
    assert stages["kernel_tests"]["details"]["counts"]["PASSED"] >= 7  # the GPU tests' CPU cases
    assert stages["training"]["details"]["softplus multitrain"]["loss_falls"]
    assert record["kernel_autotune"] is False
    assert sorted(p.name for p in out.iterdir()) == [
        "attention_cpu.json",
        "gpu_check_check_cpu.json",
        "gpu_check_check_cpu.log",
    ]
    attention = json.loads((out / "attention_cpu.json").read_text())
    assert attention["timing"]["method"].startswith("wall clock")
    assert attention["timing"]["repetitions"] == 2
    timed = [r for r in attention["rows"] if "fwd_ms" in r]
    assert timed and all(
        r["fwd_ms_q20"] <= r["fwd_ms"] <= r["fwd_ms_q80"] and r["fwd_repetitions"] == 2
        for r in timed
    )
    assert done.stdout.rstrip().splitlines()[-1].startswith("| kernel_bench | passed |")


def test_gpu_check_records_a_stage_over_its_budget_and_goes_on(tmp_path):
    out = tmp_path / "out"
    done = benchmark(
        "gpu_check",
        "--device",
        "cpu",
        "--tiny",
        "--out",
        out,
        "--work_dir",
        tmp_path / "work",
        "--stages",
        "kernel_bench",
        "decode",
        "--budget_scale",
        "0.001",
    )
    assert done.returncode == 1, done.stdout[-3000:]
    stages = json.loads((out / "gpu_check_custom_cpu.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [
        ("decode", "over budget"),
        ("kernel_bench", "over budget"),
    ]


def test_timer_on_the_cpu_reports_the_median_and_quantiles():
    from benchmarks.common import Timer

    calls = []
    timer = Timer(torch.device("cpu"), repeats=4, warmup=1)
    timed = timer(lambda: calls.append(1))
    assert len(calls) == 5 and timed.repetitions == 4
    assert 0 <= timed.q20_ms <= timed.ms <= timed.q80_ms
    assert timer.record()["repetitions"] == 4 and timer.record()["l2_flush"] is False


def test_timer_on_cuda_goes_through_do_bench(monkeypatch):
    """On CUDA, triton.testing.do_bench times every repetition (flushing L2 before each); the
    timer reports the median and the 20% and 80% quantiles of all of them."""
    from benchmarks.common import Timer

    testing = pytest.importorskip("triton.testing")
    seen = {}

    def do_bench(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        return [3.0, 1.0, 2.0, 4.0, 5.0]

    monkeypatch.setattr(testing, "do_bench", do_bench)
    timer = Timer(torch.device("cuda"))
    timed = timer(lambda: None)
    assert seen == {"warmup": 25.0, "rep": 100.0, "return_mode": "all"}
    assert (timed.ms, timed.repetitions) == (3.0, 5)
    assert (timed.q20_ms, timed.q80_ms) == (pytest.approx(1.8), pytest.approx(4.2))
    assert timed.fields("fwd_") == {
        "fwd_ms": 3.0,
        "fwd_ms_q20": timed.q20_ms,
        "fwd_ms_q80": timed.q80_ms,
        "fwd_repetitions": 5,
    }
    record = timer.record()
    assert record["method"] == "triton.testing.do_bench" and record["l2_flush"] is True


def corpus_tokens(tiny_corpus, tiny_tokenizer) -> int:
    """Tokens in the tiny training corpus under the tiny tokenizer (the benchmark's data label)."""
    from llama3.data.tokenizer import Tokenizer
    from llama3.data.tokens import open_token_corpus

    corpus = open_token_corpus(tiny_corpus["train"], Tokenizer(tiny_tokenizer), progress=False)
    return corpus.n_tokens


def test_train_benchmark_tiny(tmp_path, tiny_corpus, tiny_tokenizer):
    """Three models at two lengths on a real corpus, side by side."""
    output = tmp_path / "train.json"
    done = benchmark(
        "train",
        "--tiny",
        "--device",
        "cpu",
        "--seq_lens",
        "32",
        "16",
        "--batch_size",
        "4",
        "--seconds",
        "0.3",
        "--warmup",
        "1",
        "--train_corpus",
        tiny_corpus["train"],
        "--tokenizer",
        tiny_tokenizer,
        "--output",
        output,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(output.read_text())
    rows = data["rows"]
    tokens = corpus_tokens(tiny_corpus, tiny_tokenizer)
    assert [(r["model"], r["seq_len"]) for r in rows] == [
        (m, s) for s in (32, 16) for m in ("softmax", "softplus-16", "softplus-40")
    ]
    for row in rows:
        assert row["error"] is None and row["tokens_per_s"] > 0 and row["steps"] >= 1
        assert row["projected_80k_h"] == pytest.approx(80_000 * row["step_ms"] / 1000 / 3600)
        assert len(row["loss_curve"]) == row["steps"]
        assert row["vs_softmax"] == pytest.approx(
            row["tokens_per_s"]
            / next(
                r["tokens_per_s"]
                for r in rows
                if r["model"] == "softmax" and r["seq_len"] == row["seq_len"]
            )
        )
        assert row["data"] == f"train ({tokens:,} tokens)"
    assert data["kernel_autotune"] is True and data["kernel_tma"] is True
    assert data["peak_tflops"] is None and data["timing"]["peak_matmul"] is None
    assert data["timing"]["steps"]["warmup"] == 1


def test_train_benchmark_falls_back_to_random_tokens_when_the_corpus_is_too_small(
    tiny_corpus, tiny_tokenizer
):
    from benchmarks import train
    from llama3 import ModelArgs
    from llama3.data.tokenizer import Tokenizer
    from llama3.data.tokens import open_token_corpus

    corpus = open_token_corpus(tiny_corpus["train"], Tokenizer(tiny_tokenizer), progress=False)
    data = train.Data(corpus, "tiny", 256)
    setting = train.Setting(
        "softmax", ModelArgs(dim=32, n_layers=1, vocab_size=256, max_seq_len=64), "eager"
    )
    tokens = corpus_tokens(tiny_corpus, tiny_tokenizer)
    stream, label = train.batches(data, setting, batch_size=4, seed=0)
    assert label == f"tiny ({tokens:,} tokens)" and next(stream)[0].shape == (4, 64)
    stream, label = train.batches(data, setting, batch_size=1000, seed=0)
    windows = (tokens - 1) // 64  # windows of 64 inputs and their next-token targets
    assert label == (f"synthetic (tiny gives {windows} windows of 64, fewer than a batch of 1000)")
    inputs, targets = next(stream)
    assert inputs.shape == targets.shape == (1000, 64) and int(inputs.max()) < 256


def test_train_benchmark_deadline_records_what_did_not_run(tmp_path):
    output = tmp_path / "train.json"
    done = benchmark(
        "train",
        "--tiny",
        "--device",
        "cpu",
        "--seconds",
        "60",
        "--deadline_s",
        "1",
        "--models",
        "softmax",
        "--output",
        output,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads(output.read_text())["rows"]
    assert row["error"].startswith("not run") and "tokens_per_s" not in row


def test_inference_benchmark_tiny(tmp_path):
    output = tmp_path / "inference.json"
    done = benchmark(
        "inference",
        "--tiny",
        "--device",
        "cpu",
        "--models",
        "softplus-16",
        "--runners",
        "eager",
        "onnxruntime",
        "--output",
        output,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(output.read_text())
    rows = data["rows"]
    assert data["timing"]["prefill"]["repetitions"] == 3  # --tiny: 3 timed calls after 1
    prefill = [r for r in rows if r["phase"] == "prefill"]
    decode = [r for r in rows if r["phase"] == "decode"]
    assert [r["runner"] for r in prefill] == ["eager", "onnxruntime"]
    for row in prefill:
        assert not row.get("error"), row
        assert row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["first_call_ms"] > 0 and row["tokens_per_s"] > 0
    assert [r["batch"] for r in decode] == [1, 4]
    assert all(
        r["decode_tokens_per_s"] > 0 and r["runner"] == "static cache, eager" for r in decode
    )
    assert rows.index(decode[0]) < rows.index(prefill[-1])  # decoding before ONNX Runtime


# --------------------------------------------------------------------------------- tables


def synthetic_results() -> tuple[dict, dict]:
    env = {
        "date": "2026-12-01T10:00:00+00:00",
        "python": "3.12.3",
        "torch": "2.11.0",
        "triton": "3.6.0",
        "gpu": "NVIDIA H200",
        "cpu": "x86_64",
    }
    curve = [[1.0, 7.0], [2.0, 6.0]]
    train = {
        "environment": env,
        "benchmark": "train",
        "kernel_autotune": False,
        "precision": "amp_bf16",
        "allow_tf32": True,
        "seconds": 8.0,
        "warmup_steps": 2,
        "peak_tflops": 780.0,
        "peak_source": "bf16 matmul 8192³ measured in this run",
        "rows": [
            {
                "model": "softmax",
                "attention": "softmax",
                "seq_len": 4096,
                "mode": "eager",
                "batch": 64,
                "tokens_per_s": 1.0e6,
                "vs_softmax": 1.0,
                "mfu": 0.105,
                "peak_memory_gib": 9.87,
                "loss": 6.54,
                "projected_80k_h": 5.83,
                "loss_curve": curve,
                "data": "Python documentation (507,232 tokens)",
            },
            {
                "model": "softplus-128",
                "attention": "softplus",
                "seq_len": 4096,
                "mode": "eager",
                "batch": 64,
                "tokens_per_s": 2.5e6,
                "vs_softmax": 2.5,
                "mfu": 0.2,
                "peak_memory_gib": 5.0,
                "loss": 6.0,
                "projected_80k_h": 2.33,
                "loss_curve": curve,
                "data": "Python documentation (507,232 tokens)",
            },
            {
                "model": "softplus-424",
                "attention": "softplus",
                "seq_len": 8192,
                "mode": "compile",
                "error": "not run: the --deadline_s budget did not leave time for it",
            },
        ],
    }
    inference = {
        "environment": env,
        "benchmark": "inference",
        "kernel_autotune": False,
        "settings": {
            "precision": "bf16",
            "iterations": 20,
            "warmup": 5,
            "decode_tokens": 128,
            "decode_prompt": 128,
        },
        "rows": [
            {
                "phase": "prefill",
                "model": "softmax",
                "runner": "eager",
                "batch": 64,
                "seq_len": 4096,
                "p50_ms": 40.0,
                "p90_ms": 41.0,
                "p95_ms": 42.0,
                "p99_ms": 43.0,
                "calls_per_s": 25.0,
                "first_call_ms": 1500.0,
            },
            {
                "phase": "prefill",
                "model": "softplus-128",
                "runner": "eager",
                "batch": 64,
                "seq_len": 4096,
                "p50_ms": 10.0,
                "p90_ms": 11.0,
                "p95_ms": 12.0,
                "p99_ms": 13.0,
                "calls_per_s": 100.0,
                "first_call_ms": 900.0,
            },
            {
                "phase": "prefill",
                "model": "softplus-128",
                "runner": "onnxruntime",
                "batch": 64,
                "seq_len": 4096,
                "error": "missing: onnxruntime 1.30.0 has no CUDAExecutionProvider",
            },
            {
                "phase": "decode",
                "model": "softplus-128",
                "runner": "static cache, CUDA graph",
                "batch": 1,
                "decode_tokens_per_s": 12345.6,
                "prefill_tokens_per_s": 5.0e5,
            },
        ],
    }
    return train, inference


def test_tables_from_synthetic_results(tmp_path):
    train, inference = synthetic_results()
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "inference.json").write_text(json.dumps(inference))
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- tables.py: training -->\nold\n<!-- end -->\nmiddle\n"
        "<!-- tables.py: inference -->\nold\n<!-- end -->\n"
        "<!-- tables.py: decoding -->\nold\n<!-- end -->\nend\n"
    )
    figure = tmp_path / "results" / "loss.png"
    assert (
        tables.main(
            [
                "--train",
                str(tmp_path / "train.json"),
                "--inference",
                str(tmp_path / "inference.json"),
                "--readme",
                str(readme),
                "--figure",
                str(figure),
            ]
        )
        == 0
    )
    text = readme.read_text()
    assert text.startswith("intro\n<!-- tables.py: training -->\n") and text.endswith("end\n")
    assert "old" not in text and text.count("<!-- end -->") == 3
    assert (
        "| softplus, core_dim 128 | 4096 | eager | 2.5 M | 2.50× | 20.0% | 5.0 GiB | 6.00 | "
        "2.3 h | Python docs | 8 h, 12 GB |"
    ) in text
    assert "| softplus, core_dim 424 | 8192 | compile | not run (time budget) |" in text
    assert "loss after 8 s" in text and "not the original's final loss" in text
    assert (
        "| softplus, core_dim 128 | 4096 | 64 | PyTorch eager | 10.00 ms | 11.00 ms | "
        "12.00 ms | 13.00 ms | 100.00 batches/s | 4.00× | 0.9 s | 16.33 ms |"
    ) in text
    assert "| ONNX Runtime | missing: onnxruntime 1.30.0 has no CUDAExecutionProvider |" in text
    assert "| softplus, core_dim 128 | 1 | static cache, CUDA graph | 12,346 | 500,000 |" in text
    assert "NVIDIA H200" in text and "autotuning off" in text
    assert "![Training loss against wall time](results/loss.png)" in text
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_tables_name_a_missing_block(tmp_path, capsys):
    train, _ = synthetic_results()
    (tmp_path / "train.json").write_text(json.dumps(train))
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="tables.py: training"):
        tables.main(["--train", str(tmp_path / "train.json"), "--readme", str(readme)])
    assert readme.read_text() == "no markers\n"
