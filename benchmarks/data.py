"""Data pipeline throughput, measured side by side with its baselines in one run.

    python -m benchmarks.data --corpus FILE [FILE ...] [--tokenizer MODEL] [--workers N]

For each corpus (.jsonl or .jsonl.zst):

- preprocess: MB/s of input text (decompressed JSON lines) through ``preprocess``;
- pretokenize: MB/s of document text through the token cache builder (a full rebuild: read,
  parse, encode, write), against raw SentencePiece encoding of the same texts already in memory
  (one thread, and as many threads as workers), runs alternated ``--repeats`` times, fastest kept.
  "Per core" compares MB per CPU-second (this process and its workers) with raw encoding on one
  thread — the goal is ≥ 0.8; wall-clock ratios are shown too;
- loader: training windows/s of ``TrainWindows`` against what training consumes: the reference
  ``--train_tokens_per_s`` divided by ``--seq_len`` gives the windows/s training needs; and the
  time a training loop would wait for data per step, when each step keeps the GPU busy for its
  share of that reference (``batch × seq_len / train_tokens_per_s``; simulated by a sleep, which,
  like waiting on CUDA, releases the GIL).

Without ``--tokenizer`` a tokenizer is trained on the first corpus (``--vocab_size``). The machine's
load average is recorded: on a shared machine read ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

from benchmarks.common import RESULTS_DIR, environment, format_table, wall_clock, write_results
from llama3.cli import UsageError
from llama3.commands import preprocess
from llama3.data.dataset import TrainWindows
from llama3.data.parallel import available_cpus
from llama3.data.sources import ProblemLog, corpus_chunks, find_corpus_files, iter_texts
from llama3.data.tokenizer import Tokenizer, train_tokenizer
from llama3.data.tokens import open_token_corpus

COLUMNS = [
    "corpus",
    "stage",
    "workers",
    "MB/s",
    "MB/cpu-s",
    "tokens/s",
    "windows/s",
    "ratio",
    "ratio means",
]


def _text_bytes(files: list[Path]) -> int:
    """Decompressed bytes of the JSON lines (what preprocess reads)."""
    return sum(len(chunk.data) for chunk in corpus_chunks(files, ProblemLog()))


def bench_preprocess(corpus: Path, out: Path, workers: int) -> tuple[dict, float]:
    parser = argparse.ArgumentParser()
    preprocess.add_arguments(parser)
    args = parser.parse_args(
        ["--input", str(corpus), "--output", str(out), "--workers", str(workers), "--no-progress"]
    )
    size = _text_bytes(find_corpus_files(corpus))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        preprocess.run(args)
    seconds = time.perf_counter() - start
    return {"stage": "preprocess", "workers": workers, "MB/s": size / 1e6 / seconds}, seconds


class Clock:
    """Wall time and CPU time (this process and its finished children): on a shared machine CPU
    seconds show the work done, wall seconds also how much of the machine we got."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu

    @staticmethod
    def _cpu() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime


def raw_encode(tokenizer: Tokenizer, texts: list[str], threads: int = 1) -> tuple[float, float]:
    """SentencePiece alone (texts in memory, one batch call, ``threads`` threads): text MB per
    wall second and per CPU second."""
    size = sum(len(t.encode()) for t in texts)
    tokenizer.num_threads = threads
    with Clock() as clock:
        tokenizer.encode_batch(texts, eos=True)
    tokenizer.num_threads = 1
    return size / 1e6 / clock.wall, size / 1e6 / clock.cpu


def bench_pretokenize(
    split: Path, tokenizer: Tokenizer, workers: int, cache: Path
) -> tuple[float, ...]:
    """A full rebuild of the token cache: text MB per wall second, per CPU second, tokens/s."""
    with Clock() as clock:
        corpus = open_token_corpus(
            split, tokenizer, cache_dir=cache, workers=workers, progress=False, rebuild=True
        )
    return (
        corpus.n_bytes / 1e6 / clock.wall,
        corpus.n_bytes / 1e6 / clock.cpu,
        corpus.n_tokens / clock.wall,
    )


def bench_loader(corpus, seq_len: int, batch_size: int, prefetch: int, seconds: float) -> float:
    """Windows/s handed out by TrainWindows (batches built, tensors ready on the CPU)."""
    windows = TrainWindows(corpus, seq_len, batch_size, seed=0, prefetch=prefetch)
    it = iter(windows)
    next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in islice(it, 20):
            count += batch_size
    return count / (time.perf_counter() - start)


def loader_stall_ms(
    corpus, seq_len: int, batch_size: int, prefetch: int, step_s: float, steps: int = 30
) -> float:
    """Milliseconds per step that training would wait for data, when each step keeps the GPU
    busy for ``step_s`` seconds without holding the GIL (simulated by sleeping)."""
    windows = TrainWindows(corpus, seq_len, batch_size, seed=0, prefetch=prefetch)
    it = iter(windows)
    next(it)
    start = time.perf_counter()
    for _ in islice(it, steps):
        time.sleep(step_s)
    return max((time.perf_counter() - start) / steps - step_s, 0.0) * 1e3


def _best(values: list[float]) -> float:
    """The fastest of repeated runs: on a shared machine, the one least disturbed by others."""
    return max(values)


def bench_pretokenize_side_by_side(
    split: Path, tokenizer: Tokenizer, workers: list[int], repeats: int, work: Path
) -> dict[str, float]:
    """Raw encode (1 thread, ``max(workers)`` threads) and the pipeline, alternated ``repeats``
    times so that load changes hit all of them alike; best of each."""
    texts = list(iter_texts(find_corpus_files(split), ProblemLog()))
    runs: dict[str, list[float]] = {}

    def record(name: str, values: tuple[float, ...]) -> None:
        for suffix, value in zip(("", "_cpu", "_tokens"), values):
            runs.setdefault(name + suffix, []).append(value)

    for _ in range(repeats):
        record("raw", raw_encode(tokenizer, texts))
        record("raw_threads", raw_encode(tokenizer, texts, max(workers)))
        for w in workers:
            record(f"pipeline_{w}", bench_pretokenize(split, tokenizer, w, work / f"cache-{w}"))
    return {key: _best(values) for key, values in runs.items()} | {
        "raw_spread": min(runs["raw"]) / max(runs["raw"])
    }


def bench_corpus(
    corpus: Path, tokenizer: Tokenizer | None, args, work: Path
) -> tuple[list[dict], Tokenizer]:
    name, rows = corpus.name, []
    workers = sorted({1, args.workers})
    out = work / f"{name}-pre"
    for w in workers:
        mbps = _best([bench_preprocess(corpus, out, w)[0]["MB/s"] for _ in range(args.repeats)])
        rows.append({"corpus": name, "stage": "preprocess", "workers": w, "MB/s": mbps})
    split = out / "train"
    if tokenizer is None:
        start = time.perf_counter()
        model = train_tokenizer(split, work / "bench.model", args.vocab_size, progress=False)
        tokenizer = Tokenizer(model)
        rows.append(
            {
                "corpus": name,
                "stage": f"train_tokenizer (vocab {args.vocab_size})",
                "workers": 1,
                "MB/s": _text_bytes(find_corpus_files(split)) / 1e6 / (time.perf_counter() - start),
            }
        )
    best = bench_pretokenize_side_by_side(split, tokenizer, workers, args.repeats, work)
    raw, raw_cpu = best["raw"], best["raw_cpu"]
    rows.append(
        {
            "corpus": name,
            "stage": "raw SentencePiece encode",
            "workers": 1,
            "MB/s": raw,
            "MB/cpu-s": raw_cpu,
            "ratio": best["raw_spread"],
            "ratio means": "slowest / fastest repeat, wall (load noise)",
        }
    )
    rows.append(
        {
            "corpus": name,
            "stage": "raw SentencePiece encode, threads",
            "workers": max(workers),
            "MB/s": best["raw_threads"],
            "MB/cpu-s": best["raw_threads_cpu"],
            "ratio": best["raw_threads"] / raw,
            "ratio means": "wall speed-up vs 1 thread",
        }
    )
    for w in workers:
        mbps, cpu = best[f"pipeline_{w}"], best[f"pipeline_{w}_cpu"]
        rows.append(
            {
                "corpus": name,
                "stage": "pretokenize",
                "workers": w,
                "MB/s": mbps,
                "MB/cpu-s": cpu,
                "tokens/s": best[f"pipeline_{w}_tokens"],
                "ratio": cpu / raw_cpu,
                "ratio means": "per core: MB/cpu-s vs raw 1 thread (goal ≥ 0.8)",
            }
        )
        rows.append(
            {
                "corpus": name,
                "stage": "pretokenize",
                "workers": w,
                "MB/s": mbps,
                "ratio": mbps / w / raw if w == 1 else mbps / best["raw_threads"],
                "ratio means": "wall vs raw 1 thread" if w == 1 else f"wall vs raw {w} threads",
            }
        )
    token_corpus = open_token_corpus(split, tokenizer, cache_dir=work / "cache-1", progress=False)
    needed = args.train_tokens_per_s / args.seq_len
    for prefetch in (2, 0):
        try:
            wps = bench_loader(
                token_corpus, args.seq_len, args.batch_size, prefetch, args.loader_seconds
            )
        except UsageError as err:  # corpus too small for the requested batch
            print(f"loader skipped on {name}: {err}", file=sys.stderr)
            break
        rows.append(
            {
                "corpus": name,
                "stage": f"loader (prefetch {prefetch})",
                "workers": 1,
                "windows/s": wps,
                "tokens/s": wps * args.seq_len,
                "ratio": wps / needed,
                "ratio means": f"vs the {needed:.0f} windows/s of training at "
                f"{args.train_tokens_per_s:.3g} tokens/s",
            }
        )
        step_s = args.batch_size * args.seq_len / args.train_tokens_per_s
        stall = loader_stall_ms(token_corpus, args.seq_len, args.batch_size, prefetch, step_s)
        rows.append(
            {
                "corpus": name,
                "stage": f"loader (prefetch {prefetch}) in a training loop",
                "workers": 1,
                "ratio": stall / (step_s * 1e3),
                "ratio means": f"data wait {stall:.2f} ms per {step_s * 1e3:.0f} ms step",
            }
        )
    return rows, tokenizer


def _name(arg: str) -> str:
    """A path as its file name, so results do not record where this machine keeps its files."""
    return Path(arg).name if os.sep in arg else arg


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--corpus", nargs="+", required=True, type=Path, help=".jsonl/.jsonl.zst files"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="SentencePiece model (default: train one on the first corpus)",
    )
    parser.add_argument(
        "--vocab_size", type=int, default=2048, help="vocabulary of the trained tokenizer"
    )
    parser.add_argument("--workers", type=int, default=available_cpus(), help="worker processes")
    parser.add_argument("--seq_len", type=int, default=4096, help="loader window length")
    parser.add_argument("--batch_size", type=int, default=64, help="loader batch size")
    parser.add_argument(
        "--train_tokens_per_s",
        type=float,
        default=5e6,
        help="training throughput the loader is compared with",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each measurement, alternated; the fastest counts",
    )
    parser.add_argument("--loader_seconds", type=float, default=3.0, help="loader measuring time")
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR / "data.json", help="JSON results"
    )
    parser.add_argument(
        "--work_dir", type=Path, default=None, help="scratch folder (default: a temp dir)"
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    rows: list[dict] = []
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for corpus in args.corpus:
            corpus_rows, tokenizer = bench_corpus(corpus, tokenizer, args, Path(work))
            rows += corpus_rows
    load_after = os.getloadavg()
    print(format_table(rows, COLUMNS))
    cpus = os.cpu_count()
    print(
        f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"on {cpus} CPUs; "
        f"{environment()['cpu']}"
    )
    command = " ".join([parser.prog, *map(_name, sys.argv[1:])])
    settings = {
        k: [_name(str(x)) for x in v] if isinstance(v, list) else _name(str(v))
        for k, v in vars(args).items()
    }
    timing = wall_clock(
        "one whole stage (preprocess, a token cache rebuild, raw encoding, "
        "training the tokenizer); the loader over --loader_seconds",
        "the fastest of the repeats (alternated); CPU seconds beside wall seconds",
        warmup=0,
        repetitions=args.repeats,
    )
    path = write_results(
        args.output,
        rows,
        timing=timing,
        benchmark="data",
        command=command,
        load_average={"before": load_before, "after": load_after, "cpus": cpus},
        settings=settings,
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
