"""Reduced-precision ONNX export (what strongly typed TensorRT builds need): the graph carries fp16
or bf16 while the softplus normaliser's sums stay fp32, and ONNX Runtime on the CPU reproduces
PyTorch fp32 — including a context long enough that fp16 sums would overflow."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llama3 import ModelArgs, Transformer
from llama3.deploy.onnx_export import OUTPUT_NAMES, cast_copy, export_onnx, graph_precision
from llama3.deploy.runners import OnnxRuntimeRunner, TorchRunner
from llama3.model.transformer import cache_shape

FP16_MAX = torch.finfo(torch.float16).max  # 65504
TINY = {
    "softmax": dict(
        attention="softmax",
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=61,
        multiple_of=16,
        max_seq_len=64,
    ),
    "softplus": dict(
        attention="softplus", dim=32, n_layers=2, core_dim=16, vocab_size=61, max_seq_len=64
    ),
}
ONNX_FLOAT = onnx.TensorProto.FLOAT


def tiny_model(attention: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer.build(ModelArgs(**TINY[attention])).eval()


@pytest.fixture(scope="module")
def softplus_fp16(tmp_path_factory):
    """(fp32 model, path of its fp16 export)."""
    model = tiny_model("softplus")
    path = export_onnx(
        model, tmp_path_factory.mktemp("fp16") / "model_fp16.onnx", dtype=torch.float16
    )
    return model, path


def input_types(path) -> dict[str, list[int]]:
    """Per operator type, the element types of its first inputs, after shape inference."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(graph.value_info) + list(graph.input) + list(graph.output)
    }
    types.update({i.name: i.data_type for i in graph.initializer})
    found: dict[str, list[int]] = {}
    for node in graph.node:
        found.setdefault(node.op_type, []).append(types.get(node.input[0]))
    return found


def test_cast_copy_keeps_rope_frequencies_fp32():
    model = tiny_model("softplus")
    copy = cast_copy(model, torch.float16)
    assert {p.dtype for p in copy.parameters()} == {torch.float16}
    assert copy.rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(copy.rope.inv_freq, model.rope.inv_freq, rtol=0, atol=0)


@pytest.mark.parametrize(
    "precision, dtype, elem_type",
    [
        ("fp16", torch.float16, onnx.TensorProto.FLOAT16),
        ("bf16", torch.bfloat16, onnx.TensorProto.BFLOAT16),
    ],
)
def test_reduced_export_carries_its_dtype_and_an_fp32_normaliser(
    precision, dtype, elem_type, softplus_fp16, tmp_path
):
    if precision == "fp16":
        path = softplus_fp16[1]
    else:
        path = export_onnx(tiny_model("softplus"), tmp_path / "model_bf16.onnx", dtype=dtype)
    assert graph_precision(path) == precision
    graph = onnx.load(str(path)).graph
    assert {i.type.tensor_type.elem_type for i in graph.input[1:]} == {elem_type}
    assert {o.type.tensor_type.elem_type for o in graph.output} == {elem_type}
    ops = input_types(path)
    # The score path of the softplus reference is fp32: softplus, the normaliser's ReduceSum and
    # the division by it; the projections around it are in the reduced dtype.
    assert ops["Softplus"] and set(ops["Softplus"]) == {ONNX_FLOAT}
    assert ops["ReduceSum"] and set(ops["ReduceSum"]) == {ONNX_FLOAT}
    assert elem_type in ops["MatMul"] and ONNX_FLOAT in ops["MatMul"]


@pytest.mark.parametrize("attention", ["softmax", "softplus"])
def test_fp16_export_matches_pytorch_in_onnxruntime(attention, softplus_fp16, tmp_path):
    if attention == "softplus":
        model, path = softplus_fp16
    else:
        model = tiny_model(attention)
        path = export_onnx(model, tmp_path / "model_fp16.onnx", dtype=torch.float16)
    runner = OnnxRuntimeRunner(path, model.args, torch.device("cpu"))
    assert (runner.cache_dtype, runner.precision) == (torch.float16, "fp16")
    reference = TorchRunner(model)
    g = torch.Generator().manual_seed(0)
    for batch, query, cached in [(3, 7, 0), (2, 1, 9)]:
        tokens = torch.randint(0, 61, (batch, query), generator=g)
        k, v = (
            torch.randn(cache_shape(model.args, batch, cached), generator=g).half()
            for _ in range(2)
        )
        expected = reference(tokens, k.float(), v.float())[0]
        got = runner(tokens, k, v)[0]
        assert got.dtype == torch.float16
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-2 * scale)


def test_fp16_long_context_normaliser_exceeds_fp16_range_and_stays_exact(softplus_fp16):
    """One decode step after 16384 cached keys of large norm: every normaliser sum is beyond
    65504, so a normaliser summed in fp16 would be inf; the export's fp32 sums keep the logits
    within fp16 rounding of PyTorch fp32."""
    model, path = softplus_fp16
    g = torch.Generator().manual_seed(1)
    shape = cache_shape(model.args, 1, 16384)
    k = (torch.randn(shape, generator=g) * 30).half()
    v = torch.randn(shape, generator=g).half()
    tokens = torch.randint(0, 61, (1, 1), generator=g)
    proto = onnx.load(str(path))
    sums = [n.output[0] for n in proto.graph.node if n.op_type == "ReduceSum"]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(s, ONNX_FLOAT, None) for s in sums)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(
        None, {"input": tokens.numpy(), "k_cache": k.numpy(), "v_cache": v.numpy()}
    )
    normalisers = outputs[len(OUTPUT_NAMES) :]
    assert len(normalisers) == model.args.n_layers
    for l in normalisers:
        assert l.dtype == np.float32 and np.isfinite(l).all() and l.min() > FP16_MAX
    expected = TorchRunner(model)(tokens, k.float(), v.float())[0]
    got = torch.from_numpy(outputs[0]).float()
    assert torch.isfinite(got).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * scale)
