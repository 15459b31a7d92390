"""``python -m llama3 deploy``: ONNX export, ONNX Runtime and TensorRT accuracy, latency report."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from llama3.checkpoint import model_from_record, read_checked_record, resolve_model_file
from llama3.cli import (
    add_checkpoint_source_flags,
    add_model_flags,
    add_seq_len_flag,
    add_token_cache_flags,
    model_flag_values,
    seq_len_from_flags,
)
from llama3.deploy import latency
from llama3.deploy.accuracy import check_inputs, compare_outputs, runner_loss
from llama3.deploy.onnx_export import DEFAULT_OPSET, MIN_OPSET, cast_copy, export_onnx
from llama3.deploy.runners import DTYPES, OnnxRuntimeRunner, Runner, TorchRunner, too_big_for_host
from llama3.deploy.tensorrt import (
    PRECISIONS,
    SUPPORTED,
    ShapeRange,
    TensorRTRunner,
    build_engine,
    build_engine_trtexec,
    engine_typing,
    import_tensorrt,
    missing_message,
    profile_shapes,
)
from llama3.errors import UsageError
from llama3.fileio import check_output_dir, check_output_file, write_json
from llama3.model.args import ModelArgs
from llama3.reporting import environment, format_table
from llama3.runtime import select_device

DESCRIPTION = f"""\
Export a checkpoint to ONNX and TensorRT, check accuracy, measure latency; one report.

Steps, in order:
  1. export the cached call form to EXPORT_DIR/model.onnx (fp32; dynamic batch, query and cache
     length) and run onnx.checker on it;
  2. build EXPORT_DIR/model_PRECISION.engine with TensorRT (Python API, or --trtexec; versions
     {SUPPORTED} are supported); without TensorRT one line says so and the other steps still
     run. fp16/bf16: TensorRT 10 uses its builder flags on the fp32 file; TensorRT 11 (and 10
     with --strongly_typed) takes the precision from the graph, so EXPORT_DIR/model_PRECISION.onnx
     is exported in that dtype first (norm statistics and the softplus normaliser stay fp32);
  3. compare ONNX Runtime and TensorRT with PyTorch fp32: largest logits differences for a prefill
     and a decode step, and eval loss on --accuracy_batches windows of --eval_corpus;
  4. time PyTorch eager, ONNX Runtime and TensorRT on --batch_size x --seq_len prefills (and,
     with --decode, one-token steps after a full cache); print tables and write --output.
ONNX Runtime on a CUDA --device without its CUDA provider runs on the CPU, and one line (also in
the report) says why. Exits 1 when TensorRT is installed but the engine cannot be built, or is not
a supported version (the rest still runs).
"""
LATENCY_RUNNERS = ("pytorch", "onnxruntime", "tensorrt")
LATENCY_COLUMNS = (
    "runner",
    "device",
    "precision",
    "phase",
    "batch",
    "query",
    "cached",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "calls_per_s",
    "tokens_per_s",
)
ACCURACY_COLUMNS = (
    "runner",
    "precision",
    "prefill_logits_abs",
    "prefill_logits_rel",
    "decode_logits_abs",
    "eval_loss",
    "eval_loss_delta",
)
CHECK_QUERY = 16  # prefill length of the logits comparison (capped by --seq_len)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    source = parser.add_argument_group("checkpoint and data")
    add_checkpoint_source_flags(source, tokenizer_required=False)
    source.add_argument(
        "--eval_corpus",
        metavar="PATH",
        help="eval corpus files (.jsonl, .jsonl.zst, .jsonl.gz, .json.gz, .parquet) "
        "or a directory of them, for the eval-loss comparison; needs "
        "--tokenizer (without it only logits are compared)",
    )
    add_token_cache_flags(source)
    add_model_flags(parser, from_checkpoint=True)
    target = parser.add_argument_group("deployment")
    target.add_argument(
        "--export_dir",
        default="deployed",
        metavar="DIR",
        help="where model.onnx and the TensorRT engine are written",
    )
    target.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (at least {MIN_OPSET})"
    )
    target.add_argument(
        "--batch_size",
        type=int,
        default=64,
        help="batch of the accuracy windows, the latency runs and the engine's "
        "optimisation profile (--seq_len sets the sequence length)",
    )
    add_seq_len_flag(
        target, "the accuracy windows, the timed prefills and the engine's optimisation profile"
    )
    target.add_argument(
        "--max_cache_len",
        type=int,
        default=None,
        help="longest cache the TensorRT engine accepts (default: --seq_len)",
    )
    target.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="TensorRT engine precision, and the dtype PyTorch is timed in (fp32 clears TF32)",
    )
    target.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:N or cpu (default: cuda when available); TensorRT needs "
        "cuda, ONNX Runtime uses its CUDA provider when installed",
    )
    target.add_argument("--seed", type=int, default=0, help="seed of the random check inputs")
    checks = parser.add_argument_group("accuracy")
    checks.add_argument(
        "--accuracy_batches",
        type=int,
        default=4,
        help="eval-corpus batches for the eval-loss comparison (0: skip it)",
    )
    trt = parser.add_argument_group(
        "TensorRT",
        f"TensorRT {SUPPORTED}: the NGC PyTorch container's, or "
        "pip install 'llama3-softplus[tensorrt]'",
    )
    trt.add_argument("--no_tensorrt", action="store_true", help="skip the TensorRT engine")
    trt.add_argument(
        "--trtexec",
        action="store_true",
        help="build the engine with the trtexec tool (of the same TensorRT as the "
        "Python module) instead of the Python API",
    )
    trt.add_argument(
        "--strongly_typed",
        action="store_true",
        help="TensorRT 10: build a strongly typed network whose fp16/bf16 comes from "
        "an ONNX file exported in that dtype, instead of the deprecated builder "
        "flags; TensorRT 11 always does this",
    )
    trt.add_argument(
        "--workspace_gib",
        type=float,
        default=0.0,
        help="TensorRT builder workspace limit in GiB (0: TensorRT's default)",
    )
    timing = parser.add_argument_group("latency")
    timing.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    timing.add_argument(
        "--iterations", type=int, default=100, help="timed calls per runner (0: skip latency)"
    )
    timing.add_argument(
        "--decode",
        action="store_true",
        help="also time one-token decode steps after a cache of --seq_len − 1",
    )
    timing.add_argument(
        "--latency_runners",
        nargs="+",
        choices=LATENCY_RUNNERS,
        help="runners to time (default: every one that runs)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output", metavar="FILE", help="JSON report (default: EXPORT_DIR/deploy_report.json)"
    )


@dataclass
class Plan:
    """Everything resolved from the flags before any work starts."""

    checkpoint: Path
    model_args: ModelArgs
    device: torch.device
    seq_len: int
    max_cache: int
    export_dir: Path
    output: Path
    record: dict[str, Any] = field(repr=False)
    tokenizer: Any = None  # checked against the checkpoint, when --eval_corpus needs one


def check_flags(args: argparse.Namespace) -> None:
    """Refuse counts no run can use and runners the flags exclude, before any work."""
    for flag, value, least in (
        ("batch_size", args.batch_size, 1),
        ("opset", args.opset, MIN_OPSET),
        ("accuracy_batches", args.accuracy_batches, 0),
        ("warmup", args.warmup, 0),
        ("iterations", args.iterations, 0),
    ):
        if value < least:
            raise UsageError(f"--{flag} must be at least {least}, got {value}")
    if args.max_cache_len is not None and args.max_cache_len < 1:
        raise UsageError(f"--max_cache_len must be positive, got {args.max_cache_len}")
    if not 0 <= args.workspace_gib < math.inf:
        raise UsageError(
            f"--workspace_gib must be a number of GiB ≥ 0 (0: TensorRT's default), "
            f"got {args.workspace_gib}"
        )
    if args.no_tensorrt and "tensorrt" in (args.latency_runners or ()):
        raise UsageError(
            "--latency_runners tensorrt cannot run with --no_tensorrt: drop one of them"
        )
    if args.eval_corpus and not args.tokenizer:
        raise UsageError("--eval_corpus needs --tokenizer (the checkpoint's SentencePiece model)")


def make_plan(args: argparse.Namespace) -> Plan:
    check_flags(args)
    record, model_args = read_checked_record(args.from_checkpoint, model_flag_values(args))
    seq_len = seq_len_from_flags(args, model_args)
    tokenizer = None
    if args.tokenizer:  # checked whenever given, used for the eval loss
        from llama3.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, record.get("tokenizer"), model_args.vocab_size)
    export_dir = check_output_dir(args.export_dir, "--export_dir")
    output = check_output_file(args.output or export_dir / "deploy_report.json", "--output")
    return Plan(
        checkpoint=resolve_model_file(args.from_checkpoint),
        model_args=model_args,
        device=select_device(args.device),
        seq_len=seq_len,
        max_cache=args.max_cache_len or seq_len,
        export_dir=export_dir,
        output=output,
        record=record,
        tokenizer=tokenizer,
    )


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    model = model_from_record(plan.record, device="cpu")
    info: dict[str, Any] = {
        "checkpoint": str(plan.checkpoint),
        "step": plan.record.get("step"),
        "model_args": plan.model_args.to_dict(),
        "device": str(plan.device),
        "batch_size": args.batch_size,
        "seq_len": plan.seq_len,
        "precision": args.precision,
        "versions": environment(),
    }
    info["onnx"], onnx_path = export_step(model, plan, args.opset)
    info["onnxruntime"], ort_runner = onnxruntime_step(plan, onnx_path)
    runners: dict[str, Runner] = {"onnxruntime": ort_runner}
    info["tensorrt"], trt_runner = tensorrt_step(args, plan, onnx_path, model)
    if trt_runner is not None:
        runners["tensorrt"] = trt_runner
    reference = TorchRunner(model.to(plan.device))
    timed = timed_pytorch(model, args.precision, reference)
    info["accuracy"] = accuracy_step(args, plan, reference, timed, runners)
    info["latency"] = latency_step(args, plan, [timed, *runners.values()])
    path = write_json(plan.output, info)
    print(f"report: {path}")
    return 1 if info["tensorrt"].get("error") else 0


def export_step(
    model: torch.nn.Module, plan: Plan, opset: int, precision: str = "fp32"
) -> tuple[dict[str, Any], Path]:
    """Export ``model`` in ``precision`` to EXPORT_DIR/model.onnx (fp32) or model_PRECISION.onnx."""
    path = plan.export_dir / ("model.onnx" if precision == "fp32" else f"model_{precision}.onnx")
    print(f"ONNX: exporting to {path} ({precision}, opset {opset}) ...", flush=True)
    start = time.perf_counter()
    export_onnx(model, path, opset=opset, dtype=None if precision == "fp32" else DTYPES[precision])
    seconds = time.perf_counter() - start
    print(f"ONNX: {path} written and passed onnx.checker in {seconds:.1f} s", flush=True)
    return {
        "path": str(path),
        "precision": precision,
        "opset": opset,
        "bytes": path.stat().st_size,
        "export_s": seconds,
    }, path


def onnxruntime_step(plan: Plan, onnx_path: Path) -> tuple[dict[str, Any], OnnxRuntimeRunner]:
    """The ONNX Runtime session, and one visible line when it cannot use the CUDA device."""
    import onnxruntime as ort

    runner = OnnxRuntimeRunner(onnx_path, plan.model_args, plan.device)
    info = {
        "version": ort.__version__,
        "provider": runner.provider,
        "available_providers": ort.get_available_providers(),
        "device": str(runner.device),
    }
    if runner.warning:
        print(runner.warning, flush=True)
        info["warning"] = runner.warning
    return info, runner


def tensorrt_step(
    args: argparse.Namespace, plan: Plan, onnx_path: Path, model: torch.nn.Module
) -> tuple[dict[str, Any], TensorRTRunner | None]:
    """Build and load the engine, or say in one line why not."""
    if args.no_tensorrt:
        return _skip("--no_tensorrt given")
    trt, reason = import_tensorrt()
    if trt is None:
        return _skip(missing_message(reason), reason=f"import tensorrt failed: {reason}")
    if plan.device.type != "cuda":
        return _skip(f"TensorRT: skipped (it needs a CUDA device; running on {plan.device})")
    try:
        mode = engine_typing(trt, args.precision, args.strongly_typed)
    except RuntimeError as err:
        print(f"TensorRT: failed: {err}", flush=True)
        return {"error": str(err), "version": str(trt.__version__)}, None
    info: dict[str, Any] = {
        "version": mode.version,
        "precision": args.precision,
        "typing": mode.describe(),
        "builder": "trtexec" if args.trtexec else "python",
        "onnx": str(onnx_path),
    }
    if mode.graph_precision != "fp32":
        info["onnx_export"], onnx_path = export_step(model, plan, args.opset, mode.graph_precision)
        info["onnx"] = str(onnx_path)
    engine = plan.export_dir / f"model_{args.precision}.engine"
    shapes = profile_shapes(plan.model_args, args.batch_size, plan.seq_len, plan.max_cache)
    print(
        f"TensorRT {mode.version}: building {engine} ({args.precision}, {mode.describe()}) ...",
        flush=True,
    )
    start = time.perf_counter()
    try:
        _build(trt, args, plan, onnx_path, engine, shapes)
        runner = TensorRTRunner(trt, engine, plan.device, args.precision)
    except (RuntimeError, ValueError) as err:
        print(f"TensorRT: failed: {err}", flush=True)
        return {**info, "error": str(err)}, None
    seconds = time.perf_counter() - start
    print(f"TensorRT: {engine} built in {seconds:.1f} s", flush=True)
    profile = {name: vars(r) for name, r in shapes.items()}
    return {**info, "engine": str(engine), "build_s": seconds, "profile": profile}, runner


def _build(
    trt: ModuleType,
    args: argparse.Namespace,
    plan: Plan,
    onnx_path: Path,
    engine: Path,
    shapes: dict[str, ShapeRange],
) -> None:
    """The engine build on the deployment device, through the Python API or trtexec."""
    if args.trtexec:
        build_engine_trtexec(
            trt,
            onnx_path,
            engine,
            shapes,
            args.precision,
            args.workspace_gib,
            strongly_typed=args.strongly_typed,
            device_index=plan.device.index or 0,
        )
        return
    with torch.cuda.device(plan.device):
        build_engine(
            trt,
            onnx_path,
            engine,
            shapes,
            args.precision,
            args.workspace_gib,
            strongly_typed=args.strongly_typed,
        )


def _skip(line: str, reason: str | None = None) -> tuple[dict[str, Any], None]:
    if not line.startswith("TensorRT"):
        line = f"TensorRT: skipped ({line})"
    print(line, flush=True)
    return {"skipped": reason or line}, None


def timed_pytorch(model: torch.nn.Module, precision: str, reference: TorchRunner) -> TorchRunner:
    """PyTorch at the deployment precision (the fp32 reference itself when that is fp32)."""
    if precision == "fp32":
        return reference
    return TorchRunner(cast_copy(model, DTYPES[precision], reference.device))


def accuracy_step(
    args: argparse.Namespace,
    plan: Plan,
    reference: TorchRunner,
    timed: Runner,
    runners: dict[str, Runner],
) -> list[dict[str, Any]]:
    """Logits differences (prefill and decode) and eval losses, each against PyTorch fp32."""
    candidates = ([timed] if timed is not reference else []) + list(runners.values())
    a, batch = plan.model_args, min(args.batch_size, 2)
    query, cached = min(plan.seq_len, CHECK_QUERY), min(plan.max_cache, CHECK_QUERY)
    prefill = check_inputs(a, batch, query, 0, seed=args.seed)
    decode = check_inputs(a, batch, 1, cached, seed=args.seed + 1)
    windows = eval_batches(args, plan)
    rows = [{"runner": "pytorch", "precision": "fp32", **eval_loss(reference, a, windows)}]
    for runner in candidates:
        first = compare_outputs(reference, runner, *prefill)
        step = compare_outputs(reference, runner, *decode)
        row = {
            "runner": runner.name,
            "precision": runner.precision,
            "prefill_logits_abs": first.logits_abs,
            "prefill_logits_rel": first.logits_rel,
            "decode_logits_abs": step.logits_abs,
            "prefill": first.to_dict(),
            "decode": step.to_dict(),
            **eval_loss(runner, a, windows),
        }
        if "eval_loss" in row and "eval_loss" in rows[0]:
            row["eval_loss_delta"] = row["eval_loss"] - rows[0]["eval_loss"]
        rows.append(row)
    print(
        f"\naccuracy against PyTorch fp32 (prefill {batch}×{query}, decode 1 token after "
        f"{cached}{'' if windows else '; no --eval_corpus, so no eval loss'}):"
    )
    print(format_table(rows, ACCURACY_COLUMNS), flush=True)
    return rows


def eval_loss(
    runner: Runner, model_args: ModelArgs, windows: list[tuple[Tensor, Tensor]]
) -> dict[str, Any]:
    """``{"eval_loss": …}``, or why it was skipped, or nothing without windows."""
    if not windows:
        return {}
    too_big = too_big_for_host(runner, model_args, *windows[0][0].shape, 0)
    if too_big:
        print(f"eval loss: {runner.name} skipped: {too_big}", flush=True)
        return {"eval_loss_skipped": too_big}
    return {"eval_loss": runner_loss(runner, model_args, windows).loss}


def eval_batches(args: argparse.Namespace, plan: Plan) -> list[tuple[Tensor, Tensor]]:
    """The first ``--accuracy_batches`` eval windows, kept in memory to feed every runner alike."""
    if not args.eval_corpus or args.accuracy_batches == 0:
        return []
    from llama3.data.dataset import open_eval_windows

    windows = open_eval_windows(
        args.eval_corpus,
        plan.tokenizer,
        plan.seq_len,
        args.batch_size,
        args.data_mode,
        cache_dir=args.cache_dir,
    )
    return list(windows.batches(max_batches=args.accuracy_batches))


def latency_step(
    args: argparse.Namespace, plan: Plan, runners: list[Runner]
) -> list[dict[str, Any]]:
    if args.iterations == 0:
        print("latency: skipped (--iterations 0)", flush=True)
        return []
    wanted = args.latency_runners or LATENCY_RUNNERS
    present = {r.name for r in runners}
    for name in args.latency_runners or ():
        if name not in present:
            print(
                f"latency: {name} not timed (it is not available: see its line above)", flush=True
            )
    shapes = [(args.batch_size, plan.seq_len, 0)]
    if args.decode:
        shapes.append((args.batch_size, 1, max(min(plan.seq_len - 1, plan.max_cache), 1)))
    rows = []
    for runner in (r for r in runners if r.name in wanted):
        for batch, query, cached in shapes:
            reason = too_big_for_host(runner, plan.model_args, batch, query, cached)
            if reason:
                print(f"latency: {runner.name} skipped: {reason}", flush=True)
                rows.append(
                    {
                        "runner": runner.name,
                        "device": str(runner.device),
                        "precision": runner.precision,
                        "phase": "decode" if cached else "prefill",
                        "batch": batch,
                        "query": query,
                        "cached": cached,
                        "skipped": reason,
                    }
                )
                continue
            print(f"latency: {runner.name} {batch}×{query} after {cached} ...", flush=True)
            result = latency.measure(
                runner,
                plan.model_args,
                batch,
                query,
                cached,
                warmup=args.warmup,
                iterations=args.iterations,
                seed=args.seed,
            )
            rows.append(
                {**result.to_dict(), "device": str(runner.device), "precision": runner.precision}
            )
    if rows:
        print("\nlatency (ms) and throughput:")
        print(format_table(rows, LATENCY_COLUMNS), flush=True)
    return rows
