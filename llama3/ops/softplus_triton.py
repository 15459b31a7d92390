"""Softplus attention in Triton: a one-pass forward and a FlashAttention-2 style backward.

Layouts (see :mod:`llama3.ops.reference` for the definition): q (B, S, r); k, v (B, r, T). Batch row
b holds kv_len[b] valid keys (T without a ``kv_len``); its first C_b = kv_len[b] − S are cached
context, so query row i sits at absolute position C_b + i and sees keys j ≤ C_b + i.

Forward. A program owns BLOCK_M query rows and makes one pass over key tiles of BLOCK_N::

    y_ij  = λ_i log2(e) ⟨q_i, k_j⟩               scores in base 2 (λ_i log2(e): once per row)
    e_ij  = 2^−|y_ij|                             the one special-function op of the pair
    w_ij  = max(y_ij, 0) + e_ij P(e_ij)           = softplus(z_ij) / ln 2, finite for any score
    acc_i += Σ_j w_ij v_j ,   l_i += Σ_j w_ij       fp32; no running maximum, nothing to rescale
    o_i   = acc_i / l_i                           the common 1/ln 2 cancels

where e P(e) is a degree-7 polynomial for log2(1 + e) on [0, 1] (eight FMAs; relative error below
4e-7 in fp32), in place of a software log2 of about 25 instructions. l_i ln 2 = Σ_j softplus(z_ij)
is kept per row for the backward pass. Tiles left of the diagonal skip the causal mask; tiles
right of it are never visited. The S×T matrix is never stored.

Width r. Tensor-core dots need power-of-two tiles, so the score product runs over r in chunks of
BLOCK_DK with the tail masked (r = 424: 7 chunks of 64, not 512; unrolled up to r = 512, a loop
beyond), and the output may be split into slices of BLOCK_DV columns, one slice per program, to
keep the fp32 accumulator in registers when r is wide; each slice recomputes the scores. When one
chunk covers r, the operand that stays put (q in the forward) is loaded once. Where the shape
tables say so (the backward for r > 256, the forward past 512) and the layouts allow, the chunks
are copied by Hopper's TMA unit through tensor descriptors: a rolled loop with neither addresses
nor masks per thread.

Decoding (S ≤ 16) has one row block per batch row, too few programs to fill the GPU: the key axis
is split across programs (split-K, as many splits as fill whole waves of the GPU), each writes its
unnormalised (acc, l), and a small kernel sums them. Plain sums suffice: there is no running
maximum to reconcile.

Backward. A pre-pass computes, once per query row, D_i = ⟨dO_i, o_i⟩, y_i = λ_i log2(e) and
c_i = ln 2 / l_i, and (except in fp16) dO_i scaled by c_i; with p_ij = c_i w_ij and
σ_ij = sigmoid(z_ij) = 2^(y_ij − w_ij) (from the weight already computed: no division)::

    dv_j = Σ_i p_ij dO_i                                  a program per key tile (and r slice),
    dk_j = Σ_i λ_i c_i (⟨dO_i, v_j⟩ − D_i) σ_ij q_i / ln 2 over the query tiles that see it
    dq_i = λ_i c_i Σ_j (⟨dO_i, v_j⟩ − D_i) σ_ij k_j / ln 2 a program per query tile (and r slice)

Up to r = 128 one program computes dk and dv; wider cores take a launch for each (two fp32
accumulators of r columns do not fit in registers), and the dk and dq launches compute the sigmoid
as 1 / (1 + 2^−y) with the hardware's approximate reciprocal. Every gradient element is written
by exactly one program: deterministic, no atomics.

Numerics. All arithmetic is fp32; only the weights w (forward) and the score gradients (backward)
are rounded to the input dtype to feed the tensor cores, as FlashAttention rounds its
probabilities. In fp16 a weight below 6e-8 (z < −16.6) becomes 0 there: a row whose every score is
that low comes out 0 instead of the mean of its values. bf16 and fp32 keep fp32's range. fp32
inputs follow PyTorch's matmul precision (see _dot_precision).

Strides are arbitrary. When every tensor has a unit-stride axis and its other strides are multiples
of 8, the launcher says so (Q_LAYOUT, KV_LAYOUT) and the kernels pass it on to the compiler, which
can then vectorise loads even when r is not a multiple of 16 (r = 424).

benchmarks/kernel_static.py reads this module's compiled Hopper code (registers, spills, shared
memory, instructions per pair) on any machine; the shape tables below follow its report.
"""

import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


def _interpreted() -> bool:
    """Whether the kernels below run in Triton's CPU interpreter: asked for (TRITON_INTERPRET=1),
    or the only way they can run (no GPU driver, nor a stand-in one such as
    benchmarks/kernel_static.py installs to compile for the GPU on a CPU)."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"):
        return True
    from triton.runtime import driver

    try:
        driver.active  # noqa: B018 - raises without a GPU driver
    except RuntimeError:
        return True
    return False


# Decided once, when this module is imported (Triton fixes a kernel's mode when it is defined,
# from TRITON_INTERPRET, which is set while this module defines its kernels and restored at its
# end): interpreted or compiled for the GPU; LLAMA3_KERNEL_AUTOTUNE=0 skips autotuning (each
# kernel runs the first shape of its table, so a first call compiles one configuration);
# LLAMA3_KERNEL_FP32=ieee|tf32x3|tf32 fixes the precision of fp32 inputs' dots (see
# _dot_precision); LLAMA3_KERNEL_TMA=0 keeps every launch on pointer loads (no TMA descriptors);
# LLAMA3_KERNEL_DETERMINISTIC=1 runs the deterministic backward (see deterministic_backward).
INTERPRETED = _interpreted()
_INTERPRET_SETTING = os.environ.get("TRITON_INTERPRET")
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"
AUTOTUNE = os.environ.get("LLAMA3_KERNEL_AUTOTUNE", "1") != "0"
TMA_ALLOWED = os.environ.get("LLAMA3_KERNEL_TMA", "1") != "0"
DETERMINISTIC = os.environ.get("LLAMA3_KERNEL_DETERMINISTIC", "0") not in ("0", "")
FP32_PRECISION = os.environ.get("LLAMA3_KERNEL_FP32") or None
if FP32_PRECISION not in (None, "ieee", "tf32x3", "tf32"):
    raise ValueError(f"LLAMA3_KERNEL_FP32 must be ieee, tf32x3 or tf32, got {FP32_PRECISION!r}")

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# log2(1 + e) / e ≈ Σ_k P_k e^k on [0, 1] (minimax in relative error; see _log2_1p)
LOG2_1P_COEFFS = (
    1.4426947832107544,
    -0.7213100790977478,
    0.48006370663642883,
    -0.35339483618736267,
    0.2560097277164459,
    -0.15535187721252441,
    0.06360789388418198,
    -0.012319473549723625,
)
_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7 = (tl.constexpr(c) for c in LOG2_1P_COEFFS)

MAX_R = 4096  # widest core the kernels accept (each r slice recomputes the scores)
_DECODE_MAX_S = 16  # query rows up to which the split-K decoding path runs


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


@triton.jit
def _log2_1p(e):
    """log2(1 + e) for e in [0, 1] as e·P(e), P the degree-7 minimax fit of log2(1 + e)/e.

    Eight FMAs instead of a software log2 (about 25 instructions on sm_90); relative error at
    most 2e-7 from the fit, 4e-7 with fp32 rounding (tests/integration/test_softplus_kernel.py
    checks it against float64 over the whole interval).
    """
    p = e * _P7 + _P6
    p = p * e + _P5
    p = p * e + _P4
    p = p * e + _P3
    p = p * e + _P2
    p = p * e + _P1
    p = p * e + _P0
    return e * p


@triton.jit
def _softplus2(y):
    """w = softplus(z) / ln 2 for y = z log2(e): max(y, 0) + log2(1 + 2^−|y|), finite for any y.

    One special-function op (the exp2); the rest runs on the FMA units.
    """
    e = tl.exp2(-tl.abs(y))
    return tl.maximum(y, 0.0) + _log2_1p(e)


@triton.jit
def _sigmoid2(y, w):
    """sigmoid(z) = e^z / (1 + e^z) = 2^(y − w), from the weight w already computed: no division."""
    return tl.exp2(y - w)


@triton.jit
def _sigmoid_from_neg(t, FAST: tl.constexpr):
    """sigmoid(z) for t = −z log2(e), where the weight is not needed: 1 / (1 + 2^t); 2^t = inf
    gives 0."""
    return _reciprocal(1.0 + tl.exp2(t), FAST)


@triton.jit
def _reciprocal(x, FAST: tl.constexpr):
    """1 / x: the hardware's approximate reciprocal (one op, ~1 ulp) when compiled, else exact."""
    if FAST:
        r = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        r = 1.0 / x
    return r


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_sum(x):
    """Σ over axis 1 in fp32. (tl.sum would do, but it is a @triton.jit function of Triton's own,
    defined in whichever mode Triton was first imported in; this one follows the kernels' mode.)"""
    return tl.reduce(x, 1, _add)


@triton.jit
def _row_scale(pos, inv_sqrt_r, LENGTH_SCALE: tl.constexpr):
    """λ (fp32) of query rows at absolute positions ``pos``: log(pos + 1)/sqrt(r) or 1/sqrt(r)."""
    if LENGTH_SCALE:
        lam = tl.log((pos + 1).to(tl.float32)) * inv_sqrt_r
    else:
        lam = tl.full(pos.shape, 0.0, tl.float32) + inv_sqrt_r
    return lam


@triton.jit
def _valid_keys(KV_LEN, stride_kvl, b, T, HAS_KV_LEN: tl.constexpr):
    """Number of valid keys of batch row b: kv_len[b], read on the device and capped at T; or T."""
    if HAS_KV_LEN:
        n = tl.minimum(tl.load(KV_LEN + b * stride_kvl).to(tl.int32), T)
    else:
        n = T
    return n


@triton.jit
def _hinted(stride_b, stride_1, stride_2, UNIT: tl.constexpr):
    """Strides of a 3-d tensor, told to the compiler.

    UNIT = 1 or 2: the launcher checked that this axis has stride 1 and the others are multiples
    of 8 (16-byte aligned rows), so loads can be vectorised; Triton itself only detects multiples
    of 16, which r = 424 is not. UNIT = 0: the strides as given.
    """
    one = tl.full([], 1, tl.int32)
    if UNIT == 1:
        stride_b, stride_1, stride_2 = stride_b // 8 * 8, one, stride_2 // 8 * 8
    elif UNIT == 2:
        stride_b, stride_1, stride_2 = stride_b // 8 * 8, stride_1 // 8 * 8, one
    return stride_b, stride_1, stride_2


@triton.jit
def _dot_over_r(
    a_ptrs,
    a_ok,
    stride_a_r,
    b_ptrs,
    b_ok,
    stride_b_r,
    R: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    PRECISION: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Σ_{d<R} a[·, d] b[d, ·] in fp32, r in chunks of BLOCK_DK.

    a_ptrs (M, BLOCK_DK) and b_ptrs (BLOCK_DK, N) address the first chunk; a_ok (M, 1) and
    b_ok (1, N) say which rows of a and columns of b exist.
    """
    acc = tl.full([a_ptrs.shape[0], b_ptrs.shape[1]], 0.0, tl.float32)
    if UNROLL:  # only the last chunk needs a mask
        for d0 in tl.static_range(0, R, BLOCK_DK):
            a_mask = a_ok
            b_mask = b_ok
            if d0 + BLOCK_DK > R:
                d_ok = d0 + tl.arange(0, BLOCK_DK) < R
                a_mask = a_ok & d_ok[None, :]
                b_mask = b_ok & d_ok[:, None]
            a = tl.load(a_ptrs + d0 * stride_a_r, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs + d0 * stride_b_r, mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:  # a loop: one set of shared-memory buffers, whatever r
        for d0 in range(0, R, BLOCK_DK):
            d_ok = d0 + tl.arange(0, BLOCK_DK) < R
            a = tl.load(a_ptrs + d0 * stride_a_r, mask=a_ok & d_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + d0 * stride_b_r, mask=b_ok & d_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _r_desc(
    base,
    stride_b,
    stride_rows,
    stride_r,
    n_b,
    n_rows,
    R: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    R_UNIT: tl.constexpr,
):
    """TMA descriptor for (ROWS, BLOCK_DK) tiles of a 3-d tensor (n_b, n_rows, R) given by its
    strides (the launcher checked them: one axis of stride 1, the others 16-byte multiples);
    R_UNIT: the r axis has stride 1, else the rows axis has. Rows past n_rows read as zeros."""
    stride_b = tl.maximum(stride_b, 8)  # a size-1 axis's stride may have been rounded to 0
    if R_UNIT:
        desc = tl.make_tensor_descriptor(
            base, [n_b, n_rows, R], [stride_b, tl.maximum(stride_rows, 8), 1], [1, ROWS, BLOCK_DK]
        )
    else:
        desc = tl.make_tensor_descriptor(
            base, [n_b, R, n_rows], [stride_b, tl.maximum(stride_r, 8), 1], [1, BLOCK_DK, ROWS]
        )
    return desc


@triton.jit
def _r_tile(desc, b, row0, d0, ROWS: tl.constexpr, BLOCK_DK: tl.constexpr, R_UNIT: tl.constexpr):
    """(ROWS, BLOCK_DK) tile at rows row0.., r columns d0.. (zeros outside the tensor)."""
    if R_UNIT:
        t = desc.load([b, row0, d0]).reshape(ROWS, BLOCK_DK)
    else:
        t = tl.trans(desc.load([b, d0, row0]).reshape(BLOCK_DK, ROWS))
    return t


@triton.jit
def _dot_over_r_tma(
    a_desc,
    a_row0,
    b_desc,
    b_row0,
    b,
    M: tl.constexpr,
    N: tl.constexpr,
    R: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    A_R_UNIT: tl.constexpr,
    B_R_UNIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Σ_{d<R} a[i, d] b[j, d] (M, N) in fp32, r in chunks of BLOCK_DK that the TMA unit copies
    (rows a_row0.. of batch row b from a_desc, rows b_row0.. from b_desc): no addresses, no
    masks (the tail chunk reads zeros past R), one set of buffers whatever r."""
    acc = tl.full([M, N], 0.0, tl.float32)
    for d0 in range(0, R, BLOCK_DK):
        a = _r_tile(a_desc, b, a_row0, d0, M, BLOCK_DK, A_R_UNIT)
        bt = _r_tile(b_desc, b, b_row0, d0, N, BLOCK_DK, B_R_UNIT)
        acc = tl.dot(a, tl.trans(bt), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _descriptors(
    Q,
    K,
    V,
    DO,
    stride_qb,
    stride_qs,
    stride_qr,
    stride_kb,
    stride_kr,
    stride_kt,
    stride_vb,
    stride_vr,
    stride_vt,
    stride_dob,
    stride_dos,
    stride_dor,
    S,
    kv_len,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    Q_LAYOUT: tl.constexpr,
    KV_LAYOUT: tl.constexpr,
    TMA: tl.constexpr,
    GRADIENTS: tl.constexpr,
):
    """TMA descriptors (k, v, q, dO) of the r-wide products' chunks: key tiles (keys past kv_len
    read as zeros) and query-row tiles; None where the launch takes r whole or has no TMA. Without
    GRADIENTS (the forward: V and DO not given) only k's and q's."""
    if TMA and BLOCK_DK < R:
        nb = tl.num_programs(1)
        k = _r_desc(
            K, stride_kb, stride_kt, stride_kr, nb, kv_len, R, BLOCK_N, BLOCK_DK, KV_LAYOUT == 1
        )
        q = _r_desc(Q, stride_qb, stride_qs, stride_qr, nb, S, R, BLOCK_M, BLOCK_DK, Q_LAYOUT == 2)
        if GRADIENTS:
            v = _r_desc(
                V, stride_vb, stride_vt, stride_vr, nb, kv_len, R, BLOCK_N, BLOCK_DK, KV_LAYOUT == 1
            )
            do = _r_desc(
                DO, stride_dob, stride_dos, stride_dor, nb, S, R, BLOCK_M, BLOCK_DK, Q_LAYOUT == 2
            )
            descs = (k, v, q, do)
        else:
            descs = (k, k, q, q)  # the forward reads only descs[0] and descs[2]
    else:
        descs = None
    return descs


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(
    acc,
    l,
    q,
    q_ptrs,
    row_ok,
    k_ptrs,
    vt_ptrs,
    keys,
    pos,
    lam2,
    d_ok,
    col_ok,
    kv_len,
    stride_qr,
    stride_kr,
    descs,
    b,
    m0,
    n0,
    R: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    UNROLL: tl.constexpr,
    TMA: tl.constexpr,
    Q_LAYOUT: tl.constexpr,
    KV_LAYOUT: tl.constexpr,
):
    """Add one key tile (k_ptrs (BLOCK_DK, BLOCK_N), vt_ptrs (BLOCK_N, BLOCK_DV)) to acc and l."""
    if MASKED:
        key_ok = keys < kv_len
    else:  # an all-true constant keeps the loads vectorised
        key_ok = tl.full(keys.shape, 1, tl.int1)
    if BLOCK_DK >= R:
        k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        z = tl.dot(q, k, input_precision=PRECISION)
    elif TMA:
        z = _dot_over_r_tma(
            descs[2],
            m0,
            descs[0],
            n0,
            b,
            pos.shape[0],
            keys.shape[0],
            R,
            BLOCK_DK,
            Q_LAYOUT == 2,
            KV_LAYOUT == 1,
            PRECISION,
        )
    else:
        z = _dot_over_r(
            q_ptrs,
            row_ok[:, None],
            stride_qr,
            k_ptrs,
            key_ok[None, :],
            stride_kr,
            R,
            BLOCK_DK,
            PRECISION,
            UNROLL,
        )
    w = _softplus2(z * lam2[:, None])  # (BLOCK_M, BLOCK_N)
    if MASKED:
        w = tl.where(keys[None, :] <= pos[:, None], w, 0.0)
    l += _row_sum(w)
    vt = tl.load(vt_ptrs, mask=key_ok[:, None] & col_ok[None, :], other=0.0)
    acc = tl.dot(w.to(vt.dtype), vt, acc, input_precision=PRECISION)
    return acc, l


@triton.jit(do_not_specialize=["S", "T"])
def _fwd_kernel(
    Q,
    K,
    V,
    KV_LEN,
    O,
    L,
    O_PART,
    L_PART,
    stride_qb,
    stride_qs,
    stride_qr,
    stride_kb,
    stride_kr,
    stride_kt,
    stride_vb,
    stride_vr,
    stride_vt,
    stride_ob,
    stride_os,
    stride_or,
    stride_kvl,
    S,
    T,
    num_splits,
    inv_sqrt_r,
    S_BUCKET,
    R: tl.constexpr,
    LENGTH_SCALE: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr,
    Q_LAYOUT: tl.constexpr,
    KV_LAYOUT: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Grid (row blocks × r slices, B, key splits). Writes o and l, or per-split partials."""
    stride_qb, stride_qs, stride_qr = _hinted(stride_qb, stride_qs, stride_qr, Q_LAYOUT)
    stride_ob, stride_os, stride_or = _hinted(stride_ob, stride_os, stride_or, Q_LAYOUT)
    stride_kb, stride_kr, stride_kt = _hinted(stride_kb, stride_kr, stride_kt, KV_LAYOUT)
    stride_vb, stride_vr, stride_vt = _hinted(stride_vb, stride_vr, stride_vt, KV_LAYOUT)
    NUM_SLICES: tl.constexpr = (R + BLOCK_DV - 1) // BLOCK_DV
    pid = tl.program_id(0)
    m_block = (S + BLOCK_M - 1) // BLOCK_M - 1 - pid // NUM_SLICES  # longest causal rows first
    r_slice = pid % NUM_SLICES
    b = tl.program_id(1)
    split = tl.program_id(2)

    kv_len = _valid_keys(KV_LEN, stride_kvl, b, T, HAS_KV_LEN)
    first = kv_len - S  # absolute position of query row 0
    m0 = m_block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    pos = first + rows
    lam2 = _row_scale(pos, inv_sqrt_r, LENGTH_SCALE) * _LOG2E  # once per row
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_DK)
    d_ok = d < R
    cols = r_slice * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < R
    q_ptrs = Q + b.to(tl.int64) * stride_qb + rows[:, None] * stride_qs + d[None, :] * stride_qr
    k_ptrs = K + b.to(tl.int64) * stride_kb + d[:, None] * stride_kr + n[None, :] * stride_kt
    vt_ptrs = V + b.to(tl.int64) * stride_vb + n[:, None] * stride_vt + cols[None, :] * stride_vr
    if BLOCK_DK >= R:  # one chunk covers r: keep the query tile for the whole pass
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        q = None
    descs = _descriptors(
        Q,
        K,
        None,
        None,
        stride_qb,
        stride_qs,
        stride_qr,
        stride_kb,
        stride_kr,
        stride_kt,
        0,
        0,
        0,
        0,
        0,
        0,
        S,
        kv_len,
        R,
        BLOCK_M,
        BLOCK_N,
        BLOCK_DK,
        Q_LAYOUT,
        KV_LAYOUT,
        TMA,
        False,
    )  # k and q: the scores need only those

    # keys [0, end) are seen by some row of the block, keys [0, full) by all of them
    end = tl.minimum(first + m0 + BLOCK_M, kv_len)
    full = (tl.maximum(first + m0 + 1, 0) // BLOCK_N) * BLOCK_N
    if PARTIAL:
        tiles = (end + BLOCK_N - 1) // BLOCK_N
        per_split = (tiles + num_splits - 1) // num_splits * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, end)
    else:
        lo = 0
        hi = end
    mid = tl.minimum(tl.maximum(full, lo), hi)

    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    for n0 in range(lo, mid, BLOCK_N):
        acc, l = _fwd_step(
            acc,
            l,
            q,
            q_ptrs,
            row_ok,
            k_ptrs + n0 * stride_kt,
            vt_ptrs + n0 * stride_vt,
            n0 + n,
            pos,
            lam2,
            d_ok,
            col_ok,
            kv_len,
            stride_qr,
            stride_kr,
            descs,
            b,
            m0,
            n0,
            R,
            False,
            PRECISION,
            BLOCK_DK,
            UNROLL,
            TMA,
            Q_LAYOUT,
            KV_LAYOUT,
        )
    for n0 in range(mid, hi, BLOCK_N):
        acc, l = _fwd_step(
            acc,
            l,
            q,
            q_ptrs,
            row_ok,
            k_ptrs + n0 * stride_kt,
            vt_ptrs + n0 * stride_vt,
            n0 + n,
            pos,
            lam2,
            d_ok,
            col_ok,
            kv_len,
            stride_qr,
            stride_kr,
            descs,
            b,
            m0,
            n0,
            R,
            True,
            PRECISION,
            BLOCK_DK,
            UNROLL,
            TMA,
            Q_LAYOUT,
            KV_LAYOUT,
        )

    out_ok = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:  # unnormalised, into (num_splits, B, S, R) and (num_splits, B, S) fp32 buffers
        part = (split * tl.num_programs(1) + b).to(tl.int64) * S + rows
        tl.store(O_PART + part[:, None] * R + cols[None, :], acc, mask=out_ok)
        if r_slice == 0:
            tl.store(L_PART + part, l, mask=row_ok)
    else:
        o_ptrs = (
            O + b.to(tl.int64) * stride_ob + rows[:, None] * stride_os + cols[None, :] * stride_or
        )
        tl.store(o_ptrs, (acc / l[:, None]).to(O.dtype.element_ty), mask=out_ok)
        if r_slice == 0:
            tl.store(L + b.to(tl.int64) * S + rows, l * _LN2, mask=row_ok)


@triton.jit(do_not_specialize=["S"])
def _combine_kernel(
    O_PART,
    L_PART,
    O,
    L,
    stride_ob,
    stride_os,
    stride_or,
    S,
    num_splits,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (S, B): o = Σ_splits acc / Σ_splits l for one query row."""
    row = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_R)
    col_ok = cols < R
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    l = tl.full([BLOCK_R], 0.0, tl.float32)
    for split in range(num_splits):
        part = (split * tl.num_programs(1) + b).to(tl.int64) * S + row
        acc += tl.load(O_PART + part * R + cols, mask=col_ok, other=0.0)
        l += tl.load(L_PART + part + cols * 0)  # the row's l, broadcast over the columns
    o_ptrs = O + b.to(tl.int64) * stride_ob + row * stride_os + cols * stride_or
    tl.store(o_ptrs, (acc / l).to(O.dtype.element_ty), mask=col_ok)
    tl.store(L + b.to(tl.int64) * S + row + cols * 0, l * _LN2, mask=cols == 0)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["S", "T"])
def _bwd_rows_kernel(
    O,
    DO,
    L,
    KV_LEN,
    ROWS,
    DO_SCALED,
    stride_ob,
    stride_os,
    stride_or,
    stride_dob,
    stride_dos,
    stride_dor,
    stride_kvl,
    S,
    T,
    inv_sqrt_r,
    R: tl.constexpr,
    LENGTH_SCALE: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    SCALE_DO: tl.constexpr,
    Q_LAYOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DK: tl.constexpr,
):
    """Grid (row blocks, B): what the backward needs per query row, computed once.

    With L_i = Σ_j softplus(z_ij), D_i = ⟨dO_i, o_i⟩ and c_i = ln 2 / L_i, ROWS (3, B, S) fp32
    holds y_i = λ_i log2(e) (scores to base 2), c_i D_i y_i and c_i, so that with base-2 weights
    w_ij, p_ij = c_i w_ij and λ_i dz_ij = (c_i ⟨dO_i, v_j⟩ y_i − c_i D_i y_i) σ_ij.
    SCALE_DO: also DO_SCALED = c_i dO_i (B, S, r, contiguous, dO's dtype), which spares the dK/dV
    and dQ kernels a multiplication per pair and two per-row constants. Not in fp16, whose range
    c_i dO_i can leave when every score of a row is very negative (L_i tiny).
    """
    stride_ob, stride_os, stride_or = _hinted(stride_ob, stride_os, stride_or, Q_LAYOUT)
    stride_dob, stride_dos, stride_dor = _hinted(stride_dob, stride_dos, stride_dor, Q_LAYOUT)
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    d = tl.arange(0, BLOCK_DK)
    o_ptrs = O + b.to(tl.int64) * stride_ob + rows[:, None] * stride_os + d[None, :] * stride_or
    do_ptrs = (
        DO + b.to(tl.int64) * stride_dob + rows[:, None] * stride_dos + d[None, :] * stride_dor
    )
    scaled_ptrs = DO_SCALED + (b.to(tl.int64) * S + rows[:, None]) * R + d[None, :]
    c = _LN2 / tl.load(L + b.to(tl.int64) * S + rows, mask=row_ok, other=1.0)
    delta = tl.full([BLOCK_M], 0.0, tl.float32)
    for d0 in tl.static_range(0, R, BLOCK_DK):  # one pass over o and dO
        mask = row_ok[:, None] & (d0 + d < R)[None, :]
        o = tl.load(o_ptrs + d0 * stride_or, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptrs + d0 * stride_dor, mask=mask, other=0.0).to(tl.float32)
        delta += _row_sum(o * do)
        if SCALE_DO:
            tl.store(scaled_ptrs + d0, (do * c[:, None]).to(DO_SCALED.dtype.element_ty), mask=mask)
    kv_len = _valid_keys(KV_LEN, stride_kvl, b, T, HAS_KV_LEN)
    c_y = _row_scale(kv_len - S + rows, inv_sqrt_r, LENGTH_SCALE) * _LOG2E
    out = ROWS + b.to(tl.int64) * S + rows
    plane = tl.num_programs(1).to(tl.int64) * S
    tl.store(out, c_y, mask=row_ok)
    tl.store(out + plane, c * delta * c_y, mask=row_ok)
    tl.store(out + 2 * plane, c, mask=row_ok)


@triton.jit
def _load_rows(rows_ptrs, plane, ok, SCALE_DO: tl.constexpr):
    """Per-row constants (see _bwd_rows_kernel) for the rows at ``rows_ptrs``: y_i to scale the
    scores, c_dp to scale ⟨dO_i, v_j⟩, c_sh = c_i D_i y_i, and c_p to scale the weights (unused
    when dO comes scaled). Rows where ``ok`` is false get 0, so that they contribute nothing."""
    c_y = tl.load(rows_ptrs, mask=ok, other=0.0)
    c_sh = tl.load(rows_ptrs + plane, mask=ok, other=0.0)
    if SCALE_DO:
        c_p = c_y
        c_dp = c_y
    else:
        c_p = tl.load(rows_ptrs + 2 * plane, mask=ok, other=0.0)
        c_dp = c_y * c_p
    return c_y, c_dp, c_sh, c_p


@triton.jit
def _dkdv_step(
    dk,
    dv,
    kt,
    vt,
    kq,
    dq_cols,
    dqa_ptrs,
    kt_ptrs,
    vt_ptrs,
    key_ok,
    keys,
    qt_ptrs,
    dot_ptrs,
    q_ptrs,
    do_ptrs,
    rows_ptrs,
    plane,
    rows,
    first,
    S,
    col_ok,
    stride_kr,
    stride_vr,
    stride_qr,
    stride_dor,
    descs,
    b,
    n0,
    m0,
    R: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    UNROLL: tl.constexpr,
    SCALE_DO: tl.constexpr,
    GRAD_K: tl.constexpr,
    GRAD_V: tl.constexpr,
    GRAD_Q: tl.constexpr,
    FAST: tl.constexpr,
    TMA: tl.constexpr,
    Q_LAYOUT: tl.constexpr,
    KV_LAYOUT: tl.constexpr,
):
    """Add one query tile (rows) to the key tile's dk and/or dv; scores are kept transposed.
    GRAD_Q: also add the tile's share of dq, Σ_j λ_i dz_ij k_j over this tile's keys, to the fp32
    accumulator with atomic adds: kq holds the keys' columns of this r slice in parts (dq_cols:
    their indices; see _dq_parts), each a product of its own; dqa_ptrs points at the rows
    (1, BLOCK_M), or with one part at the part's columns too (BLOCK_DV, BLOCK_M).

    MASKED: the tile may cross the causal diagonal or the last row; otherwise every row exists
    and sees every key, and nothing is checked.
    """
    if MASKED:
        row_ok = rows < S
    else:  # an all-true constant keeps the loads unpredicated
        row_ok = tl.full(rows.shape, 1, tl.int1)
    c_y, c_dp, c_sh, c_p = _load_rows(rows_ptrs, plane, row_ok, SCALE_DO)
    out_mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(q_ptrs, mask=out_mask, other=0.0)  # (BLOCK_M, BLOCK_DV)
    do = tl.load(do_ptrs, mask=out_mask, other=0.0)
    if BLOCK_DK >= R:  # the slice is all of r
        zt = tl.dot(kt, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    elif TMA:
        zt = _dot_over_r_tma(
            descs[0],
            n0,
            descs[2],
            m0,
            b,
            keys.shape[0],
            rows.shape[0],
            R,
            BLOCK_DK,
            KV_LAYOUT == 1,
            Q_LAYOUT == 2,
            PRECISION,
        )
    else:
        zt = _dot_over_r(
            kt_ptrs,
            key_ok[:, None],
            stride_kr,
            qt_ptrs,
            row_ok[None, :],
            stride_qr,
            R,
            BLOCK_DK,
            PRECISION,
            UNROLL,
        )
    yt = zt * c_y[None, :]
    if MASKED:
        seen = keys[:, None] <= (first + rows)[None, :]
    if GRAD_V:
        w = _softplus2(yt)
        if GRAD_K:
            sig = _sigmoid2(yt, w)
        if MASKED:
            w = tl.where(seen, w, 0.0)
        if not SCALE_DO:
            w = w * c_p[None, :]
        dv = tl.dot(w.to(do.dtype), do, dv, input_precision=PRECISION)  # Σ_i p_ij dO_i
    elif GRAD_K:  # softplus itself not needed. The row constant is negated, not the scores:
        # ptxas (12.8) drops the score product when its result is negated as an integer xor
        sig = _sigmoid_from_neg(zt * -c_y[None, :], FAST)
    if GRAD_K:
        if BLOCK_DK >= R:
            dpt = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
        elif TMA:
            dpt = _dot_over_r_tma(
                descs[1],
                n0,
                descs[3],
                m0,
                b,
                keys.shape[0],
                rows.shape[0],
                R,
                BLOCK_DK,
                KV_LAYOUT == 1,
                Q_LAYOUT == 2,
                PRECISION,
            )
        else:
            dpt = _dot_over_r(
                vt_ptrs,
                key_ok[:, None],
                stride_vr,
                dot_ptrs,
                row_ok[None, :],
                stride_dor,
                R,
                BLOCK_DK,
                PRECISION,
                UNROLL,
            )
        if MASKED:
            sig = tl.where(seen, sig, 0.0)
        dzt = (dpt * c_dp[None, :] - c_sh[None, :]) * sig  # (λ_i dz_ij)ᵀ
        ds = dzt.to(q.dtype)
        dk = tl.dot(ds, q, dk, input_precision=PRECISION)
        if GRAD_Q:  # (dq)ᵀ = kᵀ (λ dz)ᵀ: r-slice rows, so every warp owns its own
            for part in tl.static_range(len(kq)):  # one product of kq[part]'s columns at a time
                c = dq_cols[part]
                dqt = tl.dot(tl.trans(kq[part]), ds, input_precision=PRECISION)  # (cols, M)
                ok = (c < R)[:, None] & row_ok[None, :]
                if len(kq) == 1:  # the launcher's pointers are the part's
                    tl.atomic_add(dqa_ptrs, dqt, mask=ok, sem="relaxed")
                else:
                    tl.atomic_add(dqa_ptrs + c[:, None], dqt, mask=ok, sem="relaxed")
    return dk, dv


@triton.jit
def _key_columns(k_ptrs, stride_kr, cols, key_ok, R: tl.constexpr):
    """(BLOCK_N, len(cols)) tile of the keys at k_ptrs (one pointer per key), columns cols of r."""
    return tl.load(
        k_ptrs + cols[None, :] * stride_kr, mask=key_ok[:, None] & (cols < R)[None, :], other=0.0
    )


@triton.jit
def _dq_parts(k_ptrs, stride_kr, first, key_ok, R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The keys' columns first .. first + BLOCK_DV of r for the dq product, and their indices: one
    part, or past 256 columns four, so that one fp32 product of BLOCK_DV / 4 columns is live at a
    time (dk's accumulator holds most registers: r = 424 in one part of 512 spills)."""
    if BLOCK_DV > 256:
        c = first + tl.arange(0, BLOCK_DV // 4)
        cols = (c, c + BLOCK_DV // 4, c + BLOCK_DV // 2, c + 3 * (BLOCK_DV // 4))
        tiles = (
            _key_columns(k_ptrs, stride_kr, cols[0], key_ok, R),
            _key_columns(k_ptrs, stride_kr, cols[1], key_ok, R),
            _key_columns(k_ptrs, stride_kr, cols[2], key_ok, R),
            _key_columns(k_ptrs, stride_kr, cols[3], key_ok, R),
        )
    else:
        cols = (first + tl.arange(0, BLOCK_DV),)
        tiles = (_key_columns(k_ptrs, stride_kr, cols[0], key_ok, R),)
    return tiles, cols


@triton.jit(do_not_specialize=["S", "T"])
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    ROWS,
    KV_LEN,
    DK,
    DV,
    DQ_ACC,
    stride_qb,
    stride_qs,
    stride_qr,
    stride_kb,
    stride_kr,
    stride_kt,
    stride_vb,
    stride_vr,
    stride_vt,
    stride_dob,
    stride_dos,
    stride_dor,
    stride_dkb,
    stride_dkr,
    stride_dkt,
    stride_dvb,
    stride_dvr,
    stride_dvt,
    stride_kvl,
    S,
    T,
    S_BUCKET,
    R: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    SCALE_DO: tl.constexpr,
    PRECISION: tl.constexpr,
    Q_LAYOUT: tl.constexpr,
    KV_LAYOUT: tl.constexpr,
    GRAD_K: tl.constexpr,
    GRAD_V: tl.constexpr,
    GRAD_Q: tl.constexpr,
    FAST: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Grid (key blocks × r slices, B): dk and/or dv of one key tile, over the query rows that
    see it. Up to r = 128 one launch computes both; wider cores run one launch per gradient, each
    with a single accumulator (two would not fit in registers) and without the other's work.

    GRAD_Q (with GRAD_K: the fused backward): the same pass adds each tile's dq terms to DQ_ACC,
    (B, S, R) fp32 zeroed by the launcher, with atomic adds: the scores and dP serve dk and dq,
    and the separate dq launch is not needed. The order of the adds varies from run to run."""
    stride_qb, stride_qs, stride_qr = _hinted(stride_qb, stride_qs, stride_qr, Q_LAYOUT)
    stride_dob, stride_dos, stride_dor = _hinted(stride_dob, stride_dos, stride_dor, Q_LAYOUT)
    stride_kb, stride_kr, stride_kt = _hinted(stride_kb, stride_kr, stride_kt, KV_LAYOUT)
    stride_vb, stride_vr, stride_vt = _hinted(stride_vb, stride_vr, stride_vt, KV_LAYOUT)
    stride_dkb, stride_dkr, stride_dkt = _hinted(stride_dkb, stride_dkr, stride_dkt, KV_LAYOUT)
    stride_dvb, stride_dvr, stride_dvt = _hinted(stride_dvb, stride_dvr, stride_dvt, KV_LAYOUT)
    NUM_SLICES: tl.constexpr = (R + BLOCK_DV - 1) // BLOCK_DV
    pid = tl.program_id(0)
    n0 = (pid // NUM_SLICES) * BLOCK_N
    r_slice = pid % NUM_SLICES
    b = tl.program_id(1)

    kv_len = _valid_keys(KV_LEN, stride_kvl, b, T, HAS_KV_LEN)
    first = kv_len - S
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < kv_len
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_DK)
    d_ok = d < R
    cols = r_slice * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < R
    q_b = Q + b.to(tl.int64) * stride_qb
    do_b = DO + b.to(tl.int64) * stride_dob
    kt_ptrs = K + b.to(tl.int64) * stride_kb + keys[:, None] * stride_kt + d[None, :] * stride_kr
    vt_ptrs = V + b.to(tl.int64) * stride_vb + keys[:, None] * stride_vt + d[None, :] * stride_vr
    qt_ptrs = q_b + d[:, None] * stride_qr + m[None, :] * stride_qs  # (BLOCK_DK, BLOCK_M), rows 0..
    dot_ptrs = do_b + d[:, None] * stride_dor + m[None, :] * stride_dos
    q_ptrs = q_b + m[:, None] * stride_qs + cols[None, :] * stride_qr  # (BLOCK_M, BLOCK_DV)
    do_ptrs = do_b + m[:, None] * stride_dos + cols[None, :] * stride_dor
    rows_ptrs = ROWS + b.to(tl.int64) * S + m
    plane = tl.num_programs(1).to(tl.int64) * S
    dqa_ptrs = DQ_ACC + (b.to(tl.int64) * S + m[None, :]) * R  # (1, BLOCK_M), rows 0..
    if BLOCK_DK >= R:  # one chunk covers r: keep the key and value tiles
        kv_mask = key_ok[:, None] & d_ok[None, :]
        kt = tl.load(kt_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_DK)
        vt = tl.load(vt_ptrs, mask=kv_mask, other=0.0)
    else:
        kt = None
        vt = None
    if GRAD_Q and BLOCK_DK >= R and BLOCK_DV == BLOCK_DK:
        kq, dq_cols = (kt,), (cols,)  # the slice is all of r
    elif GRAD_Q:  # the keys' columns of this r slice, for the dq product
        kq_ptrs = K + b.to(tl.int64) * stride_kb + keys[:, None] * stride_kt
        kq, dq_cols = _dq_parts(kq_ptrs, stride_kr, r_slice * BLOCK_DV, key_ok, R, BLOCK_DV)
    else:
        kq, dq_cols = None, None
    if GRAD_Q:
        if len(kq) == 1:  # pointers at every column of the one part
            dqa_ptrs += dq_cols[0][:, None]
    descs = _descriptors(
        Q,
        K,
        V,
        DO,
        stride_qb,
        stride_qs,
        stride_qr,
        stride_kb,
        stride_kr,
        stride_kt,
        stride_vb,
        stride_vr,
        stride_vt,
        stride_dob,
        stride_dos,
        stride_dor,
        S,
        kv_len,
        R,
        BLOCK_M,
        BLOCK_N,
        BLOCK_DK,
        Q_LAYOUT,
        KV_LAYOUT,
        TMA,
        True,
    )

    # rows from n0 − first on see a key of the tile, rows from m_full on see all of them; the
    # tiles between m_full and the last whole tile need no check at all
    m_lo = (tl.maximum(n0 - first, 0) // BLOCK_M) * BLOCK_M
    m_full = (tl.maximum(n0 + BLOCK_N - 1 - first, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    m_whole = tl.maximum(S // BLOCK_M * BLOCK_M, m_full)
    dk = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
    for phase in tl.static_range(3):  # diagonal tiles, whole tiles, then the last rows
        if phase == 0:
            lo, hi = m_lo, tl.minimum(m_full, S)
        elif phase == 1:
            lo, hi = m_full, m_whole
        else:  # rows past the last whole tile, if S is not a multiple of BLOCK_M
            lo, hi = m_whole, S
        for m0 in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_step(
                dk,
                dv,
                kt,
                vt,
                kq,
                dq_cols,
                dqa_ptrs + m0 * R,
                kt_ptrs,
                vt_ptrs,
                key_ok,
                keys,
                qt_ptrs + m0 * stride_qs,
                dot_ptrs + m0 * stride_dos,
                q_ptrs + m0 * stride_qs,
                do_ptrs + m0 * stride_dos,
                rows_ptrs + m0,
                plane,
                m0 + m,
                first,
                S,
                col_ok,
                stride_kr,
                stride_vr,
                stride_qr,
                stride_dor,
                descs,
                b,
                n0,
                m0,
                R,
                phase != 1,
                PRECISION,
                BLOCK_DK,
                UNROLL,
                SCALE_DO,
                GRAD_K,
                GRAD_V,
                GRAD_Q,
                FAST,
                TMA,
                Q_LAYOUT,
                KV_LAYOUT,
            )

    out_ok = (keys < T)[:, None] & col_ok[None, :]  # keys past kv_len get zero gradients
    dk_ptrs = (
        DK + b.to(tl.int64) * stride_dkb + keys[:, None] * stride_dkt + cols[None, :] * stride_dkr
    )
    dv_ptrs = (
        DV + b.to(tl.int64) * stride_dvb + keys[:, None] * stride_dvt + cols[None, :] * stride_dvr
    )
    if GRAD_K:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=out_ok)
    if GRAD_V:
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_step(
    dq,
    q,
    do,
    q_ptrs,
    do_ptrs,
    row_ok,
    k_ptrs,
    v_ptrs,
    kt_ptrs,
    keys,
    pos,
    c_dp,
    neg_c_y,
    c_sh,
    d_ok,
    col_ok,
    kv_len,
    stride_qr,
    stride_dor,
    stride_kr,
    stride_vr,
    descs,
    b,
    m0,
    n0,
    R: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    UNROLL: tl.constexpr,
    FAST: tl.constexpr,
    TMA: tl.constexpr,
    Q_LAYOUT: tl.constexpr,
    KV_LAYOUT: tl.constexpr,
):
    """Add one key tile to the row block's Σ_j λ_i dz_ij k_j."""
    if MASKED:
        key_ok = keys < kv_len
    else:  # an all-true constant keeps the loads vectorised
        key_ok = tl.full(keys.shape, 1, tl.int1)
    if BLOCK_DK >= R:
        k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)  # (BLOCK_DK, BLOCK_N)
        v = tl.load(v_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        z = tl.dot(q, k, input_precision=PRECISION)
        dp = tl.dot(do, v, input_precision=PRECISION)
        kt = tl.trans(k)
    elif TMA:
        z = _dot_over_r_tma(
            descs[2],
            m0,
            descs[0],
            n0,
            b,
            pos.shape[0],
            keys.shape[0],
            R,
            BLOCK_DK,
            Q_LAYOUT == 2,
            KV_LAYOUT == 1,
            PRECISION,
        )
        dp = _dot_over_r_tma(
            descs[3],
            m0,
            descs[1],
            n0,
            b,
            pos.shape[0],
            keys.shape[0],
            R,
            BLOCK_DK,
            Q_LAYOUT == 2,
            KV_LAYOUT == 1,
            PRECISION,
        )
        kt = tl.load(kt_ptrs, mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # (N, BLOCK_DV)
    else:
        z = _dot_over_r(
            q_ptrs,
            row_ok[:, None],
            stride_qr,
            k_ptrs,
            key_ok[None, :],
            stride_kr,
            R,
            BLOCK_DK,
            PRECISION,
            UNROLL,
        )
        dp = _dot_over_r(
            do_ptrs,
            row_ok[:, None],
            stride_dor,
            v_ptrs,
            key_ok[None, :],
            stride_vr,
            R,
            BLOCK_DK,
            PRECISION,
            UNROLL,
        )
        kt = tl.load(kt_ptrs, mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # (N, BLOCK_DV)
    sig = _sigmoid_from_neg(z * neg_c_y[:, None], FAST)  # softplus itself not needed
    if MASKED:
        sig = tl.where(keys[None, :] <= pos[:, None], sig, 0.0)
    ds = (dp * c_dp[:, None] - c_sh[:, None]) * sig  # λ_i dz_ij
    dq = tl.dot(ds.to(kt.dtype), kt, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["S", "T"])
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    ROWS,
    KV_LEN,
    DQ,
    stride_qb,
    stride_qs,
    stride_qr,
    stride_kb,
    stride_kr,
    stride_kt,
    stride_vb,
    stride_vr,
    stride_vt,
    stride_dob,
    stride_dos,
    stride_dor,
    stride_dqb,
    stride_dqs,
    stride_dqr,
    stride_kvl,
    S,
    T,
    S_BUCKET,
    R: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    SCALE_DO: tl.constexpr,
    PRECISION: tl.constexpr,
    Q_LAYOUT: tl.constexpr,
    KV_LAYOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UNROLL: tl.constexpr,
    FAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """Grid (row blocks × r slices, B): dq of one query tile, over the keys it sees."""
    stride_qb, stride_qs, stride_qr = _hinted(stride_qb, stride_qs, stride_qr, Q_LAYOUT)
    stride_dob, stride_dos, stride_dor = _hinted(stride_dob, stride_dos, stride_dor, Q_LAYOUT)
    stride_dqb, stride_dqs, stride_dqr = _hinted(stride_dqb, stride_dqs, stride_dqr, Q_LAYOUT)
    stride_kb, stride_kr, stride_kt = _hinted(stride_kb, stride_kr, stride_kt, KV_LAYOUT)
    stride_vb, stride_vr, stride_vt = _hinted(stride_vb, stride_vr, stride_vt, KV_LAYOUT)
    NUM_SLICES: tl.constexpr = (R + BLOCK_DV - 1) // BLOCK_DV
    pid = tl.program_id(0)
    m_block = (S + BLOCK_M - 1) // BLOCK_M - 1 - pid // NUM_SLICES  # longest causal rows first
    r_slice = pid % NUM_SLICES
    b = tl.program_id(1)

    kv_len = _valid_keys(KV_LEN, stride_kvl, b, T, HAS_KV_LEN)
    first = kv_len - S
    m0 = m_block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    pos = first + rows
    c_y, c_dp, c_sh, _ = _load_rows(
        ROWS + b.to(tl.int64) * S + rows, tl.num_programs(1).to(tl.int64) * S, row_ok, SCALE_DO
    )
    neg_c_y = -c_y
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_DK)
    d_ok = d < R
    cols = r_slice * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < R
    k_b = K + b.to(tl.int64) * stride_kb
    v_b = V + b.to(tl.int64) * stride_vb
    q_ptrs = Q + b.to(tl.int64) * stride_qb + rows[:, None] * stride_qs + d[None, :] * stride_qr
    do_ptrs = (
        DO + b.to(tl.int64) * stride_dob + rows[:, None] * stride_dos + d[None, :] * stride_dor
    )
    k_ptrs = k_b + d[:, None] * stride_kr + n[None, :] * stride_kt  # (BLOCK_DK, BLOCK_N), keys 0..
    v_ptrs = v_b + d[:, None] * stride_vr + n[None, :] * stride_vt
    kt_ptrs = k_b + n[:, None] * stride_kt + cols[None, :] * stride_kr  # (BLOCK_N, BLOCK_DV)
    if BLOCK_DK >= R:  # one chunk covers r: keep the query and output-gradient tiles
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        q = None
        do = None
    descs = _descriptors(
        Q,
        K,
        V,
        DO,
        stride_qb,
        stride_qs,
        stride_qr,
        stride_kb,
        stride_kr,
        stride_kt,
        stride_vb,
        stride_vr,
        stride_vt,
        stride_dob,
        stride_dos,
        stride_dor,
        S,
        kv_len,
        R,
        BLOCK_M,
        BLOCK_N,
        BLOCK_DK,
        Q_LAYOUT,
        KV_LAYOUT,
        TMA,
        True,
    )

    end = tl.minimum(first + m0 + BLOCK_M, kv_len)
    full = (tl.maximum(first + m0 + 1, 0) // BLOCK_N) * BLOCK_N
    dq = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    for n0 in range(0, full, BLOCK_N):
        dq = _dq_step(
            dq,
            q,
            do,
            q_ptrs,
            do_ptrs,
            row_ok,
            k_ptrs + n0 * stride_kt,
            v_ptrs + n0 * stride_vt,
            kt_ptrs + n0 * stride_kt,
            n0 + n,
            pos,
            c_dp,
            neg_c_y,
            c_sh,
            d_ok,
            col_ok,
            kv_len,
            stride_qr,
            stride_dor,
            stride_kr,
            stride_vr,
            descs,
            b,
            m0,
            n0,
            R,
            False,
            PRECISION,
            BLOCK_DK,
            UNROLL,
            FAST,
            TMA,
            Q_LAYOUT,
            KV_LAYOUT,
        )
    for n0 in range(full, end, BLOCK_N):
        dq = _dq_step(
            dq,
            q,
            do,
            q_ptrs,
            do_ptrs,
            row_ok,
            k_ptrs + n0 * stride_kt,
            v_ptrs + n0 * stride_vt,
            kt_ptrs + n0 * stride_kt,
            n0 + n,
            pos,
            c_dp,
            neg_c_y,
            c_sh,
            d_ok,
            col_ok,
            kv_len,
            stride_qr,
            stride_dor,
            stride_kr,
            stride_vr,
            descs,
            b,
            m0,
            n0,
            R,
            True,
            PRECISION,
            BLOCK_DK,
            UNROLL,
            FAST,
            TMA,
            Q_LAYOUT,
            KV_LAYOUT,
        )

    dq_ptrs = (
        DQ + b.to(tl.int64) * stride_dqb + rows[:, None] * stride_dqs + cols[None, :] * stride_dqr
    )
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers: block shapes, autotuning
# ---------------------------------------------------------------------------------------------
#
# Shapes (see Shape) per launch role, input class ("16" for fp16/bf16, "32" for fp32) and padded
# width: the autotuner's candidates, keyed on r, the power of two above S, the layouts and the dot
# precision. Rules, each checked on the compiled sm_90 code by benchmarks/kernel_static.py
# (tests/integration/test_kernel_static.py in CI):
#  * every warp owns its own rows of a chained dot: its rows (BLOCK_M in the forward and dQ,
#    BLOCK_N in dK/dV) are at least 16 × num_warps, or its columns are wide enough for the
#    warpgroups to split them (dK's 512 columns at BLOCK_N = 64); fewer would make warpgroups
#    compute the same scores twice;
#  * every shape fits in the 227 KB of shared memory a block may use, and none spills registers.
# The first shape of each list is the one used without autotuning (LLAMA3_KERNEL_AUTOTUNE=0). A
# table may hold an entry for one exact width (424, the default core at dim 128), tried before the
# entry of its padded width.
# Roles: "fwd"; the fused backward: "dkdvq" (every gradient in one launch, r ≤ 128), or "dv" and
# "dkq" (wider r); the deterministic backward: "dkdv" (r ≤ 128) or "dv" and "dk", then "dq".


@dataclasses.dataclass(frozen=True)
class Shape:
    """One autotune candidate: block sizes, warps and pipeline stages, and how r is read.

    rolled: the r-chunk loop stays a loop (not unrolled); tma: the r chunks are copied by the TMA
    unit through tensor descriptors (always a rolled loop), a shape used only where the launcher
    found every tensor's layout fit for descriptors (see unit_axis), and then in place of the
    table's other shapes; chunk: BLOCK_DK, columns of r per chunk (default: see chunk_width);
    not_fp16: for bf16 only (fp16 keeps dO unscaled, one more per-row constant, and the shape
    spills there).
    """

    block_m: int
    block_n: int
    block_dv: int
    warps: int
    stages: int
    rolled: bool = False
    tma: bool = False
    chunk: int | None = None
    not_fp16: bool = False

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """'M,N,DV,WARPS,STAGES[,rolled][,tma][,dkNN][,not_fp16]' (benchmarks' --shapes)."""
        fields = [f.strip() for f in text.split(",") if f.strip()]
        flags = set(fields[5:])
        chunk = next((int(f[2:]) for f in flags if f.startswith("dk")), None)
        unknown = flags - {"rolled", "tma", "not_fp16"} - {f"dk{chunk}"}
        if len(fields) < 5 or unknown:
            raise ValueError(f"not a shape: {text!r}")
        m, n, dv, warps, stages = (int(f) for f in fields[:5])
        return cls(
            m, n, dv, warps, stages, "rolled" in flags, "tma" in flags, chunk, "not_fp16" in flags
        )


SHAPES = {
    "fwd": {
        ("16", 64): [Shape(128, 64, 64, 8, 3), Shape(64, 64, 64, 4, 3)],
        ("16", 128): [
            Shape(128, 64, 128, 8, 3),
            Shape(128, 128, 128, 8, 2),
            Shape(64, 64, 128, 4, 3),
        ],
        ("16", 256): [Shape(128, 32, 256, 8, 2), Shape(128, 32, 256, 8, 3)],
        ("16", 512): [Shape(128, 32, 256, 8, 2)],
        ("16", 1024): [
            Shape(128, 64, 256, 8, 2, tma=True, chunk=128),
            Shape(128, 32, 256, 8, 2, rolled=True),
        ],
        ("32", 64): [Shape(64, 32, 64, 4, 2)],
        ("32", 128): [Shape(64, 32, 128, 4, 2)],
        ("32", 256): [Shape(64, 32, 128, 4, 2)],
        ("32", 512): [Shape(64, 32, 128, 4, 2)],
        ("32", 1024): [Shape(64, 32, 128, 4, 2, rolled=True)],
    },
    # BLOCK_N keys stay, BLOCK_M query rows stream past; two BLOCK_N × BLOCK_DV accumulators
    "dkdv": {
        ("16", 64): [Shape(32, 128, 64, 8, 3), Shape(32, 64, 64, 4, 3)],
        ("16", 128): [Shape(32, 128, 128, 8, 3), Shape(16, 128, 128, 8, 3)],
        ("32", 64): [Shape(32, 64, 64, 4, 2)],
        ("32", 128): [Shape(32, 64, 64, 4, 2)],
    },
    "dv": {
        ("16", 256): [Shape(32, 64, 256, 4, 2, not_fp16=True), Shape(32, 128, 256, 8, 2)],
        ("16", 512): [
            Shape(32, 64, 512, 8, 2, tma=True, chunk=128),
            Shape(64, 128, 256, 8, 2, tma=True, chunk=128, not_fp16=True),
            Shape(32, 128, 256, 8, 2, tma=True, chunk=128),
            Shape(32, 128, 256, 8, 2, chunk=64),
        ],
        ("16", 1024): [
            Shape(32, 64, 512, 8, 2, tma=True, chunk=128),
            Shape(64, 128, 256, 8, 2, tma=True, chunk=128, not_fp16=True),
            Shape(32, 128, 256, 8, 2, tma=True, chunk=128),
            Shape(32, 128, 256, 8, 2, rolled=True, chunk=64),
        ],
        ("32", 256): [Shape(32, 64, 64, 4, 2)],
        ("32", 512): [Shape(32, 64, 64, 4, 2)],
        ("32", 1024): [Shape(32, 64, 64, 4, 2, rolled=True)],
    },
    # the fused backward: dk, dv and dq's terms in one pass (r ≤ 128), or dk and dq (wider r,
    # beside the "dv" launch)
    "dkdvq": {
        ("16", 64): [Shape(32, 128, 64, 8, 3), Shape(16, 128, 64, 8, 3)],
        ("16", 128): [Shape(32, 128, 128, 8, 3, not_fp16=True), Shape(16, 128, 128, 8, 3)],
        ("32", 64): [Shape(32, 64, 64, 4, 2)],
        ("32", 128): [Shape(32, 64, 64, 4, 2)],
    },
    # one r slice of 512 (dk's accumulator in 64 key rows), not two that each recompute the
    # scores and dP (32 rows of 128 keys spill 32 bytes at r = 424); dq's atomic traffic is then
    # 4r / 64 bytes per pair, 32 at r = 424 (see benchmarks/NOTES.md)
    "dkq": {
        ("16", 256): [Shape(16, 128, 256, 8, 2), Shape(16, 128, 256, 8, 3)],
        ("16", 512): [
            Shape(32, 64, 512, 8, 2, tma=True, chunk=128),
            Shape(16, 64, 512, 8, 2, tma=True, chunk=128),
            Shape(16, 64, 512, 8, 2, rolled=True, chunk=64),
        ],
        ("16", 1024): [
            Shape(32, 64, 512, 8, 2, tma=True, chunk=128),
            Shape(16, 64, 512, 8, 2, tma=True, chunk=128),
            Shape(16, 64, 512, 8, 2, rolled=True, chunk=64),
        ],
        ("32", 256): [Shape(32, 64, 64, 4, 2)],
        ("32", 512): [Shape(32, 64, 64, 4, 2)],
        ("32", 1024): [Shape(32, 64, 64, 4, 2, rolled=True)],
    },
    "dk": {
        ("16", 256): [Shape(32, 128, 256, 8, 2)],
        ("16", 512): [
            Shape(32, 128, 256, 8, 2, tma=True, chunk=128),
            Shape(16, 128, 256, 8, 2, rolled=True, chunk=64),
        ],
        ("16", 1024): [
            Shape(32, 128, 256, 8, 2, tma=True, chunk=128),
            Shape(16, 128, 256, 8, 2, rolled=True, chunk=64),
        ],
        ("32", 256): [Shape(32, 64, 64, 4, 2)],
        ("32", 512): [Shape(32, 64, 64, 4, 2)],
        ("32", 1024): [Shape(32, 64, 64, 4, 2, rolled=True)],
    },
    # decoding (S ≤ 16, split-K): one 16-row block, not autotuned (CUDA graphs capture it)
    "decode": {
        ("16", 64): [Shape(16, 32, 64, 4, 3)],
        ("16", 128): [Shape(16, 32, 128, 4, 3)],
        ("16", 256): [Shape(16, 32, 256, 4, 3)],
        ("16", 512): [Shape(16, 32, 512, 4, 3, chunk=64)],
        ("16", 1024): [Shape(16, 32, 256, 4, 2)],
        ("32", 64): [Shape(16, 32, 64, 4, 2)],
        ("32", 128): [Shape(16, 32, 128, 4, 2)],
        ("32", 256): [Shape(16, 32, 256, 4, 2)],
        ("32", 512): [Shape(16, 32, 256, 4, 2)],
        ("32", 1024): [Shape(16, 32, 256, 4, 2)],
    },
    "dq": {
        ("16", 64): [Shape(128, 64, 64, 8, 3), Shape(64, 64, 64, 4, 3)],
        ("16", 128): [
            Shape(128, 64, 128, 8, 2),
            Shape(128, 32, 128, 8, 3),
            Shape(64, 64, 128, 4, 3),
        ],
        ("16", 256): [Shape(128, 32, 256, 8, 2)],
        ("16", 424): [
            Shape(128, 64, 256, 8, 2, tma=True, chunk=128),
            Shape(128, 32, 256, 8, 2, rolled=True),
            Shape(128, 16, 256, 8, 2, rolled=True),
        ],
        ("16", 512): [
            Shape(128, 64, 256, 8, 2, tma=True, chunk=128),
            Shape(128, 16, 256, 8, 2, rolled=True, chunk=64),
        ],
        ("16", 1024): [
            Shape(128, 64, 256, 8, 2, tma=True, chunk=128),
            Shape(128, 32, 256, 8, 2, rolled=True),
        ],
        ("32", 64): [Shape(64, 32, 64, 4, 2)],
        ("32", 128): [Shape(64, 32, 128, 4, 2)],
        ("32", 256): [Shape(64, 32, 128, 4, 2)],
        ("32", 512): [Shape(64, 32, 128, 4, 2)],
        ("32", 1024): [Shape(64, 32, 128, 4, 2, rolled=True)],
    },
}
KERNELS = {
    "fwd": _fwd_kernel,
    "dkdv": _bwd_dkdv_kernel,
    "dv": _bwd_dkdv_kernel,
    "dk": _bwd_dkdv_kernel,
    "dq": _bwd_dq_kernel,
    "dkdvq": _bwd_dkdv_kernel,
    "dkq": _bwd_dkdv_kernel,
}
# The interpreter runs one small shape per role (no autotuning): diagonals cross tiles, r is sliced.
_INTERPRETER_SHAPES = {
    "fwd": (64, 32, 128),
    "dkdv": (32, 64, 128),
    "dv": (32, 64, 128),
    "dk": (32, 64, 128),
    "dq": (64, 32, 128),
    "dkdvq": (32, 64, 128),
    "dkq": (32, 64, 512),  # r > 256: dq in two parts, as compiled
}


def deterministic_backward() -> bool:
    """Whether the backward runs its deterministic launches (every gradient element written by
    one program, bit-identical from run to run) instead of the fused one (dq by atomic adds, whose
    order varies): asked for by ``torch.use_deterministic_algorithms(True)`` or
    LLAMA3_KERNEL_DETERMINISTIC=1."""
    return DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


def split_key_gradients(r: int) -> bool:
    """Whether dk and dv take one launch each (see _bwd_dkdv_kernel)."""
    return padded_width(r) > 128


def padded_width(r: int) -> int:
    """Smallest power of two ≥ r (and ≥ 16, the smallest tensor-core tile)."""
    return max(16, triton.next_power_of_2(r))


def chunk_width(r: int, block_dv: int) -> int:
    """BLOCK_DK: the whole padded width up to 128, or 256 when one program computes every output
    column (BLOCK_DV covers r); else chunks of 128 or, if r is not a multiple of 128, 64
    (r = 424 → 7 × 64 = 448 columns of work, not 512)."""
    width = padded_width(r)
    if width <= 128 or (width <= 256 and block_dv >= width):
        return width
    return 128 if r % 128 == 0 else 64


def unrolled(r: int) -> bool:
    """Whether the r-chunk loop is unrolled by default (see the shape tables)."""
    return r <= 512


def input_class(dtype: torch.dtype) -> str:
    """Key of the shape tables: "32" for fp32 inputs, "16" for fp16 and bf16."""
    return "32" if dtype == torch.float32 else "16"


def table_key(role: str, r: int, dtype: torch.dtype) -> tuple[str, int]:
    """Key of ``role``'s shape table for width r and inputs of ``dtype``: r itself where the
    table has an entry for it (424, the default core at dim 128), else r's padded width."""
    exact = (input_class(dtype), r)
    return (
        exact
        if exact in SHAPES[role]
        else (input_class(dtype), min(max(padded_width(r), 64), 1024))
    )


def configs(role: str, r: int, dtype: torch.dtype, tma: bool = False) -> list[triton.Config]:
    """Autotune candidates of launch ``role`` at width r for inputs of ``dtype`` (the first
    alone without autotuning); ``tma``: the layouts allow tensor descriptors."""
    found = _configs(role, r, dtype, tma)
    return found if AUTOTUNE else found[:1]


def _configs(role: str, r: int, dtype: torch.dtype, tma: bool) -> list[triton.Config]:
    """The shapes of ``role``'s table for width r and ``dtype`` as Triton configurations: its
    TMA shapes where ``tma`` and it has some, else its others."""
    width = padded_width(r)
    table = [
        shape
        for shape in SHAPES[role][table_key(role, r, dtype)]
        if not (dtype == torch.float16 and shape.not_fp16)
    ]
    use_tma = tma and any(shape.tma for shape in table)
    found = []
    for shape in table:
        if shape.tma != use_tma:
            continue
        dv = min(shape.block_dv, width)
        meta = dict(
            BLOCK_M=shape.block_m,
            BLOCK_N=shape.block_n,
            BLOCK_DV=dv,
            BLOCK_DK=min(shape.chunk or chunk_width(r, dv), width),
            UNROLL=unrolled(r) and not (shape.rolled or shape.tma),
            TMA=shape.tma,
        )
        found.append(triton.Config(meta, num_warps=shape.warps, num_stages=shape.stages))
    return found


@functools.cache
def _autotuned(role: str, r: int, dtype: torch.dtype, tma: bool):
    """The kernel of launch ``role`` in an autotuner over its shapes for width r and ``dtype``."""
    key = ["R", "S_BUCKET", "Q_LAYOUT", "KV_LAYOUT", "PRECISION"]
    return triton.autotune(configs=configs(role, r, dtype, tma), key=key)(KERNELS[role])


def _launch(role: str, grid, args: tuple, r: int, dtype: torch.dtype, **meta) -> None:
    """Run launch ``role``: autotuned when compiled, with the one interpreter shape otherwise
    (through descriptors where the compiled launch would use them)."""
    tma = descriptors_allowed(meta["Q_LAYOUT"], meta["KV_LAYOUT"])
    if not INTERPRETED:
        if tma:
            _ensure_allocator()
        _autotuned(role, r, dtype, tma)[grid](*args, **meta)
        return
    block_m, block_n, block_dv = _INTERPRETER_SHAPES[role]
    width = padded_width(r)
    dv = width if width <= 128 else min(block_dv, width)
    tma = tma and _configs(role, r, dtype, tma)[0].kwargs["TMA"]
    KERNELS[role][grid](
        *args,
        **meta,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DK=chunk_width(r, dv),
        BLOCK_DV=dv,
        UNROLL=unrolled(r) and not tma,
        TMA=tma,
    )


def descriptors_allowed(q_layout: int, kv_layout: int) -> bool:
    """Whether a launch may read through TMA descriptors: every tensor has a unit-stride axis
    with 16-byte-aligned rows (see unit_axis), and LLAMA3_KERNEL_TMA is not 0."""
    return TMA_ALLOWED and bool(q_layout and kv_layout)


def _scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    """Global memory for the tensor descriptors kernels build on the GPU (128 bytes a program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Give Triton an allocator for descriptor memory unless the program set one of its own
    (Triton keeps it per thread: autograd's backward runs in a thread of its own)."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (of the active Triton target for ``meta``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if INTERPRETED:
        return 4  # a few splits, enough to exercise the combine step
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(0)["multiprocessor_count"]


def num_key_splits(programs: int, keys: int, block_n: int, sm_count: int) -> int:
    """Split-K factor for decoding: ``programs`` × splits programs, at most two waves of
    ``sm_count``, fill the last wave as closely as possible (ties to fewer splits); each split
    covers at least two key tiles."""
    most = max(1, min(triton.cdiv(keys, 2 * block_n), 64, 2 * sm_count // max(programs, 1)))

    def fill(splits: int) -> float:  # share of the last wave's SMs that have work
        total = programs * splits
        return total / (triton.cdiv(total, sm_count) * sm_count)

    best = 1
    for splits in range(2, most + 1):
        if fill(splits) > fill(best) + 0.02:
            best = splits
    return best


def _dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core precision of the dots; fp32 inputs follow PyTorch's matmul precision.

    "highest" (PyTorch's default) runs 3×TF32 (about fp32's accuracy, three TF32 products),
    "high"/"medium" one TF32 product; LLAMA3_KERNEL_FP32=ieee asks for plain fp32 FMAs (slow to
    compile and run).
    """
    if dtype != torch.float32:
        return "tf32"  # unused: fp16/bf16 dots ignore it
    if FP32_PRECISION:
        return FP32_PRECISION
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _check_width(r: int) -> None:
    if r > MAX_R:
        raise ValueError(
            f"the softplus attention kernels support core widths r ≤ {MAX_R}, got r={r}"
        )


def unit_axis(*tensors: Tensor) -> int:
    """Axis (2 or 1) with stride 1 in all ``tensors``, every other stride a multiple of 8 and the
    data 16-byte aligned: a layout whose loads the kernels may vectorise. 0 if there is none."""
    for axis in (2, 1):
        if all(_aligned_along(t, axis) for t in tensors):
            return axis
    return 0


def _aligned_along(t: Tensor, axis: int) -> bool:
    if t.data_ptr() % 16:
        return False
    for i, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if size == 1:
            continue  # only ever indexed at 0
        if (stride != 1) if i == axis else (stride % 8 != 0):
            return False
    return True


def _kv_len_args(kv_len: Tensor | None, fallback: Tensor) -> tuple[Tensor, int]:
    """Pointer and stride for the kernels' KV_LEN (a never-read placeholder without kv_len)."""
    return (fallback, 0) if kv_len is None else (kv_len, kv_len.stride(0))


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: str,
    kv_len: Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Output (B, S, r) in q's dtype and l (B, S) fp32 = Σ_j softplus(z_ij).

    ``num_splits`` overrides the split-K factor of the decoding path (S ≤ 16)."""
    B, S, r = q.shape
    T = k.shape[2]
    _check_width(r)
    o = q.new_empty(B, S, r)
    l = torch.empty(B, S, device=q.device, dtype=torch.float32)
    if B == 0 or S == 0:
        return o, l
    kv, stride_kvl = _kv_len_args(kv_len, l)
    meta = dict(
        R=r,
        LENGTH_SCALE=scale == "length",
        HAS_KV_LEN=kv_len is not None,
        PRECISION=_dot_precision(q.dtype),
        Q_LAYOUT=unit_axis(q, o),
        KV_LAYOUT=unit_axis(k, v),
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), stride_kvl)
    if S > _DECODE_MAX_S:
        grid = lambda m: (triton.cdiv(S, m["BLOCK_M"]) * triton.cdiv(r, m["BLOCK_DV"]), B, 1)
        args = (
            q,
            k,
            v,
            kv,
            o,
            l,
            o,
            l,
            *strides,
            S,
            T,
            1,
            1.0 / math.sqrt(r),
            triton.next_power_of_2(S),
        )
        _launch("fwd", grid, args, r, q.dtype, **meta, PARTIAL=False)
        return o, l
    _decode_forward(q, k, v, kv, o, l, strides, meta, num_splits)
    return o, l


def _decode_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv: Tensor,
    o: Tensor,
    l: Tensor,
    strides: tuple,
    meta: dict,
    num_splits: int | None,
) -> None:
    """S ≤ 16: one 16-row block per batch row, an accumulator up to 512 wide, keys split across
    programs."""
    B, S, r = q.shape
    T = k.shape[2]
    width = padded_width(r)
    if INTERPRETED:
        block_dv = min(width, 512)
        shape = dict(
            BLOCK_M=16,
            BLOCK_N=16,
            BLOCK_DV=block_dv,
            BLOCK_DK=chunk_width(r, block_dv),
            UNROLL=unrolled(r),
            TMA=False,
        )
        warps, stages = 4, 1
    else:  # the first shape of the table: decoding is not autotuned (CUDA graphs capture it)
        first = _configs("decode", r, q.dtype, tma=False)[0]
        shape, warps, stages = first.kwargs, first.num_warps, first.num_stages
    slices = triton.cdiv(r, shape["BLOCK_DV"])
    splits = num_splits or num_key_splits(B * slices, T, shape["BLOCK_N"], _sm_count(q.device))
    partial = splits > 1
    if partial:
        o_part = torch.empty(splits, B, S, r, device=q.device, dtype=torch.float32)
        l_part = torch.empty(splits, B, S, device=q.device, dtype=torch.float32)
    else:
        o_part, l_part = o, l
    _fwd_kernel[(slices, B, splits)](
        q,
        k,
        v,
        kv,
        o,
        l,
        o_part,
        l_part,
        *strides,
        S,
        T,
        splits,
        1.0 / math.sqrt(r),
        triton.next_power_of_2(S),
        **meta,
        PARTIAL=partial,
        **shape,
        num_warps=warps,
        num_stages=stages,
    )
    if partial:
        _combine_kernel[(S, B)](
            o_part, l_part, o, l, *o.stride(), S, splits, R=r, BLOCK_R=width, num_warps=4
        )


def backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    l: Tensor,
    scale: str,
    kv_len: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (in the layouts and dtypes of q, k, v) given the output gradient dO."""
    B, S, r = q.shape
    T = k.shape[2]
    _check_width(r)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B == 0 or S == 0:
        return dq, dk.zero_(), dv.zero_()
    l = l.contiguous()
    rows = torch.empty(3, B, S, device=q.device, dtype=torch.float32)
    scale_do = do.dtype != torch.float16
    do_scaled = torch.empty(B, S, r, device=q.device, dtype=do.dtype) if scale_do else do
    kv, stride_kvl = _kv_len_args(kv_len, l)
    rows_block = 64 if r <= 512 else 16  # the r loop is unrolled: fewer rows for wide cores
    _bwd_rows_kernel[(triton.cdiv(S, rows_block), B)](
        o,
        do,
        l,
        kv,
        rows,
        do_scaled,
        *o.stride(),
        *do.stride(),
        stride_kvl,
        S,
        T,
        1.0 / math.sqrt(r),
        R=r,
        LENGTH_SCALE=scale == "length",
        HAS_KV_LEN=kv_len is not None,
        SCALE_DO=scale_do,
        Q_LAYOUT=unit_axis(o, do),
        BLOCK_M=rows_block,
        BLOCK_DK=min(padded_width(r), 128),
        num_warps=4,
    )

    meta = dict(
        R=r,
        HAS_KV_LEN=kv_len is not None,
        SCALE_DO=scale_do,
        PRECISION=_dot_precision(q.dtype),
        Q_LAYOUT=unit_axis(q, do_scaled, dq),
        KV_LAYOUT=unit_axis(k, v, dk, dv),
        FAST=not INTERPRETED,
    )
    inputs = (q, k, v, do_scaled, rows, kv)
    in_strides = (*q.stride(), *k.stride(), *v.stride(), *do_scaled.stride())
    tail = (stride_kvl, S, T, triton.next_power_of_2(S))
    slices = lambda m: triton.cdiv(r, m["BLOCK_DV"])
    key_grid = lambda m: (triton.cdiv(T, m["BLOCK_N"]) * slices(m), B)
    fused = not deterministic_backward()
    # the fused launches add dq's terms into an fp32 accumulator (dq itself when it is one)
    dq_acc = dq if dq.dtype == torch.float32 and dq.is_contiguous() else None
    if fused:
        dq_acc = dq_acc.zero_() if dq_acc is not None else q.new_zeros(B, S, r, dtype=torch.float32)
    key_args = (*inputs, dk, dv, dq_acc if fused else dk)
    key_args += (*in_strides, *dk.stride(), *dv.stride(), *tail)
    key = lambda role, **grads: _launch(role, key_grid, key_args, r, q.dtype, **meta, **grads)
    if split_key_gradients(r):
        key("dv", GRAD_K=False, GRAD_V=True, GRAD_Q=False)
        key("dkq" if fused else "dk", GRAD_K=True, GRAD_V=False, GRAD_Q=fused)
    else:
        key("dkdvq" if fused else "dkdv", GRAD_K=True, GRAD_V=True, GRAD_Q=fused)
    if fused:
        if dq_acc is not dq:
            dq.copy_(dq_acc)
        return dq, dk, dv
    _launch(
        "dq",
        lambda m: (triton.cdiv(S, m["BLOCK_M"]) * slices(m), B),
        (*inputs, dq, *in_strides, *dq.stride(), *tail),
        r,
        q.dtype,
        **meta,
    )
    return dq, dk, dv


# the kernels are defined: TRITON_INTERPRET as it was before this module set it
if _INTERPRET_SETTING is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_SETTING
