"""Softplus attention kernels on a GPU, in bf16 and fp16, against the fp32 reference on the same
GPU.

Tolerances are set as FlashAttention's own tests set them: for the output and every gradient, the
kernel's largest error against the fp32 reference (the operator's definition on upcast inputs) may
be at most RTOL times the largest error of the same formula computed densely by PyTorch in the
inputs' low precision, plus twice the rounding of that low precision near the reference's values.
A kernel as accurate as plain low-precision PyTorch passes; one that loses more precision fails.

The backward is checked on both of its paths: the fused one (the default; dq by atomic adds) in
every case, the deterministic one at the model's layouts, where it must also repeat bit for bit.

Cases: every r in {64, 128, 424, 512} at S = 1 (decoding after a long cache, per-row lengths,
split-K), 7 (a few rows, no unit stride anywhere, constant scale), 300 (the model's layouts, per-row
lengths) and 4096 (a training window). Keys past a row's length hold NaN: a kernel that reads them
fails. Each case has a fixed seed, named in its failure messages. Marked ``gpu``; they skip without
CUDA. ``LLAMA3_GPU_TESTS_ON_CPU=1`` with ``TRITON_INTERPRET=1`` (both set when the process starts)
runs a few tiny cases in Triton's CPU interpreter (fp16): that checks the test itself wherever CUDA
is missing.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from llama3.ops import softplus_attention, softplus_attention_reference

ON_CPU = all(
    os.environ.get(name) == "1" for name in ("LLAMA3_GPU_TESTS_ON_CPU", "TRITON_INTERPRET")
)
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if ON_CPU else None)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE is None,
        reason="needs a CUDA GPU (or LLAMA3_GPU_TESTS_ON_CPU=1"
        " and TRITON_INTERPRET=1: tiny cases in Triton's interpreter)",
    ),
]

RTOL = 2  # FlashAttention's factor over the low-precision PyTorch error

# S → (batch, cached keys C, layout, per-row kv_len, scale)
if DEVICE == "cuda":
    R_VALUES = (64, 128, 424, 512)
    DTYPES = (torch.bfloat16, torch.float16)
    SHAPES = {
        1: (8, 1023, "cache", True, "length"),
        7: (3, 57, "strided", False, "constant"),
        300: (2, 37, "model", True, "length"),
        4096: (1, 0, "model", False, "length"),
    }
else:  # the interpreter: fp16 only (it cannot compute in bf16), tiny shapes
    R_VALUES = (16, 40)
    DTYPES = (torch.float16,)
    SHAPES = {
        1: (3, 20, "cache", True, "length"),
        7: (2, 5, "strided", False, "constant"),
        40: (2, 9, "model", True, "length"),
    }


@pytest.fixture
def kernels():
    """The Triton kernels: compiled on CUDA, interpreted on the CPU (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")


def make_inputs(
    B: int, S: int, r: int, T: int, dtype: torch.dtype, layout: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (B, S, r); k, v (B, r, T); dO (B, S, r) in one of the layouts the operator meets."""

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    if layout == "cache":  # a cache with spare capacity, rows 16-byte aligned as the model's are
        capacity = (T + 64 + 7) // 8 * 8  # (so wide cores' backward reads k, v through TMA)
        return (
            randn(B, S, r),
            randn(B, r, capacity)[..., :T],
            randn(B, r, capacity)[..., :T],
            randn(B, S, r),
        )
    if layout == "model":  # k, v as the model makes them: transposed (B, T, r)
        return (
            randn(B, S, r),
            randn(B, T, r).transpose(1, 2),
            randn(B, T, r).transpose(1, 2),
            randn(B, S, r),
        )
    assert layout == "strided"  # every other element: no axis has unit stride
    return (
        randn(B, S, 2 * r)[..., ::2],
        randn(B, 2 * r, T)[:, ::2],
        randn(B, T, 2 * r)[..., ::2].transpose(1, 2),
        randn(B, r, 2 * S)[..., ::2].transpose(1, 2),
    )


def dense_low_precision(
    q: Tensor, k: Tensor, v: Tensor, scale: str, kv_len: Tensor | None
) -> Tensor:
    """The operator's formula by PyTorch in the inputs' dtype: every matmul, the softplus, the sum
    and the division round to it, as FlashAttention's tests compute their PyTorch baseline."""
    B, S, r = q.shape
    T = k.shape[2]
    first = (
        (kv_len - S).view(-1, 1) if kv_len is not None else torch.tensor([[T - S]], device=q.device)
    )
    pos = first + torch.arange(S, device=q.device)  # (1|B, S) absolute query positions
    lam = (
        torch.log(pos + 1.0) / math.sqrt(r)
        if scale == "length"
        else torch.full(pos.shape, 1 / math.sqrt(r), device=q.device)
    )
    z = lam.to(q.dtype).unsqueeze(-1) * (q @ k)  # (B, S, T)
    visible = torch.arange(T, device=q.device).view(1, 1, T) <= pos.unsqueeze(-1)
    w = F.softplus(z).masked_fill(~visible, 0)
    return (w @ v.transpose(1, 2)) / w.sum(-1, keepdim=True)


def outputs_and_gradients(
    fn, q: Tensor, k: Tensor, v: Tensor, do: Tensor, cast: torch.dtype | None = None
) -> list[Tensor]:
    """[o, dq, dk, dv] of ``fn(q, k, v)`` under autograd, inputs cast to ``cast`` if given."""
    leaves = [x.detach().to(cast or x.dtype).requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    o.backward(do.to(o.dtype))
    return [o, *(x.grad for x in leaves)]


def max_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()


def rounding_allowance(expected: Tensor, dtype: torch.dtype) -> float:
    """FlashAttention's atol: twice the error of ``x + 0.3 − 0.3`` in the low precision."""
    low = expected.to(dtype)
    return 2 * (low + 0.3 - 0.3 - low).abs().max().item()


def check_case(
    B: int,
    S: int,
    r: int,
    C: int,
    layout: str,
    ragged: bool,
    scale: str,
    dtype: torch.dtype,
    seed: int,
    kernel_scale: str | None = None,
) -> list[str]:
    """Run the kernels and both references on inputs drawn from ``seed``; returns the failures
    (empty: within tolerance)."""
    torch.manual_seed(seed)
    T = S + C
    q, k, v, do = make_inputs(B, S, r, T, dtype, layout)
    kv_len = None
    if ragged:  # row b holds S + b·C/(B−1) keys (the last row all T); the rest is NaN garbage
        kv_len = torch.tensor([S + C * b // max(B - 1, 1) for b in range(B)], device=DEVICE)
        tail = torch.arange(T, device=DEVICE).view(1, 1, T) >= kv_len.view(B, 1, 1)
        k.masked_fill_(tail, 0.0)
        v.masked_fill_(tail, 0.0)

    def kernel(q, k, v):
        if ragged:  # the kernels get NaN where the references get zeros
            k, v = k.masked_fill(tail, float("nan")), v.masked_fill(tail, float("nan"))
        return softplus_attention(q, k, v, scale=kernel_scale or scale, kv_len=kv_len)

    got = outputs_and_gradients(kernel, q, k, v, do)
    exact = outputs_and_gradients(
        lambda *x: softplus_attention_reference(*x, scale, kv_len), q, k, v, do, cast=torch.float32
    )
    low = outputs_and_gradients(lambda *x: dense_low_precision(*x, scale, kv_len), q, k, v, do)
    failures = []
    for name, g, e, lp in zip(("o", "dq", "dk", "dv"), got, exact, low):
        assert g.shape == e.shape and g.dtype == dtype, (name, g.shape, g.dtype)
        if not torch.isfinite(g).all():
            failures.append(f"{name}: non-finite values")
            continue
        error, bound = max_error(g, e), RTOL * max_error(lp, e) + rounding_allowance(e, dtype)
        if error > bound:
            failures.append(
                f"{name}: error {error:.3g} > {RTOL} × {max_error(lp, e):.3g} "
                f"(dense {str(dtype)[6:]}) + {rounding_allowance(e, dtype):.3g}"
            )
    return [f"{f} (B={B} S={S} r={r} C={C} {layout}, seed {seed})" for f in failures]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("r", R_VALUES)
@pytest.mark.parametrize("S", list(SHAPES))
def test_kernels_within_flash_attention_tolerance(kernels, dtype, r, S):
    B, C, layout, ragged, scale = SHAPES[S]
    assert check_case(B, S, r, C, layout, ragged, scale, dtype, seed=S * 1000 + r) == []


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("r", R_VALUES)
def test_deterministic_backward_within_tolerance_and_repeatable(kernels, monkeypatch, dtype, r):
    """The deterministic launches (LLAMA3_KERNEL_DETERMINISTIC=1), at the model's layouts with
    per-row lengths: within the same tolerance, and the same gradients bit for bit when run
    again (the fused path's dq may differ in its last bits)."""
    from llama3.ops import softplus_triton

    monkeypatch.setattr(softplus_triton, "DETERMINISTIC", True)
    S = next(s for s, shape in SHAPES.items() if shape[2] == "model")
    B, C, layout, ragged, scale = SHAPES[S]
    assert check_case(B, S, r, C, layout, ragged, scale, dtype, seed=S * 1000 + r) == []
    torch.manual_seed(r)
    q, k, v, do = make_inputs(B, S, r, S + C, dtype, layout)
    first, again = (
        outputs_and_gradients(lambda *x: softplus_attention(*x, scale=scale), q, k, v, do)
        for _ in range(2)
    )
    for name, a, b in zip(("o", "dq", "dk", "dv"), first, again):
        assert torch.equal(a, b), f"{name} differs between two runs (r={r}, {dtype})"


def test_tolerance_detects_a_wrong_scale(kernels):
    """The kernels run with the constant scale, the references with the length scale: the bound
    fails, so the comparison above can fail."""
    S = max(SHAPES)
    B, C, layout, ragged, _ = SHAPES[S]
    failures = check_case(
        B, S, R_VALUES[0], C, layout, ragged, "length", DTYPES[0], seed=0, kernel_scale="constant"
    )
    assert any(f.startswith("o:") for f in failures), failures
