"""Softplus attention kernels against the reference: output and every gradient, on random inputs.

The Triton kernels run on the CPU through Triton's interpreter: the ``interpret`` fixture routes
CPU inputs through them for one test (``cpu_kernels``), so other tests keep the dense CPU path. The
interpreter computes in fp32 and fp16, not bf16. Inputs are random draws from fixed seeds: each
test runs once per seed of SEEDS (LLAMA3_TEST_SEEDS=0,1,2 widens the sweep); the seed is in every
failure message and in the test's id.
"""

import os

import pytest
import torch

from llama3 import ModelArgs, Transformer
from llama3.ops import softplus_attention, softplus_attention_reference
from llama3.ops.softplus_attention import cpu_kernels, use_kernels

# Relative error ‖actual − expected‖ / ‖expected‖ allowed per dtype. Measured on the CPU: about 3e-7
# (fp32), 4e-4 (fp16, interpreter) and 2e-3 (bf16, dense path; the GPU kernels also round weights
# to bf16). A 0.1% change of the scores exceeds the fp32 bound
# (test_tolerance_detects_a_small_error).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


SEEDS = [int(s) for s in os.environ.get("LLAMA3_TEST_SEEDS", "0").split(",")]


@pytest.fixture(params=SEEDS, ids=lambda s: f"seed{s}")
def seed(request) -> int:
    torch.manual_seed(request.param)
    return request.param


@pytest.fixture
def interpret():
    """Run the Triton kernels in Triton's CPU interpreter for this test only."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the compiled kernels (the GPU tests)")
    with cpu_kernels():
        yield


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-30)).item()


def random_inputs(B: int, S: int, r: int, T: int, dtype: torch.dtype):
    q = torch.randn(B, S, r, dtype=dtype)
    k = torch.randn(B, r, T, dtype=dtype)
    v = torch.randn(B, r, T, dtype=dtype)
    return q, k, v


def run(q, k, v, do, scale="length", kv_len=None):
    """Output and (dq, dk, dv) through the public operator."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = softplus_attention(q, k, v, scale=scale, kv_len=kv_len)
    o.backward(do)
    return o, (q.grad, k.grad, v.grad)


def reference(q, k, v, do, scale="length", kv_len=None):
    """The same through the reference in fp32 autograd (inputs upcast exactly)."""
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    o = softplus_attention_reference(q, k, v, scale, kv_len)
    o.backward(do.float())
    return o, (q.grad, k.grad, v.grad)


def assert_close(actual, expected, dtype, seed, what=""):
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert torch.isfinite(a).all(), f"{name}{what}: non-finite values (seed {seed})"
        error = relative_error(a, e)
        assert error < TOLERANCE[dtype], f"{name}{what}: relative error {error:.2e} (seed {seed})"


def flat(o, grads):
    return (o, *grads)


# (B, S, r, cached keys C = T − S, dtype, scale): together every r in {8, 24, 64, 128, 424, 512},
# S in {1, 17, 70, 128, 300}, C in {0, 5, 9, 129}, batch 1, 2 and 3, fp32 and fp16, both scales;
# the S = 1 cases take the split-K decoding path, r > 128 the chunked and r-sliced one (1000: near
# the widest). The gradients come from the fused backward (dq by atomic adds), the default.
CASES = [
    (1, 1, 8, 0, torch.float32, "length"),
    (3, 17, 64, 5, torch.float16, "length"),
    (1, 128, 128, 129, torch.float32, "constant"),
    (3, 1, 128, 129, torch.float16, "length"),
    (1, 17, 424, 129, torch.float32, "length"),
    (3, 1, 424, 5, torch.float32, "constant"),
    (1, 300, 64, 0, torch.float16, "length"),
    (1, 128, 512, 5, torch.float16, "constant"),
    (1, 300, 8, 129, torch.float32, "length"),
    (1, 17, 512, 0, torch.float32, "length"),
    (1, 17, 1000, 3, torch.float32, "length"),
    (2, 70, 24, 9, torch.float16, "length"),
]


@pytest.mark.parametrize("B, S, r, C, dtype, scale", CASES)
def test_kernels_match_reference(interpret, seed, B, S, r, C, dtype, scale):
    q, k, v = random_inputs(B, S, r, S + C, dtype)
    do = torch.randn(B, S, r, dtype=dtype)
    assert use_kernels(q)
    out = run(q, k, v, do, scale)
    assert out[0].dtype == dtype and all(g.dtype == dtype for g in out[1])
    assert_close(flat(*out), flat(*reference(q, k, v, do, scale)), dtype, seed)


@pytest.fixture
def deterministic(monkeypatch):
    """The deterministic backward (LLAMA3_KERNEL_DETERMINISTIC=1) for this test."""
    pytest.importorskip("triton")
    from llama3.ops import softplus_triton

    monkeypatch.setattr(softplus_triton, "DETERMINISTIC", True)


# the deterministic launches: dK/dV then dQ (r ≤ 128); dV, dK, then dQ, chunked, sliced
DETERMINISTIC_CASES = [
    (3, 17, 64, 5, torch.float16, "length"),
    (1, 128, 128, 129, torch.float32, "constant"),
    (1, 17, 424, 129, torch.float32, "length"),
    (1, 17, 1000, 3, torch.float32, "length"),
]


@pytest.mark.parametrize("B, S, r, C, dtype, scale", DETERMINISTIC_CASES)
def test_deterministic_backward_matches_reference(
    interpret, deterministic, seed, B, S, r, C, dtype, scale
):
    q, k, v = random_inputs(B, S, r, S + C, dtype)
    do = torch.randn(B, S, r, dtype=dtype)
    assert_close(flat(*run(q, k, v, do, scale)), flat(*reference(q, k, v, do, scale)), dtype, seed)


@pytest.mark.parametrize("r", [64, 424])
def test_backward_path_follows_the_determinism_switch(interpret, monkeypatch, r):
    """The fused launches by default; the deterministic ones under PyTorch's own switch or
    LLAMA3_KERNEL_DETERMINISTIC=1, with no dq launch in the fused path."""
    from llama3.ops import softplus_triton

    roles = []
    launch = softplus_triton._launch
    monkeypatch.setattr(
        softplus_triton,
        "_launch",
        lambda role, *a, **kw: roles.append(role) or launch(role, *a, **kw),
    )
    q, k, v = random_inputs(1, 20, r, 20, torch.float32)
    do = torch.randn(1, 20, r)
    wide = r > 128
    fused = run(q, k, v, do)[1]
    assert roles == (["fwd", "dv", "dkq"] if wide else ["fwd", "dkdvq"]), roles
    roles.clear()
    torch.use_deterministic_algorithms(True)
    try:
        assert softplus_triton.deterministic_backward()
        exact = run(q, k, v, do)[1]
    finally:
        torch.use_deterministic_algorithms(False)
    assert roles == (["fwd", "dv", "dk", "dq"] if wide else ["fwd", "dkdv", "dq"]), roles
    monkeypatch.setattr(softplus_triton, "DETERMINISTIC", True)
    assert softplus_triton.deterministic_backward()
    for a, e in zip(fused, exact):
        assert relative_error(a, e) < 1e-6


@pytest.mark.parametrize("block_dv", [128, 256, 512])
def test_fused_dq_in_parts(interpret, monkeypatch, seed, block_dv):
    """The fused dK/dQ launch of a wide core takes dq's product in one, two or four parts by its
    slice width (the compiled tables use 256 and 512 at r = 424): every way gives the reference's
    gradients, with per-row cache lengths."""
    from llama3.ops import softplus_triton

    block_m, block_n, _ = softplus_triton._INTERPRETER_SHAPES["dkq"]
    shapes = {**softplus_triton._INTERPRETER_SHAPES, "dkq": (block_m, block_n, block_dv)}
    monkeypatch.setattr(softplus_triton, "_INTERPRETER_SHAPES", shapes)
    B, S, T, r = 2, 20, 29, 424
    kv_len = torch.tensor([T, 24])
    q, k, v = random_inputs(B, S, r, T, torch.float32)
    do = torch.randn(B, S, r)
    out = flat(*run(q, k, v, do, kv_len=kv_len))
    assert_close(out, flat(*reference(q, k, v, do, kv_len=kv_len)), torch.float32, seed)


def test_tolerance_detects_a_small_error(interpret, seed):
    """Scores off by 0.1% fail the fp32 bound: the comparisons above can fail."""
    q, k, v = random_inputs(2, 40, 64, 45, torch.float32)
    do = torch.randn(2, 40, 64)
    expected = flat(*reference(q, k, v, do))
    perturbed = flat(*run(q * 1.001, k, v, do))
    errors = [relative_error(a, e) for a, e in zip(perturbed, expected)]
    assert min(errors) > TOLERANCE[torch.float32], (errors, seed)


@pytest.mark.parametrize("r", [64, 136])
def test_strided_inputs(interpret, seed, r):
    """The model's layouts (k, v as transposed (B, T, r)), a stepped slice, a transposed dO."""
    B, S, T = 2, 40, 49
    q = torch.randn(B, r, S).transpose(1, 2)  # (B, S, r), stride 1 along S
    k = torch.randn(B, T, r).transpose(1, 2)  # (B, r, T), stride 1 along r
    v = torch.randn(B, r, 2 * T)[:, :, ::2]  # every other key
    do = torch.randn(B, r, S).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    assert_close(flat(*run(q, k, v, do)), flat(*reference(q, k, v, do)), torch.float32, seed)


@pytest.mark.parametrize("keys_along", ["r", "T"])
def test_tensor_descriptor_path(interpret, seed, keys_along):
    """fp16 at r = 424 with 16-byte-aligned layouts: the forward's and backward's r-wide
    products (and their zero-filled tail chunk) come through TMA descriptors, in both
    orientations of k and v (the model's, unit stride along r; a cache's, along T), with cached
    keys and kv_len < T whose unwritten keys hold NaN."""
    from llama3.ops.softplus_triton import configs, unit_axis

    B, S, T, r = 2, 40, 56, 424
    kv_len = torch.tensor([T, 49])
    q = torch.randn(B, S, r, dtype=torch.float16)
    if keys_along == "r":
        k, v = (torch.randn(B, T, r, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(B, r, T, dtype=torch.float16) for _ in range(2))
    assert unit_axis(q) == 2 and unit_axis(k, v) == (1 if keys_along == "r" else 2)
    for role in ("fwd", "dv", "dk", "dq", "dkq"):  # chunks of 256: the tail one 168 columns
        first = configs(role, r, torch.float16, tma=True)[0].kwargs
        assert first["TMA"] and first["BLOCK_DK"] == 256, role
    do = torch.randn(B, S, r, dtype=torch.float16)
    tail = (torch.arange(T).view(1, 1, T) >= kv_len.view(B, 1, 1)).expand(B, r, T)
    expected = reference(q, k.masked_fill(tail, 0.0), v.masked_fill(tail, 0.0), do, kv_len=kv_len)
    o, (dq, dk, dv) = run(
        q, k.masked_fill(tail, float("nan")), v.masked_fill(tail, float("nan")), do, kv_len=kv_len
    )
    assert_close((o, dq, dk, dv), flat(*expected), torch.float16, seed)
    assert (dk[tail] == 0).all() and (dv[tail] == 0).all()


def test_shapes_read_from_text():
    """The benchmarks' --shapes spelling of a table entry."""
    pytest.importorskip("triton")
    from llama3.ops.softplus_triton import Shape

    assert Shape.parse("16,64,512,8,2,tma,dk128") == Shape(16, 64, 512, 8, 2, tma=True, chunk=128)
    assert Shape.parse("32, 64, 64, 4, 2, rolled") == Shape(32, 64, 64, 4, 2, rolled=True)
    for bad in ("16,64,512", "16,64,512,8,2,fast"):
        with pytest.raises(ValueError, match="not a shape"):
            Shape.parse(bad)


def test_tensor_descriptors_need_aligned_layouts_and_can_be_switched_off(monkeypatch):
    pytest.importorskip("triton")
    from llama3.ops import softplus_triton

    allowed = softplus_triton.descriptors_allowed
    assert allowed(2, 1) and allowed(2, 2) and not allowed(0, 1) and not allowed(2, 0)
    monkeypatch.setattr(softplus_triton, "TMA_ALLOWED", False)  # LLAMA3_KERNEL_TMA=0
    assert not allowed(2, 1)


def test_tensor_descriptor_shapes_replace_the_others():
    """Where a table has TMA shapes they are the only candidates when the layouts allow
    descriptors, and never otherwise; a TMA shape always loops over r."""
    pytest.importorskip("triton")
    from llama3.ops.softplus_triton import SHAPES, _configs

    for role, tables in SHAPES.items():
        for (kind, width), table in tables.items():
            dtype = torch.bfloat16 if kind == "16" else torch.float32
            r = width if width != 1024 else 1000
            with_tma = [c.kwargs["TMA"] for c in _configs(role, r, dtype, True)]
            without = [c.kwargs["TMA"] for c in _configs(role, r, dtype, False)]
            assert not any(without), (role, kind, width)
            assert all(with_tma) == any(shape.tma for shape in table), (role, kind, width)
            for c in _configs(role, r, dtype, True):
                assert not (c.kwargs["TMA"] and c.kwargs["UNROLL"]), (role, kind, width)


def test_descriptor_memory_allocator_is_per_thread_and_defers_to_the_programs_own():
    """Triton needs an allocator for descriptors built on the GPU; the launcher installs one in
    each thread that lacks one (autograd's backward has a thread of its own) and keeps a
    program's own."""
    pytest.importorskip("triton")
    import threading

    from triton.runtime import _allocation

    from llama3.ops.softplus_triton import _ensure_allocator, _scratch

    def own(size, alignment, stream):
        raise AssertionError("not called here")

    seen = {}

    def fresh():
        _ensure_allocator()
        seen["fresh"] = _allocation._allocator.get()

    def programs():
        import triton

        triton.set_allocator(own)
        _ensure_allocator()
        seen["programs"] = _allocation._allocator.get()

    for target in (fresh, programs):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen == {"fresh": _scratch, "programs": own}


@pytest.mark.parametrize("S, r", [(5, 64), (1, 64), (1, 136)])
def test_kv_len_ignores_the_unwritten_tail(interpret, seed, S, r):
    """A cache of capacity T holding kv_len[b] keys per row; NaN garbage past kv_len is never
    read."""
    B, T = 3, 40
    kv_len = torch.tensor([S, 23, T])
    q, k, v = random_inputs(B, S, r, T, torch.float32)
    do = torch.randn(B, S, r)
    tail = torch.arange(T).view(1, 1, T) >= kv_len.view(B, 1, 1)
    expected = reference(q, k.masked_fill(tail, 0.0), v.masked_fill(tail, 0.0), do, kv_len=kv_len)
    o, (dq, dk, dv) = run(
        q, k.masked_fill(tail, float("nan")), v.masked_fill(tail, float("nan")), do, kv_len=kv_len
    )
    assert_close((o, dq, dk, dv), flat(*expected), torch.float32, seed)
    assert (dk.masked_select(tail) == 0).all() and (dv.masked_select(tail) == 0).all()


def test_layout_detection():
    """The stride hints the kernels give the compiler: a unit-stride axis, the rest multiples of
    8."""
    pytest.importorskip("triton")
    from llama3.ops.softplus_triton import unit_axis

    x = torch.randn(2, 5, 424)
    assert unit_axis(x) == 2
    assert unit_axis(x.transpose(1, 2)) == 1
    assert unit_axis(x, x.transpose(1, 2)) == 0
    assert unit_axis(torch.randn(2, 5, 12)) == 0  # rows 12 apart: not 16-byte aligned
    assert unit_axis(torch.randn(2, 5, 424)[:, :, ::2]) == 0
    assert unit_axis(torch.randn(2 * 5 * 424 + 1)[1:].view(2, 5, 424)) == 0  # misaligned data
    assert unit_axis(torch.randn(1, 1, 24)[:, :, :8]) == 2  # size-1 axes are never stepped


def test_split_k_decoding_matches_one_pass(interpret, seed):
    from llama3.ops import softplus_triton

    q, k, v = random_inputs(2, 1, 64, 150, torch.float32)
    one, l_one = softplus_triton.forward(q, k, v, "length", num_splits=1)
    for splits in (2, 5):
        split, l_split = softplus_triton.forward(q, k, v, "length", num_splits=splits)
        assert relative_error(split, one) < 1e-6 and relative_error(l_split, l_one) < 1e-6, seed


def test_normaliser_matches_float64(interpret, seed):
    """l_i = Σ_j softplus(z_ij), kept for the backward pass, to fp32 accuracy where it is hardest:
    every score negative (z from −30 to −2), so l sums weights for which 1 + e^−|z| loses digits."""
    from llama3.ops import softplus_triton

    B, S, T, r = 2, 20, 50, 64
    u = torch.nn.functional.normalize(torch.randn(r), dim=0)
    q = 8.0 * u + 0.01 * torch.randn(B, S, r)  # z_ij ≈ s_j, uniform in [−30, −2]
    k = u.view(1, r, 1) * torch.empty(B, 1, T).uniform_(-30.0, -2.0)
    _, l = softplus_triton.forward(q, k, torch.randn(B, r, T), "constant")
    z = q.double() @ k.double() / r**0.5  # (B, S, T)
    assert -31 < z.min() and z.max() < -1.5, "scores not in the intended range"
    visible = torch.arange(T).view(1, T) <= torch.arange(S).view(S, 1) + (T - S)
    expected = torch.where(visible, torch.nn.functional.softplus(z), 0.0).sum(-1)
    assert relative_error(l, expected) < 3e-6, seed  # measured ~3e-7: fp32 scores of |z| ≤ 30


def large_score_inputs(r: int, n: int, dtype: torch.dtype):
    """q, k with scores z = ⟨q_i, k_j⟩/sqrt(r) in [−80, 80]; row 5's first six keys at exactly
    −80."""
    bound = (80 * r**0.5) ** 0.5
    q = torch.nn.functional.normalize(torch.randn(1, n, r), dim=-1) * bound
    k = torch.nn.functional.normalize(torch.randn(1, r, n), dim=1) * bound
    k[0, :, :4] = q[0, :4].T  # keys aligned with queries: z = +80
    k[0, :, 6:8] = -q[0, 7:9].T  # anti-aligned: z = −80
    k[0, :, :6] = -q[0, 5:6].T  # row 5 sees keys 0..5, all at z = −80
    v = torch.randn(1, r, n)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_large_scores_are_finite_and_accurate(interpret, seed):
    """|z| up to 80 in fp32: no inf or NaN, and the exact result even where every weight is
    ~e^-80."""
    q, k, v = large_score_inputs(64, 24, torch.float32)
    do = torch.randn(1, 24, 64)
    o, grads = run(q, k, v, do, scale="constant")
    expected = reference(q, k, v, do, scale="constant")
    assert_close(flat(o, grads), flat(*expected), torch.float32, seed)
    # row 5 weighs its six keys equally (softplus(−80) each): the mean of their values
    torch.testing.assert_close(o[0, 5], v[0, :, :6].mean(-1), rtol=1e-5, atol=1e-6)


def test_large_scores_fp16_stay_finite(interpret, seed):
    """fp16 casts the weights for the value product, so weights below ~6e-8 (z < −16.6) flush to
    zero; outputs and gradients must stay finite, and rows with a weight above that accurate."""
    q, k, v = large_score_inputs(64, 24, torch.float16)
    do = torch.randn(1, 24, 64, dtype=torch.float16)
    o, grads = run(q, k, v, do, scale="constant")
    assert all(torch.isfinite(t).all() for t in (o, *grads)), seed
    ref_o, _ = reference(q, k, v, do, scale="constant")
    z = q.float() @ k.float() / 8.0
    z = z.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), -float("inf"))
    ordinary = z.amax(-1)[0] > -10  # (24,)
    error = relative_error(o[0, ordinary], ref_o[0, ordinary])
    assert ordinary.sum() > 12 and error < TOLERANCE[torch.float16], (error, seed)


def test_dense_cpu_path_matches_reference(seed):
    """Without the interpreter, CPU inputs take the dense formulas; bf16 too (the interpreter
    cannot run bf16)."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = random_inputs(2, 33, 40, 50, dtype)
        do = torch.randn(2, 33, 40, dtype=dtype)
        assert not use_kernels(q)
        kv_len = torch.tensor([50, 41])
        out = flat(*run(q, k, v, do, kv_len=kv_len))
        assert_close(out, flat(*reference(q, k, v, do, kv_len=kv_len)), dtype, seed, f" {dtype}")


@pytest.mark.parametrize("kernels", [False, True], ids=["dense", "interpreted"])
def test_opcheck(seed, kernels):
    if kernels:
        pytest.importorskip("triton")
    q, k, v = random_inputs(2, 5, 16, 9, torch.float32)
    with cpu_kernels(kernels):
        for kv_len in (None, torch.tensor([9, 6])):
            args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), "length", kv_len)
            torch.library.opcheck(torch.ops.llama3.softplus_attention.default, args)


def test_compile_has_no_graph_break(seed):
    def f(q, k, v):
        return softplus_attention(q, k, v).square().sum()

    q, k, v = (x.requires_grad_() for x in random_inputs(2, 7, 16, 11, torch.float32))
    explanation = torch._dynamo.explain(f)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_export_decomposes_into_standard_ops(seed):
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return softplus_attention(q, k, v)

    inputs = random_inputs(1, 6, 16, 8, torch.float32)
    program = torch.export.export(Attend(), inputs)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("llama3" in t for t in targets), targets
    assert any("softplus" in t for t in targets)
    torch.testing.assert_close(program.module()(*inputs), softplus_attention_reference(*inputs))


def test_errors_name_the_problem():
    q, k, v = random_inputs(2, 4, 16, 6, torch.float32)
    with pytest.raises(ValueError, match="multiple of 8"):
        softplus_attention(q[..., :12], k[:, :12], v[:, :12])
    with pytest.raises(ValueError, match="integers"):
        softplus_attention(q, k, v, kv_len=torch.tensor([6.0, 5.0]))
    with pytest.raises(ValueError, match="device"):
        softplus_attention(q, k, v, kv_len=torch.tensor([6, 5], device="meta"))
    with pytest.raises(ValueError, match="at least the queries"):
        softplus_attention(q, k[..., :3], v[..., :3])


def test_kernel_width_limit(interpret):
    from llama3.ops.softplus_triton import MAX_R

    q, k, v = random_inputs(1, 2, MAX_R + 8, 2, torch.float32)
    with pytest.raises(ValueError, match="core widths"):
        softplus_attention(q, k, v)


def train_losses(steps: int = 3, seed: int = 0) -> list[float]:
    args = ModelArgs(
        attention="softplus", dim=32, n_layers=2, core_dim=136, vocab_size=61, max_seq_len=32
    )
    torch.manual_seed(seed)
    model = Transformer.build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 61, (2, 25), generator=torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_model_trains_the_same_through_the_kernels(seed):
    pytest.importorskip("triton")
    dense = train_losses(seed=seed)
    with cpu_kernels():
        kernels = train_losses(seed=seed)
    assert dense[-1] < dense[0]
    torch.testing.assert_close(kernels, dense, rtol=1e-5, atol=0, msg=f"seed {seed}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, S, r, C", [(2, 300, 424, 37), (64, 1, 128, 1000), (1, 1000, 128, 0)])
@pytest.mark.parametrize("path", ["fused", "deterministic"])
def test_cuda_kernels_match_reference(seed, monkeypatch, path, dtype, B, S, r, C):
    from llama3.ops import softplus_triton

    monkeypatch.setattr(softplus_triton, "DETERMINISTIC", path == "deterministic")
    q, k, v = (x.cuda() for x in random_inputs(B, S, r, S + C, dtype))
    do = torch.randn(B, S, r, dtype=dtype, device="cuda")
    assert use_kernels(q)
    assert_close(flat(*run(q, k, v, do)), flat(*reference(q, k, v, do)), dtype, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captures_a_decoding_step(seed):
    """kv_len is read on the device: one captured step serves every cache length."""
    B, r, T = 4, 128, 256
    q, k, v = (x.cuda() for x in random_inputs(B, 1, r, T, torch.bfloat16))
    kv_len = torch.tensor([10, 50, 100, 256], device="cuda")
    softplus_attention(q, k, v, kv_len=kv_len)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = softplus_attention(q, k, v, kv_len=kv_len)
    for lengths in ([1, 2, 3, 4], [200, 100, 50, 25]):
        kv_len.copy_(torch.tensor(lengths))
        graph.replay()
        expected = softplus_attention_reference(q, k, v, kv_len=kv_len)
        assert relative_error(out, expected) < TOLERANCE[torch.bfloat16], seed


def _elementwise_kernel(monkeypatch):
    """A Triton kernel, interpreted, applying the kernels' own building blocks elementwise."""
    import triton
    import triton.language as tl

    from llama3.ops import softplus_kernels as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton fixes the mode at definition
    # the interpreter resolves a kernel's names in its module's globals
    globals().update(
        _log2_1p=kernels._log2_1p, _softplus2=kernels._softplus2, _sigmoid2=kernels._sigmoid2
    )

    @triton.jit
    def apply(X, OUT, N, WHICH: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + i, mask=i < N)
        if WHICH == 0:
            y = _log2_1p(x)  # noqa: F821 - in globals(), put there above
        elif WHICH == 1:
            y = _softplus2(x)  # noqa: F821 - in globals(), put there above
        else:
            y = _sigmoid2(x, _softplus2(x))  # noqa: F821 - in globals(), put there above
        tl.store(OUT + i, y, mask=i < N)

    return apply


def test_log2_1p_polynomial_over_its_whole_domain(interpret, monkeypatch):
    """log2(1 + e) = e·P(e) on [0, 1] in fp32, against float64: relative error ≤ 1e-6 for every
    normal e, including e → 0, where 1 + e loses e's digits (the GPU flushes subnormals to 0)."""
    e = torch.cat([torch.linspace(0, 1, 200_001), torch.logspace(-37, 0, 2001)]).float()
    out = torch.empty_like(e)
    kernel = _elementwise_kernel(monkeypatch)
    kernel[(triton_cdiv(e.numel(), 4096),)](e, out, e.numel(), WHICH=0, BLOCK=4096)
    exact = torch.log1p(e.double()) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    nonzero = exact > 0
    relative = ((out.double() - exact).abs()[nonzero] / exact[nonzero]).max().item()
    assert relative <= 1e-6, relative
    assert out[e == 0].eq(0).all()


def test_softplus_and_sigmoid_from_one_exp2(interpret, monkeypatch):
    """w = softplus(z)/ln 2 and sigmoid(z) = 2^(y − w) over scores y = z log2(e) in [−120, 120]:
    finite, and accurate to fp32 against float64 (relative 2e-6 for w; absolute 1e-6 or
    relative 1e-5 for the sigmoid)."""
    y = torch.linspace(-120, 120, 400_001)
    w, sig = torch.empty_like(y), torch.empty_like(y)
    kernel = _elementwise_kernel(monkeypatch)
    grid = (triton_cdiv(y.numel(), 4096),)
    kernel[grid](y, w, y.numel(), WHICH=1, BLOCK=4096)
    kernel[grid](y, sig, y.numel(), WHICH=2, BLOCK=4096)
    z = y.double() / 1.4426950408889634
    exact_w = torch.nn.functional.softplus(z) / 0.6931471805599453
    exact_sig = torch.sigmoid(z)
    assert torch.isfinite(w).all() and torch.isfinite(sig).all()
    assert ((w.double() - exact_w).abs() / exact_w).max() <= 2e-6
    sig_error = (sig.double() - exact_sig).abs()
    assert (sig_error <= torch.maximum(torch.full_like(sig_error, 1e-6), 1e-5 * exact_sig)).all()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_decoding_splits_fill_whole_waves():
    """The split-K factor makes batch × splits programs (at most two waves) fill the GPU's last
    wave as closely as the keys allow (each split at least two key tiles), preferring fewer splits
    on a near tie."""
    pytest.importorskip("triton")
    from llama3.ops.softplus_triton import num_key_splits

    def fill(programs: int) -> float:
        return programs / (-(-programs // 132) * 132)

    assert num_key_splits(64, 4096, 32, 132) == 2  # 128 programs: 97% of one wave
    assert num_key_splits(132, 4096, 32, 132) == 1  # a full wave already
    assert num_key_splits(3, 4096, 32, 132) == 44  # exactly one wave
    assert num_key_splits(1, 4096, 32, 132) == 64  # as many as the keys allow
    assert num_key_splits(1, 100, 32, 132) == 1  # 4 tiles: two per split at least, no gain
    for batch in (5, 16, 50, 100, 200, 300):
        splits = num_key_splits(batch, 4096, 32, 132)
        assert batch * splits <= max(batch, 264)
        better = [
            s
            for s in range(1, 65)
            if batch * s <= 264 and fill(batch * s) > fill(batch * splits) + 0.02
        ]
        assert not better, (batch, splits, better)
