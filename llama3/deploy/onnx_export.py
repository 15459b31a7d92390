"""ONNX export of the export call form ``model(input, k_cache, v_cache)``.

The graph has inputs ``input`` (B, S) int64, ``k_cache`` and ``v_cache`` (the model's cache layout
with C cached positions) and outputs ``output`` (B, S, vocab), ``updated_k_cache`` and
``updated_v_cache`` (C + S positions). Batch, query length and cache length are dynamic: one file
serves prefill (C = 0) and decoding (S = 1). Softplus attention exports through its plain reference
as standard ONNX operators (MatMul, Softplus, Range-built causal mask, ReduceSum, Div).

We use the dynamo exporter (``torch.export`` with ``dynamic_shapes``): it is the supported exporter
of current PyTorch, and it records the three dimensions as symbols instead of tracing one shape.

The file (and its external weights, ``NAME.data``, for models over 1 GiB) is written into a
temporary directory and moved into place once onnx.checker has passed it, so a failed export (a
full disk, an interruption) leaves the previous file as it was.

The graph carries the dtype the model is exported in. An fp32 file runs everywhere (ONNX Runtime,
TensorRT 10 with its FP16/BF16 builder flags). Strongly typed TensorRT builds (always on TensorRT
11) take their precision from the graph, so they need a file exported in fp16 or bf16
(``export_onnx(..., dtype=torch.float16)``). The model computes its numerically delicate parts in
fp32 whatever its dtype, and the export keeps them as Cast-to-fp32 subgraphs: RMSNorm statistics,
RoPE angles, and the whole softplus score path (scores, softplus, the normaliser's sums over up to
T keys, which would overflow fp16 beyond 65504), cast back only for the attention output.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from llama3.fileio import staged_file
from llama3.model.args import ModelArgs
from llama3.model.transformer import cache_shape, cache_time_axis

INPUT_NAMES = ("input", "k_cache", "v_cache")
OUTPUT_NAMES = ("output", "updated_k_cache", "updated_v_cache")
MIN_OPSET = 18
DEFAULT_OPSET = 18
# Protobuf files cannot exceed 2 GiB; larger weights go to a side file next to the graph.
EXTERNAL_DATA_BYTES = 1 << 30
# Example sizes: all ≥ 2 and distinct, so torch.export specialises none of the dynamic dimensions.
EXAMPLE_BATCH, EXAMPLE_QUERY, EXAMPLE_CACHE = 2, 5, 3


def example_inputs(
    args: ModelArgs, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs to trace with: tokens (2, 5) and caches of 3 positions."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (EXAMPLE_BATCH, EXAMPLE_QUERY), generator=generator)
    shape = cache_shape(args, EXAMPLE_BATCH, EXAMPLE_CACHE)
    k = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    return tokens.to(device), k.to(device), v.to(device)


def dynamic_shapes(args: ModelArgs) -> tuple[dict[int, object], ...]:
    """torch.export dimension specs for (input, k_cache, v_cache)."""
    from torch.export import Dim

    batch, query, cache = Dim("batch"), Dim("query"), Dim("cache")
    cache_axes = {1: batch, cache_time_axis(args): cache}
    return ({0: batch, 1: query}, cache_axes, dict(cache_axes))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and deprecation chatter; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cast_copy(
    model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> nn.Module:
    """A copy of a :class:`llama3.Transformer` with its weights in ``dtype`` on ``device``.

    Buffers keep their dtype: RoPE's fp32 frequencies rounded to fp16 would shift the angles of
    distant positions by a sizeable fraction of a radian.
    """
    copy = type(model).build(model.args, device=device, init=False)
    copy.load_state_dict(model.state_dict())
    for param in copy.parameters():
        param.data = param.data.to(dtype)
    return copy.eval()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: torch.dtype | None = None,
) -> Path:
    """Export ``model``'s export form to ``path`` and check the file; returns the path.

    The model is exported as it is (device and dtype), or as a CPU copy in ``dtype`` when given
    (see the module docstring for what stays fp32).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"--opset must be at least {MIN_OPSET}, got {opset}")
    if dtype is not None:
        model = cast_copy(model, dtype)
    path = Path(path)
    param = next(model.parameters())
    inputs = example_inputs(model.args, param.device, param.dtype)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model.eval(),
            inputs,
            None,
            dynamo=True,
            opset_version=opset,
            verbose=False,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes(model.args),
        )
        with staged_file(path, external_data_name(path), what="the ONNX file ") as staging:
            program.save(str(staging), external_data=parameter_bytes(model) > EXTERNAL_DATA_BYTES)
            check_onnx(staging)
    return path


def external_data_name(path: str | Path) -> str:
    """The file the exporter writes a large model's weights to, beside the graph."""
    return Path(path).name + ".data"


def check_onnx(path: str | Path) -> None:
    """onnx.checker on the file (by path, so external weights are found) and the I/O names."""
    import onnx

    path = Path(path)
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = tuple(i.name for i in graph.input)
    outputs = tuple(o.name for o in graph.output)
    if inputs != INPUT_NAMES or outputs != OUTPUT_NAMES:
        raise ValueError(
            f"{path}: expected inputs {INPUT_NAMES} and outputs {OUTPUT_NAMES}, "
            f"found {inputs} and {outputs}"
        )


_ONNX_PRECISIONS = {1: "fp32", 10: "fp16", 16: "bf16"}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


def graph_precision(path: str | Path) -> str:
    """fp32, fp16 or bf16: the dtype of the file's cache inputs, i.e. what it was exported in."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    cache = next(i for i in graph.input if i.name == INPUT_NAMES[1])
    elem_type = cache.type.tensor_type.elem_type
    return _ONNX_PRECISIONS.get(elem_type, f"ONNX type {elem_type}")
