"""The kernels' compiled Hopper code, read on the CPU (python -m benchmarks.kernel_static).

Every autotune configuration of every kernel (both backward paths: the fused one and the
deterministic one) is compiled for sm_90 at the benchmark shapes (bf16, B = 16, S = 4096; decoding
B = 64, T = 4096) for r = 128, 424 and 512 in bf16 and r = 128 and 424 in fp16 (which keeps dO
unscaled: one more per-row constant), and must fit in the shared memory
a block may use, must not spill registers (every shape in the tables is one the launcher may pick),
must give every warp rows of its own and must compute every product it is written to. The
instrument's own reading of SASS is checked on a kernel written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernel_static import LEAST_TENSOR_FLOPS, count_loop, parse_sass, tile_loop

triton = pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[2]

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(
    not (BIN / "cuobjdump").exists() or not (BIN / "ptxas").exists(),
    reason="this Triton build has no CUDA tools (ptxas, cuobjdump)",
)


def static_report(folder: Path, dtype: str, widths: str) -> dict:
    """The static report for ``widths`` in ``dtype``, compiled in two processes."""
    out = folder / f"report_{dtype}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.kernel_static",
            "--r",
            widths,
            "--dtype",
            dtype,
            "--jobs",
            "2",
            "--output",
            str(out),
        ],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """bf16 at r = 128, 424 and 512: the benchmark's dtype."""
    return static_report(tmp_path_factory.mktemp("static"), "bf16", "128,424,512")


@pytest.fixture(scope="module")
def report_fp16(tmp_path_factory) -> dict:
    """fp16 at r = 128 and 424, where its extra per-row constant costs registers (and the tables
    leave shapes out for it)."""
    return static_report(tmp_path_factory.mktemp("static"), "fp16", "128,424")


def test_every_configuration_fits_and_does_not_spill(report, report_fp16):
    rows = report["rows"] + report_fp16["rows"]
    kernels = {row["kernel"] for row in rows}
    deterministic = {"bwd_dkdv", "bwd_dk", "bwd_dv", "bwd_dq"}
    assert {"fwd", "bwd_rows", "bwd_dkdvdq", "bwd_dkdq", "decode_fwd", *deterministic} <= kernels
    for row in rows:
        where = f"r={row['r']} {row['dtype']} {row['kernel']} {row['config']}"
        assert row["fits"], f"{where}: {row['shared_kb']} KB of shared memory"
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, f"{where} spills"
        assert row["dup"] == 1, f"{where}: warps recompute each other's tiles ({row['dup']}×)"
        assert row["dead"] == 0, f"{where}: {row['dead']} tensor-core products compiled away"
        least = LEAST_TENSOR_FLOPS.get(row["kernel"].removeprefix("decode_"))
        if least:  # the reading found every product of the tile loop
            assert row["tensor_flops_per_pair"] >= least * row["r"], f"{where}: loop misread"


def test_atomic_traffic_is_r_columns_per_query_row_and_key_tile(report):
    """The fused launches send each query row's r columns of dq once per key tile, 4r / BLOCK_N
    bytes per pair, whatever the slices (r = 424: 26.5, its last slice's padding masked off)."""
    fused = [row for row in report["rows"] if row["kernel"] in ("bwd_dkdq", "bwd_dkdvdq")]
    assert {row["r"] for row in fused} == {128, 424, 512}
    for row in fused:
        block_n = int(row["config"].split(",")[1])
        assert row["atomic_bytes_per_pair"] == pytest.approx(4 * row["r"] / block_n), row


def test_one_special_function_op_per_pair_in_the_forward(report):
    """The polynomial leaves the exp2 as the forward's only special-function op, and the
    tensor cores do the products (wgmma)."""
    forward = [row for row in report["rows"] if row["kernel"] == "fwd" and row["r"] == 128]
    assert forward
    for row in forward:
        assert row["mufu_per_pair"] == 1.0, row
        assert row["mma"] == "wgmma", row


def test_sass_reading_counts_a_known_loop():
    """A loop of exactly one exp2 and one FMA per element: the reader finds that loop and counts
    its special-function op, and every instruction it counts belongs to the loop."""
    text = "\n".join(
        [
            "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
            "        /*0010*/                   FMUL R2, R1, R1 ;",
            "        /*0020*/                   MUFU.EX2 R3, R2 ;",
            "        /*0030*/                   FFMA R4, R3, R2, R4 ;",
            "        /*0040*/                   HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8 ;",
            "        /*0050*/               @P0 BRA 0x10 ;",
            "        /*0060*/                   EXIT ;",
        ]
    )
    code = parse_sass(text)
    assert [i.opcode for i in code][:3] == ["MOV", "FMUL", "MUFU.EX2"]
    loop, nested = tile_loop(code)
    assert loop == (1, 5) and nested == []
    totals = count_loop(code, loop, nested, 1, warps=4)
    assert totals["instructions"] == 5 and totals["mufu"] == 1
    assert totals["tensor_flops"] == 2 * 64 * 64 * 16 and totals["atomic_bytes"] == 0


def test_sass_reading_counts_atomic_traffic():
    """A vector reduction to global memory (four fp32 per thread) in the loop: 16 bytes per
    thread of every warp go to the L2; a load is not counted as atomic traffic."""
    text = "\n".join(
        [
            "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
            "        /*0010*/                   MUFU.EX2 R3, R1 ;",
            "        /*0020*/                   LDG.E R5, desc[UR4][R6.64] ;",
            "        /*0030*/  REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8 ;",
            "        /*0040*/               @P0 BRA 0x10 ;",
            "        /*0050*/                   EXIT ;",
        ]
    )
    code = parse_sass(text)
    loop, nested = tile_loop(code)
    totals = count_loop(code, loop, nested, 1, warps=8)
    assert totals["atomic_bytes"] == 16 * 32 * 8 and totals["global_bytes"] == 4 * 32 * 8
