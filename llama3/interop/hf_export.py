"""``python -m llama3 export_hf``: a checkpoint → a Hugging Face model directory.

Written under a temporary name and renamed when complete::

    DIR/config.json                     model settings (and our ModelArgs, for import_hf)
    DIR/generation_config.json          special token ids (bos: the start token)
    DIR/model.safetensors               weights; or model-0000i-of-0000n.safetensors + index
    DIR/modeling_llama3_softplus.py     softplus attention or the Combinator only (remote code)
    DIR/tokenizer.json, tokenizer_config.json, sentencepiece.model    with --tokenizer
    DIR/sentencepiece.cleaning.json     the cleaning its text needs (read by import_hf's users)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llama3.cli import add_checkpoint_source_flags, add_start_token_flag, start_token
from llama3.errors import UsageError
from llama3.data.clean import Cleaner, add_cleaning_flags
from llama3.fileio import check_new_output_dir, staged_directory, write_json
from llama3.interop import hf_format, require
from llama3.model.args import ModelArgs

if TYPE_CHECKING:
    from llama3.data.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}

EXPORT_DESCRIPTION = """\
Write a checkpoint as a Hugging Face model directory. Softmax attention with SwiGLU becomes a
standard LlamaForCausalLM (AutoModelForCausalLM.from_pretrained(DIR)); softplus attention and the
Combinator come with their modelling code (from_pretrained(DIR, trust_remote_code=True)). With
--tokenizer, a tokenizer.json is written whose normalizer applies the training text's cleaning
(recorded with the tokenizer; the cleaning flags below override a step), so raw text encodes to
the ids our pipeline gives the cleaned text.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = EXPORT_DESCRIPTION
    source = parser.add_argument_group("checkpoint and output")
    add_checkpoint_source_flags(source, tokenizer_required=False)
    source.add_argument("--output", required=True, metavar="DIR",
                        help="directory to write; must not exist, or be empty")
    group = parser.add_argument_group("format")
    group.add_argument("--format", choices=("auto", *hf_format.FORMATS), default="auto",
                       help="llama: transformers' LlamaForCausalLM (softmax attention with SwiGLU "
                            "only); remote: our modelling code, loaded with trust_remote_code=True; "
                            "auto: llama when possible")
    group.add_argument("--dtype", choices=tuple(DTYPES),
                       help="weight dtype (default: the checkpoint's)")
    group.add_argument("--max_shard_size", default="5GB",
                       help="largest safetensors file, e.g. 500MB or 5GB; larger models are split "
                            "into several files with an index")
    add_start_token_flag(group, "each text by the exported tokenizer")
    add_cleaning_flags(parser, recorded=True)


def run(args: argparse.Namespace) -> int:
    from llama3.checkpoint import read_model_file
    from llama3.data.tokenizer import load_tokenizer
    from llama3.interop.hf_tokenizer import special_ids

    require("hf", "safetensors", *(["tokenizers"] if args.tokenizer else []))
    shard_bytes = parse_size(args.max_shard_size)
    output = check_new_output_dir(args.output, "--output")
    record = read_model_file(args.from_checkpoint)
    model_args = ModelArgs.from_dict(record["model_args"])
    form = choose_format(args.format, model_args)
    tokenizer = load_tokenizer(args.tokenizer, record.get("tokenizer"), model_args.vocab_size) if args.tokenizer else None
    special = {} if tokenizer is None else {  # bos: the start token
        kind: i for kind, i in special_ids(tokenizer, start_token(args)).items() if kind != "unk"}
    dtype = DTYPES[args.dtype] if args.dtype else next(iter(record["model"].values())).dtype
    tensors = hf_format.to_hf_state(cast_weights(record["model"], dtype, args.dtype), model_args,
                                    form)
    with staged_directory(output, what="--output ") as staging:
        n_files = write_weights(staging, tensors, shard_bytes)
        write_json(staging / "config.json", hf_format.hf_config(model_args, form, special, dtype))
        write_json(staging / "generation_config.json",
                   {f"{kind}_token_id": token for kind, token in special.items()})
        if form == "remote":
            shutil.copyfile(hf_format.MODELING_SOURCE, staging / hf_format.REMOTE_FILE)
        if tokenizer is not None:
            write_tokenizer(staging, args, tokenizer, model_args)
    print_summary(output, form, tensors, dtype, n_files, tokenizer is not None)
    return 0


def choose_format(requested: str, model_args: ModelArgs) -> str:
    """The format to write; UsageError naming the setting when ``llama`` cannot express the model."""
    if requested == "auto":
        return hf_format.format_for(model_args)
    blocking = hf_format.blocking_setting(model_args)
    if requested == "llama" and blocking is not None:
        raise UsageError(f"--format llama: the checkpoint has {blocking}, which transformers' "
                         f"LlamaForCausalLM cannot express; use --format remote (or auto)")
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
        raise UsageError(f"--max_shard_size {text}: expected a size of at least one byte, such "
                         "as 500MB or 5GB")
    return int(number)


def cast_weights(state: dict[str, torch.Tensor], dtype: torch.dtype,
                 flag: str | None) -> dict[str, torch.Tensor]:
    """The weights in ``dtype`` (``--dtype flag``); UsageError naming a weight beyond its range,
    which would become inf."""
    cast = {name: tensor.to(dtype) for name, tensor in state.items()}
    for name, tensor in state.items():
        if torch.isfinite(tensor).all() and not torch.isfinite(cast[name]).all():
            raise UsageError(f"--dtype {flag}: {name} holds values up to "
                             f"{tensor.abs().max().item():.4g}, beyond {flag}'s largest "
                             f"{torch.finfo(dtype).max:.4g}; export as bf16 or fp32")
    return cast


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> int:
    """One safetensors file, or several of at most ``shard_bytes`` each plus their index (one
    tensor larger than that gets a file of its own). Returns the number of files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], directory / hf_format.SAFETENSORS_FILE)
        return 1
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, directory / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(directory / hf_format.INDEX_FILE,
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    return len(shards)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, whose failed write (a full disk) is raised as the OSError it was
    (safetensors reports it as its own error, with the code in the text)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


def write_tokenizer(directory: Path, args: argparse.Namespace, tokenizer: Tokenizer,
                    model_args: ModelArgs) -> None:
    """tokenizer.json with the cleaning recorded with ``tokenizer`` (a cleaning flag given
    overrides its step), and our SentencePiece model with that cleaning recorded beside it."""
    from llama3.data.tokenizer import write_cleaning_record
    from llama3.interop.hf_tokenizer import save_tokenizer

    cleaner = Cleaner.from_flags(args, base=tokenizer.cleaner)
    tokenizer.note_cleaning()
    save_tokenizer(directory, args.tokenizer, cleaner, start_token(args), model_args.max_seq_len)
    model_file = directory / hf_format.SENTENCEPIECE_FILE
    shutil.copyfile(args.tokenizer, model_file)
    write_cleaning_record(model_file, cleaner, "export_hf: the tokenizer's record and the "
                                               "cleaning flags given")


def print_summary(output: Path, form: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                  n_files: int, with_tokenizer: bool) -> None:
    n_params = sum(t.numel() for t in tensors.values())
    kind = "LlamaForCausalLM" if form == "llama" else "remote code (modeling_llama3_softplus.py)"
    print(f"exported {n_params / 1e6:.2f} M parameters ({str(dtype).removeprefix('torch.')}, "
          f"{n_files} safetensors file(s)) as {kind} → {output}")
    remote = ", trust_remote_code=True" if form == "remote" else ""
    print(f"load with: AutoModelForCausalLM.from_pretrained({json.dumps(str(output))}{remote})")
    if not with_tokenizer:
        print("note: no --tokenizer given, so no tokenizer files were written")
