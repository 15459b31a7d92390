"""Softplus attention's Triton kernels: a one-pass forward and a FlashAttention-2 style backward.

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
tables say so (r > 256: chunks of 256, the tail zero-filled) and the layouts allow, the chunks
are copied by Hopper's TMA unit through tensor descriptors: a rolled loop with neither addresses
nor masks per thread.

Decoding (S ≤ 16) has one row block per batch row, too few programs to fill the GPU: the key axis
is split across programs (split-K, as many splits as fill whole waves of the GPU), each writes its
unnormalised (acc, l), and a small kernel sums them. Plain sums suffice: there is no running
maximum to reconcile.

Backward. A pre-pass computes, once per query row, D_i = ⟨dO_i, o_i⟩, y_i = λ_i log2(e) and
c_i = ln 2 / l_i, and (except in fp16) dO_i scaled by c_i; with p_ij = c_i w_ij and
σ_ij = sigmoid(z_ij) = 2^(y_ij − w_ij) (from the weight already computed: no division)::

    dv_j = Σ_i p_ij dO_i
    dk_j = Σ_i λ_i c_i (⟨dO_i, v_j⟩ − D_i) σ_ij q_i / ln 2
    dq_i = λ_i c_i Σ_j (⟨dO_i, v_j⟩ − D_i) σ_ij k_j / ln 2

The fused backward (the default) makes one pass over each (key tile, query tile) and computes the
scores and dP once for dk, dv and dq: a program owns a key tile (and r slice), accumulates its dk
and dv over the query tiles that see it, and adds each query tile's terms of dq into an fp32
accumulator with atomic adds (FlashAttention-2's scheme; the order of the adds, hence the last
bits of dq, varies from run to run). Up to r = 128 one launch computes all three; wider cores take
a dV launch and a dK + dQ launch (two fp32 accumulators of r columns do not fit in registers).

The deterministic backward (on request) writes every gradient element from exactly one program:
dK/dV (one launch up to r = 128, one per gradient above), then dQ per query tile, which recomputes
the scores and dP. Where the weight is not needed (dK alone, dQ) the sigmoid is 1 / (1 + 2^−y)
with the hardware's approximate reciprocal.

Numerics. All arithmetic is fp32; only the weights w (forward) and the score gradients (backward)
are rounded to the input dtype to feed the tensor cores, as FlashAttention rounds its
probabilities. In fp16 a weight below 6e-8 (z < −16.6) becomes 0 there: a row whose every score is
that low comes out 0 instead of the mean of its values. bf16 and fp32 keep fp32's range. fp32
inputs follow PyTorch's matmul precision (see softplus_triton._dot_precision).

Strides are arbitrary. When every tensor has a unit-stride axis and its other strides are multiples
of 8, the launcher says so (Q_LAYOUT, KV_LAYOUT) and the kernels pass it on to the compiler, which
can then vectorise loads even when r is not a multiple of 16 (r = 424).

benchmarks/kernel_static.py reads this module's compiled Hopper code (registers, spills, shared
memory, instructions per pair) on any machine; the shape tables of :mod:`llama3.ops.softplus_triton`
follow its report.
"""

import os

import triton
import triton.language as tl


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
# end): interpreted or compiled for the GPU.
INTERPRETED = _interpreted()
_INTERPRET_SETTING = os.environ.get("TRITON_INTERPRET")
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"

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
def _hinted(strides, UNIT: tl.constexpr):
    """Strides of a 3-d tensor (a tuple of three), told to the compiler.

    UNIT = 1 or 2: the launcher checked that this axis has stride 1 and the others are multiples
    of 8 (16-byte aligned rows), so loads can be vectorised; Triton itself only detects multiples
    of 16, which r = 424 is not. UNIT = 0: the strides as given.
    """
    stride_b, stride_1, stride_2 = strides
    one = tl.full([], 1, tl.int32)
    if UNIT == 1:
        stride_b, stride_1, stride_2 = stride_b // 8 * 8, one, stride_2 // 8 * 8
    elif UNIT == 2:
        stride_b, stride_1, stride_2 = stride_b // 8 * 8, stride_1 // 8 * 8, one
    return stride_b, stride_1, stride_2


@triton.jit
def _tile_ptrs(base, b, stride_b, rows, stride_rows, cols, stride_cols):
    """Pointers (len(rows), len(cols)) at elements [b, rows, cols] of a 3-d tensor, by its strides
    along the batch, the rows' axis and the columns' axis."""
    return (
        base + b.to(tl.int64) * stride_b + rows[:, None] * stride_rows + cols[None, :] * stride_cols
    )


@triton.jit
def _query_tile(
    KV_LEN,
    stride_kvl,
    S,
    T,
    HAS_KV_LEN: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """A query-tile program's place (grid: row blocks × r slices, B): batch row b, r slice,
    valid keys kv_len, absolute position of query row 0 (first), first row m0, and the rows and r
    columns (cols) of its tile. Tiles go longest causal rows first."""
    NUM_SLICES: tl.constexpr = (R + BLOCK_DV - 1) // BLOCK_DV
    pid = tl.program_id(0)
    m_block = (S + BLOCK_M - 1) // BLOCK_M - 1 - pid // NUM_SLICES
    b = tl.program_id(1)
    kv_len = _valid_keys(KV_LEN, stride_kvl, b, T, HAS_KV_LEN)
    m0 = m_block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    r_slice = pid % NUM_SLICES
    cols = r_slice * BLOCK_DV + tl.arange(0, BLOCK_DV)
    return b, r_slice, kv_len, kv_len - S, m0, rows, cols


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
def _over_r(
    a,
    b,
    a_ptrs,
    a_ok,
    stride_a_r,
    b_ptrs,
    b_ok,
    stride_b_r,
    descs,
    A: tl.constexpr,
    B: tl.constexpr,
    a_row0,
    b_row0,
    batch,
    R: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    PRECISION: tl.constexpr,
    UNROLL: tl.constexpr,
    TMA: tl.constexpr,
    A_R_UNIT: tl.constexpr,
    B_R_UNIT: tl.constexpr,
):
    """Σ_{d<R} a[i, d] b[d, j] (M, N) in fp32, whichever way r is read: the tiles a (M, R) and
    b (R, N) whole when one chunk covers r; else chunks of BLOCK_DK, copied by the TMA unit
    (descs[A] at rows a_row0.., descs[B] at rows b_row0.. of batch row ``batch``) or loaded
    through pointers (a_ptrs (M, BLOCK_DK) and b_ptrs (BLOCK_DK, N) at the first chunk; a_ok
    (M, 1) and b_ok (1, N) say which rows of a and columns of b exist)."""
    if BLOCK_DK >= R:
        acc = tl.dot(a, b, input_precision=PRECISION)
    elif TMA:
        acc = _dot_over_r_tma(
            descs[A],
            a_row0,
            descs[B],
            b_row0,
            batch,
            a_ptrs.shape[0],
            b_ptrs.shape[1],
            R,
            BLOCK_DK,
            A_R_UNIT,
            B_R_UNIT,
            PRECISION,
        )
    else:
        acc = _dot_over_r(
            a_ptrs, a_ok, stride_a_r, b_ptrs, b_ok, stride_b_r, R, BLOCK_DK, PRECISION, UNROLL
        )
    return acc


@triton.jit
def _descriptors(
    Q,
    K,
    V,
    DO,
    q_strides,
    k_strides,
    v_strides,
    do_strides,
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
    stride_qb, stride_qs, stride_qr = q_strides
    stride_kb, stride_kr, stride_kt = k_strides
    stride_vb, stride_vr, stride_vt = v_strides
    stride_dob, stride_dos, stride_dor = do_strides
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
    else:
        k = None
    z = _over_r(
        q,
        k,
        q_ptrs,
        row_ok[:, None],
        stride_qr,
        k_ptrs,
        key_ok[None, :],
        stride_kr,
        descs,
        2,
        0,
        m0,
        n0,
        b,
        R,
        BLOCK_DK,
        PRECISION,
        UNROLL,
        TMA,
        Q_LAYOUT == 2,
        KV_LAYOUT == 1,
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
    q_strides,
    k_strides,
    v_strides,
    o_strides,
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
    stride_qb, stride_qs, stride_qr = _hinted(q_strides, Q_LAYOUT)
    stride_ob, stride_os, stride_or = _hinted(o_strides, Q_LAYOUT)
    stride_kb, stride_kr, stride_kt = _hinted(k_strides, KV_LAYOUT)
    stride_vb, stride_vr, stride_vt = _hinted(v_strides, KV_LAYOUT)
    b, r_slice, kv_len, first, m0, rows, cols = _query_tile(
        KV_LEN, stride_kvl, S, T, HAS_KV_LEN, R, BLOCK_M, BLOCK_DV
    )
    split = tl.program_id(2)
    row_ok = rows < S
    pos = first + rows
    lam2 = _row_scale(pos, inv_sqrt_r, LENGTH_SCALE) * _LOG2E  # once per row
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_DK)
    d_ok = d < R
    col_ok = cols < R
    q_ptrs = _tile_ptrs(Q, b, stride_qb, rows, stride_qs, d, stride_qr)
    k_ptrs = _tile_ptrs(K, b, stride_kb, d, stride_kr, n, stride_kt)
    vt_ptrs = _tile_ptrs(V, b, stride_vb, n, stride_vt, cols, stride_vr)
    if BLOCK_DK >= R:  # one chunk covers r: keep the query tile for the whole pass
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        q = None
    descs = _descriptors(
        Q,
        K,
        None,
        None,
        (stride_qb, stride_qs, stride_qr),
        (stride_kb, stride_kr, stride_kt),
        (0, 0, 0),
        (0, 0, 0),
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
    for phase in tl.static_range(2):  # tiles every row sees whole, then the diagonal's
        if phase == 0:
            start, stop = lo, mid
        else:
            start, stop = mid, hi
        for n0 in range(start, stop, BLOCK_N):
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
                phase == 1,
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
        o_ptrs = _tile_ptrs(O, b, stride_ob, rows, stride_os, cols, stride_or)
        tl.store(o_ptrs, (acc / l[:, None]).to(O.dtype.element_ty), mask=out_ok)
        if r_slice == 0:
            tl.store(L + b.to(tl.int64) * S + rows, l * _LN2, mask=row_ok)


@triton.jit(do_not_specialize=["S"])
def _combine_kernel(
    O_PART,
    L_PART,
    O,
    L,
    o_strides,
    S,
    num_splits,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (S, B): o = Σ_splits acc / Σ_splits l for one query row."""
    stride_ob, stride_os, stride_or = o_strides
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
    o_strides,
    do_strides,
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
    stride_ob, stride_os, stride_or = _hinted(o_strides, Q_LAYOUT)
    stride_dob, stride_dos, stride_dor = _hinted(do_strides, Q_LAYOUT)
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    d = tl.arange(0, BLOCK_DK)
    o_ptrs = _tile_ptrs(O, b, stride_ob, rows, stride_os, d, stride_or)
    do_ptrs = _tile_ptrs(DO, b, stride_dob, rows, stride_dos, d, stride_dor)
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
    zt = _over_r(
        kt,
        tl.trans(q),
        kt_ptrs,
        key_ok[:, None],
        stride_kr,
        qt_ptrs,
        row_ok[None, :],
        stride_qr,
        descs,
        0,
        2,
        n0,
        m0,
        b,
        R,
        BLOCK_DK,
        PRECISION,
        UNROLL,
        TMA,
        KV_LAYOUT == 1,
        Q_LAYOUT == 2,
    )  # (BLOCK_N, BLOCK_M)
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
        dpt = _over_r(
            vt,
            tl.trans(do),
            vt_ptrs,
            key_ok[:, None],
            stride_vr,
            dot_ptrs,
            row_ok[None, :],
            stride_dor,
            descs,
            1,
            3,
            n0,
            m0,
            b,
            R,
            BLOCK_DK,
            PRECISION,
            UNROLL,
            TMA,
            KV_LAYOUT == 1,
            Q_LAYOUT == 2,
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
    part, or for 256 columns two and past 256 four, so that one fp32 product of at most 128
    columns is live at a time (dk's accumulator holds most registers: r = 424 in one part of 512
    spills)."""
    if BLOCK_DV > 256:
        c = first + tl.arange(0, BLOCK_DV // 4)
        cols = (c, c + BLOCK_DV // 4, c + BLOCK_DV // 2, c + 3 * (BLOCK_DV // 4))
        tiles = (
            _key_columns(k_ptrs, stride_kr, cols[0], key_ok, R),
            _key_columns(k_ptrs, stride_kr, cols[1], key_ok, R),
            _key_columns(k_ptrs, stride_kr, cols[2], key_ok, R),
            _key_columns(k_ptrs, stride_kr, cols[3], key_ok, R),
        )
    elif BLOCK_DV == 256:
        c = first + tl.arange(0, 128)
        cols = (c, c + 128)
        tiles = (
            _key_columns(k_ptrs, stride_kr, cols[0], key_ok, R),
            _key_columns(k_ptrs, stride_kr, cols[1], key_ok, R),
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
    q_strides,
    k_strides,
    v_strides,
    do_strides,
    dk_strides,
    dv_strides,
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
    stride_qb, stride_qs, stride_qr = _hinted(q_strides, Q_LAYOUT)
    stride_dob, stride_dos, stride_dor = _hinted(do_strides, Q_LAYOUT)
    stride_kb, stride_kr, stride_kt = _hinted(k_strides, KV_LAYOUT)
    stride_vb, stride_vr, stride_vt = _hinted(v_strides, KV_LAYOUT)
    stride_dkb, stride_dkr, stride_dkt = _hinted(dk_strides, KV_LAYOUT)
    stride_dvb, stride_dvr, stride_dvt = _hinted(dv_strides, KV_LAYOUT)
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
    kt_ptrs = _tile_ptrs(K, b, stride_kb, keys, stride_kt, d, stride_kr)
    vt_ptrs = _tile_ptrs(V, b, stride_vb, keys, stride_vt, d, stride_vr)
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
        (stride_qb, stride_qs, stride_qr),
        (stride_kb, stride_kr, stride_kt),
        (stride_vb, stride_vr, stride_vt),
        (stride_dob, stride_dos, stride_dor),
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
    dk_ptrs = _tile_ptrs(DK, b, stride_dkb, keys, stride_dkt, cols, stride_dkr)
    dv_ptrs = _tile_ptrs(DV, b, stride_dvb, keys, stride_dvt, cols, stride_dvr)
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
    else:
        k = None
        v = None
    z = _over_r(
        q,
        k,
        q_ptrs,
        row_ok[:, None],
        stride_qr,
        k_ptrs,
        key_ok[None, :],
        stride_kr,
        descs,
        2,
        0,
        m0,
        n0,
        b,
        R,
        BLOCK_DK,
        PRECISION,
        UNROLL,
        TMA,
        Q_LAYOUT == 2,
        KV_LAYOUT == 1,
    )
    dp = _over_r(
        do,
        v,
        do_ptrs,
        row_ok[:, None],
        stride_dor,
        v_ptrs,
        key_ok[None, :],
        stride_vr,
        descs,
        3,
        1,
        m0,
        n0,
        b,
        R,
        BLOCK_DK,
        PRECISION,
        UNROLL,
        TMA,
        Q_LAYOUT == 2,
        KV_LAYOUT == 1,
    )
    if BLOCK_DK >= R:
        kt = tl.trans(k)
    else:  # loaded after the products, as they are (fewer live registers)
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
    q_strides,
    k_strides,
    v_strides,
    do_strides,
    dq_strides,
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
    stride_qb, stride_qs, stride_qr = _hinted(q_strides, Q_LAYOUT)
    stride_dob, stride_dos, stride_dor = _hinted(do_strides, Q_LAYOUT)
    stride_dqb, stride_dqs, stride_dqr = _hinted(dq_strides, Q_LAYOUT)
    stride_kb, stride_kr, stride_kt = _hinted(k_strides, KV_LAYOUT)
    stride_vb, stride_vr, stride_vt = _hinted(v_strides, KV_LAYOUT)
    b, _, kv_len, first, m0, rows, cols = _query_tile(
        KV_LEN, stride_kvl, S, T, HAS_KV_LEN, R, BLOCK_M, BLOCK_DV
    )
    row_ok = rows < S
    pos = first + rows
    c_y, c_dp, c_sh, _ = _load_rows(
        ROWS + b.to(tl.int64) * S + rows, tl.num_programs(1).to(tl.int64) * S, row_ok, SCALE_DO
    )
    neg_c_y = -c_y
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_DK)
    d_ok = d < R
    col_ok = cols < R
    q_ptrs = _tile_ptrs(Q, b, stride_qb, rows, stride_qs, d, stride_qr)
    do_ptrs = _tile_ptrs(DO, b, stride_dob, rows, stride_dos, d, stride_dor)
    k_ptrs = _tile_ptrs(K, b, stride_kb, d, stride_kr, n, stride_kt)  # (BLOCK_DK, BLOCK_N)
    v_ptrs = _tile_ptrs(V, b, stride_vb, d, stride_vr, n, stride_vt)
    kt_ptrs = _tile_ptrs(K, b, stride_kb, n, stride_kt, cols, stride_kr)  # (BLOCK_N, BLOCK_DV)
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
        (stride_qb, stride_qs, stride_qr),
        (stride_kb, stride_kr, stride_kt),
        (stride_vb, stride_vr, stride_vt),
        (stride_dob, stride_dos, stride_dor),
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
    for phase in tl.static_range(2):  # key tiles every row sees whole, then the diagonal's
        if phase == 0:
            start, stop = 0, full
        else:
            start, stop = full, end
        for n0 in range(start, stop, BLOCK_N):
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
                phase == 1,
                PRECISION,
                BLOCK_DK,
                UNROLL,
                FAST,
                TMA,
                Q_LAYOUT,
                KV_LAYOUT,
            )

    dq_ptrs = _tile_ptrs(DQ, b, stride_dqb, rows, stride_dqs, cols, stride_dqr)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# the kernels are defined: TRITON_INTERPRET as it was before this module set it
if _INTERPRET_SETTING is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_SETTING
