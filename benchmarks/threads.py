"""CPU training speed against the thread count and OpenMP's wait policy, alone and beside another
busy process: what the quick start, the tests and the CPU benchmarks should use.

    python -m benchmarks.threads              # the quality benchmark's softplus-128 model, 60 steps
    python -m benchmarks.threads --tiny       # seconds

Each setting trains the quality benchmark's softplus model at core_dim 128 (3 layers, dim 128,
context 256, batch 16) with ``python -m llama3 train --device cpu`` for ``--steps`` steps, with
``OMP_NUM_THREADS`` threads and ``OMP_WAIT_POLICY`` (unset: the OpenMP runtime's default, which
spins a while before it sleeps; PASSIVE: sleep at once), in three situations:

* alone on the machine;
* beside a busy process: one more copy of the same training with 1 thread runs meanwhile;
* two copies of itself at once (how benchmarks/ablations.py runs trials).

tokens/s is the mean over the steps after the first 10 (the summary's step times, so start-up is
left out); for "two copies" it is the sum of both (the machine's throughput). Writes ``--output``
(JSON) and prints the table. The numbers depend on the machine and on what else runs there; the
JSON records the load average before and after.
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
    child_env,
    format_table,
    python_docs_corpus,
    small_train_command,
    wall_clock,
    write_results,
)

SITUATIONS = ("alone", "beside a busy process", "two copies")
SETTINGS = ((1, None), (2, None), (2, "PASSIVE"))  # (threads, OMP_WAIT_POLICY)
SKIPPED = 10  # first steps left out of tokens/s
COLUMNS = ("situation", "threads", "wait_policy", "tokens_per_s", "vs_1_thread")


def start(
    data: Any, run: Path, steps: int, tiny: bool, threads: int, policy: str | None
) -> subprocess.Popen:
    shutil.rmtree(run, ignore_errors=True)
    env = child_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return subprocess.Popen(
        small_train_command(data, run, tiny=tiny, steps=steps, save_steps=steps),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def tokens_per_s(run: Path) -> float:
    """Tokens/s over the steps after the first SKIPPED, from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"][SKIPPED:]
    per_step = steps[0]["tokens"] // steps[0]["step"]
    return per_step * len(steps) / sum(per_step / r["tokens_per_s"] for r in steps)


def measure(
    data: Any, work: Path, steps: int, tiny: bool, situation: str, threads: int, policy: str | None
) -> float:
    runs = [work / "run_a", work / "run_b"]
    main = start(data, runs[0], steps, tiny, threads, policy)
    other = None
    if situation != "alone":
        other_threads, other_policy = (
            (1, None) if situation.startswith("beside") else (threads, policy)
        )
        other = start(
            data,
            runs[1],
            steps * 3 if situation.startswith("beside") else steps,
            tiny,
            other_threads,
            other_policy,
        )
    if main.wait() != 0:
        raise SystemExit(f"training failed ({situation}, {threads} threads, {policy})")
    rate = tokens_per_s(runs[0])
    if other is not None:
        if situation == "two copies":
            other.wait()
            rate += tokens_per_s(runs[1])
        else:
            other.kill()
            other.wait()
    return rate


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.threads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps")
    p.add_argument(
        "--steps", type=int, default=None, help="steps per training (default 60; tiny 14)"
    )
    p.add_argument("--work_dir", type=Path, default=RESULTS_DIR.parent / "out" / "threads")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results (default: benchmarks/results/threads_cpu.json; with --tiny "
        "WORK_DIR/threads.json)",
    )
    args = p.parse_args()
    args.steps = args.steps or (14 if args.tiny else 60)
    if args.steps <= SKIPPED:
        p.error(f"--steps must exceed {SKIPPED}")
    args.output = args.output or (
        args.work_dir / "threads.json" if args.tiny else RESULTS_DIR / "threads_cpu.json"
    )
    return args


def main() -> int:
    args = parse_args()
    data = python_docs_corpus(args.work_dir / "python_docs", BASE["vocab_size"])
    load_before = os.getloadavg()
    rows = []
    for situation in SITUATIONS:
        for threads, policy in SETTINGS:
            rate = measure(data, args.work_dir, args.steps, args.tiny, situation, threads, policy)
            rows.append(
                {
                    "situation": situation,
                    "threads": threads,
                    "wait_policy": policy or "default",
                    "tokens_per_s": rate,
                }
            )
        one = rows[-len(SETTINGS)]["tokens_per_s"]
        for row in rows[-len(SETTINGS) :]:
            row["vs_1_thread"] = row["tokens_per_s"] / one
    print(format_table(rows, COLUMNS))
    timing = wall_clock(
        "one optimizer step (the train command's own tokens_per_s)",
        "tokens / seconds of the steps after the warm-up",
        warmup=SKIPPED,
        repetitions=args.steps - SKIPPED,
    )
    path = write_results(
        args.output,
        rows,
        timing=timing,
        benchmark="threads",
        steps=args.steps,
        tiny=args.tiny,
        cpus=os.cpu_count(),
        load_average={"before": load_before, "after": os.getloadavg()},
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
