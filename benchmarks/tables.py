"""The README's training, inference and decoding tables, and the loss-against-wall-time figure,
generated from the JSON that benchmarks/train.py and benchmarks/inference.py write.

    python -m benchmarks.tables --train benchmarks/results/train_nvidia-h200.json \\
        --inference benchmarks/results/inference_nvidia-h200.json \\
        --readme README.md --figure benchmarks/results/train_loss_nvidia-h200.png

Each table replaces the text between ``<!-- tables.py: NAME -->`` and ``<!-- end -->`` in the
README (NAME: training, inference, decoding); without --readme the tables are printed. Numbers come
from the JSON only; the original's published A100 figures stand beside them, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from llama3.fileio import atomic_write_bytes

# The original's README, one A100 40GB: 80,000 training steps (time, memory) and TensorRT prefill
# latency at batch 64, by (model, sequence length).
ORIGINAL_TRAINING = {
    ("softmax", 4096): "19 h, 18 GB",
    ("softplus-128", 4096): "8 h, 12 GB",
    ("softplus-424", 4096): "13 h, 19 GB",
    ("softmax", 8192): "69 h, 37 GB",
    ("softplus-128", 8192): "19 h, 24 GB",
    ("softplus-424", 8192): "36 h, 37 GB",
}
ORIGINAL_INFERENCE = {
    ("softmax", 4096): "44.97 ms",
    ("softplus-128", 4096): "16.33 ms",
    ("softplus-424", 4096): "46.69 ms",
    ("softmax", 8192): "146.44 ms",
    ("softplus-128", 8192): "35.40 ms",
    ("softplus-424", 8192): "92.94 ms",
}
ATTENTION = {"softmax": "softmax, 4 heads"}
RUNTIMES = {
    "eager": "PyTorch eager",
    "compile": "torch.compile",
    "onnxruntime": "ONNX Runtime",
    "tensorrt": "TensorRT",
}
BLOCK = re.compile(r"(<!-- tables\.py: (\w+) -->\n).*?(<!-- end -->)", re.S)


def attention(model: str) -> str:
    return ATTENTION.get(model, model.replace("softplus-", "softplus, core_dim "))


def fmt(value: float | None) -> str:
    """3 significant digits, millions as M, thousands separated: 1.23 M, 12,345, 6.78."""
    if value is None:
        return "–"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g} M"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def measured_on(data: dict[str, Any]) -> str:
    env = data["environment"]
    tune = "on" if data.get("kernel_autotune", True) else "off (first configuration of each table)"
    return (
        f"Measured on {env.get('gpu') or env.get('cpu')} on {env['date'][:10]} (torch "
        f"{env['torch']}, Triton {env.get('triton')}, Python {env['python']}); kernel "
        f"autotuning {tune}."
    )


def error_cell(row: dict[str, Any]) -> str:
    return "not run (time budget)" if "not run" in row["error"] else row["error"].replace("|", "/")


# ------------------------------------------------------------------------------- training


def training_table(data: dict[str, Any]) -> str:
    budget = (
        f"{data['seconds']:g} s"
        if data.get("seconds")
        else f"{data.get('budget', 'the same number of steps')}"
    )
    header = [
        "attention",
        "sequence",
        "mode",
        "tokens/s",
        "vs softmax",
        "MFU",
        "peak memory",
        f"loss after {budget}",
        "80,000 steps (projected)",
        "data",
        "original, A100 40GB (published)",
    ]
    rows = []
    for r in data["rows"]:
        original = ORIGINAL_TRAINING.get((r["model"], r["seq_len"]), "")
        cells = [attention(r["model"]), str(r["seq_len"]), r["mode"]]
        if r.get("error"):
            rows.append(cells + [error_cell(r)] + ["–"] * 6 + [original])
            continue
        data_label = "random tokens" if r["data"].startswith("synthetic") else "Python docs"
        rows.append(
            cells
            + [
                fmt(r["tokens_per_s"]),
                f"{r.get('vs_softmax', 0):.2f}×" if r.get("vs_softmax") else "–",
                f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–",
                f"{r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else "–",
                f"{r['loss']:.2f}",
                f"{r['projected_80k_h']:.1f} h",
                data_label,
                original,
            ]
        )
    peak = data.get("peak_tflops")
    datasets = sorted({r["data"] for r in data["rows"] if r.get("data")})
    notes = [
        measured_on(data),
        f"`benchmarks/train.py`, precision {data['precision']}"
        f"{' with TF32' if data.get('allow_tf32') else ''}, batch "
        f"{next((r['batch'] for r in data['rows'] if r.get('batch')), '–')}; each configuration "
        f"trains {budget} after {data.get('warmup_steps')} untimed warm-up step(s) (compilation"
        f"). MFU: "
        + (
            f"against {fmt(peak)} TFLOP/s ({data.get('peak_source')})."
            if peak
            else f"{data.get('peak_source')}."
        ),
        "Loss after equal short wall time is not the original's final loss after 80,000 steps; "
        "the projection multiplies the measured step time by 80,000. Data: "
        + "; ".join(datasets)
        + ".",
    ]
    return "\n\n".join([" ".join(notes), table(header, rows)])


# ------------------------------------------------------------------------------ inference


def inference_table(data: dict[str, Any]) -> str:
    header = [
        "attention",
        "sequence",
        "batch",
        "runtime",
        "latency p50",
        "p90",
        "p95",
        "p99",
        "throughput",
        "vs softmax",
        "compile / first call",
        "original, A100 TensorRT",
    ]
    prefill = [r for r in data["rows"] if r["phase"] == "prefill"]
    rows = []
    for r in sorted(prefill, key=lambda r: (r["seq_len"], list(RUNTIMES).index(r["runner"]))):
        cells = [
            attention(r["model"]),
            str(r["seq_len"]),
            str(r["batch"]),
            RUNTIMES.get(r["runner"], r["runner"]),
        ]
        original = (
            ORIGINAL_INFERENCE.get((r["model"], r["seq_len"]), "") if r["runner"] == "eager" else ""
        )
        if r.get("error"):
            rows.append(cells + [error_cell(r)] + ["–"] * 6 + [original])
            continue
        softmax = next(
            (
                x
                for x in prefill
                if x["model"] == "softmax"
                and not x.get("error")
                and (x["seq_len"], x["runner"]) == (r["seq_len"], r["runner"])
            ),
            None,
        )
        rows.append(
            cells
            + [f"{r[f'p{q}_ms']:.2f} ms" for q in (50, 90, 95, 99)]
            + [
                f"{r['calls_per_s']:.2f} batches/s",
                f"{r['calls_per_s'] / softmax['calls_per_s']:.2f}×" if softmax else "–",
                f"{r['first_call_ms'] / 1000:.1f} s",
                original,
            ]
        )
    runtimes = "ONNX Runtime runs the fp32 export; the others " + str(data["settings"]["precision"])
    notes = [
        measured_on(data),
        f"`benchmarks/inference.py`: prefill of the full context with an empty cache; "
        f"percentiles over {data['settings']['iterations']} calls after "
        f"{data['settings']['warmup']} warm-up calls; throughput = batches per second "
        f"(1000 / mean latency, the original's qps). {runtimes}. The original's column is "
        "TensorRT on an A100, beside our PyTorch eager row of the same shape.",
    ]
    return "\n\n".join([" ".join(notes), table(header, rows)])


def decoding_table(data: dict[str, Any]) -> str:
    header = ["attention", "batch", "decoding", "tokens/s", "prefill tokens/s"]
    rows = []
    decode = [r for r in data["rows"] if r["phase"] == "decode"]
    for r in sorted(decode, key=lambda r: (r["batch"], r["runner"])):
        cells = [attention(r["model"]), str(r["batch"]), r["runner"]]
        if r.get("error"):
            rows.append(cells + [error_cell(r), "–"])
        else:
            rows.append(cells + [fmt(r["decode_tokens_per_s"]), fmt(r["prefill_tokens_per_s"])])
    s = data["settings"]
    note = (
        f"{measured_on(data)} `benchmarks/inference.py`: {s['decode_tokens']} new tokens after "
        f"a {s['decode_prompt']}-token prompt per row, {s['precision']}, sampling (temperature "
        "0.8, top-k 50) with the static cache; tokens/s counts the tokens of decode steps."
    )
    return "\n\n".join([note, table(header, rows)])


# ----------------------------------------------------------------------------- the figure


def loss_figure(data: dict[str, Any], path: Path) -> Path:
    """Training loss against seconds after warm-up, one panel per sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r.get("loss_curve")]
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(
        1, max(len(seq_lens), 1), figsize=(6 * max(len(seq_lens), 1), 4), squeeze=False
    )
    for ax, seq_len in zip(axes[0], seq_lens):
        for r in (r for r in rows if r["seq_len"] == seq_len):
            t, loss = zip(*r["loss_curve"])
            ax.plot(
                t,
                loss,
                linestyle="-" if r["mode"] == "eager" else "--",
                label=f"{attention(r['model'])} ({r['mode']})",
            )
        ax.set(title=f"sequence {seq_len}", xlabel="seconds after warm-up", ylabel="training loss")
        ax.legend(fontsize="small")
    fig.suptitle(f"Training loss against wall time, {data['environment'].get('gpu') or 'CPU'}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ main


def replace_blocks(text: str, blocks: dict[str, str], where: str) -> str:
    """``text`` with each named generated block replaced; an error names a missing marker."""
    found = {m.group(2) for m in BLOCK.finditer(text)}
    missing = sorted(set(blocks) - found)
    if missing:
        raise SystemExit(
            f"{where}: no '<!-- tables.py: {missing[0]} -->' … '<!-- end -->' block; "
            "add one where the table belongs"
        )
    return BLOCK.sub(
        lambda m: (
            m.group(1) + blocks[m.group(2)] + "\n" + m.group(3)
            if m.group(2) in blocks
            else m.group(0)
        ),
        text,
    )


def load(path: Path, flag: str, benchmark: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{flag} {path}: {err}") from err
    if data.get("benchmark") != benchmark:
        raise SystemExit(f"{flag} {path}: not results of benchmarks/{benchmark}.py")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train", type=Path, help="JSON of benchmarks/train.py")
    parser.add_argument("--inference", type=Path, help="JSON of benchmarks/inference.py")
    parser.add_argument("--readme", type=Path, help="replace the generated blocks of this file")
    parser.add_argument("--figure", type=Path, help="PNG of the loss against wall time (--train)")
    args = parser.parse_args(argv)
    if not (args.train or args.inference):
        parser.error("give --train and/or --inference")
    blocks = {}
    if args.train:
        train = load(args.train, "--train", "train")
        blocks["training"] = training_table(train)
        if args.figure:
            print(f"figure: {loss_figure(train, args.figure)}")
            link = os.path.relpath(args.figure, args.readme.parent if args.readme else Path.cwd())
            blocks["training"] += f"\n\n![Training loss against wall time]({link})"
    if args.inference:
        inference = load(args.inference, "--inference", "inference")
        blocks["inference"] = inference_table(inference)
        blocks["decoding"] = decoding_table(inference)
    for name, block in blocks.items():
        print(f"\n{name}:\n{block}")
    if args.readme:
        text = args.readme.read_text()
        atomic_write_bytes(args.readme, replace_blocks(text, blocks, str(args.readme)).encode())
        print(f"\nupdated {args.readme}: {', '.join(blocks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
