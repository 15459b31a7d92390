"""TensorRT 10: engine build from the ONNX file (Python API or ``trtexec``), and a runner that binds
torch CUDA tensors by address.

The optimisation profile follows the export form: min = one token, batch 1, empty cache; opt = the
deployment batch × sequence length with an empty cache (a prefill); max = the same with a full
cache (``max_cache`` positions), which also covers decoding one token at a time.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from llama3.fileio import atomic_write_bytes
from llama3.deploy.onnx_export import INPUT_NAMES, OUTPUT_NAMES
from llama3.model.transformer import cache_shape
from llama3.deploy.runners import Outputs
from llama3.model.args import ModelArgs

PRECISIONS = ("fp32", "fp16", "bf16")
_BUILDER_FLAG = {"fp16": "FP16", "bf16": "BF16"}
_TRTEXEC_FLAG = {"fp32": "--noTF32", "fp16": "--fp16", "bf16": "--bf16"}


def import_tensorrt() -> tuple[ModuleType | None, str]:
    """The ``tensorrt`` module, or None and the reason it could not be imported."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:  # OSError: the module is there but its libraries are not
        return None, str(err)
    return tensorrt, ""


def missing_message(reason: str) -> str:
    """The one line printed when TensorRT is unavailable."""
    return (f"TensorRT: skipped (import tensorrt failed: {reason}); it ships with the NGC PyTorch "
            "container, or: pip install tensorrt")


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(args: ModelArgs, batch_size: int, seq_len: int,
                   max_cache: int) -> dict[str, ShapeRange]:
    """Optimisation profile per input name (see the module docstring)."""
    tokens = ShapeRange(min=(1, 1), opt=(batch_size, seq_len), max=(batch_size, seq_len))
    cache = ShapeRange(min=cache_shape(args, 1, 0), opt=cache_shape(args, batch_size, 0),
                       max=cache_shape(args, batch_size, max_cache))
    return {"input": tokens, "k_cache": cache, "v_cache": cache}


def build_engine(trt: ModuleType, onnx_path: str | Path, engine_path: str | Path,
                 shapes: dict[str, ShapeRange], precision: str = "fp32",
                 workspace_gib: float = 0.0) -> Path:
    """Parse the ONNX file, build a serialized engine with one profile, and write it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    _set_precision(trt, config, precision)
    if workspace_gib > 0:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, r in shapes.items():
        profile.set_shape(name, r.min, r.opt, r.max)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} "
                           "(its log above says why)")
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, bytes(serialized))
    return engine_path


def _set_precision(trt: ModuleType, config: object, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, as in PyTorch's default
        return
    flag = getattr(trt.BuilderFlag, _BUILDER_FLAG[precision], None)
    if flag is None:
        raise RuntimeError(f"this TensorRT ({trt.__version__}) has no BuilderFlag."
                           f"{_BUILDER_FLAG[precision]}: --precision {precision} needs TensorRT 10")
    config.set_flag(flag)


def trtexec_command(trtexec: str, onnx_path: str | Path, engine_path: str | Path,
                    shapes: dict[str, ShapeRange], precision: str = "fp32",
                    workspace_gib: float = 0.0) -> list[str]:
    """The ``trtexec`` command line equivalent to :func:`build_engine`."""

    def spec(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, getattr(r, which)))}" for name, r in shapes.items())

    command = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
               f"--minShapes={spec('min')}", f"--optShapes={spec('opt')}",
               f"--maxShapes={spec('max')}", _TRTEXEC_FLAG[precision], "--skipInference"]
    if workspace_gib > 0:
        command.append(f"--memPoolSize=workspace:{int(workspace_gib * 1024)}")
    return command


def build_engine_trtexec(onnx_path: str | Path, engine_path: str | Path,
                         shapes: dict[str, ShapeRange], precision: str = "fp32",
                         workspace_gib: float = 0.0) -> Path:
    """Build with the ``trtexec`` tool found on PATH."""
    trtexec = shutil.which("trtexec")
    if trtexec is None:
        raise RuntimeError("--trtexec: no trtexec on PATH (it is in the NGC containers under "
                           "/usr/src/tensorrt/bin)")
    command = trtexec_command(trtexec, onnx_path, engine_path, shapes, precision, workspace_gib)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-20:] + done.stderr.splitlines()[-20:])
        raise RuntimeError(f"trtexec failed ({done.returncode}):\n{tail}")
    return Path(engine_path)


def _torch_dtype(trt: ModuleType, dtype: object) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "int8": torch.int8}
    for name, torch_dtype in table.items():
        if getattr(trt, name, None) == dtype:
            return torch_dtype
    raise TypeError(f"TensorRT tensor type {dtype} has no torch equivalent here")


class TensorRTRunner:
    """Runs a serialized engine on torch's current CUDA stream with torch-owned buffers."""

    name = "tensorrt"
    cache_dtype = torch.float32  # the engine's I/O keeps the ONNX file's types

    def __init__(self, trt: ModuleType, engine_path: str | Path, device: torch.device,
                 precision: str = "fp32"):
        if device.type != "cuda":
            raise ValueError("TensorRT runs on CUDA devices only")
        self.device, self.precision = device, precision
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not load the engine {engine_path}")
            self.context = self.engine.create_execution_context()
        self.dtypes = {name: _torch_dtype(trt, self.engine.get_tensor_dtype(name))
                       for name in INPUT_NAMES + OUTPUT_NAMES}
        # A valid address for empty inputs (an empty cache), whatever TensorRT makes of null.
        self._placeholder = torch.zeros(64, device=device)

    def __call__(self, tokens: Tensor, k_cache: Tensor, v_cache: Tensor) -> Outputs:
        inputs = [t.to(self.device, self.dtypes[name]).contiguous()
                  for name, t in zip(INPUT_NAMES, (tokens, k_cache, v_cache))]
        for name, t in zip(INPUT_NAMES, inputs):
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{name} shape {tuple(t.shape)} is outside the engine's profile")
            address = t.data_ptr() if t.numel() else self._placeholder.data_ptr()
            self.context.set_tensor_address(name, address)
        outputs = []
        for name in OUTPUT_NAMES:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (shapes outside the engine's profile?)")
        return tuple(outputs)
