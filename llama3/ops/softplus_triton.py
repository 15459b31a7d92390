"""Softplus attention's Triton launchers: block shapes, autotuning, descriptor memory, split-K
decoding, and the ``forward`` and ``backward`` the custom op calls.

The kernels themselves, and the math they compute, are in :mod:`llama3.ops.softplus_kernels`
(one file, so that the interpreter switch surrounds every kernel definition).

Settings, read once when this module is imported: LLAMA3_KERNEL_AUTOTUNE=0 skips autotuning (each
kernel runs the first shape of its table, so a first call compiles one configuration);
LLAMA3_KERNEL_FP32=ieee|tf32x3|tf32 fixes the precision of fp32 inputs' dots (see _dot_precision);
LLAMA3_KERNEL_TMA=0 keeps every launch on pointer loads (no TMA descriptors);
LLAMA3_KERNEL_DETERMINISTIC=1 runs the deterministic backward (see deterministic_backward).
"""

import dataclasses
import functools
import math
import os

import torch
import triton
from torch import Tensor

from llama3.ops.softplus_kernels import (
    INTERPRETED,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _bwd_rows_kernel,
    _combine_kernel,
    _fwd_kernel,
)

AUTOTUNE = os.environ.get("LLAMA3_KERNEL_AUTOTUNE", "1") != "0"
TMA_ALLOWED = os.environ.get("LLAMA3_KERNEL_TMA", "1") != "0"
DETERMINISTIC = os.environ.get("LLAMA3_KERNEL_DETERMINISTIC", "0") not in ("0", "")
FP32_PRECISION = os.environ.get("LLAMA3_KERNEL_FP32") or None
if FP32_PRECISION not in (None, "ieee", "tf32x3", "tf32"):
    raise ValueError(f"LLAMA3_KERNEL_FP32 must be ieee, tf32x3 or tf32, got {FP32_PRECISION!r}")

MAX_R = 4096  # widest core the kernels accept (each r slice recomputes the scores)
_DECODE_MAX_S = 16  # query rows up to which the split-K decoding path runs

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
        ("16", 512): [
            Shape(128, 64, 256, 8, 2, tma=True, chunk=256),
            Shape(128, 32, 256, 8, 2),
        ],
        ("16", 1024): [
            Shape(128, 64, 256, 8, 2, tma=True, chunk=256),
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
            Shape(32, 64, 512, 8, 2, tma=True, chunk=256),
            Shape(32, 128, 256, 8, 2, chunk=64),
        ],
        ("16", 1024): [
            Shape(32, 64, 512, 8, 2, tma=True, chunk=256),
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
    # 4r / 64 bytes per pair, 26.5 at r = 424 (see benchmarks/NOTES.md). TMA chunks of 256 issue
    # half the loop overhead of chunks of 128 (dK/dQ at r = 424: 125 instructions per pair, 162)
    "dkq": {
        ("16", 256): [Shape(16, 128, 256, 8, 2), Shape(16, 128, 256, 8, 3)],
        ("16", 424): [  # two slices of 256 over 128 keys spill here
            Shape(32, 64, 512, 8, 2, tma=True, chunk=256),
            Shape(16, 64, 512, 8, 2, rolled=True, chunk=64),
        ],
        # or two slices of 256 over 128 keys: the scores and dP twice, half the atomic traffic
        # (which of the two wins depends on the L2's reduction rate; chunks of 256 need 241 KB)
        ("16", 512): [
            Shape(32, 64, 512, 8, 2, tma=True, chunk=256),
            Shape(32, 128, 256, 8, 2, tma=True, chunk=128),
            Shape(16, 64, 512, 8, 2, rolled=True, chunk=64),
        ],
        ("16", 1024): [
            Shape(32, 64, 512, 8, 2, tma=True, chunk=256),
            Shape(16, 64, 512, 8, 2, rolled=True, chunk=64),
        ],
        ("32", 256): [Shape(32, 64, 64, 4, 2)],
        ("32", 512): [Shape(32, 64, 64, 4, 2)],
        ("32", 1024): [Shape(32, 64, 64, 4, 2, rolled=True)],
    },
    "dk": {
        ("16", 256): [Shape(32, 128, 256, 8, 2)],
        ("16", 512): [
            Shape(32, 128, 256, 8, 2, tma=True, chunk=256),
            Shape(16, 128, 256, 8, 2, rolled=True, chunk=64),
        ],
        ("16", 1024): [
            Shape(32, 128, 256, 8, 2, tma=True, chunk=256),
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
            Shape(128, 64, 256, 8, 2, tma=True, chunk=256),
            Shape(128, 32, 256, 8, 2, rolled=True),
            Shape(128, 16, 256, 8, 2, rolled=True),
        ],
        ("16", 512): [
            Shape(128, 64, 256, 8, 2, tma=True, chunk=256),
            Shape(128, 16, 256, 8, 2, rolled=True, chunk=64),
        ],
        ("16", 1024): [
            Shape(128, 64, 256, 8, 2, tma=True, chunk=256),
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
    (r = 424 → 7 × 64 = 448 columns of work, not 512). The default of a shape that names none;
    the tables' TMA shapes name 256."""
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
    first = _configs(role, r, dtype, tma)[0].kwargs  # through descriptors: its chunks too
    tma = tma and first["TMA"]
    KERNELS[role][grid](
        *args,
        **meta,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DK=first["BLOCK_DK"] if tma else chunk_width(r, dv),
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
    strides = (q.stride(), k.stride(), v.stride(), o.stride(), stride_kvl)
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
            o_part, l_part, o, l, o.stride(), S, splits, R=r, BLOCK_R=width, num_warps=4
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
        o.stride(),
        do.stride(),
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
    in_strides = (q.stride(), k.stride(), v.stride(), do_scaled.stride())
    tail = (stride_kvl, S, T, triton.next_power_of_2(S))
    slices = lambda m: triton.cdiv(r, m["BLOCK_DV"])
    key_grid = lambda m: (triton.cdiv(T, m["BLOCK_N"]) * slices(m), B)

    def over_keys(role: str, dq_acc: Tensor, **grads: bool) -> None:
        """A launch over key tiles: dk and/or dv, and with GRAD_Q dq's terms into dq_acc."""
        args = (*inputs, dk, dv, dq_acc, *in_strides, dk.stride(), dv.stride(), *tail)
        _launch(role, key_grid, args, r, q.dtype, **meta, **grads)

    wide = split_key_gradients(r)
    if not deterministic_backward():  # fused: dq's terms added into an fp32 accumulator
        fp32 = dq.dtype == torch.float32 and dq.is_contiguous()
        acc = dq.zero_() if fp32 else q.new_zeros(B, S, r, dtype=torch.float32)
        if wide:
            over_keys("dv", dk, GRAD_K=False, GRAD_V=True, GRAD_Q=False)
            over_keys("dkq", acc, GRAD_K=True, GRAD_V=False, GRAD_Q=True)
        else:
            over_keys("dkdvq", acc, GRAD_K=True, GRAD_V=True, GRAD_Q=True)
        if acc is not dq:
            dq.copy_(acc)
        return dq, dk, dv
    if wide:  # deterministic: every element from one program (dk: DQ_ACC's unread stand-in)
        over_keys("dv", dk, GRAD_K=False, GRAD_V=True, GRAD_Q=False)
        over_keys("dk", dk, GRAD_K=True, GRAD_V=False, GRAD_Q=False)
    else:
        over_keys("dkdv", dk, GRAD_K=True, GRAD_V=True, GRAD_Q=False)
    _launch(
        "dq",
        lambda m: (triton.cdiv(S, m["BLOCK_M"]) * slices(m), B),
        (*inputs, dq, *in_strides, dq.stride(), *tail),
        r,
        q.dtype,
        **meta,
    )
    return dq, dk, dv
