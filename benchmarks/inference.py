"""Inference speed, measured side by side in one run: prefill latency and throughput of PyTorch eager,
torch.compile, ONNX Runtime and TensorRT, and generation (decode) tokens/s with the static cache.

    python -m benchmarks.inference                      # the original's configurations, on a GPU
    python -m benchmarks.inference --tiny --device cpu  # seconds on a CPU
    python -m benchmarks.inference --from_checkpoint DIR --seq_lens 4096

Models: a checkpoint, or freshly initialised models of the original's configuration (3 layers,
dim 128, vocab 2048): softmax with 4 heads, softplus with core_dim 128 and 424. Prefill: a batch of
--batch_size × seq_len tokens through the cached call form with an empty cache, the shape of the
original's inference table; first_call_ms is the first call alone (compilation included), then
latency percentiles over --iterations calls after --warmup. ONNX Runtime runs the fp32 export on
its CUDA provider on a GPU; a build without that provider gets a row saying it is missing (the
CPU is not a comparable runtime for these shapes). Decode: Generator with a pre-allocated cache,
replaying a CUDA graph per step and eagerly (on a CPU eagerly only), --decode_tokens new tokens
after a --decode_prompt-token prompt, end-of-sequence ignored, sampling with temperature 0.8 and
top-k 50, at each of --decode_batches; a first generation (warm-up, graph capture) is untimed.

Measurements run in this order, so that a --deadline_s budget cuts the least important last:
eager prefill, decoding, ONNX Runtime, TensorRT, torch.compile. One that fails (out of memory,
say) or does not fit the budget is recorded with its reason, and the run goes on; results are
written after every row. A measurement starts only if the time left covers the longest one of its
kind so far (before the first: 30 s for torch.compile, 60 s for TensorRT, nothing for the
others).
"""  # noqa: E501 - --help prints this text as written

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BASE,
    CONFIGS,
    RESULTS_DIR,
    TINY_BASE,
    TINY_CONFIGS,
    Deadline,
    Estimates,
    device_slug,
    format_table,
    wall_clock,
    write_results,
)
from llama3 import ModelArgs, Transformer
from llama3.deploy import latency
from llama3.deploy.onnx_export import export_onnx
from llama3.deploy.runners import (
    OnnxRuntimeRunner,
    TorchRunner,
    onnxruntime_providers,
    too_big_for_host,
)
from llama3.deploy.tensorrt import (
    TensorRTRunner,
    build_engine,
    import_tensorrt,
    missing_message,
    profile_shapes,
)
from llama3.generate import Generator, SamplingSettings

RUNNERS = ("eager", "compile", "onnxruntime", "tensorrt")
ORDER = ("eager", "decode", "onnxruntime", "tensorrt", "compile")  # most important first
# Seconds assumed for the first measurement of a kind under --deadline_s (then: the longest seen).
FIRST_ESTIMATE_S = {"compile": 30.0, "tensorrt": 60.0}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DECODE_MODES = {"static cache, CUDA graph": True, "static cache, eager": False}
PREFILL_COLUMNS = (
    "model",
    "runner",
    "device",
    "precision",
    "batch",
    "seq_len",
    "iterations",
    "first_call_ms",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "calls_per_s",
    "tokens_per_s",
    "error",
)
DECODE_COLUMNS = (
    "model",
    "runner",
    "precision",
    "batch",
    "prompt",
    "new_tokens",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "error",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--from_checkpoint",
        metavar="DIR",
        help="benchmark this checkpoint instead of the original's configurations",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help=f"configurations to run (default: all of {', '.join(CONFIGS)})",
    )
    p.add_argument("--batch_size", type=int, default=64, help="prefill batch")
    p.add_argument(
        "--seq_lens", type=int, nargs="+", default=[4096, 8192], help="prefill sequence lengths"
    )
    p.add_argument(
        "--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS, help="prefill runners"
    )
    p.add_argument(
        "--precision",
        choices=tuple(DTYPES),
        default=None,
        help="PyTorch and TensorRT precision (default: bf16 on CUDA, fp32 on CPU); "
        "ONNX Runtime runs the fp32 export",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed prefill calls")
    p.add_argument("--iterations", type=int, default=20, help="timed prefill calls")
    p.add_argument(
        "--decode_batches", type=int, nargs="+", default=[1, 64], help="generation batch sizes"
    )
    p.add_argument("--decode_prompt", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--decode_tokens", type=int, default=128, help="new tokens per row")
    p.add_argument(
        "--deadline_s",
        type=float,
        default=None,
        help="time budget of the whole run: measurements that would not fit are "
        "recorded as not run",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny models and shapes, for a CPU: checks the benchmark runs end to end",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results (default: benchmarks/results/inference_DEVICE.json)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size, args.seq_lens, args.decode_batches = 2, [64], [1, 4]
        args.decode_prompt, args.decode_tokens = 8, 16
        args.warmup, args.iterations = 1, 3
    return args


def models(args: argparse.Namespace) -> dict[str, Transformer]:
    if args.from_checkpoint:
        from llama3.checkpoint import load_model

        return {Path(args.from_checkpoint).name: load_model(args.from_checkpoint, device="cpu")}
    base, configs = (TINY_BASE, TINY_CONFIGS) if args.tiny else (BASE, CONFIGS)
    chosen = args.models or list(configs)
    unknown = sorted(set(chosen) - set(configs))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(configs)}")
    max_len = max(args.seq_lens + [args.decode_prompt + args.decode_tokens])
    built = {}
    for name in chosen:
        torch.manual_seed(0)
        built[name] = Transformer.build(ModelArgs(**base, **configs[name], max_seq_len=max_len))
    return built


def onnxruntime_missing(device: torch.device) -> str | None:
    """Why ONNX Runtime cannot run on ``device`` in this installation, or None."""
    try:
        import onnxruntime
    except ImportError as err:
        return f"missing: onnxruntime is not installed ({err})"
    if device.type == "cuda" and onnxruntime_providers(device)[0] == "CPUExecutionProvider":
        return (
            f"missing: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
            "(a CPU-only build; onnxruntime-gpu has it)"
        )
    return None


@dataclass
class Measurement:
    kind: str  # an entry of ORDER
    row: dict[str, Any]
    run: Callable[[], dict[str, Any]]
    missing: str | None = None  # why it cannot run here; recorded without running


class Plan:
    """Every measurement of the run, built lazily from the models and the flags."""

    def __init__(self, args: argparse.Namespace, device: torch.device, work: Path):
        self.args, self.device, self.work = args, device, work
        self.dtype = DTYPES[args.precision]
        self.exported: dict[str, Path] = {}

    def measurements(self, name: str, model: Transformer) -> list[Measurement]:
        args, out = self.args, []
        ort_missing = onnxruntime_missing(self.device)
        trt_missing = None
        if "tensorrt" in args.runners:
            trt, reason = import_tensorrt()
            trt_missing = missing_message(reason) if trt is None else None
        for seq_len in args.seq_lens:
            for runner in args.runners:
                row = {
                    "phase": "prefill",
                    "model": name,
                    "runner": runner,
                    "precision": "fp32" if runner == "onnxruntime" else args.precision,
                    "batch": args.batch_size,
                    "seq_len": seq_len,
                }
                missing = {"onnxruntime": ort_missing, "tensorrt": trt_missing}.get(runner)
                out.append(
                    Measurement(runner, row, self.prefill(name, model, runner, seq_len), missing)
                )
        for batch in args.decode_batches:
            for mode, graph in DECODE_MODES.items():
                if graph and self.device.type != "cuda":
                    continue
                row = {
                    "phase": "decode",
                    "model": name,
                    "runner": mode,
                    "precision": args.precision,
                    "batch": batch,
                    "prompt": args.decode_prompt,
                    "new_tokens": args.decode_tokens,
                }
                out.append(Measurement("decode", row, self.decode(model, batch, graph)))
        return out

    def prefill(
        self, name: str, model: Transformer, runner: str, seq_len: int
    ) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            made = self.make_runner(name, model, runner, seq_len)
            batch, args = self.args.batch_size, self.args
            too_big = too_big_for_host(made, model.args, batch, seq_len, 0)
            if too_big:
                raise MemoryError(f"skipped: {too_big}")
            first = latency.measure(made, model.args, batch, seq_len, warmup=0, iterations=1)
            result = latency.measure(
                made, model.args, batch, seq_len, warmup=args.warmup, iterations=args.iterations
            )
            measured = {
                k: v
                for k, v in result.to_dict().items()
                if k.endswith(("_ms", "_per_s")) or k == "iterations"
            }
            return {**measured, "first_call_ms": first.mean_ms, "device": str(made.device)}

        return run

    def make_runner(self, name: str, model: Transformer, runner: str, seq_len: int) -> Any:
        if runner == "eager":
            return TorchRunner(model.to(self.device, self.dtype))
        if runner == "compile":
            torch._dynamo.reset()  # first_call_ms: this model and shape compiled from scratch
            made = TorchRunner(model.to(self.device, self.dtype))
            made.name, made.model = "compile", torch.compile(model, dynamic=False)
            return made
        path = self.onnx(name, model)
        if runner == "onnxruntime":
            return OnnxRuntimeRunner(path, model.args, self.device)
        trt, _ = import_tensorrt()
        engine = path.with_name(f"{path.stem}_{seq_len}_{self.args.precision}.engine")
        shapes = profile_shapes(model.args, self.args.batch_size, seq_len, seq_len)
        build_engine(trt, path, engine, shapes, self.args.precision)
        return TensorRTRunner(trt, engine, self.device, self.args.precision)

    def onnx(self, name: str, model: Transformer) -> Path:
        """The model's fp32 ONNX export, made once."""
        if name not in self.exported:
            print(f"{name}: exporting ONNX ...", flush=True)
            path = self.work / f"{name}.onnx"
            export_onnx(model.to("cpu", torch.float32), path)
            self.exported[name] = path
        return self.exported[name]

    def decode(self, model: Transformer, batch: int, graph: bool) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            args = self.args
            generator = Generator(
                model.to(self.device, self.dtype), device=self.device, cuda_graph=graph
            )
            g = torch.Generator().manual_seed(0)
            prompts = torch.randint(
                0, model.args.vocab_size, (batch, args.decode_prompt), generator=g
            ).tolist()
            settings = SamplingSettings(
                max_new_tokens=args.decode_tokens, temperature=0.8, top_k=50, top_p=1.0
            )
            generator.generate_ids(prompts, settings, stop_at_eos=False)  # warm-up, capture
            result = generator.generate_ids(prompts, settings, stop_at_eos=False)
            return {
                "prefill_tokens_per_s": result.prefill_tokens_per_s,
                "decode_tokens_per_s": result.decode_tokens_per_s,
            }

        return run


def run_one(measurement: Measurement) -> dict[str, Any]:
    """Run one measurement; a failure (out of memory, say) becomes the row's error."""
    row = dict(measurement.row)
    label = f"{row['model']} {row['phase']} {row['runner']} batch {row['batch']}"
    print(f"{label} ...", flush=True)
    try:
        row.update(measurement.run())
    except Exception as err:  # noqa: BLE001 - every failure is reported, the run goes on
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        print(f"  {label}: {row['error']}", flush=True)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """How the run timed: prefill calls and generations by the wall clock, the device
    synchronised (a runtime's own CUDA stream included); no L2 flush (whole-model calls)."""
    prefill = wall_clock(
        "one call, between device-wide synchronisations",
        "mean, 50th/90th/95th/99th percentiles",
        warmup=args.warmup,
        repetitions=args.iterations,
        first_call="one call alone, timed apart",
    )
    decode = wall_clock(
        "the prefill and the decoding of one generation, the device synchronised",
        "tokens/s of each",
        warmup=1,
        repetitions=1,
    )
    return {"prefill": prefill, "decode": decode}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, deadline = time.monotonic(), Deadline(args.deadline_s)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    output = args.output or RESULTS_DIR / f"inference_{device_slug(device)}.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    rows: list[dict[str, Any]] = []
    estimates = Estimates(FIRST_ESTIMATE_S)
    with tempfile.TemporaryDirectory(prefix="llama3-inference-") as tmp:
        plan = Plan(args, device, Path(tmp))
        todo = [m for name, model in models(args).items() for m in plan.measurements(name, model)]
        todo.sort(key=lambda m: ORDER.index(m.kind))  # stable: model order kept within a kind
        for measurement in todo:
            begin = time.monotonic()
            if measurement.missing:
                rows.append({**measurement.row, "error": measurement.missing})
            elif not deadline.allows(estimates[measurement.kind]):
                rows.append({**measurement.row, "error": Deadline.skipped()})
            else:
                rows.append(run_one(measurement))
                estimates.record(measurement.kind, time.monotonic() - begin)
            write_results(
                output,
                rows,
                timing=timing(args),
                benchmark="inference",
                settings=settings,
                elapsed_s=time.monotonic() - started,
            )
    print("\nprefill (empty cache):")
    print(format_table([r for r in rows if r["phase"] == "prefill"], PREFILL_COLUMNS))
    print("\ndecode (static cache):")
    print(format_table([r for r in rows if r["phase"] == "decode"], DECODE_COLUMNS))
    print(f"\nresults: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
