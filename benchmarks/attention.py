"""Attention kernel benchmark: softplus (Triton, reference) against softmax SDPA, side by side.

    python -m benchmarks.attention            # GPU: B=16, S=4096 at r=128..512, S sweep, decoding
    python -m benchmarks.attention --main     # GPU: only r=128 and 424 at B=16, S=4096, decoding
    python -m benchmarks.attention --tiny     # CPU: tiny shapes, Triton rows interpreted

Training shapes report forward, backward and forward+backward time, TFLOP/s and peak memory, for
the softplus kernels' fused backward (softplus_triton, the default) and their deterministic one
(softplus_triton_det, LLAMA3_KERNEL_DETERMINISTIC=1) side by side. FLOPs
count the score and value products over the visible (causal) pairs only: forward 4·r per pair,
backward 10·r (five products), the usual FlashAttention convention, the same for every row.
Softmax runs through scaled_dot_product_attention with one head of head_dim r, on the flash, cuDNN
and memory-efficient backends (a row says so when a backend rejects the shape). Decoding (S = 1)
reports GB/s of keys and values read, beside a measured device copy bandwidth; a bf16 matmul gives
the TFLOP/s ceiling. Rows that would not fit in memory are skipped with a note. Inputs are fresh
random draws. Times are medians (the JSON adds the 20% and 80% quantiles and the repetitions): on
the GPU through triton.testing.do_bench, the L2 cache flushed before every repetition; on the CPU
by the wall clock; the JSON's "timing" says how. The first call of each row is timed apart
(first_s: compilation and autotuning included, forward and backward); with
LLAMA3_KERNEL_AUTOTUNE=0 in the environment the kernels skip autotuning, which the JSON records.
"""

import argparse
import functools
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Timer,
    copy_bandwidth_gb_per_s,
    environment,
    format_table,
    matmul_tflops,
    write_results,
)
from llama3.ops import softplus_attention, softplus_attention_reference
from llama3.ops.softplus_attention import cpu_kernels

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "out" / "attention.json"
COLUMNS = [
    "impl",
    "B",
    "S",
    "T",
    "r",
    "first_s",
    "fwd_ms",
    "bwd_ms",
    "fwdbwd_ms",
    "fwd_tflops",
    "bwd_tflops",
    "fwdbwd_tflops",
    "fwd_vs_sdpa",
    "fwdbwd_vs_sdpa",
    "fwd_vs_fastest",
    "fwdbwd_vs_fastest",
    "fwd_of_peak",
    "peak_mem_gb",
    "note",
]
DECODE_COLUMNS = ["impl", "B", "T", "r", "first_s", "ms", "kv_gb_per_s", "of_copy_bw", "note"]


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def peak_memory_gb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory (GB) that ``fn()`` allocates beyond what already exists; None on the CPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e9


def first_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of a first call (compilation and autotuning included) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin, result


@contextmanager
def interpreted(enabled: bool):
    """The Triton kernels in Triton's CPU interpreter inside the block (the Triton rows on a
    CPU)."""
    if not enabled:
        yield
        return
    with cpu_kernels():
        yield


def free_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return float("inf")


# ---------------------------------------------------------------------------------------------
# Implementations: each returns (forward callable, inputs that need gradients)
# ---------------------------------------------------------------------------------------------


def softplus_inputs(B, S, T, r, dtype, device, cache_layout=False):
    """q (B, S, r); k, v (B, r, T), as the model makes them (transposed (B, T, r)) or as a cache."""
    q = torch.randn(B, S, r, device=device, dtype=dtype)
    if cache_layout:
        k, v = (torch.randn(B, r, T, device=device, dtype=dtype) for _ in range(2))
    else:
        k, v = (torch.randn(B, T, r, device=device, dtype=dtype).transpose(1, 2) for _ in range(2))
    return q, k, v


def sdpa_inputs(B, S, T, r, dtype, device):
    """One head of head_dim r: (B, 1, S|T, r)."""
    return tuple(torch.randn(B, 1, n, r, device=device, dtype=dtype) for n in (S, T, T))


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "mem_efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


TRITON_IMPLS = ("softplus_triton", "softplus_triton_det")


@contextmanager
def backward_path(impl: str):
    """The deterministic backward of the softplus kernels inside the block for the
    softplus_triton_det rows (the module's LLAMA3_KERNEL_DETERMINISTIC switch), else nothing."""
    if impl != "softplus_triton_det":
        yield
        return
    from llama3.ops import softplus_triton

    saved, softplus_triton.DETERMINISTIC = softplus_triton.DETERMINISTIC, True
    try:
        yield
    finally:
        softplus_triton.DETERMINISTIC = saved


def make_call(impl: str, q, k, v, causal: bool = True) -> Callable[[], torch.Tensor]:
    if impl in TRITON_IMPLS:
        return lambda: softplus_attention(q, k, v)
    if impl == "softplus_reference":
        return lambda: softplus_attention_reference(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[impl.removeprefix("sdpa_")])

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def inputs_for(impl: str, B, S, T, r, dtype, device, cache_layout=False):
    if impl.startswith("softplus"):
        return softplus_inputs(B, S, T, r, dtype, device, cache_layout)
    return sdpa_inputs(B, S, T, r, dtype, device)


def reference_bytes(B: int, S: int, T: int) -> float:
    """Rough peak of the reference's forward and backward: a handful of fp32 S×T matrices."""
    return 10.0 * B * S * T * 4


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _note(impl: str, device: torch.device) -> str | None:
    if impl in TRITON_IMPLS and device.type == "cpu":
        return "Triton interpreter on the CPU"
    return None


def visible_pairs(B: int, S: int, T: int) -> int:
    """(query, key) pairs the causal mask lets through: B · Σ_i (T − S + i + 1)."""
    return B * (S * (T - S) + S * (S + 1) // 2)


def measure_training(impl, B, S, r, dtype, timer: Timer) -> dict[str, Any]:
    row: dict[str, Any] = dict(impl=impl, B=B, S=S, T=S, r=r)
    device = timer.device
    if impl == "softplus_reference" and reference_bytes(B, S, S) > 0.8 * free_memory(device):
        return {**row, "note": "skipped: would not fit in memory"}
    q, k, v = (x.requires_grad_() for x in inputs_for(impl, B, S, S, r, dtype, device))
    call = make_call(impl, q, k, v)
    try:
        with interpreted(impl in TRITON_IMPLS and device.type == "cpu"), backward_path(impl):
            first_fwd, out = first_call(call, device)
            do = torch.randn_like(out)
            backward = functools.partial(torch.autograd.grad, out, (q, k, v), do, retain_graph=True)
            first_bwd, _ = first_call(backward, device)
            fwd = timer(call)
            bwd = timer(backward)
            fwdbwd = timer(lambda: torch.autograd.grad(call(), (q, k, v), do))
            del backward, out  # free the retained graph before measuring peak memory
            peak = peak_memory_gb(lambda: torch.autograd.grad(call(), (q, k, v), do), device)
    except RuntimeError as error:  # a backend that rejects the shape, or out of memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "note": f"skipped: {str(error).splitlines()[0][:80]}"}
    pairs = visible_pairs(B, S, S)
    return {
        **row,
        "note": _note(impl, device),
        "first_s": first_fwd + first_bwd,
        **fwd.fields("fwd_"),
        **bwd.fields("bwd_"),
        **fwdbwd.fields("fwdbwd_"),
        "fwd_tflops": 4 * r * pairs / fwd.ms / 1e9,
        "bwd_tflops": 10 * r * pairs / bwd.ms / 1e9,
        "fwdbwd_tflops": 14 * r * pairs / fwdbwd.ms / 1e9,
        "peak_mem_gb": peak,
    }


def measure_decoding(impl, B, T, r, dtype, timer: Timer, copy_gb_per_s) -> dict[str, Any]:
    row: dict[str, Any] = dict(impl=impl, B=B, T=T, r=r)
    device = timer.device
    q, k, v = inputs_for(impl, B, 1, T, r, dtype, device, cache_layout=True)
    call = make_call(impl, q, k, v, causal=False)  # one query sees every key
    try:
        with interpreted(impl in TRITON_IMPLS and device.type == "cpu"), torch.no_grad():
            first, _ = first_call(call, device)
            timed = timer(call)
    except RuntimeError as error:
        return {**row, "note": f"skipped: {str(error).splitlines()[0][:80]}"}
    gb_per_s = 2 * k.numel() * k.element_size() / timed.ms / 1e6
    return {
        **row,
        "note": _note(impl, device),
        "first_s": first,
        **timed.fields(),
        "kv_gb_per_s": gb_per_s,
        "of_copy_bw": gb_per_s / copy_gb_per_s if copy_gb_per_s else None,
    }


def add_ratios(rows: list[dict[str, Any]], peak_tflops: float) -> None:
    """Softplus (Triton) against its softmax counterpart: SDPA flash up to r = 256, else
    memory-efficient (or whichever of the two ran); and against the fastest SDPA backend."""
    for row in rows:
        if row["impl"] not in TRITON_IMPLS or "fwd_ms" not in row:
            continue
        same = {
            x["impl"]: x
            for x in rows
            if (x["B"], x["S"], x["r"]) == (row["B"], row["S"], row["r"]) and "fwd_ms" in x
        }
        preferred = ["sdpa_mem_efficient"]
        if row["r"] <= 256:
            preferred.insert(0, "sdpa_flash")
        base = next((same[name] for name in preferred if name in same), None)
        if base is not None:
            row["fwd_vs_sdpa"] = base["fwd_ms"] / row["fwd_ms"]
            row["fwdbwd_vs_sdpa"] = base["fwdbwd_ms"] / row["fwdbwd_ms"]
        sdpa = [x for name, x in same.items() if name.startswith("sdpa_")]
        if sdpa:
            row["fwd_vs_fastest"] = min(x["fwd_ms"] for x in sdpa) / row["fwd_ms"]
            row["fwdbwd_vs_fastest"] = min(x["fwdbwd_ms"] for x in sdpa) / row["fwdbwd_ms"]
        row["fwd_of_peak"] = row["fwd_tflops"] / peak_tflops


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


SDPA_IMPLS = ["sdpa_flash", "sdpa_cudnn", "sdpa_mem_efficient"]


def plan(tiny: bool, device: torch.device, main_rows: bool = False) -> dict[str, Any]:
    """Shapes (B, S, r) and (B, T, r), implementations, sizes and the timer; ``main_rows``: only
    the rows the performance goals name (r = 128 and 424), without the reference."""
    if tiny:
        impls = [*TRITON_IMPLS, "softplus_reference", "sdpa_flash", "sdpa_math"]
        training = [(2, 64, 64), (1, 48, 136)]
        if main_rows:
            impls, training = [*TRITON_IMPLS, *SDPA_IMPLS], training[:1]
        return dict(
            training=training,
            decoding=[(2, 128, 64)],
            timer=Timer(device, repeats=2),
            impls=impls,
            dtype=torch.float32,
            copy_numel=1 << 22,
            matmul_n=256,
        )
    design = [(16, 4096, r) for r in (128, 256, 424, 512)]
    sweep = [(65536 // s, s, r) for r in (128, 424) for s in (1024, 2048, 8192, 16384)]
    training, impls = design + sweep, [*TRITON_IMPLS, "softplus_reference", *SDPA_IMPLS]
    if main_rows:
        training, impls = [(16, 4096, 128), (16, 4096, 424)], [*TRITON_IMPLS, *SDPA_IMPLS]
    return dict(
        training=training,
        decoding=[(64, 4096, 128), (64, 4096, 424)],
        timer=Timer(device),
        impls=impls,
        dtype=torch.bfloat16,
        copy_numel=1 << 30,
        matmul_n=8192,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attention", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes that run on a CPU (Triton rows in Triton's interpreter)",
    )
    parser.add_argument(
        "--main",
        action="store_true",
        help="only the main rows: r = 128 and 424 at B=16, S=4096, and decoding",
    )
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON results file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA GPU: the full benchmark needs one; use --tiny on a CPU")
    p = plan(args.tiny, device, args.main)
    timer = p["timer"]
    seed = torch.seed()  # fresh inputs every run; recorded with the results

    peak = matmul_tflops(timer, p["matmul_n"], p["dtype"])
    copy_bw = copy_bandwidth_gb_per_s(timer, p["copy_numel"])
    print(
        f"device {environment()['gpu'] or 'cpu'}: {p['dtype']} matmul {peak:.4g} TFLOP/s, "
        f"copy {copy_bw:.4g} GB/s"
    )

    rows = []
    for B, S, r in p["training"]:
        for impl in p["impls"]:
            rows.append(measure_training(impl, B, S, r, p["dtype"], timer))
            print(
                f"  {impl} B={B} S={S} r={r}: fwd+bwd {rows[-1].get('fwdbwd_ms', '-')} ms",
                file=sys.stderr,
                flush=True,
            )
    add_ratios(rows, peak)
    decoding = [
        measure_decoding(impl, B, T, r, p["dtype"], timer, copy_bw)
        for B, T, r in p["decoding"]
        for impl in p["impls"]
        if impl != "softplus_triton_det"  # the forward is the same
    ]

    print("\nTraining shapes (causal, T = S):\n" + format_table(rows, COLUMNS))
    print("\nDecoding (S = 1):\n" + format_table(decoding, DECODE_COLUMNS))
    path = write_results(
        args.output,
        rows + decoding,
        timing=timer.record(),
        dtype=str(p["dtype"]),
        seed=seed,
        matmul_tflops=peak,
        copy_gb_per_s=copy_bw,
        tiny=args.tiny,
        main_rows=args.main,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
