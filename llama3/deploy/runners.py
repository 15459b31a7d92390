"""Runners for the export call form: PyTorch eager and ONNX Runtime (TensorRT: :mod:`.tensorrt`).

A runner is called as ``runner(input, k_cache, v_cache)`` with torch tensors on its device and
returns ``(output, updated_k_cache, updated_v_cache)`` as torch tensors on that device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from llama3.deploy.onnx_export import INPUT_NAMES, OUTPUT_NAMES
from llama3.model.args import ModelArgs
from llama3.model.transformer import cache_shape, cache_time_axis

Outputs = tuple[Tensor, Tensor, Tensor]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CUDA_PROVIDER = "CUDAExecutionProvider"
# onnxruntime-gpu wheels on PyPI: up to 1.26 built for CUDA 12, from 1.27 for CUDA 13.
ORT_CUDA_HINT = "onnxruntime-gpu>=1.27 for CUDA 13, onnxruntime-gpu<=1.26 for CUDA 12"


class Runner(Protocol):
    name: str
    precision: str  # fp32 | fp16 | bf16: how it computes
    device: torch.device
    cache_dtype: torch.dtype  # dtype of the caches it takes and returns

    def __call__(self, tokens: Tensor, k_cache: Tensor, v_cache: Tensor) -> Outputs: ...


def output_shapes(args: ModelArgs, batch: int, query: int, cached: int) -> list[tuple[int, ...]]:
    """Shapes of (output, updated_k_cache, updated_v_cache) for one call."""
    new_cache = cache_shape(args, batch, cached + query)
    return [(batch, query, args.vocab_size), new_cache, new_cache]


def cached_length(args: ModelArgs, k_cache: Tensor) -> int:
    return k_cache.shape[cache_time_axis(args)]


class TorchRunner:
    """The PyTorch model itself (eager), at the dtype it was given."""

    name = "pytorch"

    def __init__(self, model: nn.Module):
        param = next(model.parameters())
        self.model, self.device, self.cache_dtype = model.eval(), param.device, param.dtype
        self.precision = PRECISION_NAMES.get(param.dtype, str(param.dtype))

    @torch.no_grad()
    def __call__(self, tokens: Tensor, k_cache: Tensor, v_cache: Tensor) -> Outputs:
        return self.model(tokens, k_cache, v_cache)


def onnxruntime_providers(device: torch.device) -> list:
    """CUDA provider on a CUDA device when this onnxruntime build has it, else CPU."""
    import onnxruntime as ort

    if device.type == "cuda" and CUDA_PROVIDER in ort.get_available_providers():
        return [(CUDA_PROVIDER, {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


class OnnxRuntimeRunner:
    """An ONNX Runtime session over an exported file (fp32, or fp16 from a reduced export).

    On CUDA (onnxruntime-gpu) inputs and outputs are bound to torch tensors by address through
    IOBinding, so nothing goes through host memory; on CPU, tensors are shared with NumPy. When
    the CUDA provider was wanted but is not what the session runs on, :attr:`warning` says why.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, args: ModelArgs, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        providers = onnxruntime_providers(device)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.device = device if self.provider == CUDA_PROVIDER else torch.device("cpu")
        self.warning = provider_warning(self.provider, device)
        self.args = args
        types = {i.name: i.type for i in self.session.get_inputs() + self.session.get_outputs()}
        if types[INPUT_NAMES[1]] not in _ORT_TYPES or types[OUTPUT_NAMES[0]] not in _ORT_TYPES:
            raise ValueError(
                f"{path}: the ONNX Runtime runner takes fp32 or fp16 files, this one "
                f"has {types[INPUT_NAMES[1]]} caches"
            )
        self.cache_dtype = _ORT_TYPES[types[INPUT_NAMES[1]]]
        self.output_dtype = _ORT_TYPES[types[OUTPUT_NAMES[0]]]
        self.precision = PRECISION_NAMES[self.cache_dtype]

    def __call__(self, tokens: Tensor, k_cache: Tensor, v_cache: Tensor) -> Outputs:
        if self.device.type == "cuda":
            return self._run_bound(tokens, k_cache, v_cache)
        feeds = {
            name: t.detach().cpu().contiguous().numpy()
            for name, t in zip(INPUT_NAMES, (tokens, k_cache, v_cache))
        }
        outputs = self.session.run(list(OUTPUT_NAMES), feeds)
        return tuple(torch.from_numpy(o) for o in outputs)

    def _run_bound(self, tokens: Tensor, k_cache: Tensor, v_cache: Tensor) -> Outputs:
        binding = self.session.io_binding()
        index = self.device.index or 0
        inputs = [t.to(self.device).contiguous() for t in (tokens, k_cache, v_cache)]
        for name, t in zip(INPUT_NAMES, inputs):
            if t.numel() == 0:  # an empty cache: nothing to point at
                binding.bind_cpu_input(name, np.empty(tuple(t.shape), dtype=_numpy_dtype(t.dtype)))
            else:
                binding.bind_input(
                    name, "cuda", index, _numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr()
                )
        B, S = tokens.shape
        shapes = output_shapes(self.args, B, S, cached_length(self.args, k_cache))
        dtypes = (self.output_dtype, self.cache_dtype, self.cache_dtype)
        outputs = [torch.empty(s, dtype=d, device=self.device) for s, d in zip(shapes, dtypes)]
        for name, t in zip(OUTPUT_NAMES, outputs):
            binding.bind_output(
                name, "cuda", index, _numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr()
            )
        torch.cuda.current_stream(self.device).synchronize()  # inputs written on torch's stream
        self.session.run_with_iobinding(binding)
        return tuple(outputs)


def provider_warning(provider: str, wanted: torch.device) -> str | None:
    """One line saying why ONNX Runtime runs on ``provider`` instead of the CUDA device asked
    for, or None when nothing was lost."""
    if wanted.type != "cuda" or provider == CUDA_PROVIDER:
        return None
    import onnxruntime as ort

    if CUDA_PROVIDER in ort.get_available_providers():
        why = (
            "its CUDA provider is built in but did not load: the CUDA or cuDNN major version "
            f"it was built for is missing here ({ORT_CUDA_HINT})"
        )
    else:
        why = (
            f"this onnxruntime {ort.__version__} build has no CUDA provider "
            f"(install {ORT_CUDA_HINT})"
        )
    return f"ONNX Runtime: runs on {provider}, not {wanted}: {why}"


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {torch.int64: np.int64, torch.float32: np.float32, torch.float16: np.float16}[dtype]


def dense_attention_bytes(args: ModelArgs, batch: int, query: int, cached: int) -> int:
    """Bytes of one fp32 attention-score tensor of a call, for runtimes that materialise it
    (ONNX Runtime, and PyTorch on the CPU): (B, heads, S, C + S), one "head" for softplus."""
    heads = args.n_heads if args.attention == "softmax" else 1
    return 4 * batch * heads * query * (cached + query)


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def too_big_for_host(
    runner: Runner, args: ModelArgs, batch: int, query: int, cached: int
) -> str | None:
    """Why a CPU runner should not attempt this call (a few score-sized temporaries would exhaust
    host memory, and the kernel's out-of-memory killer cannot be caught), or None."""
    available = available_memory()
    if runner.device.type != "cpu" or available is None:
        return None
    need = 3 * dense_attention_bytes(args, batch, query, cached)
    if need <= available // 2:
        return None
    return (
        f"{batch}×{query} after {cached} on the CPU needs ~{need / 2**30:.0f} GiB of attention "
        f"scores, more than half of the {available / 2**30:.0f} GiB available"
    )


def empty_cache(runner: Runner, args: ModelArgs, batch: int) -> tuple[Tensor, Tensor]:
    """Zero-length caches for a first call, on the runner's device and in its cache dtype."""
    k = torch.zeros(cache_shape(args, batch, 0), device=runner.device, dtype=runner.cache_dtype)
    return k, torch.zeros_like(k)
