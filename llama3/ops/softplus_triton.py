"""Softplus attention in Triton: a one-pass forward and a FlashAttention-2 style backward.

Layouts (see :mod:`llama3.ops.reference` for the definition): q (B, S, r); k, v (B, r, T). Batch row
b holds kv_len[b] valid keys (T without a ``kv_len``); its first C_b = kv_len[b] − S are cached
context, so query row i sits at absolute position C_b + i and sees keys j ≤ C_b + i.

Forward. A program owns BLOCK_M query rows and makes one pass over key tiles of BLOCK_N::

    y_ij  = λ_i log2(e) ⟨q_i, k_j⟩               scores in base 2: exp2/log2 are the fast units
    w_ij  = max(y_ij, 0) + log2(1 + 2^−|y_ij|)    = softplus(z_ij) / ln 2, finite for any score
    acc_i += Σ_j w_ij v_j ,   l_i += Σ_j w_ij       fp32; no running maximum, nothing to rescale
    o_i   = acc_i / l_i                           the common 1/ln 2 cancels

and keeps l_i ln 2 = Σ_j softplus(z_ij) per row for the backward pass. Tiles left of the diagonal
skip the causal mask; tiles right of it are never visited. The S×T matrix is never stored.

Width r. Tensor-core dots need power-of-two tiles, so the score product runs over r in chunks of
BLOCK_DK with the tail masked (r = 424: 7 chunks of 64, not 512; unrolled up to r = 512, a loop
beyond), and the output may be split into slices of BLOCK_DV columns, one slice per program, to
keep the fp32 accumulator in registers when r is wide; each slice recomputes the scores, and the
autotuner weighs that against smaller row blocks. When one chunk covers r, the operand that stays
put (q in the forward) is loaded once.

Decoding (S ≤ 16) has one row block per batch row, too few programs to fill the GPU: the key axis
is split across programs (split-K), each writes its unnormalised (acc, l), and a small kernel sums
them. Plain sums suffice because there is no running maximum to reconcile.

Backward, given dO and D_i = ⟨dO_i, o_i⟩ from a pre-pass, with p_ij = w_ij / l_i and
σ_ij = sigmoid(z_ij) = softplus'(z_ij)::

    dv_j = Σ_i p_ij dO_i                                  a program per key tile (and r slice),
    dk_j = Σ_i (λ_i / l_i) (⟨dO_i, v_j⟩ − D_i) σ_ij q_i    over the query tiles that see it
    dq_i = (λ_i / l_i) Σ_j (⟨dO_i, v_j⟩ − D_i) σ_ij k_j    a program per query tile (and r slice)

Every gradient element is written by exactly one program: deterministic, no atomics.

Numerics. All arithmetic is fp32; only the weights w (forward) and the score gradients (backward)
are rounded to the input dtype to feed the tensor cores, as FlashAttention rounds its
probabilities. In fp16 a weight below 6e-8 (z < −16.6) becomes 0 there: a row whose every score is
that low comes out 0 instead of the mean of its values. bf16 and fp32 keep fp32's range.

Strides are arbitrary. When every tensor has a unit-stride axis and its other strides are multiples
of 8, the launcher says so (Q_LAYOUT, KV_LAYOUT) and the kernels pass it on to the compiler, which
can then vectorise loads even when r is not a multiple of 16 (r = 424).

``triton.jit`` fixes a kernel's mode (compiled, or interpreted on the CPU with TRITON_INTERPRET=1)
when the kernel is defined; :func:`_kernels` returns this module's kernels in the mode asked for at
call time, loading a second copy of this file for the other mode if needed.
"""

import functools
import importlib.util
import math
import os
import sys
from types import ModuleType

import torch
import triton
import triton.language as tl
from torch import Tensor

# tl.sum is itself a @triton.jit function, built in the mode Triton was imported in; rebinding its
# Python body gives these kernels one in their own mode (see _kernels).
_sum = triton.jit(tl.sum.fn)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

MAX_R = 4096  # widest core the kernels accept (each r slice recomputes the scores)
_DECODE_MAX_S = 16  # query rows up to which the split-K decoding path runs


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


@triton.jit
def _softplus_log2(y):
    """w = softplus(z) / ln 2 for y = z log2(e), and e = 2^−|y| (reused by the sigmoid)."""
    e = tl.exp2(-tl.abs(y))
    # log2(1 + e): once 1 + e drops e's low bits (e < 2^-6), the Taylor series is the accurate one
    series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - 0.25 * e))) * _LOG2E
    w = tl.maximum(y, 0.0) + tl.where(e < 0.015625, series, tl.log2(1.0 + e))
    return w, e


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
    a_ptrs, a_ok, stride_a_r, b_ptrs, b_ok, stride_b_r,
    R: tl.constexpr, BLOCK_DK: tl.constexpr, PRECISION: tl.constexpr, UNROLL: tl.constexpr,
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


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(
    acc, l, q, q_ptrs, row_ok, k_ptrs, vt_ptrs, keys, pos, lam2, d_ok, col_ok, kv_len,
    stride_qr, stride_kr,
    R: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_DK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Add one key tile (k_ptrs (BLOCK_DK, BLOCK_N), vt_ptrs (BLOCK_N, BLOCK_DV)) to acc and l."""
    if MASKED:
        key_ok = keys < kv_len
    else:  # an all-true constant keeps the loads vectorised
        key_ok = tl.full(keys.shape, 1, tl.int1)
    if BLOCK_DK >= R:
        k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        z = tl.dot(q, k, input_precision=PRECISION)
    else:
        z = _dot_over_r(q_ptrs, row_ok[:, None], stride_qr, k_ptrs, key_ok[None, :], stride_kr,
                        R, BLOCK_DK, PRECISION, UNROLL)
    w, _ = _softplus_log2(z * lam2[:, None])  # (BLOCK_M, BLOCK_N)
    if MASKED:
        w = tl.where(keys[None, :] <= pos[:, None], w, 0.0)
    l += _sum(w, 1)
    vt = tl.load(vt_ptrs, mask=key_ok[:, None] & col_ok[None, :], other=0.0)
    acc = tl.dot(w.to(vt.dtype), vt, acc, input_precision=PRECISION)
    return acc, l


@triton.jit(do_not_specialize=["S", "T"])
def _fwd_kernel(
    Q, K, V, KV_LEN, O, L, O_PART, L_PART,
    stride_qb, stride_qs, stride_qr,
    stride_kb, stride_kr, stride_kt,
    stride_vb, stride_vr, stride_vt,
    stride_ob, stride_os, stride_or,
    stride_kvl,
    S, T, num_splits, inv_sqrt_r, S_BUCKET,
    R: tl.constexpr, LENGTH_SCALE: tl.constexpr, HAS_KV_LEN: tl.constexpr,
    PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
    Q_LAYOUT: tl.constexpr, KV_LAYOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Grid (row blocks × r slices, B, key splits). Writes o and l, or per-split partials."""
    tl.static_assert(BLOCK_DK < R or BLOCK_DV >= R)
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
    lam2 = _row_scale(pos, inv_sqrt_r, LENGTH_SCALE) * _LOG2E
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
        acc, l = _fwd_step(acc, l, q, q_ptrs, row_ok, k_ptrs + n0 * stride_kt,
                           vt_ptrs + n0 * stride_vt, n0 + n, pos, lam2, d_ok, col_ok, kv_len,
                           stride_qr, stride_kr, R, False, PRECISION, BLOCK_DK, UNROLL)
    for n0 in range(mid, hi, BLOCK_N):
        acc, l = _fwd_step(acc, l, q, q_ptrs, row_ok, k_ptrs + n0 * stride_kt,
                           vt_ptrs + n0 * stride_vt, n0 + n, pos, lam2, d_ok, col_ok, kv_len,
                           stride_qr, stride_kr, R, True, PRECISION, BLOCK_DK, UNROLL)

    out_ok = row_ok[:, None] & col_ok[None, :]
    if PARTIAL:  # unnormalised, into (num_splits, B, S, R) and (num_splits, B, S) fp32 buffers
        part = (split * tl.num_programs(1) + b).to(tl.int64) * S + rows
        tl.store(O_PART + part[:, None] * R + cols[None, :], acc, mask=out_ok)
        if r_slice == 0:
            tl.store(L_PART + part, l, mask=row_ok)
    else:
        o_ptrs = (O + b.to(tl.int64) * stride_ob + rows[:, None] * stride_os
                  + cols[None, :] * stride_or)
        tl.store(o_ptrs, (acc / l[:, None]).to(O.dtype.element_ty), mask=out_ok)
        if r_slice == 0:
            tl.store(L + b.to(tl.int64) * S + rows, l * _LN2, mask=row_ok)


@triton.jit(do_not_specialize=["S"])
def _combine_kernel(
    O_PART, L_PART, O, L, stride_ob, stride_os, stride_or, S, num_splits,
    R: tl.constexpr, BLOCK_R: tl.constexpr,
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


@triton.jit(do_not_specialize=["S"])
def _bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_os, stride_or, stride_dob, stride_dos, stride_dor, S,
    R: tl.constexpr, Q_LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """Grid (row blocks, B): D_i = ⟨dO_i, o_i⟩ in fp32, stored (B, S)."""
    stride_ob, stride_os, stride_or = _hinted(stride_ob, stride_os, stride_or, Q_LAYOUT)
    stride_dob, stride_dos, stride_dor = _hinted(stride_dob, stride_dos, stride_dor, Q_LAYOUT)
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    d = tl.arange(0, BLOCK_DK)
    o_ptrs = O + b.to(tl.int64) * stride_ob + rows[:, None] * stride_os + d[None, :] * stride_or
    do_ptrs = DO + b.to(tl.int64) * stride_dob + rows[:, None] * stride_dos + d[None, :] * stride_dor
    delta = tl.full([BLOCK_M], 0.0, tl.float32)
    for d0 in tl.static_range(0, R, BLOCK_DK):
        mask = row_ok[:, None] & (d0 + d < R)[None, :]
        o = tl.load(o_ptrs + d0 * stride_or, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptrs + d0 * stride_dor, mask=mask, other=0.0).to(tl.float32)
        delta += _sum(o * do, 1)
    tl.store(DELTA + b.to(tl.int64) * S + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_step(
    dk, dv, kt, vt, kt_ptrs, vt_ptrs, key_ok, keys, qt_ptrs, dot_ptrs, q_ptrs, do_ptrs,
    l_ptrs, delta_ptrs, rows, first, S, d_ok, col_ok, inv_sqrt_r,
    stride_kr, stride_vr, stride_qr, stride_dor,
    R: tl.constexpr, LENGTH_SCALE: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_DK: tl.constexpr, UNROLL: tl.constexpr,
):
    """Add one query tile (rows) to the key tile's dk and dv; scores are kept transposed."""
    row_ok = rows < S
    pos = first + rows
    lam = _row_scale(pos, inv_sqrt_r, LENGTH_SCALE)
    inv_l = 1.0 / tl.load(l_ptrs, mask=row_ok, other=1.0)
    delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
    out_mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(q_ptrs, mask=out_mask, other=0.0)  # (BLOCK_M, BLOCK_DV)
    do = tl.load(do_ptrs, mask=out_mask, other=0.0)
    if BLOCK_DK >= R:  # the slice is all of r
        zt = tl.dot(kt, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        dpt = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
    else:
        zt = _dot_over_r(kt_ptrs, key_ok[:, None], stride_kr, qt_ptrs, row_ok[None, :], stride_qr,
                         R, BLOCK_DK, PRECISION, UNROLL)
        dpt = _dot_over_r(vt_ptrs, key_ok[:, None], stride_vr, dot_ptrs, row_ok[None, :],
                          stride_dor, R, BLOCK_DK, PRECISION, UNROLL)
    yt = zt * (lam * _LOG2E)[None, :]
    w, e = _softplus_log2(yt)
    sig = tl.where(yt >= 0, 1.0, e) / (1.0 + e)  # sigmoid(z), never overflows
    if MASKED:
        seen = keys[:, None] <= pos[None, :]
        w = tl.where(seen, w, 0.0)
        sig = tl.where(seen, sig, 0.0)
    pt = w * (inv_l * _LN2)[None, :]  # (w / l)ᵀ
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
    dzt = (dpt - delta[None, :]) * sig * (lam * inv_l)[None, :]  # (λ_i dz_ij)ᵀ
    dk = tl.dot(dzt.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["S", "T"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, L, DELTA, KV_LEN, DK, DV,
    stride_qb, stride_qs, stride_qr,
    stride_kb, stride_kr, stride_kt,
    stride_vb, stride_vr, stride_vt,
    stride_dob, stride_dos, stride_dor,
    stride_dkb, stride_dkr, stride_dkt,
    stride_dvb, stride_dvr, stride_dvt,
    stride_kvl,
    S, T, inv_sqrt_r, S_BUCKET,
    R: tl.constexpr, LENGTH_SCALE: tl.constexpr, HAS_KV_LEN: tl.constexpr,
    PRECISION: tl.constexpr, Q_LAYOUT: tl.constexpr, KV_LAYOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Grid (key blocks × r slices, B): dk and dv of one key tile, over the query rows that see it."""
    tl.static_assert(BLOCK_DK < R or BLOCK_DV >= R)
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
    l_ptrs = L + b.to(tl.int64) * S + m
    delta_ptrs = DELTA + b.to(tl.int64) * S + m
    if BLOCK_DK >= R:  # one chunk covers r: keep the key and value tiles
        kv_mask = key_ok[:, None] & d_ok[None, :]
        kt = tl.load(kt_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_DK)
        vt = tl.load(vt_ptrs, mask=kv_mask, other=0.0)
    else:
        kt = None
        vt = None

    # rows from n0 − first on see a key of the tile; rows from m_full on see all of them
    m_lo = (tl.maximum(n0 - first, 0) // BLOCK_M) * BLOCK_M
    m_full = (tl.maximum(n0 + BLOCK_N - 1 - first, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    dk = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
    for m0 in range(m_lo, tl.minimum(m_full, S), BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, kt, vt, kt_ptrs, vt_ptrs, key_ok, keys,
                            qt_ptrs + m0 * stride_qs, dot_ptrs + m0 * stride_dos,
                            q_ptrs + m0 * stride_qs, do_ptrs + m0 * stride_dos, l_ptrs + m0,
                            delta_ptrs + m0, m0 + m, first, S, d_ok, col_ok, inv_sqrt_r,
                            stride_kr, stride_vr, stride_qr, stride_dor,
                            R, LENGTH_SCALE, True, PRECISION, BLOCK_DK, UNROLL)
    for m0 in range(m_full, S, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, kt, vt, kt_ptrs, vt_ptrs, key_ok, keys,
                            qt_ptrs + m0 * stride_qs, dot_ptrs + m0 * stride_dos,
                            q_ptrs + m0 * stride_qs, do_ptrs + m0 * stride_dos, l_ptrs + m0,
                            delta_ptrs + m0, m0 + m, first, S, d_ok, col_ok, inv_sqrt_r,
                            stride_kr, stride_vr, stride_qr, stride_dor,
                            R, LENGTH_SCALE, False, PRECISION, BLOCK_DK, UNROLL)

    out_ok = (keys < T)[:, None] & col_ok[None, :]  # keys past kv_len get zero gradients
    dk_ptrs = (DK + b.to(tl.int64) * stride_dkb + keys[:, None] * stride_dkt
               + cols[None, :] * stride_dkr)
    dv_ptrs = (DV + b.to(tl.int64) * stride_dvb + keys[:, None] * stride_dvt
               + cols[None, :] * stride_dvr)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_step(
    dq, q, do, q_ptrs, do_ptrs, row_ok, k_ptrs, v_ptrs, kt_ptrs, keys, pos, lam2, delta, d_ok,
    col_ok, kv_len, stride_qr, stride_dor, stride_kr, stride_vr,
    R: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_DK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Add one key tile to the row block's Σ_j (dp_ij − D_i) σ_ij k_j."""
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
    else:
        z = _dot_over_r(q_ptrs, row_ok[:, None], stride_qr, k_ptrs, key_ok[None, :], stride_kr,
                        R, BLOCK_DK, PRECISION, UNROLL)
        dp = _dot_over_r(do_ptrs, row_ok[:, None], stride_dor, v_ptrs, key_ok[None, :], stride_vr,
                         R, BLOCK_DK, PRECISION, UNROLL)
        kt = tl.load(kt_ptrs, mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # (N, BLOCK_DV)
    sig = 1.0 / (1.0 + tl.exp2(-z * lam2[:, None]))  # sigmoid(z); softplus itself is not needed
    if MASKED:
        sig = tl.where(keys[None, :] <= pos[:, None], sig, 0.0)
    ds = (dp - delta[:, None]) * sig
    dq = tl.dot(ds.to(kt.dtype), kt, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["S", "T"])
def _bwd_dq_kernel(
    Q, K, V, DO, L, DELTA, KV_LEN, DQ,
    stride_qb, stride_qs, stride_qr,
    stride_kb, stride_kr, stride_kt,
    stride_vb, stride_vr, stride_vt,
    stride_dob, stride_dos, stride_dor,
    stride_dqb, stride_dqs, stride_dqr,
    stride_kvl,
    S, T, inv_sqrt_r, S_BUCKET,
    R: tl.constexpr, LENGTH_SCALE: tl.constexpr, HAS_KV_LEN: tl.constexpr,
    PRECISION: tl.constexpr, Q_LAYOUT: tl.constexpr, KV_LAYOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Grid (row blocks × r slices, B): dq of one query tile, over the keys it sees."""
    tl.static_assert(BLOCK_DK < R or BLOCK_DV >= R)
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
    lam = _row_scale(pos, inv_sqrt_r, LENGTH_SCALE)
    inv_l = 1.0 / tl.load(L + b.to(tl.int64) * S + rows, mask=row_ok, other=1.0)
    delta = tl.load(DELTA + b.to(tl.int64) * S + rows, mask=row_ok, other=0.0)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_DK)
    d_ok = d < R
    cols = r_slice * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < R
    k_b = K + b.to(tl.int64) * stride_kb
    v_b = V + b.to(tl.int64) * stride_vb
    q_ptrs = Q + b.to(tl.int64) * stride_qb + rows[:, None] * stride_qs + d[None, :] * stride_qr
    do_ptrs = DO + b.to(tl.int64) * stride_dob + rows[:, None] * stride_dos + d[None, :] * stride_dor
    k_ptrs = k_b + d[:, None] * stride_kr + n[None, :] * stride_kt  # (BLOCK_DK, BLOCK_N), keys 0..
    v_ptrs = v_b + d[:, None] * stride_vr + n[None, :] * stride_vt
    kt_ptrs = k_b + n[:, None] * stride_kt + cols[None, :] * stride_kr  # (BLOCK_N, BLOCK_DV)
    if BLOCK_DK >= R:  # one chunk covers r: keep the query and output-gradient tiles
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        q = None
        do = None

    end = tl.minimum(first + m0 + BLOCK_M, kv_len)
    full = (tl.maximum(first + m0 + 1, 0) // BLOCK_N) * BLOCK_N
    lam2 = lam * _LOG2E
    dq = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    for n0 in range(0, full, BLOCK_N):
        dq = _dq_step(dq, q, do, q_ptrs, do_ptrs, row_ok, k_ptrs + n0 * stride_kt,
                      v_ptrs + n0 * stride_vt, kt_ptrs + n0 * stride_kt, n0 + n, pos, lam2, delta,
                      d_ok, col_ok, kv_len, stride_qr, stride_dor, stride_kr, stride_vr,
                      R, False, PRECISION, BLOCK_DK, UNROLL)
    for n0 in range(full, end, BLOCK_N):
        dq = _dq_step(dq, q, do, q_ptrs, do_ptrs, row_ok, k_ptrs + n0 * stride_kt,
                      v_ptrs + n0 * stride_vt, kt_ptrs + n0 * stride_kt, n0 + n, pos, lam2, delta,
                      d_ok, col_ok, kv_len, stride_qr, stride_dor, stride_kr, stride_vr,
                      R, True, PRECISION, BLOCK_DK, UNROLL)
    dq = dq * (lam * inv_l)[:, None]

    dq_ptrs = (DQ + b.to(tl.int64) * stride_dqb + rows[:, None] * stride_dqs
               + cols[None, :] * stride_dqr)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers: block shapes, autotuning, mode selection
# ---------------------------------------------------------------------------------------------
#
# Shapes are (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps, num_stages[, ROLLED]) per padded width:
# starting points for the autotuner (keyed on r, the power of two above S and the layouts), not
# measured optima. The r-chunk loop is unrolled up to r = 512 unless a shape says ROLLED; rolled
# it needs far less shared memory and fewer registers, unrolled it exposes more overlap; which
# wins is the autotuner's call. Every shape here compiles for sm_90 within its shared memory.
ROLLED = "rolled"
_FWD_SHAPES = {
    64: [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3)],
    128: [(128, 64, 128, 8, 3), (128, 128, 128, 8, 2), (64, 64, 128, 4, 3)],
    256: [(128, 64, 256, 8, 2), (64, 64, 256, 8, 2), (128, 64, 128, 8, 2)],
    512: [(64, 32, 512, 8, 2), (64, 32, 512, 8, 3), (64, 32, 256, 8, 2),
          (128, 32, 256, 8, 2, ROLLED)],
    1024: [(64, 32, 256, 8, 2), (64, 32, 128, 8, 2), (128, 32, 256, 8, 2)],
}
# dk/dv: BLOCK_N keys stay, BLOCK_M query rows stream past; two BLOCK_N × BLOCK_DV accumulators
_DKDV_SHAPES = {
    64: [(64, 128, 64, 8, 3), (64, 64, 64, 4, 3), (32, 64, 64, 4, 3)],
    128: [(32, 128, 128, 8, 3), (64, 64, 128, 8, 2), (32, 64, 128, 4, 3)],
    256: [(32, 64, 128, 4, 1), (16, 64, 256, 8, 2), (64, 64, 128, 8, 2, ROLLED)],
    512: [(32, 64, 128, 4, 1), (16, 64, 256, 8, 2), (64, 64, 128, 8, 2, ROLLED),
          (16, 64, 256, 8, 2, ROLLED)],
    1024: [(64, 64, 128, 8, 2), (16, 64, 256, 8, 2), (32, 64, 128, 4, 1)],
}
_DQ_SHAPES = {
    64: [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 32, 64, 4, 3)],
    128: [(128, 64, 128, 8, 2), (64, 64, 128, 4, 3), (128, 32, 128, 8, 3)],
    256: [(64, 32, 256, 8, 2), (128, 64, 128, 8, 2), (64, 64, 256, 8, 2)],
    512: [(64, 32, 256, 8, 2), (64, 32, 128, 8, 2), (64, 32, 512, 8, 1),
          (64, 32, 256, 8, 2, ROLLED)],
    1024: [(64, 32, 256, 8, 2), (64, 32, 128, 8, 2), (64, 32, 128, 4, 2)],
}
_SHAPES = {
    "_fwd_kernel": _FWD_SHAPES, "_bwd_dkdv_kernel": _DKDV_SHAPES, "_bwd_dq_kernel": _DQ_SHAPES,
}
# The interpreter runs one small shape (no autotuning): diagonals cross tiles and r is sliced.
_INTERPRETER_SHAPES = {
    "_fwd_kernel": (64, 32, 128), "_bwd_dkdv_kernel": (32, 64, 128),
    "_bwd_dq_kernel": (64, 32, 128),
}


def padded_width(r: int) -> int:
    """Smallest power of two ≥ r (and ≥ 16, the smallest tensor-core tile)."""
    return max(16, triton.next_power_of_2(r))


def chunk_width(r: int) -> int:
    """BLOCK_DK: the whole padded width up to 128, else chunks of 128 or, if r is not a multiple
    of 128, 64 (r = 424 → 7 × 64 = 448 columns of work, not 512)."""
    width = padded_width(r)
    if width <= 128:
        return width
    return 128 if r % 128 == 0 else 64


def unrolled(r: int) -> bool:
    """Whether the r-chunk loop is unrolled by default (see the shape tables)."""
    return r <= 512


def _configs(name: str, r: int) -> list[triton.Config]:
    width = padded_width(r)
    configs = []
    for m, n, dv, warps, stages, *rolled in _SHAPES[name][min(max(width, 64), 1024)]:
        meta = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_DK=chunk_width(r), BLOCK_DV=min(dv, width),
                    UNROLL=unrolled(r) and not rolled)
        configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return configs


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_DEFINED_INTERPRETED = _interpret_requested()


@functools.cache
def _kernels(interpret: bool) -> ModuleType:
    """This module's kernels compiled for the GPU, or interpreted in Python on the CPU."""
    if interpret == _DEFINED_INTERPRETED:
        return sys.modules[__name__]
    name = f"{__name__}_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, __file__)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


@functools.cache
def _autotuned(name: str, r: int):
    """Kernel ``name`` wrapped in an autotuner over the shapes for width r."""
    kernel = getattr(_kernels(False), name)
    key = ["R", "S_BUCKET", "Q_LAYOUT", "KV_LAYOUT"]
    return triton.autotune(configs=_configs(name, r), key=key)(kernel)


def _launch(name: str, grid, args: tuple, r: int, interpret: bool, **meta) -> None:
    """Run kernel ``name``: autotuned on the GPU, with the one interpreter shape on the CPU."""
    if not interpret:
        _autotuned(name, r)[grid](*args, **meta)
        return
    block_m, block_n, block_dv = _INTERPRETER_SHAPES[name]
    dv = padded_width(r) if chunk_width(r) >= r else min(block_dv, padded_width(r))
    getattr(_kernels(True), name)[grid](
        *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=chunk_width(r), BLOCK_DV=dv,
        UNROLL=unrolled(r))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, enough to exercise the combine step


def num_key_splits(batch: int, keys: int, block_n: int, device: torch.device) -> int:
    """Split-K factor for decoding: about two programs per SM, at least two key tiles each."""
    wanted = triton.cdiv(2 * _sm_count(device), batch)
    return max(1, min(wanted, triton.cdiv(keys, 2 * block_n), 64))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 tensor cores only where PyTorch's matmuls may."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _check_width(r: int) -> None:
    if r > MAX_R:
        raise ValueError(
            f"the softplus attention kernels support core widths r ≤ {MAX_R}, got r={r}")


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
    q: Tensor, k: Tensor, v: Tensor, scale: str, kv_len: Tensor | None = None,
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
    interpret = q.device.type == "cpu"
    kv, stride_kvl = _kv_len_args(kv_len, l)
    meta = dict(R=r, LENGTH_SCALE=scale == "length", HAS_KV_LEN=kv_len is not None,
                PRECISION=_dot_precision(q.dtype), Q_LAYOUT=unit_axis(q, o),
                KV_LAYOUT=unit_axis(k, v))
    strides = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), stride_kvl)
    if S > _DECODE_MAX_S:
        grid = lambda m: (triton.cdiv(S, m["BLOCK_M"]) * triton.cdiv(r, m["BLOCK_DV"]), B, 1)
        args = (q, k, v, kv, o, l, o, l, *strides, S, T, 1, 1.0 / math.sqrt(r),
                triton.next_power_of_2(S))
        _launch("_fwd_kernel", grid, args, r, interpret, **meta, PARTIAL=False)
        return o, l
    _decode_forward(q, k, v, kv, o, l, strides, meta, num_splits, interpret)
    return o, l


def _decode_forward(
    q: Tensor, k: Tensor, v: Tensor, kv: Tensor, o: Tensor, l: Tensor, strides: tuple,
    meta: dict, num_splits: int | None, interpret: bool,
) -> None:
    """S ≤ 16: one 16-row block per batch row, an accumulator up to 512 wide, keys split across
    programs."""
    B, S, r = q.shape
    T = k.shape[2]
    width = padded_width(r)
    block_dv = min(width, 512)
    block_n = 16 if interpret else (64 if width <= 256 else 32)
    splits = num_splits or num_key_splits(B, T, block_n, q.device)
    partial = splits > 1
    if partial:
        o_part = torch.empty(splits, B, S, r, device=q.device, dtype=torch.float32)
        l_part = torch.empty(splits, B, S, device=q.device, dtype=torch.float32)
    else:
        o_part, l_part = o, l
    kernels = _kernels(interpret)
    kernels._fwd_kernel[(triton.cdiv(r, block_dv), B, splits)](
        q, k, v, kv, o, l, o_part, l_part, *strides, S, T, splits, 1.0 / math.sqrt(r),
        triton.next_power_of_2(S), **meta, PARTIAL=partial,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_DK=chunk_width(r), BLOCK_DV=block_dv,
        UNROLL=unrolled(r), num_warps=4, num_stages=3)
    if partial:
        kernels._combine_kernel[(S, B)](o_part, l_part, o, l, *o.stride(), S, splits, R=r,
                                         BLOCK_R=width, num_warps=4)


def backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, l: Tensor, scale: str,
    kv_len: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (in the layouts and dtypes of q, k, v) given the output gradient dO."""
    B, S, r = q.shape
    T = k.shape[2]
    _check_width(r)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B == 0 or S == 0:
        return dq, dk.zero_(), dv.zero_()
    interpret = q.device.type == "cpu"
    l = l.contiguous()
    delta = torch.empty(B, S, device=q.device, dtype=torch.float32)
    kernels = _kernels(interpret)
    q_layout = unit_axis(q, o, do, dq)
    kernels._bwd_delta_kernel[(triton.cdiv(S, 64), B)](
        o, do, delta, *o.stride(), *do.stride(), S, R=r, Q_LAYOUT=q_layout, BLOCK_M=64,
        BLOCK_DK=min(padded_width(r), 128), num_warps=4)

    kv, stride_kvl = _kv_len_args(kv_len, l)
    meta = dict(R=r, LENGTH_SCALE=scale == "length", HAS_KV_LEN=kv_len is not None,
                PRECISION=_dot_precision(q.dtype), Q_LAYOUT=q_layout,
                KV_LAYOUT=unit_axis(k, v, dk, dv))
    inputs = (q, k, v, do, l, delta, kv)
    in_strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    tail = (stride_kvl, S, T, 1.0 / math.sqrt(r), triton.next_power_of_2(S))
    slices = lambda m: triton.cdiv(r, m["BLOCK_DV"])
    dkdv_args = (*inputs, dk, dv, *in_strides, *dk.stride(), *dv.stride(), *tail)
    _launch("_bwd_dkdv_kernel", lambda m: (triton.cdiv(T, m["BLOCK_N"]) * slices(m), B),
            dkdv_args, r, interpret, **meta)
    _launch("_bwd_dq_kernel", lambda m: (triton.cdiv(S, m["BLOCK_M"]) * slices(m), B),
            (*inputs, dq, *in_strides, *dq.stride(), *tail), r, interpret, **meta)
    return dq, dk, dv
