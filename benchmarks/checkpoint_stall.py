"""How long a checkpoint holds training up on the CPU, saved at once and with --async_checkpoint.

    python -m benchmarks.checkpoint_stall            # the threads benchmark's model, 60 steps
    python -m benchmarks.checkpoint_stall --tiny     # seconds

Each mode trains the same run (``python -m llama3 train --device cpu``, the quality benchmark's
softplus model at core_dim 128: 3 layers, dim 128, context 256, batch 16; fixed seed) with a
checkpoint every ``--save_steps`` steps, ``--repeats`` times, the modes taking turns. The trainer
times every save: the seconds its loop spent in it (for a background save: taking the copies and
starting the writer, the step-boundary checks while it is in flight, and any wait for it by the
next save or the end of the run), listed as ``checkpoint_stall_s`` in the run's summary.json.
The last save of a run waits until it is complete in both modes and is reported apart
(``final_ms``). The table gives the median stall of the other saves (with the 20% and 80%
quantiles), the training time of the steps (which a background save, writing beside them on the
same cores, may slow), the run's wall-clock time and the size of one checkpoint; ``same_losses``
says whether the modes trained to the same losses (they must).

Threads: ``OMP_NUM_THREADS`` from the environment, else 2 (``--threads``). Writes ``--output``
(JSON, with the load average before and after) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BASE,
    RESULTS_DIR,
    Timed,
    child_env,
    format_table,
    python_docs_corpus,
    small_train_command,
    wall_clock,
    write_results,
)

MODES = {"synchronous": [], "--async_checkpoint": ["--async_checkpoint"]}
RUN = Path("RUN")  # the run directory, as the results record the commands
OUT_DIR = RESULTS_DIR.parent / "out"
COLUMNS = (
    "mode",
    "saves",
    "stall_ms",
    "stall_ms_q20",
    "stall_ms_q80",
    "final_ms",
    "step_time_s",
    "elapsed_s",
    "checkpoint_mb",
    "same_losses",
)


def train_command(data: Any, run: Path, args: argparse.Namespace, mode: str) -> list[str]:
    flags = ["--seed", "0", *MODES[mode]]
    return small_train_command(
        data, run, tiny=args.tiny, steps=args.steps, save_steps=args.save_steps, flags=flags
    )


def train(data: Any, run: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One training run; its summary, train losses and the size of its last checkpoint."""
    shutil.rmtree(run, ignore_errors=True)
    threads = str(args.threads)
    env = child_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    done = subprocess.run(
        train_command(data, run, args, mode), env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"training failed ({mode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = run / (run / "latest").read_text().strip()
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    summary = json.loads((run / "summary.json").read_text())
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    return {"summary": summary, "losses": losses, "bytes": size}


def row(mode: str, runs: list[dict[str, Any]], reference: list[float]) -> dict[str, Any]:
    """The table's row of one mode over its runs."""
    stalls = [1e3 * s for r in runs for s in r["summary"]["checkpoint_stall_s"][:-1]]
    final = [1e3 * r["summary"]["checkpoint_stall_s"][-1] for r in runs]
    timed, n = Timed.of(stalls), len(runs)
    return {
        "mode": mode,
        "saves": len(stalls),
        "stall_ms": timed.ms,
        "stall_ms_q20": timed.q20_ms,
        "stall_ms_q80": timed.q80_ms,
        "final_ms": sum(final) / n,
        "step_time_s": sum(r["summary"]["step_time_s"] for r in runs) / n,
        "elapsed_s": sum(r["summary"]["elapsed_s"] for r in runs) / n,
        "checkpoint_mb": runs[0]["bytes"] / 1e6,
        "same_losses": all(r["losses"] == reference for r in runs),
        "stalls_ms": stalls,
        "final_stalls_ms": final,
    }


def recorded(command: list[str], args: argparse.Namespace) -> list[str]:
    """A training command as the results record it: without the interpreter, the work
    directory's files named relative to it (WORK_DIR/...)."""
    work, out = args.work_dir.resolve(), []
    for arg in command[1:]:
        try:
            out.append(str("WORK_DIR" / Path(arg).resolve().relative_to(work)))
        except ValueError:  # not a file of the work directory
            out.append(arg)
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.checkpoint_stall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 60; tiny 12)")
    p.add_argument(
        "--save_steps", type=int, default=None, help="steps between saves (default 10; tiny 3)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="runs per mode, taking turns (default 2; tiny 1)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", 2)),
        help="threads per run (default: OMP_NUM_THREADS, else 2)",
    )
    p.add_argument("--work_dir", type=Path, default=OUT_DIR / "checkpoint_stall")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results (default: benchmarks/out/checkpoint_stall_cpu.json; with --tiny "
        "benchmarks/out/checkpoint_stall_tiny.json)",
    )
    args = p.parse_args()
    args.steps = args.steps or (12 if args.tiny else 60)
    args.save_steps = args.save_steps or (3 if args.tiny else 10)
    args.repeats = args.repeats or (1 if args.tiny else 2)
    if args.steps < 2 * args.save_steps:
        p.error("--steps must allow at least one save before the last (2 × --save_steps)")
    args.output = args.output or OUT_DIR / (
        "checkpoint_stall_tiny.json" if args.tiny else "checkpoint_stall_cpu.json"
    )
    return args


def main() -> int:
    args = parse_args()
    data = python_docs_corpus(args.work_dir / "python_docs", BASE["vocab_size"])
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            run = args.work_dir / f"run_{len(runs[mode])}_{mode.strip('-')}"
            runs[mode].append(train(data, run, args, mode))
    reference = runs["synchronous"][0]["losses"]
    rows = [row(mode, mode_runs, reference) for mode, mode_runs in runs.items()]
    print(format_table(rows, COLUMNS))
    timing = wall_clock(
        "the seconds the training loop spent in one save (the trainer's checkpoint_stall_s)",
        "median, 20% and 80% quantiles over the saves before each run's last",
        repetitions=args.repeats,
    )
    path = write_results(
        args.output,
        rows,
        timing=timing,
        benchmark="checkpoint_stall",
        tiny=args.tiny,
        steps=args.steps,
        save_steps=args.save_steps,
        saves=(args.steps - 1) // args.save_steps * args.repeats,
        threads=args.threads,
        cpus=os.cpu_count(),
        commands={mode: recorded(train_command(data, RUN, args, mode), args) for mode in MODES},
        load_average={"before": load_before, "after": os.getloadavg()},
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
