"""``python -m llama3 export_hf``: a checkpoint → a Hugging Face model directory
(:mod:`llama3.interop.hf_export`), written under a temporary name and renamed when complete."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llama3.cli import (
    add_checkpoint_source_flags,
    add_cleaning_flags,
    add_start_token_flag,
    start_token,
)
from llama3.data.clean import Cleaner
from llama3.errors import UsageError
from llama3.fileio import check_new_output_dir, staged_directory
from llama3.interop import hf_format, require
from llama3.interop.hf_export import DTYPES, cast_weights, write_directory, write_tokenizer
from llama3.model.args import ModelArgs

if TYPE_CHECKING:
    from llama3.data.tokenizer import Tokenizer

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}

DESCRIPTION = """\
Write a checkpoint as a Hugging Face model directory. Softmax attention with SwiGLU becomes a
standard LlamaForCausalLM (AutoModelForCausalLM.from_pretrained(DIR)); softplus attention and the
Combinator come with their modelling code (from_pretrained(DIR, trust_remote_code=True)). With
--tokenizer, a tokenizer.json is written whose normalizer applies the training text's cleaning
(recorded with the tokenizer; the cleaning flags below override a step), so raw text encodes to
the ids our pipeline gives the cleaned text.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    source = parser.add_argument_group("checkpoint and output")
    add_checkpoint_source_flags(source, tokenizer_required=False)
    source.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory to write; must not exist, or be empty",
    )
    group = parser.add_argument_group("format")
    group.add_argument(
        "--format",
        choices=("auto", *hf_format.FORMATS),
        default="auto",
        help="llama: transformers' LlamaForCausalLM (softmax attention with SwiGLU "
        "only); remote: our modelling code, loaded with trust_remote_code=True; "
        "auto: llama when possible",
    )
    group.add_argument(
        "--dtype", choices=tuple(DTYPES), help="weight dtype (default: the checkpoint's)"
    )
    group.add_argument(
        "--max_shard_size",
        default="5GB",
        help="largest safetensors file, e.g. 500MB or 5GB; larger models are split "
        "into several files with an index",
    )
    add_start_token_flag(group, "each text by the exported tokenizer")
    add_cleaning_flags(parser, recorded=True)


def run(args: argparse.Namespace) -> int:
    from llama3.checkpoint import read_model_file

    require("hf", "safetensors", *(["tokenizers"] if args.tokenizer else []))
    shard_bytes = parse_size(args.max_shard_size)
    output = check_new_output_dir(args.output, "--output")
    record = read_model_file(args.from_checkpoint)
    model_args = ModelArgs.from_dict(record["model_args"])
    form = choose_format(args.format, model_args)
    tokenizer, special = _tokenizer(args, record, model_args)
    dtype = DTYPES[args.dtype] if args.dtype else next(iter(record["model"].values())).dtype
    tensors = hf_format.to_hf_state(
        cast_weights(record["model"], dtype, args.dtype), model_args, form
    )
    with staged_directory(output, what="--output ") as staging:
        n_files = write_directory(staging, tensors, model_args, form, special, dtype, shard_bytes)
        if tokenizer is not None:
            cleaner = Cleaner.from_flags(args, base=tokenizer.cleaner)
            tokenizer.note_cleaning()
            write_tokenizer(
                staging, args.tokenizer, cleaner, start_token(args), model_args.max_seq_len
            )
    print_summary(output, form, tensors, dtype, n_files, tokenizer is not None)
    return 0


def _tokenizer(
    args: argparse.Namespace, record: dict[str, Any], model_args: ModelArgs
) -> tuple[Tokenizer | None, dict[str, int]]:
    """``--tokenizer`` checked against the checkpoint (None if not given) and the special token
    ids the export declares (bos: the start token)."""
    from llama3.data.tokenizer import load_tokenizer
    from llama3.interop.hf_tokenizer import special_ids

    if not args.tokenizer:
        return None, {}
    tokenizer = load_tokenizer(args.tokenizer, record.get("tokenizer"), model_args.vocab_size)
    ids = special_ids(tokenizer, start_token(args))
    return tokenizer, {kind: i for kind, i in ids.items() if kind != "unk"}


def choose_format(requested: str, model_args: ModelArgs) -> str:
    """The format to write; UsageError naming the setting when ``llama`` cannot express the
    model."""
    if requested == "auto":
        return hf_format.format_for(model_args)
    blocking = hf_format.blocking_setting(model_args)
    if requested == "llama" and blocking is not None:
        raise UsageError(
            f"--format llama: the checkpoint has {blocking}, which transformers' "
            f"LlamaForCausalLM cannot express; use --format remote (or auto)"
        )
    return requested


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``123`` (bytes) → bytes: a whole number, at least one."""
    value = text.strip().upper()
    unit = next((u for u in _UNITS if value.endswith(u)), None)
    try:
        number = float(value[: -len(unit)] if unit else value) * _UNITS.get(unit, 1)
    except ValueError:
        number = math.nan
    if not 1 <= number < math.inf:
        raise UsageError(
            f"--max_shard_size {text}: expected a size of at least one byte, such as 500MB or 5GB"
        )
    return int(number)


def print_summary(
    output: Path,
    form: str,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    n_files: int,
    with_tokenizer: bool,
) -> None:
    n_params = sum(t.numel() for t in tensors.values())
    kind = "LlamaForCausalLM" if form == "llama" else "remote code (modeling_llama3_softplus.py)"
    print(
        f"exported {n_params / 1e6:.2f} M parameters ({str(dtype).removeprefix('torch.')}, "
        f"{n_files} safetensors file(s)) as {kind} → {output}"
    )
    remote = ", trust_remote_code=True" if form == "remote" else ""
    print(f"load with: AutoModelForCausalLM.from_pretrained({json.dumps(str(output))}{remote})")
    if not with_tokenizer:
        print("note: no --tokenizer given, so no tokenizer files were written")
