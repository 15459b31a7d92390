"""``python -m llama3 import_meta``: a Meta Llama 3 checkpoint (``params.json`` and
``consolidated.*.pth`` in ``--meta_dir``) → our checkpoint, step 0 (:mod:`llama3.import_meta`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llama3.checkpoint import save_model_checkpoint
from llama3.errors import UsageError
from llama3.import_meta import (
    PARAMS_FILE,
    SHARD_PATTERN,
    TOKENIZER_FILE,
    build_model,
    load_shards,
    read_params,
    tokenizer_record,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert Meta's Llama 3 checkpoint (params.json + consolidated.*.pth) into ours: softmax\n"
        "attention, SwiGLU, step 0. Llama 3's tokenizer.model is a tiktoken file, "
        "not SentencePiece,\n"
        "so it is not recorded; the result loads with llama3.load_checkpoint and deploys "
        "without a\n"
        "tokenizer."
    )
    group = parser.add_argument_group("conversion")
    group.add_argument(
        "--meta_dir",
        required=True,
        metavar="DIR",
        help="directory holding params.json and consolidated.00.pth (and more shards)",
    )
    group.add_argument(
        "--to_checkpoint",
        required=True,
        metavar="DIR",
        help="checkpoint directory to write (step_00000000 and latest)",
    )
    group.add_argument(
        "--max_seq_len",
        type=int,
        default=8192,
        help="context length recorded in the checkpoint (Llama 3: 8192; 3.1: 131072)",
    )


def run(args: argparse.Namespace) -> int:
    meta_dir = Path(args.meta_dir)
    params_path, shard_paths = find_files(meta_dir)
    model_args = read_params(params_path, shard_paths, args.max_seq_len)
    state = load_shards(shard_paths)
    model = build_model(model_args, state, ", ".join(p.name for p in shard_paths), PARAMS_FILE)
    tokenizer, note = tokenizer_record(meta_dir / TOKENIZER_FILE)
    path = save_model_checkpoint(args.to_checkpoint, model, tokenizer=tokenizer, step=0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"imported {n_params / 1e6:.1f} M parameters from {len(shard_paths)} shard(s) → {path}")
    if note:
        print(note)
    return 0


def find_files(meta_dir: Path) -> tuple[Path, list[Path]]:
    """params.json and the shards, sorted by their model-parallel rank."""
    if not meta_dir.is_dir():
        raise UsageError(f"--meta_dir {meta_dir}: no such directory")
    params = meta_dir / PARAMS_FILE
    if not params.is_file():
        raise UsageError(f"--meta_dir {meta_dir}: {PARAMS_FILE} is missing")
    shards = sorted(meta_dir.glob(SHARD_PATTERN))
    if not shards:
        raise UsageError(f"--meta_dir {meta_dir}: no {SHARD_PATTERN} shards")
    return params, shards
