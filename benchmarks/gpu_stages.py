"""The checks of benchmarks/gpu_check.py that run in a process of their own, one per call:

    python3 -m benchmarks.gpu_stages decode   --device cuda --work_dir DIR
    python3 -m benchmarks.gpu_stages training --device cuda --work_dir DIR
    python3 -m benchmarks.gpu_stages onnx     --device cuda --work_dir DIR

Each writes DIR/STAGE.json: {"status": "passed" | "failed" | "skipped", "summary": one line,
"details": ...}, and exits 0 when it passed.

- decode: for softmax and softplus (core_dim 128 and 424), greedy and sampled generation replaying
  a CUDA graph per step gives token for token what eager decoding gives (fp32 and bf16); and every
  token the static cache picks greedily (fp32) is the argmax of a full recomputation over the
  sequence so far, up to near-ties within 1e-4 of the largest logit.
- training: softmax and softplus (core_dim 128) for a few steps through ``python -m llama3 train``
  with --amp_bf16 --allow_tf32, again with --compile, and softplus through ``multitrain`` under
  torchrun in one process (NCCL on CUDA) with --bf16, all side by side on the Python documentation
  corpus: each exits 0, every loss is finite and the loss falls; tokens/s as the runs report them
  (they share the device, so only indicative).
- onnx: ``python -m llama3 deploy`` on the softplus and softmax checkpoints that training wrote:
  ONNX export, ONNX Runtime (its CUDA provider where installed, else it says it ran on the CPU)
  against PyTorch fp32 (largest logits difference ≤ 1e-4 of the largest logit, eval loss within
  1e-3), TensorRT when installed.

``--tiny`` (with ``--device cpu``): tiny models and steps, no --compile (minutes of C++ compiling on
a CPU), gloo instead of NCCL; the same code paths otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BASE,
    CONFIGS,
    REPO,
    TINY_BASE,
    TINY_CONFIGS,
    child_env,
    python_docs_corpus,
)
from llama3.fileio import write_json

NEAR_TIE = 1e-4  # a logit this close (relative to the largest) to the maximum counts as a tie
ONNX_LOGITS_REL = 1e-4
ONNX_LOSS_DELTA = 1e-3


@dataclass
class Result:
    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


def stage_env(device: str) -> dict[str, str]:
    """Environment of the commands a stage runs side by side (one thread each on a CPU)."""
    return child_env(**({"OMP_NUM_THREADS": "1"} if device == "cpu" else {}))


# ------------------------------------------------------------------------------------ decode


def decode_models(tiny: bool, device: torch.device):
    from llama3 import ModelArgs, Transformer

    base, configs = (TINY_BASE, TINY_CONFIGS) if tiny else (BASE, CONFIGS)
    for name, config in configs.items():
        torch.manual_seed(0)
        args = ModelArgs(**base, **config, max_seq_len=256)
        yield name, Transformer.build(args, device=device).eval()


@torch.no_grad()
def full_recomputation(
    model: torch.nn.Module, prompts: list[list[int]], generated: list[list[int]]
) -> dict[str, int]:
    """How the static-cache tokens compare with the argmax of a forward over the whole sequence."""
    counts = {"argmax": 0, "near_tie": 0, "different": 0}
    for prompt, tokens in zip(prompts, generated):
        logits = model(torch.tensor([prompt + tokens], device=next(model.parameters()).device))[0]
        for i, token in enumerate(tokens):
            row = logits[len(prompt) + i - 1].float()
            gap = (row.max() - row[token]).item()
            kind = (
                "argmax"
                if gap == 0
                else "near_tie"
                if gap <= NEAR_TIE * row.abs().max().item()
                else "different"
            )
            counts[kind] += 1
    return counts


def check_decode(device: torch.device, tiny: bool) -> Result:
    from llama3.generate import Generator, SamplingSettings

    lengths = (3, 7, 12) if tiny else (5, 17, 33, 64)
    greedy = SamplingSettings(max_new_tokens=24, temperature=0)
    sampled = SamplingSettings(max_new_tokens=24, temperature=0.8, top_k=50, top_p=0.9, seed=1)
    details, failures = {}, []
    for name, model in decode_models(tiny, device):
        g = torch.Generator().manual_seed(1)
        prompts = [
            torch.randint(4, model.args.vocab_size, (n,), generator=g).tolist() for n in lengths
        ]
        eager = Generator(model, device=device, cuda_graph=False)
        tokens = eager.generate_ids(prompts, greedy, stop_at_eos=False).tokens
        counts = full_recomputation(model, prompts, tokens)
        details[name] = {"static_cache_vs_full": counts}
        if counts["different"]:
            failures.append(
                f"{name}: {counts['different']} static-cache tokens differ from a "
                "full recomputation"
            )
        if device.type != "cuda":
            continue
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            for label, settings in (("greedy", greedy), ("sampled", sampled)):
                runs = [
                    Generator(model, device=device, cuda_graph=graph)
                    .generate_ids(prompts, settings, stop_at_eos=False)
                    .tokens
                    for graph in (False, True)
                ]
                key = f"graph_equals_eager_{str(dtype)[6:]}_{label}"
                details[name][key] = runs[0] == runs[1]
                if runs[0] != runs[1]:
                    failures.append(f"{name}: CUDA-graph decoding differs from eager ({key})")
    checked = sum(sum(d["static_cache_vs_full"].values()) for d in details.values())
    ties = sum(d["static_cache_vs_full"]["near_tie"] for d in details.values())
    graph = (
        "graph = eager for every model (fp32, bf16; greedy, sampled)"
        if device.type == "cuda"
        else "CUDA graph: not on the CPU"
    )
    summary = (
        "; ".join(failures)
        if failures
        else (f"{graph}; static cache = full recomputation for {checked} tokens ({ties} near-ties)")
    )
    return Result("failed" if failures else "passed", summary, details)


# ---------------------------------------------------------------------------------- training


def training_runs(device: str, tiny: bool, docs, runs: Path) -> dict[str, list[str]]:
    """The command line of every training run, by name."""
    shape = (
        [
            "--n_layers",
            "2",
            "--dim",
            "32",
            "--core_dim",
            "16",
            "--max_seq_len",
            "64",
            "--batch_size",
            "4",
            "--total_steps",
            "6",
            "--warmup_steps",
            "1",
        ]
        if tiny
        else [
            "--n_layers",
            "3",
            "--dim",
            "128",
            "--core_dim",
            "128",
            "--max_seq_len",
            "1024",
            "--batch_size",
            "16",
            "--total_steps",
            "30",
            "--warmup_steps",
            "3",
        ]
    )
    steps = shape[shape.index("--total_steps") + 1]
    common = [
        "--train_corpus",
        docs.train,
        "--eval_corpus",
        docs.eval,
        "--tokenizer",
        docs.tokenizer,
        *shape,
        "--n_heads",
        "4",
        "--base_lr",
        "3e-3",
        "--eval_steps",
        steps,
        "--eval_batches",
        "2",
        "--save_steps",
        steps,
        "--allow_tf32",
        "--device",
        device,
    ]
    train = [sys.executable, "-m", "llama3", "train"]
    commands = {}
    for attention in ("softmax", "softplus"):
        commands[attention] = [*train, "--attention", attention, "--amp_bf16"]
        if not tiny:
            commands[f"{attention}+compile"] = [
                *train,
                "--attention",
                attention,
                "--amp_bf16",
                "--compile",
            ]
    commands["softplus multitrain"] = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "llama3",
        "multitrain",
        "--attention",
        "softplus",
        "--bf16",
    ]
    return {
        name: [str(a) for a in argv + common + ["--to_checkpoint", runs / run_dir(name)]]
        for name, argv in commands.items()
    }


def run_dir(name: str) -> str:
    return name.replace(" ", "_").replace("+", "_")


def read_run(path: Path) -> dict[str, Any]:
    """Losses, tokens/s and peak memory of a finished run directory."""
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    losses = [r["loss"] for r in train]
    steady = sorted(r["tokens_per_s"] for r in train[len(train) // 3 :])  # after compilation
    summary = json.loads((path / "summary.json").read_text())
    evals = [r["loss"] for r in records if r["kind"] == "eval"]
    return {
        "losses": losses,
        "eval_loss": evals[-1] if evals else None,
        "tokens_per_s": steady[len(steady) // 2] if steady else None,
        "peak_memory_gib": summary.get("peak_memory_gib"),
    }


def check_training(device: str, tiny: bool, work: Path) -> Result:
    docs = python_docs_corpus(work / "docs")
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    commands = training_runs(device, tiny, docs, runs)
    for name in commands:  # a rerun starts afresh
        shutil.rmtree(runs / run_dir(name), ignore_errors=True)
    logs = {name: open(runs / f"{run_dir(name)}.log", "w") for name in commands}
    processes = {
        name: subprocess.Popen(
            argv, cwd=REPO, env=stage_env(device), stdout=logs[name], stderr=subprocess.STDOUT
        )
        for name, argv in commands.items()
    }
    details, failures, parts = {}, [], []
    for name, process in processes.items():
        code = process.wait()
        logs[name].close()
        log_tail = (runs / f"{run_dir(name)}.log").read_text()[-1500:]
        if code != 0:
            failures.append(f"{name}: exit {code}")
            details[name] = {"exit": code, "log_tail": log_tail}
            continue
        run = read_run(runs / run_dir(name))
        losses = run["losses"]
        head, tail = losses[: max(1, len(losses) // 5)], losses[-max(1, len(losses) // 5) :]
        finite = all(math.isfinite(x) for x in losses)
        falls = finite and sum(tail) / len(tail) < sum(head) / len(head)
        details[name] = {**run, "exit": 0, "finite": finite, "loss_falls": falls}
        if not (finite and falls):
            failures.append(f"{name}: loss {'not finite' if not finite else 'did not fall'}")
        parts.append(f"{name} {losses[0]:.2f}→{losses[-1]:.2f}, {run['tokens_per_s']:,.0f} tok/s")
    if tiny:
        details["compile"] = "not run on the CPU (minutes of C++ compilation)"
    summary = "; ".join(failures) if failures else "; ".join(parts)
    return Result("failed" if failures else "passed", summary, details)


# -------------------------------------------------------------------------------------- onnx


def onnxruntime_provider(device: str) -> str:
    from llama3.deploy.runners import onnxruntime_providers

    if onnxruntime_providers(torch.device(device))[0] != "CPUExecutionProvider":
        return "CUDA provider"
    return "CPU provider" + (" (this onnxruntime has no CUDA provider)" if device == "cuda" else "")


def check_onnx(device: str, tiny: bool, work: Path) -> Result:
    docs = python_docs_corpus(work / "docs")
    names = ["softplus"] if tiny else ["softplus", "softmax"]
    missing = [n for n in names if not (work / "runs" / n / "latest").exists()]
    if missing:
        return Result(
            "skipped",
            f"no checkpoint of {', '.join(missing)}: the training stage "
            f"writes them to {work / 'runs'}",
        )
    shape = (
        ["--batch_size", "2", "--max_seq_len", "32"]
        if tiny
        else ["--batch_size", "4", "--max_seq_len", "256", "--precision", "bf16"]
    )
    processes = {}
    for name in names:
        export = work / "deploy" / name
        argv = [
            sys.executable,
            "-m",
            "llama3",
            "deploy",
            "--from_checkpoint",
            work / "runs" / name,
            "--tokenizer",
            docs.tokenizer,
            "--eval_corpus",
            docs.eval,
            "--export_dir",
            export,
            *shape,
            "--accuracy_batches",
            "1" if tiny else "2",
            "--warmup",
            "1" if tiny else "2",
            "--iterations",
            "3" if tiny else "5",
            "--decode",
            "--device",
            device,
            "--output",
            export / "report.json",
        ]
        export.mkdir(parents=True, exist_ok=True)
        log = open(export / "deploy.log", "w")
        processes[name] = (
            subprocess.Popen(
                [str(a) for a in argv],
                cwd=REPO,
                env=stage_env(device),
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            log,
        )
    provider = onnxruntime_provider(device)
    details, failures, parts = {"onnxruntime": provider}, [], []
    for name, (process, log) in processes.items():
        code = process.wait()
        log.close()
        export = work / "deploy" / name
        if code != 0:
            failures.append(f"{name}: deploy exit {code}")
            details[name] = {"exit": code, "log_tail": (export / "deploy.log").read_text()[-1500:]}
            continue
        report = json.loads((export / "report.json").read_text())
        ort = next(r for r in report["accuracy"] if r["runner"] == "onnxruntime")
        details[name] = {
            "onnx": report["onnx"],
            "accuracy": report["accuracy"],
            "tensorrt": report["tensorrt"],
            "latency": report["latency"],
        }
        close = (
            ort["prefill_logits_rel"] <= ONNX_LOGITS_REL
            and abs(ort.get("eval_loss_delta", 0.0)) <= ONNX_LOSS_DELTA
        )
        if not close:
            failures.append(
                f"{name}: ONNX Runtime differs from PyTorch (logits rel "
                f"{ort['prefill_logits_rel']:.2g}, loss Δ {ort.get('eval_loss_delta')})"
            )
        parts.append(f"{name} logits rel {ort['prefill_logits_rel']:.1g}")
    trt = next(iter(details[n]["tensorrt"] for n in names if "tensorrt" in details.get(n, {})), {})
    tensorrt = "TensorRT built" if "engine" in trt else f"TensorRT: {trt.get('skipped', 'n/a')}"
    summary = (
        "; ".join(failures)
        if failures
        else (f"ONNX Runtime ({provider}) vs PyTorch fp32: {', '.join(parts)}; {tensorrt}")
    )
    return Result("failed" if failures else "passed", summary, details)


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.gpu_stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=("decode", "training", "onnx"))
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny models and steps (CPU)")
    parser.add_argument("--work_dir", type=Path, required=True, help="scratch folder")
    args = parser.parse_args(argv)
    if args.stage == "decode":
        result = check_decode(torch.device(args.device), args.tiny)
    elif args.stage == "training":
        result = check_training(args.device, args.tiny, args.work_dir)
    else:
        result = check_onnx(args.device, args.tiny, args.work_dir)
    write_json(args.work_dir / f"{args.stage}.json", asdict(result))
    print(f"{args.stage}: {result.status}: {result.summary}", flush=True)
    return 0 if result.status == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
