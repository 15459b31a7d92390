"""``python -m llama3 import_hf``: a Hugging Face Llama directory → our checkpoint, weights only,
step 0 (:mod:`llama3.interop.hf_import`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llama3.cli import add_tokenizer_flag
from llama3.interop import require
from llama3.interop.hf_import import (
    CONFIG_FILE,
    detect_format,
    model_args_from_config,
    read_config,
    read_weights,
    to_our_names,
    tokenizer_record,
    untie,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert a Hugging Face Llama directory (safetensors, one file or sharded) into our\n"
        "checkpoint: weights only, step 0, for 'train --from_checkpoint', evaluate, generate and\n"
        "deploy. Directories written by export_hf (softplus attention and the Combinator too)\n"
        "come back exactly. The tokenizer recorded in the checkpoint is --tokenizer, else the\n"
        "SentencePiece model export_hf put in DIR, if any."
    )
    group = parser.add_argument_group("conversion")
    group.add_argument(
        "--hf_dir",
        required=True,
        metavar="DIR",
        help="directory holding config.json and model.safetensors (or shards and "
        "model.safetensors.index.json)",
    )
    group.add_argument(
        "--to_checkpoint",
        required=True,
        metavar="DIR",
        help="new checkpoint directory to write (step_00000000 and latest); one "
        "that already holds a checkpoint is refused",
    )
    add_tokenizer_flag(group, required=False)


def run(args: argparse.Namespace) -> int:
    from llama3.checkpoint import check_new_checkpoint_dir, save_model_checkpoint
    from llama3.import_meta import build_model

    require("hf", "safetensors")
    check_new_checkpoint_dir(args.to_checkpoint)
    hf_dir = Path(args.hf_dir)
    config = read_config(hf_dir)
    form = detect_format(config, hf_dir)
    model_args = model_args_from_config(config, form, hf_dir)
    tokenizer, note = tokenizer_record(args.tokenizer, hf_dir, model_args)
    hf_state, source = read_weights(hf_dir)
    untied = untie(hf_state, config, hf_dir / CONFIG_FILE)
    state = to_our_names(hf_state, model_args, form, source)
    model = build_model(model_args, state, source, CONFIG_FILE)
    path = save_model_checkpoint(args.to_checkpoint, model, tokenizer=tokenizer, step=0)
    n_params = sum(p.numel() for p in model.parameters())
    kind = f"{model_args.attention} attention, {model_args.mixer}"
    print(f"imported {n_params / 1e6:.2f} M parameters ({kind}) from {source} → {path}")
    if untied:
        print("note: the directory ties lm_head to the embedding; the checkpoint holds a copy")
    print(note)
    return 0
