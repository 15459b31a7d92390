"""The GPU check: one prepared command that runs, within a time budget per stage, what the project
must do on a GPU, and records every stage.

    python3 -m benchmarks.gpu_check --out OUT                     # stages 1-5 ("check", ~4 min)
    python3 -m benchmarks.gpu_check --out OUT --stages tables     # training and inference tables
    python3 -m benchmarks.gpu_check --out OUT --device cpu --tiny # the same stages in seconds, CPU

Run from the repository root (the package need not be installed).

Stages (--stages takes names or the sets check, tables, all):
  corpus           the quick start's Python documentation corpus and tokenizer (stages 3, 4, 6)
  1 kernel_tests   pytest: the kernels in bf16 and fp16 against the fp32 reference with
                   FlashAttention's tolerances (tests/gpu/test_softplus_kernel_gpu.py, marked
                   gpu), and the CUDA tests of tests/integration/test_softplus_kernel.py; in
                   parallel processes (pytest-xdist) where installed, since compiling the kernels
                   dominates
  2 decode         CUDA-graph decoding = eager decoding; static cache = full recomputation
  3 training       train (softmax, softplus) with --amp_bf16 --allow_tf32, again with --compile,
                   and multitrain over NCCL with --bf16: exit 0, finite, the loss falls
  4 onnx           deploy: ONNX export, ONNX Runtime against PyTorch, TensorRT if installed
  5 kernel_bench   benchmarks.attention --main: r = 128 and 424 against every SDPA backend,
                   decoding at B = 64, T = 4096
  6 train_table    benchmarks.train: the original's six configurations, eager and compiled
  7 inference_table  benchmarks.inference: prefill at batch 64, decoding at batch 1 and 64
See benchmarks.gpu_stages for stages 2-4.

Every stage runs in a process group of its own with a time budget (--budget_scale multiplies them
all): a stage past its budget is stopped and recorded "over budget", and the run goes on. Stages
1-2 run beside 3-4 (correctness only; the GPU has room for both); stages 5-7 time the GPU and run
alone, afterwards. With --tiny, where nothing is timed against a goal, the corpus starts the lane
of 3-4 and kernel_bench ends that of 1-2, so that two CPU cores stay busy. Kernel autotuning is
off unless --autotune (LLAMA3_KERNEL_AUTOTUNE=0: each kernel runs the first configuration of its
table); first-call times are reported apart.

Written to --out (at most 8 files, for machines that return only a few): gpu_check_SET_DEVICE.json
(every stage: status, seconds, budget, summary, details, GPU and versions; rewritten after each
stage), gpu_check_SET_DEVICE.log (every stage's output), and the benchmarks' JSON
(attention_DEVICE.json, train_DEVICE.json, inference_DEVICE.json). Scratch files (corpus, runs,
exports, per-stage logs) go to --work_dir. The last lines printed are the stage table; the exit
status is 0 when every stage passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    AUTOTUNE_VARIABLE,
    REPO,
    child_env,
    device_slug,
    environment,
    format_table,
    module_command,
    python_docs_corpus,
)
from llama3.fileio import write_json


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float  # on the GPU
    tiny_budget_s: float  # --device cpu --tiny
    lane: str  # "tests" and "runs" go side by side; "alone" stages run one at a time afterwards
    tiny_lane: str | None = None  # the lane with --tiny, where it differs


STAGES = {
    s.name: s
    for s in [
        Stage("corpus", 60, 60, "first", tiny_lane="runs"),
        Stage("kernel_tests", 150, 120, "tests"),
        Stage("decode", 45, 60, "tests"),
        Stage("training", 120, 120, "runs"),
        Stage("onnx", 45, 90, "runs"),
        Stage("kernel_bench", 60, 120, "alone", tiny_lane="tests"),
        Stage("train_table", 200, 90, "alone"),
        Stage("inference_table", 130, 90, "alone"),
    ]
}
SETS = {
    "check": ["kernel_tests", "decode", "training", "onnx", "kernel_bench"],
    "tables": ["train_table", "inference_table"],
}
SETS["all"] = SETS["check"] + SETS["tables"]
NEEDS_CORPUS = {"training", "onnx", "train_table"}
RESULT_COLUMNS = ("stage", "status", "seconds", "budget_s", "summary")
SUMMARY_WIDTH = 150  # characters of a stage's summary in the printed table (the JSON has all)


@dataclass
class Context:
    device: str
    tiny: bool
    out: Path
    work: Path
    label: str  # the stage set, for file names
    slug: str  # the device, for file names
    budget_scale: float
    env: dict[str, str]

    def out_file(self, name: str, suffix: str = "json") -> Path:
        return self.out / f"{name}_{self.slug}.{suffix}"

    def budget(self, stage: str) -> float:
        spec = STAGES[stage]
        return (spec.tiny_budget_s if self.tiny else spec.budget_s) * self.budget_scale

    def lane(self, stage: str) -> str:
        spec = STAGES[stage]
        return spec.tiny_lane if self.tiny and spec.tiny_lane else spec.lane


# ----------------------------------------------------------------------- stage command lines


def command(ctx: Context, stage: str) -> list[str]:
    """The command line of one stage, run from the repository root."""
    if stage == "corpus":
        return module_command("gpu_check", "--work_dir", ctx.work, "--corpus_only")
    if stage == "kernel_tests":
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-rfE",
            "-p",
            "no:cacheprovider",
            "tests/gpu/test_softplus_kernel_gpu.py",
            "tests/integration/test_softplus_kernel.py",
            "-k",
            "gpu or cuda",
        ]
        if ctx.device == "cuda" and importlib.util.find_spec("xdist") is not None:
            argv += ["-n", str(min(8, max(1, (os.cpu_count() or 2) // 2)))]  # compile in parallel
        return argv
    if stage in ("decode", "training", "onnx"):
        return module_command(
            "gpu_stages", stage, "--device", ctx.device, "--work_dir", ctx.work
        ) + (["--tiny"] if ctx.tiny else [])
    if stage == "kernel_bench":
        return module_command("attention", "--main", "--output", ctx.out_file("attention")) + (
            ["--tiny"] if ctx.tiny else []
        )
    deadline = ["--deadline_s", f"{max(ctx.budget(stage) - 20, 1):.0f}"]  # room to write results
    if stage == "train_table":
        argv = module_command(
            "train",
            "--python_docs",
            ctx.work / "docs",
            "--amp_bf16",
            "--allow_tf32",
            *deadline,
            "--output",
            ctx.out_file("train"),
        )
        return argv + (
            ["--tiny", "--device", "cpu", "--seq_lens", "64", "--seconds", "0.5", "--warmup", "1"]
            if ctx.tiny
            else ["--compile_modes", "eager", "compile", "--seconds", "6", "--warmup", "2"]
        )
    assert stage == "inference_table"
    argv = module_command("inference", *deadline, "--output", ctx.out_file("inference"))
    return argv + (
        [
            "--tiny",
            "--device",
            "cpu",
            "--runners",
            "eager",
            "onnxruntime",
            "--models",
            "softmax",
            "softplus-16",
        ]
        if ctx.tiny
        else []
    )


def stage_env(ctx: Context, stage: str) -> dict[str, str]:
    """The stage's environment: on a CPU, the kernel stages run Triton's interpreter, which the
    kernels need set when their process starts."""
    if ctx.device == "cpu" and stage in ("kernel_tests", "kernel_bench"):
        return {**ctx.env, "TRITON_INTERPRET": "1", "LLAMA3_GPU_TESTS_ON_CPU": "1"}
    return ctx.env


# --------------------------------------------------------------------------- stage results


def summarize(ctx: Context, stage: str, code: int | None, log: str) -> dict[str, Any]:
    """Status, one-line summary and details of a finished stage (``code`` None: stopped)."""
    if stage == "kernel_tests":
        result = pytest_result(log)
    elif stage in ("decode", "training", "onnx"):
        result = read_json(ctx.work / f"{stage}.json") or {}
    elif stage == "kernel_bench":
        result = kernel_bench_result(read_json(ctx.out_file("attention")))
    elif stage == "train_table":
        result = train_table_result(read_json(ctx.out_file("train")))
    elif stage == "inference_table":
        result = inference_table_result(read_json(ctx.out_file("inference")))
    else:
        result = {"status": "passed", "summary": f"built in {ctx.work / 'docs'}"}
    if code is None:
        return {
            **result,
            "status": "over budget",
            "summary": f"stopped after {ctx.budget(stage):.0f} s; "
            + (result.get("summary") or "no result"),
        }
    if code != 0 and result.get("status", "passed") == "passed":
        last = log.strip().splitlines()[-1:] or [""]
        return {**result, "status": "failed", "summary": f"exit {code}: {last[0][:200]}"}
    return result


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


PYTEST_LINE = re.compile(
    r"(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED)"
    r"|(PASSED|FAILED|ERROR|SKIPPED)\s+(tests/\S+::\S+)"
)


def pytest_result(log: str) -> dict[str, Any]:
    """Counts from pytest -v lines (also those of pytest-xdist workers), first failures."""
    outcomes: dict[str, str] = {}
    for match in PYTEST_LINE.finditer(log):
        test, outcome = (
            (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
        )
        outcomes[test] = outcome
    counts = {
        k: sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")
    }
    failures = [line for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    status = (
        "failed"
        if counts["FAILED"] or counts["ERROR"]
        else "passed"
        if counts["PASSED"]
        else "skipped"
    )
    summary = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
    if failures:
        summary += f"; first: {failures[0][:300]}"
    return {
        "status": status,
        "summary": summary or "no test ran",
        "details": {"counts": counts, "failures": failures, "outcomes": outcomes},
    }


def ratio(value: Any) -> str:
    return f"{value:.2f}×" if isinstance(value, (int, float)) else "–"


def kernel_bench_result(data: dict[str, Any] | None) -> dict[str, Any]:
    if not data:
        return {"status": "failed", "summary": "no attention results written"}
    rows = data["rows"]
    ours = [r for r in rows if r["impl"] == "softplus_triton"]
    parts = []
    for r in ours:
        if "fwd_ms" in r:
            parts.append(
                f"r={r['r']} fwd {ratio(r.get('fwd_vs_sdpa'))}, fwd+bwd "
                f"{ratio(r.get('fwdbwd_vs_sdpa'))} of SDPA ({r['fwd_tflops']:.0f} TFLOP/s, "
                f"first call {r['first_s']:.1f} s)"
            )
        elif "kv_gb_per_s" in r:
            parts.append(
                f"decode r={r['r']} {r['kv_gb_per_s']:.0f} GB/s "
                f"({100 * (r.get('of_copy_bw') or 0):.0f}% of copy)"
            )
    failed = [r for r in ours if not ("fwd_ms" in r or "ms" in r)]
    return {
        "status": "failed" if failed or not ours else "passed",
        "summary": "; ".join(parts) or "no softplus rows",
        "details": {
            "matmul_tflops": data.get("matmul_tflops"),
            "copy_gb_per_s": data.get("copy_gb_per_s"),
            "kernel_autotune": data.get("kernel_autotune"),
            "timing": data.get("timing"),
        },
    }


def first_row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), {})


def train_table_result(data: dict[str, Any] | None) -> dict[str, Any]:
    if not data:
        return {"status": "failed", "summary": "no training results written"}
    rows = data["rows"]
    done = [r for r in rows if r.get("tokens_per_s")]
    parts = [f"{len(done)}/{len(rows)} configurations measured"]
    for row in (
        r
        for r in done
        if r["attention"] == "softplus" and r["seq_len"] == min(x["seq_len"] for x in done)
    ):
        parts.append(
            f"{row['model']} {row['mode']} {ratio(row.get('vs_softmax'))} softmax's "
            f"tokens/s, MFU {100 * (row.get('mfu') or 0):.0f}%"
        )
    errors = [
        f"{r['model']} {r['seq_len']} {r['mode']}: {r['error']}" for r in rows if r.get("error")
    ]
    status = "passed" if done and not any("not run" not in e for e in errors) else "failed"
    return {"status": status, "summary": "; ".join(parts[:4]), "details": {"errors": errors}}


def inference_table_result(data: dict[str, Any] | None) -> dict[str, Any]:
    if not data:
        return {"status": "failed", "summary": "no inference results written"}
    rows = data["rows"]
    done = [r for r in rows if not r.get("error")]
    parts = [f"{len(done)}/{len(rows)} measured"]
    prefill = [r for r in done if r["phase"] == "prefill" and r["runner"] == "eager"]
    if prefill:
        seq = min(r["seq_len"] for r in prefill)
        softmax = first_row(prefill, seq_len=seq, model="softmax")
        for row in (r for r in prefill if r["seq_len"] == seq and r["model"] != "softmax"):
            if softmax:
                parts.append(
                    f"{row['model']} prefill {ratio(row['calls_per_s'] / softmax['calls_per_s'])}"
                    f" softmax's at {seq}"
                )
    for row in (r for r in done if r["phase"] == "decode" and r["batch"] == 1):
        parts.append(f"{row['model']} {row['runner']} {row['decode_tokens_per_s']:,.0f} tok/s")
    errors = [
        f"{r['model']} {r['phase']} {r['runner']}: {r['error']}" for r in rows if r.get("error")
    ]
    unexpected = [e for e in errors if "missing" not in e and "not run" not in e]
    return {
        "status": "failed" if unexpected or not done else "passed",
        "summary": "; ".join(parts[:6]),
        "details": {"errors": errors},
    }


# ------------------------------------------------------------------------------- running


def run_process(
    argv: list[str], env: dict[str, str], budget_s: float, log_path: Path
) -> int | None:
    """Run ``argv`` in a process group of its own; None if stopped at the budget."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            stop_group(process)
            return None


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group (torchrun workers, compile workers), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Runner:
    """Runs stages, records them, rewrites the JSON record after each one."""

    def __init__(self, ctx: Context, names: list[str]):
        self.ctx, self.names = ctx, names
        self.records: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.started = time.monotonic()
        (ctx.work / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, stage: str) -> None:
        ctx = self.ctx
        budget = ctx.budget(stage)
        self.say(f"{stage}: started (budget {budget:.0f} s)")
        log_path = ctx.work / "logs" / f"{stage}.log"
        begin = time.monotonic()
        code = run_process(command(ctx, stage), stage_env(ctx, stage), budget, log_path)
        seconds = time.monotonic() - begin
        log = log_path.read_text(errors="replace")
        record = {
            "stage": stage,
            "seconds": round(seconds, 1),
            "budget_s": budget,
            "exit": code,
            **summarize(ctx, stage, code, log),
            "log_tail": log[-3000:],
        }
        with self.lock:
            self.records[stage] = record
            self.write()
        self.say(f"{stage}: {record['status']} in {seconds:.0f} s: {record['summary'][:300]}")

    def lane(self, stages: list[str]) -> None:
        for stage in stages:
            self.run(stage)

    def run_all(self) -> None:
        lanes = {
            lane: [s for s in self.names if self.ctx.lane(s) == lane]
            for lane in ("first", "tests", "runs", "alone")
        }
        self.lane(lanes["first"])
        threads = [
            threading.Thread(target=self.lane, args=(lanes[name],))
            for name in ("tests", "runs")
            if lanes[name]
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.lane(lanes["alone"])

    def say(self, line: str) -> None:
        with self.lock:
            print(f"[{time.monotonic() - self.started:6.1f} s] {line}", flush=True)

    def write(self) -> None:
        ctx = self.ctx
        ordered = [self.records[s] for s in self.names if s in self.records]
        write_json(
            ctx.out_file(f"gpu_check_{ctx.label}"),
            {
                "environment": environment(),
                "device": ctx.device,
                "tiny": ctx.tiny,
                "kernel_autotune": ctx.env.get(AUTOTUNE_VARIABLE) != "0",
                "elapsed_s": round(time.monotonic() - self.started, 1),
                "budget_scale": ctx.budget_scale,
                "stages": ordered,
            },
        )
        with open(ctx.out_file(f"gpu_check_{ctx.label}", "log"), "w") as log:
            for stage in (s for s in self.names if s in self.records):
                log.write(f"===== {stage} =====\n")
                log.write((ctx.work / "logs" / f"{stage}.log").read_text(errors="replace"))


# ---------------------------------------------------------------------------------- main


def selected_stages(names: list[str]) -> tuple[list[str], str]:
    """Stage names in run order, and the label of the selection for file names."""
    chosen: list[str] = []
    for name in names:
        for stage in SETS.get(name, [name]):
            if stage not in STAGES:
                raise SystemExit(
                    f"--stages: unknown {name!r}; choose from {', '.join([*SETS, *STAGES])}"
                )
            if stage not in chosen:
                chosen.append(stage)
    if NEEDS_CORPUS & set(chosen):
        chosen.insert(0, "corpus")
    label = names[0] if len(names) == 1 and names[0] in SETS else "custom"
    return [s for s in STAGES if s in chosen], label


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="folder for the JSON record, log and results")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["check"],
        help="stage names, or the sets check (1-5), tables (6-7), all",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="default: cuda when available (cpu needs --tiny)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes and models, for a CPU: checks the command itself",
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "llama3-gpu-check",
        help="scratch folder: corpus, runs, exports, per-stage logs (reused)",
    )
    parser.add_argument(
        "--budget_scale", type=float, default=1.0, help="multiply every stage's time budget by this"
    )
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="let the kernels autotune (minutes of compilation more)",
    )
    parser.add_argument("--corpus_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.corpus_only:
        return args
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.tiny:
        parser.error("no CUDA GPU: the full check needs one; use --device cpu --tiny on a CPU")
    if args.out is None:
        parser.error("--out is required")
    return args


def device_name(device: str) -> str:
    import torch

    return device_slug(torch.device(device))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.corpus_only:  # the corpus stage, in its own process
        print(python_docs_corpus(args.work_dir / "docs"))
        return 0
    names, label = selected_stages(args.stages)
    env = child_env(PYTHONUNBUFFERED="1")
    if not args.autotune:
        env[AUTOTUNE_VARIABLE] = "0"
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        args.device,
        args.tiny,
        args.out,
        args.work_dir,
        label,
        device_name(args.device),
        args.budget_scale,
        env,
    )
    total = sum(ctx.budget(s) for s in names)
    print(
        f"stages: {', '.join(names)}; device {ctx.slug}; budgets add up to {total:.0f} s "
        f"(stages 1-2 run beside 3-4); autotuning {'on' if args.autotune else 'off'}",
        flush=True,
    )
    runner = Runner(ctx, names)
    runner.run_all()
    rows = [dict(r, summary=r["summary"][:SUMMARY_WIDTH]) for r in runner.records.values()]
    rows.sort(key=lambda r: names.index(r["stage"]))
    print(
        f"\nrecord: {ctx.out_file(f'gpu_check_{label}')}; total "
        f"{time.monotonic() - runner.started:.0f} s\n"
    )
    print(format_table(rows, RESULT_COLUMNS))
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
