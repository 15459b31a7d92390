"""TensorRT 10 and 11: engine build from the ONNX file (Python API or ``trtexec``), and a runner
that binds torch CUDA tensors by address on a stream of its own.

The optimisation profile follows the export form: min = one token, batch 1, empty cache; opt = the
deployment batch × sequence length with an empty cache (a prefill); max = the same with a full
cache (``max_cache`` positions), which also covers decoding one token at a time.

Reduced precision differs between the two generations (:func:`engine_typing`):

* TensorRT 10, weakly typed (the default there): the network is built from the fp32 ONNX file and
  the ``FP16``/``BF16`` builder flag lets TensorRT pick reduced-precision kernels itself
  (``trtexec --fp16``/``--bf16``). These flags are deprecated since 10.12.
* Strongly typed (always on TensorRT 11, which removed those flags and rejects ``--fp16``; asked
  for on 10 with ``--strongly_typed``): every tensor keeps the type the graph gives it, so the
  engine is built from an ONNX file exported in fp16/bf16, whose fp32 islands (norm statistics,
  the softplus normaliser) stay fp32. TensorRT 10 needs the ``STRONGLY_TYPED`` network flag
  (``trtexec --stronglyTyped``); on 11 that flag is deprecated and ignored, so we do not pass it.

fp32 means fp32 in both: TF32 is cleared (``--noTF32``), as in PyTorch's default.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from llama3.deploy.onnx_export import INPUT_NAMES, OUTPUT_NAMES, graph_precision
from llama3.deploy.runners import DTYPES, Outputs
from llama3.fileio import atomic_write_bytes, staged_file
from llama3.model.args import ModelArgs
from llama3.model.transformer import cache_shape

PRECISIONS = tuple(DTYPES)
SUPPORTED_MAJORS = (10, 11)  # keep in step with the ``tensorrt`` extra in pyproject.toml
SUPPORTED = " and ".join(f"{major}.x" for major in SUPPORTED_MAJORS)
# set_tensor_address requires device pointers aligned to 256 bytes (NvInferRuntime.h, 10 and 11).
TENSOR_ALIGNMENT = 256
_BUILDER_FLAG = {"fp16": "FP16", "bf16": "BF16"}
_TRTEXEC_FLAG = {"fp16": "--fp16", "bf16": "--bf16"}


def import_tensorrt() -> tuple[ModuleType | None, str]:
    """The ``tensorrt`` module, or None and the reason it could not be imported."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:  # OSError: the module is there but its libraries are not
        return None, str(err)
    return tensorrt, ""


def missing_message(reason: str) -> str:
    """The one line printed when TensorRT is unavailable."""
    return (
        f"TensorRT: skipped (import tensorrt failed: {reason}); TensorRT {SUPPORTED} ship with "
        "the NGC PyTorch containers, or: pip install 'llama3-softplus[tensorrt]'"
    )


def major_version(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


@dataclass(frozen=True)
class EngineTyping:
    """How one TensorRT generation builds one precision (see the module docstring)."""

    version: str
    precision: str
    strongly_typed: bool  # tensor types come from the ONNX graph
    network_flag: bool  # ask for strong typing at network creation (TensorRT 10 only)
    builder_flag: str | None  # FP16 / BF16: weakly typed reduced precision (TensorRT 10 only)

    @property
    def graph_precision(self) -> str:
        """The dtype the ONNX file must be exported in for this build."""
        return self.precision if self.strongly_typed else "fp32"

    def describe(self) -> str:
        if not self.strongly_typed:
            how = f"builder flag {self.builder_flag}" if self.builder_flag else "fp32, no TF32"
            return f"weakly typed, {how}"
        return f"strongly typed, {self.graph_precision} ONNX graph"


def engine_typing(trt: ModuleType, precision: str, strongly_typed: bool = False) -> EngineTyping:
    """How this TensorRT builds an engine of ``precision``; ``strongly_typed`` asks for
    strong typing on TensorRT 10 (11 is always strongly typed). Raises RuntimeError for a TensorRT
    outside the supported versions."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    major = major_version(trt)
    if major not in SUPPORTED_MAJORS:
        raise RuntimeError(
            f"TensorRT {trt.__version__} is not supported (we support {SUPPORTED}); "
            "pip install 'llama3-softplus[tensorrt]' installs a supported one"
        )
    strong = strongly_typed or major >= 11
    flag = None if strong or precision == "fp32" else _BUILDER_FLAG[precision]
    return EngineTyping(
        version=str(trt.__version__),
        precision=precision,
        strongly_typed=strong,
        network_flag=strong and major == 10,
        builder_flag=flag,
    )


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(
    args: ModelArgs, batch_size: int, seq_len: int, max_cache: int
) -> dict[str, ShapeRange]:
    """Optimisation profile per input name (see the module docstring)."""
    tokens = ShapeRange(min=(1, 1), opt=(batch_size, seq_len), max=(batch_size, seq_len))
    cache = ShapeRange(
        min=cache_shape(args, 1, 0),
        opt=cache_shape(args, batch_size, 0),
        max=cache_shape(args, batch_size, max_cache),
    )
    return {"input": tokens, "k_cache": cache, "v_cache": cache}


def check_graph_precision(onnx_path: str | Path, mode: EngineTyping) -> None:
    """A strongly typed build computes in the file's dtype: refuse a file of another precision
    rather than build an engine that silently is not what --precision asked for."""
    found = graph_precision(onnx_path)
    if found != mode.graph_precision:
        raise ValueError(
            f"{onnx_path} was exported in {found}, but the {mode.describe()} build of "
            f"--precision {mode.precision} with TensorRT {mode.version} needs a file exported in "
            f"{mode.graph_precision} (llama3.deploy.onnx_export.export_onnx(..., dtype=...))"
        )


def build_engine(
    trt: ModuleType,
    onnx_path: str | Path,
    engine_path: str | Path,
    shapes: dict[str, ShapeRange],
    precision: str = "fp32",
    workspace_gib: float = 0.0,
    *,
    strongly_typed: bool = False,
) -> Path:
    """Parse the ONNX file, build a serialized engine with one profile, and write it."""
    mode = engine_typing(trt, precision, strongly_typed)
    check_graph_precision(onnx_path, mode)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, mode))  # always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    _set_precision(trt, config, mode)
    if workspace_gib > 0:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, r in shapes.items():
        profile.set_shape(name, r.min, r.opt, r.max)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT could not build an engine from {onnx_path} (its log above says why)"
        )
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, bytes(serialized))
    return engine_path


def _network_flags(trt: ModuleType, mode: EngineTyping) -> int:
    if not mode.network_flag:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _set_precision(trt: ModuleType, config: object, mode: EngineTyping) -> None:
    if mode.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, as in PyTorch's default
    elif mode.builder_flag:
        config.set_flag(getattr(trt.BuilderFlag, mode.builder_flag))


def trtexec_command(
    trtexec: str,
    onnx_path: str | Path,
    engine_path: str | Path,
    shapes: dict[str, ShapeRange],
    mode: EngineTyping,
    workspace_gib: float = 0.0,
    device_index: int = 0,
) -> list[str]:
    """The ``trtexec`` command line equivalent to :func:`build_engine`."""

    def spec(which: str) -> str:
        return ",".join(
            f"{name}:{'x'.join(map(str, getattr(r, which)))}" for name, r in shapes.items()
        )

    command = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={spec('min')}",
        f"--optShapes={spec('opt')}",
        f"--maxShapes={spec('max')}",
        f"--device={device_index}",
        "--skipInference",
    ]
    if mode.precision == "fp32":
        command.append("--noTF32")
    if mode.builder_flag:
        command.append(_TRTEXEC_FLAG[mode.precision])
    if mode.network_flag:
        command.append("--stronglyTyped")
    if workspace_gib > 0:
        command.append(f"--memPoolSize=workspace:{int(workspace_gib * 1024)}")
    return command


def build_engine_trtexec(
    trt: ModuleType,
    onnx_path: str | Path,
    engine_path: str | Path,
    shapes: dict[str, ShapeRange],
    precision: str = "fp32",
    workspace_gib: float = 0.0,
    *,
    strongly_typed: bool = False,
    device_index: int = 0,
) -> Path:
    """Build with the ``trtexec`` tool found on PATH (of the same TensorRT as ``trt``, as in the
    NGC containers)."""
    mode = engine_typing(trt, precision, strongly_typed)
    check_graph_precision(onnx_path, mode)
    trtexec = shutil.which("trtexec")
    if trtexec is None:
        raise RuntimeError(
            "--trtexec: no trtexec on PATH (it is in the NGC containers under "
            "/usr/src/tensorrt/bin)"
        )
    with staged_file(engine_path, what="the engine ") as staging:
        command = trtexec_command(
            trtexec, onnx_path, staging, shapes, mode, workspace_gib, device_index
        )
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stdout.splitlines()[-20:] + done.stderr.splitlines()[-20:])
            raise RuntimeError(f"trtexec failed ({done.returncode}):\n{tail}")
    return Path(engine_path)


def _torch_dtype(trt: ModuleType, dtype: object) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int32": torch.int32,
        "int64": torch.int64,
        "bool": torch.bool,
        "int8": torch.int8,
    }
    for name, torch_dtype in table.items():
        if getattr(trt, name, None) == dtype:
            return torch_dtype
    raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent here")


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor whose address is a multiple of TENSOR_ALIGNMENT."""
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = torch.empty(numel + TENSOR_ALIGNMENT // itemsize, dtype=dtype, device=device)
    skip = (-buffer.data_ptr() % TENSOR_ALIGNMENT) // itemsize
    return buffer[skip : skip + numel].view(shape)


def aligned(t: Tensor) -> Tensor:
    """``t`` when it is contiguous at an aligned address, else an aligned contiguous copy."""
    if t.is_contiguous() and t.data_ptr() % TENSOR_ALIGNMENT == 0:
        return t
    return aligned_empty(tuple(t.shape), t.dtype, t.device).copy_(t)


class TensorRTRunner:
    """Runs a serialized engine with torch-owned buffers, on a CUDA stream of its own.

    TensorRT documents extra device synchronisation when ``execute_async_v3`` is given the legacy
    default stream, so every call is queued on ``self.stream`` (created on the engine's device),
    ordered after the caller's current stream and before whatever the caller queues next.
    """

    name = "tensorrt"

    def __init__(
        self,
        trt: ModuleType,
        engine_path: str | Path,
        device: torch.device,
        precision: str = "fp32",
    ):
        self.device, self.precision = device, precision
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not load the engine {engine_path}")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=device)
        self.dtypes = {
            name: _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            for name in INPUT_NAMES + OUTPUT_NAMES
        }
        self.cache_dtype = self.dtypes[INPUT_NAMES[1]]  # the engine's I/O keeps the ONNX types
        # A valid address for empty inputs (an empty cache), whatever TensorRT makes of null.
        self._placeholder = aligned_empty((64,), torch.float32, device)

    def __call__(self, tokens: Tensor, k_cache: Tensor, v_cache: Tensor) -> Outputs:
        with torch.cuda.device(self.device):
            inputs = [
                aligned(t.to(self.device, self.dtypes[name]))
                for name, t in zip(INPUT_NAMES, (tokens, k_cache, v_cache))
            ]
            for name, t in zip(INPUT_NAMES, inputs):
                if not self.context.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(
                        f"{name} shape {tuple(t.shape)} is outside the engine's profile"
                    )
                self._bind(name, t if t.numel() else self._placeholder)
            outputs = []
            for name in OUTPUT_NAMES:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs.append(aligned_empty(shape, self.dtypes[name], self.device))
                self._bind(name, outputs[-1])
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # the inputs were written on the caller's stream
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(
                    "TensorRT execution failed (shapes outside the engine's profile?)"
                )
            caller.wait_stream(self.stream)  # the caller's next work sees the outputs
        return tuple(outputs)

    def _bind(self, name: str, t: Tensor) -> None:
        address = t.data_ptr()
        if address % TENSOR_ALIGNMENT:
            raise RuntimeError(
                f"{name}: address {address:#x} is not {TENSOR_ALIGNMENT}-byte "
                "aligned, as TensorRT requires"
            )
        if not self.context.set_tensor_address(name, address):
            raise RuntimeError(f"TensorRT has no I/O tensor named {name!r} in this engine")
