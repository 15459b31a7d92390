"""The public softplus attention operator: input checks, a PyTorch custom op, and dispatch.

To the rest of PyTorch the operator is ``torch.ops.llama3.softplus_attention`` (returning the
output and the fp32 normaliser l kept for the backward pass), with a fake implementation and an
autograd formula whose backward is ``torch.ops.llama3.softplus_attention_backward``: torch.compile
traces the model without a graph break, and FSDP2 hands it plain tensors. Behind the op, chosen
by :func:`use_kernels` (the one place that decides):

* CUDA: the Triton kernels of :mod:`llama3.ops.softplus_triton`;
* CPU, when the process starts with ``TRITON_INTERPRET=1`` (or inside :func:`cpu_kernels`): the
  same kernels, run by Triton's interpreter, fp32 and fp16 only (it cannot compute in bf16);
* anything else: the dense formulas of :mod:`llama3.ops.reference`, which materialise the S×T
  matrix.

While a model is exported (``torch.onnx.export``, ``torch.export``), the entry point calls the plain
reference instead, so the exported graph holds standard operators only.
"""

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from llama3.ops.reference import (
    SCALES,
    reference_backward,
    reference_forward,
    softplus_attention_reference,
)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, scale: str, kv_len: Tensor | None) -> None:
    """Raise ValueError naming the offending argument for anything the operator does not support.

    ``kv_len`` values must lie in [S, T]; they are not checked, since reading them would stall the
    GPU (and break CUDA-graph capture of a decoding step).
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"softplus_attention expects q (B, S, r), k and v (B, r, T); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, S, r = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != r:
        raise ValueError(
            f"k and v must both be (B={B}, r={r}, T); got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if r % 8 or r == 0:
        raise ValueError(f"core width r must be a positive multiple of 8, got r={r}")
    if k.shape[2] < S:
        raise ValueError(f"keys T={k.shape[2]} must be at least the queries S={S}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device; got {q.device}, {k.device}, {v.device}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if kv_len is not None:
        if kv_len.dim() != 1 or kv_len.shape[0] != B:
            raise ValueError(f"kv_len must have shape (B={B},), got {tuple(kv_len.shape)}")
        if kv_len.dtype.is_floating_point or kv_len.dtype.is_complex or kv_len.dtype == torch.bool:
            raise ValueError(f"kv_len must hold integers, got {kv_len.dtype}")
        if kv_len.device != q.device:
            raise ValueError(f"kv_len must be on q's device {q.device}, got {kv_len.device}")


def softplus_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: str = "length", kv_len: Tensor | None = None
) -> Tensor:
    """Causal softplus attention; see :mod:`llama3.ops.reference` for the definition and layouts.

    q (B, S, r); k, v (B, r, T) with T ≥ S; optional kv_len (B,) of valid keys per batch row,
    S ≤ kv_len[b] ≤ T. Any strides; fp32, fp16 or bf16. Returns (B, S, r) in q's dtype.
    """
    check_inputs(q, k, v, scale, kv_len)
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        return softplus_attention_reference(q, k, v, scale, kv_len)
    return _attention_op(q, k, v, scale, kv_len)[0]


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401 - imported only to learn whether it is installed
    except ImportError:
        return False
    return True


# Whether CPU inputs run the interpreted kernels: read once, at import, as Triton reads it.
_cpu_kernels = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def use_kernels(t: Tensor) -> bool:
    """Whether the Triton kernels run for inputs like ``t`` (see the module docstring)."""
    on_cpu = t.device.type == "cpu"
    if not (t.device.type == "cuda" or (on_cpu and _cpu_kernels)):
        return False
    if not _triton_installed():
        _warn_once(
            "Triton is not installed: softplus attention runs the dense PyTorch version, "
            "whose memory grows with S×T"
        )
        return False
    if t.dtype not in KERNEL_DTYPES or (on_cpu and t.dtype == torch.bfloat16):
        where = "Triton's CPU interpreter" if on_cpu else "the softplus attention kernels"
        _warn_once(
            f"{where} cannot compute in {t.dtype}: softplus attention runs the dense "
            "PyTorch version"
        )
        return False
    return True


@contextlib.contextmanager
def cpu_kernels(enabled: bool = True) -> Iterator[None]:
    """Run CPU inputs through the Triton kernels, in Triton's interpreter, inside the block (or
    the dense formulas, with ``enabled=False``): tests and the benchmarks' CPU rows compare both
    in one process.

    Triton fixes a kernel's mode when it is defined: on a machine without a GPU the kernel module
    defines them interpreted; with one, the process must start with TRITON_INTERPRET=1.
    """
    global _cpu_kernels
    if enabled:
        _interpreted_kernels()
    saved, _cpu_kernels = _cpu_kernels, enabled
    try:
        yield
    finally:
        _cpu_kernels = saved


def _interpreted_kernels():
    from llama3.ops import softplus_triton

    if not softplus_triton.INTERPRETED:
        raise RuntimeError(
            "the softplus kernels were compiled for the GPU in this process; start "
            "it with TRITON_INTERPRET=1 to run them on the CPU"
        )
    return softplus_triton


# ---------------------------------------------------------------------------------------------
# Custom operators
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("llama3::softplus_attention", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: str, kv_len: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """(o, l): the output (B, S, r) and l_i = Σ_j softplus(z_ij) (B, S) in fp32."""
    if use_kernels(q):
        from llama3.ops import softplus_triton

        return softplus_triton.forward(q, k, v, scale, kv_len)
    return reference_forward(q, k, v, scale, kv_len)


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: str, kv_len: Optional[Tensor]):
    B, S, r = q.shape
    return q.new_empty(B, S, r), q.new_empty(B, S, dtype=torch.float32)


@torch.library.custom_op("llama3::softplus_attention_backward", mutates_args=())
def _attention_backward_op(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    l: Tensor,
    scale: str,
    kv_len: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the layouts and dtypes of q, k, v."""
    if use_kernels(q):
        from llama3.ops import softplus_triton

        return softplus_triton.backward(do, q, k, v, o, l, scale, kv_len)
    return reference_backward(do, q, k, v, o, l, scale, kv_len)


@_attention_backward_op.register_fake
def _(do, q, k, v, o, l, scale, kv_len):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, kv_len = inputs
    o, l = output
    ctx.save_for_backward(q, k, v, o, l, kv_len)
    ctx.scale = scale
    ctx.mark_non_differentiable(l)


def _backward(ctx, do: Tensor, _dl: Tensor):
    q, k, v, o, l, kv_len = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(do, q, k, v, o, l, ctx.scale, kv_len)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
