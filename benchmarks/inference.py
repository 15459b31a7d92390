"""Inference speed, measured side by side in one run: prefill latency and throughput of PyTorch eager,
torch.compile, ONNX Runtime and TensorRT, and generation (decode) tokens/s with the static cache.

    python benchmarks/inference.py                      # the original's configurations, on a GPU
    python benchmarks/inference.py --tiny               # minutes on a CPU
    python benchmarks/inference.py --from_checkpoint DIR --seq_lens 4096

Models: a checkpoint, or freshly initialised models of the original's configuration (3 layers,
dim 128, vocab 2048): softmax with 4 heads, softplus with core_dim 128 and 424. Prefill: a batch of
--batch_size × seq_len tokens through the cached call form with an empty cache, the shape of the
original's inference table; latency percentiles are over --iterations calls after --warmup.
Decode: Generator with a pre-allocated cache (a CUDA graph per step on GPU, and eager for
comparison), --decode_tokens new tokens after a --decode_prompt-token prompt, end-of-sequence
ignored, at each of --decode_batches. A measurement that fails (out of memory, say) is recorded
with its error and the run goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BASE, CONFIGS, TINY_BASE, TINY_CONFIGS, environment,  # noqa: E402
                               format_table, write_results)

import argparse  # noqa: E402
import gc  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from llama3 import ModelArgs, Transformer  # noqa: E402
from llama3.deploy import latency  # noqa: E402
from llama3.deploy.onnx_export import export_onnx  # noqa: E402
from llama3.deploy.runners import (OnnxRuntimeRunner, TorchRunner,  # noqa: E402
                                   too_big_for_host)
from llama3.deploy.tensorrt import (TensorRTRunner, build_engine, import_tensorrt,  # noqa: E402
                                    missing_message, profile_shapes)
from llama3.generate import Generator, SamplingSettings  # noqa: E402

RUNNERS = ("eager", "compile", "onnxruntime", "tensorrt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PREFILL_COLUMNS = ("model", "runner", "device", "precision", "batch", "seq_len", "iterations",
                   "mean_ms", "p50_ms", "p90_ms", "p99_ms", "calls_per_s", "tokens_per_s", "error")
DECODE_COLUMNS = ("model", "runner", "precision", "batch", "prompt", "new_tokens",
                  "prefill_tokens_per_s", "decode_tokens_per_s", "error")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_checkpoint", metavar="DIR",
                   help="benchmark this checkpoint instead of the original's configurations")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"configurations to run (default: all of {', '.join(CONFIGS)})")
    p.add_argument("--batch_size", type=int, default=64, help="prefill batch")
    p.add_argument("--seq_lens", type=int, nargs="+", default=[4096, 8192],
                   help="prefill sequence lengths")
    p.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS,
                   help="prefill runners")
    p.add_argument("--precision", choices=tuple(DTYPES), default=None,
                   help="PyTorch and TensorRT precision (default: bf16 on CUDA, fp32 on CPU); "
                        "ONNX Runtime runs the fp32 export")
    p.add_argument("--warmup", type=int, default=5, help="untimed prefill calls")
    p.add_argument("--iterations", type=int, default=20, help="timed prefill calls")
    p.add_argument("--decode_batches", type=int, nargs="+", default=[1, 64],
                   help="generation batch sizes")
    p.add_argument("--decode_prompt", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--decode_tokens", type=int, default=256, help="new tokens per row")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models and shapes, for a CPU: checks the benchmark runs end to end")
    p.add_argument("--output", default=str(Path(__file__).resolve().parent / "out" / "inference.json"),
                   help="JSON results file")
    args = p.parse_args()
    if args.tiny:
        args.batch_size, args.seq_lens, args.decode_batches = 2, [64], [1, 4]
        args.decode_prompt, args.decode_tokens = 8, 16
        args.warmup, args.iterations = 1, 3
    return args


def models(args: argparse.Namespace, device: torch.device) -> dict[str, Transformer]:
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


def attempt(row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; a failure (out of memory, say) becomes the row's error."""
    try:
        row.update(fn())
    except Exception as err:  # noqa: BLE001 - every failure is reported, the run goes on
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        print(f"  {row['model']} {row['runner']}: {row['error']}", flush=True)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def prefill_runners(name: str, model: Transformer, args: argparse.Namespace, device: torch.device,
                    dtype: torch.dtype, work: Path, seq_len: int) -> dict[str, Callable[[], Any]]:
    """Factories for the requested runners of one model (built lazily, so one failing build does
    not stop the others)."""
    factories: dict[str, Callable[[], Any]] = {}
    if "eager" in args.runners:
        factories["eager"] = lambda: TorchRunner(model.to(device, dtype))
    if "compile" in args.runners:
        factories["compile"] = lambda: _compiled(model.to(device, dtype))
    onnx_path = work / f"{name}.onnx"
    if "onnxruntime" in args.runners:
        factories["onnxruntime"] = lambda: OnnxRuntimeRunner(onnx_path, model.args, device)
    if "tensorrt" in args.runners:
        factories["tensorrt"] = lambda: _tensorrt(onnx_path, model.args, args, device, seq_len)
    return factories


def _compiled(model: Transformer) -> TorchRunner:
    runner = TorchRunner(model)
    runner.name, runner.model = "compile", torch.compile(model, dynamic=False)
    return runner


def _tensorrt(onnx_path: Path, model_args: ModelArgs, args: argparse.Namespace,
              device: torch.device, seq_len: int) -> TensorRTRunner:
    trt, reason = import_tensorrt()
    if trt is None:
        raise RuntimeError(missing_message(reason))
    if device.type != "cuda":
        raise RuntimeError("TensorRT needs a CUDA device")
    engine = onnx_path.with_name(f"{onnx_path.stem}_{seq_len}_{args.precision}.engine")
    shapes = profile_shapes(model_args, args.batch_size, seq_len, seq_len)
    build_engine(trt, onnx_path, engine, shapes, args.precision)
    return TensorRTRunner(trt, engine, device, args.precision)


def run_prefill(name: str, model: Transformer, args: argparse.Namespace, device: torch.device,
                work: Path) -> list[dict[str, Any]]:
    dtype = DTYPES[args.precision]
    if {"onnxruntime", "tensorrt"} & set(args.runners):
        print(f"{name}: exporting ONNX ...", flush=True)
        export_onnx(model.to("cpu", torch.float32), work / f"{name}.onnx")
    rows = []
    for seq_len in args.seq_lens:
        for runner_name, make in prefill_runners(name, model, args, device, dtype, work,
                                                 seq_len).items():
            precision = "fp32" if runner_name == "onnxruntime" else args.precision
            row = {"model": name, "runner": runner_name, "precision": precision,
                   "batch": args.batch_size, "seq_len": seq_len}
            print(f"{name}: prefill {runner_name} {args.batch_size}×{seq_len} ...", flush=True)

            def measure(make=make, seq_len=seq_len) -> dict[str, Any]:
                runner = make()
                too_big = too_big_for_host(runner, model.args, args.batch_size, seq_len, 0)
                if too_big:
                    raise MemoryError(f"skipped: {too_big}")
                warmup, iterations = args.warmup, args.iterations
                if runner.device.type != device.type:  # ONNX Runtime without CUDA: be brief
                    warmup, iterations = min(warmup, 1), min(iterations, 3)
                result = latency.measure(runner, model.args, args.batch_size, seq_len,
                                         warmup=warmup, iterations=iterations)
                measured = {k: v for k, v in result.to_dict().items()
                            if k.endswith(("_ms", "_per_s")) or k == "iterations"}
                return {**measured, "device": str(runner.device)}

            rows.append(attempt(row, measure))
    return rows


def run_decode(name: str, model: Transformer, args: argparse.Namespace,
               device: torch.device) -> list[dict[str, Any]]:
    dtype = DTYPES[args.precision]
    modes = [("generate+graph", True), ("generate", False)] if device.type == "cuda" else [
        ("generate", False)]
    rows = []
    for batch in args.decode_batches:
        for runner_name, graph in modes:
            row = {"model": name, "runner": runner_name, "precision": args.precision,
                   "batch": batch, "prompt": args.decode_prompt, "new_tokens": args.decode_tokens}
            print(f"{name}: decode {runner_name} batch {batch} ...", flush=True)

            def measure(batch=batch, graph=graph) -> dict[str, Any]:
                generator = Generator(model.to(device, dtype), device=device, cuda_graph=graph)
                g = torch.Generator().manual_seed(0)
                prompts = torch.randint(0, model.args.vocab_size, (batch, args.decode_prompt),
                                        generator=g).tolist()
                settings = SamplingSettings(max_new_tokens=args.decode_tokens, temperature=0.8,
                                            top_k=50, top_p=1.0)
                generator.generate_ids(prompts, settings, stop_at_eos=False)  # warm-up, capture
                result = generator.generate_ids(prompts, settings, stop_at_eos=False)
                return {"prefill_tokens_per_s": result.prefill_tokens_per_s,
                        "decode_tokens_per_s": result.decode_tokens_per_s}

            rows.append(attempt(row, measure))
    return rows


def main() -> int:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if "onnxruntime" in args.runners and device.type == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            print("ONNX Runtime: no CUDA provider in this build; it runs on the CPU, with at most "
                  "3 timed calls")
    if "tensorrt" in args.runners:
        trt, reason = import_tensorrt()
        if trt is None:
            print(missing_message(reason))
            args.runners = [r for r in args.runners if r != "tensorrt"]
    prefill, decode = [], []
    with tempfile.TemporaryDirectory(prefix="llama3-inference-") as tmp:
        for name, model in models(args, device).items():
            prefill += run_prefill(name, model, args, device, Path(tmp))
            decode += run_decode(name, model, args, device)
    print("\nprefill (empty cache):")
    print(format_table(prefill, PREFILL_COLUMNS))
    print("\ndecode (static cache):")
    print(format_table(decode, DECODE_COLUMNS))
    path = write_results(args.output, prefill + decode, benchmark="inference",
                         settings={k: v for k, v in vars(args).items() if k != "output"},
                         device_name=environment()["gpu"] or "cpu")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
