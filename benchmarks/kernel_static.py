"""Static report of the softplus kernels' compiled Hopper code, read without a GPU.

    python -m benchmarks.kernel_static                     # r = 128, 256, 424, 512 in bf16
    python -m benchmarks.kernel_static --r 128 --dtype fp32 --jobs 2 --cold

Triton compiles for sm_90 on any machine. A stand-in driver that reports that target (and
launches nothing) lets the real launchers of :mod:`llama3.ops.softplus_triton` run on ``meta``
tensors at the benchmark shapes: the autotuner "benchmarks" every configuration of its table,
which compiles each exactly as it would on the GPU. For every compiled kernel the report reads:

* registers, stack frame and spill bytes (``cuobjdump -res-usage``; STL/LDL in the SASS), shared
  memory against the 227 KB a block may use;
* the tensor-core path (wgmma = ``HGMMA``, mma.sync = ``HMMA``) and, from the TTGIR, how many
  times each ``dot`` is computed redundantly by warps whose tiles overlap ("dup"), and how many
  tensor-core instructions ptxas emptied because it found their result unused ("dead": a
  product the source needs that the compiled kernel skips, which makes it wrong);
* in the tile loop (the innermost loop holding the score's exp2; for the forward and dQ the first,
  unmasked one): SASS instructions, special-function ops (``MUFU``), tensor FLOPs executed,
  global-memory bytes read and bytes of atomic reductions sent to the L2 (the fused backward's
  dq; only r's own columns, not the padding of its last slice, whose adds are masked off), each
  per (query, key) pair of the tile;
* compile time, and a static ceiling in TFLOP/s from per-SM rates (benchmarks/NOTES.md states the
  model): tensor time plus issue time per pair, or the L2's time for the atomics where that is
  longer, FLOPs counted as the benchmarks count them; both backward paths (fused, and the
  deterministic one) get rows and a ceiling.

Prints a table and writes JSON (with the Triton version). Needs no GPU; ``--jobs`` compiles widths
in parallel processes. ``--cold`` times compilation with an empty Triton cache.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "out" / "kernel_static.json"

# Hopper (H100/H200 SXM), per SM and clock; see benchmarks/NOTES.md.
SMS = 132
CLOCK_HZ = 1.98e9
TENSOR_FLOP_PER_CLOCK = {"bf16": 4096, "fp16": 4096, "tf32": 2048}
ISSUE_PER_CLOCK = 128  # 4 schedulers × one warp instruction (32 threads) each
MUFU_PER_CLOCK = 16
# fp32 reductions (RED, ATOM) the L2 absorbs, bytes per clock per SM: an assumption, not a
# measurement (about half the L2's read bandwidth, 2.6 TB/s over the chip; --l2_atomic_rate
# changes it); see NOTES.md.
ATOMIC_BYTES_PER_CLOCK = 10.0
SHARED_LIMIT = 232448  # bytes of shared memory one block may use (227 KB)

# Useful FLOPs per visible (query, key) pair, as benchmarks/attention.py counts them.
USEFUL_FLOPS = {"fwd": 4, "bwd": 10}  # × r
# Tensor FLOPs per pair each kernel needs at least (its products, × r): a reading below is one
# that missed part of the tile loop, and is not used.
LEAST_TENSOR_FLOPS = {
    "fwd": 4,
    "bwd_dkdv": 8,
    "bwd_dv": 4,
    "bwd_dk": 6,
    "bwd_dq": 6,
    "bwd_dkdvdq": 10,
    "bwd_dkdq": 8,
}

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ---------------------------------------------------------------------------------------------
# A driver that compiles for sm_90 and launches nothing
# ---------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One compiled kernel as the launcher used it."""

    kernel: str
    config: dict[str, Any]
    grid: tuple[int, int, int] | None = None
    compile_s: float = 0.0
    fits: bool = True
    compiled: Any = field(default=None, repr=False)


class _Utils:
    def get_device_properties(self, device: int) -> dict[str, int]:
        return {
            "max_shared_mem": SHARED_LIMIT,
            "multiprocessor_count": SMS,
            "max_num_regs": 65536,
            "warpSize": 32,
            "sm_clock_rate": int(CLOCK_HZ / 1e3),
        }

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024


class StaticDriver:
    """Stands in for Triton's CUDA driver: the sm_90 target, no device, launches recorded."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import ty_to_cpp

        self.target = GPUTarget("cuda", 90, 32)
        self.utils = _Utils()
        self.map_python_to_cpp_type = ty_to_cpp
        self.grids: dict[int, tuple[int, int, int]] = {}
        driver = self

        class Launcher:
            def __init__(self, src, metadata):
                self.key = metadata.hash

            def __call__(self, gx, gy, gz, *args):
                driver.grids[self.key] = (gx, gy, gz)

        self.launcher_cls = Launcher

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return 9, 0

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()  # compiles the configuration; the launch itself is recorded only
            return [1.0, 1.0, 1.0]

        return bench

    def get_empty_cache_for_benchmark(self):
        return None

    def clear_cache(self, cache) -> None:
        pass


def _install_compile_timer(timings: dict[str, float]) -> None:
    """Record the wall time of every Triton compilation, by the compiled kernel's hash."""
    from triton.runtime.jit import JITFunction

    original = JITFunction._do_compile

    def timed(self, *args, **kwargs):
        begin = time.perf_counter()
        kernel = original(self, *args, **kwargs)
        timings[kernel.hash] = time.perf_counter() - begin
        return kernel

    JITFunction._do_compile = timed


# ---------------------------------------------------------------------------------------------
# Reading the compiled code
# ---------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _run_tool(name: str, *args: str) -> str:
    return subprocess.run([_tool(name), *args], check=True, capture_output=True, text=True).stdout


@dataclass
class Sass:
    """One instruction: address, opcode with modifiers, operands."""

    address: int
    opcode: str
    operands: str


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[Sass]:
    out = []
    for match in _SASS_LINE.finditer(text):
        out.append(Sass(int(match.group(1), 16), match.group(2), match.group(3)))
    return out


def loops(code: list[Sass]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to an earlier address.

    Branches past the kernel's last EXIT are not loops: ptxas puts slow paths there (a barrier's
    retry loop) that jump back into the main code."""
    index = {ins.address: i for i, ins in enumerate(code)}
    end = max((i for i, ins in enumerate(code) if ins.opcode.startswith("EXIT")), default=len(code))
    found = []
    for i, ins in enumerate(code[:end]):
        if ins.opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", ins.operands)
            if target and int(target.group(1), 16) < ins.address:
                found.append((index.get(int(target.group(1), 16), 0), i))
    return found


def tile_loop(code: list[Sass]) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """The unmasked tile loop and the loops nested in it.

    Tile loops are the innermost loops holding an exp2 (the scores'); each kernel has one over
    tiles that need the causal mask and one over tiles that do not, which is the shorter (no
    mask selects) and carries most of the work.
    """
    everything = loops(code)
    holding = [
        lp
        for lp in everything
        if any(code[j].opcode.startswith("MUFU.EX2") for j in range(lp[0], lp[1] + 1))
    ]
    innermost = [
        lp
        for lp in holding
        if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in holding)
    ]
    if not innermost:
        return None, []
    loop = min(innermost, key=lambda lp: (lp[1] - lp[0], lp[0]))
    nested = [o for o in everything if o != loop and loop[0] <= o[0] and o[1] <= loop[1]]
    return loop, nested


_GMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\.F32(?:\.(\w+))?")  # no type: fp16
_MMA = re.compile(r"^HMMA\.168(\d+)\.F32(?:\.(\w+))?")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1, "F32x2": 8, "F32x4": 16}


def _width(opcode: str) -> int:
    for part in opcode.split(".")[1:]:
        if part in _WIDTH:
            return _WIDTH[part]
    return 4


def dead_mma(ins: Sass) -> bool:
    """A wgmma ptxas emptied (no operands, result discarded): ``HGMMA… RZ, gdesc[URZ], …``."""
    return ins.opcode.startswith("HGMMA") and "gdesc[URZ]" in ins.operands


def _tensor_flops(ins: Sass, warps: int) -> tuple[float, str]:
    """FLOPs one issue of ``ins`` performs in the whole block, and the operand type."""
    if dead_mma(ins):
        return 0.0, ""
    gmma = _GMMA.match(ins.opcode)
    if gmma:
        m, n, k = (int(g) for g in gmma.groups()[:3])
        return 2.0 * m * n * k * (warps // 4), gmma.group(4) or "F16"
    mma = _MMA.match(ins.opcode)
    if mma:  # m16 n8 k(8|16), one per warp
        return 2.0 * 16 * 8 * int(mma.group(1)) * warps, mma.group(2) or "F16"
    return 0.0, ""


_TMA_COPY = re.compile(
    r"async_tma_copy_global_to_local .*?!tt\.tensordesc<tensor<([0-9x]+)x(\w+?),"
)
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i8": 1}


def tma_copy_bytes(ttgir: str, code: list[Sass]) -> float:
    """Mean bytes one TMA load (``UTMALDG``, issued once per block) copies: the boxes of the
    TTGIR's TMA copies over the SASS's TMA loads (ptxas may split a box into several)."""
    boxes = [
        math.prod(int(d) for d in dims.split("x")) * _BYTES.get(kind, 4)
        for dims, kind in _TMA_COPY.findall(ttgir)
    ]
    loads = sum(ins.opcode.startswith("UTMALDG") for ins in code)
    return sum(boxes) / loads if loads else 0.0


def count_loop(
    code: list[Sass],
    loop: tuple[int, int],
    nested: list[tuple[int, int]],
    nested_trips: int,
    warps: int,
    tma_bytes: float = 0.0,
    stages: int = 1,
) -> dict[str, float]:
    """Per-iteration totals of the loop body (a thread's instructions; the block's FLOPs and
    bytes), nested loops weighted by ``nested_trips``; a TMA load copies ``tma_bytes``.

    A nested loop pipelined over ``stages`` buffers copies its first stages − 1 chunks before it
    starts (those copies sit in the outer body) and issues its last stages − 1 trips' copies
    predicated off: its asynchronous copies move bytes on nested_trips − (stages − 1) trips."""
    totals = dict(instructions=0.0, mufu=0.0, tensor_flops=0.0, global_bytes=0.0, atomic_bytes=0.0)
    dtype = ""
    copying = max(nested_trips - (stages - 1), 0)
    for j in range(loop[0], loop[1] + 1):
        ins = code[j]
        if ins.opcode.startswith("NOP"):
            continue
        inside = any(a <= j <= b for a, b in nested)
        weight = nested_trips if inside else 1
        totals["instructions"] += weight
        if ins.opcode.startswith("MUFU"):
            totals["mufu"] += weight
        flops, kind = _tensor_flops(ins, warps)
        if flops:
            totals["tensor_flops"] += weight * flops
            dtype = kind
        copies = copying if inside else 1  # asynchronous copies (cp.async, TMA)
        if ins.opcode.startswith("LDGSTS"):
            totals["global_bytes"] += copies * _width(ins.opcode) * warps * 32
        elif ins.opcode.startswith("LDG"):
            totals["global_bytes"] += weight * _width(ins.opcode) * warps * 32
        elif ins.opcode.startswith("UTMALDG"):
            totals["global_bytes"] += copies * tma_bytes
        elif ins.opcode.startswith(("RED", "ATOMG")):  # global reductions, to the L2
            totals["atomic_bytes"] += weight * _width(ins.opcode) * warps * 32
    totals["tensor_type"] = dtype
    return totals


def spill_bytes(code: list[Sass]) -> tuple[int, int]:
    """Static bytes of spill stores and loads (STL, LDL), as ptxas counts them."""
    stores = sum(_width(i.opcode) for i in code if i.opcode.startswith("STL"))
    loads = sum(_width(i.opcode) for i in code if i.opcode.startswith("LDL"))
    return stores, loads


def resources(cubin_path: str) -> dict[str, int]:
    text = _run_tool("cuobjdump", "-res-usage", cubin_path)
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in found.items()}


_LAYOUT = re.compile(
    r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d).*?warpsPerCTA = \[(\d+), "
    r"(\d+)\].*?instrShape = \[(\d+), (\d+)",
    re.M,
)
_DOT = re.compile(r"(?:warp_group_dot|tt\.dot) .*-> tensor<(\d+)x(\d+)xf32, #(\w+)>")


def duplication(ttgir: str) -> float:
    """Largest factor by which warps recompute the same dot tile (1.0: every warp owns its own)."""
    layouts = {m.group(1): tuple(int(g) for g in m.groups()[2:]) for m in _LAYOUT.finditer(ttgir)}
    worst = 1.0
    for m in _DOT.finditer(ttgir):
        rows, cols, name = int(m.group(1)), int(m.group(2)), m.group(3)
        if name not in layouts:
            continue
        warps_m, warps_n, instr_m, instr_n = layouts[name]
        covered_rows, covered_cols = warps_m * instr_m, warps_n * instr_n
        worst = max(worst, max(1.0, covered_rows / rows) * max(1.0, covered_cols / cols))
    return worst


# ---------------------------------------------------------------------------------------------
# Driving the real launchers
# ---------------------------------------------------------------------------------------------


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype)


def run_launchers(
    r: int,
    dtype_name: str,
    B: int,
    S: int,
    decode_B: int,
    decode_T: int,
    shapes: dict[str, list[str]] | None = None,
) -> dict[str, list[Launch]]:
    """Run forward, backward and decoding at one width; every compiled kernel by launch group.

    ``shapes`` replaces the autotune candidates of the named kernels at this width ("what if").
    """
    import torch
    from triton.runtime import driver

    fake = StaticDriver()
    driver.set_active(fake)
    timings: dict[str, float] = {}
    _install_compile_timer(timings)
    from llama3.ops import softplus_kernels
    from llama3.ops import softplus_triton as kernels

    dtype = getattr(torch, DTYPES[dtype_name])
    for role, table in (shapes or {}).items():
        kernels.SHAPES[role][kernels.table_key(role, r, dtype)] = list(
            map(kernels.Shape.parse, table)
        )
    groups: dict[str, list[Launch]] = {}

    def collect(group: str, call) -> None:
        from triton.runtime.errors import OutOfResources

        before = _compiled_kernels(softplus_kernels)
        try:
            call()
        except OutOfResources as error:  # every candidate failed: still report what compiled
            print(f"r={r} {group}: {error}", file=sys.stderr)
        for key, (name, compiled) in _compiled_kernels(softplus_kernels).items():
            if key in before:
                continue
            launch = Launch(
                kernel=name,
                config=_constexprs(compiled),
                compiled=compiled,
                grid=fake.grids.get(compiled.hash),
                compile_s=timings.get(compiled.hash, 0.0),
                fits=compiled.metadata.shared <= SHARED_LIMIT,
            )
            groups.setdefault(group, []).append(launch)

    q = _meta(B, S, r, dtype=dtype)
    k = _meta(B, S, r, dtype=dtype).transpose(1, 2)
    v = _meta(B, S, r, dtype=dtype).transpose(1, 2)
    collect("train", lambda: kernels.forward(q, k, v, "length"))
    o, l = _meta(B, S, r, dtype=dtype), _meta(B, S, dtype=torch.float32)
    do = _meta(B, S, r, dtype=dtype)
    collect("train", lambda: kernels.backward(do, q, k, v, o, l, "length"))
    kernels.DETERMINISTIC = True  # the deterministic backward's launches too
    collect("train_det", lambda: kernels.backward(do, q, k, v, o, l, "length"))
    qd = _meta(decode_B, 1, r, dtype=dtype)
    kd, vd = _meta(decode_B, r, decode_T, dtype=dtype), _meta(decode_B, r, decode_T, dtype=dtype)
    kv_len = _meta(decode_B, dtype=torch.int64)
    collect("decode", lambda: kernels.forward(qd, kd, vd, "length", kv_len=kv_len))
    return groups


def _compiled_kernels(module) -> dict[tuple, tuple[str, Any]]:
    from triton.runtime.jit import JITFunction

    found = {}
    for name in dir(module):
        fn = getattr(module, name)
        if isinstance(fn, JITFunction):
            for device, cache in fn.device_caches.items():
                for key, compiled in cache[0].items():
                    found[(name, key)] = (name, compiled)
    return found


def _constexprs(compiled) -> dict[str, Any]:
    names = compiled.src.fn.arg_names
    config = {
        names[path[0]]: value
        for path, value in compiled.src.constants.items()
        if isinstance(value, (bool, int, str)) and names[path[0]].isupper()
    }
    config["num_warps"] = compiled.metadata.num_warps
    config["num_stages"] = compiled.metadata.num_stages
    return config


# ---------------------------------------------------------------------------------------------
# One row of the report
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    r: int
    dtype: str
    kernel: str
    config: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    shared_kb: float
    fits: bool
    mma: str
    dup: float
    dead: int
    inst_per_pair: float | None
    mufu_per_pair: float | None
    tensor_flops_per_pair: float | None
    global_bytes_per_pair: float | None
    atomic_bytes_per_pair: float | None  # fp32 reductions to the L2
    clocks_per_pair: float | None  # per SM
    compile_s: float
    grid: list[int] | None


def _config_label(config: dict[str, Any]) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_DK", "BLOCK_DV")
    parts = [str(config[k]) for k in keys if k in config]
    parts += [f"w{config['num_warps']}", f"s{config['num_stages']}"]
    if config.get("UNROLL") is False and "BLOCK_DV" in config:
        parts.append("rolled")
    return ",".join(parts)


def _slices(config: dict[str, Any], r: int) -> int:
    dv = config.get("BLOCK_DV")
    return -(-r // dv) if dv else 1


def _written_share(config: dict[str, Any], r: int) -> float:
    """Share of the r slices' columns that exist (r = 424 in one slice of 512: 424 / 512). The
    kernels mask the padded columns' atomic adds, and a lane whose predicate is off sends nothing
    to the L2, so the atomic bytes count only these."""
    dv = config.get("BLOCK_DV")
    return min(1.0, r / (_slices(config, r) * dv)) if dv else 1.0


def analyse(
    launch: Launch, r: int, dtype: str, workdir: str, atomic_rate: float = ATOMIC_BYTES_PER_CLOCK
) -> Row:
    compiled = launch.compiled
    cubin = os.path.join(workdir, f"{compiled.hash}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    res = resources(cubin)
    code = parse_sass(_run_tool("cuobjdump", "-sass", cubin))
    stores, loads = spill_bytes(code)
    config = launch.config
    warps = config["num_warps"]
    mma = (
        "wgmma"
        if any(i.opcode.startswith("HGMMA") for i in code)
        else "mma.sync"
        if any(i.opcode.startswith("HMMA") for i in code)
        else "-"
    )
    per_pair = dict(inst=None, mufu=None, flops=None, bytes=None, atomic=None, clocks=None)
    loop, nested = tile_loop(code)
    pairs = config.get("BLOCK_M", 0) * config.get("BLOCK_N", 0)  # per tile-loop iteration
    if loop is not None and pairs:
        trips = -(-r // config.get("BLOCK_DK", r)) if nested else 1
        totals = count_loop(
            code,
            loop,
            nested,
            trips,
            warps,
            tma_copy_bytes(compiled.asm["ttgir"], code),
            config["num_stages"],
        )
        scale = _slices(config, r) / pairs  # every r slice recomputes the tile's pairs
        threads = warps * 32
        per_pair = dict(
            inst=totals["instructions"] * threads * scale,
            mufu=totals["mufu"] * threads * scale,
            flops=totals["tensor_flops"] * scale,
            bytes=totals["global_bytes"] * scale,
            atomic=totals["atomic_bytes"] * scale * _written_share(config, r),
        )
        rate = TENSOR_FLOP_PER_CLOCK.get(
            {"BF16": "bf16", "F16": "fp16", "TF32": "tf32"}.get(totals["tensor_type"], "bf16")
        )
        issue = max(per_pair["inst"] / ISSUE_PER_CLOCK, per_pair["mufu"] / MUFU_PER_CLOCK)
        least = LEAST_TENSOR_FLOPS.get(_kernel_label(launch.kernel, config), 0) * r
        if per_pair["flops"] >= least:  # the L2's reductions overlap the SM's work
            per_pair["clocks"] = max(
                per_pair["flops"] / rate + issue, per_pair["atomic"] / atomic_rate
            )
        else:  # the reading is not to be trusted: no ceiling from it
            print(
                f"r={r} {launch.kernel} {_config_label(config)}: the tile loop counted "
                f"{per_pair['flops']:.0f} tensor FLOPs per pair, under {least}",
                file=sys.stderr,
            )
    return Row(
        r=r,
        dtype=dtype,
        kernel=_kernel_label(launch.kernel, config),
        config=_config_label(config),
        registers=res.get("reg", 0),
        stack=res.get("stack", 0),
        spill_stores=stores,
        spill_loads=loads,
        shared_kb=round(compiled.metadata.shared / 1024, 1),
        fits=launch.fits,
        mma=mma,
        dup=duplication(compiled.asm["ttgir"]),
        dead=sum(map(dead_mma, code)),
        inst_per_pair=_round(per_pair["inst"]),
        mufu_per_pair=_round(per_pair["mufu"]),
        tensor_flops_per_pair=_round(per_pair["flops"]),
        global_bytes_per_pair=_round(per_pair["bytes"]),
        atomic_bytes_per_pair=_round(per_pair["atomic"]),
        clocks_per_pair=per_pair["clocks"],
        compile_s=round(launch.compile_s, 2),
        grid=list(launch.grid) if launch.grid else None,
    )


def _kernel_label(name: str, config: dict[str, Any]) -> str:
    """The kernel's name without decoration; the key-gradient kernel says which it computes."""
    label = name.strip("_").removesuffix("_kernel")
    if label == "bwd_dkdv":
        grads = [g for g in ("K", "V", "Q") if config.get(f"GRAD_{g}", g != "Q")]
        label = "bwd_" + "".join(f"d{g.lower()}" for g in grads)
    return label


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


# ---------------------------------------------------------------------------------------------
# Ceilings and the report for one width
# ---------------------------------------------------------------------------------------------


def tflops(useful_per_pair: float, clocks_per_pair: float) -> float:
    """Static ceiling: useful FLOPs per pair over the pair's time, on every SM."""
    return useful_per_pair / clocks_per_pair * SMS * CLOCK_HZ / 1e12


def _usable(row: Row) -> bool:
    return row.fits and row.spill_stores == 0 and row.dead == 0 and row.clocks_per_pair is not None


def ceilings(rows: list[Row], r: int) -> dict[str, float | None]:
    """Best static TFLOP/s of the forward and of both backward paths, over the configurations
    that fit, do not spill and have no emptied product: the fused one (dK/dV/dQ in one launch,
    or dV then dK/dQ) and the deterministic one (dK/dV, or dV then dK, then dQ)."""

    def best(*kernels: str) -> float | None:
        found = [
            min(
                (row.clocks_per_pair for row in rows if row.kernel == k and _usable(row)), default=0
            )
            for k in kernels
        ]
        return sum(found) if all(found) else None

    def ceiling(useful: int, clocks: float | None) -> float | None:
        return round(tflops(useful * r, clocks), 1) if clocks else None

    fused = best("bwd_dkdvdq") or best("bwd_dv", "bwd_dkdq")
    deterministic = best("bwd_dkdv", "bwd_dq") or best("bwd_dv", "bwd_dk", "bwd_dq")
    return {
        "fwd_tflops": ceiling(USEFUL_FLOPS["fwd"], best("fwd")),
        "bwd_tflops": ceiling(USEFUL_FLOPS["bwd"], fused),
        "bwd_det_tflops": ceiling(USEFUL_FLOPS["bwd"], deterministic),
    }


def report_width(
    r: int,
    dtype: str,
    B: int,
    S: int,
    decode_B: int,
    decode_T: int,
    cache_dir: str | None,
    shapes: dict[str, list[str]] | None = None,
    atomic_rate: float = ATOMIC_BYTES_PER_CLOCK,
) -> dict[str, Any]:
    """Compile and read every kernel at width r (run in a worker process)."""
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)
    groups = run_launchers(r, dtype, B, S, decode_B, decode_T, shapes)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for group, launches in groups.items():
            for launch in launches:
                row = analyse(launch, r, dtype, workdir, atomic_rate)
                if group == "decode":
                    row.kernel = "decode_" + row.kernel
                rows.append(row)
    compile_s = {
        group: round(sum(launch.compile_s for launch in launches), 1)
        for group, launches in groups.items()
    }
    return {
        "r": r,
        "dtype": dtype,
        "rows": [asdict(row) for row in rows],
        "ceilings": ceilings(rows, r),
        "compile_s": compile_s,
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

COLUMNS = [
    "r",
    "kernel",
    "config",
    "registers",
    "spill_stores",
    "shared_kb",
    "fits",
    "mma",
    "dup",
    "dead",
    "inst_per_pair",
    "mufu_per_pair",
    "tensor_flops_per_pair",
    "global_bytes_per_pair",
    "atomic_bytes_per_pair",
    "compile_s",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_static",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--r",
        default="128,256,424,512",
        help="core widths to compile, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (default: %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=16, help="training batch B (default: 16)")
    parser.add_argument(
        "--seq_len", type=int, default=4096, help="training sequence length S = T (default: 4096)"
    )
    parser.add_argument("--decode_batch", type=int, default=64, help="decoding batch (default: 64)")
    parser.add_argument(
        "--decode_keys",
        type=int,
        default=4096,
        help="decoding cache length T, S = 1 (default: 4096)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="widths compiled in parallel processes (default: 1)"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="compile with an empty Triton cache, so compile times are honest",
    )
    parser.add_argument(
        "--cache_dir", default=None, help="Triton cache directory to use (default: Triton's own)"
    )
    parser.add_argument(
        "--shapes",
        default=None,
        metavar="ROLE:M,N,DV,WARPS,STAGES[,rolled][,tma][,dkNN];...",
        help="try other autotune candidates for a launch role (fwd, dkdvq, dkq, dkdv, dv, dk, "
        "dq) at every width given, e.g. 'dkdvq:32,128,128,8,2;16,128,128,8,3' (repeat the "
        "flag's groups with '|' for several roles; tma: TMA chunk loads, dkNN: chunks of NN)",
    )
    parser.add_argument(
        "--l2_atomic_rate",
        type=float,
        default=ATOMIC_BYTES_PER_CLOCK,
        metavar="BYTES",
        help="fp32 reduction bytes the L2 absorbs per clock per SM, the bound on dq's atomic "
        "adds in the fused backward (default: %(default)s, an assumption; see benchmarks/NOTES.md)",
    )
    parser.add_argument(
        "--output", default=str(DEFAULT_OUTPUT), help="JSON file to write (default: %(default)s)"
    )
    return parser


def parse_shapes(text: str | None) -> dict[str, list[str]] | None:
    """'fwd:128,64,128,8,3;64,64,128,4,3|dkq:...' → {"fwd": ["128,64,128,8,3", ...], ...}; each
    shape is read by softplus_triton.Shape.parse in the worker that compiles it."""
    if not text:
        return None
    found = {}
    for group in text.split("|"):
        name, _, rest = group.partition(":")
        found[name.strip()] = [shape for shape in rest.split(";") if shape.strip()]
    return found


def collect(
    widths: list[int],
    dtype: str,
    B: int,
    S: int,
    decode_B: int,
    decode_T: int,
    jobs: int = 1,
    cache_dir: str | None = None,
    shapes: dict[str, list[str]] | None = None,
    atomic_rate: float = ATOMIC_BYTES_PER_CLOCK,
) -> list[dict[str, Any]]:
    """Reports for every width, each compiled in a fresh process (a kernel module per target)."""
    args = [(r, dtype, B, S, decode_B, decode_T, cache_dir, shapes, atomic_rate) for r in widths]
    with ProcessPoolExecutor(max_workers=max(1, jobs), max_tasks_per_child=1) as pool:
        return list(pool.map(_report_width_star, args))


def _report_width_star(args: tuple) -> dict[str, Any]:
    return report_width(*args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.common import format_table, wall_clock, write_results

    widths = [int(x) for x in args.r.split(",") if x.strip()]
    with tempfile.TemporaryDirectory() as cold_dir:
        cache_dir = cold_dir if args.cold else args.cache_dir
        reports = collect(
            widths,
            args.dtype,
            args.batch,
            args.seq_len,
            args.decode_batch,
            args.decode_keys,
            args.jobs,
            cache_dir,
            parse_shapes(args.shapes),
            args.l2_atomic_rate,
        )
    rows = [row for report in reports for row in report["rows"]]
    print(format_table(rows, COLUMNS))
    print()
    summary = [
        {
            "r": rep["r"],
            **rep["ceilings"],
            **{f"compile_{k}_s": v for k, v in rep["compile_s"].items()},
        }
        for rep in reports
    ]
    print(format_table(summary, list(summary[0])))
    import triton

    timing = wall_clock(
        "one kernel's compilation (with --cold from an empty Triton cache)",
        "seconds, one reading each",
        warmup=0,
        repetitions=1,
    )
    path = write_results(
        args.output,
        rows,
        timing=timing,
        triton=triton.__version__,
        dtype=args.dtype,
        shapes=dict(
            batch=args.batch,
            seq_len=args.seq_len,
            decode_batch=args.decode_batch,
            decode_keys=args.decode_keys,
        ),
        model=dict(
            sms=SMS,
            clock_hz=CLOCK_HZ,
            tensor_flop_per_clock=TENSOR_FLOP_PER_CLOCK,
            issue_per_clock=ISSUE_PER_CLOCK,
            mufu_per_clock=MUFU_PER_CLOCK,
            atomic_bytes_per_clock=args.l2_atomic_rate,
            shared_limit=SHARED_LIMIT,
        ),
        summary=summary,
        cold=args.cold,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
