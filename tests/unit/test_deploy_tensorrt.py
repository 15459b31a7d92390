"""The TensorRT code path against stand-ins of TensorRT's two Python API generations, and the
runner's stream and alignment handling against a stand-in CUDA (neither exists on CPU machines).

Each stand-in models what NVIDIA's sources and documents say of its generation, not the code
under test; every test names the documented difference it stands for. Sources: NvInfer.h and
python/src/infer/pyCore.cpp of NVIDIA/TensorRT at v10.16 and v11.1, samples/common/sampleOptions.cpp
(trtexec) at both tags, and the "Migrating from TensorRT 10.x to 11.x" guide.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from llama3 import ModelArgs, Transformer
from llama3.deploy import command
from llama3.deploy.onnx_export import export_onnx, graph_precision
from llama3.deploy.tensorrt import (
    SUPPORTED_MAJORS,
    TENSOR_ALIGNMENT,
    TensorRTRunner,
    aligned,
    aligned_empty,
    build_engine,
    engine_typing,
    profile_shapes,
    trtexec_command,
)

TINY = dict(attention="softplus", dim=32, n_layers=2, core_dim=16, vocab_size=61, max_seq_len=64)
VERSIONS = {10: "10.16.1", 11: "11.4.0"}


class FakeTensorRT(types.ModuleType):
    """The part of ``tensorrt`` that engine building uses, as each generation documents it.

    Both: ``Logger``, ``Builder.create_network(flags)``, ``OnnxParser.parse_from_file``,
    ``BuilderFlag.TF32`` ("enabled by default"), ``MemoryPoolType.WORKSPACE``, optimisation
    profiles, ``build_serialized_network`` returning None on failure.

    TensorRT 10: ``BuilderFlag.FP16``/``BF16`` exist (deprecated in 10.12, "superseded by strong
    typing"); ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH = 0`` (ignored) and
    ``STRONGLY_TYPED = 1``. Without that flag a network is weakly typed: its tensors take the
    ONNX types and the precision flags let the builder choose reduced-precision kernels. A
    strongly typed network rejects the precision flags.

    TensorRT 11: ``BuilderFlag`` has no FP16/BF16 ("removed ... will cause runtime errors"), and
    ``NetworkDefinitionCreationFlag`` only a deprecated, ignored ``STRONGLY_TYPED = 0``: every
    network is strongly typed, computing in the types of its ONNX graph.

    The "engine" it serializes is JSON saying how it would compute, so tests can check the
    precision an engine really has, not the flags that were passed.
    """

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    float32, float16, bfloat16, int64 = "float32", "float16", "bfloat16", "int64"

    def __init__(self, major: int, parse_ok: bool = True):
        super().__init__("tensorrt")
        self.__version__ = VERSIONS.get(major, f"{major}.0.0")
        self.calls: dict[str, object] = {"profile": {}, "flags": [], "cleared": []}
        names = ("FP16", "BF16", "TF32") if major == 10 else ("TF32",)
        self.BuilderFlag = types.SimpleNamespace(**{n: n for n in names})
        creation = (
            {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else {"STRONGLY_TYPED": 0}
        )
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
        fake = self

        class Network:
            def __init__(self, flags: int):
                self.strongly_typed = major >= 11 or bool(flags & (1 << creation["STRONGLY_TYPED"]))
                self.graph = "fp32"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls["profile"][name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def __init__(self):
                self.flags = {"TF32"}

            def set_flag(self, flag):
                fake.calls["flags"].append(flag)
                self.flags.add(flag)

            def clear_flag(self, flag):
                fake.calls["cleared"].append(flag)
                self.flags.discard(flag)

            def set_memory_pool_limit(self, pool, size):
                fake.calls["workspace"] = size

            def add_optimization_profile(self, profile):
                fake.calls["profiles_added"] = fake.calls.get("profiles_added", 0) + 1

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["network_flags"] = flags
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                reduced = config.flags & {"FP16", "BF16"}
                if network.strongly_typed and reduced:
                    return None  # "not allowed if graph is strongly typed"
                if network.strongly_typed:
                    compute = network.graph
                else:  # weakly typed: the builder may pick kernels of the flagged precision
                    compute = {"FP16": "fp16", "BF16": "bf16"}.get(
                        min(reduced, default=""), network.graph
                    )
                tf32 = compute == "fp32" and "TF32" in config.flags
                return json.dumps({"compute": compute, "io": network.graph, "tf32": tf32}).encode()

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                fake.calls["parsed"] = path
                self.network.graph = graph_precision(path)
                return parse_ok

            def get_error(self, i):
                return "unsupported operator"

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """{"model": the tiny fp32 model, "fp32"/"fp16"/"bf16": paths of its exports}."""
    torch.manual_seed(0)
    model = Transformer.build(ModelArgs(**TINY)).eval()
    root = tmp_path_factory.mktemp("trt_onnx")
    files = {"model": model, "fp32": export_onnx(model, root / "model.onnx")}
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        files[precision] = export_onnx(model, root / f"model_{precision}.onnx", dtype=dtype)
    return files


def build(trt, onnx_path, tmp_path, precision, **kwargs) -> dict:
    shapes = profile_shapes(ModelArgs(**TINY), 4, 32, 32)
    engine = build_engine(
        trt, onnx_path, tmp_path / f"{precision}.engine", shapes, precision, **kwargs
    )
    return json.loads(engine.read_bytes())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt10_reduced_precision_through_builder_flags(precision, onnx_files, tmp_path):
    """TensorRT 10 (weakly typed by default): FP16/BF16 builder flags on the fp32 file."""
    trt = FakeTensorRT(10)
    engine = build(trt, onnx_files["fp32"], tmp_path, precision, workspace_gib=0.5)
    assert engine == {"compute": precision, "io": "fp32", "tf32": False}
    assert trt.calls["flags"] == [precision.upper()] and trt.calls["network_flags"] == 0
    assert trt.calls["workspace"] == 1 << 29 and trt.calls["profiles_added"] == 1
    assert trt.calls["profile"]["k_cache"] == ((2, 1, 16, 0), (2, 4, 16, 0), (2, 4, 16, 32))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt11_reduced_precision_comes_from_the_graph(precision, onnx_files, tmp_path):
    """TensorRT 11: no FP16/BF16 builder flags and every network strongly typed, so the engine
    computes in the dtype of the file it was given; STRONGLY_TYPED is deprecated and ignored, so
    no creation flag is passed."""
    trt = FakeTensorRT(11)
    engine = build(trt, onnx_files[precision], tmp_path, precision)
    assert engine == {"compute": precision, "io": precision, "tf32": False}
    assert trt.calls["flags"] == [] and trt.calls["network_flags"] == 0
    assert trt.calls["parsed"] == str(onnx_files[precision])


def test_tensorrt11_refuses_an_fp32_file_for_reduced_precision(onnx_files, tmp_path):
    """TensorRT 11 would build the fp32 file as an fp32 engine: refused, not built silently."""
    trt = FakeTensorRT(11)
    with pytest.raises(ValueError, match="needs a file exported in fp16"):
        build(trt, onnx_files["fp32"], tmp_path, "fp16")
    assert "parsed" not in trt.calls


def test_tensorrt10_strongly_typed_on_request(onnx_files, tmp_path):
    """TensorRT 10 with --strongly_typed: the STRONGLY_TYPED creation flag (value 1 there) and no
    precision flags, which a strongly typed network rejects."""
    trt = FakeTensorRT(10)
    engine = build(trt, onnx_files["fp16"], tmp_path, "fp16", strongly_typed=True)
    assert engine == {"compute": "fp16", "io": "fp16", "tf32": False}
    assert trt.calls["network_flags"] == 1 << 1 and trt.calls["flags"] == []


@pytest.mark.parametrize("major", SUPPORTED_MAJORS)
def test_fp32_clears_tf32_on_both_generations(major, onnx_files, tmp_path):
    """TF32 is on by default in both generations; --precision fp32 means no TF32."""
    trt = FakeTensorRT(major)
    engine = build(trt, onnx_files["fp32"], tmp_path, "fp32")
    assert engine == {"compute": "fp32", "io": "fp32", "tf32": False}
    assert trt.calls["cleared"] == ["TF32"] and trt.calls["flags"] == []


def test_parser_errors_and_unsupported_versions_are_one_message(onnx_files, tmp_path):
    with pytest.raises(RuntimeError, match="could not parse .*unsupported operator"):
        build(FakeTensorRT(10, parse_ok=False), onnx_files["fp32"], tmp_path, "fp32")
    for major in (9, 12):
        with pytest.raises(RuntimeError, match=r"not supported \(we support 10.x and 11.x\)"):
            engine_typing(FakeTensorRT(major), "fp16")


@pytest.mark.parametrize(
    "major, strongly_typed, precision, present, absent",
    [
        (10, False, "fp16", ["--fp16"], ["--stronglyTyped", "--noTF32"]),
        (10, False, "fp32", ["--noTF32"], ["--fp16", "--bf16", "--stronglyTyped"]),
        (10, True, "bf16", ["--stronglyTyped"], ["--bf16", "--noTF32"]),
        (11, False, "bf16", [], ["--bf16", "--stronglyTyped", "--noTF32"]),
        (11, False, "fp32", ["--noTF32"], ["--fp16", "--stronglyTyped"]),
    ],
)
def test_trtexec_flags_per_generation(major, strongly_typed, precision, present, absent):
    """trtexec 10 takes --fp16/--bf16 and --stronglyTyped; trtexec 11 rejects --fp16/--bf16
    ("Unknown option") and documents --stronglyTyped as a deprecated no-op; --noTF32 and
    --device exist in both."""
    mode = engine_typing(FakeTensorRT(major), precision, strongly_typed)
    shapes = profile_shapes(ModelArgs(**TINY), 4, 32, 32)
    line = trtexec_command("trtexec", "m.onnx", "m.engine", shapes, mode, device_index=3)
    assert "--device=3" in line and "--skipInference" in line
    assert all(flag in line for flag in present), line
    assert not any(flag in line for flag in absent), line


class FakeDevice:
    """Stand-in for ``torch.cuda.device``: records which device the work runs under."""

    log: list = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        FakeDevice.log.append(("enter", self.device))

    def __exit__(self, *exc):
        FakeDevice.log.append(("exit", self.device))


@pytest.mark.parametrize(
    "major, precision, onnx_used, typing",
    [
        (10, "fp16", "model.onnx", "weakly typed, builder flag FP16"),
        (11, "fp16", "model_fp16.onnx", "strongly typed, fp16 ONNX graph"),
    ],
)
def test_deploy_step_exports_what_each_generation_needs(
    major, precision, onnx_used, typing, onnx_files, tmp_path, monkeypatch, capsys
):
    """The deploy command builds TensorRT 10's fp16 from the fp32 file, and on TensorRT 11 first
    exports model_fp16.onnx; the build runs under the deployment device."""
    trt = FakeTensorRT(major)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(command, "TensorRTRunner", lambda *a: types.SimpleNamespace(args=a))
    FakeDevice.log = []
    fp32 = tmp_path / "model.onnx"
    fp32.write_bytes(Path(onnx_files["fp32"]).read_bytes())
    args = types.SimpleNamespace(
        no_tensorrt=False,
        trtexec=False,
        precision=precision,
        strongly_typed=False,
        opset=18,
        batch_size=2,
        workspace_gib=0.0,
    )
    device = torch.device("cuda", 1)
    plan = types.SimpleNamespace(
        device=device, export_dir=tmp_path, model_args=ModelArgs(**TINY), seq_len=16, max_cache=16
    )
    info, runner = command.tensorrt_step(args, plan, fp32, onnx_files["model"])
    assert "error" not in info, info
    assert info["typing"] == typing and info["version"] == VERSIONS[major]
    assert Path(info["onnx"]).name == onnx_used == Path(trt.calls["parsed"]).name
    assert graph_precision(info["onnx"]) == ("fp32" if major == 10 else precision)
    assert json.loads((tmp_path / f"model_{precision}.engine").read_bytes())["compute"] == precision
    assert FakeDevice.log == [("enter", device), ("exit", device)]
    assert runner.args[1:] == (tmp_path / f"model_{precision}.engine", device, precision)
    out = capsys.readouterr().out
    assert f"TensorRT {VERSIONS[major]}: building" in out and typing in out


class FakeStream:
    """Stand-in for ``torch.cuda.Stream``: a handle, and a shared log of stream orderings."""

    log: list = []
    handles = iter(range(0x1000, 0x2000, 0x10))

    def __init__(self, device=None, handle=None):
        self.device = device
        self.cuda_stream = next(FakeStream.handles) if handle is None else handle

    def wait_stream(self, other):
        FakeStream.log.append(("wait", self.cuda_stream, other.cuda_stream))


class FakeEngine:
    """A deserialized engine whose I/O types are those the fake builder wrote."""

    def __init__(self, blob: bytes):
        io = json.loads(blob)["io"]
        self.types = {"input": "int64", "k_cache": {"fp32": "float32", "fp16": "float16"}[io]}

    def get_tensor_dtype(self, name):
        return self.types.get(name, self.types["k_cache"])

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    """Records shapes and addresses, and at execution reads the bound inputs through their
    addresses (as TensorRT would), so tests see what the engine was given."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.seen = engine, {}, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        b, s = self.shapes["input"]
        layers, _, r, t = self.shapes["k_cache"]
        return (b, s, 61) if name == "output" else (layers, b, r, t + s)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle):
        FakeStream.log.append(("execute", stream_handle, FakeDevice.log[-1]))
        numel = int(np.prod(self.shapes["k_cache"]))
        assert self.engine.types["k_cache"] == "float32"
        raw = (ctypes.c_float * numel).from_address(self.addresses["k_cache"]) if numel else []
        self.seen["k_cache"] = np.array(raw)
        return True


def test_runner_uses_its_own_stream_and_aligned_addresses(monkeypatch, tmp_path):
    """execute_async_v3 gets a stream of the runner's own, not the caller's (TensorRT: "Using
    default stream may lead to performance issues due to additional cudaDeviceSynchronize()
    calls"), ordered after the caller's stream and before its next work, under the engine's
    device; every address is 256-byte aligned ("The pointer must have at least 256-byte
    alignment"), a misaligned input is copied, and an empty cache still gets an address."""
    caller = FakeStream(handle=0)  # the legacy default stream
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    trt = FakeTensorRT(11)
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=FakeEngine)
    engine_file = tmp_path / "m.engine"
    engine_file.write_bytes(json.dumps({"compute": "fp32", "io": "fp32"}).encode())
    device = torch.device("cpu")  # stands for cuda:N; tensors must be real here
    runner = TensorRTRunner(trt, engine_file, device)
    assert runner.cache_dtype == torch.float32 and runner.stream.cuda_stream != 0

    base = torch.arange(2 * 1 * 16 * 5 + 1, dtype=torch.float32)
    k = base[1:].view(2, 1, 16, 5)  # 4 bytes past an allocation: not 256-byte aligned
    assert k.data_ptr() % TENSOR_ALIGNMENT
    for tokens, k_cache in [
        (torch.tensor([[3, 4]]), k),
        (torch.tensor([[5]]), torch.zeros(2, 1, 16, 0)),
    ]:
        FakeStream.log, FakeDevice.log = [], []
        out = runner(tokens, k_cache, torch.zeros_like(k_cache))
        own = runner.stream.cuda_stream
        assert FakeStream.log == [
            ("wait", own, 0),
            ("execute", own, ("enter", device)),
            ("wait", 0, own),
        ]
        assert FakeDevice.log[-1] == ("exit", device)
        addresses = runner.context.addresses
        assert set(addresses) == {
            "input",
            "k_cache",
            "v_cache",
            "output",
            "updated_k_cache",
            "updated_v_cache",
        }
        assert all(a and a % TENSOR_ALIGNMENT == 0 for a in addresses.values())
        assert [tuple(o.shape) for o in out] == [
            (1, tokens.shape[1], 61),
            *[(2, 1, 16, k_cache.shape[3] + tokens.shape[1])] * 2,
        ]
        np.testing.assert_array_equal(runner.context.seen["k_cache"], k_cache.flatten().numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int64])
def test_aligned_tensors(dtype):
    t = aligned_empty((3, 5), dtype, torch.device("cpu"))
    assert t.shape == (3, 5) and t.is_contiguous() and t.data_ptr() % TENSOR_ALIGNMENT == 0
    assert aligned(t) is t
    view = torch.arange(40).to(dtype)[1:31].view(5, 6)
    copy = aligned(view)
    assert copy.data_ptr() % TENSOR_ALIGNMENT == 0 and torch.equal(copy, view)
    strided = torch.arange(36).to(dtype).view(6, 6).t()
    assert torch.equal(aligned(strided), strided) and aligned(strided).is_contiguous()
