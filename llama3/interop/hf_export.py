"""A checkpoint's model → a Hugging Face model directory (``python -m llama3 export_hf`` writes it
under a temporary name and renames it when complete)::

    DIR/config.json                     model settings (and our ModelArgs, for import_hf)
    DIR/generation_config.json          special token ids (bos: the start token)
    DIR/model.safetensors               weights; or model-0000i-of-0000n.safetensors + index
    DIR/modeling_llama3_softplus.py     softplus attention or the Combinator only (remote code)
    DIR/tokenizer.json, tokenizer_config.json, sentencepiece.model    with a tokenizer
    DIR/sentencepiece.cleaning.json     the cleaning its text needs (read by import_hf's users)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from llama3.data.clean import Cleaner
from llama3.errors import ConfigError
from llama3.fileio import write_json
from llama3.interop import hf_format
from llama3.model.args import ModelArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_weights(
    state: dict[str, torch.Tensor], dtype: torch.dtype, name: str | None
) -> dict[str, torch.Tensor]:
    """The weights in ``dtype`` (called ``name``, a key of :data:`DTYPES`); ConfigError naming a
    weight beyond its range, which would become inf."""
    cast = {key: tensor.to(dtype) for key, tensor in state.items()}
    for key, tensor in state.items():
        if torch.isfinite(tensor).all() and not torch.isfinite(cast[key]).all():
            raise ConfigError(
                "{dtype} {}: {} holds values up to {:.4g}, beyond {}'s largest "
                "{:.4g}; export as bf16 or fp32",
                name,
                key,
                tensor.abs().max().item(),
                name,
                torch.finfo(dtype).max,
            )
    return cast


def write_directory(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    model_args: ModelArgs,
    form: str,
    special: dict[str, int],
    dtype: torch.dtype,
    shard_bytes: int,
) -> int:
    """The model's files in ``directory``: weights (:func:`write_weights`), config.json,
    generation_config.json with the ``special`` token ids and, for ``remote``, the modelling code.
    Returns the number of weight files."""
    n_files = write_weights(directory, tensors, shard_bytes)
    write_json(directory / "config.json", hf_format.hf_config(model_args, form, special, dtype))
    write_json(
        directory / "generation_config.json",
        {f"{kind}_token_id": token for kind, token in special.items()},
    )
    if form == "remote":
        shutil.copyfile(hf_format.MODELING_SOURCE, directory / hf_format.REMOTE_FILE)
    return n_files


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
    write_json(
        directory / hf_format.INDEX_FILE,
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
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


def write_tokenizer(
    directory: Path,
    tokenizer: str | os.PathLike,
    cleaner: Cleaner,
    start: str | None,
    max_seq_len: int,
) -> None:
    """tokenizer.json for the SentencePiece model ``tokenizer``, whose normalizer applies
    ``cleaner`` and which puts ``start`` first, and the model itself with that cleaning recorded
    beside it."""
    from llama3.data.tokenizer import write_cleaning_record
    from llama3.interop.hf_tokenizer import save_tokenizer

    save_tokenizer(directory, tokenizer, cleaner, start, max_seq_len)
    model_file = directory / hf_format.SENTENCEPIECE_FILE
    shutil.copyfile(tokenizer, model_file)
    write_cleaning_record(
        model_file, cleaner, "export_hf: the tokenizer's record and the cleaning flags given"
    )
